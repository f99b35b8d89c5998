#!/usr/bin/env python3
"""Reference schedules and trajectories for crates/pipeline/src/schedulers (diffusers 0.42.1).

Writes crates/pipeline/tests/fixtures/<stem>.safetensors and <stem>.json for each group of GROUPS
below (`schedulers`: the first API names; `schedulers-karras`: the Karras names and DPM++ 2M SDE).

Every scheduler is built the way the server builds it: `Class.from_config(SD15)` where SD15 is the
real SD 1.5 `scheduler/scheduler_config.json` (keys present win, absent keys take the class
defaults), plus per-variant overrides. Key layout (all float32 unless said otherwise):

  <prefix>.<steps>.timesteps        float64, `scheduler.timesteps` after set_timesteps(steps)
  <prefix>.<steps>.sigmas           float64 copy of the float32 `scheduler.sigmas` (classes with sigmas)
  <prefix>.<steps>.init_noise_sigma float64, shape [1]
  <prefix>.<steps>.model_outputs    [len(timesteps), 1, 4, 8, 8]: the fake UNet output at each step
  <prefix>.<steps>.scaled_inputs    [len(timesteps), 1, 4, 8, 8]: scale_model_input(sample, t)
  <prefix>.<steps>.samples          [len(timesteps) + 1, 1, 4, 8, 8]: index 0 is the initial sample
                                    (randn * init_noise_sigma), then every prev_sample
  train.<case>.betas / .alphas_cumprod   float32 training schedules

<prefix> is the API scheduler name (`euler_a`, `lms_karras`), or `<name>-<variant>` for a variant. The JSON lists
every entry with its config overrides, step counts, which have trajectories, and the seeds:
the initial sample is randn(seed=SAMPLE_SEED), model output i is randn(seed=OUTPUT_SEED + i), and a
stochastic scheduler gets `generator=torch.Generator().manual_seed(STEP_SEED)` in every `step` call.

Run from the repository root: python3 tools/make_scheduler_fixtures.py [GROUP...]
"""
import argparse
import json
import os

import diffusers
import torch
from diffusers import DDIMScheduler
from safetensors.torch import save_file

import api_schedulers
# stable-diffusion-v1-5/stable-diffusion-v1-5 scheduler/scheduler_config.json, verbatim keys
# (no timestep_spacing, no prediction_type).
from api_schedulers import SD15_SCHEDULER_CONFIG as SD15

OUT = os.path.join("crates", "pipeline", "tests", "fixtures")

# API name -> (class, overrides that the factory adds).
SCHEDULERS = {
    name: (api_schedulers.scheduler_class(cls), over) for name, (cls, over) in api_schedulers.SCHEDULERS.items()
}
STOCHASTIC = api_schedulers.STOCHASTIC

SCHEDULE_STEPS = [1, 2, 3, 5, 7, 10, 13, 20, 25, 33, 50]
TRAJECTORY_STEPS = [1, 2, 5, 25]
# variant -> (config overrides, schedule step counts, trajectory step counts)
VARIANTS = {
    "": ({}, SCHEDULE_STEPS, TRAJECTORY_STEPS),
    "v": ({"prediction_type": "v_prediction"}, [5, 25], [5, 25]),
    "trailing": ({"timestep_spacing": "trailing"}, [1, 3, 5, 7, 10, 25, 33, 50], [5, 25]),
    "leading": ({"timestep_spacing": "leading"}, [1, 3, 5, 7, 10, 25, 33, 50], [5, 25]),
    "linspace": ({"timestep_spacing": "linspace"}, [1, 3, 5, 7, 10, 25, 33, 50], [5]),
}

# Single-scheduler variants: config keys a model folder may carry.
# prefix -> (scheduler, config overrides, schedule step counts, trajectory step counts)
EXTRA = {
    "pndm-prk": ("pndm", {"skip_prk_steps": False}, [4, 5, 10, 25], [5, 25]),
    "ddim-clip": ("ddim", {"clip_sample": True, "set_alpha_to_one": True}, [5, 25], [5, 25]),
    "ddim-sample": ("ddim", {"prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.5}, [5], [5]),
    "ddim-linear": ("ddim", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, [5, 25], [5]),
    "euler-zsnr": ("euler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, [5, 25], [5]),
    "euler-karras": ("euler", {"use_karras_sigmas": True}, [1, 2, 5, 25], [5, 25]),
    "euler-sigma_min": ("euler", {"final_sigmas_type": "sigma_min"}, [5, 25], [5]),
    "euler-sample": ("euler", {"prediction_type": "sample"}, [5], [5]),
    "euler_a-cosine": ("euler_a", {"beta_schedule": "squaredcos_cap_v2"}, [5, 25], [5]),
    "lms-karras": ("lms", {"use_karras_sigmas": True}, [2, 5, 25], [5, 25]),
    "lms-sample": ("lms", {"prediction_type": "sample"}, [5], [5]),
}

# The SDE solver's other configs (the API name sets algorithm_type and use_karras_sigmas).
EXTRA_KARRAS = {
    "dpmpp_2m_sde-heun": ("dpmpp_2m_sde", {"solver_type": "heun"}, [5, 25], [5, 25]),
    "dpmpp_2m_sde-order3": ("dpmpp_2m_sde", {"solver_order": 3}, [5, 25], [5, 25]),
    "dpmpp_2m_sde-sigma_min": ("dpmpp_2m_sde", {"final_sigmas_type": "sigma_min"}, [5], [5]),
    "dpmpp_2m_sde_karras-order3": ("dpmpp_2m_sde_karras", {"solver_order": 3}, [5, 25], [5, 25]),
}

# Output file stem -> (API names, single-scheduler variants). Each file is written whole by one
# run; `schedulers` was made on an earlier machine and is kept as it is: regenerating it here moves
# a few values by float32 ulps (numpy's and torch's SIMD log/sqrt differ between CPUs), which is why
# the names added later have a file of their own.
GROUPS = {
    "schedulers": (["pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lms", "unipc"], EXTRA),
    "schedulers-karras": (
        ["euler_karras", "euler_a_karras", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "lms_karras", "unipc_karras"],
        EXTRA_KARRAS,
    ),
}

SHAPE = (1, 4, 8, 8)
SAMPLE_SEED = 7
OUTPUT_SEED = 1000
STEP_SEED = 99


def randn(seed):
    return torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def make(cls, overrides):
    # Class.from_config(SD15 + variant keys, **the API name's overrides): the name's keys win.
    return cls.from_config({**SD15, **overrides})


def schedule(tensors, prefix, sched, steps):
    sched.set_timesteps(steps)
    tensors[f"{prefix}.{steps}.timesteps"] = sched.timesteps.to(torch.float64).clone()
    if hasattr(sched, "sigmas") and sched.sigmas is not None:
        tensors[f"{prefix}.{steps}.sigmas"] = torch.as_tensor(sched.sigmas).to(torch.float64).clone()
    ins = sched.init_noise_sigma
    tensors[f"{prefix}.{steps}.init_noise_sigma"] = torch.tensor([float(ins)], dtype=torch.float64)


def trajectory(tensors, prefix, sched, steps, stochastic):
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
    tensors[f"{prefix}.{steps}.model_outputs"] = torch.stack(outputs).contiguous()
    tensors[f"{prefix}.{steps}.scaled_inputs"] = torch.stack(scaled).contiguous()
    tensors[f"{prefix}.{steps}.samples"] = torch.stack(samples).contiguous()


def train_schedules(tensors):
    cases = {
        "sd15": {},
        "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        "cosine": {"beta_schedule": "squaredcos_cap_v2"},
        "zsnr": {"rescale_betas_zero_snr": True},
        "short": {"num_train_timesteps": 37},
    }
    for name, over in cases.items():
        s = DDIMScheduler.from_config({**SD15, **over})
        tensors[f"train.{name}.betas"] = s.betas.clone()
        tensors[f"train.{name}.alphas_cumprod"] = s.alphas_cumprod.clone()
    return cases


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("groups", nargs="*", help=f"files to write, of {list(GROUPS)} (default: all)")
    groups = ap.parse_args().groups or list(GROUPS)
    for stem in groups:
        if stem not in GROUPS:
            ap.error(f"unknown group {stem!r}; one of {list(GROUPS)}")
    for stem in groups:
        write_group(stem, *GROUPS[stem])


def write_group(stem, names, extra):
    assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    torch.set_num_threads(1)
    tensors = {}
    entries = []
    for variant, (over, sched_steps, traj_steps) in VARIANTS.items():
        for name in names:
            cls, base = SCHEDULERS[name]
            prefix = f"{name}-{variant}" if variant else name
            overrides = {**base, **over}
            for steps in sched_steps:
                schedule(tensors, prefix, make(cls, overrides), steps)
            for steps in traj_steps:
                if steps not in sched_steps:
                    schedule(tensors, prefix, make(cls, overrides), steps)
                trajectory(tensors, prefix, make(cls, overrides), steps, name in STOCHASTIC)
            entries.append(
                {
                    "prefix": prefix,
                    "scheduler": name,
                    "variant": variant,
                    "class": cls.__name__,
                    "overrides": over,
                    "schedule_steps": sorted(set(sched_steps) | set(traj_steps)),
                    "trajectory_steps": traj_steps,
                    "stochastic": name in STOCHASTIC,
                }
            )
    for prefix, (name, over, sched_steps, traj_steps) in extra.items():
        cls, base = SCHEDULERS[name]
        overrides = {**base, **over}
        for steps in sorted(set(sched_steps) | set(traj_steps)):
            schedule(tensors, prefix, make(cls, overrides), steps)
        for steps in traj_steps:
            trajectory(tensors, prefix, make(cls, overrides), steps, name in STOCHASTIC)
        entries.append(
            {
                "prefix": prefix,
                "scheduler": name,
                "variant": prefix.split("-", 1)[1],
                "class": cls.__name__,
                "overrides": over,
                "schedule_steps": sorted(set(sched_steps) | set(traj_steps)),
                "trajectory_steps": traj_steps,
                "stochastic": name in STOCHASTIC,
            }
        )
    # The training schedules do not depend on the scheduler: once, in the first file.
    train = train_schedules(tensors) if stem == "schedulers" else {}
    os.makedirs(OUT, exist_ok=True)
    save_file(tensors, os.path.join(OUT, f"{stem}.safetensors"))
    index = {
        "generated_by": "tools/make_scheduler_fixtures.py",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "config": SD15,
        "shape": list(SHAPE),
        "sample_seed": SAMPLE_SEED,
        "output_seed": OUTPUT_SEED,
        "step_seed": STEP_SEED,
        "entries": entries,
        "train": train,
    }
    with open(os.path.join(OUT, f"{stem}.json"), "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    print(f"{stem}: wrote {len(tensors)} tensors for {len(entries)} scheduler entries")


if __name__ == "__main__":
    main()
