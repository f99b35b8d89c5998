#!/usr/bin/env python3
"""Reference images for A1111's `DPM2` and `DPM2 a` (our `dpm2_a1111`, `dpm2_a_a1111`) on the
tiny models (run after tools/make_tiny_models.py and tools/make_img2img_fixtures.py).

k-diffusion 0.1.1.post1's own `sample_dpm_2` and `sample_dpm_2_ancestral`, taken from the
wheel's sampling.py and external.py with `ast` (tools/a1111_source.py's `functions`, not copied),
run as A1111 1.10's KDiffusionSampler runs them:
- the denoiser: `DiscreteEpsDDPMDenoiser` (A1111's CompVisDenoiser) over the model's
  `alphas_cumprod`, quantize off, the tiny UNet with classifier-free guidance inside
  (make_kdiffusion_sampler_fixtures.py's `Guided`);
- the sigmas of `get_sigmas`: both samplers carry `discard_next_to_last_sigma` in A1111's table,
  so the schedule is built for `steps + 1` (Automatic: the denoiser's `get_sigmas`; Karras and
  Exponential: k-diffusion's `get_sigmas_karras` / `get_sigmas_exponential` between the
  denoiser's `sigmas[0]` and `sigmas[-1]`) and `torch.cat([sigmas[:-2], sigmas[-1:]])` drops the
  next-to-last (make_kdiffusion_sampler_fixtures.py's `a1111_sigmas`, as for 3M SDE);
- DPM2: `s_churn`, `s_tmin`, `s_tmax`, `s_noise` as the request gives them (A1111's
  `sampler_extra_params` passes these four to `sample_dpm_2`; its `torch.randn_like`, drawn at
  every step, is A1111's TorchHijack answering from the images' generators, image by image);
  DPM2 a: `eta` (A1111's `p.eta`, else `eta_ancestral` 1), `s_noise` its default 1 (A1111 passes
  none), the noise after every step from the same generators;
- txt2img starts from `noise * sigmas[0]`; img2img (A1111's rule at 0.6 strength: `t_enc =
  int(0.6 * steps)`, `sigma_sched = sigmas[steps - t_enc - 1:]` of the discarded schedule) from
  the image's latent sample plus the noise times `sigma_sched[0]`.

Writes crates/pipeline/tests/fixtures/a1111-dpm2.json (cases, each UNet evaluation's sigma) and
.safetensors (image.<case>: [batch, H, W, 3] u8).

Usage (k-diffusion's files only):
  pip install --no-deps k-diffusion==0.1.1.post1
  python3 tools/make_a1111_dpm2_fixtures.py [--k-diffusion PATH/k_diffusion]
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
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import functions  # noqa: E402
from make_img2img_fixtures import load_pipe, to_u8  # noqa: E402
from make_kdiffusion_sampler_fixtures import Guided  # noqa: E402

OUT = os.path.join("crates", "pipeline", "tests", "fixtures")
BASE = dict(model="tiny-a", prompt="a photo of an astronaut riding a horse on mars",
            negative_prompt="blurry, low quality", width=32, height=32, guidance_scale=7.5,
            steps=8, batch_size=1, eta=1.0, schedule="uniform", sigma_churn=0.0,
            sigma_tmin=0.0, sigma_tmax=0.0, sigma_noise=1.0)
I2I = dict(init_image="init-32x32.png", strength=0.6, step_rule="a1111")
CASES = {
    "dpm2.automatic": dict(scheduler="dpm2_a1111", seed=151),
    "dpm2.karras.batch": dict(scheduler="dpm2_a1111", schedule="karras", seed=152, batch_size=2),
    "dpm2.exponential": dict(scheduler="dpm2_a1111", schedule="exponential", steps=7, seed=153),
    # Churn on a discarded schedule: gamma = min(2 / 8, sqrt2 - 1) between tmin and tmax.
    "dpm2.karras.churn": dict(scheduler="dpm2_a1111", schedule="karras", seed=154,
                              sigma_churn=2.0, sigma_tmin=0.5, sigma_tmax=8.0, sigma_noise=0.95),
    # t_enc 6 of 10: 7 steps from sigmas[3] of the discarded schedule.
    "dpm2.img2img": dict(scheduler="dpm2_a1111", steps=10, seed=155, **I2I),
    # gamma from the pass's 7 steps.
    "dpm2.karras.img2img.churn.batch": dict(scheduler="dpm2_a1111", schedule="karras", steps=10,
                                            seed=156, batch_size=2, sigma_churn=3.0, **I2I),
    "dpm2_a.automatic": dict(scheduler="dpm2_a_a1111", seed=161),
    "dpm2_a.karras.eta0.5.batch": dict(scheduler="dpm2_a_a1111", schedule="karras", eta=0.5,
                                       seed=162, batch_size=2),
    "dpm2_a.exponential.eta0": dict(scheduler="dpm2_a_a1111", schedule="exponential", eta=0.0,
                                    seed=163),
    "dpm2_a.karras.img2img": dict(scheduler="dpm2_a_a1111", schedule="karras", steps=10,
                                  seed=164, **I2I),
    "dpm2_a.img2img.batch": dict(scheduler="dpm2_a_a1111", steps=10, seed=165, batch_size=2,
                                 **I2I),
}
K_SAMPLERS = {"dpm2_a1111": "sample_dpm_2", "dpm2_a_a1111": "sample_dpm_2_ancestral"}


class Hijack:
    """A1111's TorchHijack: torch, but `randn_like` draws from the images' generators."""

    def __init__(self, gens, shape):
        self.gens, self.shape = gens, shape

    def __getattr__(self, item):
        return getattr(torch, item)

    def randn_like(self, x):
        return torch.cat([torch.randn(self.shape, generator=g) for g in self.gens])


def k_diffusion(folder):
    """k-diffusion's functions and classes used here, run as written; `ns` holds their
    globals (its `torch` is swapped for the Hijack per run)."""
    utils, d0 = functions(os.path.join(folder, "utils.py"), ["append_dims"], {"torch": torch})
    utils_ns = types.SimpleNamespace(append_dims=utils["append_dims"])
    ns = {"torch": torch, "math": math, "utils": utils_ns,
          "trange": lambda n, disable=None: range(n)}
    fns, d1 = functions(os.path.join(folder, "sampling.py"), [
        "append_zero", "get_sigmas_karras", "get_sigmas_exponential", "to_d",
        "get_ancestral_step", "default_noise_sampler", *K_SAMPLERS.values()], ns)
    ext_ns = {"torch": torch, "nn": torch.nn, "math": math, "utils": utils_ns,
              "sampling": types.SimpleNamespace(append_zero=fns["append_zero"])}
    ext, d2 = functions(os.path.join(folder, "external.py"),
                        ["DiscreteSchedule", "DiscreteEpsDDPMDenoiser"], ext_ns)
    return {**fns, **ext}, ns, {**d0, **d1, **d2}


def a1111_sigmas(k, denoiser, case):
    """KDiffusionSampler.get_sigmas with `discard_next_to_last_sigma`: steps + 1, the
    next-to-last dropped."""
    n = case["steps"] + 1
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
    return torch.cat([sigmas[:-2], sigmas[-1:]])


class Recorded(torch.nn.Module):
    """The denoiser, noting the sigma of every evaluation."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser, self.sigmas = denoiser, []

    def forward(self, x, sigma):
        self.sigmas.append(sigma[0].item())
        return self.denoiser(x, sigma)


def run(pipe, k, ns, case):
    batch = case["batch_size"]
    gens = [torch.Generator("cpu").manual_seed(case["seed"] + i) for i in range(batch)]
    cond, uncond = pipe.encode_prompt(case["prompt"], "cpu", batch, True,
                                      case["negative_prompt"])
    emb = torch.cat([uncond, cond])
    ac = pipe.scheduler.alphas_cumprod.float()
    denoiser = k["DiscreteEpsDDPMDenoiser"](Guided(pipe, emb, case["guidance_scale"]), ac,
                                            quantize=False)
    sigmas = a1111_sigmas(k, denoiser, case)
    f = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, case["height"] // f, case["width"] // f)
    sched = sigmas
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
        sched = sigmas[steps - t_enc - 1:]
        x = torch.cat(latents) + torch.cat(noises) * sched[0]
    else:
        x = torch.cat([torch.randn(shape, generator=g) for g in gens]) * sigmas[0]
    ns["torch"] = Hijack(gens, shape)
    model = Recorded(denoiser)
    if case["scheduler"] == "dpm2_a1111":
        # A1111's s_tmax 0 is no bound (its fill_fields_from_opts: `s_tmax or inf`).
        extra = dict(s_churn=case["sigma_churn"], s_tmin=case["sigma_tmin"],
                     s_tmax=case["sigma_tmax"] or float("inf"), s_noise=case["sigma_noise"])
    else:
        extra = dict(eta=case["eta"])
    try:
        out = k[K_SAMPLERS[case["scheduler"]]](model, x, sched, **extra)
    finally:
        ns["torch"] = torch
    decoded = pipe.vae.decode(out / pipe.vae.config.scaling_factor).sample
    return to_u8(pipe.image_processor.postprocess(decoded, output_type="np")), model.sigmas


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k-diffusion", help="the k_diffusion package folder (default: installed)")
    args = ap.parse_args()
    if args.k_diffusion is None:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None:
            print("make_a1111_dpm2_fixtures.py: skipped "
                  "(pip install --no-deps k-diffusion==0.1.1.post1)")
            return
        args.k_diffusion = spec.submodule_search_locations[0]
    k, ns, digests = k_diffusion(args.k_diffusion)
    pipe = load_pipe(StableDiffusionPipeline, os.path.join(OUT, "tiny-a"))
    tensors, cases = {}, {}
    for label, over in CASES.items():
        case = dict(BASE, **over)
        images, evaluated = run(pipe, k, ns, case)
        tensors[f"image.{label}"] = images.contiguous()
        cases[label] = dict(case, eval_sigmas=evaluated)
        print(f"{label}: {len(evaluated)} evaluations, mean {images.float().mean():.2f}")
    meta = {
        "generated_by": "tools/make_a1111_dpm2_fixtures.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "k_diffusion": "0.1.1.post1"},
        "k_diffusion_sources": {name: f"sha256 {d}" for name, d in digests.items()},
        "images": "image.<case>: [batch, H, W, 3] u8 = round(output_type='np' * 255)",
        "cases": cases,
    }
    with open(os.path.join(OUT, "a1111-dpm2.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    save_file(tensors, os.path.join(OUT, "a1111-dpm2.safetensors"))
    print(f"wrote a1111-dpm2.* ({len(cases)} cases)")


if __name__ == "__main__":
    main()
