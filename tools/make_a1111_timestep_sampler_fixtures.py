#!/usr/bin/env python3
"""A1111 1.10's own DDIM, PLMS and UniPC (our `ddim_a1111`, `plms_a1111`, `unipc_a1111`) on the
tiny models, txt2img and img2img (`step_rule` a1111 and a1111_fix_steps), eta 0; UniPC with
A1111's default options (`uni_pc_variant` bh1, `uni_pc_skip_type` time_uniform,
`uni_pc_lower_order_final` true, `uni_pc_order` 3, or the case's `uni_pc_order`).

A1111's code runs as written (taken with `ast` by tools/a1111_source.py, not copied):
  modules/sd_samplers_timesteps_impl.py  ddim, plms, unipc, UniPCCFG (the samplers)
  modules/models/diffusion/uni_pc/uni_pc.py  the whole module (NoiseScheduleVP, UniPC), imported
                                         as it is (its progress bar silenced)
  modules/sd_samplers_timesteps.py       CompVisSampler.sample, sample_img2img, get_timesteps
                                         (its timesteps, img2img's noise at timesteps[t_enc] and
                                         the slice), CompVisTimestepsVDenoiser's v -> epsilon
  modules/sd_samplers_common.py          setup_img2img_steps
  modules/torch_utils.py                 float64
on a small stand-in for its model: the diffusers UNet of the tiny model with classifier-free
guidance (`uncond + (cond - uncond) * cond_scale`, A1111's combine_denoised), and
`alphas_cumprod` from the model's scheduler config as diffusers builds it (DDIMScheduler).
The prompt embeddings, the initial noise (one CPU generator per image, seed + i), the init
image's VAE sample and its noise (drawn in that order from the image's generator, as
diffusers' img2img) and the VAE decode are diffusers': only the sampler is A1111's.

Writes, under OUT (default crates/pipeline/tests/fixtures):
  a1111-timestep-samplers.json         cases (the request; A1111's timesteps, t_enc and UNet
                                       evaluations), versions, A1111's digests
  a1111-timestep-samplers.safetensors  image.<case>: [batch, H, W, 3] u8 = round(np * 255);
                                       latents.<case>: A1111's samples (before the VAE)

Usage:
  python tools/make_a1111_timestep_sampler_fixtures.py --a1111 PATH/TO/stable-diffusion-webui
"""

import contextlib
import hashlib
import importlib.util
import inspect
import json
import os
import sys
import types

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import a1111_args, functions  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures")

BASE = dict(model="tiny-a", prompt="a photo of an astronaut riding a horse on mars",
            negative_prompt="blurry, low quality", width=32, height=32, guidance_scale=7.5,
            batch_size=1)
# label: dict of request fields over BASE. Step counts that divide 1000 (steps - 1 updates)
# and that do not (7, 6, 12: steps + 1 timesteps), PLMS's warm-up at the last update (2 steps;
# img2img with t_enc 2), img2img at strength 1 (t_enc = steps - 1), the stretched schedule
# (a1111_fix_steps), a batch, a v-prediction model (tiny-b).
CASES = {
    "ddim.10": dict(scheduler="ddim_a1111", steps=10, seed=31),
    "ddim.7.batch": dict(scheduler="ddim_a1111", steps=7, seed=32, batch_size=2),
    "plms.10": dict(scheduler="plms_a1111", steps=10, seed=33),
    "plms.6": dict(scheduler="plms_a1111", steps=6, seed=34),
    "plms.2": dict(scheduler="plms_a1111", steps=2, seed=35),
    "ddim.8.v": dict(scheduler="ddim_a1111", steps=8, seed=36, model="tiny-b"),
    "plms.8.v": dict(scheduler="plms_a1111", steps=8, seed=37, model="tiny-b"),
    "ddim.10.0.7.img2img": dict(scheduler="ddim_a1111", steps=10, seed=41, strength=0.7),
    "ddim.8.1.0.img2img": dict(scheduler="ddim_a1111", steps=8, seed=42, strength=1.0),
    "plms.10.0.75.img2img": dict(scheduler="plms_a1111", steps=10, seed=43, strength=0.75),
    "plms.6.0.99.img2img": dict(scheduler="plms_a1111", steps=6, seed=44, strength=0.99),
    "plms.10.0.25.img2img": dict(scheduler="plms_a1111", steps=10, seed=45, strength=0.25),
    "ddim.6.0.5.fix.img2img": dict(scheduler="ddim_a1111", steps=6, seed=46, strength=0.5,
                                   step_rule="a1111_fix_steps"),
    "plms.4.0.6.fix.img2img": dict(scheduler="plms_a1111", steps=4, seed=47, strength=0.6,
                                   step_rule="a1111_fix_steps"),
    # UniPC runs len(timesteps) steps (8 for 7: 1000 // 7 = 142), img2img t_enc steps from
    # t_start = (timesteps[t_enc - 1] + 1) / 1000. Orders: 10 steps 1,2,3,3,...,2,1; 5 steps
    # 1,2,3,2,1; 3 steps 1,2,1. A1111 asserts `steps >= order`: with fewer steps (2; img2img
    # t_enc 2) it fails, and these cases run its code with `uni_pc_order` lowered to the step
    # count, what `unipc_a1111` does there. The v-prediction cases put a model time on a whole
    # number (666, 333; 376), where float32 decides the alphas_cumprod row of the v -> eps.
    "unipc.10": dict(scheduler="unipc_a1111", steps=10, seed=51),
    "unipc.5": dict(scheduler="unipc_a1111", steps=5, seed=52),
    "unipc.3": dict(scheduler="unipc_a1111", steps=3, seed=53),
    "unipc.7.batch": dict(scheduler="unipc_a1111", steps=7, seed=54, batch_size=2),
    "unipc.2.order2": dict(scheduler="unipc_a1111", steps=2, seed=55, uni_pc_order=2),
    "unipc.8.v": dict(scheduler="unipc_a1111", steps=8, seed=56, model="tiny-b"),
    "unipc.3.v": dict(scheduler="unipc_a1111", steps=3, seed=57, model="tiny-b"),
    "unipc.10.0.7.img2img": dict(scheduler="unipc_a1111", steps=10, seed=61, strength=0.7),
    "unipc.10.0.35.img2img": dict(scheduler="unipc_a1111", steps=10, seed=62, strength=0.35),
    "unipc.10.0.2.order2.img2img": dict(scheduler="unipc_a1111", steps=10, seed=63,
                                        strength=0.2, uni_pc_order=2),
    "unipc.8.0.5.v.img2img": dict(scheduler="unipc_a1111", steps=8, seed=64, strength=0.5,
                                  model="tiny-b"),
    "unipc.6.0.5.fix.img2img": dict(scheduler="unipc_a1111", steps=6, seed=65, strength=0.5,
                                    step_rule="a1111_fix_steps"),
}
INIT_IMAGE = "init-32x32.png"


def to_u8(images_np):
    return torch.from_numpy((images_np * 255).round().astype("uint8"))


class A1111:
    """A1111's sampler functions and CompVisSampler methods, on mocks of its model objects."""

    def __init__(self, checkout):
        mod = os.path.join(checkout, "modules")
        self.opts = types.SimpleNamespace(img2img_fix_steps=False, img2img_extra_noise=0.0,
                                          always_discard_next_to_last_sigma=False,
                                          uni_pc_variant="bh1", uni_pc_skip_type="time_uniform",
                                          uni_pc_order=3, uni_pc_lower_order_final=True)
        tu, d0 = functions(os.path.join(mod, "torch_utils.py"), ["float64"], {"torch": torch})
        common, d1 = functions(os.path.join(mod, "sd_samplers_common.py"),
                               ["setup_img2img_steps"], {"opts": self.opts})
        # A1111 asks for a progress bar (disable=False): a plain range here.
        quiet = types.SimpleNamespace(trange=lambda n, disable=None: range(n))
        uni_pc_path = os.path.join(mod, "models", "diffusion", "uni_pc", "uni_pc.py")
        spec = importlib.util.spec_from_file_location("a1111_uni_pc", uni_pc_path)
        uni_pc = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(uni_pc)
        uni_pc.tqdm = types.SimpleNamespace(tqdm=lambda total=None: contextlib.nullcontext(
            types.SimpleNamespace(update=lambda: None)))
        with open(uni_pc_path, "rb") as f:
            d_uni_pc = {"uni_pc.py": hashlib.sha256(f.read()).hexdigest()}
        impl_ns = {"torch": torch, "tqdm": quiet, "np": np, "float64": tu["float64"],
                   "k_diffusion": types.SimpleNamespace(
                       sampling=types.SimpleNamespace(torch=torch)),
                   "uni_pc": uni_pc, "shared": types.SimpleNamespace(opts=self.opts)}
        impl, d2 = functions(os.path.join(mod, "sd_samplers_timesteps_impl.py"),
                             ["ddim", "plms", "UniPCCFG", "unipc"], impl_ns)
        self.shared = types.SimpleNamespace(sd_model=types.SimpleNamespace(alphas_cumprod=None))
        ns = {"sd_samplers_common": types.SimpleNamespace(
                  setup_img2img_steps=common["setup_img2img_steps"]),
              "opts": self.opts, "shared": self.shared, "inspect": inspect, "torch": torch,
              "ExtraNoiseParams": None, "extra_noise_callback": None,
              "devices": types.SimpleNamespace(device="cpu")}
        ts, d3 = functions(os.path.join(mod, "sd_samplers_timesteps.py"),
                           ["CompVisSampler.sample", "CompVisSampler.sample_img2img",
                            "CompVisSampler.get_timesteps",
                            "CompVisTimestepsVDenoiser.predict_eps_from_z_and_v"], ns)
        self.funcs = {"ddim_a1111": impl["ddim"], "plms_a1111": impl["plms"],
                      "unipc_a1111": impl["unipc"]}
        self.methods = ts
        self.digests = {**d0, **d1, **d2, **d3, **d_uni_pc}

    def run(self, name, unet, alphas_cumprod, v_prediction, x, cond, uncond, cfg_scale, steps,
            *, image=None, strength=None, fix_steps=False, uni_pc_order=3):
        """A1111's txt2img (`x` the noise) or, with `image` (latents), img2img: the samples and
        what A1111 did (timesteps, t_enc, UNet evaluations)."""
        self.opts.img2img_fix_steps = fix_steps
        self.opts.uni_pc_order = uni_pc_order
        self.shared.sd_model.alphas_cumprod = alphas_cumprod
        seen = {"evaluations": 0, "model_times": []}
        predict_eps = self.methods["CompVisTimestepsVDenoiser.predict_eps_from_z_and_v"]
        v_denoiser = types.SimpleNamespace(
            inner_model=types.SimpleNamespace(alphas_cumprod=alphas_cumprod))

        def model(x, t, cond, uncond, cond_scale, image_cond=None, s_min_uncond=0.0):
            seen["evaluations"] += 1
            seen["model_times"].append(float(t[0]))
            n = x.shape[0]
            out = unet(torch.cat([x, x]), torch.cat([t, t]),
                       encoder_hidden_states=torch.cat([uncond, cond])).sample
            if v_prediction:
                out = predict_eps(v_denoiser, torch.cat([x, x]), torch.cat([t, t]), out)
            u, c = out[:n], out[n:]
            return u + (c - u) * cond_scale
        # The CFG denoiser A1111's samplers call: its `inner_model` the timesteps denoiser,
        # whose `inner_model` is the model (`alphas_cumprod`).
        wrap = type("CFGDenoiserTimesteps", (), {"__call__": lambda s, *a, **k: model(*a, **k)})()
        wrap.inner_model = v_denoiser
        func = self.funcs[name]

        def traced(model_, x_, timesteps=None, **kw):
            seen["timesteps"] = [int(t) for t in timesteps]
            return func(model_, x_, timesteps=timesteps, **kw)
        traced.__signature__ = inspect.signature(func)
        me = types.SimpleNamespace(
            config=types.SimpleNamespace(options={}), model_wrap_cfg=wrap, func=traced,
            s_min_uncond=0.0, initialize=lambda p: {}, add_infotext=lambda p: None,
            # UniPCCFG calls its callback after every update (ddim and plms check for None).
            callback_state=lambda d: None)
        me.get_timesteps = lambda p_, n: self.methods["CompVisSampler.get_timesteps"](me, p_, n)

        def launch_sampling(count, run):
            seen["count"] = count
            return run()
        me.launch_sampling = launch_sampling
        p = types.SimpleNamespace(steps=steps, denoising_strength=strength, cfg_scale=cfg_scale,
                                  extra_generation_params={})
        if image is None:
            out = self.methods["CompVisSampler.sample"](me, p, x, cond, uncond)
        else:
            out = self.methods["CompVisSampler.sample_img2img"](me, p, image, x, cond, uncond)
            seen["t_enc"] = seen["count"] - 1
        return out, seen


@torch.no_grad()
def main():
    args = a1111_args(__file__, __doc__, DEFAULT_OUT)
    if args is None:
        return

    import diffusers
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
    from safetensors.torch import save_file

    a1111 = A1111(args.a1111)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    pipes = {}
    init = Image.open(os.path.join(args.out, "images", INIT_IMAGE)).convert("RGB")

    tensors, cases = {}, {}
    for label, over in CASES.items():
        case = dict(BASE, **over)
        if case["model"] not in pipes:
            pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
                os.path.join(args.out, case["model"]), dtype=torch.float32,
                safety_checker=None, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            pipes[case["model"]] = pipe
        pipe = pipes[case["model"]]
        sched = DDIMScheduler.from_config(pipe.scheduler.config)
        v_prediction = sched.config.prediction_type == "v_prediction"
        batch = case["batch_size"]
        cond, uncond = pipe.encode_prompt(case["prompt"], "cpu", batch, True,
                                          case["negative_prompt"])
        gens = [torch.Generator("cpu").manual_seed(case["seed"] + i) for i in range(batch)]
        f = pipe.vae_scale_factor
        shape = (1, pipe.unet.config.in_channels, case["height"] // f, case["width"] // f)
        image = None
        if "strength" in case:
            case.setdefault("step_rule", "a1111")
            case["init_image"] = INIT_IMAGE
            # diffusers' prepare_latents draws the VAE sample, then the noise, per generator.
            caught = {}

            def catch(original, noise, timestep):
                caught["image"], caught["noise"] = original, noise
                return original
            pipe.scheduler.add_noise = catch
            pipe.prepare_latents(pipe.image_processor.preprocess(init), torch.tensor([0]),
                                 1, batch, torch.float32, "cpu", gens)
            del pipe.scheduler.add_noise
            image, x = caught["image"], caught["noise"]
        else:
            x = torch.cat([torch.randn(shape, generator=g) for g in gens])
        samples, seen = a1111.run(case["scheduler"], pipe.unet, sched.alphas_cumprod,
                                  v_prediction, x, cond, uncond, case["guidance_scale"],
                                  case["steps"], image=image, strength=case.get("strength"),
                                  fix_steps=case.get("step_rule") == "a1111_fix_steps",
                                  uni_pc_order=case.get("uni_pc_order", 3))
        decoded = pipe.vae.decode(samples / pipe.vae.config.scaling_factor).sample
        out = to_u8(pipe.image_processor.postprocess(decoded, output_type="np"))
        tensors[f"image.{label}"] = out.contiguous()
        tensors[f"latents.{label}"] = samples.float().contiguous()
        case.update(a1111_timesteps=seen["timesteps"], a1111_t_enc=seen.get("t_enc"),
                    unet_evaluations=seen["evaluations"], model_times=seen["model_times"])
        cases[label] = case
        print(f"{label}: timesteps {seen['timesteps']}, t_enc {seen.get('t_enc')}, "
              f"{seen['evaluations']} UNet evaluations")

    meta = {
        "generated_by": "tools/make_a1111_timestep_sampler_fixtures.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "a1111_sources": {k: f"sha256 {v}" for k, v in a1111.digests.items()},
        "images": "image.<case>: [batch, H, W, 3] u8 = round(output_type='np' * 255)",
        "latents": "latents.<case>: [batch, C, h, w] f32, the sampler's result",
        "cases": cases,
    }
    with open(os.path.join(args.out, "a1111-timestep-samplers.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    save_file(tensors, os.path.join(args.out, "a1111-timestep-samplers.safetensors"))
    print(f"wrote a1111-timestep-samplers.* ({len(cases)} cases)")


if __name__ == "__main__":
    main()
