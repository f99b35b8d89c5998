#!/usr/bin/env python3
"""References for crates/pipeline/src/interpolate.rs and the hires fix's image upscalers
(torch 2.11.0, Pillow as pinned in tools/requirements.txt).

Writes crates/pipeline/tests/fixtures/interpolate.safetensors:
  input                          = a [1, 4, 16, 12] float32 tensor (seeded normals times 3),
                                   the shape of latents
  <mode>[.aa].<h>x<w>            = torch.nn.functional.interpolate(input, size=(h, w),
                                   mode=<mode>, antialias=<.aa>), A1111's latent upscale modes
  image                          = a [23, 37, 3] uint8 RGB image (seeded)
  pil_nearest.<h>x<w>            = Image.resize((w, h), Image.NEAREST) of it, as uint8
Run from the repository root: python3 tools/make_interpolate_fixtures.py
"""
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

# A1111's shared.latent_upscale_modes: (mode, antialias).
MODES = [
    ("bilinear", False),
    ("bilinear", True),
    ("bicubic", False),
    ("bicubic", True),
    ("nearest", False),
    ("nearest-exact", False),
]
# 2x, 1.5x, an odd ratio, the same size, and shrinking (hr_scale < 1).
LATENT_SIZES = [(32, 24), (24, 18), (21, 31), (16, 12), (10, 7)]
IMAGE_SIZES = [(46, 74), (34, 55), (69, 111), (23, 37), (11, 20)]

OUT = os.path.join("crates", "pipeline", "tests", "fixtures")


def main():
    assert torch.__version__.startswith("2.11."), torch.__version__
    g = torch.Generator("cpu").manual_seed(7)
    x = torch.randn(1, 4, 16, 12, generator=g) * 3
    tensors = {"input": x}
    for mode, aa in MODES:
        for h, w in LATENT_SIZES:
            y = torch.nn.functional.interpolate(x, size=(h, w), mode=mode, antialias=aa)
            tensors[f"{mode}{'.aa' if aa else ''}.{h}x{w}"] = y
    rng = np.random.default_rng(11)
    image = rng.integers(0, 256, size=(23, 37, 3), dtype=np.uint8)
    tensors["image"] = torch.from_numpy(image)
    pil = Image.fromarray(image)
    for h, w in IMAGE_SIZES:
        out = np.asarray(pil.resize((w, h), resample=Image.NEAREST))
        tensors[f"pil_nearest.{h}x{w}"] = torch.from_numpy(out.copy())
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        os.path.join(OUT, "interpolate.safetensors"),
    )
    print(f"wrote {len(tensors)} tensors to {OUT}/interpolate.safetensors")


if __name__ == "__main__":
    main()
