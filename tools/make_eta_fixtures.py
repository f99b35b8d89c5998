#!/usr/bin/env python3
"""Reference images for a request's `eta` on the tiny models (run after tools/make_tiny_models.py).

1. `ddim`: diffusers 0.42.1's StableDiffusionPipeline with DDIMScheduler and `eta` (the noise
   each step adds, from the images' generators), one CPU generator per image (seed + i).
2. `euler_a`, `dpm2_a`, `dpmpp_sde`, `dpmpp_2m_sde`: k-diffusion's own `sample_euler_ancestral`,
   `sample_dpm_2_ancestral`, `sample_dpmpp_sde` and `sample_dpmpp_2m_sde` (midpoint and heun) with
   `eta` (what A1111's `Euler a`, `DPM2 a`, `DPM++ SDE`, `DPM++ 2M SDE` and its Heun run; diffusers' classes have no eta), their
   functions taken from the k-diffusion wheel's sampling.py with `ast` (tools/a1111_source.py's
   `functions`, not copied), on the diffusers class's schedule (its sigmas and the timestep of
   each UNet call: the class's own, and KDPM2's `sigma_to_t` for DPM2's midpoints, which eta
   moves), the tiny UNet as an epsilon denoiser with classifier-free guidance, the starting noise
   drawn from the images' generators and each step's noise from them in order (A1111's ImageRNG)
   or, for DPM++ SDE, from diffusers' Brownian trees seeded with the images' seeds.
   DPMSolverMultistep's VP sample is the k-diffusion sample times alpha (sqrt(1 + sigma^2) at the
   start). With eta 1 each must give the diffusers class's own image (checked here).

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
import numpy as np
import torch
from diffusers import (DDIMScheduler, EulerAncestralDiscreteScheduler,
                       StableDiffusionPipeline)
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import functions  # noqa: E402
from api_schedulers import make_brownian_scheduler, make_scheduler  # noqa: E402
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
    "dpm2_a.eta0": dict(scheduler="dpm2_a", eta=0.0, seed=76),
    "dpm2_a.eta0.5.batch": dict(scheduler="dpm2_a", eta=0.5, seed=77, batch_size=2),
    "dpmpp_sde.eta0": dict(scheduler="dpmpp_sde", eta=0.0, seed=78),
    "dpmpp_sde.eta0.5.batch": dict(scheduler="dpmpp_sde", eta=0.5, seed=79, batch_size=2),
    "dpmpp_2m_sde.eta0": dict(scheduler="dpmpp_2m_sde", eta=0.0, seed=80),
    "dpmpp_2m_sde.eta0.5.batch": dict(scheduler="dpmpp_2m_sde", eta=0.5, seed=81, batch_size=2),
    "dpmpp_2m_sde_heun.eta0.5": dict(scheduler="dpmpp_2m_sde_heun", eta=0.5, seed=82),
}
# The k-diffusion function each sampler name runs.
K_SAMPLERS = {
    "euler_a": "sample_euler_ancestral",
    "dpm2_a": "sample_dpm_2_ancestral",
    "dpmpp_sde": "sample_dpmpp_sde",
    "dpmpp_2m_sde": "sample_dpmpp_2m_sde",
    "dpmpp_2m_sde_heun": "sample_dpmpp_2m_sde",
}
# Their keyword arguments beyond eta (A1111's sampler options).
K_OPTIONS = {"dpmpp_2m_sde_heun": {"solver_type": "heun"}}


def k_diffusion(path):
    """k-diffusion's samplers and their helpers, run as written."""
    utils_path = os.path.join(os.path.dirname(path), "utils.py")
    utils, d0 = functions(utils_path, ["append_dims"], {"torch": torch})
    ns = {"torch": torch, "utils": types.SimpleNamespace(append_dims=utils["append_dims"]),
          "trange": lambda n, disable=None: range(n)}
    fns, d1 = functions(path, ["to_d", "get_ancestral_step", *dict.fromkeys(K_SAMPLERS.values())], ns)
    return {name: fns[f] for name, f in K_SAMPLERS.items()}, {**d0, **d1}


def scheduler_for(pipe, case):
    """The diffusers class the API name means on the model's config (DPM++ SDE seeded with the
    images' seeds), after set_timesteps."""
    name, seeds = case["scheduler"], [case["seed"] + i for i in range(case["batch_size"])]
    if name == "dpmpp_sde":
        sched = make_brownian_scheduler(name, pipe.scheduler.config, seeds)
    else:
        sched = make_scheduler(name, pipe.scheduler.config)
    sched.set_timesteps(case["steps"])
    return sched


def run_kdiffusion(pipe, samplers, case, gens):
    name, batch = case["scheduler"], case["batch_size"]
    sched = scheduler_for(pipe, case)
    # Each step's sigma once (the KDPM2 and SDE classes interleave theirs), ending in 0.
    sigmas = torch.unique_consecutive(sched.sigmas.float())
    vp = name.startswith("dpmpp_2m_sde")
    # The timestep of each step's sigma (KDPM2 and DPM++ SDE interleave their midpoints').
    steps = sched.timesteps[0::2] if name in ("dpm2_a", "dpmpp_sde") else sched.timesteps
    assert len(steps) == len(sigmas) - 1, (len(steps), len(sigmas))
    cond, uncond = pipe.encode_prompt(case["prompt"], "cpu", batch, True,
                                      case["negative_prompt"])
    emb = torch.cat([uncond, cond])
    f = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, case["height"] // f, case["width"] // f)

    def draw():
        return torch.cat([torch.randn(shape, generator=g) for g in gens])

    begun = []  # the index of each step the sampler began, in order

    def timestep(sigma):
        hits = (sigmas[:-1] == sigma).nonzero()
        if len(hits):
            begun.append(int(hits[0, 0]))
            return steps[hits[0, 0]]
        if name == "dpmpp_sde":
            # The midpoint of the step just begun: the class's interleaved timestep.
            return sched.timesteps[2 * begun[-1] + 1]
        # DPM2's midpoint, wherever eta put it: KDPM2's own _sigma_to_t, as set_timesteps
        # calls it on its interpolated sigmas.
        t = sched._sigma_to_t(sigma.cpu(), sched.log_sigmas.cpu())
        return torch.from_numpy(np.asarray(t)).to(steps.dtype)

    def model(x, sigma):
        sigma = sigma[0]
        t = timestep(sigma)
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        t = torch.as_tensor(t).expand(2 * x.shape[0])
        eps = pipe.unet(torch.cat([x, x]) * c_in, t, encoder_hidden_states=emb).sample
        u, c = eps.chunk(2)
        eps = u + case["guidance_scale"] * (c - u)
        return x - eps * sigma

    init = draw()
    x = init * ((sigmas[0] ** 2 + 1) ** 0.5 if vp else sched.init_noise_sigma)
    if name == "dpmpp_sde":
        seeds = [case["seed"] + i for i in range(batch)]
        positive = sched.sigmas[sched.sigmas > 0]
        noise = BrownianTreeNoiseSampler(x, positive.min().item(), positive.max().item(),
                                         seeds if batch > 1 else seeds[0])
    else:
        def noise(sigma, sigma_next):
            return draw()
    out = samplers[name](model, x, sigmas, eta=case["eta"], noise_sampler=noise,
                         **K_OPTIONS.get(name, {}))
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
    samplers, digests = k_diffusion(args.k_diffusion)
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
            images = run_kdiffusion(pipe, samplers, case, gens)
            # With eta 1 k-diffusion's sampler is the diffusers class: check the setup on it.
            one = dict(case, eta=1.0)
            gens = [torch.Generator("cpu").manual_seed(case["seed"] + i)
                    for i in range(case["batch_size"])]
            ours_at_1 = run_kdiffusion(pipe, samplers, one, gens)
            own = pipe.scheduler
            pipe.scheduler = scheduler_for(pipe, one)
            gens = [torch.Generator("cpu").manual_seed(case["seed"] + i)
                    for i in range(case["batch_size"])]
            theirs = to_u8(pipe(**common, generator=gens).images)
            pipe.scheduler = own
            diff = (ours_at_1.int() - theirs.int()).abs().max().item()
            changed = (images.float() - theirs.float()).abs().mean().item()
            print(f"{label}: k-diffusion eta 1 vs diffusers' {case['scheduler']}: max diff "
                  f"{diff}; eta {case['eta']} vs eta 1: mean diff {changed:.2f}")
            assert diff <= 1, diff
            assert case["eta"] == 1.0 or changed > 1.0, changed
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
