#!/usr/bin/env python3
"""References for the recolor ControlNet modules (crates/pipeline/src/controlnet/preprocess/
recolor.rs, colour.rs): OpenCV's 8-bit colour conversions, the extension's two preprocessors
and its post-processing, with opencv-python-headless 4.10.0.84 and numpy as pinned in
tools/requirements.txt.

- The conversions, every input: cv2.cvtColor on all 2^24 colours laid out as a 4096x4096
  image (pixel k = (k >> 16, (k >> 8) & 255, k & 255)) for COLOR_RGB2LAB, COLOR_RGB2HSV and
  COLOR_LAB2RGB; COLOR_HSV2RGB on every (H, S, V) with H in 0..180 (the range RGB2HSV
  gives) as 2880 rows of 4096. The fixture keeps each output's sha256 and a sample of inputs
  and outputs (to show what differs). HSV2RGB's SIMD body and its scalar tail differ
  (truncation against rounding), so a 520-wide image (a tail of 8 pixels a row at OpenCV's
  32-pixel blocks) is kept whole as well.
- The preprocessors: scripts/preprocessor/legacy/processor.py's recolor_luminance and
  recolor_intensity (taken with `ast` from a checkout and run as they are; LegacyPreprocessor
  applies HWC3 to their result, which is already 3-channel) on test images at several gammas.
- The post-processing: scripts/controlnet.py's recolor_luminance_post_processing and
  recolor_intensity_post_processing are closures inside Script.process, so `post_process`
  below repeats their cv2 calls line for line, on decoded-like float images (A1111's
  `clamp((x + 1) / 2, 0, 1)` of a VAE output), followed by processing.py's
  `(255. * x).astype(np.uint8)`.

Writes crates/pipeline/tests/fixtures/recolor.json. Run from the repository root:
  python3 tools/make_recolor_fixtures.py --extension /path/to/sd-webui-controlnet
(default: $SD_WEBUI_CONTROLNET_DIR; without one the script says so and writes nothing).
"""
import argparse
import base64
import hashlib
import json
import os
import sys

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import functions  # noqa: E402
from make_preprocess_fixtures import photo  # noqa: E402

OUT = os.path.join("crates", "pipeline", "tests", "fixtures", "recolor.json")
GAMMAS = [1.0, 0.5, 1.7, 0.1, 2.0, 0.731]


def b64(a):
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def sha(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def every_colour():
    k = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([k >> 16, (k >> 8) & 255, k & 255], axis=1).astype(np.uint8)
    return rgb.reshape(4096, 4096, 3)


def every_hsv():
    h, s, v = np.meshgrid(np.arange(180), np.arange(256), np.arange(256), indexing="ij")
    return np.stack([h, s, v], axis=-1).astype(np.uint8).reshape(-1, 4096, 3)


def conversions(rng):
    out = {}
    colours = every_colour()
    hsv_in = every_hsv()
    sample = rng.integers(0, 1 << 24, 4096)
    for name, src, code in [
        ("rgb2lab", colours, cv2.COLOR_RGB2LAB),
        ("rgb2hsv", colours, cv2.COLOR_RGB2HSV),
        ("lab2rgb", colours, cv2.COLOR_LAB2RGB),
        ("hsv2rgb", hsv_in, cv2.COLOR_HSV2RGB),
    ]:
        dst = cv2.cvtColor(src, code)
        flat_in, flat_out = src.reshape(-1, 3), dst.reshape(-1, 3)
        idx = sample % flat_in.shape[0]
        out[name] = {
            "width": src.shape[1],
            "height": src.shape[0],
            "sha256": sha(dst),
            "sample_in": b64(flat_in[idx]),
            "sample_out": b64(flat_out[idx]),
        }
    # HSV2RGB with a scalar tail in every row.
    hsv = np.stack([rng.integers(0, 180, (16, 520)), rng.integers(0, 256, (16, 520)),
                    rng.integers(0, 256, (16, 520))], axis=-1).astype(np.uint8)
    out["hsv2rgb_520"] = {"width": 520, "height": 16, "in": b64(hsv),
                          "out": b64(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))}
    return out


def post_process(decoded, feed, luminance):
    """controlnet.py's recolor post-processing of one image (`x`: CHW float in [0, 1]) with
    the unit's map (`final_feed[i]`: HxW uint8), then processing.py's 8-bit conversion."""
    x = np.clip((decoded + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)
    h = x.transpose((1, 2, 0))
    h = (h * 255).clip(0, 255).astype(np.uint8)
    if luminance:
        h = cv2.cvtColor(h, cv2.COLOR_RGB2LAB)
        h[:, :, 0] = feed
        h = cv2.cvtColor(h, cv2.COLOR_LAB2RGB)
    else:
        h = cv2.cvtColor(h, cv2.COLOR_RGB2HSV)
        h[:, :, 2] = feed
        h = cv2.cvtColor(h, cv2.COLOR_HSV2RGB)
    h = (h.astype(np.float32) / 255.0).transpose((2, 0, 1))
    y = np.clip(h, 0, 1)
    return (255.0 * np.moveaxis(y, 0, 2)).astype(np.uint8)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extension", default=os.environ.get("SD_WEBUI_CONTROLNET_DIR"),
                    help="a checkout of sd-webui-controlnet (default: $SD_WEBUI_CONTROLNET_DIR)")
    args = ap.parse_args()
    if not args.extension:
        print("make_recolor_fixtures.py: skipped (needs --extension or SD_WEBUI_CONTROLNET_DIR)")
        return
    assert cv2.__version__ == "4.10.0", cv2.__version__
    rng = np.random.default_rng(7)
    ns = {"cv2": cv2, "np": np}
    util, d_util = functions(os.path.join(args.extension, "annotator", "util.py"), ["HWC3"], ns)
    legacy, d_legacy = functions(
        os.path.join(args.extension, "scripts", "preprocessor", "legacy", "processor.py"),
        ["recolor_luminance", "recolor_intensity"], ns)
    images = {"photo": photo(45, 61, 3, 6.0), "noisy": photo(33, 40, 5, 40.0)}
    maps = []
    for name, image in images.items():
        for module in ["recolor_luminance", "recolor_intensity"]:
            for gamma in GAMMAS:
                result, is_image = legacy[module](image, res=512, thr_a=gamma)
                assert is_image
                maps.append({"image": name, "module": module, "gamma": gamma,
                             "map": b64(util["HWC3"](result))})
    # Decoded-like images: VAE outputs a little past [-1, 1], and maps from the preprocessors.
    post = []
    for i, (h, w) in enumerate([(24, 40), (37, 29)]):
        decoded = rng.normal(0.0, 0.6, (3, h, w)).astype(np.float32)
        feed = rng.integers(0, 256, (h, w)).astype(np.uint8)
        for luminance in [True, False]:
            post.append({"height": h, "width": w, "luminance": luminance,
                         "decoded": b64(decoded), "feed": b64(feed),
                         "out": b64(post_process(decoded, feed, luminance))})
    fixture = {
        "generated_by": "tools/make_recolor_fixtures.py",
        "opencv_python": cv2.__version__,
        "numpy": np.__version__,
        "cpu_dispatch": cv2.getCPUFeaturesLine() if hasattr(cv2, "getCPUFeaturesLine") else "",
        "extension_sources": {k: f"sha256 {v}" for k, v in {**d_util, **d_legacy}.items()},
        "conversions": conversions(rng),
        "images": {k: {"height": v.shape[0], "width": v.shape[1], "rgb": b64(v)}
                   for k, v in images.items()},
        "maps": maps,
        "post": post,
    }
    with open(OUT, "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
