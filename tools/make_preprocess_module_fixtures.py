#!/usr/bin/env python3
"""References for the sd-webui-controlnet extension's other model-free preprocessors
(crates/pipeline/src/controlnet/preprocess/): invert, threshold, lineart_standard,
scribble_xdog, blur_gaussian and tile_resample, run as the extension runs them: its
own functions, taken with `ast` from a checkout (opencv-python-headless 4.10.0.84 and numpy,
as pinned in tools/requirements.txt):
  scripts/preprocessor/model_free_preprocessors.py: PreprocessorInvert, PreprocessorBlurGaussian,
      PreprocessorScribbleXdog (`__call__`), with scripts/utils.py's resize_image_with_pad
  scripts/preprocessor/legacy/processor.py: threshold, lineart_standard, tile_resample (the
      legacy `call_function`s; LegacyPreprocessor then applies HWC3), with that file's
      resize_image_with_pad
  scripts/preprocessor/legacy/processor.py: color (`t2ia_color_grid`), with
      annotator/color/__init__.py's cv2_resize_shortest_edge and apply_color
  scripts/preprocessor/model_free_preprocessors.py: PreprocessorShuffle, with
      annotator/shuffle/__init__.py's ContentShuffleDetector and annotator/util.py's
      make_noise_disk, numpy seeded by scripts/controlnet.py's set_numpy_seed
  annotator/util.py: HWC3
The extension imports A1111 (`modules.*`) at the top of these files; only the functions are
taken, so nothing of A1111 is needed.

Writes crates/pipeline/tests/fixtures/preprocess-modules.safetensors (uint8 tensors):
  image.<n>                                = a photo-like RGB test image
  padded.<n>.<res>                         = resize_image_with_pad(image.<n>, res), padded
  <module>.<n>.<res>.<setting>             = the module's map (HxWx3; `res` is 0 where the
                                             module takes none)
  color_scaled.<n>.<res>                   = cv2_resize_shortest_edge(image.<n>, res) where it
                                             enlarges (OpenCV's INTER_AREA emulating bilinear)
  shuffle.<n>.<res>.<numpy seed>           = shuffle's map after set_numpy_seed(p) of a
                                             request's seed, subseed and all_seeds
and in the JSON: numpy_uniforms (np.random.seed(s); np.random.uniform(0, 1, 4)).
and preprocess-modules.json: the cases, and the sha256 of each function's source.
Run from the repository root:
  python3 tools/make_preprocess_module_fixtures.py --extension /path/to/sd-webui-controlnet
(default: $SD_WEBUI_CONTROLNET_DIR; without one the script says so and writes nothing).
"""
import argparse
import json
import os
import sys
from typing import Optional

import cv2
import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import functions  # noqa: E402
from make_preprocess_fixtures import photo  # noqa: E402

OUT = os.path.join("crates", "pipeline", "tests", "fixtures")

def sketch(h, w):
    """Black strokes on white paper, as scribbles and line art are drawn: a thick and a thin
    stroke, a circle; strong enough that scribble_xdog's uint8 product wraps."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.full((h, w, 3), 250.0)
    img[np.abs(y - (0.3 * x + 5)) < 2.5] = [10, 10, 10]
    img[np.abs(x - w * 0.7) < 0.8] = [40, 30, 20]
    ring = np.abs(np.hypot(y - h * 0.6, x - w * 0.35) - min(h, w) * 0.2) < 1.5
    img[ring] = [0, 0, 0]
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# The three aspect cases at odd sizes, a noisy one, a drawing, a flat one (lineart's empty
# median).
IMAGES = {
    "sketch": lambda: sketch(58, 47),
    "wide": lambda: photo(37, 52, 1, 3.0),
    "tall": lambda: photo(45, 33, 2, 25.0),
    "square": lambda: photo(41, 41, 4, 8.0),
    "large": lambda: photo(70, 90, 3, 6.0),
    "flat": lambda: np.full((20, 30, 3), 128, np.uint8),
    "big": lambda: photo(200, 300, 5, 6.0),
}
# Enlarging (cubic), shrinking (area table), 2x (the area fast path) where the image allows.
RESOLUTIONS = {"sketch": [47, 64, 40], "wide": [64, 30], "tall": [64, 20], "square": [64, 41], "large": [35, 64], "flat": [64], "big": []}
# `color`'s resolutions (at least 64: a side under 64 has no cell and OpenCV refuses it):
# enlarging (INTER_AREA's bilinear), shrinking (the area table, the 2x fast path), the same.
COLOR_RESOLUTIONS = {"wide": [64, 130], "tall": [128], "square": [64], "large": [64, 200],
                     "big": [100, 128, 200]}
COLOR_ONLY = {"big"}
# `shuffle`: (image, resolution, A1111's seed, subseed, all_seeds[0]); the extension seeds
# numpy with (seed or all_seeds[0] for -1) + (subseed or all_seeds[0] for -1), mod 2^32.
SHUFFLE = [("wide", 64, 1234, -1, 1234), ("large", 64, -1, -1, 77), ("big", 200, 3000000000, 2000000000, 3000000000),
           ("tall", 100, 5, 9, 5)]
SETTINGS = {
    "invert": [None],
    "threshold": [127, 0, 200, 254.5],
    "scribble_xdog": [32, 1, 10, 64],
    "lineart_standard": [None],
    "blur_gaussian": [9.0, 0.01, 0.5, 2.3, 64.0],
    "tile_resample": [1.0, 1.09, 1.1, 2.0, 3.7, 8.0],
}
TAKES_RESOLUTION = {"threshold", "scribble_xdog", "lineart_standard", "blur_gaussian"}


def load(ext):
    """The extension's functions by module name (each returning the map as HxWx3 uint8)."""
    ns = {"cv2": cv2, "np": np}
    util, d_util = functions(os.path.join(ext, "annotator", "util.py"), ["HWC3"], ns)
    ns_utils = {"cv2": cv2, "np": np}
    utils, d_utils = functions(
        os.path.join(ext, "scripts", "utils.py"), ["pad64", "safer_memory", "resize_image_with_pad"], ns_utils
    )
    # The model-free classes' `__call__` see scripts/utils.py's resize and annotator's HWC3.
    ns_free = {"cv2": cv2, "np": np, "resize_image_with_pad": utils["resize_image_with_pad"], "HWC3": util["HWC3"]}
    free, d_free = {}, {}
    for cls in ["PreprocessorInvert", "PreprocessorBlurGaussian", "PreprocessorScribbleXdog"]:
        f, d = functions(os.path.join(ext, "scripts", "preprocessor", "model_free_preprocessors.py"),
                         [f"{cls}.__call__"], ns_free)
        free.update(f)
        d_free.update(d)
    ns_legacy = {"cv2": cv2, "np": np, "HWC3": util["HWC3"]}
    legacy, d_legacy = functions(
        os.path.join(ext, "scripts", "preprocessor", "legacy", "processor.py"),
        ["pad64", "safer_memory", "resize_image_with_pad", "threshold", "lineart_standard",
         "tile_resample"], ns_legacy)
    hwc3 = util["HWC3"]

    def legacy_call(fn):
        # LegacyPreprocessor.__call__: the function's (result, is_image), HWC3 when an image.
        def run(img, res, setting):
            result, is_image = fn(img=img, res=res, thr_a=setting)
            return hwc3(result) if is_image else result
        return run

    def free_call(fn):
        return lambda img, res, setting: fn(None, img, res, slider_1=setting)

    ns_shuffle = {"cv2": cv2, "np": np}
    shuffle, d_shuffle = functions(os.path.join(ext, "annotator", "util.py"), ["make_noise_disk"], ns_shuffle)
    det, d_det = functions(os.path.join(ext, "annotator", "shuffle", "__init__.py"),
                           ["ContentShuffleDetector.__call__"], ns_shuffle)
    detector = type("ContentShuffleDetector", (), {"__call__": det["ContentShuffleDetector.__call__"]})()
    pre, d_pre = functions(os.path.join(ext, "scripts", "preprocessor", "model_free_preprocessors.py"),
                           ["PreprocessorShuffle.__call__"], ns_free)
    # The preprocessor imports its detector on first use; it is handed over instead.
    shuffle_self = type("PreprocessorShuffle", (), {"model_shuffle": detector})()
    seeding, d_seeding = functions(os.path.join(ext, "scripts", "controlnet.py"), ["set_numpy_seed"],
                                   {"np": np, "logger": None, "Optional": Optional,
                                    "processing": type("processing", (), {"StableDiffusionProcessing": object})})
    ns_color = {"cv2": cv2, "np": np}
    color, d_color = functions(os.path.join(ext, "annotator", "color", "__init__.py"),
                               ["cv2_resize_shortest_edge", "apply_color"], ns_color)
    # The legacy `color` imports apply_color on first use; it is handed over instead.
    ns_legacy["model_color"] = color["apply_color"]
    legacy_color, d_legacy_color = functions(
        os.path.join(ext, "scripts", "preprocessor", "legacy", "processor.py"), ["color"], ns_legacy)
    modules = {
        "invert": free_call(free["PreprocessorInvert.__call__"]),
        "blur_gaussian": free_call(free["PreprocessorBlurGaussian.__call__"]),
        "scribble_xdog": free_call(free["PreprocessorScribbleXdog.__call__"]),
        "threshold": legacy_call(legacy["threshold"]),
        "lineart_standard": legacy_call(legacy["lineart_standard"]),
        "tile_resample": legacy_call(legacy["tile_resample"]),
        "color": legacy_call(legacy_color["color"]),
        "shuffle": lambda img, res, setting: pre["PreprocessorShuffle.__call__"](shuffle_self, img, res),
    }
    digests = {}
    for d in (d_util, d_utils, d_free, d_legacy, d_color, d_legacy_color, d_shuffle, d_det, d_pre, d_seeding):
        digests.update(d)
    return modules, utils["resize_image_with_pad"], color["cv2_resize_shortest_edge"], seeding["set_numpy_seed"], digests


def key(setting):
    return "none" if setting is None else repr(float(setting))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extension", default=os.environ.get("SD_WEBUI_CONTROLNET_DIR"),
                    help="a checkout of sd-webui-controlnet (default: $SD_WEBUI_CONTROLNET_DIR)")
    args = ap.parse_args()
    if not args.extension:
        print("make_preprocess_module_fixtures.py: skipped (needs --extension or SD_WEBUI_CONTROLNET_DIR)")
        return
    assert cv2.__version__ == "4.10.0", cv2.__version__
    modules, resize_image_with_pad, resize_shortest_edge, set_numpy_seed, digests = load(args.extension)
    tensors, cases = {}, []
    for name, make in IMAGES.items():
        img = make()
        tensors[f"image.{name}"] = torch.from_numpy(img.copy())
        for res in RESOLUTIONS[name]:
            padded, _ = resize_image_with_pad(img, res)
            tensors[f"padded.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(padded))
        for res in COLOR_RESOLUTIONS.get(name, []):
            out = modules["color"](img.copy(), res, None)
            k = f"color.{name}.{res}.none"
            tensors[k] = torch.from_numpy(np.ascontiguousarray(out))
            cases.append({"module": "color", "image": name, "resolution": res, "setting": None, "key": k})
            if res > min(img.shape[:2]):
                scaled = resize_shortest_edge(img.copy(), res)
                tensors[f"color_scaled.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(scaled))
        for module, settings in SETTINGS.items():
            if name in COLOR_ONLY:
                continue
            resolutions = RESOLUTIONS[name] if module in TAKES_RESOLUTION else [0]
            for res in resolutions:
                for setting in settings:
                    out = modules[module](img.copy(), res if res else 512, setting)
                    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3, (module, out.shape)
                    k = f"{module}.{name}.{res}.{key(setting)}"
                    tensors[k] = torch.from_numpy(np.ascontiguousarray(out))
                    cases.append({"module": module, "image": name, "resolution": res,
                                  "setting": setting, "key": k})
    for name, res, seed, subseed, first in SHUFFLE:
        img = IMAGES[name]()
        p = type("Processing", (), {"seed": seed, "subseed": subseed, "all_seeds": [first]})()
        numpy_seed = set_numpy_seed(p)
        out = modules["shuffle"](img.copy(), res, None)
        k = f"shuffle.{name}.{res}.{numpy_seed}"
        tensors[k] = torch.from_numpy(np.ascontiguousarray(out))
        cases.append({"module": "shuffle", "image": name, "resolution": res, "setting": None, "key": k,
                      "a1111_seed": seed, "a1111_subseed": subseed, "all_seeds_0": first,
                      "numpy_seed": numpy_seed})
    uniforms = []
    for seed in [0, 1, 2468, 4294967295]:
        np.random.seed(seed)
        uniforms.append({"seed": seed, "draws": np.random.uniform(low=0, high=1, size=4).tolist()})
    save_file(tensors, os.path.join(OUT, "preprocess-modules.safetensors"))
    with open(os.path.join(OUT, "preprocess-modules.json"), "w") as f:
        json.dump({"opencv": cv2.__version__, "numpy": np.__version__,
                   "extension_sources": {k: f"sha256 {v}" for k, v in digests.items()},
                   "cases": cases, "numpy_uniforms": uniforms}, f, indent=1)
        f.write("\n")
    print(f"wrote {len(tensors)} tensors, {len(cases)} cases to {OUT}/preprocess-modules.*")


if __name__ == "__main__":
    main()
