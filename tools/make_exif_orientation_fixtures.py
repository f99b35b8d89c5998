#!/usr/bin/env python3
"""Uploaded images with an EXIF Orientation tag (phones write rotated JPEGs), as the references
read them, for the server's image decoding (crates/server/src/images.rs; tests/integration/images_in.rs).

Both references turn such an image upright with Pillow's `ImageOps.exif_transpose`:
  diffusers 0.42   `diffusers.utils.load_image` (the native API follows diffusers)
  A1111 v1.10.1    `modules/images.py` read -> fix_image (taken with `ast`, run as it is): what
                   its API's `decode_base64_to_image` does with init images, masks, the Extras'
                   images and (through it) the ControlNet extension's unit images
The two are checked to agree before anything is written.

The pictures: 40x24 (not square, so every turn shows in the size) of 8x8 blocks of distinct flat
colours, as 4:4:4 JPEGs at quality 100 (each block is its DC coefficient alone, which every
decoder reproduces the same), one for each Orientation 1..=8; and a lossless PNG (eXIf chunk)
and WebP (EXIF chunk) with Orientation 6 and 3; and a 320x256 JPEG with Orientation 6 (upright
256x320) for the server's HTTP tests.

Writes, under OUT (default crates/server/tests/fixtures/exif-orientation):
  <name>.<ext>            the file a client uploads
  <name>.expected.png     the upright RGB image the references read from it
  cases.json              the cases, their orientation, sizes, versions and A1111's digests

Usage:
  python tools/make_exif_orientation_fixtures.py --a1111 PATH/TO/stable-diffusion-webui [--out DIR]
"""

import io
import json
import os
import sys

import numpy as np
import PIL
from PIL import Image, ImageOps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import a1111_args, functions  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "server", "tests", "fixtures", "exif-orientation")
W, H, BLOCK = 40, 24, 8
ORIENTATION = 0x0112


def blocks(w=W, h=H):
    """Flat 8x8 blocks, each its own colour."""
    W, H = w, h
    cols, rows = W // BLOCK, H // BLOCK
    img = np.zeros((H, W, 3), np.uint8)
    for by in range(rows):
        for bx in range(cols):
            k = by * cols + bx
            colour = ((40 + 53 * k) % 256, (200 - 37 * k) % 256, (90 + 71 * k) % 256)
            img[by * BLOCK:(by + 1) * BLOCK, bx * BLOCK:(bx + 1) * BLOCK] = colour
    return Image.fromarray(img, "RGB")


def saved(image, fmt, orientation, **kw):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    out = io.BytesIO()
    image.save(out, format=fmt, exif=exif.tobytes(), **kw)
    return out.getvalue()


def main():
    args = a1111_args(__file__, __doc__, DEFAULT_OUT)
    if args is None:
        return
    import diffusers
    from diffusers.utils import load_image

    ns = {"Image": Image, "ImageOps": ImageOps}
    fns, digests = functions(os.path.join(args.a1111, "modules", "images.py"),
                             ["read", "fix_image", "fix_png_transparency"], ns)
    read = fns["read"]
    os.makedirs(args.out, exist_ok=True)
    picture = blocks()
    files = [(f"jpeg-{o}", "jpg", o, saved(picture, "JPEG", o, quality=100, subsampling=0))
             for o in range(1, 9)]
    files.append(("png-6", "png", 6, saved(picture, "PNG", 6)))
    files.append(("webp-3", "webp", 3, saved(picture, "WEBP", 3, lossless=True)))
    # For the server's tests (tests/integration/images_in.rs): a size the API takes, stored on its side.
    files.append(("http-jpeg-6", "jpg", 6, saved(blocks(320, 256), "JPEG", 6, quality=100,
                                                 subsampling=0)))
    listed = []
    for name, ext, orientation, data in files:
        path = os.path.join(args.out, f"{name}.{ext}")
        with open(path, "wb") as f:
            f.write(data)
        assert Image.open(path).getexif().get(ORIENTATION) == orientation, name
        a1111 = read(io.BytesIO(data)).convert("RGB")
        diffusers_image = load_image(path)
        assert np.array_equal(np.asarray(a1111), np.asarray(diffusers_image)), name
        a1111.save(os.path.join(args.out, f"{name}.expected.png"))
        listed.append({"name": name, "file": f"{name}.{ext}", "orientation": orientation,
                       "expected": f"{name}.expected.png", "size": list(a1111.size)})
        print(f"{name}: orientation {orientation}, upright {a1111.size}")
    meta = {"a1111": "v1.10.1", "pillow": PIL.__version__, "diffusers": diffusers.__version__,
            "a1111_digests": {f"images.{k}": v for k, v in digests.items()}, "cases": listed}
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
