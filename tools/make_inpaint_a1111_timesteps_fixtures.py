#!/usr/bin/env python3
"""A1111 1.10's inpainting blend on its timestep samplers (DDIM, PLMS, DDIM CFG++, UniPC: our
`ddim_a1111`, `plms_a1111`, `ddim_cfgpp`, `unipc_a1111`) on the tiny models, for
tests/integration/a1111_inpaint_timesteps.rs.

Their CFG denoiser (`CFGDenoiserTimesteps`, `mask_before_denoising = True`) blends the model's
input with the clean init latents before every evaluation (`x * nmask + init_latent * mask`,
`CFGDenoiser.forward`'s apply_blend) and leaves the prediction alone; the sampler steps from
its own x. The k-diffusion samplers blend the prediction of the clean latents instead, which
is what the pipeline did on every scheduler before (make_inpaint_a1111_fixtures.py).

A1111's code runs as written (taken with `ast` by tools/a1111_source.py through
make_a1111_cfgpp_fixtures.load_sources, not copied):
  modules/sd_samplers_cfg_denoiser.py    CFGDenoiser (forward: the blend before denoising)
  modules/sd_samplers_timesteps.py       CFGDenoiserTimesteps, CompVisTimestepsDenoiser,
                                         CompVisTimestepsVDenoiser, CompVisSampler
                                         (sample_img2img: init_latent = the clean latents)
  modules/sd_samplers_common.py          Sampler (initialize: the denoiser's mask and nmask
                                         from p), setup_img2img_steps, ...
  modules/sd_samplers_timesteps_impl.py  ddim, plms, ddim_cfgpp, UniPCCFG, unipc
  modules/models/diffusion/uni_pc/uni_pc.py  imported whole
What `init` makes of the image and mask is A1111's too, read from a1111-inpaint.safetensors
(make_inpaint_a1111_fixtures.py ran StableDiffusionProcessingImg2Img.init on the same init
image, mask and options): each case names the case whose processed image (`image.`), latent
mask (`latmask.`, 1 = repaint) and overlay (`overlay.`) it takes. Then, as processing.py does
and written out here (its functions are not reachable alone): the init latents are the
processed image's VAE sample (from each image's generator, then that generator's starting
noise, the pipeline's draw order), "latent nothing" multiplies them by the mask (`init`),
`mask = 1 - latmask` over the latent channels, the samples are blended once more after
sampling (`samples * nmask + init_latent * mask`, StableDiffusionProcessingImg2Img.sample),
decoded (diffusers' VAE, `round(x * 255)`) and composited under the overlay (apply_overlay
without paste_to: `alpha_composite`).

Beside A1111's images each case keeps `x0_blend.<case>`: the same sampler with no mask set
and the x0 blend instead (the prediction's clean latents at the evaluation's alphas_cumprod,
`get_pred_x0`, mixed with the init latents and turned back into epsilon; CFG++'s unconditional
prediction unblended), what the pipeline ran on these samplers before.

Sources: no A1111 v1.10 checkout could be reached (its snapshot is over the fetch limit).
This ran on the folder make_a1111_skip_early_fixtures.py describes (1.10's
sd_samplers_cfg_denoiser.py, sd_samplers_timesteps.py and torch_utils.py; an older release's
sd_samplers_common.py and sd_samplers_timesteps_impl.py with a fork's ddim_cfgpp) plus an
older release's uni_pc.py; the JSON records each function's digest (ddim, plms, UniPCCFG,
unipc and uni_pc.py as a1111-timestep-samplers.json records them: rerun on a 1.10 checkout to
compare).

Writes, under OUT (default crates/pipeline/tests/fixtures):
  a1111-inpaint-timesteps.json         cases (the a1111-inpaint case's request with the
                                       sampler's scheduler, steps, strength and seed; the case
                                       it takes init's outputs from; UNet evaluations),
                                       versions, digests
  a1111-inpaint-timesteps.safetensors  result.<case>, x0_blend.<case>: [n, H, W, 3] u8

Usage:
  python tools/make_inpaint_a1111_timesteps_fixtures.py --a1111 PATH/TO/stable-diffusion-webui
"""

import hashlib
import importlib.util
import contextlib
import json
import os
import sys
import types

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import a1111_args  # noqa: E402
from make_a1111_cfgpp_fixtures import OPTION_DEFAULTS, load_sources  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures")
STEM = "a1111-inpaint-timesteps"
# A1111's names and aliases (sd_samplers_timesteps.samplers_data_timesteps).
SAMPLERS = {"ddim_a1111": ("DDIM", "ddim"), "plms_a1111": ("PLMS", "plms"),
            "ddim_cfgpp": ("DDIM CFG++", "ddim_cfgpp"), "unipc_a1111": ("UniPC", "unipc")}
# shared_options.py's UniPC defaults.
UNI_PC_OPTIONS = dict(uni_pc_variant="bh1", uni_pc_skip_type="time_uniform", uni_pc_order=3,
                      uni_pc_lower_order_final=True)
# label: (the a1111-inpaint case whose init outputs it takes, what differs from its request).
CASES = {
    "ddim.blur4": ("whole.euler.blur4",
                   dict(scheduler="ddim_a1111", steps=10, strength=0.75, seed=42)),
    "plms.invert.batch": ("whole.ddim.invert.batch",
                          dict(scheduler="plms_a1111", steps=10, strength=0.6, seed=7)),
    "cfgpp.fill": ("whole.fill.euler.blur4",
                   dict(scheduler="ddim_cfgpp", steps=10, strength=0.9, seed=8)),
    "unipc.blur4": ("whole.euler.blur4",
                    dict(scheduler="unipc_a1111", steps=8, strength=0.7, seed=5)),
    # v-prediction (tiny-b): the v -> epsilon on the blended input.
    "unipc.vpred.blurxy": ("whole.vpred.dpmpp_2m.blurxy",
                           dict(scheduler="unipc_a1111", steps=10, strength=0.8, seed=61)),
    "ddim.latent_nothing.vpred.batch": ("whole.latent_nothing.vpred.ddim",
                                        dict(scheduler="ddim_a1111", steps=8, strength=1.0,
                                             seed=13)),
    "plms.vpred.blurxy": ("whole.vpred.dpmpp_2m.blurxy",
                          dict(scheduler="plms_a1111", steps=8, strength=0.7, seed=62)),
}


def uni_pc_module(a1111_dir):
    """A1111's uni_pc.py imported whole (its progress bar silenced), and its digest."""
    path = os.path.join(a1111_dir, "modules", "models", "diffusion", "uni_pc", "uni_pc.py")
    spec = importlib.util.spec_from_file_location("a1111_uni_pc", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.tqdm = types.SimpleNamespace(tqdm=lambda total=None: contextlib.nullcontext(
        types.SimpleNamespace(update=lambda: None)))
    with open(path, "rb") as f:
        return module, hashlib.sha256(f.read()).hexdigest()


def x0_blend_denoiser(base):
    """The CFG denoiser with the x0 blend after it (the pipeline's former blend): `base`'s
    epsilon, its clean latents mixed with the init latents, back to epsilon."""
    class X0Blend(base):
        def forward(self, x, sigma, **kw):
            eps = super().forward(x, sigma, **kw)
            a = self.alphas[sigma.to(dtype=int)][:, None, None, None]
            x0 = self.get_pred_x0(x, eps, sigma)
            blended = x0 * self.blend_nmask + self.init_latent * (1 - self.blend_nmask)
            return (x - a.sqrt() * blended) / (1 - a).sqrt()
    return X0Blend


@torch.no_grad()
def run(pipe, src, case, processed, latmask, overlay, x0_blend):
    """A1111's img2img with the mask: the composited images and the UNet calls."""
    opts, sd_model = src["opts"], src["shared"].sd_model
    for key, value in dict(OPTION_DEFAULTS, **UNI_PC_OPTIONS).items():
        setattr(opts, key, value)
    n = case["batch_size"]
    gens = [torch.Generator("cpu").manual_seed(case["seed"] + i) for i in range(n)]
    vae, sf = pipe.vae, pipe.vae.config.scaling_factor
    image = torch.from_numpy(processed).permute(2, 0, 1)[None].float() / 255.0
    dist = vae.encode(image * 2 - 1).latent_dist
    init_latent, noise = [], []
    for g in gens:
        init_latent.append((dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)) * sf)
        noise.append(torch.randn(dist.mean.shape, generator=g))
    init_latent, noise = torch.cat(init_latent), torch.cat(noise)
    nmask = torch.from_numpy(latmask)[None].expand(init_latent.shape[1], -1, -1)
    mask = 1.0 - nmask
    if case["fill"] == 3:
        init_latent = init_latent * mask
    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    sd_model.alphas_cumprod = sched.alphas_cumprod
    sd_model.sqrt_alphas_cumprod = sched.alphas_cumprod.sqrt()
    sd_model.sqrt_one_minus_alphas_cumprod = (1 - sched.alphas_cumprod).sqrt()
    sd_model.parameterization = "v" if sched.config.prediction_type == "v_prediction" else "eps"
    calls = []

    def apply_model(x_in, t, cond):
        calls.append(float(t[0]))
        return pipe.unet(x_in, t, encoder_hidden_states=cond["c_crossattn"][0]).sample
    sd_model.apply_model = apply_model
    cond, uncond = pipe.encode_prompt(case["prompt"], "cpu", n, True, case["negative_prompt"])

    class Rng:
        def next(self):
            return torch.stack([torch.randn(noise.shape[1:], generator=g) for g in gens])

    p = types.SimpleNamespace(
        steps=case["steps"], denoising_strength=case["strength"],
        cfg_scale=case["guidance_scale"], eta=None, rng=Rng(), extra_generation_params={},
        scripts=None, s_min_uncond=None, s_churn=None, s_tmin=None, s_tmax=None, s_noise=None)
    if not x0_blend:
        p.mask, p.nmask = mask, nmask
    src["fill"](p)
    name, alias = SAMPLERS[case["scheduler"]]
    sampler = src["CompVisSampler"](src["impl"][alias], sd_model)
    if x0_blend:
        sampler.model_wrap_cfg = x0_blend_denoiser(src["CFGDenoiserTimesteps"])(sampler)
        sampler.model_wrap_cfg.blend_nmask = nmask
    sampler.config = src["SamplerData"](name, None, [alias], {})
    sampler.add_infotext = lambda p: None
    image_cond = torch.zeros(n, 5, 1, 1)
    samples = sampler.sample_img2img(p, init_latent, noise, cond, uncond,
                                     image_conditioning=image_cond)
    samples = samples * nmask + init_latent * mask
    decoded = vae.decode(samples / sf).sample
    decoded = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    results = []
    for i in range(n):
        result = Image.fromarray((decoded[i] * 255).round().astype(np.uint8)).convert("RGBA")
        result.alpha_composite(Image.fromarray(overlay, "RGBA"))
        results.append(np.asarray(result.convert("RGB")))
    return torch.from_numpy(np.stack(results)), calls


@torch.no_grad()
def main():
    args = a1111_args(__file__, __doc__, DEFAULT_OUT)
    if args is None:
        return
    import diffusers
    from diffusers import StableDiffusionImg2ImgPipeline
    from safetensors.torch import load_file, save_file

    uni_pc, uni_pc_digest = uni_pc_module(args.a1111)
    # A fork's ddim_cfgpp calls its `_prepare_sampling_parameters`; 1.10's has none.
    with open(os.path.join(args.a1111, "modules", "sd_samplers_timesteps_impl.py")) as f:
        fork = "def _prepare_sampling_parameters(" in f.read()
    samplers = ("ddim", "plms", *(("_prepare_sampling_parameters",) if fork else ()),
                "ddim_cfgpp", "UniPCCFG", "unipc")
    src, digests = load_sources(args.a1111, samplers, {"uni_pc": uni_pc},
                                ("CompVisTimestepsVDenoiser",))
    digests["uni_pc.py"] = uni_pc_digest
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with open(os.path.join(args.out, "a1111-inpaint.json")) as f:
        inpaint_cases = json.load(f)["cases"]
    inits = load_file(os.path.join(args.out, "a1111-inpaint.safetensors"))
    pipes, tensors, cases = {}, {}, {}
    for label, (base, over) in CASES.items():
        case = dict(inpaint_cases[base], **over, init_case=base)
        del case["infotext"], case["timesteps"]
        model = case["model"]
        if model not in pipes:
            pipes[model] = StableDiffusionImg2ImgPipeline.from_pretrained(
                os.path.join(args.out, model), dtype=torch.float32, safety_checker=None,
                requires_safety_checker=False)
        inputs = [inits[f"{k}.{base}"].numpy() for k in ("image", "latmask", "overlay")]
        result, calls = run(pipes[model], src, case, *inputs, x0_blend=False)
        other, _ = run(pipes[model], src, case, *inputs, x0_blend=True)
        tensors[f"result.{label}"] = result.contiguous()
        tensors[f"x0_blend.{label}"] = other.contiguous()
        case["evaluation_timesteps"] = calls
        cases[label] = case
        diff = (result.float() - other.float()).abs()
        print(f"{label}: {len(calls)} calls, mean {result.float().mean():.2f}, "
              f"x0 blend off by {diff.mean():.3f} (max {diff.max():.0f})")
    meta = {
        "generated_by": "tools/" + os.path.basename(__file__),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "a1111": "v1.10 CFGDenoiser; see the script's docstring for the sources"},
        "sources": {key: f"sha256 {v}" for key, v in digests.items()},
        "images": "result.<case>, x0_blend.<case>: [batch, H, W, 3] u8 = round(np * 255)",
        "cases": cases,
    }
    with open(os.path.join(args.out, f"{STEM}.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    save_file(tensors, os.path.join(args.out, f"{STEM}.safetensors"))
    print(f"wrote {STEM}.* ({len(cases)} cases)")


if __name__ == "__main__":
    main()
