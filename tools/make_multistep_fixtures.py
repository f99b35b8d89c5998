#!/usr/bin/env python3
"""Extra references for the multistep schedulers (DPMSolverMultistep, UniPCMultistep), diffusers 0.42.1.

Writes crates/pipeline/tests/fixtures/multistep.safetensors and multistep.json. It complements
tools/make_scheduler_fixtures.py (which covers the API's dpmpp_2m, dpmpp_2m_karras and unipc under
SD 1.5's config) with the configs a model's own scheduler_config.json may carry: solver order 1
and 3, heun, the noise-prediction solver, final sigma_min, euler_at_final, no lower_order_final,
sample prediction, bh1, predict_x0 False, disable_corrector, Karras sigmas in UniPC,
sigma_min/sigma_max keys, and a finite lambda_min_clipped. It also records the Karras schedules for every step count 1..=50, where
the `_sigma_to_t` rounding could go either way.

Every case is `Class.from_config({**SD15, **overrides})`. Key layout:

  <case>.<steps>.timesteps      float64, `scheduler.timesteps` after set_timesteps(steps)
  <case>.<steps>.sigmas         float64 copy of the float32 `scheduler.sigmas`
  <case>.<steps>.model_outputs  [steps, 1, 4, 8, 8]: model output i is randn(seed=OUTPUT_SEED + i)
  <case>.<steps>.samples        [steps + 1, 1, 4, 8, 8]: index 0 is randn(seed=SAMPLE_SEED)

Run from the repository root: python3 tools/make_multistep_fixtures.py
"""
import json
import os

import diffusers
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from safetensors.torch import save_file

# stable-diffusion-v1-5 scheduler/scheduler_config.json, verbatim keys.
from api_schedulers import SD15_SCHEDULER_CONFIG as SD15

OUT = os.path.join("crates", "pipeline", "tests", "fixtures")

CLASSES = {"dpm": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}

# name -> (class key, config overrides)
SCHEDULE_CASES = {
    "dpm_karras": ("dpm", {"use_karras_sigmas": True}),
    "unipc_karras": ("unipc", {"use_karras_sigmas": True}),
}
SCHEDULE_STEPS = list(range(1, 51))

TRAJECTORY_CASES = {
    "dpm_order1": ("dpm", {"solver_order": 1}),
    "dpm_order3": ("dpm", {"solver_order": 3}),
    "dpm_order3_v": ("dpm", {"solver_order": 3, "prediction_type": "v_prediction"}),
    "dpm_heun": ("dpm", {"solver_type": "heun"}),
    "dpm_sigma_min": ("dpm", {"final_sigmas_type": "sigma_min"}),
    "dpm_noise": ("dpm", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpm_noise_order3": (
        "dpm",
        {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3},
    ),
    "dpm_noise_heun_v": (
        "dpm",
        {
            "algorithm_type": "dpmsolver",
            "final_sigmas_type": "sigma_min",
            "solver_type": "heun",
            "prediction_type": "v_prediction",
        },
    ),
    "dpm_euler_final": ("dpm", {"euler_at_final": True, "final_sigmas_type": "sigma_min"}),
    "dpm_no_lof": ("dpm", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}),
    "dpm_sample": ("dpm", {"prediction_type": "sample"}),
    "dpm_karras_range": ("dpm", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
    "unipc_order1": ("unipc", {"solver_order": 1}),
    "unipc_order3": ("unipc", {"solver_order": 3}),
    "unipc_bh1": ("unipc", {"solver_type": "bh1"}),
    "unipc_bh1_order3": ("unipc", {"solver_type": "bh1", "solver_order": 3}),
    # The noise form with a zero final sigma gives 0 * inf = NaN in diffusers; sigma_min avoids it.
    "unipc_noise": ("unipc", {"predict_x0": False, "final_sigmas_type": "sigma_min"}),
    "unipc_noise_v": (
        "unipc",
        {"predict_x0": False, "prediction_type": "v_prediction", "final_sigmas_type": "sigma_min"},
    ),
    "unipc_disable": ("unipc", {"disable_corrector": [0, 2]}),
    "unipc_no_lof": ("unipc", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}),
    "unipc_karras": ("unipc", {"use_karras_sigmas": True}),
    "unipc_karras_sigma_min": ("unipc", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}),
    "unipc_sample": ("unipc", {"prediction_type": "sample"}),
    # lambda_min_clipped leaves out the timesteps whose log-SNR is below it (SD 1.5's lowest is
    # about -2.7); UniPC has no such key and ignores it.
    "dpm_clipped": ("dpm", {"lambda_min_clipped": -2.5}),
    "dpm_clipped_leading": ("dpm", {"lambda_min_clipped": -2.0, "timestep_spacing": "leading"}),
    "dpm_clipped_below": ("dpm", {"lambda_min_clipped": -3.0}),
    "unipc_clipped": ("unipc", {"lambda_min_clipped": -2.0}),
}
# 12 < 15 steps exercises lower_order_final's second-to-last step; 20 runs without it.
TRAJECTORY_STEPS = [1, 4, 12, 20]

SHAPE = (1, 4, 8, 8)
SAMPLE_SEED = 11
OUTPUT_SEED = 2000


def randn(seed):
    return torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def make(cls_key, overrides):
    return CLASSES[cls_key].from_config({**SD15, **overrides})


def schedule(tensors, key, sched, steps):
    sched.set_timesteps(steps)
    tensors[f"{key}.{steps}.timesteps"] = sched.timesteps.to(torch.float64).clone()
    tensors[f"{key}.{steps}.sigmas"] = torch.as_tensor(sched.sigmas).to(torch.float64).clone()


def trajectory(tensors, key, sched, steps):
    sched.set_timesteps(steps)
    sample = randn(SAMPLE_SEED) * sched.init_noise_sigma
    samples, outputs = [sample.clone()], []
    for i, t in enumerate(sched.timesteps):
        mo = randn(OUTPUT_SEED + i)
        outputs.append(mo)
        sample = sched.step(mo, t, sample).prev_sample
        samples.append(sample.clone())
    tensors[f"{key}.{steps}.model_outputs"] = torch.stack(outputs).contiguous()
    tensors[f"{key}.{steps}.samples"] = torch.stack(samples).contiguous()


def main():
    assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    torch.set_num_threads(1)
    tensors = {}
    entries = []
    for name, (cls_key, over) in SCHEDULE_CASES.items():
        for steps in SCHEDULE_STEPS:
            schedule(tensors, name, make(cls_key, over), steps)
        entries.append({"case": name, "class": cls_key, "overrides": over, "schedule_steps": SCHEDULE_STEPS,
                        "trajectory_steps": []})
    for name, (cls_key, over) in TRAJECTORY_CASES.items():
        for steps in TRAJECTORY_STEPS:
            schedule(tensors, name, make(cls_key, over), steps)
            trajectory(tensors, name, make(cls_key, over), steps)
        entries.append({"case": name, "class": cls_key, "overrides": over, "schedule_steps": TRAJECTORY_STEPS,
                        "trajectory_steps": TRAJECTORY_STEPS})
    os.makedirs(OUT, exist_ok=True)
    save_file(tensors, os.path.join(OUT, "multistep.safetensors"))
    index = {
        "generated_by": "tools/make_multistep_fixtures.py",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "config": SD15,
        "shape": list(SHAPE),
        "sample_seed": SAMPLE_SEED,
        "output_seed": OUTPUT_SEED,
        "entries": entries,
    }
    with open(os.path.join(OUT, "multistep.json"), "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
