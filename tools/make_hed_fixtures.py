#!/usr/bin/env python3
"""References for the sd-webui-controlnet extension's HED preprocessors (softedge_hed,
softedge_hedsafe, scribble_hed; crates/pipeline/src/controlnet/preprocess/hed.rs), run as the
extension runs them: its own code, taken with `ast` from a checkout:
  annotator/hed/__init__.py: DoubleConvBlock, ControlNetHED_Apache2 (the network) and apply_hed
      (the network's projections resized with cv2 INTER_LINEAR, averaged, the sigmoid, safe_step)
  annotator/util.py: safe_step, nms, HWC3
  scripts/preprocessor/legacy/processor.py: pad64, safer_memory, resize_image_with_pad, hed,
      hed_safe, scribble_hed (the legacy `call_function`s; LegacyPreprocessor then applies HWC3)
No weights are downloaded: the network is the extension's class with random weights from a
fixed torch seed. The real ControlNetHED.pth (widths 64, 128, 256, 512, 512) is 59 MB; the
committed one keeps the class's layers and names at widths 4, 8, 16, 32, 32 (our loader reads
the widths from the shapes), so the file is small and the test fast. The projections' weights
are scaled so the averaged edge logits spread over about -4..4 (a random network's barely
leave 0, where the sigmoid, safe_step and scribble's threshold would test little).

Writes crates/pipeline/tests/fixtures/hed/:
  ControlNetHED.pth           the network's state dict, saved with torch.save as the real one is
  hed.safetensors             image.<n> (uint8 HxWx3), padded.<n>.<res> (the padded image),
                              logits.<n>.<res> (f32: the mean of the resized projections, on the
                              padded image), <module>.<n>.<res> (uint8 HxWx3: the module's map)
  hed.json                    the cases and the sha256 of each function's source
Run from the repository root:
  python3 tools/make_hed_fixtures.py --extension /path/to/sd-webui-controlnet
(default: $SD_WEBUI_CONTROLNET_DIR; without one the script says so and writes nothing).
"""
import argparse
import ast
import hashlib
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

OUT = os.path.join("crates", "pipeline", "tests", "fixtures", "hed")
WIDTHS = [4, 8, 16, 32, 32]
LAYERS = [2, 2, 3, 3, 3]
SEED = 20240607

IMAGES = {
    "sketch": lambda: sketch(58, 47),
    "wide": lambda: photo(37, 52, 1, 3.0),
    "tall": lambda: photo(45, 33, 2, 25.0),
}
# Shrinking (the area resize, exact here), the image's own size, enlarging (cubic).
RESOLUTIONS = {"sketch": [40, 47, 64], "wide": [30, 64], "tall": [33, 20]}
MODULES = ["softedge_hed", "softedge_hedsafe", "scribble_hed"]


def classes(path, names, namespace):
    """The named classes of a file executed in `namespace`; their sources' sha256."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source)
    digests = {}
    for name in names:
        (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
        exec(compile(ast.Module(body=[node], type_ignores=[]), path, "exec"), namespace)
        digests[name] = hashlib.sha256(ast.get_source_segment(source, node).encode()).hexdigest()
    return digests


def network(ns):
    """The extension's ControlNetHED_Apache2 at WIDTHS, random weights from SEED."""
    torch.manual_seed(SEED)
    net = ns["ControlNetHED_Apache2"]()
    c_in = 3
    for i, (w, n) in enumerate(zip(WIDTHS, LAYERS)):
        setattr(net, f"block{i + 1}", ns["DoubleConvBlock"](input_channel=c_in, output_channel=w, layer_number=n))
        c_in = w
    with torch.no_grad():
        # The real `norm` is the mean colour the network subtracts.
        net.norm.copy_(torch.tensor([120.0, 115.0, 105.0]).reshape(1, 3, 1, 1))
        # Projections scaled up, biased below 0: dark ground, bright edges, as trained HED.
        for i, bias in enumerate([-0.3, 0.2, -0.2, -0.1, 0.1]):
            p = getattr(net, f"block{i + 1}").projection
            p.weight.mul_(3.0)
            p.bias.fill_(bias)
    return net.float().eval()


def load(ext):
    hed_path = os.path.join(ext, "annotator", "hed", "__init__.py")
    ns = {"torch": torch, "np": np, "cv2": cv2, "rearrange": rearrange, "os": os}
    digests = classes(hed_path, ["DoubleConvBlock", "ControlNetHED_Apache2"], ns)
    util, d_util = functions(os.path.join(ext, "annotator", "util.py"), ["HWC3", "safe_step", "nms"],
                             {"cv2": cv2, "np": np})
    digests.update(d_util)
    net = network(ns)
    # apply_hed with its model already loaded (the global it reads) on the CPU.
    ns.update({"netNetwork": net, "safe_step": util["safe_step"], "nms": util["nms"],
               "devices": types.SimpleNamespace(get_device_for=lambda _: "cpu")})
    f, d = functions(hed_path, ["apply_hed"], ns)
    digests.update(d)
    apply_hed = f["apply_hed"]
    # The legacy functions import apply_hed and nms from the extension; given here instead.
    annotator_hed = types.ModuleType("annotator.hed")
    annotator_hed.apply_hed = apply_hed
    annotator_util = types.ModuleType("annotator.util")
    annotator_util.nms = util["nms"]
    sys.modules.setdefault("annotator", types.ModuleType("annotator"))
    sys.modules["annotator.hed"] = annotator_hed
    sys.modules["annotator.util"] = annotator_util
    ns_legacy = {"cv2": cv2, "np": np, "HWC3": util["HWC3"], "model_hed": None}
    legacy, d_legacy = functions(
        os.path.join(ext, "scripts", "preprocessor", "legacy", "processor.py"),
        ["pad64", "safer_memory", "resize_image_with_pad", "hed", "hed_safe", "scribble_hed"], ns_legacy)
    digests.update(d_legacy)
    hwc3 = util["HWC3"]

    def legacy_call(fn):
        def run(img, res):
            result, is_image = fn(img, res=res)
            return hwc3(result) if is_image else result
        return run

    modules = {
        "softedge_hed": legacy_call(legacy["hed"]),
        "softedge_hedsafe": legacy_call(legacy["hed_safe"]),
        "scribble_hed": legacy_call(legacy["scribble_hed"]),
    }

    def logits(padded):
        # apply_hed's edge before the sigmoid: the mean of the resized projections.
        h, w, _ = padded.shape
        with torch.no_grad():
            x = rearrange(torch.from_numpy(padded.copy()).float(), "h w c -> 1 c h w")
            edges = [e.numpy().astype(np.float32)[0, 0] for e in net(x)]
        edges = [cv2.resize(e, (w, h), interpolation=cv2.INTER_LINEAR) for e in edges]
        return np.mean(np.stack(edges, axis=2), axis=2)

    return net, modules, legacy["resize_image_with_pad"], logits, digests


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extension", default=os.environ.get("SD_WEBUI_CONTROLNET_DIR"),
                    help="a checkout of sd-webui-controlnet (default: $SD_WEBUI_CONTROLNET_DIR)")
    args = ap.parse_args()
    if not args.extension:
        print("make_hed_fixtures.py: skipped (needs --extension or SD_WEBUI_CONTROLNET_DIR)")
        return
    assert cv2.__version__ == "4.10.0", cv2.__version__
    torch.set_num_threads(1)
    net, modules, resize_image_with_pad, logits, digests = load(args.extension)
    os.makedirs(OUT, exist_ok=True)
    torch.save(net.state_dict(), os.path.join(OUT, "ControlNetHED.pth"))
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
            for module in MODULES:
                out = modules[module](img.copy(), res)
                assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3, (module, out.shape)
                k = f"{module}.{name}.{res}"
                tensors[k] = torch.from_numpy(np.ascontiguousarray(out))
                print(f"  {module}: {len(np.unique(out))} levels, {(out[..., 0] == 255).mean():.2f} white")
                cases.append({"module": module, "image": name, "resolution": res, "key": k})
    save_file(tensors, os.path.join(OUT, "hed.safetensors"))
    with open(os.path.join(OUT, "hed.json"), "w") as f:
        json.dump({"opencv": cv2.__version__, "numpy": np.__version__, "torch": torch.__version__,
                   "seed": SEED, "widths": WIDTHS,
                   "extension_sources": {k: f"sha256 {v}" for k, v in digests.items()},
                   "cases": cases}, f, indent=1)
        f.write("\n")
    print(f"wrote {len(tensors)} tensors, {len(cases)} cases to {OUT}/")


if __name__ == "__main__":
    main()
