#!/usr/bin/env python3
"""Reference images for A1111's `DPM++ 2S a` and `DPM++ 3M SDE` on the tiny models (run after
tools/make_tiny_models.py and tools/make_img2img_fixtures.py).

k-diffusion 0.1.1.post1's own functions, taken from the wheel's sampling.py and external.py with
`ast` (tools/a1111_source.py's `functions`, not copied), run as A1111 1.10's KDiffusionSampler
runs them:
- the denoiser: `DiscreteEpsDDPMDenoiser` (A1111's CompVisDenoiser) over the model's
  `alphas_cumprod` (diffusers' float32 table of the model's scheduler config), quantize off
  (A1111's `enable_quantization` default), the tiny UNet with classifier-free guidance inside;
- the sigmas of `get_sigmas`: uniform is the denoiser's `get_sigmas(n)`, Karras and exponential
  k-diffusion's `get_sigmas_karras` / `get_sigmas_exponential` between the denoiser's
  `sigmas[0]` and `sigmas[-1]`; for 3M SDE (`discard_next_to_last_sigma`) of `n + 1` steps with
  the next-to-last sigma dropped (`torch.cat([sigmas[:-2], sigmas[-1:]])`);
- `eta` as the request gives it (A1111 passes `p.eta`, else `eta_ancestral` 1), `s_noise` the
  function's default 1 (A1111 passes s_noise only to euler, heun and dpm_2);
- the noise: the starting noise from the images' generators (seed + i); DPM++ 2S a's per-step
  noise `torch.randn_like`, which A1111's TorchHijack answers from the same generators, image by
  image (ImageRNG.next); the SDE samplers' noise k-diffusion's `BrownianTreeNoiseSampler` over the
  whole schedule's smallest positive and largest sigma, `seed=` the list of the batch's seeds
  (A1111's `create_noise_sampler`);
- txt2img starts from `noise * sigmas[0]`; img2img (A1111's rule at 0.6 strength: `t_enc =
  int(0.6 * steps)`, `sigma_sched = sigmas[steps - t_enc - 1:]`) from the image's latent sample
  (the pipeline's draw, first from each generator) plus the noise (the next draw) times
  `sigma_sched[0]`, the Brownian tree still over the whole schedule.
The `dpmpp_2m_sde_brownian` cases (A1111's `DPM++ 2M SDE` and its Heun, which our A1111 dialect
runs on DPMSolverMultistep's schedule) run `sample_dpmpp_2m_sde` (midpoint; heun) the same way
on that class's sigmas, each UNet call at the class's own timestep for its sigma (as
tools/make_eta_fixtures.py does), with the Brownian noise A1111 gives it; the first case is also
run with generator noise to show the two differ.

Writes crates/pipeline/tests/fixtures/kdiffusion-samplers.json and .safetensors (image.<case>:
[batch, H, W, 3] u8).

Usage (k-diffusion's files only; torchsde for its Brownian tree):
  pip install --no-deps k-diffusion==0.1.1.post1 && pip install torchsde==0.2.6
  python3 tools/make_kdiffusion_sampler_fixtures.py [--k-diffusion PATH/k_diffusion]
"""

import argparse
import importlib.util
import json
import math
import os
import sys
import types

import diffusers
import torch
import torchsde
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import functions  # noqa: E402
from make_img2img_fixtures import load_pipe, to_u8  # noqa: E402

OUT = os.path.join("crates", "pipeline", "tests", "fixtures")
BASE = dict(model="tiny-a", prompt="a photo of an astronaut riding a horse on mars",
            negative_prompt="blurry, low quality", width=32, height=32, guidance_scale=7.5,
            steps=8, batch_size=1, eta=1.0, schedule="uniform")
I2I = dict(init_image="init-32x32.png", strength=0.6, step_rule="a1111")
CASES = {
    "dpmpp_2s_ancestral.eta1": dict(scheduler="dpmpp_2s_ancestral", seed=101),
    "dpmpp_2s_ancestral.eta0.5.batch": dict(scheduler="dpmpp_2s_ancestral", eta=0.5, seed=102,
                                            batch_size=2),
    "dpmpp_2s_ancestral_karras.eta1": dict(scheduler="dpmpp_2s_ancestral_karras",
                                           schedule="karras", seed=103),
    "dpmpp_2s_ancestral_karras.eta0.5": dict(scheduler="dpmpp_2s_ancestral_karras",
                                             schedule="karras", eta=0.5, seed=104),
    "dpmpp_2s_ancestral.img2img": dict(scheduler="dpmpp_2s_ancestral", seed=105, **I2I),
    "dpmpp_3m_sde.eta1": dict(scheduler="dpmpp_3m_sde", seed=111),
    "dpmpp_3m_sde.eta0.5.batch": dict(scheduler="dpmpp_3m_sde", eta=0.5, seed=112, batch_size=2),
    "dpmpp_3m_sde_karras.eta1": dict(scheduler="dpmpp_3m_sde_karras", schedule="karras",
                                     seed=113),
    "dpmpp_3m_sde_karras.eta0.5": dict(scheduler="dpmpp_3m_sde_karras", schedule="karras",
                                       eta=0.5, seed=114),
    "dpmpp_3m_sde.exponential": dict(scheduler="dpmpp_3m_sde", schedule="exponential",
                                     seed=115),
    "dpmpp_3m_sde.img2img": dict(scheduler="dpmpp_3m_sde", seed=116, **I2I),
    "dpmpp_2m_sde_brownian.eta1.batch": dict(scheduler="dpmpp_2m_sde_brownian", seed=121,
                                             batch_size=2),
    "dpmpp_2m_sde_brownian.exponential": dict(scheduler="dpmpp_2m_sde_brownian",
                                              schedule="exponential", seed=122),
    "dpmpp_2m_sde_heun_brownian_karras.eta0.5": dict(
        scheduler="dpmpp_2m_sde_heun_brownian_karras", schedule="karras", eta=0.5, seed=123),
}
K_SAMPLERS = {"dpmpp_2s_ancestral": "sample_dpmpp_2s_ancestral",
              "dpmpp_3m_sde": "sample_dpmpp_3m_sde",
              "dpmpp_2m_sde_brownian": "sample_dpmpp_2m_sde",
              "dpmpp_2m_sde_heun_brownian": "sample_dpmpp_2m_sde"}
DISCARD_PENULTIMATE = {"dpmpp_3m_sde"}
BROWNIAN = {"dpmpp_3m_sde", "dpmpp_2m_sde_brownian", "dpmpp_2m_sde_heun_brownian"}


def k_diffusion(folder):
    """k-diffusion's functions and classes used here, run as written."""
    utils, d0 = functions(os.path.join(folder, "utils.py"), ["append_dims"], {"torch": torch})
    utils_ns = types.SimpleNamespace(append_dims=utils["append_dims"])
    ns = {"torch": torch, "torchsde": torchsde, "math": math, "utils": utils_ns,
          "trange": lambda n, disable=None: range(n)}
    fns, d1 = functions(os.path.join(folder, "sampling.py"), [
        "append_zero", "get_sigmas_karras", "get_sigmas_exponential", "to_d",
        "get_ancestral_step", "BatchedBrownianTree", "BrownianTreeNoiseSampler",
        *K_SAMPLERS.values()], ns)
    ext_ns = {"torch": torch, "nn": torch.nn, "math": math, "utils": utils_ns,
              "sampling": types.SimpleNamespace(append_zero=fns["append_zero"])}
    ext, d2 = functions(os.path.join(folder, "external.py"),
                        ["DiscreteSchedule", "DiscreteEpsDDPMDenoiser"], ext_ns)
    return {**fns, **ext}, {**d0, **d1, **d2}


def base_name(scheduler):
    return scheduler.removesuffix("_karras")


def a1111_sigmas(k, denoiser, case):
    """KDiffusionSampler.get_sigmas for the case's sampler and schedule."""
    name, n = base_name(case["scheduler"]), case["steps"]
    discard = name in DISCARD_PENULTIMATE
    n += 1 if discard else 0
    lo, hi = denoiser.sigmas[0].item(), denoiser.sigmas[-1].item()
    schedule = case["schedule"]
    if schedule == "uniform":
        sigmas = denoiser.get_sigmas(n)
    elif schedule == "karras":
        sigmas = k["get_sigmas_karras"](n=n, sigma_min=lo, sigma_max=hi)
    elif schedule == "exponential":
        sigmas = k["get_sigmas_exponential"](n=n, sigma_min=lo, sigma_max=hi)
    else:
        raise ValueError(schedule)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


class Guided(torch.nn.Module):
    """The tiny UNet with classifier-free guidance: eps at the denoiser's timestep."""

    def __init__(self, pipe, emb, scale):
        super().__init__()
        self.pipe, self.emb, self.scale = pipe, emb, scale

    def forward(self, x, t):
        t = t[:1].expand(2 * x.shape[0])
        eps = self.pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=self.emb).sample
        u, c = eps.chunk(2)
        return u + self.scale * (c - u)


def dpm_solver(pipe, case):
    """DPMSolverMultistep as our `dpmpp_2m_sde`[`_heun`] builds it on the case's schedule."""
    over = dict(algorithm_type="sde-dpmsolver++",
                solver_type="heun" if "_heun" in case["scheduler"] else "midpoint",
                use_karras_sigmas=case["schedule"] == "karras",
                use_exponential_sigmas=case["schedule"] == "exponential")
    sched = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **over)
    sched.set_timesteps(case["steps"])
    return sched


class ClassTimesteps(torch.nn.Module):
    """The class's denoiser: k-diffusion's, but each UNet call at the class's own timestep for
    its sigma (DPMSolverMultistep's rounded ones, not the continuous `sigma_to_t`)."""

    def __init__(self, denoiser, sigmas, timesteps):
        super().__init__()
        self.denoiser, self.sigmas, self.timesteps = denoiser, sigmas, timesteps

    def forward(self, x, sigma):
        (i,) = (self.sigmas[:-1] == sigma[0]).nonzero()[0]
        self.denoiser.sigma_to_t = lambda s: self.timesteps[i].to(s.dtype).expand(s.shape)
        return self.denoiser(x, sigma)


def run(pipe, k, case, generator_noise=False):
    batch = case["batch_size"]
    seeds = [case["seed"] + i for i in range(batch)]
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    cond, uncond = pipe.encode_prompt(case["prompt"], "cpu", batch, True,
                                      case["negative_prompt"])
    emb = torch.cat([uncond, cond])
    name = base_name(case["scheduler"])
    ac = pipe.scheduler.alphas_cumprod.float()
    denoiser = k["DiscreteEpsDDPMDenoiser"](Guided(pipe, emb, case["guidance_scale"]), ac,
                                            quantize=False)
    if name.startswith("dpmpp_2m_sde"):
        sched = dpm_solver(pipe, case)
        sigmas = torch.unique_consecutive(sched.sigmas.float())
        denoiser = ClassTimesteps(denoiser, sigmas, sched.timesteps)
    else:
        sigmas = a1111_sigmas(k, denoiser, case)
    f = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, case["height"] // f, case["width"] // f)
    schedule = sigmas
    if "init_image" in case:
        image = Image.open(os.path.join(OUT, "images", case["init_image"])).convert("RGB")
        pixels = pipe.image_processor.preprocess(image)
        dist = pipe.vae.encode(pixels).latent_dist
        latents, noises = [], []
        for g in gens:
            latents.append(dist.sample(g) * pipe.vae.config.scaling_factor)
            noises.append(torch.randn(shape, generator=g))
        steps = case["steps"]
        t_enc = int(min(case["strength"], 0.999) * steps)
        schedule = sigmas[steps - t_enc - 1:]
        x = torch.cat(latents) + torch.cat(noises) * schedule[0]
    else:
        noise = torch.cat([torch.randn(shape, generator=g) for g in gens])
        # DPMSolverMultistep's sample is the k-diffusion one times alpha (1 / sqrt(1 + sigma^2)).
        vp = name.startswith("dpmpp_2m_sde")
        x = noise * ((sigmas[0] ** 2 + 1) ** 0.5 if vp else sigmas[0])
    if name in BROWNIAN and not generator_noise:
        positive = sigmas[sigmas > 0]
        noise = k["BrownianTreeNoiseSampler"](x, positive.min(), sigmas.max(), seed=seeds)
    else:
        def noise(sigma, sigma_next):
            return torch.cat([torch.randn(shape, generator=g) for g in gens])
    extra = {"solver_type": "heun"} if "_heun" in name else {}
    out = k[K_SAMPLERS[name]](denoiser, x, schedule, eta=case["eta"], noise_sampler=noise,
                              **extra)
    decoded = pipe.vae.decode(out / pipe.vae.config.scaling_factor).sample
    return to_u8(pipe.image_processor.postprocess(decoded, output_type="np"))


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k-diffusion", help="the k_diffusion package folder (default: installed)")
    args = ap.parse_args()
    if args.k_diffusion is None:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None:
            print("make_kdiffusion_sampler_fixtures.py: skipped "
                  "(pip install --no-deps k-diffusion==0.1.1.post1)")
            return
        args.k_diffusion = spec.submodule_search_locations[0]
    k, digests = k_diffusion(args.k_diffusion)
    pipe = load_pipe(StableDiffusionPipeline, os.path.join(OUT, "tiny-a"))
    tensors, cases = {}, {}
    for label, over in CASES.items():
        case = dict(BASE, **over)
        images = run(pipe, k, case)
        if label == "dpmpp_2m_sde_brownian.eta1.batch":
            drawn = run(pipe, k, case, generator_noise=True)
            diff = (images.float() - drawn.float()).abs().mean().item()
            print(f"{label}: generator noise instead differs by mean {diff:.2f}")
            assert diff > 1.0, diff
        tensors[f"image.{label}"] = images.contiguous()
        cases[label] = case
        print(f"{label}: mean {images.float().mean():.2f}")
    meta = {
        "generated_by": "tools/make_kdiffusion_sampler_fixtures.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "k_diffusion": "0.1.1.post1", "torchsde": torchsde.__version__},
        "k_diffusion_sources": {name: f"sha256 {d}" for name, d in digests.items()},
        "images": "image.<case>: [batch, H, W, 3] u8 = round(output_type='np' * 255)",
        "cases": cases,
    }
    with open(os.path.join(OUT, "kdiffusion-samplers.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    save_file(tensors, os.path.join(OUT, "kdiffusion-samplers.safetensors"))
    print(f"wrote kdiffusion-samplers.* ({len(cases)} cases)")


if __name__ == "__main__":
    main()
