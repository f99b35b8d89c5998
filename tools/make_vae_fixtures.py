#!/usr/bin/env python3
"""External VAEs (VAE_DIR, A1111's `sd_vae`) and diffusers' images with one swapped in.

A tiny VAE with the shapes of tiny-a-vae8's own but other random weights, written in the forms
users keep VAEs in, and the images diffusers makes with it decoding (and, for img2img,
encoding) in place of the model's own:
  vae = AutoencoderKL.from_single_file(file, config=<tiny-a-vae8>/vae)
  StableDiffusionPipeline.from_pretrained(tiny-a-vae8, vae=vae)
The same weights load as a diffusers folder (`AutoencoderKL.from_pretrained`) and from the
`.ckpt`: the script checks that all three give diffusers the same tensors.

Writes, under OUT (default crates/pipeline/tests/fixtures/vae):
  alt.safetensors        original LDM key names (`encoder.down.0.block.0.norm1.weight`, ...),
                         no prefix, fp16 (as most downloaded VAE files)
  alt.ckpt               torch.save({"state_dict": LDM keys + model_ema.decay/num_updates,
                         "global_step": 1}), fp16, zip format (as vae-ft-mse-840000's .ckpt)
  alt-diffusers/         a diffusers VAE folder (config.json, diffusion_pytorch_model.safetensors)
  wrong-shape.safetensors  LDM keys of a VAE whose last level is wider: does not fit tiny-a-vae8
  init-256.png           the img2img init image
  references.safetensors image.<case>: [1, H, W, 3] u8, diffusers' images
  references.json        each case's request (all cases at 256x256, the server's smallest size)

Pinned: torch 2.11.0, diffusers 0.42.1 (tools/requirements.txt). Runs after
tools/make_tiny_a_vae8.py (reads tiny-a-vae8/).
Usage: python3 tools/make_vae_fixtures.py [--out DIR]
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_single_file import VAE_PREFIX, vae_to_ldm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures")
MODEL = os.path.join(FIXTURES, "tiny-a-vae8")
SEED = 5150

# Requests: A1111's sampler `Euler` is diffusers' EulerDiscreteScheduler from the model's config.
CASES = {
    "txt2img": dict(prompt="a photo of an astronaut riding a horse on mars",
                    negative_prompt="blurry", steps=8, width=256, height=256, seed=42,
                    guidance_scale=7.5, scheduler="euler"),
    "img2img": dict(prompt="a red bench in a park", negative_prompt="", steps=8, width=256,
                    height=256, seed=7, guidance_scale=6.0, scheduler="euler", strength=0.75,
                    init_image="init-256.png"),
}


def ldm_state_dict(vae, config):
    """diffusers AutoencoderKL weights under LDM names, without `first_stage_model.`."""
    sd = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    return {k[len(VAE_PREFIX):]: v.contiguous() for k, v in vae_to_ldm(sd, config).items()}


def init_image():
    """Smooth gradients and a disc (no noise: the PNG stays small)."""
    y, x = np.mgrid[0:256, 0:256].astype(np.float64)
    u, v = x / 255, y / 255
    img = np.stack([255 * (0.2 + 0.6 * u), 255 * (0.3 + 0.5 * v),
                    255 * (0.5 + 0.4 * np.sin(6.0 * u + 3.0 * v))], -1)
    disc = (x - 150) ** 2 + (y - 100) ** 2 < 60 ** 2
    img[disc] = (230, 40, 60)
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


@torch.no_grad()
def main():
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline,
                           StableDiffusionPipeline)

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(FIXTURES, "vae"))
    args = ap.parse_args()
    out = args.out
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)

    vae_dir = os.path.join(MODEL, "vae")
    with open(os.path.join(vae_dir, "config.json")) as f:
        config = json.load(f)
    own = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32)

    torch.manual_seed(SEED)
    alt = AutoencoderKL.from_config(config)
    # fp16 is how the files are shared; the f32 copies hold the same (rounded) values.
    for p in alt.parameters():
        p.copy_(p.half().float())
    alt.eval()
    for a, b in zip(alt.parameters(), own.parameters()):
        assert a.shape == b.shape
    ldm = ldm_state_dict(alt, config)

    st_path = os.path.join(out, "alt.safetensors")
    save_file({k: v.half() for k, v in ldm.items()}, st_path)
    ckpt = {k: v.half() for k, v in ldm.items()}
    ckpt["model_ema.decay"] = torch.tensor(0.9999)
    ckpt["model_ema.num_updates"] = torch.tensor(840000, dtype=torch.int32)
    torch.save({"state_dict": ckpt, "global_step": 1}, os.path.join(out, "alt.ckpt"))
    alt.save_pretrained(os.path.join(out, "alt-diffusers"), safe_serialization=True)

    wide = dict(config, block_out_channels=[8, 8, 16, 8])
    torch.manual_seed(SEED + 1)
    wrong = AutoencoderKL.from_config(wide)
    save_file({k: v.half() for k, v in ldm_state_dict(wrong, wide).items()},
              os.path.join(out, "wrong-shape.safetensors"))

    # diffusers reads the three forms to the same tensors.
    single = AutoencoderKL.from_single_file(st_path, config=vae_dir, torch_dtype=torch.float32)
    folder = AutoencoderKL.from_pretrained(os.path.join(out, "alt-diffusers"),
                                           torch_dtype=torch.float32)
    ref = alt.state_dict()
    for name, other in (("single file", single), ("folder", folder)):
        got = other.state_dict()
        assert got.keys() == ref.keys(), name
        for k in ref:
            assert torch.equal(got[k], ref[k]), f"{name}: {k}"
    assert single.config.scaling_factor == config["scaling_factor"]

    init = init_image()
    init.save(os.path.join(out, "init-256.png"), optimize=True)

    txt = StableDiffusionPipeline.from_pretrained(MODEL, vae=single, dtype=torch.float32,
                                                  safety_checker=None,
                                                  requires_safety_checker=False)
    txt.set_progress_bar_config(disable=True)
    txt.scheduler = EulerDiscreteScheduler.from_config(txt.scheduler.config)
    img2img = StableDiffusionImg2ImgPipeline(**txt.components)
    img2img.set_progress_bar_config(disable=True)
    own_txt = StableDiffusionPipeline(**dict(txt.components, vae=own))
    own_txt.set_progress_bar_config(disable=True)

    tensors, cases = {}, {}
    for label, r in CASES.items():
        kw = dict(prompt=r["prompt"], negative_prompt=r["negative_prompt"],
                  num_inference_steps=r["steps"], guidance_scale=r["guidance_scale"],
                  generator=torch.Generator("cpu").manual_seed(r["seed"]), output_type="np")
        if "init_image" in r:
            images = img2img(image=init, strength=r["strength"], **kw).images
        else:
            images = txt(width=r["width"], height=r["height"], **kw).images
            kw["generator"] = torch.Generator("cpu").manual_seed(r["seed"])
            mine = own_txt(width=r["width"], height=r["height"], **kw).images
            # The swap must show: the model's own VAE gives another picture.
            assert np.abs(mine - images).mean() > 0.02, "the VAEs decode alike"
        u8 = torch.from_numpy(np.ascontiguousarray((images * 255).round().astype("uint8")))
        assert u8.shape == (1, r["height"], r["width"], 3), u8.shape
        tensors[f"image.{label}"] = u8
        cases[label] = r
        f = u8.float()
        print(f"{label}: mean {f.mean():.1f} std {f.std():.1f} distinct {len(torch.unique(u8))}")
        assert f.std() > 2.0, "flat image"

    save_file(tensors, os.path.join(out, "references.safetensors"))
    with open(os.path.join(out, "references.json"), "w") as f:
        json.dump({"model": "tiny-a-vae8", "vae": "alt.safetensors", "cases": cases}, f,
                  indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
