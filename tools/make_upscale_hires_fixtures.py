#!/usr/bin/env python3
"""The hires fix's upscale step as A1111 runs it: its target sizes and crops, and whole hires
images on the tiny fixture model tiny-a-vae8, from A1111's own code.

From a checkout of AUTOMATIC1111/stable-diffusion-webui (taken with `ast`, not copied):
  - `StableDiffusionProcessingTxt2Img.calculate_target_resolution` (modules/processing.py):
    `hr_upscale_to_x/y` and `truncate_x/y` from the first pass's size and `hr_scale`, or
    `hr_resize_x`/`hr_resize_y`, for a grid of requests;
  - `StableDiffusionProcessingTxt2Img.sample_hr_pass`, run as written on mocks of A1111's
    model objects: the latent modes interpolate the first pass's latents to the upscale's
    whole cells; the image upscalers decode them, `255. * clamp((x + 1) / 2)` and
    `astype(np.uint8)` (truncating), `images.resize_image` to the upscale's size exactly
    (modules/images.py, with modules/upscaler.py's `Upscaler.upscale` and its `Lanczos` /
    `Nearest` `do_upscale`), and encode; then its crop of the latents by `truncate_x/y`.
Where A1111 calls its own model, diffusers does the work (the pipeline's semantics): the first
pass is diffusers' txt2img (`output_type="latent"`) and its decode `vae.decode(latents / sf)`;
`images_tensor_to_samples` is `vae.encode(2x - 1).latent_dist.sample(generator) * sf`; the
sampler's `sample_img2img` is diffusers' img2img with the cropped latents as its image (4
channels: taken as the init latents) and the same generator, which draws the noise next, over
A1111 1.10's step rule for the pass (tools/a1111_steps.py: its `setup_img2img_steps` with the
pass's steps, `sample_img2img`'s slicing: `steps` of a schedule stretched to
`int(steps / min(strength, 0.999))`).
Each image's generator is seeded with its seed again for the second pass (A1111's
`ImageRNG(seeds)`): the encode's sample, then the noise.

Writes, under OUT (default crates/pipeline/tests/fixtures):
  upscale-hires.json          sizes: [[w, h, hr_scale, hr_resize_x, hr_resize_y,
                              hr_upscale_to_x, hr_upscale_to_y, truncate_x, truncate_y], ...];
                              the image cases with their sizes; the sources' digests, versions
  upscale-hires.safetensors   image.<case>: [H, W, 3] u8 = round(output_type='np' * 255)

Usage:
  python tools/make_upscale_hires_fixtures.py --a1111 PATH/TO/stable-diffusion-webui [--out DIR]
"""

import contextlib
import json
import os
import sys
import types

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_steps import A1111Steps, a1111_img2img_class, first_index_of_step  # noqa: E402
from api_schedulers import make_scheduler  # noqa: E402
from a1111_source import a1111_args, functions  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures")
OPT_F = 8

FIRST = dict(prompt="a lighthouse on a cliff", negative_prompt="fog", steps=4, width=64,
             height=48, guidance_scale=6.0, scheduler="euler")
CASES = {
    # Both sides in another aspect: upscaled to cover 100x75 (not whole cells: the encoder
    # floors it to 12x9), then 1 cell off the bottom.
    "lanczos_cover": dict(upscaler="Lanczos", hr_resize_x=100, hr_resize_y=60, seed=21,
                          hires_steps=6, strength=0.5),
    # hr_scale 1.3: int(64 * 1.3) x int(48 * 1.3) = 83x62, resized to exactly that.
    "none_scale": dict(upscaler="None", hr_scale=1.3, seed=5, hires_steps=4, strength=0.6),
    "nearest_scale": dict(upscaler="Nearest", hr_scale=1.75, seed=9, hires_steps=5,
                          strength=0.5),
    # The latents interpolated to 12x9 cells, then cropped as the image's.
    "latent_cover": dict(upscaler="Latent", hr_resize_x=100, hr_resize_y=60, seed=21,
                         hires_steps=6, strength=0.5),
    "latent_bicubic_aa_scale": dict(upscaler="Latent (bicubic antialiased)", hr_scale=1.3,
                                    seed=5, hires_steps=4, strength=0.6),
}
# A1111's shared.latent_upscale_modes.
LATENT_MODES = {
    "Latent": dict(mode="bilinear", antialias=False),
    "Latent (bicubic antialiased)": dict(mode="bicubic", antialias=True),
}


def a1111_functions(checkout):
    mod = os.path.join(checkout, "modules")
    LANCZOS, NEAREST = Image.Resampling.LANCZOS, Image.Resampling.NEAREST
    state = types.SimpleNamespace(interrupted=False, nextjob=lambda: None)
    opts = types.SimpleNamespace(use_old_hires_fix_width_height=False,
                                 save_images_before_highres_fix=False,
                                 sd_vae_encode_method="Full", inpainting_mask_weight=1.0,
                                 upscaler_for_img2img=None)
    shared = types.SimpleNamespace(state=state, opts=opts, sd_upscalers=[], device="cpu")
    import PIL
    up_ns = {"Image": Image, "PIL": PIL, "LANCZOS": LANCZOS, "NEAREST": NEAREST,
             "shared": shared}
    up, d1 = functions(os.path.join(mod, "upscaler.py"),
                       ["Upscaler.upscale", "UpscalerLanczos.do_upscale",
                        "UpscalerNearest.do_upscale"], up_ns)
    # functions() binds each by its bare name: take them before one shadows another.
    img_ns = {"Image": Image, "LANCZOS": LANCZOS, "opts": opts, "shared": shared}
    img, d2 = functions(os.path.join(mod, "images.py"), ["resize_image"], img_ns)

    def builtin(name, do_upscale):
        cls = type(name, (), {"upscale": up["Upscaler.upscale"], "do_upscale": do_upscale})
        return types.SimpleNamespace(name=name, scaler=cls(), data_path=None)

    shared.sd_upscalers[:] = [builtin("Lanczos", up["UpscalerLanczos.do_upscale"]),
                              builtin("Nearest", up["UpscalerNearest.do_upscale"])]
    hooks = types.SimpleNamespace(encode=None, sample_img2img=None, decode=None)
    proc_ns = {
        "opts": opts, "shared": shared, "opt_f": OPT_F, "torch": torch, "np": np,
        "Image": Image, "images": types.SimpleNamespace(resize_image=img["resize_image"]),
        "devices": types.SimpleNamespace(torch_gc=lambda: None, cpu="cpu",
                                         dtype_vae=torch.float32,
                                         autocast=contextlib.nullcontext),
        "sd_samplers": types.SimpleNamespace(create_sampler=lambda name, model: types.SimpleNamespace(
            sample_img2img=lambda *a, **k: hooks.sample_img2img(*a, **k))),
        "images_tensor_to_samples": lambda x, approx: hooks.encode(x),
        "approximation_indexes": {},
        "decode_latent_batch": lambda model, s, **k: hooks.decode(s),
        "rng": types.SimpleNamespace(ImageRNG=lambda shape, seeds, **k: types.SimpleNamespace(
            next=lambda: None)),
        "extra_networks": types.SimpleNamespace(activate=lambda *a: None),
        "sd_models": types.SimpleNamespace(apply_token_merging=lambda *a: None),
    }
    proc, d3 = functions(os.path.join(mod, "processing.py"),
                         ["StableDiffusionProcessingTxt2Img.calculate_target_resolution",
                          "StableDiffusionProcessingTxt2Img.sample_hr_pass"], proc_ns)
    return proc, hooks, {**d1, **d2, **d3}


def processing(**fields):
    """A txt2img `p` with what calculate_target_resolution and sample_hr_pass read."""
    p = types.SimpleNamespace(
        hr_scale=2.0, hr_resize_x=0, hr_resize_y=0, hr_upscaler=None, extra_generation_params={},
        applied_old_hires_behavior_to=None, truncate_x=0, truncate_y=0, hr_upscale_to_x=0,
        hr_upscale_to_y=0, hr_sampler_name=None, sampler_name="Euler", sd_model=None,
        latent_scale_mode=None, seeds=[0], subseeds=[0], subseed_strength=0.0,
        seed_resize_from_h=-1, seed_resize_from_w=-1, disable_extra_networks=True, scripts=None,
        hr_second_pass_steps=0, steps=20, hr_c=None, hr_uc=None)
    p.save_samples = lambda: False
    p.txt2img_image_conditioning = lambda x: None
    p.img2img_image_conditioning = lambda *a: None
    p.calculate_hr_conds = lambda: None
    p.get_token_merging_ratio = lambda for_hr=False: 0.0
    for k, v in fields.items():
        setattr(p, k, v)
    return p


def sizes(calculate):
    rows = []
    firsts = [(w, h) for w in (256, 320, 384, 448, 512, 640, 768) for h in (256, 384, 512, 768)]
    resizes = [(x, y) for x in (0, 300, 448, 500, 768, 1000) for y in (0, 300, 448, 500, 768, 1000)
               if (x, y) != (0, 0)]
    for w, h in firsts:
        asks = [(s, 0, 0) for s in (1.0, 1.3, 1.5, 2.0, 2.35)] + [(2.0, x, y) for x, y in resizes]
        for scale, x, y in asks:
            p = processing(width=w, height=h, hr_scale=scale, hr_resize_x=x, hr_resize_y=y)
            calculate(p)
            rows.append([w, h, scale, x, y, p.hr_upscale_to_x, p.hr_upscale_to_y, p.truncate_x,
                         p.truncate_y])
    return rows


@torch.no_grad()
def main():
    args = a1111_args(__file__, __doc__, DEFAULT_OUT)
    if args is None:
        return

    import diffusers
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    proc, hooks, digests = a1111_functions(args.a1111)
    steps_rule = A1111Steps(args.a1111)
    digests.update({f"steps.{k}": v for k, v in steps_rule.digests.items()})
    calculate = proc["StableDiffusionProcessingTxt2Img.calculate_target_resolution"]
    sample_hr_pass = proc["StableDiffusionProcessingTxt2Img.sample_hr_pass"]
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    txt = StableDiffusionPipeline.from_pretrained(
        os.path.join(args.out, "tiny-a-vae8"), dtype=torch.float32, safety_checker=None,
        requires_safety_checker=False)
    img2img = a1111_img2img_class()(**txt.components)
    for pipe in (txt, img2img):
        pipe.set_progress_bar_config(disable=True)
    own = dict(txt.scheduler.config)
    vae, sf = txt.vae, txt.vae.config.scaling_factor
    txt.scheduler = make_scheduler(FIRST["scheduler"], own)
    img2img.scheduler = make_scheduler(FIRST["scheduler"], own)
    prompts = dict(prompt=FIRST["prompt"], negative_prompt=FIRST["negative_prompt"],
                   guidance_scale=FIRST["guidance_scale"])

    tensors, cases = {}, {}
    for label, case in CASES.items():
        p = processing(width=FIRST["width"], height=FIRST["height"], steps=FIRST["steps"],
                       hr_scale=case.get("hr_scale", 2.0),
                       hr_resize_x=case.get("hr_resize_x", 0),
                       hr_resize_y=case.get("hr_resize_y", 0), hr_upscaler=case["upscaler"],
                       hr_second_pass_steps=case["hires_steps"],
                       denoising_strength=case["strength"], seeds=[case["seed"]],
                       latent_scale_mode=LATENT_MODES.get(case["upscaler"]))
        calculate(p)
        latents = txt(**prompts, num_inference_steps=FIRST["steps"], width=FIRST["width"],
                      height=FIRST["height"],
                      generator=torch.Generator("cpu").manual_seed(case["seed"]),
                      output_type="latent").images
        decoded = None
        if p.latent_scale_mode is None:
            decoded = vae.decode(latents / sf).sample.to(torch.float32)
        generator = torch.Generator("cpu").manual_seed(case["seed"])
        seen = {}

        def encode(x):
            dist = vae.encode(x.to(torch.float32) * 2 - 1).latent_dist
            seen["encoded"] = tuple(dist.mean.shape[2:])
            return dist.sample(generator) * sf

        def sample_img2img(p_, x, noise, c, uc, steps, image_conditioning=None):
            seen["cropped"] = tuple(x.shape[2:])
            # A1111's step rule for the pass: `steps` of a stretched schedule.
            got = steps_rule.slice(FIRST["scheduler"],
                                   lambda: make_scheduler(FIRST["scheduler"], own), steps,
                                   p_.denoising_strength, hires=True)
            img2img.scheduler.set_timesteps(got["schedule_steps"])
            img2img.begin = first_index_of_step(img2img.scheduler, got["start"])
            seen["slice"] = (got["schedule_steps"], got["start"])
            return img2img(**prompts, image=x, strength=p_.denoising_strength,
                           num_inference_steps=got["schedule_steps"], generator=generator,
                           output_type="np").images

        hooks.encode, hooks.sample_img2img, hooks.decode = encode, sample_img2img, lambda s: s
        out = sample_hr_pass(p, latents, decoded, p.seeds, p.subseeds, 0.0, [FIRST["prompt"]])[0]
        image = torch.from_numpy((out * 255).round().astype("uint8"))
        cells = seen["cropped"]
        assert image.shape == (cells[0] * OPT_F, cells[1] * OPT_F, 3), (image.shape, cells)
        assert float(image.float().std()) > 2.0, f"{label} is flat"
        tensors[f"image.{label}"] = image.contiguous()
        cases[label] = {**case, "upscale_width": p.hr_upscale_to_x,
                        "upscale_height": p.hr_upscale_to_y, "truncate_x": p.truncate_x,
                        "truncate_y": p.truncate_y, "width": cells[1] * OPT_F,
                        "height": cells[0] * OPT_F, "encoded_cells": seen.get("encoded"),
                        "schedule_steps": seen["slice"][0], "start": seen["slice"][1]}
        print(f"{label}: upscale {p.hr_upscale_to_x}x{p.hr_upscale_to_y}, truncate "
              f"{p.truncate_x}x{p.truncate_y} -> {image.shape[1]}x{image.shape[0]}, "
              f"mean {image.float().mean():.1f} std {image.float().std():.1f}")

    meta = {
        "generated_by": "tools/make_upscale_hires_fixtures.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "numpy": np.__version__},
        "a1111_sources": {k: f"sha256 {v}" for k, v in digests.items()},
        "sizes_columns": ["width", "height", "hr_scale", "hr_resize_x", "hr_resize_y",
                          "hr_upscale_to_x", "hr_upscale_to_y", "truncate_x", "truncate_y"],
        "sizes": sizes(calculate),
        "first_pass": FIRST,
        "images": "image.<case>: [H, W, 3] u8 = round(output_type='np' * 255) of the second "
                  "pass; width/height: its size (the cropped latents' cells times 8)",
        "cases": cases,
    }
    # One line per size row: the table stays readable and small.
    rows = ",\n  ".join(json.dumps(r) for r in meta["sizes"])
    text = json.dumps({**meta, "sizes": "ROWS"}, indent=1).replace('"ROWS"', f"[\n  {rows}\n ]")
    with open(os.path.join(args.out, "upscale-hires.json"), "w") as f:
        f.write(text + "\n")
    save_file(tensors, os.path.join(args.out, "upscale-hires.safetensors"))
    print(f"wrote upscale-hires.* ({len(meta['sizes'])} sizes, {len(cases)} images)")


if __name__ == "__main__":
    main()
