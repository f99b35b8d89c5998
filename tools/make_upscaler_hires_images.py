#!/usr/bin/env python3
"""Reference images for the hires fix with an ESRGAN upscaler (`hr_upscaler` = an
UPSCALERS_DIR model): the first pass by diffusers, the upscale by A1111's own code, the second
pass by diffusers' img2img, on the tiny fixture model tiny-a-vae8 with the tiny ESRGAN files of
tools/make_esrgan_fixtures.py (runs after both: tools/make_tiny_a_vae8.py, esrgan/).

Each case, as A1111's `StableDiffusionProcessingTxt2Img.sample_hr_pass` runs an image upscaler
(diffusers' semantics elsewhere, as the pipeline's hires pass):
  1. txt2img at width x height (diffusers `StableDiffusionPipeline`, the scheduler by its API
     name, one generator seeded with the seed), its latents decoded (`vae.decode(latents /
     sf)`) and made 8-bit as A1111's `sample_hr_pass` makes them: `255. * clamp((x + 1) / 2)`
     then `astype(np.uint8)`, which truncates (tools/make_upscale_hires_fixtures.py runs that
     code itself);
  2. `images.resize_image(0, image, hires_w, hires_h, upscaler_name=name)` from a checkout of
     AUTOMATIC1111/stable-diffusion-webui (taken with `ast`, not copied; A1111 1.8.0 or
     later, run on v1.10.1, master's head), its `shared.sd_upscalers` holding the model as
     A1111's `UpscalerESRGAN`: modules/upscaler.py `Upscaler.upscale` (the model's rounds by
     `max(w / w0, h / h0)`, then Lanczos to the size floored to 8) over
     modules/upscaler_utils.py `upscale_with_model` (192 px tiles, overlap 8, each tile's
     output rounded to bytes: tools/make_esrgan_fixtures.py), the network loaded by spandrel
     in f32 (as `UpscalerESRGAN` loads it, beside a half-precision model too); then Lanczos
     to the size where it is not that already.
  3. img2img of that image at its size (diffusers `StableDiffusionImg2ImgPipeline`, hires
     steps and strength, a fresh generator seeded with the seed: A1111's `ImageRNG(seeds)`).

Writes, under OUT (default crates/pipeline/tests/fixtures):
  upscaler-hires-images.safetensors   image.<case>: [H, W, 3] u8 = round(np output * 255)
                                      first.<case>, upscaled.<case>: [H, W, 3] u8, the images
                                      of steps 1 and 2
  upscaler-hires-images.json          the cases, the sources' digests and the versions

Usage:
  python tools/make_upscaler_hires_images.py --a1111 PATH/TO/stable-diffusion-webui [--out DIR]
"""

import inspect
import json
import os
import sys
import types

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from api_schedulers import make_scheduler  # noqa: E402
from a1111_source import a1111_args, functions  # noqa: E402
from make_esrgan_fixtures import a1111, narrow_growth  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures")

# Upscaler names as they would sit in UPSCALERS_DIR (the file's stem).
CASES = {
    # A 4x model asked for 2x: one round (256x192), then Lanczos down to 128x96.
    "x4_by_2": dict(
        upscaler="x4-old", file="esrgan/x4-old.pth", model="tiny-a-vae8", scheduler="euler",
        prompt="a lighthouse on a cliff", negative_prompt="fog", steps=4, width=64,
        height=48, seed=21, guidance_scale=6.0, hires_width=128, hires_height=96,
        hires_steps=6, strength=0.5),
    # A 2x model asked for 3x: two rounds (128x96, 256x192), then Lanczos to 192x144.
    "x2_by_3": dict(
        upscaler="x2-old", file="esrgan/x2-old.safetensors", model="tiny-a-vae8",
        scheduler="euler_a", prompt="a red fox in the snow", negative_prompt="", steps=4,
        width=64, height=48, seed=7, guidance_scale=7.0, hires_width=192, hires_height=144,
        hires_steps=5, strength=0.6),
}


def a1111_resize_image(checkout, upscale_by):
    """`images.resize_image` with `shared.sd_upscalers` = the given models."""
    ns = {"Image": Image, "LANCZOS": Image.Resampling.LANCZOS,
          "opts": types.SimpleNamespace(upscaler_for_img2img=None),
          "shared": types.SimpleNamespace(sd_upscalers=[])}
    ns["shared"].opts = ns["opts"]
    fns, digests = functions(os.path.join(checkout, "modules", "images.py"), ["resize_image"], ns)
    resize_image = fns["resize_image"]
    takes_name = "upscaler_name" in inspect.signature(resize_image).parameters

    class Scaler:
        def __init__(self, model):
            self.model = model

        def upscale(self, img, scale, data_path):
            return upscale_by(self.model, img, scale)

    def resize(image, width, height, name, model):
        ns["shared"].sd_upscalers[:] = [types.SimpleNamespace(name=name, scaler=Scaler(model),
                                                              data_path=None)]
        if takes_name:
            return resize_image(0, image, width, height, upscaler_name=name)
        ns["opts"].upscaler_for_img2img = name
        return resize_image(0, image, width, height)

    return resize, digests


@torch.no_grad()
def main():
    args = a1111_args(__file__, __doc__, DEFAULT_OUT)
    if args is None:
        return

    import diffusers
    import spandrel
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
    from safetensors.torch import save_file

    narrow_growth()
    _, _, upscale_by, digests = a1111(args.a1111)
    resize, d2 = a1111_resize_image(args.a1111, upscale_by)
    digests.update(d2)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    pipes, tensors = {}, {}
    for label, case in CASES.items():
        if case["model"] not in pipes:
            txt = StableDiffusionPipeline.from_pretrained(
                os.path.join(args.out, case["model"]), dtype=torch.float32,
                safety_checker=None, requires_safety_checker=False)
            img = StableDiffusionImg2ImgPipeline(**txt.components)
            for p in (txt, img):
                p.set_progress_bar_config(disable=True)
            pipes[case["model"]] = (txt, img, dict(txt.scheduler.config))
        txt, img2img, own = pipes[case["model"]]
        txt.scheduler = make_scheduler(case["scheduler"], own)
        img2img.scheduler = make_scheduler(case["scheduler"], own)
        common = dict(prompt=case["prompt"], negative_prompt=case["negative_prompt"],
                      guidance_scale=case["guidance_scale"])
        latents = txt(**common, num_inference_steps=case["steps"], width=case["width"],
                      height=case["height"],
                      generator=torch.Generator("cpu").manual_seed(case["seed"]),
                      output_type="latent").images
        decoded = txt.vae.decode(latents / txt.vae.config.scaling_factor).sample
        x = torch.clamp((decoded[0].to(torch.float32) + 1.0) / 2.0, min=0.0, max=1.0)
        first = Image.fromarray((255. * np.moveaxis(x.numpy(), 0, 2)).astype(np.uint8))
        model = spandrel.ModelLoader().load_from_file(
            os.path.join(args.out, case["file"])).model.eval()
        upscaled = resize(first, case["hires_width"], case["hires_height"], case["upscaler"],
                          model)
        assert upscaled.size == (case["hires_width"], case["hires_height"]), upscaled.size
        out = img2img(**common, image=upscaled, strength=case["strength"],
                      num_inference_steps=case["hires_steps"],
                      generator=torch.Generator("cpu").manual_seed(case["seed"]),
                      output_type="np").images[0]
        image = torch.from_numpy((out * 255).round().astype("uint8"))
        assert image.shape == (case["hires_height"], case["hires_width"], 3), image.shape
        assert float(image.float().std()) > 2.0, f"{label} is flat"
        tensors[f"image.{label}"] = image.contiguous()
        tensors[f"first.{label}"] = torch.from_numpy(np.array(first)).contiguous()
        tensors[f"upscaled.{label}"] = torch.from_numpy(np.array(upscaled)).contiguous()
        print(f"{label}: {first.size} -> {upscaled.size}, mean {image.float().mean():.1f} "
              f"std {image.float().std():.1f}")

    meta = {
        "generated_by": "tools/make_upscaler_hires_images.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "spandrel": spandrel.__version__},
        "a1111_sources": {k: f"sha256 {v}" for k, v in digests.items()},
        "images": "image.<case>: [H, W, 3] u8 = round(output_type='np' * 255); first.<case>: "
                  "the first pass's image, truncated to 8 bits as A1111's sample_hr_pass; "
                  "upscaled.<case>: resize_image's result",
        "cases": CASES,
    }
    save_file(tensors, os.path.join(args.out, "upscaler-hires-images.safetensors"),
              metadata={"generated_by": "tools/make_upscaler_hires_images.py"})
    with open(os.path.join(args.out, "upscaler-hires-images.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
