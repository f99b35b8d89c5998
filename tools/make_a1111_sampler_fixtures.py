#!/usr/bin/env python3
"""A1111 1.10's `Restart` sampler (our `restart`, `restart_karras`) on the tiny models: txt2img
(a batch of two among them) and img2img at strength 0.6 (A1111's rule).

A1111's and k-diffusion's code runs as written (taken with `ast` by tools/a1111_source.py, not
copied):
  modules/sd_samplers_extra.py   restart_sampler (its schedule swap from 20 steps, restart_list,
                                 Heun steps, the noise of each restart)
  k_diffusion/sampling.py        to_d, get_sigmas_karras, append_zero (0.1.1.post1's wheel)
  k_diffusion/utils.py           append_dims
on the sigmas A1111's schedule gives it, computed by diffusers' HeunDiscreteScheduler on the model's
config (uniform, or `use_karras_sigmas`: the schedules our samplers share), the tiny UNet as
A1111's CompVisDenoiser with classifier-free guidance (`c_in = 1 / sqrt(sigma^2 + 1)`, the
timestep of each sigma: the schedule's own where the sigma is one of its sigmas, else the class's
`_sigma_to_t`), the starting noise drawn from the images' generators (seed + i) and each
restart's `randn_like` from them in order (A1111's ImageRNG). img2img: A1111's
`sample_img2img` runs the sampler on `sigmas[steps - t_enc - 1:]`, `t_enc = int(min(strength,
0.999) * steps)`, from `image + noise * sigma_sched[0]`; the init image's VAE sample and its noise
are drawn as diffusers' img2img draws them (as make_a1111_timestep_sampler_fixtures.py). The
prompt embeddings and the VAE decode are diffusers'.

Writes, under OUT (default crates/pipeline/tests/fixtures):
  a1111-samplers.json         cases (the request; A1111's sigmas of each evaluation), versions,
                              the sources' digests
  a1111-samplers.safetensors  image.<case>: [batch, H, W, 3] u8 = round(np * 255)

Usage:
  pip install --no-deps k-diffusion==0.1.1.post1
  python tools/make_a1111_sampler_fixtures.py --a1111 PATH/TO/stable-diffusion-webui
"""

import importlib.util
import json
import os
import sys
import types

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import a1111_args, functions  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures")
INIT_IMAGE = "init-32x32.png"

BASE = dict(model="tiny-a", prompt="a photo of an astronaut riding a horse on mars",
            negative_prompt="blurry, low quality", width=32, height=32, guidance_scale=7.5,
            batch_size=1)
# Below 20 steps Restart is Heun; 20..35 steps one restart of 9 steps; from 36 steps two of
# steps // 4. img2img at 0.6: 40 steps run 25 (one restart), 12 steps run 8 (none).
CASES = {
    "restart_karras.10": dict(scheduler="restart_karras", steps=10, seed=91),
    "restart_karras.20.batch": dict(scheduler="restart_karras", steps=20, seed=92, batch_size=2),
    "restart.36": dict(scheduler="restart", steps=36, seed=93),
    "restart_karras.40.0.6.img2img": dict(scheduler="restart_karras", steps=40, seed=94,
                                          strength=0.6),
    "restart.12.0.6.img2img.batch": dict(scheduler="restart", steps=12, seed=95, strength=0.6,
                                         batch_size=2),
}


def k_diffusion_path():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        return None
    return spec.submodule_search_locations[0]


def load_sources(a1111_dir, k_dir):
    """restart_sampler with k-diffusion's helpers in its namespace, and its randn_like hook."""
    utils, d0 = functions(os.path.join(k_dir, "utils.py"), ["append_dims"], {"torch": torch})
    k_ns = {"torch": torch, "utils": types.SimpleNamespace(append_dims=utils["append_dims"])}
    k, d1 = functions(os.path.join(k_dir, "sampling.py"),
                      ["append_zero", "to_d", "get_sigmas_karras"], k_ns)
    # A1111 swaps k_diffusion.sampling.torch for its TorchHijack: randn_like draws from ImageRNG.
    hijack = types.SimpleNamespace(randn_like=None)
    sampling = types.SimpleNamespace(torch=hijack, to_d=k["to_d"],
                                     get_sigmas_karras=k["get_sigmas_karras"])
    k_module = types.ModuleType("k_diffusion")
    k_module.sampling = sampling
    sys.modules["k_diffusion"] = k_module
    sys.modules["k_diffusion.sampling"] = sampling
    quiet = types.SimpleNamespace(tqdm=lambda it, disable=None: it)
    ns = {"torch": torch, "tqdm": quiet, "k_diffusion": k_module}
    a, d2 = functions(os.path.join(a1111_dir, "modules", "sd_samplers_extra.py"),
                      ["restart_sampler"], ns)
    return a["restart_sampler"], hijack, {**d0, **d1, **d2}


@torch.no_grad()
def run(pipe, restart_sampler, hijack, case, x, image, gens):
    from diffusers import HeunDiscreteScheduler

    batch, steps = case["batch_size"], case["steps"]
    sched = HeunDiscreteScheduler.from_config(
        pipe.scheduler.config, use_karras_sigmas=case["scheduler"].endswith("_karras"))
    sched.set_timesteps(steps)
    sigmas = torch.unique_consecutive(sched.sigmas.float())
    step_t = sched.timesteps[0::2]
    assert len(step_t) == len(sigmas) - 1
    ac = sched.alphas_cumprod.numpy()
    log_sigmas = np.log(np.array(((1 - ac) / ac) ** 0.5))
    cond, uncond = pipe.encode_prompt(case["prompt"], "cpu", batch, True, case["negative_prompt"])
    emb = torch.cat([uncond, cond])
    seen = []

    def model(x, sigma):
        sigma = sigma[0]
        seen.append(float(sigma))
        hits = (sigmas[:-1] == sigma).nonzero()
        if len(hits):
            t = step_t[hits[0, 0]]
        else:
            t = torch.tensor(float(sched._sigma_to_t(np.float64(float(sigma)), log_sigmas)),
                             dtype=torch.float32)
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        eps = pipe.unet(torch.cat([x, x]) * c_in, t.expand(2 * x.shape[0]),
                        encoder_hidden_states=emb).sample
        u, c = eps.chunk(2)
        return x - (u + case["guidance_scale"] * (c - u)) * sigma

    hijack.randn_like = lambda like: torch.cat(
        [torch.randn((1, *like.shape[1:]), generator=g) for g in gens])
    if image is None:
        start = sigmas
        x = x * sigmas[0]
    else:
        t_enc = int(min(case["strength"], 0.999) * steps)
        start = sigmas[steps - t_enc - 1:]
        x = image + x * start[0]
    out = restart_sampler(model, x, start, disable=True)
    decoded = pipe.vae.decode(out / pipe.vae.config.scaling_factor).sample
    images = pipe.image_processor.postprocess(decoded, output_type="np")
    return torch.from_numpy((images * 255).round().astype("uint8")), seen


@torch.no_grad()
def main():
    args = a1111_args(__file__, __doc__, DEFAULT_OUT)
    if args is None:
        return
    k_dir = k_diffusion_path()
    if k_dir is None:
        print("make_a1111_sampler_fixtures.py: skipped (pip install --no-deps "
              "k-diffusion==0.1.1.post1)")
        return
    import diffusers
    from diffusers import StableDiffusionImg2ImgPipeline
    from safetensors.torch import save_file

    restart_sampler, hijack, digests = load_sources(args.a1111, k_dir)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    init = Image.open(os.path.join(args.out, "images", INIT_IMAGE)).convert("RGB")
    pipes, tensors, cases = {}, {}, {}
    for label, over in CASES.items():
        case = dict(BASE, **over)
        if case["model"] not in pipes:
            pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
                os.path.join(args.out, case["model"]), dtype=torch.float32,
                safety_checker=None, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            pipes[case["model"]] = pipe
        pipe = pipes[case["model"]]
        batch = case["batch_size"]
        gens = [torch.Generator("cpu").manual_seed(case["seed"] + i) for i in range(batch)]
        f = pipe.vae_scale_factor
        shape = (1, pipe.unet.config.in_channels, case["height"] // f, case["width"] // f)
        image = None
        if "strength" in case:
            case.update(step_rule="a1111", init_image=INIT_IMAGE)
            caught = {}

            def catch(original, noise, timestep):
                caught["image"], caught["noise"] = original, noise
                return original
            pipe.scheduler.add_noise = catch
            pipe.prepare_latents(pipe.image_processor.preprocess(init), torch.tensor([0]),
                                 1, batch, torch.float32, "cpu", gens)
            del pipe.scheduler.add_noise
            image, x = caught["image"], caught["noise"]
        else:
            x = torch.cat([torch.randn(shape, generator=g) for g in gens])
        images, seen = run(pipe, restart_sampler, hijack, case, x, image, gens)
        tensors[f"image.{label}"] = images.contiguous()
        case["evaluation_sigmas"] = seen
        cases[label] = case
        print(f"{label}: {len(seen)} UNet evaluations, mean {images.float().mean():.2f}")
    meta = {
        "generated_by": "tools/make_a1111_sampler_fixtures.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "k_diffusion": "0.1.1.post1"},
        "sources": {k: f"sha256 {v}" for k, v in digests.items()},
        "images": "image.<case>: [batch, H, W, 3] u8 = round(output_type='np' * 255)",
        "cases": cases,
    }
    with open(os.path.join(args.out, "a1111-samplers.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    save_file(tensors, os.path.join(args.out, "a1111-samplers.safetensors"))
    print(f"wrote a1111-samplers.* ({len(cases)} cases)")


if __name__ == "__main__":
    main()
