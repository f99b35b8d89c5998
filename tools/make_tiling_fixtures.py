#!/usr/bin/env python3
"""Reference images for A1111's `tiling` (seamless textures): diffusers 0.42.1's pipelines on
the tiny fixture models with every torch.nn.Conv2d of the UNet and the VAE switched to
`padding_mode = "circular"`, which is exactly what A1111 does for a `tiling` run
(modules/sd_hijack.py `apply_circular`: every Conv2d of the loaded model; it has no other
effect). Pinned: torch 2.11.0, diffusers 0.42.1 (tools/requirements.txt). Runs after
tools/make_tiny_models.py and tools/make_img2img_fixtures.py (reads tiny-a/, tiny-b/, images/).

Writes, under OUT (default crates/pipeline/tests/fixtures):
  tiling.safetensors   image.<case>: [1, H, W, 3] u8, what diffusers returns with circular convs
  tiling.json          every case's request

Usage:
  python tools/make_tiling_fixtures.py [--out DIR]
"""

import argparse
import json
import os

import torch
from PIL import Image

from api_schedulers import SCHEDULERS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures")

CASES = {
    # Square with CFG, a first-order and an ancestral (noise-drawing) scheduler.
    "tiny-a.txt2img.euler": dict(model="tiny-a", mode="txt2img", scheduler="euler",
                                 prompt="a seamless stone wall texture", negative_prompt="blurry",
                                 steps=12, width=64, height=64, seed=42, guidance_scale=7.5),
    "tiny-a.txt2img.euler_a": dict(model="tiny-a", mode="txt2img", scheduler="euler_a",
                                   prompt="a seamless stone wall texture", negative_prompt="",
                                   steps=8, width=64, height=64, seed=5, guidance_scale=6.0),
    # Non-square, multistep.
    "tiny-b.txt2img.dpmpp_2m": dict(model="tiny-b", mode="txt2img", scheduler="dpmpp_2m",
                                    prompt="tileable moss pattern", negative_prompt="",
                                    steps=10, width=48, height=80, seed=3000000000,
                                    guidance_scale=5.0),
    # img2img: the VAE encoder's padded convs wrap too (its downsamplers' asymmetric F.pad
    # stays zeros: those convs have padding 0).
    "tiny-a.img2img.euler.0.75": dict(model="tiny-a", mode="img2img", scheduler="euler",
                                      prompt="a seamless stone wall texture",
                                      negative_prompt="", steps=12, width=32, height=32,
                                      seed=9, guidance_scale=7.5, strength=0.75,
                                      init_image="init-32x32.png"),
}


def make_circular(pipe):
    """A1111's apply_circular(True), on the pipeline's UNet and VAE."""
    n = 0
    for module in (pipe.unet, pipe.vae):
        for layer in module.modules():
            if type(layer) is torch.nn.Conv2d:
                layer.padding_mode = "circular"
                n += 1
    return n


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()

    import diffusers
    import transformers
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
    from safetensors.torch import save_file

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    pipes = {}
    tensors, cases = {}, {}
    for label, case in CASES.items():
        model = case["model"]
        if model not in pipes:
            txt = StableDiffusionPipeline.from_pretrained(
                os.path.join(args.out, model), dtype=torch.float32, safety_checker=None,
                requires_safety_checker=False)
            convs = make_circular(txt)
            assert convs > 10, convs
            i2i = StableDiffusionImg2ImgPipeline(**txt.components)
            for p in (txt, i2i):
                p.set_progress_bar_config(disable=True)
            pipes[model] = dict(txt2img=txt, img2img=i2i, own=dict(txt.scheduler.config))
        pipe = pipes[model][case["mode"]]
        cls_name, extra = SCHEDULERS[case["scheduler"]]
        pipe.scheduler = getattr(diffusers, cls_name).from_config(pipes[model]["own"], **extra)
        kwargs = dict(prompt=case["prompt"], negative_prompt=case["negative_prompt"],
                      num_inference_steps=case["steps"], guidance_scale=case["guidance_scale"],
                      generator=torch.Generator("cpu").manual_seed(case["seed"]),
                      output_type="np")
        if case["mode"] == "txt2img":
            kwargs.update(width=case["width"], height=case["height"])
        else:
            image = Image.open(os.path.join(args.out, "images", case["init_image"]))
            assert image.size == (case["width"], case["height"])
            kwargs.update(image=image.convert("RGB"), strength=case["strength"])
        out = pipe(**kwargs).images
        img = torch.from_numpy((out * 255).round().astype("uint8"))
        assert img.shape == (1, case["height"], case["width"], 3), img.shape
        assert float(img.float().std()) > 2.0, f"{label} is flat"
        tensors[f"image.{label}"] = img.contiguous()
        cases[label] = case
        print(f"{label}: mean {img.float().mean():.1f} std {img.float().std():.1f}")

    meta = {
        "generated_by": "tools/make_tiling_fixtures.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        "how": "every torch.nn.Conv2d of unet and vae: padding_mode = 'circular' (A1111 tiling)",
        "images": "image.<case>: [1, H, W, 3] u8 = round(output_type='np' * 255)",
        "cases": cases,
    }
    save_file(tensors, os.path.join(args.out, "tiling.safetensors"),
              metadata={"generated_by": "tools/make_tiling_fixtures.py"})
    with open(os.path.join(args.out, "tiling.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
