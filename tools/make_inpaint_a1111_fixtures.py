#!/usr/bin/env python3
"""A1111's inpainting on the tiny models: its own preprocessing and overlay around diffusers'
pieces, for the pipeline's `GenerationParams::a1111_inpaint` (tests/integration/a1111_inpaint.rs).

From a checkout of AUTOMATIC1111/stable-diffusion-webui (v1.10.1; taken with `ast`, not copied),
these run as they are:
  modules/processing.py   StableDiffusionProcessingImg2Img.init (mask invert, OpenCV blur,
                          "only masked"'s crop, the overlay image, masked content, the latent
                          mask, the extra generation parameters), create_binary_mask,
                          inpainting_image_conditioning (9-channel models), uncrop,
                          apply_overlay
  modules/masking.py      get_crop_region_v2, expand_crop_region, fill
  modules/images.py       resize_image (no upscaler: Lanczos), flatten
Cases with `resize_mode` 1 and 2 fit image and mask by the mode after the blur; 3 (the latent
upscale) runs `init`'s `interpolate` of the init latents (opt_f: the tiny VAE's factor), without
a mask too (img2img); REFUSED_CASES are what the pipeline refuses, with what A1111 does there (an error, or an
overlay of another size than the result).
with A1111's model calls stubbed by diffusers' pieces on the pipeline's generators (one per
image, seeded seed + i; draw order: the init image's latent sample, the starting noise, then
for a 9-channel UNet the conditioning image's sample). Sampling is diffusers' (the scheduler
by its API name) over A1111 1.10's step rule (its `setup_img2img_steps` and `sample_img2img`
slicing, tools/a1111_steps.py: the whole schedule, `t_enc + 1` steps from the noise level of
step `steps - t_enc - 1`, `set_begin_index` there; strength 1.0 is 0.999) with A1111's
blend (sd_samplers_cfg_denoiser.py: `denoised * nmask + init_latent * mask` after every model
evaluation, `sample`'s same blend after the last step) on the clean latents each scheduler's
output implies; decode as diffusers (`round(x * 255)`), then `apply_overlay`.

Writes, under OUT (default crates/pipeline/tests/fixtures):
  a1111-inpaint/*.png            init images and masks
  a1111-inpaint.safetensors      blur.<case>: A1111's blurred L mask (cv2.GaussianBlur)
                                 image.<case>, mask.<case>: init's processed image and
                                 image_mask (RGB) at the processing size; latmask.<case>;
                                 overlay.<case>: the RGBA overlay; result.<case>: [n, H, W, 3]
  a1111-inpaint.json             cases, failing cases, blur cases, infotext parameters,
                                 paste_to, versions

Usage:
  python tools/make_inpaint_a1111_fixtures.py --a1111 PATH/TO/stable-diffusion-webui [--out DIR]
"""

import hashlib
import inspect
import json
import logging
import math
import os
import sys
import types

import cv2
import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import a1111_args, functions  # noqa: E402
from a1111_steps import A1111Steps, first_index_of_step  # noqa: E402
from api_schedulers import make_scheduler  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures")


def a1111(checkout):
    """A1111's functions, executed from the checkout, and their sources' digests."""
    mod = os.path.join(checkout, "modules")
    opts = types.SimpleNamespace(upscaler_for_img2img=None, img2img_color_correction=False,
                                 save_init_img=False, img2img_background_color="#ffffff",
                                 sd_vae_encode_method="Full", inpainting_mask_weight=1.0)
    shared = types.SimpleNamespace(opts=opts, device=torch.device("cpu"), sd_upscalers=[],
                                   sd_model=types.SimpleNamespace(cond_stage_key="txt"))
    base = {"Image": Image, "ImageFilter": ImageFilter, "ImageOps": ImageOps, "np": np,
            "cv2": cv2, "torch": torch, "LANCZOS": Image.Resampling.LANCZOS, "opts": opts,
            "shared": shared, "logging": logging, "hashlib": hashlib}
    digests = {}
    masking_fns, d = functions(os.path.join(mod, "masking.py"),
                               ["get_crop_region_v2", "expand_crop_region", "fill"], dict(base))
    digests.update({f"masking.{k}": v for k, v in d.items()})
    images_fns, d = functions(os.path.join(mod, "images.py"), ["resize_image", "flatten"],
                              dict(base))
    digests.update({f"images.{k}": v for k, v in d.items()})
    masking = types.SimpleNamespace(get_crop_region_v2=masking_fns["get_crop_region_v2"],
                                    expand_crop_region=masking_fns["expand_crop_region"],
                                    fill=masking_fns["fill"])
    images = types.SimpleNamespace(resize_image=images_fns["resize_image"],
                                   flatten=images_fns["flatten"])
    ns = dict(base, masking=masking, images=images,
              devices=types.SimpleNamespace(dtype_vae=torch.float32, dtype=torch.float32,
                                            torch_gc=lambda: None,
                                            cond_cast_float=lambda x: x),
              model_hijack=types.SimpleNamespace(comments=[]), approximation_indexes={},
              opt_f=8, setup_color_correction=None)
    proc, d = functions(os.path.join(mod, "processing.py"),
                        ["create_binary_mask", "uncrop", "apply_overlay",
                         "StableDiffusionProcessingImg2Img.init",
                         "StableDiffusionProcessing.inpainting_image_conditioning"], ns)
    digests.update({f"processing.{k}": v for k, v in d.items()})
    return ns, proc, digests


# --------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------


def synthetic_image(width, height, seed, noise=6.0):
    """Gradients, a disc and noise: structure for the VAE to carry."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    r, g = 255 * (0.2 + 0.6 * u), 255 * (0.3 + 0.5 * v)
    b = 255 * (0.5 + 0.4 * np.sin(6.0 * u + 3.0 * v))
    disc = (x - width * 0.6) ** 2 + (y - height * 0.4) ** 2 < (min(width, height) * 0.25) ** 2
    r[disc], g[disc], b[disc] = 230, 40, 60
    img = np.stack([r, g, b], -1) + rng.normal(0, noise, (height, width, 3))
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


def rect_mask(width, height, box, mode="RGB"):
    m = np.zeros((height, width), np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 255
    return Image.fromarray(m, "L").convert(mode)


# --------------------------------------------------------------------------
# The run: A1111's init around diffusers' VAE, then diffusers' sampling with A1111's blend
# --------------------------------------------------------------------------

MODELS = {
    "tiny-a": dict(prompt="a photo of an astronaut riding a horse on mars",
                   negative_prompt="blurry, low quality", guidance_scale=7.5),
    "tiny-b": dict(prompt="a watercolor painting of a lighthouse at sunset", negative_prompt="",
                   guidance_scale=1.0),
    "tiny-inpaint": dict(prompt="a red bench in a park", negative_prompt="", guidance_scale=6.0),
}

# inpaint_full_res_padding None: the whole picture.
CASES = {
    "whole.euler.blur4": dict(model="tiny-a", scheduler="euler", steps=8, strength=0.75,
                              width=32, height=32, seed=42, init="init-32x32.png",
                              mask="mask-32x32.png", blur_x=4, blur_y=4, invert=False,
                              fill=1, padding=None, batch_size=1),
    "whole.ddim.invert.batch": dict(model="tiny-a", scheduler="ddim", steps=8, strength=0.6,
                                    width=32, height=32, seed=7, init="init-32x32.png",
                                    mask="mask-32x32.png", blur_x=2, blur_y=2, invert=True,
                                    fill=1, padding=None, batch_size=2),
    "whole.vpred.dpmpp_2m.blurxy": dict(model="tiny-b", scheduler="dpmpp_2m", steps=8,
                                        strength=0.8, width=32, height=48, seed=3000000000,
                                        init="init-40x60.png", mask="mask-40x60.png", blur_x=3,
                                        blur_y=1, invert=False, fill=1, padding=None,
                                        batch_size=1),
    "only_masked.euler_a.pad4": dict(model="tiny-a", scheduler="euler_a", steps=8, strength=0.75,
                                     width=32, height=32, seed=5, init="init-96x64.png",
                                     mask="mask-96x64.png", blur_x=4, blur_y=4, invert=False,
                                     fill=1, padding=4, batch_size=1),
    "only_masked.vpred.unipc.pad0": dict(model="tiny-b", scheduler="unipc", steps=8,
                                         strength=0.7, width=32, height=48, seed=99,
                                         init="init-96x64.png", mask="mask-96x64.png", blur_x=2,
                                         blur_y=2, invert=False, fill=1, padding=0,
                                         batch_size=1),
    "nine.only_masked.lms.pad8": dict(model="tiny-inpaint", scheduler="lms", steps=8,
                                      strength=1.0, width=32, height=32, seed=11,
                                      init="init-96x64.png", mask="mask-96x64.png", blur_x=4,
                                      blur_y=4, invert=False, fill=1, padding=8, batch_size=1),
    "whole.fill.euler.blur4": dict(model="tiny-a", scheduler="euler", steps=8, strength=0.9,
                                   width=32, height=32, seed=8, init="init-32x32.png",
                                   mask="mask-32x32.png", blur_x=4, blur_y=4, invert=False,
                                   fill=0, padding=None, batch_size=1),
    "only_masked.latent_noise.euler_a": dict(model="tiny-a", scheduler="euler_a", steps=8,
                                             strength=0.9, width=32, height=32, seed=12,
                                             init="init-96x64.png", mask="mask-96x64.png",
                                             blur_x=4, blur_y=4, invert=False, fill=2,
                                             padding=16, batch_size=1),
    "whole.latent_nothing.vpred.ddim": dict(model="tiny-b", scheduler="ddim", steps=8,
                                            strength=1.0, width=32, height=48, seed=13,
                                            init="init-40x60.png", mask="mask-40x60.png",
                                            blur_x=0, blur_y=0, invert=False, fill=3,
                                            padding=None, batch_size=2),
    "nine.whole.fill.dpmpp_2m": dict(model="tiny-inpaint", scheduler="dpmpp_2m", steps=8,
                                     strength=0.8, width=32, height=32, seed=14,
                                     init="init-32x32.png", mask="mask-32x32.png", blur_x=4,
                                     blur_y=4, invert=False, fill=0, padding=None,
                                     batch_size=1),
    # Through the server (tests/integration/inpaint_http.rs): sizes the API takes, on tiny-b. A1111's API
    # defaults (fill, only masked, padding 0, blur 4), and the web UI's through `inpaint: {}`.
    "http.a1111_defaults": dict(model="tiny-b", scheduler="euler", steps=3, strength=0.75,
                                width=256, height=256, seed=21, init="init-384x320.png",
                                mask="mask-384x320.png", blur_x=4, blur_y=4, invert=False,
                                fill=0, padding=0, batch_size=1),
    "http.web_ui_defaults": dict(model="tiny-b", scheduler="euler", steps=3, strength=0.75,
                                 width=256, height=256, seed=22, init="init-384x320.png",
                                 mask="mask-384x320.png", blur_x=4, blur_y=4, invert=False,
                                 fill=1, padding=None, batch_size=1),
    "nine.whole.pndm.invert": dict(model="tiny-inpaint", scheduler="pndm", steps=8,
                                   strength=0.6, width=32, height=32, seed=3,
                                   init="init-32x32.png", mask="mask-32x32.png", blur_x=4,
                                   blur_y=4, invert=True, fill=1, padding=None, batch_size=1),
    # mask_round False: the blurred mask's grey levels stay in the latent mask (and a
    # 9-channel UNet's conditioning mask and masked image).
    "unrounded.whole.euler.blur4": dict(model="tiny-a", scheduler="euler", steps=8,
                                        strength=0.75, width=32, height=32, seed=42,
                                        init="init-32x32.png", mask="mask-32x32.png", blur_x=4,
                                        blur_y=4, invert=False, fill=1, padding=None,
                                        batch_size=1, mask_round=False),
    "unrounded.only_masked.latent_nothing.vpred": dict(
        model="tiny-b", scheduler="dpmpp_2m", steps=8, strength=0.8, width=32, height=48,
        seed=31, init="init-96x64.png", mask="mask-96x64.png", blur_x=6, blur_y=3,
        invert=False, fill=3, padding=8, batch_size=1, mask_round=False),
    "unrounded.nine.whole.fill.dpmpp_2m": dict(model="tiny-inpaint", scheduler="dpmpp_2m",
                                               steps=8, strength=0.8, width=32, height=32,
                                               seed=14, init="init-32x32.png",
                                               mask="mask-32x32.png", blur_x=4, blur_y=4,
                                               invert=False, fill=0, padding=None,
                                               batch_size=1, mask_round=False),
    "http.unrounded": dict(model="tiny-b", scheduler="euler", steps=3, strength=0.75,
                           width=256, height=256, seed=23, init="init-384x320.png",
                           mask="mask-384x320.png", blur_x=12, blur_y=12, invert=False,
                           fill=1, padding=None, batch_size=1, mask_round=False),
    # resize_mode 1 and 2 over the whole picture: the mask blurred at the upload's size, then
    # image and mask fitted by the mode.
    "resize_crop.whole.euler.blur4": dict(model="tiny-a", scheduler="euler", steps=8,
                                          strength=0.75, width=32, height=32, seed=41,
                                          init="init-40x60.png", mask="mask-40x60.png",
                                          blur_x=4, blur_y=4, invert=False, fill=1,
                                          padding=None, batch_size=1, resize_mode=1),
    "resize_fill.whole.fill.vpred.ddim": dict(model="tiny-b", scheduler="ddim", steps=8,
                                              strength=0.8, width=48, height=32, seed=42,
                                              init="init-40x60.png", mask="mask-40x60.png",
                                              blur_x=3, blur_y=2, invert=False, fill=0,
                                              padding=None, batch_size=1, resize_mode=2),
    "resize_crop.nine.whole.invert.dpmpp_2m": dict(model="tiny-inpaint", scheduler="dpmpp_2m",
                                                   steps=8, strength=0.8, width=32, height=32,
                                                   seed=43, init="init-96x64.png",
                                                   mask="mask-96x64.png", blur_x=2, blur_y=2,
                                                   invert=True, fill=1, padding=None,
                                                   batch_size=1, resize_mode=1),
    # resize_mode 3, the latent upscale: the init image encoded at its own size (the VAE
    # floors odd sides), its latents resized bilinearly; without a mask (img2img) and with one
    # at the request's size (the only size A1111 runs it at, below).
    "latent_upscale.up.euler": dict(model="tiny-a", scheduler="euler", steps=8, strength=0.6,
                                    width=32, height=32, seed=44, init="init-24x20.png",
                                    mask=None, batch_size=1, resize_mode=3),
    "latent_upscale.down.vpred.dpmpp_2m.batch": dict(model="tiny-b", scheduler="dpmpp_2m",
                                                     steps=8, strength=0.7, width=32,
                                                     height=48, seed=45,
                                                     init="init-40x60.png", mask=None,
                                                     batch_size=2, resize_mode=3),
    "latent_upscale.odd.euler_a": dict(model="tiny-a", scheduler="euler_a", steps=8,
                                       strength=0.75, width=32, height=32, seed=46,
                                       init="init-27x21.png", mask=None, batch_size=1,
                                       resize_mode=3),
    "latent_upscale.whole.same_size.euler": dict(model="tiny-a", scheduler="euler", steps=8,
                                                 strength=0.75, width=32, height=32, seed=47,
                                                 init="init-32x32.png", mask="mask-32x32.png",
                                                 blur_x=4, blur_y=4, invert=False, fill=0,
                                                 padding=None, batch_size=1, resize_mode=3),
    # Through the server (tests/integration/inpaint_http.rs): resize_mode 2 with a mask, 3 without.
    "http.resize_fill": dict(model="tiny-b", scheduler="euler", steps=3, strength=0.75,
                             width=256, height=256, seed=24, init="init-384x320.png",
                             mask="mask-384x320.png", blur_x=4, blur_y=4, invert=False,
                             fill=1, padding=None, batch_size=1, resize_mode=2),
    "http.latent_upscale": dict(model="tiny-b", scheduler="euler", steps=3, strength=0.75,
                                width=256, height=256, seed=25, init="init-384x320.png",
                                mask=None, batch_size=1, resize_mode=3),
}

# What the pipeline refuses: the latent upscale with a mask over the whole picture at another
# size than the request's. A1111 keeps the image and the overlay at the upload's size and the
# result at the request's: `masking.fill` (masked content fill) raises, and otherwise
# `apply_overlay`'s in-place `alpha_composite` pastes the upload-sized overlay at the result's
# top-left corner, cropped (kept pixels of another scale over the picture). Recorded: the
# error, or both sizes.
REFUSED_CASES = {
    "latent_upscale.whole.other_size": dict(model="tiny-a", scheduler="euler", steps=8,
                                            strength=0.75, width=32, height=32, seed=48,
                                            init="init-40x60.png", mask="mask-40x60.png",
                                            blur_x=4, blur_y=4, invert=False, fill=1,
                                            padding=None, batch_size=1, resize_mode=3),
    "latent_upscale.whole.other_size.fill": dict(model="tiny-a", scheduler="euler", steps=8,
                                                 strength=0.75, width=32, height=32, seed=48,
                                                 init="init-40x60.png",
                                                 mask="mask-40x60.png", blur_x=4, blur_y=4,
                                                 invert=False, fill=0, padding=None,
                                                 batch_size=1, resize_mode=3),
}


def coefficients(sched, index, t):
    """`latents = a * x0 + b * eps` at the scheduler's step `index` (timestep `t`)."""
    name = type(sched).__name__
    if name in ("DDIMScheduler", "PNDMScheduler"):
        ac = float(sched.alphas_cumprod[int(t)])
        return math.sqrt(ac), math.sqrt(1.0 - ac)
    if name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        a, s = sched._sigma_to_alpha_sigma_t(sched.sigmas[index])
        return float(a), float(s)
    # k-diffusion's parametrisation (Euler, Euler a, LMS, ...): x0 + sigma * eps.
    return 1.0, float(sched.sigmas[index])


def a1111_blend(output, latents, sched, index, t, prediction, init_latent, nmask):
    """The output whose implied x0 is `denoised * nmask + init_latent * (1 - nmask)`."""
    a, b = coefficients(sched, index, t)
    n = math.sqrt(a * a + b * b)
    alpha, sigma = a / n, b / n
    if prediction == "epsilon":
        eps = output
    else:  # v_prediction: v = alpha * eps - sigma * x0 on x_t = latents / n
        eps = sigma * (latents / n) + alpha * output
    denoised = (latents - b * eps) / a
    blended = denoised * nmask + init_latent * (1.0 - nmask)
    eps = (latents - a * blended) / b
    return eps if prediction == "epsilon" else alpha * eps - sigma * blended


@torch.no_grad()
def run_case(ns, proc, pipe, own_config, case, files, resize_image, steps_rule):
    r = dict(MODELS[case["model"]], **case)
    # init keeps `image_mask` in a local: it is the L mask's resize to the processing size
    # (resize_image(0, ...) for the whole picture, (2, crop) for "only masked").
    caught = {}

    def catching(mode, im, width, height, **kw):
        res = resize_image(mode, im, width, height, **kw)
        if im.mode == "L" and (width, height) == (r["width"], r["height"]):
            caught["mask"] = res
        return res
    ns["images"].resize_image = catching
    n = r["batch_size"]
    gens = [torch.Generator("cpu").manual_seed(r["seed"] + i) for i in range(n)]
    vae, unet = pipe.vae, pipe.unet
    sf = vae.config.scaling_factor
    # A1111's opt_f (8, SD's VAE) is the tiny VAE's factor here.
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    ns["opt_f"] = f
    mask = r.get("mask")
    drawn = {}

    def images_tensor_to_samples(image, approximation, model=None):
        # A1111's VAE encode of [0, 1] images; each image's sample from its generator, then
        # that generator's starting noise (the pipeline's draw order).
        dist = vae.encode(image * 2 - 1).latent_dist
        lat = torch.cat([dist.mean[i:i + 1] + dist.std[i:i + 1] *
                         torch.randn(dist.mean[i:i + 1].shape, generator=g)
                         for i, g in enumerate(gens)]) * sf
        # At the processing size: the latent upscale resizes the latents before sampling.
        shape = (1, lat.shape[1], r["height"] // f, r["width"] // f)
        drawn["noise"] = torch.cat([torch.randn(shape, generator=g) for g in gens])
        return lat

    def create_random_tensors(shape, seeds):
        return drawn["noise"]

    captured = {}

    def first_stage(x):
        # get_first_stage_encoding(encode_first_stage(x)): a sample per generator.
        dist = vae.encode(x).latent_dist
        return torch.cat([dist.mean[i:i + 1] + dist.std[i:i + 1] *
                          torch.randn(dist.mean[i:i + 1].shape, generator=g)
                          for i, g in enumerate(gens)]) * sf

    nine = unet.config.in_channels == 9

    def img2img_image_conditioning(source_image, latent_image, image_mask=None,
                                   round_image_mask=True):
        captured["source"] = source_image
        if not nine:
            return None
        me = types.SimpleNamespace(sd_model=types.SimpleNamespace(
            get_first_stage_encoding=lambda z: z, encode_first_stage=first_stage,
            dtype=torch.float32))
        return proc["StableDiffusionProcessing.inpainting_image_conditioning"](
            me, source_image, latent_image, image_mask, round_image_mask)

    ns["images_tensor_to_samples"] = images_tensor_to_samples
    ns["create_random_tensors"] = create_random_tensors
    ns["create_binary_mask"] = proc["create_binary_mask"]
    ns["sd_samplers"] = types.SimpleNamespace(create_sampler=lambda name, model: None)
    p = types.SimpleNamespace(
        denoising_strength=r["strength"], extra_generation_params={}, image_cfg_scale=None,
        sampler_name="Euler", sd_model=None, image_mask=files[mask] if mask else None,
        mask_round=r.get("mask_round", True),
        inpainting_mask_invert=int(r.get("invert", False)), mask_blur_x=r.get("blur_x", 4),
        mask_blur_y=r.get("blur_y", 4),
        mask_blur=r.get("blur_x", 4) if r.get("blur_x", 4) == r.get("blur_y", 4) else None,
        inpaint_full_res=r.get("padding") is not None,
        inpaint_full_res_padding=r.get("padding") or 0, width=r["width"], height=r["height"],
        resize_mode=r.get("resize_mode", 0), latent_mask=None,
        color_corrections=None, init_images=[files[r["init"]]], inpainting_fill=r.get("fill", 1),
        batch_size=n, overlay_images=None, paste_to=None, mask_for_overlay=None,
        img2img_image_conditioning=img2img_image_conditioning)
    proc["StableDiffusionProcessingImg2Img.init"](p, [r["prompt"]] * n, [r["seed"]] * n, [0] * n)

    # diffusers' sampling with A1111's blend.
    pipe.scheduler = make_scheduler(r["scheduler"], own_config)
    sched = pipe.scheduler
    prediction = sched.config.prediction_type
    cfg = r["guidance_scale"] > 1.0
    cond, uncond = pipe.encode_prompt(r["prompt"], torch.device("cpu"), n, cfg,
                                      r["negative_prompt"])
    embeds = torch.cat([uncond, cond]) if cfg else cond
    # A1111's step rule (its own setup_img2img_steps and slicing, tools/a1111_steps.py): the
    # schedule, the step it starts from, the image noised at that step's level (strength 1
    # is 0.999 there: never pure noise).
    got = steps_rule.slice(r["scheduler"], lambda: make_scheduler(r["scheduler"], own_config),
                           r["steps"], r["strength"])
    sched.set_timesteps(got["schedule_steps"])
    begin = first_index_of_step(sched, got["start"])
    timesteps = sched.timesteps[begin:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(begin)
    init_latent = p.init_latent
    noise = drawn["noise"]
    latents = sched.add_noise(init_latent, noise, timesteps[:1].repeat(n))
    # img2img (no mask): nothing to blend.
    nmask = p.nmask[:1][None].expand(n, 1, -1, -1) if mask else None
    for k, t in enumerate(timesteps):
        index = begin + k
        x_in = torch.cat([latents] * 2) if cfg else latents
        x_in = sched.scale_model_input(x_in, t)
        if nine:
            cond_in = torch.cat([p.image_conditioning] * 2) if cfg else p.image_conditioning
            x_in = torch.cat([x_in, cond_in], dim=1)
        out = unet(x_in, t, encoder_hidden_states=embeds).sample
        if cfg:
            u, c = out.chunk(2)
            out = u + r["guidance_scale"] * (c - u)
        if mask:
            out = a1111_blend(out, latents, sched, index, t, prediction, init_latent, nmask)
        kw = {}
        if "generator" in inspect.signature(sched.step).parameters:
            kw["generator"] = gens if n > 1 else gens[0]
        latents = sched.step(out, t, latents, **kw).prev_sample
    if mask:
        latents = latents * nmask + init_latent * (1.0 - nmask)
    decoded = vae.decode(latents / sf).sample
    decoded = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    results = []
    for i in range(n):
        image = Image.fromarray((decoded[i] * 255).round().astype(np.uint8))
        overlay = p.overlay_images[i] if p.overlay_images else None
        image, _ = proc["apply_overlay"](image, p.paste_to, overlay)
        results.append(np.asarray(image))
    source = captured["source"][0].permute(1, 2, 0).numpy()
    # The processed image back to u8 (exactly: it was u8 / 255 * 2 - 1).
    processed = np.round((source + 1) / 2 * 255).astype(np.uint8)
    if not mask:
        return dict(results=np.stack(results), image=processed,
                    params=dict(p.extra_generation_params),
                    paste_to=None, timesteps=[float(t) for t in timesteps])
    return dict(
        results=np.stack(results), image=processed,
        mask=np.asarray(caught["mask"].convert("RGB")),
        latmask=p.nmask[0].numpy(), overlay=np.asarray(p.overlay_images[0]),
        params={k: v for k, v in p.extra_generation_params.items()}, paste_to=p.paste_to,
        timesteps=[float(t) for t in timesteps])


def main():
    args = a1111_args(__file__, __doc__, DEFAULT_OUT)
    if args is None:
        return
    import diffusers
    from diffusers import StableDiffusionInpaintPipeline
    from safetensors.torch import save_file

    ns, proc, digests = a1111(args.a1111)
    steps_rule = A1111Steps(args.a1111)
    digests.update({f"steps.{k}": v for k, v in steps_rule.digests.items()})
    resize_image = ns["images"].resize_image

    img_dir = os.path.join(args.out, "a1111-inpaint")
    os.makedirs(img_dir, exist_ok=True)
    files = {}

    def save(name, image):
        image.save(os.path.join(img_dir, name), optimize=True)
        files[name] = Image.open(os.path.join(img_dir, name))
        files[name].load()

    save("init-32x32.png", synthetic_image(32, 32, 3232))
    save("mask-32x32.png", rect_mask(32, 32, (9, 6, 24, 22)))
    save("init-40x60.png", synthetic_image(40, 60, 4060))
    save("mask-40x60.png", rect_mask(40, 60, (5, 30, 33, 52)))
    save("init-96x64.png", synthetic_image(96, 64, 9664))
    save("mask-96x64.png", rect_mask(96, 64, (60, 14, 75, 26)))
    # Little noise: the server's fixture stays small.
    save("init-24x20.png", synthetic_image(24, 20, 2420))
    save("init-27x21.png", synthetic_image(27, 21, 2721))
    save("init-384x320.png", synthetic_image(384, 320, 384320, noise=0.5))
    save("mask-384x320.png", rect_mask(384, 320, (250, 60, 310, 140)))

    tensors, cases, blur_cases = {}, {}, {}
    # OpenCV's blur alone: masks with edges, noise and a single dot; sigmas past the size.
    rng = np.random.default_rng(77)
    blur_masks = {
        "rect": np.asarray(rect_mask(40, 30, (8, 5, 31, 21), "L")),
        "noise": rng.integers(0, 256, (23, 17), dtype=np.uint8),
        "dot": np.pad(np.full((1, 1), 255, np.uint8), ((6, 6), (9, 4))),
    }
    for name, m in blur_masks.items():
        for sx, sy in ((1, 1), (4, 4), (3, 0), (0, 7), (16, 16), (64, 2)):
            out = m.copy()
            if sx > 0:
                k = 2 * int(2.5 * sx + 0.5) + 1
                out = cv2.GaussianBlur(out, (k, 1), sx)
            if sy > 0:
                k = 2 * int(2.5 * sy + 0.5) + 1
                out = cv2.GaussianBlur(out, (1, k), sy)
            label = f"{name}.{sx}.{sy}"
            tensors[f"blur_in.{label}"] = torch.from_numpy(m.copy())
            tensors[f"blur.{label}"] = torch.from_numpy(out)
            blur_cases[label] = dict(sigma_x=sx, sigma_y=sy)

    # masking.fill alone: images and blurred masks of several sizes.
    fill_cases = {}
    fill_inputs = [("32x32", files["init-32x32.png"], files["mask-32x32.png"], 4),
                   ("96x64", files["init-96x64.png"], files["mask-96x64.png"], 0),
                   ("40x60", files["init-40x60.png"], files["mask-40x60.png"], 9)]
    for name, image, mask, sigma in fill_inputs:
        m = np.asarray(mask.convert("L"))
        if sigma:
            k = 2 * int(2.5 * sigma + 0.5) + 1
            m = cv2.GaussianBlur(cv2.GaussianBlur(m, (k, 1), sigma), (1, k), sigma)
        filled = ns["masking"].fill(image.convert("RGB"), Image.fromarray(m))
        tensors[f"fill_mask.{name}"] = torch.from_numpy(m.copy())
        tensors[f"fill_image.{name}"] = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
        tensors[f"fill.{name}"] = torch.from_numpy(np.asarray(filled).copy())
        fill_cases[name] = dict(sigma=sigma)

    pipes = {}
    for model in MODELS:
        pipe = StableDiffusionInpaintPipeline.from_pretrained(
            os.path.join(args.out, model), dtype=torch.float32, safety_checker=None,
            requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipes[model] = (pipe, dict(pipe.scheduler.config))

    for label, case in CASES.items():
        pipe, own = pipes[case["model"]]
        out = run_case(ns, proc, pipe, own, case, files, resize_image, steps_rule)
        tensors[f"result.{label}"] = torch.from_numpy(out["results"].copy())
        # The server's cases keep their results only (the small cases check the steps).
        # img2img (no mask) keeps its result only.
        if not label.startswith("http.") and case.get("mask"):
            tensors[f"image.{label}"] = torch.from_numpy(out["image"].copy())
            tensors[f"mask.{label}"] = torch.from_numpy(out["mask"].copy())
            tensors[f"latmask.{label}"] = torch.from_numpy(out["latmask"].copy())
            tensors[f"overlay.{label}"] = torch.from_numpy(out["overlay"].copy())
        cases[label] = dict(case, mask_round=case.get("mask_round", True),
                            resize_mode=case.get("resize_mode", 0),
                            infotext=out["params"], paste_to=out["paste_to"],
                            prompt=MODELS[case["model"]]["prompt"],
                            negative_prompt=MODELS[case["model"]]["negative_prompt"],
                            guidance_scale=MODELS[case["model"]]["guidance_scale"],
                            timesteps=out["timesteps"])
        print(f"{label}: params {out['params']} paste_to {out['paste_to']} "
              f"result mean {out['results'].mean():.1f}")
    refused = {}
    for label, case in REFUSED_CASES.items():
        pipe, own = pipes[case["model"]]
        try:
            out = run_case(ns, proc, pipe, own, case, files, resize_image, steps_rule)
        except ValueError as e:
            refused[label] = dict(case, mask_round=True, raises=f"ValueError: {e}")
        else:
            result, overlay = out["results"].shape[1:3], out["overlay"].shape[:2]
            assert result != overlay, label
            refused[label] = dict(case, mask_round=True, result_hw=list(result),
                                  overlay_hw=list(overlay))
        print(f"{label}: A1111: {refused[label]}")
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(args.out, "a1111-inpaint.safetensors"))
    with open(os.path.join(args.out, "a1111-inpaint.json"), "w") as f:
        json.dump({"cases": cases, "refused_cases": refused, "blur_cases": blur_cases,
                   "fill_cases": fill_cases,
                   "a1111_sources": {k: f"sha256 {v}" for k, v in digests.items()},
                   "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                                "opencv": cv2.__version__,
                                "pillow": Image.__version__}}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
