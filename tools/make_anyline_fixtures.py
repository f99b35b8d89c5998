#!/usr/bin/env python3
"""References for the sd-webui-controlnet extension's Anyline preprocessor (softedge_anyline;
crates/pipeline/src/controlnet/preprocess/anyline.rs), run as the extension runs it: its own
code from a checkout:
  annotator/teed/ted.py, Fsmish.py, Xsmish.py: TED (loaded as tools/make_teed_fixtures.py does)
  annotator/teed/__init__.py: TEEDDetector.__call__, taken with `ast`
  annotator/util.py: safe_step, HWC3
  scripts/utils.py: pad64, safer_memory, resize_image_with_pad
  scripts/preprocessor/legacy/processor.py: lineart_standard (with that file's own resize),
      called through legacy_preprocessors.py's LegacyPreprocessor.__call__ (HWC3 of the map),
      the way `Preprocessor.get_preprocessor("lineart_standard")` runs it
  scripts/preprocessor/teed.py: get_intensity_mask, combine_layers,
      PreprocessorAnyline.__call__ (resize with pad, MTEED with safe_steps, HWC3, lineart_standard
      of the padded image at the resolution, the intensity mask, skimage's
      morphology.remove_small_objects(min_size=36, connectivity=1), combine_layers, the pad
      removed)
No weights are downloaded: MTEED.pth is the extension's `TED` with make_teed_fixtures.py's
initialisation from another seed (so it differs from the teed fixture's 7_model.pth), saved
as the real file is (a plain state dict, torch.save).

Writes crates/pipeline/tests/fixtures/anyline/:
  MTEED.pth           the state dict
  anyline.safetensors image.<n> (uint8 HxWx3), padded.<n>.<res> (the padded image),
                      mask.<n>.<res> (uint8 HxW: get_intensity_mask's channel, padded size),
                      kept.<n>.<res> (uint8 HxW: remove_small_objects' result, 0/1),
                      softedge_anyline.<n>.<res>.<steps> (uint8 HxW: the module's map)
  anyline.json        the cases, the refused resolution with the extension's error, the
                      sha256 of each source used
Run from the repository root:
  python3 tools/make_anyline_fixtures.py --extension /path/to/sd-webui-controlnet
(default: $SD_WEBUI_CONTROLNET_DIR; without one the script says so and writes nothing).
"""
import argparse
import json
import os
import sys
import types

import cv2
import numpy as np
import scipy.ndimage as ndi
import skimage
import torch
from einops import rearrange
from safetensors.torch import save_file
from skimage import morphology

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import functions  # noqa: E402
from make_preprocess_fixtures import photo  # noqa: E402
from make_preprocess_module_fixtures import sketch  # noqa: E402
from make_teed_fixtures import network, ted_module  # noqa: E402

OUT = os.path.join("crates", "pipeline", "tests", "fixtures", "anyline")
SEED = 20240723


def faint(h, w):
    """Paper with one dark stroke (it sets lineart_standard's median) and very faint marks
    (two levels below the paper): lineart_standard's value 1 where remove_small_objects decides.
    Blobs of 1, 6, 11 and 12 (2x6, 3x4) pixels (3 * 11 = 33 voxels are dropped, 36 kept), a 12-pixel
    diagonal whose pixels touch only at corners (dropped at 4-connectivity, kept at 8), a long
    faint line (kept)."""
    img = np.full((h, w, 3), 250, np.uint8)
    # The stroke 20+ pixels from every mark: its blur would darken the paper around them.
    img[:, w - 10:w - 6] = 30
    for (r, c), (bh, bw) in zip([(20, 6), (20, 16), (20, 30), (40, 6), (40, 20)],
                                [(1, 1), (2, 3), (1, 11), (2, 6), (3, 4)]):
        img[r:r + bh, c:c + bw] = 248
    for i in range(12):
        img[1 + i, 40 + i] = 248
    img[56, 4:60] = 248
    return img


IMAGES = {
    "faint": lambda: faint(64, 90),
    "sketch": lambda: sketch(58, 47),
    "wide": lambda: photo(37, 52, 1, 3.0),
    "noisy": lambda: photo(45, 33, 2, 25.0),
    "large": lambda: photo(100, 93, 3, 4.0),
}
# Multiples of 64 (the only ones the extension runs): the image's own size, enlarging
# (cubic), shrinking (area).
RESOLUTIONS = {"faint": [64, 128], "sketch": [64], "wide": [64], "noisy": [64],
               "large": [64]}
# The slider's default, 0 (no safe_step), its maximum.
SAFE_STEPS = {"faint": [2, 0, 10], "sketch": [2], "wide": [2, 0], "noisy": [2],
              "large": [2]}
# Not a multiple of 64: lineart_standard's map has another size and numpy refuses.
REFUSED = ("faint", 70)


def load(ext):
    ted, digests = ted_module(ext)
    net = network(ted, SEED)
    util, d = functions(os.path.join(ext, "annotator", "util.py"), ["safe_step", "HWC3"],
                        {"np": np})
    digests.update(d)
    ns = {"torch": torch, "np": np, "cv2": cv2, "rearrange": rearrange,
          "safe_step": util["safe_step"]}
    f, d = functions(os.path.join(ext, "annotator", "teed", "__init__.py"),
                     ["TEEDDetector.__call__"], ns)
    digests.update(d)
    detector = types.SimpleNamespace(model=net, device="cpu")
    call = f["TEEDDetector.__call__"]

    class Detector:
        def __call__(self, image, safe_steps=2):
            return call(detector, image, safe_steps)

    utils, d = functions(os.path.join(ext, "scripts", "utils.py"),
                         ["pad64", "safer_memory", "resize_image_with_pad"], {"cv2": cv2, "np": np})
    digests.update(d)
    ns_legacy = {"cv2": cv2, "np": np, "HWC3": util["HWC3"]}
    legacy, d = functions(os.path.join(ext, "scripts", "preprocessor", "legacy", "processor.py"),
                          ["pad64", "safer_memory", "resize_image_with_pad", "lineart_standard"],
                          ns_legacy)
    digests.update({f"processor.py {k}": v for k, v in d.items()})
    wrapper, d = functions(
        os.path.join(ext, "scripts", "preprocessor", "legacy", "legacy_preprocessors.py"),
        ["LegacyPreprocessor.__call__"], {"HWC3": util["HWC3"]})
    digests.update(d)
    lineart_self = types.SimpleNamespace(call_function=legacy["lineart_standard"],
                                         managed_model=None)

    class Lineart:
        def __call__(self, img, resolution):
            return wrapper["LegacyPreprocessor.__call__"](lineart_self, img, resolution)

    def get_preprocessor(name):
        assert name == "lineart_standard", name
        return Lineart()

    def detector_class(mteed=False):
        assert mteed
        return Detector()

    ns_pre = {"np": np, "morphology": morphology, "HWC3": util["HWC3"],
              "resize_image_with_pad": utils["resize_image_with_pad"],
              "TEEDDetector": detector_class,
              "Preprocessor": types.SimpleNamespace(get_preprocessor=get_preprocessor)}
    f, d = functions(os.path.join(ext, "scripts", "preprocessor", "teed.py"),
                     ["get_intensity_mask", "combine_layers", "PreprocessorAnyline.__call__"],
                     ns_pre)
    digests.update(d)

    def module(img, res, steps):
        pre = types.SimpleNamespace(model=None)
        return f["PreprocessorAnyline.__call__"](pre, img, res, slider_1=steps)

    def layers(padded, res):
        """The lineart layer's two steps, as __call__ runs them, for the tests."""
        lineart = Lineart()(padded, res)
        mask = f["get_intensity_mask"](lineart, lower_bound=0, upper_bound=1)
        kept = morphology.remove_small_objects(mask.astype(bool), min_size=36, connectivity=1)
        for m in (mask, kept):
            assert (m == m[:, :, :1]).all()
        return mask[:, :, 0], kept[:, :, 0]

    def teed(padded, steps):
        return Detector()(padded, safe_steps=steps)

    return module, utils["resize_image_with_pad"], layers, teed, net, digests


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extension", default=os.environ.get("SD_WEBUI_CONTROLNET_DIR"),
                    help="a checkout of sd-webui-controlnet (default: $SD_WEBUI_CONTROLNET_DIR)")
    args = ap.parse_args()
    if not args.extension:
        print("make_anyline_fixtures.py: skipped (needs --extension or SD_WEBUI_CONTROLNET_DIR)")
        return
    assert cv2.__version__ == "4.10.0", cv2.__version__
    # A1111 pins scikit-image 0.21 (requirements_versions.txt), where min_size drops the
    # components strictly smaller; 0.26's deprecation shim passes it on as max_size, which
    # drops those of that size too. A 12-pixel row of the HxWx3 mask is 36 voxels: kept.
    row = np.zeros((4, 16, 3), bool)
    row[1, 2:14] = True
    assert morphology.remove_small_objects(row, min_size=36, connectivity=1).all(axis=2)[1, 2:14].all(), \
        f"scikit-image {skimage.__version__} drops components of min_size (use 0.25.2)"
    torch.set_num_threads(1)
    module, resize_image_with_pad, layers, teed, net, digests = load(args.extension)
    os.makedirs(OUT, exist_ok=True)
    torch.save(net.state_dict(), os.path.join(OUT, "MTEED.pth"))
    tensors, cases = {}, []
    four = ndi.generate_binary_structure(2, 1)
    totals = {"dropped": 0, "kept": 0, "combined": 0}
    for name, make in IMAGES.items():
        img = make()
        tensors[f"image.{name}"] = torch.from_numpy(img.copy())
        for res in RESOLUTIONS[name]:
            padded, _ = resize_image_with_pad(img, res)
            tensors[f"padded.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(padded))
            mask, kept = layers(padded, res)
            labels, n = ndi.label(mask > 0, four)
            dropped = len(np.unique(labels[(mask > 0) & ~kept]))
            kept_n = len(np.unique(labels[kept]))
            assert set(np.unique(mask)) <= {0, 1}
            print(f"{name} {res}: {n} components of value 1, {dropped} dropped, {kept_n} kept")
            totals["dropped"] += dropped
            totals["kept"] += kept_n
            tensors[f"mask.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(mask))
            tensors[f"kept.{name}.{res}"] = torch.from_numpy(kept.astype(np.uint8))
            for steps in SAFE_STEPS[name]:
                out = module(img.copy(), res, steps)
                assert out.dtype == np.uint8 and out.ndim == 3, (out.dtype, out.shape)
                assert (out == out[:, :, :1]).all()
                out = out[:, :, 0]
                h, w = out.shape
                changed = int((kept & (teed(padded, steps) != 1))[:h, :w].sum())
                totals["combined"] += changed
                k = f"softedge_anyline.{name}.{res}.{steps}"
                tensors[k] = torch.from_numpy(np.ascontiguousarray(out))
                print(f"  steps {steps}: {len(np.unique(out))} levels, {changed} TEED values set to 1")
                cases.append({"module": "softedge_anyline", "image": name, "resolution": res,
                              "safe_steps": steps, "key": k})
    # Each step is exercised: components dropped and kept, values the combine changes.
    assert all(v > 0 for v in totals.values()), totals
    name, res = REFUSED
    try:
        module(IMAGES[name](), res, 2)
        raise AssertionError("the extension ran a resolution that is not a multiple of 64")
    except ValueError as e:
        refused = {"image": name, "resolution": res, "error": str(e)}
    print(f"refused: {refused}")
    save_file(tensors, os.path.join(OUT, "anyline.safetensors"))
    with open(os.path.join(OUT, "anyline.json"), "w") as f:
        json.dump({"opencv": cv2.__version__, "numpy": np.__version__, "torch": torch.__version__,
                   "scikit-image": skimage.__version__, "seed": SEED, "totals": totals,
                   "extension_sources": {k: f"sha256 {v}" for k, v in digests.items()},
                   "refused": refused, "cases": cases}, f, indent=1)
        f.write("\n")
    print(f"wrote {len(tensors)} tensors, {len(cases)} cases to {OUT}/")


if __name__ == "__main__":
    main()
