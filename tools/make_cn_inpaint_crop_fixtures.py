#!/usr/bin/env python3
"""The sd-webui-controlnet extension's control images for A1111 img2img inpainting with
"only masked" (`inpaint_full_res`), for the A1111 dialect's ControlNet units
(crates/server/src/api/a1111/controlnet_img2img.rs; tests in translate_tests.rs and
crates/server/tests/integration/controlnet_img2img_http.rs).

Taken with `ast` from the checkouts and run as they are (not copied):
  sd-webui-controlnet  scripts/controlnet.py     prepare_mask, Script.choose_input_image,
                                                 Script.try_crop_image_with_a1111_mask,
                                                 Script.detectmap_proc, get_pytorch_control
                       internal_controlnet/args.py   ControlNetUnit.get_input_images_rgba,
                                                 parse_image, combine_image_and_mask,
                                                 is_inpaint, uses_clip
                       internal_controlnet/external_code.py  resize_mode_from_value
                       scripts/enums.py          ResizeMode
                       annotator/util.py         HWC3
                       scripts/utils.py          get_unique_axis0
  AUTOMATIC1111        modules/masking.py        get_crop_region, get_crop_region_v2,
                                                 expand_crop_region
                       modules/images.py         resize_image (no upscaler: Lanczos)
The unit is a stand-in object carrying the extension's own methods; `p` a stand-in
`StableDiffusionProcessingImg2Img` with the request's fields (the extension runs in the
`process` callback, before A1111's `init`: `p.image_mask` is the mask as sent).

Writes, under OUT (default crates/server/tests/fixtures/cn-inpaint-crop):
  init.png, mask.png, unit-mask.png  the request's images (synthetic); unit-rgba.png a unit
                                     image with alpha
  map-<case>.png                     the control map each case's unit gives the ControlNet
  cases.json                         the cases (A1111 fields), each one's crop region, the
                                     sources' sha256

Usage:
  python tools/make_cn_inpaint_crop_fixtures.py --a1111 PATH/TO/stable-diffusion-webui \
      --controlnet PATH/TO/sd-webui-controlnet [--out DIR]
"""

import argparse
import ast
import enum
import hashlib
import json
import logging
import os
import sys
import types
import typing

import cv2
import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageFilter, ImageOps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import functions  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "server", "tests", "fixtures", "cn-inpaint-crop")
CONTROL = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures", "images",
                       "control-80x48.png")

# The request's size and its images' size (not the request's aspect: the crop region grows).
WIDTH, HEIGHT = 256, 256
INIT_W, INIT_H = 320, 224
MASK_BOX = (180, 40, 260, 100)

# unit: "own" (control-80x48.png), "init" (none: img2img's init image), "scribble" (own image
# with a unit mask), "rgba" (unit-rgba.png: control-80x48.png with a partly transparent alpha); resize_mode the unit's; A1111's mask_blur, padding, invert.
CASES = {
    "own-crop": dict(unit="own", resize_mode="Crop and Resize", blur=4, padding=8, invert=0),
    "own-fill": dict(unit="own", resize_mode="Resize and Fill", blur=0, padding=0, invert=0),
    "own-resize": dict(unit="own", resize_mode="Just Resize", blur=4, padding=24, invert=0),
    "init": dict(unit="init", resize_mode="Crop and Resize", blur=4, padding=8, invert=0),
    "scribble": dict(unit="scribble", resize_mode="Crop and Resize", blur=2, padding=4,
                     invert=0),
    "inverted": dict(unit="own", resize_mode="Crop and Resize", blur=4, padding=0, invert=1),
    "rgba": dict(unit="rgba", resize_mode="Resize and Fill", blur=4, padding=8, invert=0),
}


def take_class(path, name, namespace):
    """Executes one class definition of a file in `namespace`; its source's sha256."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    (node,) = [n for n in ast.parse(source).body
               if isinstance(n, ast.ClassDef) and n.name == name]
    exec(compile(ast.Module(body=[node], type_ignores=[]), path, "exec"), namespace)
    return namespace[name], hashlib.sha256(ast.get_source_segment(source, node).encode()).hexdigest()


def synthetic_init():
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:INIT_H, 0:INIT_W].astype(np.float64)
    r = 255 * (0.15 + 0.7 * x / INIT_W)
    g = 255 * (0.2 + 0.6 * y / INIT_H)
    b = 255 * (0.5 + 0.4 * np.sin(x / 17.0 + y / 23.0))
    disc = (x - 210) ** 2 + (y - 70) ** 2 < 30 ** 2
    r[disc], g[disc], b[disc] = 240, 50, 40
    img = np.stack([r, g, b], -1) + rng.normal(0, 5, (INIT_H, INIT_W, 3))
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


def box_mask():
    m = np.zeros((INIT_H, INIT_W), np.uint8)
    x1, y1, x2, y2 = MASK_BOX
    m[y1:y2, x1:x2] = 255
    return Image.fromarray(m, "L").convert("RGB")


def scribble_mask():
    """A unit mask the size of control-80x48.png: a diagonal stroke (not flat)."""
    m = np.zeros((48, 80), np.uint8)
    cv2.line(m, (5, 40), (75, 6), 255, 5)
    return Image.fromarray(m, "L").convert("RGB")


def rgba_control():
    """control-80x48.png with an alpha ramp and a transparent band (HWC3 composites it)."""
    rgb = np.asarray(Image.open(CONTROL).convert("RGB"))
    h, w, _ = rgb.shape
    alpha = np.tile(np.linspace(40, 255, w).round().astype(np.uint8), (h, 1))
    alpha[10:20, :] = 0
    return Image.fromarray(np.concatenate([rgb, alpha[:, :, None]], axis=2), "RGBA")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a1111", default=os.environ.get("A1111_DIR"))
    ap.add_argument("--controlnet", default=os.environ.get("CONTROLNET_EXT_DIR"))
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    if not args.a1111 or not args.controlnet:
        print("make_cn_inpaint_crop_fixtures.py: skipped (needs --a1111 and --controlnet)")
        return
    ext, a1111 = args.controlnet, args.a1111
    digests = {}
    logger = logging.getLogger("controlnet")
    base = {"np": np, "cv2": cv2, "torch": torch, "Image": Image, "ImageOps": ImageOps,
            "ImageFilter": ImageFilter, "logger": logger, "rearrange": rearrange,
            "LANCZOS": Image.Resampling.LANCZOS, "enum": enum, "Enum": enum.Enum,
            "Union": typing.Union, "Optional": typing.Optional, "List": typing.List,
            "Tuple": typing.Tuple, "Any": typing.Any}

    # A1111's masking and resize.
    opts = types.SimpleNamespace(upscaler_for_img2img=None)
    shared_a = types.SimpleNamespace(opts=opts, sd_upscalers=[])
    ns_a = dict(base, opts=opts, shared=shared_a)
    masking_fns, d = functions(os.path.join(a1111, "modules", "masking.py"),
                               ["get_crop_region_v2", "get_crop_region", "expand_crop_region"],
                               ns_a)
    digests.update({f"a1111 masking.{k}": v for k, v in d.items()})
    images_fns, d = functions(os.path.join(a1111, "modules", "images.py"), ["resize_image"],
                              ns_a)
    digests.update({f"a1111 images.{k}": v for k, v in d.items()})
    masking = types.SimpleNamespace(**{k: v for k, v in masking_fns.items()})
    images = types.SimpleNamespace(resize_image=images_fns["resize_image"])

    # The extension's pieces.
    ns = dict(base, masking=masking, images=images)
    ResizeMode, digests["controlnet scripts/enums.py ResizeMode"] = take_class(
        os.path.join(ext, "scripts", "enums.py"), "ResizeMode", ns)
    util, d = functions(os.path.join(ext, "annotator", "util.py"), ["HWC3"], ns)
    digests.update({f"controlnet annotator/util.py {k}": v for k, v in d.items()})
    fns, d = functions(os.path.join(ext, "scripts", "utils.py"), ["get_unique_axis0"], ns)
    digests.update({f"controlnet scripts/utils.py {k}": v for k, v in d.items()})
    ns["resize_mode_aliases"] = {}
    ns["ResizeMode"] = ResizeMode
    ec, d = functions(os.path.join(ext, "internal_controlnet", "external_code.py"),
                      ["resize_mode_from_value"], ns)
    digests.update({f"controlnet external_code.py {k}": v for k, v in d.items()})
    unit_fns, d = functions(os.path.join(ext, "internal_controlnet", "args.py"),
                            ["ControlNetUnit.get_input_images_rgba",
                             "ControlNetUnit.parse_image",
                             "ControlNetUnit.combine_image_and_mask",
                             "ControlNetUnit.is_inpaint", "ControlNetUnit.uses_clip"], ns)
    digests.update({f"controlnet args.py {k}": v for k, v in d.items()})

    class StableDiffusionProcessingImg2Img:
        pass

    ns.update(
        StableDiffusionProcessingImg2Img=StableDiffusionProcessingImg2Img,
        devices=types.SimpleNamespace(get_device_for=lambda _: torch.device("cpu")),
        shared=types.SimpleNamespace(opts=types.SimpleNamespace(data={})),
        batch_hijack=types.SimpleNamespace(instance=types.SimpleNamespace(is_batch=False)),
        external_code=types.SimpleNamespace(
            resize_mode_from_value=ec["resize_mode_from_value"]),
        nake_nms=None, lvmin_thin=None,
        # Annotations only.
        processing=types.SimpleNamespace(StableDiffusionProcessing=object),
        StableDiffusionProcessing=object, ControlNetUnit=object,
    )
    cn, d = functions(os.path.join(ext, "scripts", "controlnet.py"),
                      ["prepare_mask", "get_pytorch_control", "Script.choose_input_image",
                       "Script.try_crop_image_with_a1111_mask", "Script.detectmap_proc"], ns)
    digests.update({f"controlnet scripts/controlnet.py {k}": v for k, v in d.items()})
    ns["Script"] = types.SimpleNamespace(
        get_remote_call=lambda p, attr, default=None, idx=0, strict=False, force=False: default,
        choose_input_image=cn["Script.choose_input_image"],
        try_crop_image_with_a1111_mask=cn["Script.try_crop_image_with_a1111_mask"],
        detectmap_proc=cn["Script.detectmap_proc"])

    class Unit:
        get_input_images_rgba = unit_fns["ControlNetUnit.get_input_images_rgba"]
        parse_image = classmethod(unit_fns["ControlNetUnit.parse_image"])
        combine_image_and_mask = classmethod(unit_fns["ControlNetUnit.combine_image_and_mask"])
        is_inpaint = property(unit_fns["ControlNetUnit.is_inpaint"])
        uses_clip = property(unit_fns["ControlNetUnit.uses_clip"])

    os.makedirs(args.out, exist_ok=True)
    init, mask, scribble = synthetic_init(), box_mask(), scribble_mask()
    init.save(os.path.join(args.out, "init.png"))
    mask.save(os.path.join(args.out, "mask.png"))
    scribble.save(os.path.join(args.out, "unit-mask.png"))
    rgba = rgba_control()
    rgba.save(os.path.join(args.out, "unit-rgba.png"))
    control = np.asarray(Image.open(CONTROL).convert("RGB"))

    out_cases = {}
    for name, c in CASES.items():
        unit = Unit()
        unit.module = "none"
        unit.resize_mode = ResizeMode(c["resize_mode"])
        unit.inpaint_crop_input_image = True
        # The API's decode: np.array of the image A1111's `images.read` opens.
        unit.image = {"init": None, "rgba": np.array(Image.open(
            os.path.join(args.out, "unit-rgba.png"))).astype("uint8")}.get(c["unit"], control)
        unit.mask = np.asarray(scribble) if c["unit"] == "scribble" else None
        p = StableDiffusionProcessingImg2Img()
        p.init_images = [init]
        p.image_mask = mask
        p.resize_mode = 0  # A1111's img2img default (Just resize), as the server runs it
        p.inpaint_full_res = True
        p.inpaint_full_res_padding = c["padding"]
        p.inpainting_mask_invert = c["invert"]
        p.mask_blur_x = p.mask_blur_y = c["blur"]
        p.width, p.height = WIDTH, HEIGHT
        p.extra_generation_params = {}

        image, resize_mode = ns["Script"].choose_input_image(p, unit, 0)
        image = ns["Script"].try_crop_image_with_a1111_mask(p, unit, image, resize_mode)
        _, detected = ns["Script"].detectmap_proc(image, unit.module, resize_mode, HEIGHT, WIDTH)
        assert detected.shape == (HEIGHT, WIDTH, 3), detected.shape
        Image.fromarray(detected).save(os.path.join(args.out, f"map-{name}.png"))
        prepared = cn["prepare_mask"](mask, p)
        region = masking.expand_crop_region(
            masking.get_crop_region(np.array(prepared), p.inpaint_full_res_padding),
            WIDTH, HEIGHT, prepared.width, prepared.height)
        out_cases[name] = dict(c, region=list(region))
        print(name, "region", region)

    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump({"width": WIDTH, "height": HEIGHT, "mask_box": list(MASK_BOX),
                   "control": "crates/pipeline/tests/fixtures/images/control-80x48.png",
                   "cases": out_cases, "sources": digests}, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
