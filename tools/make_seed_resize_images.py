#!/usr/bin/env python3
"""Reference images for A1111's seed resize (`seed_resize_from_w`, `seed_resize_from_h`): diffusers
0.42.1's pipelines on the tiny fixture models, their starting noise made by A1111's own
`ImageRNG.first()` (modules/rng.py from a checkout, executed as tools/make_seed_resize_fixtures.py
does: `randn_source` "CPU", `eta_noise_seed_delta` 0). Pinned: torch 2.11.0, diffusers 0.42.1
(tools/requirements.txt). Runs after tools/make_tiny_models.py and tools/make_img2img_fixtures.py
(reads tiny-a/, tiny-b/, tiny-inpaint/, images/).

How the noise gets in: each pipeline module's `randn_tensor` (the one call that draws the starting
noise in `prepare_latents`) is replaced by `ImageRNG(shape, seeds, subseeds, subseed_strength,
from_h, from_w).first()` whose generators are the pipeline's own per-image generators, where
diffusers has left them. So:
  - text-to-image: each image's generator draws the target-size noise first (A1111's and
    diffusers' order alike), and goes on to the ancestral samplers' noise, as in A1111;
  - img2img and inpainting: diffusers first samples the init image's latents from the image's
    generator; the target-size noise goes on from there; then (inpainting) the masked image's
    sample. The "from"-size noise always comes, as in A1111, from a fresh generator of the
    image's seed (`randn(seed, noise_shape)`), bent towards the variation seed's at that size.
A1111 divides the "from" size by 8, SD's VAE factor (`opt_f`); the tiny models' VAEs have
factors 2 (tiny-a) and 4 (tiny-b, tiny-inpaint), so rng.py is given `(from // f) * 8`, which it
divides back to `from // f` latent cells: the server divides by the model's own factor.

Writes, under OUT (default crates/pipeline/tests/fixtures):
  seed-resize-images.safetensors   image.<case>: [batch, H, W, 3] u8, what diffusers returns
  seed-resize-images.json          every case's request

Usage:
  python tools/make_seed_resize_images.py --a1111 PATH/TO/stable-diffusion-webui [--out DIR]
"""

import json
import os
import sys

import torch
from PIL import Image

from api_schedulers import make_scheduler
from make_seed_resize_fixtures import a1111_rng

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import a1111_args  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures")

# Requests as the server gives them to the pipeline: `seed_resize_from` is the "from" size in
# pixels (width, height). Sizes in latent cells are noted beside each case.
CASES = {
    # 32x32 latents from 24x40 (f 2): narrower (padded with the target's own noise), taller
    # (cropped).
    "tiny-a.txt2img.euler": dict(
        model="tiny-a", mode="txt2img", scheduler="euler", prompt="a lighthouse on a cliff",
        negative_prompt="blurry", steps=10, width=64, height=64, seed=42,
        guidance_scale=7.5, batch_size=1, seed_resize_from=[48, 80]),
    # Ancestral noise after the starting noise; a batch (seed + i); odd offsets: 21x21 cells
    # centred in 32x32.
    "tiny-a.txt2img.euler_a.batch": dict(
        model="tiny-a", mode="txt2img", scheduler="euler_a", prompt="a red fox in the snow",
        negative_prompt="", steps=8, width=64, height=64, seed=7, guidance_scale=6.0,
        batch_size=2, seed_resize_from=[42, 42]),
    # A variation seed (every image keeps the seed, the variation seed counts up): bent at the
    # "from" size; tiny-b (f 4) 8x12 cells from 6x16, non-square.
    "tiny-b.txt2img.dpmpp_2m.variation": dict(
        model="tiny-b", mode="txt2img", scheduler="dpmpp_2m",
        prompt="a watercolor painting of a harbour", negative_prompt="", steps=8, width=32,
        height=48, seed=3000000000, guidance_scale=5.0, batch_size=2,
        variation_seed=99, variation_strength=0.4, seed_resize_from=[24, 64]),
    # img2img: 16x16 cells from 12x20.
    "tiny-a.img2img.euler.0.75": dict(
        model="tiny-a", mode="img2img", scheduler="euler",
        prompt="a photo of an astronaut riding a horse on mars", negative_prompt="",
        steps=12, width=32, height=32, seed=9, guidance_scale=7.5, batch_size=2,
        strength=0.75, init_image="init-32x32.png", seed_resize_from=[24, 40]),
    # Inpainting, 4-channel UNet (the known region put back each step), ancestral.
    "tiny-a.inpaint.euler_a.0.75": dict(
        model="tiny-a", mode="inpaint", scheduler="euler_a",
        prompt="a photo of an astronaut riding a horse on mars", negative_prompt="blurry",
        steps=12, width=32, height=32, seed=42, guidance_scale=7.5, batch_size=1,
        strength=0.75, init_image="init-32x32.png", mask_image="mask-32x32.png",
        seed_resize_from=[40, 24]),
    # Inpainting, 9-channel UNet from pure noise (strength 1): 8x8 cells from 10x6 (f 4).
    "tiny-inpaint.inpaint.euler.1.0": dict(
        model="tiny-inpaint", mode="inpaint", scheduler="euler",
        prompt="a red bench in a park", negative_prompt="", steps=10, width=32, height=32,
        seed=7, guidance_scale=6.0, batch_size=1, strength=1.0, init_image="init-32x32.png",
        mask_image="mask-32x32.png", seed_resize_from=[40, 24]),
    # The server's tests (crates/server/tests/integration/seed_resize_http.rs) ask for this one over HTTP,
    # natively and through A1111, at the server's smallest size: 64x64 cells from 80x48.
    "tiny-b.txt2img.euler.http": dict(
        model="tiny-b", mode="txt2img", scheduler="euler", prompt="a lighthouse",
        negative_prompt="", steps=2, width=256, height=256, seed=11, guidance_scale=5.0,
        batch_size=2, seed_resize_from=[320, 192]),
}

MODULES = [
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint",
]


def image_rng_noise(ImageRNG, case, factor, calls):
    """A `randn_tensor` for the pipeline modules: A1111's `ImageRNG.first()` on the pipeline's
    generators (see the module docs)."""
    n = case["batch_size"]
    varies = case.get("variation_strength", 0.0) != 0.0
    seeds = [case["seed"] + (0 if varies else i) for i in range(n)]
    subseeds = [case["variation_seed"] + i for i in range(n)] if varies else None
    from_w, from_h = case["seed_resize_from"]

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        calls.append(tuple(shape))
        gens = generator if isinstance(generator, list) else [generator]
        assert len(gens) == n == shape[0], (len(gens), n, shape)
        rng = ImageRNG(tuple(shape[1:]), seeds, subseeds=subseeds,
                       subseed_strength=case.get("variation_strength", 0.0),
                       seed_resize_from_h=(from_h // factor) * 8,
                       seed_resize_from_w=(from_w // factor) * 8)
        rng.generators = gens
        return rng.first().to(device=device, dtype=dtype)

    return randn_tensor


@torch.no_grad()
def main():
    args = a1111_args(__file__, __doc__, DEFAULT_OUT)
    if args is None:
        return

    import importlib

    import diffusers
    import transformers
    from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                           StableDiffusionPipeline)
    from safetensors.torch import save_file

    ImageRNG, digest = a1111_rng(args.a1111)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    modules = [importlib.import_module(m) for m in MODULES]
    pipes, tensors = {}, {}
    for label, case in CASES.items():
        model = case["model"]
        if model not in pipes:
            txt = StableDiffusionPipeline.from_pretrained(
                os.path.join(args.out, model), dtype=torch.float32, safety_checker=None,
                requires_safety_checker=False)
            comps = txt.components
            pipes[model] = dict(txt2img=txt, img2img=StableDiffusionImg2ImgPipeline(**comps),
                                inpaint=StableDiffusionInpaintPipeline(**comps),
                                own=dict(txt.scheduler.config))
            for p in pipes[model].values():
                if hasattr(p, "set_progress_bar_config"):
                    p.set_progress_bar_config(disable=True)
        pipe = pipes[model][case["mode"]]
        pipe.scheduler = make_scheduler(case["scheduler"], pipes[model]["own"])
        factor = pipe.vae_scale_factor
        calls = []
        patched = image_rng_noise(ImageRNG, case, factor, calls)
        originals = [m.randn_tensor for m in modules]
        for m in modules:
            m.randn_tensor = patched
        n = case["batch_size"]
        seeds = [case["seed"] + (0 if case.get("variation_strength", 0.0) else i)
                 for i in range(n)]
        kwargs = dict(prompt=case["prompt"], negative_prompt=case["negative_prompt"],
                      num_inference_steps=case["steps"], guidance_scale=case["guidance_scale"],
                      generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                      num_images_per_prompt=n, output_type="np")
        if case["mode"] == "txt2img":
            kwargs.update(width=case["width"], height=case["height"])
        else:
            image = Image.open(os.path.join(args.out, "images", case["init_image"]))
            assert image.size == (case["width"], case["height"])
            kwargs.update(image=image.convert("RGB"), strength=case["strength"])
            if case["mode"] == "inpaint":
                mask = Image.open(os.path.join(args.out, "images", case["mask_image"]))
                kwargs.update(mask_image=mask, width=case["width"], height=case["height"])
        try:
            out = pipe(**kwargs).images
        finally:
            for m, original in zip(modules, originals):
                m.randn_tensor = original
        latent = (n, pipe.unet.config.in_channels if case["mode"] != "inpaint"
                  else pipe.vae.config.latent_channels,
                  case["height"] // factor, case["width"] // factor)
        assert calls == [latent], (label, calls, latent)
        img = torch.from_numpy((out * 255).round().astype("uint8"))
        assert img.shape == (n, case["height"], case["width"], 3), img.shape
        assert float(img.float().std()) > 2.0, f"{label} is flat"
        tensors[f"image.{label}"] = img.contiguous()
        print(f"{label}: mean {img.float().mean():.1f} std {img.float().std():.1f}")

    meta = {
        "generated_by": "tools/make_seed_resize_images.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        "rng": f"modules/rng.py ImageRNG, source sha256 {digest}",
        "how": "prepare_latents' randn_tensor = ImageRNG(...).first() on the pipeline's "
               "generators; rng.py given (from // vae factor) * 8",
        "images": "image.<case>: [batch, H, W, 3] u8 = round(output_type='np' * 255)",
        "cases": CASES,
    }
    save_file(tensors, os.path.join(args.out, "seed-resize-images.safetensors"),
              metadata={"generated_by": "tools/make_seed_resize_images.py"})
    with open(os.path.join(args.out, "seed-resize-images.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
