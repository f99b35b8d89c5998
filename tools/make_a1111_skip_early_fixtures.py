#!/usr/bin/env python3
"""A1111 1.10's "Skip Early CFG" (option `skip_early_cond`, our `negative_guidance_skip_early`)
on the tiny model: which UNet calls skip the negative prompt, and the images, for Euler a (first
order), Heun (second order: A1111 counts `steps * 2`), DDIM (a timestep sampler), txt2img and
img2img (A1111's rule at strength 0.6), a batch of two, and with `s_min_uncond` beside it.

A1111's code runs as written (taken with `ast` by tools/a1111_source.py, not copied), through
the two scripts this one builds on:
  make_a1111_sampler_params_fixtures.py  k-diffusion's samplers under A1111's CFGDenoiser
                                         (forward: `skip_early_cond != 0 and step / total_steps
                                         <= skip_early_cond` skips the negative prompt, before
                                         and instead of s_min_uncond's rule; infotext `Skip
                                         Early CFG`), Sampler.initialize
  make_a1111_cfgpp_fixtures.py           A1111's DDIM (sd_samplers_timesteps_impl.ddim) through
                                         CompVisSampler.sample / sample_img2img, which call
                                         Sampler.launch_sampling themselves
and here:
  modules/sd_samplers_common.py          SamplerData (total_steps: steps, times 2 for the
                                         samplers whose options say `second_order`),
                                         Sampler.launch_sampling (sets the denoiser's
                                         total_steps), setup_img2img_steps
  modules/sd_samplers_kdiffusion.py      samplers_k_diffusion (each sampler's options)
For k-diffusion, what KDiffusionSampler.sample / sample_img2img add is done here: they call
`launch_sampling(steps, ...)` (txt2img) and `launch_sampling(t_enc + 1, ...)` (img2img, t_enc from
setup_img2img_steps) around the sampler on the sigmas make_a1111_sampler_params_fixtures.py
builds.

Sources: no A1111 v1.10 checkout could be reached when this was first run. It ran on a folder
assembled from the copies that could: sd_samplers_cfg_denoiser.py, sd_samplers_timesteps.py and
torch_utils.py of 1.10 (its CFGDenoiser, CFGDenoiserTimesteps and CompVisSampler differ from the
digests a1111-cfgpp.json recorded from a 1.10 checkout; CFGDenoiser.forward's skip rule is 1.10's),
StableDiffusionProcessing.fill_fields_from_opts (its digest is 1.10's), and an older release's
sd_samplers_common.py (SamplerData, setup_img2img_steps, TorchHijack and InterruptedException
match 1.10's digests; Sampler differs in `conditioning_key` only), sd_samplers_kdiffusion.py and
sd_samplers_timesteps_impl.py (`ddim`). The JSON records each function's digest; rerun it on a
1.10 checkout to compare. On the same folder (with a fork's copy of ddim_cfgpp added, see
make_a1111_cfgpp_scale_fixtures.py), make_a1111_cfgpp_fixtures.py's own cases come out as the
committed a1111-cfgpp images, which a 1.10 checkout made: 5 of 7 identical, 2 within 1.

Writes, under OUT (default crates/pipeline/tests/fixtures):
  a1111-skip-early.json         cases (request, options, the native request, each UNet call's
                                sigma or timestep, the calls that skipped the negative prompt,
                                A1111's total_steps, the infotext entries), versions, digests
  a1111-skip-early.safetensors  image.<case>: [batch, H, W, 3] u8 = round(np * 255)

Usage:
  pip install --no-deps k-diffusion==0.1.1.post1
  python tools/make_a1111_skip_early_fixtures.py --a1111 PATH/TO/stable-diffusion-webui
"""

import ast
import collections
import functools
import json
import os
import sys
import types

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_a1111_cfgpp_fixtures as cfgpp  # noqa: E402
import make_a1111_sampler_params_fixtures as kparams  # noqa: E402
from a1111_source import a1111_args, functions  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures")
INIT_IMAGE = "init-32x32.png"

BASE = dict(model="tiny-a", prompt="a photo of an astronaut riding a horse on mars",
            negative_prompt="blurry, low quality", width=32, height=32, guidance_scale=7.5,
            batch_size=1, request={}, options={})
# Euler a at 10 steps: calls 0..3 skip at 0.3 (3 / 10 <= 0.3). Heun at 8 steps counts 16:
# 0.25 skips calls 0..4 of its 15. img2img at 0.6 of 10 steps counts t_enc + 1 = 7. The tiny
# model's Heun sigmas fall below 2 after the first third: s_min_uncond skips odd calls there.
CASES = {
    "euler_a.skip": dict(sampler="Euler a", steps=10, seed=401,
                         options=dict(skip_early_cond=0.3)),
    "heun.skip": dict(sampler="Heun", steps=8, seed=402, options=dict(skip_early_cond=0.25)),
    "euler_a.skip.img2img": dict(sampler="Euler a", steps=10, seed=403, strength=0.6,
                                 options=dict(skip_early_cond=0.5)),
    "heun.skip.ngms.batch": dict(sampler="Heun", steps=8, seed=404, batch_size=2,
                                 request=dict(s_min_uncond=2.0),
                                 options=dict(skip_early_cond=0.2)),
    "heun.skip.img2img": dict(sampler="Heun", steps=6, seed=405, strength=0.6,
                              options=dict(skip_early_cond=0.4)),
    "ddim.skip": dict(sampler="DDIM", steps=10, seed=406, options=dict(skip_early_cond=0.35)),
    "ddim.skip.img2img.ngms": dict(sampler="DDIM", steps=10, seed=407, strength=0.6,
                                   request=dict(s_min_uncond=450.0),
                                   options=dict(skip_early_cond=0.3)),
}


def load_k(a1111_dir, k_dir):
    """make_a1111_sampler_params_fixtures.py's sources, with SamplerData, setup_img2img_steps
    and the k-diffusion samplers' options."""
    src, digests = kparams.load_sources(a1111_dir, k_dir)
    src["opts"].img2img_fix_steps = False  # shared_options.py's default
    mod = os.path.join(a1111_dir, "modules")
    ns = {"SamplerDataTuple": collections.namedtuple(
        "SamplerData", ["name", "constructor", "aliases", "options"]), "opts": src["opts"]}
    common, d = functions(os.path.join(mod, "sd_samplers_common.py"),
                          ["SamplerData", "setup_img2img_steps"], ns)
    digests.update(d)
    with open(os.path.join(mod, "sd_samplers_kdiffusion.py")) as f:
        tree = ast.parse(f.read())
    (table,) = [n.value for n in tree.body if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", None) == "samplers_k_diffusion"]
    options = {}
    for entry in table.elts:
        try:
            label, _, _, opts = ast.literal_eval(entry)
        except ValueError:  # Restart names a function: not one of ours here
            continue
        options.setdefault(label, opts)
    src.update(SamplerData=common["SamplerData"], steps=common["setup_img2img_steps"],
               options=options)
    return src, digests


def run_k(pipe, src, case, x, image, gens):
    """make_a1111_sampler_params_fixtures.run with the sampler launched as KDiffusionSampler
    launches it (total_steps set)."""
    funcname = kparams.SAMPLERS[case["sampler"]][0]
    real = src["k"][funcname]
    p = types.SimpleNamespace(steps=case["steps"], denoising_strength=case.get("strength"))
    run_steps = case["steps"] if image is None else src["steps"](p)[1] + 1
    seen = {}

    @functools.wraps(real)
    def launched(denoiser, *args, **kw):
        sampler = denoiser.sampler
        sampler.config = src["SamplerData"](case["sampler"], None, [],
                                            src["options"][case["sampler"]])
        out = sampler.launch_sampling(run_steps, lambda: real(denoiser, *args, **kw))
        seen["total_steps"] = denoiser.total_steps
        return out

    k = dict(src["k"], **{funcname: launched})
    images, record = kparams.run(pipe, dict(src, k=k), case, x, image, gens)
    record["total_steps"] = seen["total_steps"]
    record["native"] = kparams.native_request(case, record)
    return images, record


def run_ddim(pipe, src, case, x, image, gens):
    """make_a1111_cfgpp_fixtures.run on A1111's DDIM."""
    case = dict(case, a1111_sampler=("DDIM", "ddim"))
    seen = {}
    launch = src["CompVisSampler"].launch_sampling

    def launching(self, steps, func):
        self.model_wrap_cfg.total_steps = None
        out = launch(self, steps, func)
        seen["total_steps"] = self.model_wrap_cfg.total_steps
        return out

    src["CompVisSampler"].launch_sampling = launching
    try:
        images, record = cfgpp.run(pipe, src, case, x, image, gens)
    finally:
        src["CompVisSampler"].launch_sampling = launch
    record["total_steps"] = seen["total_steps"]
    record["native"]["scheduler"] = "ddim_a1111"
    record["native"].pop("eta")
    return images, record


def start(pipe, case, init, gens):
    """The starting noise and (img2img) the init image's latents, as both scripts draw them."""
    batch = case["batch_size"]
    f = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, case["height"] // f, case["width"] // f)
    if "strength" not in case:
        return torch.cat([torch.randn(shape, generator=g) for g in gens]), None
    case.update(step_rule="a1111", init_image=INIT_IMAGE)
    caught = {}

    def catch(original, noise, timestep):
        caught["image"], caught["noise"] = original, noise
        return original
    pipe.scheduler.add_noise = catch
    pipe.prepare_latents(pipe.image_processor.preprocess(init), torch.tensor([0]), 1, batch,
                         torch.float32, "cpu", gens)
    del pipe.scheduler.add_noise
    return caught["noise"], caught["image"]


@torch.no_grad()
def main(stem="a1111-skip-early", which=None, script=__file__, doc=__doc__):
    """Runs `which` (default CASES) and writes OUT/<stem>.json and .safetensors; `script` (and
    its `doc`) is the script that calls it."""
    args = a1111_args(script, doc, DEFAULT_OUT)
    if args is None:
        return
    k_dir = kparams.k_diffusion_path()
    if k_dir is None:
        print("make_a1111_skip_early_fixtures.py: skipped (pip install --no-deps "
              "k-diffusion==0.1.1.post1)")
        return
    import diffusers
    from diffusers import StableDiffusionImg2ImgPipeline
    from safetensors.torch import save_file

    k_src, digests = load_k(args.a1111, k_dir)
    ddim_src, d = cfgpp.load_sources(args.a1111, samplers=("ddim",))
    digests.update(d)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    init = Image.open(os.path.join(args.out, "images", INIT_IMAGE)).convert("RGB")
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        os.path.join(args.out, BASE["model"]), dtype=torch.float32, safety_checker=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    tensors, cases = {}, {}
    for label, over in (CASES if which is None else which).items():
        case = dict(BASE, **over)
        gens = [torch.Generator("cpu").manual_seed(case["seed"] + i)
                for i in range(case["batch_size"])]
        x, image = start(pipe, case, init, gens)
        if case["sampler"] == "DDIM":
            images, record = run_ddim(pipe, ddim_src, case, x, image, gens)
        else:
            images, record = run_k(pipe, k_src, case, x, image, gens)
        record["native"]["negative_guidance_skip_early"] = case["options"].get(
            "skip_early_cond", 0.0)
        case.update(record)
        tensors[f"image.{label}"] = images.contiguous()
        cases[label] = case
        calls = record.get("evaluation_sigmas", record.get("evaluation_timesteps"))
        print(f"{label}: {len(calls)} calls of total_steps {record['total_steps']}, skipped "
              f"{record['skipped_evaluations']}, infotext {record['infotext']}, "
              f"mean {images.float().mean():.2f}")
    meta = {
        "generated_by": f"tools/{os.path.basename(script)}",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "k_diffusion": "0.1.1.post1",
                     "a1111": "v1.10 CFGDenoiser; see the script's docstring for the sources"},
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
