#!/usr/bin/env python3
"""vae/factor16-diffusers: a tiny diffusers VAE folder of downscale factor 16 (five levels).

SD-family VAEs have factor 8, under which every size the API takes (multiples of 64, the hires
pass's upscale in multiples of 8) is whole latent cells. A model whose VAE has factor 16 takes
only multiples of 16, and an external VAE of another factor than the model's cannot decode its
latents: the server refuses both before queueing. Its tests use this folder as the VAE of a copy
of tiny-a-vae8 (a model of factor 16 that loads) and as a VAE_DIR entry that does not fit
tiny-a-vae8. Random weights from a fixed seed; no reference images (nothing is generated with it).

Pinned: torch 2.11.0, diffusers 0.42.1 (tools/requirements.txt).
Usage: python3 tools/make_vae_factor16.py   (from the repo root)
"""

import os
import shutil

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures", "vae", "factor16-diffusers")
SEED = 1600

VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 5,
    up_block_types=("UpDecoderBlock2D",) * 5,
    block_out_channels=(8, 8, 8, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=256,
    scaling_factor=0.18215,
)


@torch.no_grad()
def main():
    from diffusers import AutoencoderKL

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    torch.manual_seed(SEED)
    vae = AutoencoderKL(**VAE)
    vae.save_pretrained(OUT, safe_serialization=True)
    # diffusers' own factor for it, and the latents it makes of a 256x256 image.
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    lat = vae.encode(torch.zeros(1, 3, 256, 256)).latent_dist.mean
    assert factor == 16 and lat.shape == (1, 4, 16, 16), (factor, lat.shape)
    n = sum(p.numel() for p in vae.parameters())
    print(f"vae/factor16-diffusers: {n / 1e3:.0f}k params, factor {factor}, 256x256 -> {tuple(lat.shape)}")


if __name__ == "__main__":
    main()
