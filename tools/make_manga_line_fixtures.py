#!/usr/bin/env python3
"""References for the sd-webui-controlnet extension's lineart_anime_denoise (the manga_line
network; crates/pipeline/src/controlnet/preprocess/manga_line.rs), run as the extension runs
it: its own code, taken with `ast` from a checkout:
  annotator/manga_line/__init__.py: _bn_relu_conv, _u_bn_relu_conv, _shortcut, _u_shortcut,
      basic_block, _u_basic_block, _residual_block, _upsampling_residual_block, res_skip (the
      network of erika.pth) and MangaLineExtration.__call__ (RGB2GRAY, the grey values in
      unscaled, 255 - line, clip, uint8)
  annotator/util.py: HWC3
  scripts/preprocessor/legacy/processor.py: pad64, safer_memory, resize_image_with_pad,
      lineart_anime_denoise (the detector's map as it is; LegacyPreprocessor then applies HWC3)
No weights are downloaded: the network is the extension's classes with random weights from a
fixed torch seed, saved with torch.save as the real file is. res_skip fixes its widths (24, 48,
96, 192, 384 down, 16 at the end; erika.pth is 70 MB): the committed file keeps every block,
unit and name at the real depth but each width mapped by WIDTHS (2 .. 12, 1 kept) by the `nn`
the classes see (its Conv2d and BatchNorm2d), as our loader reads widths and units from the
shapes. The batch norms (eval mode in the detector) get random affine weights and running
statistics measured on CALIBRATION (train-mode passes, momentum None), so each normalises
what reaches it as the trained network's do; conv15's conv is then scaled so the line spreads
over and past 0..255 at both ends (a random network's would sit in a narrow band, where the clip and the
truncation would test little). The state dict is saved with the `module.` prefix of a
DataParallel save, which the extension (and our loader) drops.

Writes crates/pipeline/tests/fixtures/manga_line/:
  erika.pth                    the network's state dict
  manga_line.safetensors       image.<n> (uint8 HxWx3), padded.<n>.<res> (the padded image),
                               grey.<n>.<res> (uint8: its RGB2GRAY), line.<n>.<res> (f32: the
                               network's output on it), lineart_anime_denoise.<n>.<res> (uint8
                               HxW: the module's map, whose three channels are equal)
  manga_line.json              the cases and the sha256 of each function's source
Run from the repository root:
  python3 tools/make_manga_line_fixtures.py --extension /path/to/sd-webui-controlnet
(default: $SD_WEBUI_CONTROLNET_DIR; without one the script says so and writes nothing).
"""
import argparse
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
from make_hed_fixtures import classes  # noqa: E402
from make_preprocess_fixtures import photo  # noqa: E402
from make_preprocess_module_fixtures import sketch  # noqa: E402

OUT = os.path.join("crates", "pipeline", "tests", "fixtures", "manga_line")
SEED = 20241206
# res_skip's widths -> the fixture's (one-to-one, so `in_filters != nb_filters` decides as
# in the real network; the grey input's 1 and the line's 1 kept).
WIDTHS = {24: 2, 48: 4, 96: 6, 192: 8, 384: 12, 16: 3}
CLASSES = ["_bn_relu_conv", "_u_bn_relu_conv", "_shortcut", "_u_shortcut", "basic_block",
           "_u_basic_block", "_residual_block", "_upsampling_residual_block", "res_skip"]

IMAGES = {
    "sketch": lambda: sketch(58, 47),
    "wide": lambda: photo(37, 52, 1, 3.0),
    "tall": lambda: photo(45, 33, 2, 25.0),
}
# Shrinking (the area resize), the image's own size, enlarging (cubic); the padded sides are
# 64 or 128, multiples of the network's 16.
RESOLUTIONS = {"sketch": [40, 47, 64], "wide": [30, 64], "tall": [33, 20]}
# Images the batch norms' statistics are measured on (not among the cases).
CALIBRATION = [lambda: sketch(64, 64), lambda: photo(64, 128, 7, 10.0)]


def narrowed_nn():
    """torch.nn with res_skip's widths mapped by WIDTHS."""
    def narrow(c):
        return WIDTHS.get(c, c)

    ns = types.SimpleNamespace(**{k: getattr(torch.nn, k) for k in dir(torch.nn) if not k.startswith("_")})
    ns.Conv2d = lambda i, o, *a, **k: torch.nn.Conv2d(narrow(i), narrow(o), *a, **k)
    ns.BatchNorm2d = lambda c, *a, **k: torch.nn.BatchNorm2d(narrow(c), *a, **k)
    return ns


def grey_tensor(img):
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return rearrange(torch.from_numpy(grey).float(), "h w -> 1 1 h w")


def network(ns):
    """The extension's res_skip at the narrowed widths with random weights from SEED."""
    torch.manual_seed(SEED)
    net = ns["res_skip"]()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.reset_running_stats()
            bn.momentum = None
    net.train()
    with torch.no_grad():
        for make in CALIBRATION:
            net(grey_tensor(make()))
        net.eval()
        # The line's 2nd and 98th percentiles on the calibration images at -20 and 275, so
        # the clip bites at both ends.
        y = torch.cat([net(grey_tensor(make())).flatten() for make in CALIBRATION])
        lo, hi = torch.quantile(y, torch.tensor([0.02, 0.98])).tolist()
        conv = net.conv15.model[2]
        k = 295.0 / (hi - lo)
        conv.weight.mul_(k)
        conv.bias.mul_(k).add_(-20.0 - k * lo)
    return net.float().eval()


def load(ext):
    digests = {}
    path = os.path.join(ext, "annotator", "manga_line", "__init__.py")
    ns = {"torch": torch, "nn": narrowed_nn(), "np": np}
    digests.update(classes(path, CLASSES, ns))
    net = network(ns)
    call, d = functions(path, ["MangaLineExtration.__call__"],
                        {"torch": torch, "np": np, "cv2": cv2, "rearrange": rearrange})
    digests.update(d)
    # The detector with its model loaded, on the CPU.
    detector = type("Detector", (), {"__call__": call["MangaLineExtration.__call__"]})()
    detector.model, detector.device = net, "cpu"
    util, d_util = functions(os.path.join(ext, "annotator", "util.py"), ["HWC3"], {"cv2": cv2, "np": np})
    digests.update(d_util)
    ns_legacy = {"cv2": cv2, "np": np, "HWC3": util["HWC3"], "model_manga_line": detector}
    legacy, d_legacy = functions(
        os.path.join(ext, "scripts", "preprocessor", "legacy", "processor.py"),
        ["pad64", "safer_memory", "resize_image_with_pad", "lineart_anime_denoise"], ns_legacy)
    digests.update(d_legacy)

    def module(img, res):
        result, is_image = legacy["lineart_anime_denoise"](img, res=res)
        return util["HWC3"](result) if is_image else result

    return net, module, legacy["resize_image_with_pad"], digests


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extension", default=os.environ.get("SD_WEBUI_CONTROLNET_DIR"),
                    help="a checkout of sd-webui-controlnet (default: $SD_WEBUI_CONTROLNET_DIR)")
    args = ap.parse_args()
    if not args.extension:
        print("make_manga_line_fixtures.py: skipped (needs --extension or SD_WEBUI_CONTROLNET_DIR)")
        return
    assert cv2.__version__ == "4.10.0", cv2.__version__
    torch.set_num_threads(1)
    net, module, resize_image_with_pad, digests = load(args.extension)
    os.makedirs(OUT, exist_ok=True)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save(state, os.path.join(OUT, "erika.pth"))
    tensors, cases = {}, []
    for name, make in IMAGES.items():
        img = make()
        tensors[f"image.{name}"] = torch.from_numpy(img.copy())
        for res in RESOLUTIONS[name]:
            padded, _ = resize_image_with_pad(img, res)
            tensors[f"padded.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(padded))
            grey = cv2.cvtColor(padded, cv2.COLOR_RGB2GRAY)
            tensors[f"grey.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(grey))
            with torch.no_grad():
                line = net(grey_tensor(padded))[0, 0].numpy()
            tensors[f"line.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(line))
            out = module(img.copy(), res)
            assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3, out.shape
            # HWC3 of a one-channel map: kept as its one channel.
            assert (out[..., 0:1] == out).all()
            k = f"lineart_anime_denoise.{name}.{res}"
            tensors[k] = torch.from_numpy(np.ascontiguousarray(out[..., 0]))
            clipped = float(np.mean((line < 0) | (line > 255)))
            print(f"{name} {res} {grey.shape}: line {line.min():.1f}..{line.max():.1f} "
                  f"({clipped:.0%} clipped), map {len(np.unique(out))} levels")
            cases.append({"module": "lineart_anime_denoise", "file": "erika.pth", "image": name,
                          "resolution": res, "key": k})
    save_file(tensors, os.path.join(OUT, "manga_line.safetensors"))
    with open(os.path.join(OUT, "manga_line.json"), "w") as f:
        json.dump({"opencv": cv2.__version__, "numpy": np.__version__, "torch": torch.__version__,
                   "seed": SEED, "widths": {str(k): v for k, v in WIDTHS.items()},
                   "extension_sources": {k: f"sha256 {v}" for k, v in digests.items()},
                   "cases": cases}, f, indent=1)
        f.write("\n")
    print(f"wrote {len(tensors)} tensors, {len(cases)} cases to {OUT}/")


if __name__ == "__main__":
    main()
