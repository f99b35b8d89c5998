#!/usr/bin/env python3
"""An inpainting model (9-channel UNet) run without a mask: the whole image repainted.

A1111 runs an inpainting checkpoint in txt2img (and its hires pass) with
`txt2img_image_conditioning` (a mask of ones and the latents of a grey image, 0.5 in [0, 1]) and
in img2img without a mask with `inpainting_image_conditioning` (a mask of ones; the image times
`1 - mask`: zeros). diffusers' StableDiffusionInpaintPipeline given an all-white mask feeds the
UNet the same conditioning (`masked_image = image * (mask < 0.5)`: zeros, encoded and sampled
with the generator after the starting noise), so these references are that pipeline with a white
mask:
  txt2img.*   strength 1.0: diffusers starts from pure noise and, for a 9-channel UNet, never
              encodes the init image, so the image is text-to-image (checked: two different init
              images give the same pixels);
  img2img.*   strength below 1: the init image noised, repainted everywhere.
One image per request (with a list of generators diffusers samples the masked image's latents
with the first generator alone; sdserve keeps image i the single run of seed + i, checked in
tests/integration/img2img_images.rs).

Pinned: torch 2.11.0, diffusers 0.42.1 (tools/requirements.txt). Runs after
tools/make_img2img_fixtures.py (reads tiny-inpaint/ and images/init-32x32.png).

Writes, under OUT (default crates/pipeline/tests/fixtures):
  inpainting-unmasked.safetensors  image.<case>: [1, H, W, 3] u8 = round(output_type='np' * 255)
  inpainting-unmasked.json         the cases, in img2img.json's form (no mask_image)

Usage:
  python tools/make_unmasked_inpainting_fixtures.py [--out DIR]
"""

import argparse
import json
import os
import sys

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_img2img_fixtures as img2img  # noqa: E402

MODEL = "tiny-inpaint"


@torch.no_grad()
def main():
    import diffusers
    from diffusers import StableDiffusionInpaintPipeline
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=img2img.DEFAULT_OUT)
    out_root = ap.parse_args().out
    pipe = img2img.load_pipe(StableDiffusionInpaintPipeline, os.path.join(out_root, MODEL))
    own = dict(pipe.scheduler.config)
    init_name = "init-32x32.png"
    init = Image.open(os.path.join(out_root, "images", init_name)).convert("RGB")
    other = img2img.synthetic_image(48, 48, seed=4848)

    cases, tensors = {}, {}

    def run(label, mode, scheduler, strength, width=32, height=32, image=None):
        r = dict(img2img.BASE[MODEL], width=width, height=height)
        img2img.set_scheduler(pipe, own, scheduler)
        source = image if image is not None else init
        if source.size != (width, height):
            source = source.resize((width, height), Image.LANCZOS)
        white = Image.new("L", (width, height), 255)
        out = pipe(prompt=r["prompt"], negative_prompt=r["negative_prompt"],
                   num_inference_steps=r["steps"], guidance_scale=r["guidance_scale"],
                   image=source, mask_image=white, strength=strength, width=width,
                   height=height, generator=torch.Generator("cpu").manual_seed(r["seed"]),
                   output_type="np").images
        img = img2img.to_u8(out)
        st = img.float()
        print(f"{label}: mean {st.mean():.1f} std {st.std():.1f}")
        if mode == "txt2img":
            return img
        tensors[f"image.{label}"] = img
        cases[label] = dict(r, model=MODEL, mode=mode, scheduler=scheduler,
                            strength=strength, init_image=init_name, mask_image=None,
                            batch_size=1)
        return img

    def txt2img(label, scheduler, width=32, height=32):
        a = run(label, "txt2img", scheduler, 1.0, width, height)
        b = run(label, "txt2img", scheduler, 1.0, width, height, image=other)
        assert torch.equal(a, b), f"{label}: the init image changed a strength 1.0 run"
        tensors[f"image.{label}"] = a
        cases[label] = dict(img2img.BASE[MODEL], width=width, height=height, model=MODEL,
                            mode="txt2img", scheduler=scheduler, strength=None,
                            init_image=None, mask_image=None, batch_size=1)

    txt2img("txt2img.euler_a", "euler_a")
    txt2img("txt2img.default", None)
    txt2img("txt2img.dpmpp_2m.48x32", "dpmpp_2m", width=48, height=32)
    run("img2img.euler.0.6", "img2img", "euler", 0.6)
    run("img2img.ddim.0.3", "img2img", "ddim", 0.3)

    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(out_root, "inpainting-unmasked.safetensors"),
              metadata={"generated_by": "tools/make_unmasked_inpainting_fixtures.py"})
    meta = {
        "generated_by": "tools/make_unmasked_inpainting_fixtures.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "images": "image.<case>: [1, H, W, 3] u8 = round(output_type='np' * 255): "
                  "StableDiffusionInpaintPipeline with an all-white mask",
        "cases": cases,
    }
    with open(os.path.join(out_root, "inpainting-unmasked.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    for k, v in tensors.items():
        assert float(v.float().std()) > 2.0, f"{k} is (nearly) flat"


if __name__ == "__main__":
    main()
