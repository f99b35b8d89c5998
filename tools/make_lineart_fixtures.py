#!/usr/bin/env python3
"""References for the sd-webui-controlnet extension's model-based lineart preprocessors
(lineart_realistic, lineart_coarse, lineart_anime; crates/pipeline/src/controlnet/preprocess/
lineart.rs and lineart_anime.rs), run as the extension runs them: its own code, taken with
`ast` from a checkout:
  annotator/lineart/__init__.py: ResidualBlock, Generator (the network of sk_model.pth and
      sk_model2.pth) and LineartDetector.__call__ (RGB / 255, the line * 255, clip, uint8)
  annotator/lineart_anime/__init__.py: UnetGenerator, UnetSkipConnectionBlock (netG.pth's) and
      LineartAnimeDetector.__call__ (cubic resize to multiples of 256, / 127.5 - 1, the line
      * 127.5 + 127.5 resized back (cubic), clip, uint8)
  annotator/util.py: HWC3
  scripts/preprocessor/legacy/processor.py: pad64, safer_memory, resize_image_with_pad, lineart
      (`lineart_realistic`), lineart_coarse, lineart_anime (each `255 - detector(img)`;
      LegacyPreprocessor then applies HWC3)
No weights are downloaded: the networks are the extension's classes with random weights from
fixed torch seeds, saved with torch.save as the real files are. The real Generator files
(widths 64, 128, 256, 3 residual blocks) are 17 MB each and netG.pth (ngf 64, 8 levels) 218 MB;
the committed ones keep the classes' layers and names at reduced widths (our loaders read the
widths from the shapes): the Generator's `nn.Conv2d`/`nn.ConvTranspose2d` are given 1/16 of each
width of 64 and more (4, 8, 16; the 3 image and 1 line channels kept) by the `nn` the class
sees, the UnetGenerator is built with ngf 2 (its own parameter). Each Generator's last conv is
scaled so the sigmoid spreads over 0..1 (a random network's stays near 0.5, where the clip
and the truncation would test little); netG.pth is saved with the `module.` prefix of a
DataParallel save, which the extension (and our loader) drops.

Writes crates/pipeline/tests/fixtures/lineart/:
  sk_model.pth, sk_model2.pth, netG.pth    the networks' state dicts
  lineart.safetensors     image.<n> (uint8 HxWx3), padded.<n>.<res> (the padded image),
                          line.<file>.<n>.<res> (f32: the Generator's sigmoid on the padded
                          image), feed.<n>.<res> (uint8: the anime detector's cubic resize of it),
                          anime.<n>.<res> (f32: the UnetGenerator's tanh on the feed; these two
                          for ANIME_LINE_CASE only), <module>.<n>.<res> (uint8 HxW: the module's
                          map, whose three channels are equal)
  lineart.json            the cases and the sha256 of each function's source
Run from the repository root:
  python3 tools/make_lineart_fixtures.py --extension /path/to/sd-webui-controlnet
(default: $SD_WEBUI_CONTROLNET_DIR; without one the script says so and writes nothing).
"""
import argparse
import functools
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

OUT = os.path.join("crates", "pipeline", "tests", "fixtures", "lineart")
SHRINK = 16
NGF = 2
SEEDS = {"sk_model.pth": 20240611, "sk_model2.pth": 20240612, "netG.pth": 20240613}

IMAGES = {
    "sketch": lambda: sketch(58, 47),
    "wide": lambda: photo(37, 52, 1, 3.0),
    "tall": lambda: photo(45, 33, 2, 25.0),
}
# Shrinking (the area resize, exact here), the image's own size, enlarging (cubic). The anime
# detector enlarges every padded image (64 or 128 a side) to 256: its feed and raw line (256 x
# 256 each, the bulk of the file) are kept for one case, the maps for all.
RESOLUTIONS = {"sketch": [40, 47, 64], "wide": [30, 64], "tall": [33, 20]}
ANIME_LINE_CASE = ("sketch", 47)
MODULES = {"lineart_realistic": "sk_model.pth", "lineart_coarse": "sk_model2.pth", "lineart_anime": "netG.pth"}


def narrowed_nn():
    """torch.nn with the convs' widths of 64 and more divided by SHRINK."""
    def narrow(c):
        return c // SHRINK if c >= 64 else c

    ns = types.SimpleNamespace(**{k: getattr(torch.nn, k) for k in dir(torch.nn) if not k.startswith("_")})
    ns.Conv2d = lambda i, o, *a, **k: torch.nn.Conv2d(narrow(i), narrow(o), *a, **k)
    ns.ConvTranspose2d = lambda i, o, *a, **k: torch.nn.ConvTranspose2d(narrow(i), narrow(o), *a, **k)
    ns.InstanceNorm2d = lambda c, *a, **k: torch.nn.InstanceNorm2d(narrow(c), *a, **k)
    return ns


def load(ext):
    digests = {}
    # annotator/lineart: `norm_layer = nn.InstanceNorm2d` at its top, the classes below it.
    nn_small = narrowed_nn()
    ns_line = {"torch": torch, "nn": nn_small, "norm_layer": nn_small.InstanceNorm2d}
    line_path = os.path.join(ext, "annotator", "lineart", "__init__.py")
    digests.update(classes(line_path, ["ResidualBlock", "Generator"], ns_line))
    nets = {}
    for name, scale in [("sk_model.pth", 6.0), ("sk_model2.pth", 4.0)]:
        torch.manual_seed(SEEDS[name])
        net = ns_line["Generator"](3, 1, 3)
        with torch.no_grad():
            net.model4[1].weight.mul_(scale)
        nets[name] = net.float().eval()
    anime_path = os.path.join(ext, "annotator", "lineart_anime", "__init__.py")
    ns_anime = {"torch": torch, "nn": torch.nn, "functools": functools}
    digests.update(classes(anime_path, ["UnetGenerator", "UnetSkipConnectionBlock"], ns_anime))
    torch.manual_seed(SEEDS["netG.pth"])
    # As LineartAnimeDetector.load_model builds it, at ngf NGF.
    norm_layer = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
    nets["netG.pth"] = ns_anime["UnetGenerator"](3, 1, 8, NGF, norm_layer=norm_layer, use_dropout=False).float().eval()

    ns_call = {"torch": torch, "np": np, "cv2": cv2, "rearrange": rearrange}
    call_line, d = functions(line_path, ["LineartDetector.__call__"], ns_call)
    digests.update(d)
    call_anime, d = functions(anime_path, ["LineartAnimeDetector.__call__"], dict(ns_call))
    digests.update(d)

    def detector(call, net):
        # The detector with its model loaded, on the CPU.
        cls = type("Detector", (), {"__call__": call})
        obj = cls()
        obj.model, obj.device = net, "cpu"
        return obj

    util, d_util = functions(os.path.join(ext, "annotator", "util.py"), ["HWC3"], {"cv2": cv2, "np": np})
    digests.update(d_util)
    ns_legacy = {
        "cv2": cv2, "np": np, "HWC3": util["HWC3"],
        "model_lineart": detector(call_line["LineartDetector.__call__"], nets["sk_model.pth"]),
        "model_lineart_coarse": detector(call_line["LineartDetector.__call__"], nets["sk_model2.pth"]),
        "model_lineart_anime": detector(call_anime["LineartAnimeDetector.__call__"], nets["netG.pth"]),
    }
    legacy, d_legacy = functions(
        os.path.join(ext, "scripts", "preprocessor", "legacy", "processor.py"),
        ["pad64", "safer_memory", "resize_image_with_pad", "lineart", "lineart_coarse", "lineart_anime"], ns_legacy)
    digests.update(d_legacy)
    hwc3 = util["HWC3"]

    def legacy_call(fn):
        def run(img, res):
            result, is_image = fn(img, res=res)
            return hwc3(result) if is_image else result
        return run

    modules = {
        "lineart_realistic": legacy_call(legacy["lineart"]),
        "lineart_coarse": legacy_call(legacy["lineart_coarse"]),
        "lineart_anime": legacy_call(legacy["lineart_anime"]),
    }
    return nets, modules, legacy["resize_image_with_pad"], digests


def tensor(img, scale):
    return rearrange(torch.from_numpy(img.copy()).float() * scale[0] + scale[1], "h w c -> 1 c h w")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extension", default=os.environ.get("SD_WEBUI_CONTROLNET_DIR"),
                    help="a checkout of sd-webui-controlnet (default: $SD_WEBUI_CONTROLNET_DIR)")
    args = ap.parse_args()
    if not args.extension:
        print("make_lineart_fixtures.py: skipped (needs --extension or SD_WEBUI_CONTROLNET_DIR)")
        return
    assert cv2.__version__ == "4.10.0", cv2.__version__
    torch.set_num_threads(1)
    nets, modules, resize_image_with_pad, digests = load(args.extension)
    os.makedirs(OUT, exist_ok=True)
    for name, net in nets.items():
        state = net.state_dict()
        if name == "netG.pth":
            state = {f"module.{k}": v for k, v in state.items()}
        torch.save(state, os.path.join(OUT, name))
    tensors, cases = {}, []
    for name, make in IMAGES.items():
        img = make()
        tensors[f"image.{name}"] = torch.from_numpy(img.copy())
        for res in RESOLUTIONS[name]:
            padded, _ = resize_image_with_pad(img, res)
            tensors[f"padded.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(padded))
            with torch.no_grad():
                for file in ["sk_model.pth", "sk_model2.pth"]:
                    line = nets[file](tensor(padded, (1 / 255.0, 0.0)))[0, 0].numpy()
                    tensors[f"line.{file}.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(line))
                    print(f"{name} {res} {file}: line {line.min():.2f}..{line.max():.2f}, std {line.std():.2f}")
            if (name, res) == ANIME_LINE_CASE:
                h, w, _ = padded.shape
                hn, wn = 256 * int(np.ceil(h / 256.0)), 256 * int(np.ceil(w / 256.0))
                feed = cv2.resize(padded, (wn, hn), interpolation=cv2.INTER_CUBIC)
                tensors[f"feed.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(feed))
                with torch.no_grad():
                    anime = nets["netG.pth"](tensor(feed, (1 / 127.5, -1.0)))[0, 0].numpy()
                tensors[f"anime.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(anime))
                print(f"{name} {res} netG.pth at {wn}x{hn}: line {anime.min():.2f}..{anime.max():.2f}")
            for module in MODULES:
                out = modules[module](img.copy(), res)
                assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3, (module, out.shape)
                # HWC3 of a one-channel map: kept as its one channel.
                assert (out[..., 0:1] == out).all(), module
                k = f"{module}.{name}.{res}"
                tensors[k] = torch.from_numpy(np.ascontiguousarray(out[..., 0]))
                print(f"  {module}: {len(np.unique(out))} levels")
                cases.append({"module": module, "file": MODULES[module], "image": name, "resolution": res, "key": k})
    save_file(tensors, os.path.join(OUT, "lineart.safetensors"))
    with open(os.path.join(OUT, "lineart.json"), "w") as f:
        json.dump({"opencv": cv2.__version__, "numpy": np.__version__, "torch": torch.__version__,
                   "seeds": SEEDS, "shrink": SHRINK, "ngf": NGF,
                   "extension_sources": {k: f"sha256 {v}" for k, v in digests.items()},
                   "cases": cases}, f, indent=1)
        f.write("\n")
    print(f"wrote {len(tensors)} tensors, {len(cases)} cases to {OUT}/")


if __name__ == "__main__":
    main()
