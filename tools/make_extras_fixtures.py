#!/usr/bin/env python3
"""Reference images for A1111's "Extras" upscaling (`/sdapi/v1/extra-single-image`,
`extra-batch-images`) with its built-in upscalers `Lanczos` and `Nearest` (Pillow resizes).

A1111's own code runs here, taken with `ast` from a checkout of
AUTOMATIC1111/stable-diffusion-webui (the functions' source is executed, not copied; it needs
A1111 1.8.0 or later and was run on v1.10.1, master's head):
`modules/upscaler.py` (`Upscaler.upscale`: the upscaler's resize where the image is below the
size floored to a multiple of 8, then a Lanczos resize to that multiple of 8;
`UpscalerLanczos.do_upscale`, `UpscalerNearest.do_upscale`) and
`scripts/postprocessing_upscale.py` (`ScriptPostprocessingUpscale.upscale` and `.process`:
scale by, or scale to `upscaling_resize_w` x `upscaling_resize_h` with its crop, the second
upscaler blended by `Image.blend`, the `Postprocess ...` info). Around them, what
`modules/postprocessing.py` `run_postprocessing` does for one image: `convert("RGB")`, the
info joined to the infotext, `plaintext_to_html` (modules/ui_common.py) for `html_info`.
Pinned: Pillow (tools/requirements.txt).

Inputs are real PNGs made here (RGB, RGBA and greyscale, odd sizes) from a seeded generator.

Writes, under OUT (default crates/pipeline/tests/fixtures/extras):
  input.<name>.png        the images sent
  output.<case>.png       A1111's result for each case (RGB)
  extras.json             the cases (the API's fields), each result's infotext and html_info,
                          the source digests and versions

Usage:
  python tools/make_extras_fixtures.py --a1111 PATH/TO/stable-diffusion-webui [--out DIR]
"""

import html
import json
import os
import sys
import types

import numpy as np
import PIL
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import a1111_args, functions  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures", "extras")

# The API's fields (A1111's ExtrasBaseRequest names) per case, on which input.
CASES = {
    "lanczos_by_2": ("rgb", dict(resize_mode=0, upscaling_resize=2, upscaler_1="Lanczos")),
    "nearest_by_2_5": ("rgb", dict(resize_mode=0, upscaling_resize=2.5, upscaler_1="Nearest")),
    "lanczos_by_0_45": ("rgba", dict(resize_mode=0, upscaling_resize=0.45, upscaler_1="Lanczos")),
    "nearest_by_1_7_grey": ("grey", dict(resize_mode=0, upscaling_resize=1.7, upscaler_1="Nearest")),
    "to_200x100_crop": ("rgb", dict(resize_mode=1, upscaling_resize_w=200, upscaling_resize_h=100,
                                   upscaling_crop=True, upscaler_1="Lanczos")),
    "to_150x150_no_crop": ("rgba", dict(resize_mode=1, upscaling_resize_w=150,
                                        upscaling_resize_h=150, upscaling_crop=False,
                                        upscaler_1="Nearest")),
    # The upscaled image is smaller than the target on one side (a multiple of 8): black
    # edges where the paste does not reach.
    "to_130x47_crop_edges": ("rgb", dict(resize_mode=1, upscaling_resize_w=130,
                                         upscaling_resize_h=47, upscaling_crop=True,
                                         upscaler_1="Lanczos")),
    "blend_lanczos_nearest_0_35": ("rgb", dict(resize_mode=1, upscaling_resize_w=100,
                                               upscaling_resize_h=60, upscaling_crop=True,
                                               upscaler_1="Lanczos", upscaler_2="Nearest",
                                               extras_upscaler_2_visibility=0.35)),
    "blend_nearest_lanczos_0_5_grey": ("grey", dict(resize_mode=0, upscaling_resize=3.3,
                                                    upscaler_1="Nearest", upscaler_2="Lanczos",
                                                    extras_upscaler_2_visibility=0.5)),
    "blend_visibility_1": ("rgba", dict(resize_mode=0, upscaling_resize=1.5, upscaler_1="Lanczos",
                                        upscaler_2="Nearest", extras_upscaler_2_visibility=1.0)),
    "none_keeps_the_image": ("rgba", dict(resize_mode=0, upscaling_resize=2, upscaler_1="None",
                                          upscaler_2="Lanczos", extras_upscaler_2_visibility=0.5)),
    # 33x20 by 1.1 floors to 32x16, which the image covers: no Nearest round, Lanczos alone.
    "nearest_by_1_1_grey": ("grey", dict(resize_mode=0, upscaling_resize=1.1,
                                         upscaler_1="Nearest")),
    "second_none_is_ignored": ("grey", dict(resize_mode=0, upscaling_resize=2,
                                            upscaler_1="Lanczos", upscaler_2="None",
                                            extras_upscaler_2_visibility=0.7)),
}

# ExtrasBaseRequest's defaults (modules/api/models.py).
DEFAULTS = dict(resize_mode=0, upscaling_resize=2, upscaling_resize_w=512, upscaling_resize_h=512,
                upscaling_crop=True, upscaler_1="None", upscaler_2="None",
                extras_upscaler_2_visibility=0)


def inputs():
    rng = np.random.default_rng(20261205)

    def pattern(h, w, c):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)),
                         ((x + y) * 7) % 256][:c], axis=-1)
        noise = rng.integers(-40, 41, size=(h, w, c))
        return np.clip(base + noise, 0, 255).astype(np.uint8)

    rgba = pattern(56, 40, 3)
    alpha = rng.integers(0, 256, size=(56, 40, 1)).astype(np.uint8)
    return {
        "rgb": Image.fromarray(pattern(37, 61, 3), "RGB"),
        "rgba": Image.fromarray(np.concatenate([rgba, alpha], axis=-1), "RGBA"),
        "grey": Image.fromarray(pattern(20, 33, 1)[:, :, 0], "L"),
    }


def a1111(checkout):
    lanczos = Image.Resampling.LANCZOS
    nearest = Image.Resampling.NEAREST
    state = types.SimpleNamespace(interrupted=False)
    ns = {"Image": Image, "PIL": PIL, "np": np, "LANCZOS": lanczos, "NEAREST": nearest,
          "shared": types.SimpleNamespace(state=state)}
    up, d1 = functions(os.path.join(checkout, "modules", "upscaler.py"),
                       ["Upscaler.upscale", "UpscalerLanczos.do_upscale",
                        "UpscalerNearest.do_upscale"], dict(ns))

    class Upscaler:
        upscale = up["Upscaler.upscale"]

    class Lanczos(Upscaler):
        name = "Lanczos"
        do_upscale = up["UpscalerLanczos.do_upscale"]

    class Nearest(Upscaler):
        name = "Nearest"
        do_upscale = up["UpscalerNearest.do_upscale"]

    class NoneUpscaler(Upscaler):
        name = "None"

        def do_upscale(self, img, selected_model=None):
            return img

    def data(scaler):
        return types.SimpleNamespace(name=scaler.name, scaler=scaler, data_path=None)

    shared = types.SimpleNamespace(
        state=state,
        sd_upscalers=[data(NoneUpscaler()), data(Lanczos()), data(Nearest())],
        opts=types.SimpleNamespace(upscaling_max_images_in_cache=5,
                                   use_upscaler_name_as_suffix=False))
    pp_ns = dict(ns, shared=shared, upscale_cache={},
                 scripts_postprocessing=types.SimpleNamespace(PostprocessedImage=object))
    pp, d2 = functions(os.path.join(checkout, "scripts", "postprocessing_upscale.py"),
                       ["limit_size_by_one_dimention", "ScriptPostprocessingUpscale.upscale",
                        "ScriptPostprocessingUpscale.process"], pp_ns)

    class Script:
        upscale = pp["ScriptPostprocessingUpscale.upscale"]
        process = pp["ScriptPostprocessingUpscale.process"]

    def run(image, req):
        """One image as run_postprocessing treats it; (image, infotext, html_info)."""
        pp_ns["upscale_cache"].clear()
        # pydantic's types: the factor is a float, sizes are ints.
        post = types.SimpleNamespace(image=image.convert("RGB"), info={}, nametags=[])
        Script().process(post, upscale_enabled=True, upscale_mode=req["resize_mode"],
                         upscale_by=float(req["upscaling_resize"]), max_side_length=0,
                         upscale_to_width=int(req["upscaling_resize_w"]),
                         upscale_to_height=int(req["upscaling_resize_h"]),
                         upscale_crop=req["upscaling_crop"], upscaler_1_name=req["upscaler_1"],
                         upscaler_2_name=req["upscaler_2"],
                         upscaler_2_visibility=float(req["extras_upscaler_2_visibility"]))
        # modules/postprocessing.py, and infotext_utils.quote (none of these values needs it).
        infotext = ", ".join([k if k == v else f'{k}: {v}' for k, v in post.info.items() if v is not None])
        # modules/ui_common.py plaintext_to_html.
        html_info = "<p>" + "<br>\n".join(html.escape(x) for x in infotext.split("\n")) + "</p>"
        return post.image, infotext, html_info

    return run, {**d1, **d2}


def main():
    args = a1111_args(__file__, __doc__, DEFAULT_OUT)
    if args is None:
        return
    run, digests = a1111(args.a1111)
    os.makedirs(args.out, exist_ok=True)
    images = inputs()
    for name, img in images.items():
        img.save(os.path.join(args.out, f"input.{name}.png"))
    cases = {}
    for label, (source, fields) in CASES.items():
        req = dict(DEFAULTS, **fields)
        # Read back from the PNG, as the server reads what it is sent.
        sent = Image.open(os.path.join(args.out, f"input.{source}.png"))
        out, infotext, html_info = run(sent, req)
        out.save(os.path.join(args.out, f"output.{label}.png"))
        cases[label] = dict(input=source, fields=fields, size=list(out.size), infotext=infotext,
                            html_info=html_info)
        print(f"{label}: {sent.size} -> {out.size}  {infotext}")
    meta = {
        "generated_by": "tools/make_extras_fixtures.py",
        "versions": {"pillow": PIL.__version__, "numpy": np.__version__},
        "a1111_sources": {k: f"sha256 {v}" for k, v in digests.items()},
        "cases": cases,
    }
    with open(os.path.join(args.out, "extras.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
