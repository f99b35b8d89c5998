#!/usr/bin/env python3
"""References for the sd-webui-controlnet extension's TEED preprocessor (softedge_teed;
crates/pipeline/src/controlnet/preprocess/teed.rs), run as the extension runs it: its own code
from a checkout:
  annotator/teed/ted.py, Fsmish.py, Xsmish.py: the whole files (TED and its blocks, smish),
      imported as a package so ted.py's relative imports resolve
  annotator/teed/__init__.py: TEEDDetector.__call__ (the RGB image as it is, the four maps
      resized to the image, their mean, the sigmoid, safe_step, * 255, uint8), taken with `ast`
  annotator/util.py: safe_step
  scripts/utils.py: pad64, safer_memory, resize_image_with_pad
  scripts/preprocessor/teed.py: PreprocessorTEED.__call__ (resize with pad, the detector with
      safe_steps=int(slider_1), the pad removed)
No weights are downloaded: the network is the extension's `TED` (full width: the real
7_model.pth is 0.25 MB) with the class's own xavier initialisation from a fixed torch seed plus
random biases, saved as the real file is (a plain state_dict, torch.save). The fused map's last
conv is scaled so the logits spread over both signs (a random network's sit on one side).

Writes crates/pipeline/tests/fixtures/teed/:
  7_model.pth        the state dict
  teed.safetensors   image.<n> (uint8 HxWx3), padded.<n>.<res> (the padded image),
                     logits.<n>.<res> (f32: the mean of the four maps, before the sigmoid),
                     softedge_teed.<n>.<res>.<steps> (uint8 HxW: the module's map)
  teed.json          the cases and the sha256 of each source used
Run from the repository root:
  python3 tools/make_teed_fixtures.py --extension /path/to/sd-webui-controlnet
(default: $SD_WEBUI_CONTROLNET_DIR; without one the script says so and writes nothing).
"""
import argparse
import hashlib
import importlib.util
import json
import os
import sys
import types

import cv2
import numpy as np
import torch
from einops import rearrange
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import functions  # noqa: E402
from make_preprocess_fixtures import photo  # noqa: E402
from make_preprocess_module_fixtures import sketch  # noqa: E402

OUT = os.path.join("crates", "pipeline", "tests", "fixtures", "teed")
SEED = 20240612

IMAGES = {
    "sketch": lambda: sketch(58, 47),
    "wide": lambda: photo(37, 52, 1, 3.0),
    "tall": lambda: photo(45, 33, 2, 25.0),
}
# Shrinking (the area resize), the image's own size, enlarging (cubic).
RESOLUTIONS = {"sketch": [40, 47, 70], "wide": [30, 64], "tall": [33, 20]}
# The slider's default, 0 (no safe_step), one step, its maximum.
SAFE_STEPS = [2, 0, 1, 10]


def ted_module(ext):
    """annotator/teed/{Fsmish,Xsmish,ted}.py as the package `teed_pkg` (no __init__: that one
    needs the webui)."""
    folder = os.path.join(ext, "annotator", "teed")
    pkg = types.ModuleType("teed_pkg")
    pkg.__path__ = [folder]
    sys.modules["teed_pkg"] = pkg
    digests = {}
    mod = None
    for name in ["Fsmish", "Xsmish", "ted"]:
        path = os.path.join(folder, f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"teed_pkg.{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[f"teed_pkg.{name}"] = mod
        spec.loader.exec_module(mod)
        with open(path, "rb") as f:
            digests[f"annotator/teed/{name}.py"] = hashlib.sha256(f.read()).hexdigest()
    return mod, digests


def network(ted, seed=SEED):
    torch.manual_seed(seed)
    net = ted.TED()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(".bias"):
                p.uniform_(-0.2, 0.2)
        # The input is 0..=255: a random network's maps are large; the fused one's last conv
        # scaled down so the mean crosses 0 and the sigmoid's middle is tested.
        net.block_cat.DWconv2.weight.mul_(0.05)
    return net.float().eval()


def load(ext):
    ted, digests = ted_module(ext)
    net = network(ted)
    util, d = functions(os.path.join(ext, "annotator", "util.py"), ["safe_step"], {"np": np})
    digests.update(d)
    ns = {"torch": torch, "np": np, "cv2": cv2, "rearrange": rearrange,
          "safe_step": util["safe_step"]}
    f, d = functions(os.path.join(ext, "annotator", "teed", "__init__.py"),
                     ["TEEDDetector.__call__"], ns)
    digests.update(d)
    detector_call = f["TEEDDetector.__call__"]
    detector = types.SimpleNamespace(model=net, device="cpu")
    detector_obj = lambda image, safe_steps=2: detector_call(detector, image, safe_steps)  # noqa: E731
    ns_utils = {"cv2": cv2, "np": np}
    utils, d = functions(os.path.join(ext, "scripts", "utils.py"),
                         ["pad64", "safer_memory", "resize_image_with_pad"], ns_utils)
    digests.update(d)
    ns_pre = {"np": np, "resize_image_with_pad": utils["resize_image_with_pad"],
              "TEEDDetector": None}
    f, d = functions(os.path.join(ext, "scripts", "preprocessor", "teed.py"),
                     ["PreprocessorTEED.__call__"], ns_pre)
    digests.update(d)
    pre_call = f["PreprocessorTEED.__call__"]
    pre = types.SimpleNamespace(model=detector_obj)

    def module(img, res, steps):
        return pre_call(pre, img, res, slider_1=steps)

    def logits(padded):
        with torch.no_grad():
            x = rearrange(torch.from_numpy(padded.copy()).float(), "h w c -> 1 c h w")
            maps = [m.numpy().astype(np.float32)[0, 0] for m in net(x)]
        return np.mean(np.stack(maps, axis=2), axis=2)

    return module, utils["resize_image_with_pad"], logits, digests


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extension", default=os.environ.get("SD_WEBUI_CONTROLNET_DIR"),
                    help="a checkout of sd-webui-controlnet (default: $SD_WEBUI_CONTROLNET_DIR)")
    args = ap.parse_args()
    if not args.extension:
        print("make_teed_fixtures.py: skipped (needs --extension or SD_WEBUI_CONTROLNET_DIR)")
        return
    assert cv2.__version__ == "4.10.0", cv2.__version__
    torch.set_num_threads(1)
    module, resize_image_with_pad, logits, digests = load(args.extension)
    os.makedirs(OUT, exist_ok=True)
    ted, _ = ted_module(args.extension)
    torch.save(network(ted).state_dict(), os.path.join(OUT, "7_model.pth"))
    tensors, cases = {}, []
    for name, make in IMAGES.items():
        img = make()
        tensors[f"image.{name}"] = torch.from_numpy(img.copy())
        for res in RESOLUTIONS[name]:
            padded, _ = resize_image_with_pad(img, res)
            tensors[f"padded.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(padded))
            lg = logits(padded)
            tensors[f"logits.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(lg))
            print(f"{name} {res}: logits {lg.min():.2f}..{lg.max():.2f}, std {lg.std():.2f}")
            for steps in SAFE_STEPS:
                out = module(img.copy(), res, steps)
                assert out.dtype == np.uint8 and out.ndim == 2, out.shape
                k = f"softedge_teed.{name}.{res}.{steps}"
                tensors[k] = torch.from_numpy(np.ascontiguousarray(out))
                print(f"  steps {steps}: {len(np.unique(out))} levels, {(out == 255).mean():.2f} white")
                cases.append({"module": "softedge_teed", "image": name, "resolution": res,
                              "safe_steps": steps, "key": k})
    save_file(tensors, os.path.join(OUT, "teed.safetensors"))
    with open(os.path.join(OUT, "teed.json"), "w") as f:
        json.dump({"opencv": cv2.__version__, "numpy": np.__version__, "torch": torch.__version__,
                   "seed": SEED,
                   "extension_sources": {k: f"sha256 {v}" for k, v in digests.items()},
                   "cases": cases}, f, indent=1)
        f.write("\n")
    print(f"wrote {len(tensors)} tensors, {len(cases)} cases to {OUT}/")


if __name__ == "__main__":
    main()
