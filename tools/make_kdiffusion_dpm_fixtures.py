#!/usr/bin/env python3
"""Reference images for A1111's `DPM fast` and `DPM adaptive` (our `dpm_fast`, `dpm_adaptive`) on
the tiny models (run after tools/make_tiny_models.py and tools/make_img2img_fixtures.py).

k-diffusion 0.1.1.post1's own `sample_dpm_fast` and `sample_dpm_adaptive` (its `DPMSolver` and
`PIDStepSizeController` classes, `get_ancestral_step`),
taken from the wheel's sampling.py and external.py with `ast` (tools/a1111_source.py's
`functions`, not copied), run with the arguments A1111 1.10's KDiffusionSampler gives it:
- the denoiser: `DiscreteEpsDDPMDenoiser` (A1111's CompVisDenoiser) over the model's
  `alphas_cumprod`, quantize off, the tiny UNet with classifier-free guidance inside
  (make_kdiffusion_sampler_fixtures.py's `Guided`);
- txt2img (`sample`): `sigma_min` / `sigma_max` the denoiser's `sigmas[0].item()` and
  `sigmas[-1].item()` (the training sigmas' ends), `n` the steps (DPM fast; DPM adaptive takes
  none and runs k-diffusion's defaults: order 3, rtol 0.05, atol 0.0078, ...), the start `noise *
  sigmas[0]` of `get_sigmas(steps)` (Automatic: the denoiser's own uniform schedule; Karras and
  Exponential: k-diffusion's `get_sigmas_karras` / `get_sigmas_exponential` between the
  denoiser's `sigmas[0]` and `sigmas[-1]`, as make_kdiffusion_sampler_fixtures.py's
  `a1111_sigmas`): the schedule changes only this scale and img2img's ends below;
- img2img (`sample_img2img`, 0.6 strength): `t_enc = int(0.6 * steps)`, `sigma_sched =
  sigmas[steps - t_enc - 1:]`, `sigma_min = sigma_sched[-2]`, `sigma_max = sigma_sched[0]`,
  `n = len(sigma_sched) - 1`, from the image's latent sample plus the noise times
  `sigma_sched[0]` (drawn as make_kdiffusion_sampler_fixtures.py draws them);
- `eta` as the request gives it (A1111: `p.eta`, else its `eta_ancestral` option, 1), `s_noise`
  the default 1; the noise after each step `torch.randn_like`, which A1111's TorchHijack answers
  from the images' generators (seed + i), image by image.

Writes crates/pipeline/tests/fixtures/kdiffusion-dpm.json (cases, each UNet evaluation's sigma)
and .safetensors (image.<case>: [batch, H, W, 3] u8).

Usage (k-diffusion's files only):
  pip install --no-deps k-diffusion==0.1.1.post1
  python3 tools/make_kdiffusion_dpm_fixtures.py [--k-diffusion PATH/k_diffusion]
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
            steps=10, batch_size=1, eta=1.0, schedule="uniform")
I2I = dict(init_image="init-32x32.png", strength=0.6, step_rule="a1111")
CASES = {
    # 10 evaluations: steps of order 3, 3, 3, 1.
    "dpm_fast.10.eta1": dict(scheduler="dpm_fast", seed=131),
    # 9: 3, 3, 2, 1; a batch of two, each image its own generator.
    "dpm_fast.9.eta0.5.batch": dict(scheduler="dpm_fast", steps=9, eta=0.5, seed=132,
                                    batch_size=2),
    # 8: 3, 3, 2, no noise.
    "dpm_fast.8.eta0": dict(scheduler="dpm_fast", steps=8, eta=0.0, seed=133),
    # t_enc 6: 7 evaluations (3, 3, 1) from sigmas[3].
    "dpm_fast.10.img2img": dict(scheduler="dpm_fast", seed=134, **I2I),
    # t_enc 12: 13 evaluations; a batch of two.
    "dpm_fast.20.img2img.batch": dict(scheduler="dpm_fast", steps=20, seed=135, batch_size=2,
                                      **I2I),
    # As many evaluations as its error control asks (three per try).
    "dpm_adaptive.eta1": dict(scheduler="dpm_adaptive", seed=141),
    "dpm_adaptive.eta0.batch": dict(scheduler="dpm_adaptive", eta=0.0, seed=142, batch_size=2),
    "dpm_adaptive.img2img": dict(scheduler="dpm_adaptive", seed=143, **I2I),
    "dpm_adaptive.eta0.5.img2img.batch": dict(scheduler="dpm_adaptive", eta=0.5, seed=144,
                                              batch_size=2, **I2I),
    # Another schedule: its first sigma scales the start noise; img2img starts at its sigma
    # there and ends at its last positive one.
    "dpm_fast.9.karras.batch": dict(scheduler="dpm_fast", steps=9, schedule="karras", seed=136,
                                    batch_size=2),
    "dpm_fast.10.karras.img2img": dict(scheduler="dpm_fast", schedule="karras", seed=137, **I2I),
    "dpm_fast.10.exponential.img2img.batch": dict(scheduler="dpm_fast", schedule="exponential",
                                                  seed=138, batch_size=2, **I2I),
    "dpm_adaptive.karras.img2img": dict(scheduler="dpm_adaptive", schedule="karras", seed=145,
                                        **I2I),
    "dpm_adaptive.exponential.eta0": dict(scheduler="dpm_adaptive", schedule="exponential",
                                          eta=0.0, seed=146),
}


class NoBar:
    """Stands in for tqdm (sample_dpm_fast counts its evaluations with one)."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, *args):
        pass


def k_diffusion(folder):
    """k-diffusion's functions and classes used here, run as written."""
    utils, d0 = functions(os.path.join(folder, "utils.py"), ["append_dims"], {"torch": torch})
    utils_ns = types.SimpleNamespace(append_dims=utils["append_dims"])
    ns = {"torch": torch, "nn": torch.nn, "math": math, "utils": utils_ns, "tqdm": NoBar,
          "trange": lambda n, disable=None: range(n)}
    fns, d1 = functions(os.path.join(folder, "sampling.py"), [
        "append_zero", "get_sigmas_karras", "get_sigmas_exponential", "get_ancestral_step",
        "default_noise_sampler", "PIDStepSizeController", "DPMSolver", "sample_dpm_fast",
        "sample_dpm_adaptive"], ns)
    ext_ns = {"torch": torch, "nn": torch.nn, "math": math, "utils": utils_ns,
              "sampling": types.SimpleNamespace(append_zero=fns["append_zero"])}
    ext, d2 = functions(os.path.join(folder, "external.py"),
                        ["DiscreteSchedule", "DiscreteEpsDDPMDenoiser"], ext_ns)
    return {**fns, **ext}, {**d0, **d1, **d2}


class Recorded(torch.nn.Module):
    """The denoiser, noting the sigma of every evaluation."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser, self.sigmas = denoiser, []

    def forward(self, x, sigma):
        self.sigmas.append(sigma[0].item())
        return self.denoiser(x, sigma)


def run(pipe, k, case):
    batch = case["batch_size"]
    gens = [torch.Generator("cpu").manual_seed(case["seed"] + i) for i in range(batch)]
    cond, uncond = pipe.encode_prompt(case["prompt"], "cpu", batch, True,
                                      case["negative_prompt"])
    emb = torch.cat([uncond, cond])
    ac = pipe.scheduler.alphas_cumprod.float()
    denoiser = k["DiscreteEpsDDPMDenoiser"](Guided(pipe, emb, case["guidance_scale"]), ac,
                                            quantize=False)
    steps = case["steps"]
    lo, hi = denoiser.sigmas[0].item(), denoiser.sigmas[-1].item()
    sigmas = {"uniform": lambda: denoiser.get_sigmas(steps),
              "karras": lambda: k["get_sigmas_karras"](n=steps, sigma_min=lo, sigma_max=hi),
              "exponential": lambda: k["get_sigmas_exponential"](n=steps, sigma_min=lo,
                                                                 sigma_max=hi),
              }[case["schedule"]]()
    f = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, case["height"] // f, case["width"] // f)
    if "init_image" in case:
        image = Image.open(os.path.join(OUT, "images", case["init_image"])).convert("RGB")
        pixels = pipe.image_processor.preprocess(image)
        dist = pipe.vae.encode(pixels).latent_dist
        latents, noises = [], []
        for g in gens:
            latents.append(dist.sample(g) * pipe.vae.config.scaling_factor)
            noises.append(torch.randn(shape, generator=g))
        t_enc = int(min(case["strength"], 0.999) * steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        x = torch.cat(latents) + torch.cat(noises) * sigma_sched[0]
        ends = dict(sigma_min=sigma_sched[-2], sigma_max=sigma_sched[0], n=len(sigma_sched) - 1)
    else:
        x = torch.cat([torch.randn(shape, generator=g) for g in gens]) * sigmas[0]
        ends = dict(sigma_min=denoiser.sigmas[0].item(), sigma_max=denoiser.sigmas[-1].item(),
                    n=steps)

    def noise(sigma, sigma_next):
        return torch.cat([torch.randn(shape, generator=g) for g in gens])

    model = Recorded(denoiser)
    if case["scheduler"] == "dpm_adaptive":
        del ends["n"]
    out = k["sample_" + case["scheduler"]](model, x, **ends, eta=case["eta"], noise_sampler=noise)
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
            print("make_kdiffusion_dpm_fixtures.py: skipped "
                  "(pip install --no-deps k-diffusion==0.1.1.post1)")
            return
        args.k_diffusion = spec.submodule_search_locations[0]
    k, digests = k_diffusion(args.k_diffusion)
    pipe = load_pipe(StableDiffusionPipeline, os.path.join(OUT, "tiny-a"))
    tensors, cases = {}, {}
    for label, over in CASES.items():
        case = dict(BASE, **over)
        images, evaluated = run(pipe, k, case)
        tensors[f"image.{label}"] = images.contiguous()
        cases[label] = dict(case, eval_sigmas=evaluated)
        print(f"{label}: {len(evaluated)} evaluations, mean {images.float().mean():.2f}")
    meta = {
        "generated_by": "tools/make_kdiffusion_dpm_fixtures.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "k_diffusion": "0.1.1.post1"},
        "k_diffusion_sources": {name: f"sha256 {d}" for name, d in digests.items()},
        "images": "image.<case>: [batch, H, W, 3] u8 = round(output_type='np' * 255)",
        "cases": cases,
    }
    with open(os.path.join(OUT, "kdiffusion-dpm.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    save_file(tensors, os.path.join(OUT, "kdiffusion-dpm.safetensors"))
    print(f"wrote kdiffusion-dpm.* ({len(cases)} cases)")


if __name__ == "__main__":
    main()
