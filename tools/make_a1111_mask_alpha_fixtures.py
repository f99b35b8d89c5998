#!/usr/bin/env python3
"""A1111's reading of an img2img `mask` with transparency, for the A1111 dialect's mask
(crates/server/src/images.rs `decode_a1111_mask`; the server's tests/integration/inpaint_http.rs).

From a checkout of AUTOMATIC1111/stable-diffusion-webui (v1.10.1; taken with `ast`, not copied),
these run as they are:
  modules/images.py       read, fix_image, fix_png_transparency (what the API's
                          decode_base64_to_image does with the bytes)
  modules/processing.py   create_binary_mask (StableDiffusionProcessingImg2Img.init, with
                          mask_round at its default True, and False)
on small mask files of every kind Pillow opens differently: RGBA with graded alpha, RGBA fully
opaque, LA, palette with one fully transparent entry (Pillow keeps it `P`) and with graded
entries (`RGBA`), RGB with a transparent colour, 16-bit RGBA, WebP with alpha.

Writes, under OUT (default crates/server/tests/fixtures/a1111-mask-alpha):
  <case>.png / <case>.webp   the mask file a client sends
  <case>.expected.png        A1111's binary mask (mode L) for it
  <case>.unrounded.png       its mask with mask_round False (mode L: the alpha's grey levels)
  cases.json                 the cases, what Pillow opened each as, and the functions' digests

Usage:
  python tools/make_a1111_mask_alpha_fixtures.py --a1111 PATH/TO/stable-diffusion-webui [--out DIR]
"""

import io
import json
import os
import sys
import struct
import zlib

import numpy as np
import PIL
from PIL import Image, ImageOps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import a1111_args, functions  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "server", "tests", "fixtures", "a1111-mask-alpha")
W, H = 40, 24


def a1111(checkout):
    mod = os.path.join(checkout, "modules")
    ns = {"Image": Image, "ImageOps": ImageOps}
    images, d1 = functions(os.path.join(mod, "images.py"),
                           ["read", "fix_image", "fix_png_transparency"], ns)
    proc, d2 = functions(os.path.join(mod, "processing.py"), ["create_binary_mask"], ns)
    digests = {f"images.{k}": v for k, v in d1.items()}
    digests.update({f"processing.{k}": v for k, v in d2.items()})
    return images["read"], proc["create_binary_mask"], digests


def png16_rgba(rgba16):
    """A 16-bit RGBA PNG (Pillow cannot write one): big-endian samples, filter 0 rows."""
    h, w, _ = rgba16.shape
    raw = b"".join(b"\0" + rgba16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def saved(image, fmt, **kw):
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def cases():
    """(name, file bytes, extension): each mask file a client might send."""
    y, x = np.mgrid[0:H, 0:W]
    # Every alpha value around A1111's threshold (> 128), and the extremes, in a pattern.
    alpha = ((x * 7 + y * 11) % 256).astype(np.uint8)
    alpha[0, :6] = [0, 127, 128, 129, 254, 255]
    # Colours whose luminance is not the alpha's mask: reading them instead shows.
    rgb = np.stack([(x * 13) % 256, (y * 29) % 256, ((x + y) * 17) % 256], -1).astype(np.uint8)
    rgba = np.dstack([rgb, alpha])
    out = [("rgba-graded", saved(Image.fromarray(rgba, "RGBA"), "PNG"), "png")]
    opaque = rgba.copy()
    opaque[..., 3] = 255
    out.append(("rgba-opaque", saved(Image.fromarray(opaque, "RGBA"), "PNG"), "png"))
    la = np.dstack([rgb[..., 0], alpha])
    out.append(("la", saved(Image.fromarray(la, "LA"), "PNG"), "png"))
    # A palette of 16 colours; index = a pattern.
    index = ((x // 3 + y // 2) % 16).astype(np.uint8)
    palette = [int(v) for i in range(16) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]
    p = Image.fromarray(index, "P")
    p.putpalette(palette)
    out.append(("p-one-transparent", saved(p, "PNG", transparency=5), "png"))
    graded = bytes((i * 17) % 256 for i in range(16))
    out.append(("p-graded", saved(p, "PNG", transparency=graded), "png"))
    out.append(("rgb-transparent-colour", saved(Image.fromarray(rgb, "RGB"), "PNG",
                                                 transparency=tuple(int(v) for v in rgb[3, 3])), "png"))
    # 16-bit: Pillow keeps each sample's high byte (0x80ff is 128, not 129 rounded).
    wide = rgba.astype(np.uint16) * 257
    wide[1, :4, 3] = [0x80FF, 0x8100, 0x807F, 0x8180]
    out.append(("rgba16", png16_rgba(wide), "png"))
    out.append(("webp-alpha", saved(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True), "webp"))
    return out


def main():
    args = a1111_args(__file__, __doc__, DEFAULT_OUT)
    if args is None:
        return
    read, create_binary_mask, digests = a1111(args.a1111)
    os.makedirs(args.out, exist_ok=True)
    listed = []
    for name, data, ext in cases():
        with open(os.path.join(args.out, f"{name}.{ext}"), "wb") as f:
            f.write(data)
        # The API's decode_base64_to_image: images.read of the decoded bytes.
        opened = read(io.BytesIO(data))
        mask = create_binary_mask(opened, round=True)
        assert mask.mode == "L" and mask.size == (W, H), (name, mask.mode, mask.size)
        mask.save(os.path.join(args.out, f"{name}.expected.png"))
        unrounded = create_binary_mask(opened, round=False)
        assert unrounded.mode == "L" and unrounded.size == (W, H), (name, unrounded.mode)
        unrounded.save(os.path.join(args.out, f"{name}.unrounded.png"))
        alpha_used = opened.mode == "RGBA" and opened.getextrema()[-1] != (255, 255)
        listed.append({"name": name, "file": f"{name}.{ext}", "expected": f"{name}.expected.png",
                       "unrounded": f"{name}.unrounded.png",
                       "pillow_mode": opened.mode, "alpha_used": alpha_used})
        print(f"{name}: opened as {opened.mode}, alpha used: {alpha_used}")
    meta = {"a1111": "v1.10.1 (82a973c0)", "pillow": PIL.__version__, "digests": digests,
            "cases": listed}
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
