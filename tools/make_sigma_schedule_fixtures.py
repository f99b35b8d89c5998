#!/usr/bin/env python3
"""Reference numbers for the exponential and beta sigma schedules (diffusers 0.42.1, torch 2.11.0,
scipy): every class that has `use_exponential_sigmas` / `use_beta_sigmas` among the ones we run
(EulerDiscrete, LMSDiscrete, DPMSolverMultistep (dpmsolver++ and sde-dpmsolver++),
UniPCMultistep, HeunDiscrete, KDPM2Discrete, KDPM2AncestralDiscrete, DPMSolverSDE). Runs after
tools/make_tiny_models.py and tools/make_img2img_fixtures.py (reads tiny-a/, tiny-b/ and
images/init-32x32.png).

Writes crates/pipeline/tests/fixtures/sigma-schedules.safetensors and sigma-schedules.json:

1. Schedulers: `Class.from_config({**SD15, **name's overrides, **schedule keys, **variant})`, as the
   server builds `<name>` + `schedule` (tools/api_schedulers.py). Per `<prefix>.<steps>`:
   `timesteps` (float64), `sigmas` (float64 copies of the float32 tensor), `init_noise_sigma`, and
   for trajectory step counts `model_outputs` / `scaled_inputs` / `samples` exactly as
   tools/make_sampler_fixtures.py makes them (index 0 the initial sample; a stochastic scheduler
   gets one `Generator().manual_seed(STEP_SEED)` for the whole run). DPM++ SDE's Brownian noise
   has references of its own (tools/make_sde_fixtures.py): here only its schedule, and images.
2. Images: `image.<label>` [batch, H, W, 3] u8 from StableDiffusionPipeline /
   StableDiffusionImg2ImgPipeline on the tiny models with the same schedulers.
3. `kdiffusion`: A1111's Exponential is k-diffusion's `get_sigmas_exponential(n, sigma_min,
   sigma_max)` = `append_zero(torch.linspace(log(sigma_max), log(sigma_min), n).exp())` (float32),
   and its Beta `beta_scheduler` = `sigma_min + beta.ppf(1 - linspace(0, 1, n), 0.6, 0.6) *
   (sigma_max - sigma_min)` plus a zero, both between the model's smallest and largest training
   sigma (k-diffusion's `model.sigmas[0]`, `[-1]`): the largest relative difference to
   EulerDiscreteScheduler's exponential / beta sigmas on SD 1.5's config is recorded (and checked
   below 1e-6: the same numbers up to float32 rounding).

Run from the repository root: python3 tools/make_sigma_schedule_fixtures.py
"""
import json
import math
import os

import diffusers
import numpy as np
import scipy
import scipy.stats
import torch
from PIL import Image
from safetensors.torch import save_file

import api_schedulers
from api_schedulers import SD15_SCHEDULER_CONFIG as SD15
from make_img2img_fixtures import BASE, load_pipe, to_u8

OUT = os.path.join("crates", "pipeline", "tests", "fixtures")

# The schedule keys `schedule` sets (SigmaSchedule::set_in).
SCHEDULE_KEYS = {
    "exponential": {"use_karras_sigmas": False, "use_exponential_sigmas": True, "use_beta_sigmas": False},
    "beta": {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": True},
}
NAMES = ["euler", "lms", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "heun", "dpm2", "dpm2_a"]
STOCHASTIC = api_schedulers.STOCHASTIC

SCHEDULE_STEPS = [1, 2, 3, 5, 10, 25, 50]
TRAJECTORY_STEPS = [5, 12]
# prefix -> (name, schedule, variant overrides, schedule step counts, trajectory step counts)
ENTRIES = {}
for _name in NAMES:
    for _sched in SCHEDULE_KEYS:
        _p = f"{_name}.{_sched}"
        ENTRIES[_p] = (_name, _sched, {}, SCHEDULE_STEPS, TRAJECTORY_STEPS)
        ENTRIES[f"{_p}-v"] = (_name, _sched, {"prediction_type": "v_prediction"}, [5], [5])
        ENTRIES[f"{_p}-trailing"] = (_name, _sched, {"timestep_spacing": "trailing"}, [3, 7], [5])
        ENTRIES[f"{_p}-leading"] = (_name, _sched, {"timestep_spacing": "leading"}, [3, 7], [5])
        # The conversions read sigma_min / sigma_max from the config whenever the file has them.
        ENTRIES[f"{_p}-range"] = (_name, _sched, {"sigma_min": 0.1, "sigma_max": 10.0}, [4, 9], [4])
for _name in ("dpmpp_2m", "unipc"):
    for _sched in SCHEDULE_KEYS:
        ENTRIES[f"{_name}.{_sched}-final"] = (_name, _sched, {"final_sigmas_type": "sigma_min"}, [5], [5])
for _sched in SCHEDULE_KEYS:
    ENTRIES[f"dpmpp_sde.{_sched}"] = ("dpmpp_sde", _sched, {}, SCHEDULE_STEPS, [])
    ENTRIES[f"dpmpp_sde.{_sched}-range"] = ("dpmpp_sde", _sched, {"sigma_min": 0.1, "sigma_max": 10.0}, [4], [])

SHAPE = (1, 4, 8, 8)
SAMPLE_SEED = 7
OUTPUT_SEED = 1000
STEP_SEED = 99

# label -> (model, the case's keys over BASE[model]); `schedule` is the request's.
IMAGES = {
    "tiny-a.txt2img.euler.exponential": ("tiny-a", dict(scheduler="euler", schedule="exponential")),
    "tiny-a.txt2img.euler.beta": ("tiny-a", dict(scheduler="euler", schedule="beta")),
    # A1111's DPM++ 2M SDE + Automatic.
    "tiny-a.txt2img.dpmpp_2m_sde.exponential": ("tiny-a", dict(scheduler="dpmpp_2m_sde", schedule="exponential")),
    "tiny-a.txt2img.dpmpp_2m.beta": ("tiny-a", dict(scheduler="dpmpp_2m", schedule="beta")),
    "tiny-a.txt2img.unipc.exponential": ("tiny-a", dict(scheduler="unipc", schedule="exponential")),
    "tiny-a.txt2img.heun.beta": ("tiny-a", dict(scheduler="heun", schedule="beta", steps=6)),
    "tiny-a.txt2img.dpm2_a.exponential": ("tiny-a", dict(scheduler="dpm2_a", schedule="exponential", steps=6)),
    "tiny-a.txt2img.dpmpp_sde.beta": ("tiny-a", dict(scheduler="dpmpp_sde", schedule="beta", steps=6)),
    "tiny-b.txt2img.lms.beta": ("tiny-b", dict(scheduler="lms", schedule="beta")),
    "tiny-b.txt2img.dpm2.exponential": ("tiny-b", dict(scheduler="dpm2", schedule="exponential", steps=6)),
    "tiny-a.img2img.dpmpp_2m.exponential.0.6": ("tiny-a", dict(scheduler="dpmpp_2m", schedule="exponential", strength=0.6)),
    "tiny-a.txt2img.dpmpp_2m_sde.exponential.batch": (
        "tiny-a", dict(scheduler="dpmpp_2m_sde", schedule="exponential", batch_size=2)),
}


def overrides_of(name, sched, variant):
    if name in api_schedulers.BROWNIAN:
        base = api_schedulers.BROWNIAN[name][1]
    else:
        base = api_schedulers.SCHEDULERS[name][1]
    return {**base, **SCHEDULE_KEYS[sched], **variant}


def class_of(name):
    if name in api_schedulers.BROWNIAN:
        return getattr(diffusers, api_schedulers.BROWNIAN[name][0])
    return api_schedulers.scheduler_class(api_schedulers.SCHEDULERS[name][0])


def make(name, sched, variant, config=SD15, seeds=None):
    over = overrides_of(name, sched, variant)
    if name in api_schedulers.BROWNIAN:
        return class_of(name).from_config({**config, **over}, noise_sampler_seed=seeds)
    return class_of(name).from_config({**config, **over})


def randn(seed):
    return torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def schedule(tensors, key, sched, steps):
    sched.set_timesteps(steps)
    tensors[f"{key}.timesteps"] = sched.timesteps.to(torch.float64).clone()
    tensors[f"{key}.sigmas"] = torch.as_tensor(sched.sigmas).to(torch.float64).clone()
    tensors[f"{key}.init_noise_sigma"] = torch.tensor([float(sched.init_noise_sigma)], dtype=torch.float64)


def trajectory(tensors, key, sched, steps, stochastic):
    sched.set_timesteps(steps)
    sample = randn(SAMPLE_SEED) * sched.init_noise_sigma
    samples, outputs, scaled = [sample.clone()], [], []
    gen = torch.Generator("cpu").manual_seed(STEP_SEED) if stochastic else None
    for i, t in enumerate(sched.timesteps):
        scaled.append(sched.scale_model_input(sample, t).clone())
        mo = randn(OUTPUT_SEED + i)
        outputs.append(mo)
        kwargs = {"generator": gen} if stochastic else {}
        sample = sched.step(mo, t, sample, **kwargs).prev_sample
        samples.append(sample.clone())
    tensors[f"{key}.model_outputs"] = torch.stack(outputs).contiguous()
    tensors[f"{key}.scaled_inputs"] = torch.stack(scaled).contiguous()
    tensors[f"{key}.samples"] = torch.stack(samples).contiguous()


def scheduler_fixtures(tensors):
    entries = []
    for prefix, (name, sched, variant, sched_steps, traj_steps) in ENTRIES.items():
        stochastic = name in STOCHASTIC
        all_steps = sorted(set(sched_steps) | set(traj_steps))
        seeds = 0 if name in api_schedulers.BROWNIAN else None
        for steps in all_steps:
            schedule(tensors, f"{prefix}.{steps}", make(name, sched, variant, seeds=seeds), steps)
        for steps in traj_steps:
            trajectory(tensors, f"{prefix}.{steps}", make(name, sched, variant), steps, stochastic)
        entries.append(dict(prefix=prefix, scheduler=name, schedule=sched, cls=class_of(name).__name__,
                            overrides=variant, schedule_steps=all_steps, trajectory_steps=traj_steps,
                            stochastic=stochastic))
    return entries


def kdiffusion_check():
    """A1111's Exponential and Beta against diffusers' on SD 1.5's sigma range."""
    # The LDM model's alphas_cumprod (ldm/models/diffusion/ddpm.py register_schedule: float64 betas
    # and cumprod, stored as float32) and k-diffusion's DiscreteSchedule.sigmas from them.
    betas = torch.linspace(SD15["beta_start"] ** 0.5, SD15["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.tensor(np.cumprod(1.0 - betas.numpy(), axis=0), dtype=torch.float32)
    model_sigmas = ((1 - ac) / ac) ** 0.5
    sigma_min, sigma_max = model_sigmas[0].item(), model_sigmas[-1].item()
    worst = {}
    for sched in ("exponential", "beta"):
        worst[sched] = 0.0
        for n in SCHEDULE_STEPS[1:] + [20, 30, 40]:
            if sched == "exponential":
                kd = torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp()
            else:
                ts = [scipy.stats.beta.ppf(x, 0.6, 0.6) for x in 1 - np.linspace(0, 1, n)]
                kd = torch.FloatTensor([sigma_min + x * (sigma_max - sigma_min) for x in ts])
            kd = torch.cat([kd, kd.new_zeros([1])])
            d = make("euler", sched, {})
            d.set_timesteps(n)
            ours = d.sigmas.to(torch.float64)
            rel = ((kd.to(torch.float64) - ours).abs() / ours.clamp(min=1e-12))[:-1].max().item()
            worst[sched] = max(worst[sched], rel)
            assert kd[-1] == 0 and ours[-1] == 0
    for sched, rel in worst.items():
        print(f"k-diffusion / A1111 {sched} vs diffusers Euler {sched} on SD 1.5: max rel diff {rel:.2e}")
        assert rel < 1e-6, (sched, rel)
    return dict(sigma_min=sigma_min, sigma_max=sigma_max, max_rel_diff=worst)


@torch.no_grad()
def image_fixtures(tensors):
    pipes, cases = {}, {}
    for label, (model, over) in IMAGES.items():
        if model not in pipes:
            txt = load_pipe(diffusers.StableDiffusionPipeline, os.path.join(OUT, model))
            img = diffusers.StableDiffusionImg2ImgPipeline(**txt.components)
            img.set_progress_bar_config(disable=True)
            pipes[model] = (txt, img, dict(txt.scheduler.config))
        txt, img, own = pipes[model]
        r = {**BASE[model], "strength": None, "batch_size": 1, **over}
        pipe = txt if r["strength"] is None else img
        n = r["batch_size"]
        seeds = [r["seed"] + i for i in range(n)]
        pipe.scheduler = make(r["scheduler"], r["schedule"], {}, config=own,
                              seeds=seeds if n > 1 else seeds[0])
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        kwargs = dict(prompt=r["prompt"], negative_prompt=r["negative_prompt"],
                      num_inference_steps=r["steps"], guidance_scale=r["guidance_scale"],
                      generator=gens if n > 1 else gens[0], output_type="np",
                      num_images_per_prompt=n)
        init_name = None
        if r["strength"] is None:
            kwargs.update(width=r["width"], height=r["height"])
        else:
            init_name = f"init-{r['width']}x{r['height']}.png"
            init = Image.open(os.path.join(OUT, "images", init_name)).convert("RGB")
            kwargs.update(image=init, strength=r["strength"])
        out = to_u8(pipe(**kwargs).images)
        assert out.shape == (n, r["height"], r["width"], 3), out.shape
        assert float(out.float().std()) > 2.0 and len(torch.unique(out)) > 20, f"{label} is flat"
        tensors[f"image.{label}"] = out.contiguous()
        cases[label] = dict(r, model=model, mode="txt2img" if init_name is None else "img2img",
                            init_image=init_name, mask_image=None,
                            timesteps=[float(t) for t in pipe.scheduler.timesteps])
        print(f"{label}: mean {out.float().mean():.1f} std {out.float().std():.1f}")
    return cases


def main():
    assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    torch.set_num_threads(1)
    tensors = {}
    kd = kdiffusion_check()
    entries = scheduler_fixtures(tensors)
    cases = image_fixtures(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "sigma-schedules.safetensors"))
    index = {
        "generated_by": "tools/make_sigma_schedule_fixtures.py",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "scipy": scipy.__version__,
        "config": SD15,
        "shape": list(SHAPE),
        "sample_seed": SAMPLE_SEED,
        "output_seed": OUTPUT_SEED,
        "step_seed": STEP_SEED,
        "kdiffusion": kd,
        "entries": entries,
        "cases": cases,
    }
    with open(os.path.join(OUT, "sigma-schedules.json"), "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    print(f"wrote {len(tensors)} tensors: {len(entries)} scheduler entries, {len(cases)} images")


if __name__ == "__main__":
    main()
