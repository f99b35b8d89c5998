#!/usr/bin/env python3
"""References for crates/pipeline/src/controlnet/preprocess/: the sd-webui-controlnet
extension's model-free preprocessors (opencv-python-headless 4.10.0.84, numpy, as pinned in
tools/requirements.txt).

The extension's functions import A1111 (`modules.*`), so they are called here as the extension
writes them, OpenCV and numpy call for call:
  resize_image_with_pad (scripts/utils.py): k = resolution / min(H, W); INTER_CUBIC when
      k > 1 else INTER_AREA; sides int(np.round(side * k)); np.pad 'edge' up to a multiple of
      64 (pad64); remove_pad crops back
  canny (scripts/preprocessor/model_free_preprocessors.py, PreprocessorCanny):
      cv2.Canny(padded, int(slider_1), int(slider_2)) then the pad removed (GRAY2RGB: the
      same value in the three channels; stored here as one channel)

OpenCV's INTER_CUBIC runs Intel IPP's resize in these wheels (as in A1111's), which is not
OpenCV's own fixed-point code: the Rust side is compared within a bound there.

Writes crates/pipeline/tests/fixtures/preprocess.safetensors (uint8 tensors; edge maps, which
are 0 or 255, packed 8 pixels a byte with np.packbits along the rows):
  image.<n>                      = a photo-like RGB test image (gradients, shapes, noise)
  canny_raw.<n>.<lo>.<hi>        = cv2.Canny(image.<n>, lo, hi): Canny alone
  resized.<n>.<res>              = the resize of resize_image_with_pad(image.<n>, res), unpadded
  canny.<n>.<res>.<lo>.<hi>      = the extension's canny at processor resolution res
and preprocess.json: the cases.
Run from the repository root: python3 tools/make_preprocess_fixtures.py
"""
import json
import os

import cv2
import numpy as np
import torch
from safetensors.torch import save_file

OUT = os.path.join("crates", "pipeline", "tests", "fixtures")
# (enlarging: INTER_CUBIC), (shrinking: INTER_AREA, an odd ratio), (2x down: the area fast
# path), the same size; each with a pad to 64.
RESOLUTIONS = {
    "shapes": [64, 40, 80],
    "noisy": [64],
    "large": [64, 35, 70],
    "flat": [64],
}
# Canny alone: the extension's defaults, the sliders' ends, close thresholds, swapped ones.
THRESHOLDS = [(100, 200), (1, 255), (50, 60), (200, 100), (255, 255), (1, 1)]
PIPELINE_THRESHOLDS = [(100, 200), (50, 60), (200, 100)]


def pad64(x):
    return int(np.ceil(float(x) / 64.0) * 64 - x)


def resize_image_with_pad(img, resolution):
    h_raw, w_raw, _ = img.shape
    k = float(resolution) / float(min(h_raw, w_raw))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    h_target = int(np.round(float(h_raw) * k))
    w_target = int(np.round(float(w_raw) * k))
    img = cv2.resize(img, (w_target, h_target), interpolation=interpolation)
    h_pad, w_pad = pad64(h_target), pad64(w_target)
    padded = np.pad(img, [[0, h_pad], [0, w_pad], [0, 0]], mode="edge")
    return np.ascontiguousarray(padded), (h_target, w_target)


def photo(h, w, seed, noise):
    """A gradient sky, a disc, a rectangle, a diagonal stripe, and Gaussian noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([40 + 150 * y / h, 90 + 100 * x / w, 200 - 120 * y / h], axis=2)
    disc = (y - h * 0.45) ** 2 + (x - w * 0.35) ** 2 < (min(h, w) * 0.25) ** 2
    img[disc] = [220, 60, 40]
    img[int(h * 0.6) : int(h * 0.9), int(w * 0.55) : int(w * 0.85)] = [30, 180, 70]
    stripe = np.abs((x - w * 0.1) - (y - h * 0.2) * 0.7) < 1.5
    img[stripe] = [250, 250, 250]
    img += rng.normal(0, noise, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def packed(edges):
    assert set(np.unique(edges)) <= {0, 255}
    return torch.from_numpy(np.packbits(edges > 0, axis=1))


def main():
    assert cv2.__version__ == "4.10.0", cv2.__version__
    assert cv2.ipp.useIPP()
    images = {
        "shapes": photo(37, 52, 1, 3.0),
        "noisy": photo(45, 33, 2, 25.0),
        "large": photo(70, 90, 3, 6.0),
        "flat": np.full((20, 30, 3), 128, np.uint8),
    }
    tensors = {}
    cases = []
    for name, img in images.items():
        tensors[f"image.{name}"] = torch.from_numpy(img.copy())
        for lo, hi in THRESHOLDS:
            tensors[f"canny_raw.{name}.{lo}.{hi}"] = packed(cv2.Canny(img, lo, hi))
        for res in RESOLUTIONS[name]:
            padded, (h, w) = resize_image_with_pad(img, res)
            tensors[f"resized.{name}.{res}"] = torch.from_numpy(padded[:h, :w].copy())
            for lo, hi in PIPELINE_THRESHOLDS:
                # PreprocessorCanny: Canny, GRAY2RGB (three equal channels), pad removed.
                rgb = cv2.cvtColor(cv2.Canny(padded, int(lo), int(hi)), cv2.COLOR_GRAY2RGB)
                rgb = np.ascontiguousarray(rgb[:h, :w])
                assert (rgb[:, :, 0] == rgb[:, :, 2]).all()
                tensors[f"canny.{name}.{res}.{lo}.{hi}"] = packed(rgb[:, :, 0])
                cases.append({"image": name, "resolution": res, "low": lo, "high": hi})
    save_file(tensors, os.path.join(OUT, "preprocess.safetensors"))
    with open(os.path.join(OUT, "preprocess.json"), "w") as f:
        json.dump({"opencv": cv2.__version__, "thresholds": THRESHOLDS, "cases": cases}, f, indent=1)
        f.write("\n")
    print(f"wrote {len(tensors)} tensors, {len(cases)} cases to {OUT}/preprocess.*")


if __name__ == "__main__":
    main()
