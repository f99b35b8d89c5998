#!/usr/bin/env python3
"""Reference images for a request's `eta` on the tiny models (run after tools/make_tiny_models.py).

1. `ddim`: diffusers 0.42.1's StableDiffusionPipeline with DDIMScheduler and `eta` (the noise
   each step adds, from the images' generators), one CPU generator per image (seed + i).
2. `euler_a`: k-diffusion's own `sample_euler_ancestral` with `eta` (what A1111's `Euler a`
   runs; diffusers' EulerAncestralDiscreteScheduler has no eta), its functions taken from the
   k-diffusion wheel's sampling.py with `ast` (tools/a1111_source.py's `functions`, not copied),
   on diffusers' Euler a schedule (its sigmas and the timestep of each), the tiny UNet as an
   epsilon denoiser with classifier-free guidance, the starting noise and each step's noise drawn
   from the images' generators in order (A1111's ImageRNG). With eta 1 it must give diffusers'
   own Euler a image (checked here).

Writes crates/pipeline/tests/fixtures/eta.json and eta.safetensors (image.<case>: [batch, H, W,
3] u8).

Usage (k-diffusion's files only: its own dependencies are not needed, nor imported):
  pip install --no-deps k-diffusion==0.1.1.post1
  python3 tools/make_eta_fixtures.py [--k-diffusion PATH/k_diffusion/sampling.py]
Without k-diffusion it says so and leaves the committed fixtures as they are.
"""

import argparse
import importlib.util
import json
import os
import sys
import types

import diffusers
import torch
from diffusers import (DDIMScheduler, EulerAncestralDiscreteScheduler,
                       StableDiffusionPipeline)
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import functions  # noqa: E402
from make_img2img_fixtures import load_pipe, to_u8  # noqa: E402

OUT = os.path.join("crates", "pipeline", "tests", "fixtures")
BASE = dict(model="tiny-a", prompt="a photo of an astronaut riding a horse on mars",
            negative_prompt="blurry, low quality", width=32, height=32, guidance_scale=7.5,
            steps=8, batch_size=1)
CASES = {
    "ddim.eta0.5.batch": dict(scheduler="ddim", eta=0.5, seed=71, batch_size=2),
    "ddim.eta1": dict(scheduler="ddim", eta=1.0, seed=72),
    "euler_a.eta0": dict(scheduler="euler_a", eta=0.0, seed=73),
    "euler_a.eta0.5.batch": dict(scheduler="euler_a", eta=0.5, seed=74, batch_size=2),
    "euler_a.eta1": dict(scheduler="euler_a", eta=1.0, seed=75),
}


def k_diffusion(path):
    """k-diffusion's sample_euler_ancestral and its helpers, run as written."""
    utils_path = os.path.join(os.path.dirname(path), "utils.py")
    utils, d0 = functions(utils_path, ["append_dims"], {"torch": torch})
    ns = {"torch": torch, "utils": types.SimpleNamespace(append_dims=utils["append_dims"]),
          "trange": lambda n, disable=None: range(n)}
    fns, d1 = functions(path, ["to_d", "get_ancestral_step", "sample_euler_ancestral"], ns)
    return fns["sample_euler_ancestral"], {**d0, **d1}


def euler_a_kdiffusion(pipe, sample, case, gens):
    sched = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(case["steps"])
    sigmas, timesteps = sched.sigmas, sched.timesteps
    batch = case["batch_size"]
    cond, uncond = pipe.encode_prompt(case["prompt"], "cpu", batch, True,
                                      case["negative_prompt"])
    emb = torch.cat([uncond, cond])
    f = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, case["height"] // f, case["width"] // f)

    def draw():
        return torch.cat([torch.randn(shape, generator=g) for g in gens])

    def model(x, sigma):
        # The timestep diffusers gives the UNet at this sigma (one per step, in order).
        (i,) = (sigmas[:-1] == sigma[0]).nonzero()[0].tolist()
        c_in = 1 / (sigma[0] ** 2 + 1) ** 0.5
        t = timesteps[i].expand(2 * x.shape[0])
        eps = pipe.unet(torch.cat([x, x]) * c_in, t, encoder_hidden_states=emb).sample
        u, c = eps.chunk(2)
        eps = u + case["guidance_scale"] * (c - u)
        return x - eps * sigma[0]

    x = draw() * sigmas[0]
    out = sample(model, x, sigmas, eta=case["eta"], noise_sampler=lambda s, t: draw())
    decoded = pipe.vae.decode(out / pipe.vae.config.scaling_factor).sample
    return to_u8(pipe.image_processor.postprocess(decoded, output_type="np"))


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k-diffusion", help="k_diffusion/sampling.py (default: the installed one)")
    args = ap.parse_args()
    if args.k_diffusion is None:
        # The package's folder without importing it (its __init__ imports what we skip).
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None:
            print("make_eta_fixtures.py: skipped (pip install --no-deps k-diffusion==0.1.1.post1)")
            return
        args.k_diffusion = os.path.join(spec.submodule_search_locations[0], "sampling.py")
    sample, digests = k_diffusion(args.k_diffusion)
    pipe = load_pipe(StableDiffusionPipeline, os.path.join(OUT, "tiny-a"))
    tensors, cases = {}, {}
    for label, over in CASES.items():
        case = dict(BASE, **over)
        gens = [torch.Generator("cpu").manual_seed(case["seed"] + i)
                for i in range(case["batch_size"])]
        common = dict(prompt=case["prompt"], negative_prompt=case["negative_prompt"],
                      num_inference_steps=case["steps"], width=case["width"],
                      height=case["height"], guidance_scale=case["guidance_scale"],
                      num_images_per_prompt=case["batch_size"], output_type="np")
        if case["scheduler"] == "ddim":
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
            images = to_u8(pipe(**common, eta=case["eta"], generator=gens).images)
        else:
            images = euler_a_kdiffusion(pipe, sample, case, gens)
            if case["eta"] == 1.0:
                pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(
                    pipe.scheduler.config)
                gens = [torch.Generator("cpu").manual_seed(case["seed"] + i)
                        for i in range(case["batch_size"])]
                theirs = to_u8(pipe(**common, generator=gens).images)
                diff = (images.int() - theirs.int()).abs().max().item()
                print(f"{label}: k-diffusion eta 1 vs diffusers' Euler a: max diff {diff}")
                assert diff <= 1, diff
        tensors[f"image.{label}"] = images.contiguous()
        cases[label] = case
        print(f"{label}: mean {images.float().mean():.2f}")
    meta = {
        "generated_by": "tools/make_eta_fixtures.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "k_diffusion": "0.1.1.post1"},
        "k_diffusion_sources": {k: f"sha256 {v}" for k, v in digests.items()},
        "images": "image.<case>: [batch, H, W, 3] u8 = round(output_type='np' * 255)",
        "cases": cases,
    }
    with open(os.path.join(OUT, "eta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    save_file(tensors, os.path.join(OUT, "eta.safetensors"))
    print(f"wrote eta.* ({len(cases)} cases)")


if __name__ == "__main__":
    main()
