#!/usr/bin/env python3
"""Reference numbers for the Heun, DPM2, DPM2 ancestral and LCM schedulers (diffusers 0.42.1,
torch 2.11.0): HeunDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler,
LCMScheduler. Runs after tools/make_tiny_models.py and tools/make_img2img_fixtures.py (reads
tiny-a/, images/init-32x32.png and images/mask-32x32.png).

Writes crates/pipeline/tests/fixtures/samplers.safetensors and samplers.json:

1. Schedulers, built as the server builds them: `Class.from_config({**SD15, **overrides})`,
   SD15 being SD 1.5's real scheduler_config.json. Per `<prefix>.<steps>` (as
   tools/make_scheduler_fixtures.py): `timesteps` (float64), `sigmas` and `sigmas_interpol`
   (float64 copies of the float32 tensors, where the class has them), `init_noise_sigma`, and for
   trajectory step counts `model_outputs` / `scaled_inputs` / `samples` (index 0 the initial
   sample, randn(SAMPLE_SEED) * init_noise_sigma; model output i is randn(OUTPUT_SEED + i)); a
   stochastic scheduler gets one `torch.Generator().manual_seed(STEP_SEED)` for the whole run.
   `<prefix>.<steps>.from<b>.*`: the same run begun at `set_begin_index(b)` on the sample
   `add_noise(randn(SAMPLE_SEED), randn(SAMPLE_SEED + 1), timesteps[b])` (img2img's start).
2. Images: `image.<case>` [batch, H, W, 3] u8 from StableDiffusionPipeline /
   StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline on tiny-a (one generator per
   image, seed + i).

Run from the repository root: python3 tools/make_sampler_fixtures.py
"""
import json
import os

import diffusers
import torch
from PIL import Image
from safetensors.torch import save_file

import api_schedulers
from api_schedulers import SD15_SCHEDULER_CONFIG as SD15
from make_img2img_fixtures import BASE, load_pipe, to_u8

OUT = os.path.join("crates", "pipeline", "tests", "fixtures")

# API name -> (class, overrides that the factory adds, stochastic). The `_karras` names are the
# entries below whose overrides set use_karras_sigmas.
SAMPLERS = {
    name: (*api_schedulers.SCHEDULERS[name], name in api_schedulers.STOCHASTIC)
    for name in ("heun", "dpm2", "dpm2_a", "lcm")
}

SCHEDULE_STEPS = [1, 2, 3, 5, 7, 10, 20, 25, 33, 50]
TRAJECTORY_STEPS = [1, 2, 5, 12]
# prefix -> (scheduler, config overrides, schedule step counts, trajectory step counts)
ENTRIES = {}
for _name in SAMPLERS:
    ENTRIES[_name] = (_name, {}, SCHEDULE_STEPS, TRAJECTORY_STEPS)
    ENTRIES[f"{_name}-v"] = (_name, {"prediction_type": "v_prediction"}, [5], [5])
    ENTRIES[f"{_name}-trailing"] = (_name, {"timestep_spacing": "trailing"}, [3, 7, 25], [5])
    ENTRIES[f"{_name}-linear"] = (_name, {"beta_schedule": "linear", "beta_start": 0.0001,
                                          "beta_end": 0.02}, [5, 25], [5])
# DPM2 a's sigmas_down is a difference of nearly equal squares: with 2 steps (sigma 14.6 then
# 0.029) it turns torch's 1-ulp rounding of the training sigmas (torch's sqrt is not correctly
# rounded) into a 2% change of the first step's sigma_down; so no 2-step DPM2 a run.
ENTRIES["dpm2_a"] = ("dpm2_a", {}, SCHEDULE_STEPS, [1, 5, 12])
for _name in ("heun", "dpm2", "dpm2_a"):
    ENTRIES[f"{_name}-karras"] = (_name, {"use_karras_sigmas": True}, [1, 2, 5, 10, 25, 50], [5, 12])
    ENTRIES[f"{_name}-leading"] = (_name, {"timestep_spacing": "leading"}, [3, 7, 25], [5])
ENTRIES["heun-sample"] = ("heun", {"prediction_type": "sample"}, [5], [5])
ENTRIES["heun-clip"] = ("heun", {"prediction_type": "sample", "clip_sample": True,
                                 "clip_sample_range": 0.5}, [5], [5])
ENTRIES["lcm-original25"] = ("lcm", {"original_inference_steps": 25}, [1, 4, 7, 25], [4])
ENTRIES["lcm-sample"] = ("lcm", {"prediction_type": "sample", "clip_sample": True}, [4], [4])
ENTRIES["lcm-scaling"] = ("lcm", {"timestep_scaling": 3.5}, [4], [4])
# Begun mid-run, as img2img begins (set_begin_index(t_start * order)).
BEGIN = {"heun": (12, [4, 10]), "dpm2": (12, [6, 22]), "dpm2_a": (12, [6]), "lcm": (8, [3])}

SHAPE = (1, 4, 8, 8)
SAMPLE_SEED = 7
OUTPUT_SEED = 1000
STEP_SEED = 99

# End-to-end images on tiny-a (BASE['tiny-a'] of make_img2img_fixtures.py plus these).
IMAGES = {
    "tiny-a.txt2img.heun": dict(scheduler="heun", steps=6),
    "tiny-a.txt2img.dpm2": dict(scheduler="dpm2", steps=6),
    "tiny-a.txt2img.dpm2_a": dict(scheduler="dpm2_a", steps=6),
    "tiny-a.txt2img.lcm": dict(scheduler="lcm", steps=4, guidance_scale=1.5),
    "tiny-a.img2img.heun.0.75": dict(scheduler="heun", strength=0.75),
    "tiny-a.img2img.dpm2_a.0.6.batch": dict(scheduler="dpm2_a", strength=0.6, batch_size=2),
    "tiny-a.img2img.lcm.0.5": dict(scheduler="lcm", steps=6, strength=0.5, guidance_scale=1.0),
    # Inpainting with the 4-channel UNet: the known region is noised to the next entry of the
    # interleaved timesteps after every UNet evaluation (add_noise by step index).
    "tiny-a.inpaint.heun.0.75": dict(scheduler="heun", strength=0.75, mask=True),
    "tiny-a.inpaint.dpm2_a.1.0": dict(scheduler="dpm2_a", steps=6, strength=1.0, mask=True),
    "tiny-a.inpaint.lcm.0.75": dict(scheduler="lcm", steps=6, strength=0.75, guidance_scale=1.0,
                                    mask=True),
}
INIT_IMAGE = "init-32x32.png"
MASK_IMAGE = "mask-32x32.png"


def randn(seed):
    return torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def make(name, overrides):
    cls, base, _ = SAMPLERS[name]
    return getattr(diffusers, cls).from_config({**SD15, **base, **overrides})


def schedule(tensors, key, sched, steps):
    sched.set_timesteps(steps)
    tensors[f"{key}.timesteps"] = sched.timesteps.to(torch.float64).clone()
    for attr in ("sigmas", "sigmas_interpol"):
        if getattr(sched, attr, None) is not None:
            tensors[f"{key}.{attr}"] = torch.as_tensor(getattr(sched, attr)).to(torch.float64).clone()
    tensors[f"{key}.init_noise_sigma"] = torch.tensor([float(sched.init_noise_sigma)], dtype=torch.float64)


def trajectory(tensors, key, sched, steps, stochastic, begin=None):
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if begin is None:
        sample = randn(SAMPLE_SEED) * sched.init_noise_sigma
    else:
        sched.set_begin_index(begin)
        timesteps = timesteps[begin:]
        sample = sched.add_noise(randn(SAMPLE_SEED), randn(SAMPLE_SEED + 1), timesteps[:1])
    samples, outputs, scaled = [sample.clone()], [], []
    gen = torch.Generator("cpu").manual_seed(STEP_SEED) if stochastic else None
    for i, t in enumerate(timesteps):
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
    for prefix, (name, over, sched_steps, traj_steps) in ENTRIES.items():
        stochastic = SAMPLERS[name][2]
        all_steps = sorted(set(sched_steps) | set(traj_steps))
        for steps in all_steps:
            schedule(tensors, f"{prefix}.{steps}", make(name, over), steps)
        for steps in traj_steps:
            trajectory(tensors, f"{prefix}.{steps}", make(name, over), steps, stochastic)
        begins = {}
        if prefix in BEGIN:
            steps, starts = BEGIN[prefix]
            if steps not in all_steps:
                schedule(tensors, f"{prefix}.{steps}", make(name, over), steps)
                all_steps.append(steps)
            for b in starts:
                trajectory(tensors, f"{prefix}.{steps}.from{b}", make(name, over), steps,
                           stochastic, begin=b)
            begins = {"steps": steps, "starts": starts}
        entries.append(dict(prefix=prefix, scheduler=name, cls=SAMPLERS[name][0], overrides=over,
                            schedule_steps=sorted(all_steps), trajectory_steps=traj_steps,
                            begins=begins, stochastic=stochastic, order=make(name, over).order))
    return entries


@torch.no_grad()
def image_fixtures(tensors):
    folder = os.path.join(OUT, "tiny-a")
    txt = load_pipe(diffusers.StableDiffusionPipeline, folder)
    own = dict(txt.scheduler.config)
    img = diffusers.StableDiffusionImg2ImgPipeline(**txt.components)
    img.set_progress_bar_config(disable=True)
    inpaint = diffusers.StableDiffusionInpaintPipeline(**txt.components)
    inpaint.set_progress_bar_config(disable=True)
    init = Image.open(os.path.join(OUT, "images", INIT_IMAGE)).convert("RGB")
    mask = Image.open(os.path.join(OUT, "images", MASK_IMAGE))
    cases = {}
    for label, over in IMAGES.items():
        r = {**BASE["tiny-a"], "strength": None, "batch_size": 1, "mask": False, **over}
        pipe = txt if r["strength"] is None else inpaint if r["mask"] else img
        cls, extra, _ = SAMPLERS[r["scheduler"]]
        pipe.scheduler = getattr(diffusers, cls).from_config(own, **extra)
        n = r["batch_size"]
        gens = [torch.Generator("cpu").manual_seed(r["seed"] + i) for i in range(n)]
        kwargs = dict(prompt=r["prompt"], negative_prompt=r["negative_prompt"],
                      num_inference_steps=r["steps"], guidance_scale=r["guidance_scale"],
                      generator=gens if n > 1 else gens[0], output_type="np",
                      num_images_per_prompt=n)
        evaluations = []
        kwargs["callback_on_step_end"] = lambda p, i, t, kw: evaluations.append(float(t)) or kw
        if r["strength"] is None:
            kwargs.update(width=r["width"], height=r["height"])
        else:
            assert init.size == (r["width"], r["height"])
            kwargs.update(image=init, strength=r["strength"])
            if r["mask"]:
                kwargs.update(mask_image=mask, width=r["width"], height=r["height"])
        out = to_u8(pipe(**kwargs).images)
        assert out.shape == (n, r["height"], r["width"], 3), out.shape
        assert float(out.float().std()) > 2.0 and len(torch.unique(out)) > 20, f"{label} is flat"
        tensors[f"image.{label}"] = out
        mode = "txt2img" if r["strength"] is None else "inpaint" if r["mask"] else "img2img"
        cases[label] = dict(r, model="tiny-a", mode=mode,
                            init_image=None if r["strength"] is None else INIT_IMAGE,
                            mask_image=MASK_IMAGE if r["mask"] else None, unet_timesteps=evaluations)
        print(f"{label}: {len(evaluations)} UNet evaluations, mean {out.float().mean():.1f}")
    return cases


def main():
    assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    torch.set_num_threads(1)
    tensors = {}
    entries = scheduler_fixtures(tensors)
    cases = image_fixtures(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(OUT, "samplers.safetensors"))
    index = {
        "generated_by": "tools/make_sampler_fixtures.py",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "config": SD15,
        "shape": list(SHAPE),
        "sample_seed": SAMPLE_SEED,
        "output_seed": OUTPUT_SEED,
        "step_seed": STEP_SEED,
        "entries": entries,
        "cases": cases,
    }
    with open(os.path.join(OUT, "samplers.json"), "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    print(f"wrote {len(tensors)} tensors: {len(entries)} scheduler entries, {len(cases)} images")


if __name__ == "__main__":
    main()
