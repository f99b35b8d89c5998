#!/usr/bin/env python3
"""tiny-a-vae8: tiny-a with a VAE of downscale factor 8, for the server's 256x256 tests.

The API's smallest image is 256x256; tiny-a's VAE (factor 2) makes that 128x128 latents, which
takes minutes per generation on 2 cores. This folder reuses tiny-a's UNet, text encoder,
tokenizer, scheduler config and model_index.json byte for byte (so the LoRA fixtures made for
tiny-a, adapters/loras, fit it unchanged) and gives it its own VAE with four levels
(8, 8, 16, 16 channels: factor 8, so 256x256 -> 32x32 latents), random weights from a fixed seed.
There are no reference images: the server tests compare its outputs with each other.

Pinned: torch 2.11.0, diffusers 0.42.1 (tools/requirements.txt).
Usage: python3 tools/make_tiny_a_vae8.py   (from the repo root, after tools/make_tiny_models.py)
"""

import os
import shutil

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures")
BASE = os.path.join(FIXTURES, "tiny-a")
OUT = os.path.join(FIXTURES, "tiny-a-vae8")
SEED = 1800

# Copied unchanged from tiny-a.
SHARED = ["model_index.json", "unet", "text_encoder", "tokenizer", "scheduler"]

VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    # As large as the server's smallest image, so nothing is tiled there.
    sample_size=256,
    scaling_factor=0.18215,
)


@torch.no_grad()
def main():
    from diffusers import AutoencoderKL

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    for name in SHARED:
        src, dst = os.path.join(BASE, name), os.path.join(OUT, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copyfile)(src, dst)

    torch.manual_seed(SEED)
    vae = AutoencoderKL(**VAE)
    vae.save_pretrained(os.path.join(OUT, "vae"), safe_serialization=True)

    # The server tests tell images apart by their u8 pixels: the decoder must not be flat.
    g = torch.Generator("cpu").manual_seed(SEED + 1)
    lat = torch.randn(1, 4, 32, 32, generator=g) / VAE["scaling_factor"]
    img = vae.decode(lat).sample
    assert img.shape == (1, 3, 256, 256), img.shape
    u8 = ((img / 2 + 0.5).clamp(0, 1) * 255).round()
    std, distinct = float(u8.std()), len(torch.unique(u8))
    n = sum(p.numel() for p in vae.parameters())
    print(f"tiny-a-vae8: vae {n / 1e3:.0f}k params; 32x32 latents -> 256x256 image, "
          f"pixel std {std:.1f}, {distinct} distinct values")
    assert std > 2.0 and distinct > 20, "the decoder's images are (nearly) flat"


if __name__ == "__main__":
    main()
