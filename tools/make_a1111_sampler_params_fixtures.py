#!/usr/bin/env python3
"""A1111 1.10's sampler parameters on the tiny models: `s_churn`, `s_tmin`, `s_tmax`, `s_noise`
(Euler, Heun, DPM2) and `s_min_uncond` (negative guidance minimum sigma, `s_min_uncond_all`).

A1111's and k-diffusion's code runs as written (taken with `ast` by tools/a1111_source.py, not
copied):
  modules/processing.py            StableDiffusionProcessing.fill_fields_from_opts (the request's
                                   value, else the option's; `s_tmax` 0 is infinity)
  modules/sd_samplers_kdiffusion.py  sampler_extra_params (which k-diffusion functions get them)
  modules/sd_samplers_common.py    Sampler.initialize (the kwargs: a non-default option wins over
                                   the request, and only then writes `Sigma churn` & co. to the
                                   infotext), TorchHijack (randn_like from the images' generators)
  modules/sd_samplers_cfg_denoiser.py  CFGDenoiser.forward (s_min_uncond: on odd calls, or all
                                   with `s_min_uncond_all`, whose sigma is below it, the negative
                                   prompt is skipped and the prompt's prediction taken unguided;
                                   infotext `NGMS`), catenate_conds, subscript_cond
  k_diffusion/sampling.py          sample_euler, sample_heun, sample_dpm_2, sample_euler_ancestral
                                   (0.1.1.post1's wheel), with their helpers
The sampler gets the sigmas of the diffusers class our scheduler is (EulerDiscrete, HeunDiscrete,
KDPM2Discrete, EulerAncestralDiscrete on the model's config: the schedules our A1111 dialect
runs; A1111's own DPM2 drops the next-to-last sigma, which our `dpm2` does not), and the UNet
is A1111's CompVisDenoiser on the tiny UNet (`x + eps * -sigma`, `c_in = 1 / sqrt(sigma^2 + 1)`,
each sigma's timestep the class's own where it is one of the class's evaluation sigmas, else the
class's `_sigma_to_t`), under A1111's CFGDenoiser. Noise: the starting noise from the images'
generators (seed + i), then every `randn_like` (each step's churn noise, drawn whether or not
the step is churned; Euler a's ancestral noise) from them in order (A1111's ImageRNG.next).
img2img (A1111's rule at strength 0.6): the sampler runs on `sigmas[steps - t_enc - 1:]` from
`image + noise * sigma_sched[0]`, the image's VAE sample and noise drawn as diffusers' img2img
draws them (as make_a1111_sampler_fixtures.py). Prompt embeddings and the VAE decode are
diffusers'.

Each case gives the A1111 request fields and options; the script records what A1111 passes the
sampler (`kwargs`), its infotext entries, the sampler's sigma at each UNet call and the calls that
skipped the negative prompt, and the native request those effective values make.

Writes, under OUT (default crates/pipeline/tests/fixtures):
  a1111-sampler-params.json         cases, versions, the sources' digests
  a1111-sampler-params.safetensors  image.<case>: [batch, H, W, 3] u8 = round(np * 255)

Usage:
  pip install --no-deps k-diffusion==0.1.1.post1
  python tools/make_a1111_sampler_params_fixtures.py --a1111 PATH/TO/stable-diffusion-webui
"""

import ast
import importlib.util
import inspect
import json
import math
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
# The tiny model's Euler sigmas at 10 steps run from 14.6 down to 0.03: s_tmin/s_tmax cut
# steps at both ends.
CASES = {
    "euler.churn": dict(sampler="Euler", steps=10, seed=201,
                        request=dict(s_churn=4.0, s_tmin=0.5, s_tmax=5.0)),
    "euler.churn.option.batch": dict(sampler="Euler", steps=10, seed=202, batch_size=2,
                                     request=dict(s_churn=10.0),
                                     options=dict(s_churn=2.0, s_noise=0.9)),
    "heun.churn": dict(sampler="Heun", steps=8, seed=203,
                       request=dict(s_churn=3.0, s_tmin=1.0, s_tmax=10.0)),
    "dpm2.churn": dict(sampler="DPM2", steps=8, seed=204,
                       request=dict(s_churn=2.0, s_noise=0.95)),
    "euler.churn.img2img": dict(sampler="Euler", steps=10, seed=205, strength=0.6,
                                request=dict(s_churn=2.0, s_tmax=0.0)),
    # A1111 passes no s_noise to Euler a: the image is plain Euler a's.
    "euler_a.s_noise": dict(sampler="Euler a", steps=10, seed=206, request=dict(s_noise=0.9)),
    "euler.ngms.batch": dict(sampler="Euler", steps=10, seed=207, batch_size=2,
                             request=dict(s_min_uncond=2.0)),
    "heun.ngms.all": dict(sampler="Heun", steps=8, seed=208,
                          options=dict(s_min_uncond=1.5, s_min_uncond_all=True)),
}
SAMPLERS = {"Euler": ("sample_euler", "euler", "EulerDiscreteScheduler"),
            "Heun": ("sample_heun", "heun", "HeunDiscreteScheduler"),
            "DPM2": ("sample_dpm_2", "dpm2", "KDPM2DiscreteScheduler"),
            "Euler a": ("sample_euler_ancestral", "euler_a", "EulerAncestralDiscreteScheduler")}
# shared_options.py's defaults of the options read here.
OPTION_DEFAULTS = dict(s_churn=0.0, s_tmin=0.0, s_tmax=0.0, s_noise=1.0, s_min_uncond=0.0,
                       s_min_uncond_all=False, eta_ancestral=1.0, skip_early_cond=0.0,
                       pad_cond_uncond=False, pad_cond_uncond_v0=False, batch_cond_uncond=True,
                       live_preview_content="Prompt")


def k_diffusion_path():
    spec = importlib.util.find_spec("k_diffusion")
    return None if spec is None else spec.submodule_search_locations[0]


class Sampling(types.SimpleNamespace):
    """`k_diffusion.sampling` as A1111 sees it: assigning `torch` (its TorchHijack) rebinds the
    name in the namespace the sampling functions run in."""

    def __init__(self, ns):
        super().__init__()
        object.__setattr__(self, "_ns", ns)

    def __setattr__(self, name, value):
        self._ns[name] = value


class Params:
    """The few script_callbacks parameter objects: they hold what they are given."""

    def __init__(self, x, *rest):
        self.x = x
        if len(rest) >= 6:
            (self.image_cond, self.sigma, _, _, self.text_cond, self.text_uncond) = rest[:6]


def load_sources(a1111_dir, k_dir):
    digests = {}
    utils, d = functions(os.path.join(k_dir, "utils.py"), ["append_dims"], {"torch": torch})
    digests.update(d)
    k_ns = {"torch": torch, "math": math, "trange": lambda n, disable=None: range(n),
            "utils": types.SimpleNamespace(append_dims=utils["append_dims"])}
    k, d = functions(os.path.join(k_dir, "sampling.py"), [
        "to_d", "get_ancestral_step", "default_noise_sampler", "sample_euler", "sample_heun",
        "sample_dpm_2", "sample_euler_ancestral"], k_ns)
    digests.update(d)
    sampling = Sampling(k_ns)
    opts = types.SimpleNamespace(**OPTION_DEFAULTS)
    shared = types.SimpleNamespace(opts=opts, sd_model=types.SimpleNamespace(
        cond_stage_key="crossattn", model=types.SimpleNamespace(conditioning_key="crossattn")))
    state = types.SimpleNamespace(interrupted=False, skipped=False, sampling_step=0,
                                  sampling_steps=0)
    common_ns = {"torch": torch, "inspect": inspect, "opts": opts, "shared": shared,
                 "state": state, "SamplerData": None,
                 "k_diffusion": types.SimpleNamespace(sampling=sampling)}
    common, d = functions(os.path.join(a1111_dir, "modules", "sd_samplers_common.py"),
                          ["TorchHijack", "Sampler"], common_ns)
    digests.update(d)
    proc, d = functions(os.path.join(a1111_dir, "modules", "processing.py"),
                        ["StableDiffusionProcessing.fill_fields_from_opts"], {"opts": opts})
    digests.update(d)
    with open(os.path.join(a1111_dir, "modules", "sd_samplers_kdiffusion.py")) as f:
        tree = ast.parse(f.read())
    (extra,) = [ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", None) == "sampler_extra_params"]
    samplers_common = types.SimpleNamespace(
        InterruptedException=RuntimeError, apply_refiner=lambda denoiser, sigma: False,
        store_latent=lambda latent: None)
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
    cfg, d = functions(os.path.join(a1111_dir, "modules", "sd_samplers_cfg_denoiser.py"),
                       ["catenate_conds", "subscript_cond", "CFGDenoiser"], cfg_ns)
    digests.update(d)
    return dict(k=k, opts=opts, Sampler=common["Sampler"],
                fill=proc["StableDiffusionProcessing.fill_fields_from_opts"],
                extra=extra, CFGDenoiser=cfg["CFGDenoiser"]), digests


def class_schedule(pipe, name, steps):
    """The class's sigmas per step (plus the final zero) and its evaluation sigma -> timestep
    table."""
    import diffusers
    sched = getattr(diffusers, name).from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    sig, ts = sched.sigmas.float(), sched.timesteps.float()
    table = {}
    for i in range(len(ts)):
        s = sig[i]
        if name == "KDPM2DiscreteScheduler" and i % 2 == 1:
            s = sched.sigmas_interpol[i]
        table.setdefault(float(s), ts[i])
    ac = sched.alphas_cumprod.numpy()
    log_sigmas = np.log(np.array(((1 - ac) / ac) ** 0.5))
    return torch.unique_consecutive(sig), table, sched, log_sigmas


class Inner:
    """A1111's CompVisDenoiser over the tiny UNet, recording each call's sigma."""

    def __init__(self, pipe, table, sched, log_sigmas):
        self.pipe, self.table, self.sched, self.log_sigmas = pipe, table, sched, log_sigmas
        self.rows = []

    def t_of(self, sigma):
        s = float(sigma)
        if s in self.table:
            return self.table[s]
        t = self.sched._sigma_to_t(np.float64(s), self.log_sigmas)
        return torch.tensor(float(t), dtype=torch.float32)

    def __call__(self, x, sigma, cond):
        self.rows.append(x.shape[0])
        c_in = (1 / (sigma ** 2 + 1) ** 0.5)[:, None, None, None]
        t = torch.stack([self.t_of(s) for s in sigma])
        eps = self.pipe.unet(x * c_in, t, encoder_hidden_states=cond["c_crossattn"][0]).sample
        return x + eps * -sigma[:, None, None, None]


@torch.no_grad()
def run(pipe, src, case, x, image, gens):
    funcname, _, class_name = SAMPLERS[case["sampler"]]
    k, opts = src["k"], src["opts"]
    for key, value in OPTION_DEFAULTS.items():
        setattr(opts, key, case["options"].get(key, value))
    batch, steps = case["batch_size"], case["steps"]
    sigmas, table, sched, log_sigmas = class_schedule(pipe, class_name, steps)
    cond, uncond = pipe.encode_prompt(case["prompt"], "cpu", batch, True, case["negative_prompt"])
    shape = x.shape[1:]

    class Rng:
        def next(self):
            return torch.stack([torch.randn(shape, generator=g) for g in gens])

    p = types.SimpleNamespace(
        eta=None, rng=Rng(), extra_generation_params={}, scripts=None,
        **{f: case["request"].get(f) for f in
           ("s_min_uncond", "s_churn", "s_tmin", "s_tmax", "s_noise")})
    src["fill"](p)
    inner = Inner(pipe, table, sched, log_sigmas)
    seen, skipped = [], []

    class Denoiser(src["CFGDenoiser"]):
        @property
        def inner_model(self):
            return inner

        def forward(self, x, sigma, **kw):
            # A call that skipped the negative prompt ran the UNet on the batch alone.
            seen.append(float(sigma[0]))
            out = super().forward(x, sigma, **kw)
            if inner.rows[-1] == x.shape[0]:
                skipped.append(len(seen) - 1)
            return out

    sampler = src["Sampler"](funcname)
    sampler.func = k[funcname]
    sampler.extra_params = src["extra"].get(funcname, [])
    denoiser = Denoiser(sampler)
    sampler.model_wrap_cfg = denoiser
    kwargs = sampler.initialize(p)
    if image is None:
        start = sigmas
        x = x * sigmas[0]
    else:
        t_enc = int(min(case["strength"], 0.999) * steps)
        start = sigmas[steps - t_enc - 1:]
        x = image + x * start[0]
    sampler.sampler_extra_args = {"cond": cond, "image_cond": torch.zeros(batch, 5, 1, 1),
                                  "uncond": uncond, "cond_scale": case["guidance_scale"],
                                  "s_min_uncond": sampler.s_min_uncond}
    out = k[funcname](denoiser, x, start, extra_args=sampler.sampler_extra_args, disable=True,
                      **kwargs)
    decoded = pipe.vae.decode(out / pipe.vae.config.scaling_factor).sample
    images = pipe.image_processor.postprocess(decoded, output_type="np")
    record = dict(kwargs={key: (None if v == float("inf") else v) for key, v in kwargs.items()},
                  infotext={key: v for key, v in p.extra_generation_params.items()},
                  evaluation_sigmas=seen, skipped_evaluations=skipped,
                  s_min_uncond=p.s_min_uncond, s_min_uncond_all=opts.s_min_uncond_all)
    return torch.from_numpy((images * 255).round().astype("uint8")), record


def native_request(case, record):
    """The native request of the case's effective values."""
    _, scheduler, _ = SAMPLERS[case["sampler"]]
    kw = record["kwargs"]
    native = dict(scheduler=scheduler)
    for a1111, ours in (("s_churn", "sigma_churn"), ("s_tmin", "sigma_tmin"),
                        ("s_tmax", "sigma_tmax"), ("s_noise", "sigma_noise")):
        if a1111 in kw:
            native[ours] = 0.0 if kw[a1111] is None else kw[a1111]
    native["negative_guidance_min_sigma"] = record["s_min_uncond"]
    native["negative_guidance_all_steps"] = record["s_min_uncond_all"]
    return native


@torch.no_grad()
def main():
    args = a1111_args(__file__, __doc__, DEFAULT_OUT)
    if args is None:
        return
    k_dir = k_diffusion_path()
    if k_dir is None:
        print("make_a1111_sampler_params_fixtures.py: skipped (pip install --no-deps "
              "k-diffusion==0.1.1.post1)")
        return
    import diffusers
    from diffusers import StableDiffusionImg2ImgPipeline
    from safetensors.torch import save_file

    src, digests = load_sources(args.a1111, k_dir)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    init = Image.open(os.path.join(args.out, "images", INIT_IMAGE)).convert("RGB")
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        os.path.join(args.out, BASE["model"]), dtype=torch.float32, safety_checker=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    tensors, cases = {}, {}
    for label, over in CASES.items():
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
        case.update(record, native=native_request(case, record))
        tensors[f"image.{label}"] = images.contiguous()
        cases[label] = case
        print(f"{label}: kwargs {record['kwargs']}, infotext {record['infotext']}, "
              f"{len(record['evaluation_sigmas'])} calls, skipped "
              f"{record['skipped_evaluations']}, mean {images.float().mean():.2f}")
    meta = {
        "generated_by": "tools/make_a1111_sampler_params_fixtures.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "k_diffusion": "0.1.1.post1", "a1111": "v1.10.1"},
        "sources": {key: f"sha256 {v}" for key, v in digests.items()},
        "images": "image.<case>: [batch, H, W, 3] u8 = round(output_type='np' * 255)",
        "cases": cases,
    }
    with open(os.path.join(args.out, "a1111-sampler-params.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    save_file(tensors, os.path.join(args.out, "a1111-sampler-params.safetensors"))
    print(f"wrote a1111-sampler-params.* ({len(cases)} cases)")


if __name__ == "__main__":
    main()
