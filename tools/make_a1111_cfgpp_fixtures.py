#!/usr/bin/env python3
"""A1111 1.10's `DDIM CFG++` sampler (our `ddim_cfgpp`) on the tiny model: txt2img and img2img
(A1111's rule at strength 0.6), eta 0 and above (the request's `eta`, or the `eta_ddim` option), a
batch of two, and `s_min_uncond` skipping the negative prompt.

A1111's code runs as written (taken with `ast` by tools/a1111_source.py, not copied):
  modules/sd_samplers_timesteps_impl.py  ddim_cfgpp (sets the CFG denoiser's
                                         cond_scale_miltiplier = 1 / 12.5 and
                                         need_last_noise_uncond, steps along last_noise_uncond)
  modules/sd_samplers_timesteps.py       CompVisSampler (sample, sample_img2img, get_timesteps),
                                         CFGDenoiserTimesteps, CompVisTimestepsDenoiser
  modules/sd_samplers_cfg_denoiser.py    CFGDenoiser (the guidance, the multiplier, the
                                         unconditional rows kept, s_min_uncond's skips and
                                         their fake_uncond), catenate_conds, subscript_cond
  modules/sd_samplers_common.py          Sampler (initialize: eta from the request or
                                         `eta_ddim`, infotext `Eta DDIM`; launch_sampling),
                                         SamplerData, TorchHijack, setup_img2img_steps
  modules/processing.py                  StableDiffusionProcessing.fill_fields_from_opts
  modules/torch_utils.py                 float64
A1111's model is a stand-in: `apply_model` is the tiny diffusers UNet (epsilon) and
`alphas_cumprod` the model's scheduler config's, as diffusers' DDIMScheduler builds it. The
prompt embeddings, the initial noise (one CPU generator per image, seed + i), the init image's
VAE sample and its noise (drawn in that order from the image's generator, as diffusers' img2img)
and the VAE decode are diffusers'; every later `randn_like` (DDIM's noise at each update, eta 0
included) comes from the images' generators in order (A1111's ImageRNG).

Writes, under OUT (default crates/pipeline/tests/fixtures):
  a1111-cfgpp.json         cases (request, options, the native request of the effective
                           values, each UNet call's timestep, the calls that skipped the
                           negative prompt, the infotext entries), versions, A1111's digests
  a1111-cfgpp.safetensors  image.<case>: [batch, H, W, 3] u8 = round(np * 255)

Usage:
  python tools/make_a1111_cfgpp_fixtures.py --a1111 PATH/TO/stable-diffusion-webui
"""

import collections
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
INIT_IMAGE = "init-32x32.png"

BASE = dict(model="tiny-a", prompt="a photo of an astronaut riding a horse on mars",
            negative_prompt="blurry, low quality", width=32, height=32, guidance_scale=7.5,
            batch_size=1, request={}, options={})
# s_min_uncond compares the timestep on A1111's timestep samplers: 450 skips the odd calls
# below it (at 401 and 201).
CASES = {
    "cfgpp.10": dict(steps=10, seed=301),
    "cfgpp.8.batch": dict(steps=8, seed=302, batch_size=2),
    "cfgpp.10.eta": dict(steps=10, seed=303, request=dict(eta=0.7)),
    "cfgpp.7.eta.option.batch": dict(steps=7, seed=304, batch_size=2,
                                     options=dict(eta_ddim=0.5)),
    "cfgpp.10.img2img": dict(steps=10, seed=305, strength=0.6),
    "cfgpp.10.img2img.eta.batch": dict(steps=10, seed=306, strength=0.6, batch_size=2,
                                       request=dict(eta=1.0)),
    "cfgpp.10.ngms": dict(steps=10, seed=307, request=dict(s_min_uncond=450.0)),
}
# shared_options.py's defaults of the options read here.
OPTION_DEFAULTS = dict(eta_ddim=0.0, s_churn=0.0, s_tmin=0.0, s_tmax=0.0, s_noise=1.0,
                       s_min_uncond=0.0, s_min_uncond_all=False, skip_early_cond=0.0,
                       pad_cond_uncond=False, pad_cond_uncond_v0=False, batch_cond_uncond=True,
                       live_preview_content="Prompt", img2img_fix_steps=False,
                       img2img_extra_noise=0.0, always_discard_next_to_last_sigma=False)


class Params:
    """The few script_callbacks parameter objects: they hold what they are given."""

    def __init__(self, x, *rest):
        self.x = x
        if len(rest) >= 6:
            (self.image_cond, self.sigma, _, _, self.text_cond, self.text_uncond) = rest[:6]


def load_sources(a1111_dir, samplers=("ddim_cfgpp",), impl_namespace=None, denoisers=()):
    """A1111's functions from a checkout: `samplers` are the sd_samplers_timesteps_impl.py
    functions to take (make_a1111_skip_early_fixtures.py takes `ddim`), with `impl_namespace`
    added to their globals (UniPC's `uni_pc` module); `denoisers` more sd_samplers_timesteps.py
    classes (CompVisTimestepsVDenoiser for a v-prediction model)."""
    mod = os.path.join(a1111_dir, "modules")
    digests = {}
    opts = types.SimpleNamespace(**OPTION_DEFAULTS)
    state = types.SimpleNamespace(interrupted=False, skipped=False, sampling_step=0,
                                  sampling_steps=0)
    sd_model = types.SimpleNamespace(
        alphas_cumprod=None, parameterization="eps", cond_stage_key="crossattn",
        model=types.SimpleNamespace(conditioning_key="crossattn"), apply_model=None)
    shared = types.SimpleNamespace(opts=opts, state=state, sd_model=sd_model,
                                   total_tqdm=types.SimpleNamespace(update=lambda: None))
    # One `k_diffusion.sampling` for Sampler.initialize (which puts its TorchHijack there) and
    # the sampler (which draws randn_like from it).
    k_sampling = types.SimpleNamespace(torch=torch)
    k_diffusion = types.SimpleNamespace(sampling=k_sampling)

    tu, d = functions(os.path.join(mod, "torch_utils.py"), ["float64"], {"torch": torch})
    digests.update(d)
    quiet = types.SimpleNamespace(trange=lambda n, disable=None: range(n))
    impl, d = functions(os.path.join(mod, "sd_samplers_timesteps_impl.py"), list(samplers),
                        {"torch": torch, "tqdm": quiet, "np": np, "float64": tu["float64"],
                         "k_diffusion": k_diffusion, "shared": shared,
                         **(impl_namespace or {})})
    digests.update(d)
    common_ns = {"torch": torch, "inspect": inspect, "opts": opts, "shared": shared,
                 "state": state, "k_diffusion": k_diffusion,
                 "SamplerDataTuple": collections.namedtuple(
                     "SamplerData", ["name", "constructor", "aliases", "options"])}
    common, d = functions(os.path.join(mod, "sd_samplers_common.py"),
                          ["InterruptedException", "SamplerData", "setup_img2img_steps",
                           "TorchHijack", "Sampler"], common_ns)
    digests.update(d)
    proc, d = functions(os.path.join(mod, "processing.py"),
                        ["StableDiffusionProcessing.fill_fields_from_opts"], {"opts": opts})
    digests.update(d)
    samplers_common = types.SimpleNamespace(
        InterruptedException=common["InterruptedException"],
        apply_refiner=lambda denoiser, sigma: False, store_latent=lambda latent: None,
        Sampler=common["Sampler"], setup_img2img_steps=common["setup_img2img_steps"])
    cfg_ns = {"torch": torch, "shared": shared, "opts": opts, "state": state,
              "sd_samplers_common": samplers_common,
              "prompt_parser": types.SimpleNamespace(
                  reconstruct_multicond_batch=lambda c, step: (
                      [[(i, 1.0)] for i in range(c.shape[0])], c),
                  reconstruct_cond_batch=lambda u, step: u),
              "CFGDenoiserParams": Params, "CFGDenoisedParams": Params,
              "AfterCFGCallbackParams": Params,
              "cfg_denoiser_callback": lambda p: None, "cfg_denoised_callback": lambda p: None,
              "cfg_after_cfg_callback": lambda p: None}
    cfg, d = functions(os.path.join(mod, "sd_samplers_cfg_denoiser.py"),
                       ["catenate_conds", "subscript_cond", "CFGDenoiser"], cfg_ns)
    digests.update(d)
    ts_ns = {"torch": torch, "inspect": inspect, "shared": shared, "opts": opts,
             "devices": types.SimpleNamespace(device="cpu"),
             "sd_samplers_common": samplers_common, "CFGDenoiser": cfg["CFGDenoiser"],
             "ExtraNoiseParams": None, "extra_noise_callback": None}
    ts, d = functions(os.path.join(mod, "sd_samplers_timesteps.py"),
                      ["CompVisTimestepsDenoiser", *denoisers, "CFGDenoiserTimesteps",
                       "CompVisSampler"],
                      ts_ns)
    digests.update(d)
    return dict(impl=impl, opts=opts, shared=shared, SamplerData=common["SamplerData"],
                CFGDenoiserTimesteps=ts["CFGDenoiserTimesteps"],
                fill=proc["StableDiffusionProcessing.fill_fields_from_opts"],
                CompVisSampler=ts["CompVisSampler"]), digests


@torch.no_grad()
def run(pipe, src, case, x, image, gens):
    opts, sd_model = src["opts"], src["shared"].sd_model
    for key, value in OPTION_DEFAULTS.items():
        setattr(opts, key, case["options"].get(key, value))
    batch = case["batch_size"]
    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    sd_model.alphas_cumprod = sched.alphas_cumprod
    calls = []

    def apply_model(x_in, t, cond):
        calls.append((float(t[0]), x_in.shape[0]))
        return pipe.unet(x_in, t, encoder_hidden_states=cond["c_crossattn"][0]).sample
    sd_model.apply_model = apply_model
    cond, uncond = pipe.encode_prompt(case["prompt"], "cpu", batch, True, case["negative_prompt"])
    shape = x.shape[1:]

    class Rng:
        def next(self):
            return torch.stack([torch.randn(shape, generator=g) for g in gens])

    req = case["request"]
    p = types.SimpleNamespace(
        steps=case["steps"], denoising_strength=case.get("strength"),
        cfg_scale=case["guidance_scale"], eta=req.get("eta"), rng=Rng(),
        extra_generation_params={}, scripts=None,
        **{f: req.get(f) for f in ("s_min_uncond", "s_churn", "s_tmin", "s_tmax", "s_noise")})
    src["fill"](p)
    # A1111's name and alias of the case's sampler (DDIM CFG++ unless the case says).
    name, alias = case.get("a1111_sampler", ("DDIM CFG++", "ddim_cfgpp"))
    sampler = src["CompVisSampler"](src["impl"][alias], sd_model)
    sampler.config = src["SamplerData"](name, None, [alias], {})
    sampler.add_infotext = lambda p: None
    image_cond = torch.zeros(batch, 5, 1, 1)
    if image is None:
        out = sampler.sample(p, x, cond, uncond, image_conditioning=image_cond)
    else:
        out = sampler.sample_img2img(p, image, x, cond, uncond, image_conditioning=image_cond)
    decoded = pipe.vae.decode(out / pipe.vae.config.scaling_factor).sample
    images = pipe.image_processor.postprocess(decoded, output_type="np")
    record = dict(evaluation_timesteps=[t for t, _ in calls],
                  skipped_evaluations=[i for i, (_, rows) in enumerate(calls) if rows == batch],
                  infotext=dict(p.extra_generation_params),
                  native=dict(scheduler="ddim_cfgpp", eta=sampler.eta,
                              negative_guidance_min_sigma=p.s_min_uncond,
                              negative_guidance_all_steps=opts.s_min_uncond_all))
    return torch.from_numpy((images * 255).round().astype("uint8")), record


@torch.no_grad()
def main(stem="a1111-cfgpp", which=None, samplers=("ddim_cfgpp",), script=__file__,
         doc=__doc__, a1111="v1.10"):
    """Runs `which` (default CASES) and writes `<stem>.json` and `<stem>.safetensors`; `samplers`
    and the rest as load_sources and a1111_args take them
    (make_a1111_cfgpp_scale_fixtures.py writes its own cases this way)."""
    args = a1111_args(script, doc, DEFAULT_OUT)
    if args is None:
        return
    import diffusers
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
    from safetensors.torch import save_file

    src, digests = load_sources(args.a1111, samplers)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    init = Image.open(os.path.join(args.out, "images", INIT_IMAGE)).convert("RGB")
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        os.path.join(args.out, BASE["model"]), dtype=torch.float32, safety_checker=None,
        requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    tensors, cases = {}, {}
    for label, over in (CASES if which is None else which).items():
        case = dict(BASE, **over)
        batch = case["batch_size"]
        gens = [torch.Generator("cpu").manual_seed(case["seed"] + i) for i in range(batch)]
        f = pipe.vae_scale_factor
        shape = (1, pipe.unet.config.in_channels, case["height"] // f, case["width"] // f)
        image = None
        if "strength" in case:
            case.update(step_rule="a1111", init_image=INIT_IMAGE)
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
        images, record = run(pipe, src, case, x, image, gens)
        case.update(record)
        tensors[f"image.{label}"] = images.contiguous()
        cases[label] = case
        print(f"{label}: {len(record['evaluation_timesteps'])} calls "
              f"{record['evaluation_timesteps']}, skipped {record['skipped_evaluations']}, "
              f"infotext {record['infotext']}, mean {images.float().mean():.2f}")
    meta = {
        "generated_by": "tools/" + os.path.basename(script),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "a1111": a1111},
        "sources": {key: f"sha256 {v}" for key, v in digests.items()},
        "images": "image.<case>: [batch, H, W, 3] u8 = round(output_type='np' * 255)",
        "cases": cases,
    }
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    save_file(tensors, os.path.join(args.out, f"{stem}.safetensors"))
    print(f"wrote {stem}.* ({len(cases)} cases)")


if __name__ == "__main__":
    main()
