#!/usr/bin/env python3
"""Reference values for DPM++ SDE (diffusers 0.42.1 `DPMSolverSDEScheduler`) and the noise it draws
from torchsde 0.2.6's Brownian tree (numpy `SeedSequence` -> torch CPU `randn`).

Writes crates/pipeline/tests/fixtures/sde.json and sde.safetensors:

  seed_sequences     numpy SeedSequence(entropy, spawn_key=..., pool_size=...).generate_state(n)
  math.<op>.x/.y     torch's float32 log / exp / expm1 (SLEEF on CPU) of 4000 inputs each
  round6             Python's round(x, 6) (torchsde's time quantisation for tol=1e-6), as float.hex
  trees              torchsde.BrownianInterval(t0, t1, size, entropy, tol=1e-6, pool_size=24,
                     halfway_tree=True) as diffusers' BatchedBrownianTree builds it, queried in the
                     order a run queries it: tree.<label>.<i> is W(ta, tb) of queries[i]
  samplers           diffusers' BrownianTreeNoiseSampler calls made by a scheduler run:
                     sampler.<label>.<i> is noise_sampler(sigma, sigma_next) of calls[i]
  trajectories       `step()` on fixed inputs, as tools/make_scheduler_fixtures.py records them:
                     <prefix>.<steps>.{timesteps,sigmas,init_noise_sigma,model_outputs,
                     scaled_inputs,samples}; the tree of image i is seeded with seeds[i]
  images             whole images on the tiny-a fixture model: image.<label> [batch, H, W, 3] u8,
                     generator = [Generator.manual_seed(seed + i)], noise_sampler_seed = the same
                     seeds (A1111's one tree per image, seeded with the image's seed)

Run from the repository root after tools/make_tiny_models.py: python3 tools/make_sde_fixtures.py
"""
import json
import os

import diffusers
import numpy as np
import torch
import torchsde
from diffusers import DPMSolverSDEScheduler
from diffusers.schedulers import scheduling_dpmsolver_sde as sde_module
from safetensors.torch import save_file

from api_schedulers import SD15_SCHEDULER_CONFIG as SD15
from api_schedulers import make_brownian_scheduler

OUT = os.path.join("crates", "pipeline", "tests", "fixtures")
SHAPE = (1, 4, 8, 8)
SAMPLE_SEED = 7
OUTPUT_SEED = 1000
TREE_SEED = 99

SEED_SEQUENCES = [
    # (entropy, spawn_key, pool_size, n_words)
    (0, (), 4, 4),
    (12345, (), 24, 3),
    (99, (), 24, 3),
    (2**32 - 1, (), 24, 3),
    (2**40 + 7, (), 24, 3),
    (42, (0, 0), 24, 4),
    (42, (5, 3), 24, 4),
    (3000000000, (1234567, 21), 24, 4),
    (2**63 - 1, (2**33 + 1, 40), 24, 4),
    (7, (1, 2, 3, 4, 5), 4, 8),
]

# (prefix, config overrides, trajectory step counts, seeds: int or a list, one per image)
TRAJECTORIES = [
    ("dpmpp_sde", {}, [1, 2, 5, 20], TREE_SEED),
    ("dpmpp_sde_karras", {"use_karras_sigmas": True}, [1, 2, 5, 20], TREE_SEED),
    ("dpmpp_sde-v", {"prediction_type": "v_prediction"}, [5], TREE_SEED),
    ("dpmpp_sde-leading", {"timestep_spacing": "leading"}, [5], TREE_SEED),
    ("dpmpp_sde-trailing", {"timestep_spacing": "trailing"}, [5], TREE_SEED),
    ("dpmpp_sde_karras-batch", {"use_karras_sigmas": True}, [5], [TREE_SEED, TREE_SEED + 1]),
]

IMAGE_MODEL = "tiny-a"
IMAGE_BASE = dict(
    prompt="a photo of an astronaut riding a horse on mars",
    negative_prompt="blurry, low quality",
    steps=8,
    width=64,
    height=64,
    seed=42,
    guidance_scale=7.5,
)
# label -> (API scheduler name, request overrides)
IMAGES = {
    "dpmpp_sde": ("dpmpp_sde", {}),
    "dpmpp_sde_karras": ("dpmpp_sde_karras", {"seed": 3000000000}),
    "dpmpp_sde_karras.batch2": ("dpmpp_sde_karras", {"batch_size": 2}),
    # img2img: 8 steps at strength 0.6 run int(4.8) = 4 of them, from timesteps[2 * 4] (order 2).
    "dpmpp_sde.img2img": ("dpmpp_sde", {"init_image": "init-32x32.png", "strength": 0.6,
                                         "width": 32, "height": 32, "seed": 7}),
}


def randn(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def seed_sequences():
    out = []
    for entropy, spawn_key, pool_size, n in SEED_SEQUENCES:
        state = np.random.SeedSequence(entropy, spawn_key=spawn_key, pool_size=pool_size).generate_state(n)
        out.append(
            {
                "entropy": str(entropy),
                "spawn_key": [str(k) for k in spawn_key],
                "pool_size": pool_size,
                "state": [int(s) for s in state],
            }
        )
    return out


def round6_cases(sigmas):
    rng = np.random.default_rng(5)
    xs = [0.0078125, 0.0234375, 1.0000005, 2.5e-7, 14.614641189575195, 0.029167532920837402]
    xs += [k / 2**7 for k in range(0, 300)]  # dyadic values: exact ties at the 7th decimal
    xs += [float(v) for v in rng.uniform(0.0, 20.0, 200)]
    xs += [0.5 * (a + b) for a, b in zip(sigmas[:-1], sigmas[1:])]
    xs += sigmas
    return [[float(x).hex(), round(float(x), 6).hex()] for x in xs]


def torch_math(tensors):
    rng = np.random.default_rng(11)
    ranges = {"log": (0.005, 30.0), "exp": (-6.0, 6.0), "expm1": (-5.0, 5.0)}
    for op, (lo, hi) in ranges.items():
        x = torch.from_numpy(rng.uniform(lo, hi, 4000).astype(np.float32))
        tensors[f"math.{op}.x"] = x
        tensors[f"math.{op}.y"] = getattr(torch, op)(x)


class Recorder:
    """Wraps diffusers' BrownianTreeNoiseSampler: records every call and the tree queries it makes."""

    def __init__(self):
        self.calls = []
        self.outputs = []
        self.tree_queries = []
        self.bounds = None

    def install(self):
        rec = self
        base = sde_module.BrownianTreeNoiseSampler

        class Recording(base):
            def __init__(self, x, sigma_min, sigma_max, seed=None, transform=lambda x: x):
                super().__init__(x, sigma_min, sigma_max, seed, transform)
                rec.bounds = (float(sigma_min), float(sigma_max))

            def __call__(self, sigma, sigma_next):
                out = super().__call__(sigma, sigma_next)
                rec.calls.append([float(sigma), float(sigma_next)])
                rec.outputs.append(out.clone())
                a, b = float(sigma), float(sigma_next)
                rec.tree_queries.append([min(a, b), max(a, b)])
                return out

        sde_module.BrownianTreeNoiseSampler = Recording
        return base


def make_scheduler(overrides, seeds):
    return DPMSolverSDEScheduler.from_config({**SD15, **overrides}, noise_sampler_seed=seeds)


def trajectory(tensors, prefix, overrides, steps, seeds):
    batch = len(seeds) if isinstance(seeds, list) else 1
    shape = (batch, *SHAPE[1:])
    rec = Recorder()
    base = rec.install()
    try:
        sched = make_scheduler(overrides, seeds)
        sched.set_timesteps(steps)
        tensors[f"{prefix}.{steps}.timesteps"] = sched.timesteps.to(torch.float64).clone()
        tensors[f"{prefix}.{steps}.sigmas"] = sched.sigmas.to(torch.float64).clone()
        tensors[f"{prefix}.{steps}.init_noise_sigma"] = torch.tensor([float(sched.init_noise_sigma)], dtype=torch.float64)
        sample = randn(SAMPLE_SEED, shape) * sched.init_noise_sigma
        samples, outputs, scaled = [sample.clone()], [], []
        for i, t in enumerate(sched.timesteps):
            scaled.append(sched.scale_model_input(sample, t).clone())
            mo = randn(OUTPUT_SEED + i, shape)
            outputs.append(mo)
            sample = sched.step(mo, t, sample).prev_sample
            samples.append(sample.clone())
    finally:
        sde_module.BrownianTreeNoiseSampler = base
    tensors[f"{prefix}.{steps}.model_outputs"] = torch.stack(outputs).contiguous()
    tensors[f"{prefix}.{steps}.scaled_inputs"] = torch.stack(scaled).contiguous()
    tensors[f"{prefix}.{steps}.samples"] = torch.stack(samples).contiguous()
    label = f"{prefix}.{steps}"
    for i, out in enumerate(rec.outputs):
        tensors[f"sampler.{label}.{i}"] = out.contiguous()
    return label, rec, shape


def raw_trees(tensors, label, rec, shape, seeds):
    """The raw increments W(ta, tb) of a fresh tree per image, queried in the run's order."""
    if rec.bounds is None:
        return None
    t0, t1 = rec.bounds
    seed_list = seeds if isinstance(seeds, list) else [seeds]
    trees = [
        torchsde.BrownianInterval(
            t0=t0, t1=t1, size=shape[1:], dtype=torch.float32, device="cpu", entropy=s,
            tol=1e-6, pool_size=24, halfway_tree=True,
        )
        for s in seed_list
    ]
    for i, (ta, tb) in enumerate(rec.tree_queries):
        tensors[f"tree.{label}.{i}"] = torch.stack([tree(ta, tb) for tree in trees]).contiguous()
    return {"t0": t0, "t1": t1, "seeds": seed_list, "queries": rec.tree_queries}


@torch.no_grad()
def images(tensors):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
    from PIL import Image

    folder = os.path.join(OUT, IMAGE_MODEL)
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    own = dict(pipe.scheduler.config)
    out = {}
    for label, (name, req) in IMAGES.items():
        r = dict(IMAGE_BASE, **req)
        batch = r.get("batch_size", 1)
        seeds = [(r["seed"] + i) & 0xFFFFFFFF for i in range(batch)]
        pipe.scheduler = make_brownian_scheduler(name, own, seeds if batch > 1 else seeds[0])
        kwargs = {}
        run = pipe
        if "init_image" in r:
            run = StableDiffusionImg2ImgPipeline(**pipe.components)
            run.set_progress_bar_config(disable=True)
            init = Image.open(os.path.join(OUT, "images", r["init_image"])).convert("RGB")
            kwargs = dict(image=init, strength=r["strength"])
        else:
            kwargs = dict(width=r["width"], height=r["height"])
        imgs = run(
            r["prompt"],
            negative_prompt=r["negative_prompt"],
            num_inference_steps=r["steps"],
            guidance_scale=r["guidance_scale"],
            num_images_per_prompt=batch,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="np",
            **kwargs,
        ).images
        tensors[f"image.{label}"] = torch.from_numpy((imgs * 255).round().astype("uint8"))
        out[label] = dict(r, model=IMAGE_MODEL, scheduler=name, batch_size=batch, seeds=seeds,
                          timesteps=[float(t) for t in run.scheduler.timesteps])
        print(f"image.{label}: {imgs.shape}, {len(run.scheduler.timesteps)} scheduler timesteps, mean {imgs.mean() * 255:.1f}")
    return out


def main():
    assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    assert torchsde.__version__ == "0.2.6", torchsde.__version__
    torch.set_num_threads(1)
    tensors = {}
    torch_math(tensors)
    trajectories, trees, samplers = [], {}, {}
    for prefix, overrides, steps_list, seeds in TRAJECTORIES:
        for steps in steps_list:
            label, rec, shape = trajectory(tensors, prefix, overrides, steps, seeds)
            samplers[label] = {"bounds": rec.bounds, "calls": rec.calls}
            tree = raw_trees(tensors, label, rec, shape, seeds)
            if tree is not None:
                trees[label] = tree
        trajectories.append({"prefix": prefix, "overrides": overrides, "steps": steps_list, "seeds": seeds})
    sigmas = [q for t in trees.values() for pair in t["queries"] for q in pair]
    index = {
        "generated_by": "tools/make_sde_fixtures.py",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "torchsde": torchsde.__version__,
        "numpy": np.__version__,
        "config": SD15,
        "shape": list(SHAPE),
        "sample_seed": SAMPLE_SEED,
        "output_seed": OUTPUT_SEED,
        "seed_sequences": seed_sequences(),
        "round6": round6_cases(sorted(set(sigmas))),
        "trajectories": trajectories,
        "trees": trees,
        "samplers": samplers,
        "images": images(tensors),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "sde.safetensors"))
    with open(os.path.join(OUT, "sde.json"), "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    print(f"wrote {len(tensors)} tensors")


if __name__ == "__main__":
    main()
