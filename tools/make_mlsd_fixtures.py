#!/usr/bin/env python3
"""References for the sd-webui-controlnet extension's M-LSD preprocessor (`mlsd`;
crates/pipeline/src/controlnet/preprocess/mlsd.rs), run as the extension runs it: its own code
from a checkout:
  annotator/mlsd/models/mbv2_mlsd_large.py: the whole file (ConvBNReLU, InvertedResidual,
      MobileNetV2, BlockTypeA/B/C, MobileV2_MLSD_Large), imported as it is
  annotator/mlsd/utils.py: deccode_output_score_and_ptss, pred_lines (its `devices` the CPU)
  annotator/mlsd/__init__.py: apply_mlsd (pred_lines at the image's size, cv2.line of width 1)
  annotator/util.py: HWC3
  scripts/preprocessor/legacy/processor.py: pad64, safer_memory, resize_image_with_pad, mlsd
      (the legacy `call_function`; LegacyPreprocessor then applies HWC3)
No weights are downloaded. MobileV2_MLSD_Large hard-codes its widths (mlsd_large_512_fp32.pth
is 6 MB), so the committed network is the extension's own modules (ConvBNReLU,
InvertedResidual, BlockTypeA/B/C and the classes' forward methods) wired as its __init__s wire
them at reduced widths; the script checks that wiring against a full-width
MobileV2_MLSD_Large (the same state_dict names in the same order, and every conv's kernel,
stride, padding, dilation and depthwise-ness). Random weights from a fixed torch seed, the
BatchNorms' statistics drawn too, and the last conv scaled so the centre map has peaks above
the thresholds and the displacements reach lengths past the distance threshold (the fixture
asserts that lines are drawn).

Writes crates/pipeline/tests/fixtures/mlsd/:
  mlsd_large_512_fp32.pth     the state_dict, saved with torch.save (the real file's layout)
  mlsd.safetensors            image.<n> (uint8 HxWx3), padded.<n>.<res> (the padded image),
                              output.<n>.<res> (f32 [9, H/2, W/2]: the network's output on it;
                              where the resolution is the image's shorter side),
                              lines.<n>.<res>.<case> (f64 [L, 4]: pred_lines' segments),
                              mlsd.<n>.<res>.<case> (uint8 HxW: the module's map, one of its
                              three equal channels),
                              canvas.<k> (uint8 HxW: cv2.line's lines of `segments.<k>`),
                              segments.<k> (i64 [L, 4]: x0, y0, x1, y1, many off the canvas)
  mlsd.json                   the cases and the sha256 of each source used
Run from the repository root:
  python3 tools/make_mlsd_fixtures.py --extension /path/to/sd-webui-controlnet
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
from torch import nn
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import functions  # noqa: E402
from make_preprocess_fixtures import photo  # noqa: E402
from make_preprocess_module_fixtures import sketch  # noqa: E402

OUT = os.path.join("crates", "pipeline", "tests", "fixtures", "mlsd")
SEED = 20240612
# Reduced widths: the first conv's, the five inverted-residual stages' (MobileNetV2's
# 32, 16, 24, 32, 64, 96) and the decoder's (64).
FIRST = 8
STAGES = [(1, 4, 1, 1), (6, 6, 2, 2), (6, 8, 3, 2), (6, 10, 4, 2), (6, 12, 3, 1)]
DECODER = 8

IMAGES = {
    "sketch": lambda: sketch(58, 47),
    "wide": lambda: photo(37, 70, 1, 3.0),
    "tall": lambda: photo(90, 61, 2, 25.0),
}
# Shrinking (the area resize), the image's own size, enlarging (cubic).
RESOLUTIONS = {"sketch": [40, 47, 64], "wide": [37, 50], "tall": [61, 80]}
# (value threshold, distance threshold): the extension's defaults (on the larger maps more than
# topk's 200 centres pass them), a strict pair, one between.
THRESHOLDS = {"default": (0.1, 0.1), "strict": (0.4, 10.0), "mid": (0.2, 5.0)}
CPU = types.SimpleNamespace(get_device_for=lambda _: "cpu")


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def import_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def reduced(m):
    """MobileV2_MLSD_Large at the reduced widths, of the extension's own modules."""
    backbone = m.MobileNetV2.__new__(m.MobileNetV2)
    nn.Module.__init__(backbone)
    features = [m.ConvBNReLU(4, FIRST, stride=2)]
    c_in = FIRST
    for t, c, n, s in STAGES:
        for i in range(n):
            features.append(m.InvertedResidual(c_in, c, s if i == 0 else 1, expand_ratio=t))
            c_in = c
    backbone.features = nn.Sequential(*features)
    backbone.fpn_selected = [1, 3, 6, 10, 13]
    net = m.MobileV2_MLSD_Large.__new__(m.MobileV2_MLSD_Large)
    nn.Module.__init__(net)
    net.backbone = backbone
    c1, c2, c3, c4, c5 = [s[1] for s in STAGES]
    d = DECODER
    net.block15 = m.BlockTypeA(in_c1=c4, in_c2=c5, out_c1=d, out_c2=d, upscale=False)
    net.block16 = m.BlockTypeB(2 * d, d)
    net.block17 = m.BlockTypeA(in_c1=c3, in_c2=d, out_c1=d, out_c2=d)
    net.block18 = m.BlockTypeB(2 * d, d)
    net.block19 = m.BlockTypeA(in_c1=c2, in_c2=d, out_c1=d, out_c2=d)
    net.block20 = m.BlockTypeB(2 * d, d)
    net.block21 = m.BlockTypeA(in_c1=c1, in_c2=d, out_c1=d, out_c2=d)
    net.block22 = m.BlockTypeB(2 * d, d)
    net.block23 = m.BlockTypeC(d, 16)
    return net


def layout(net):
    """What the wiring fixes: the names, and each conv's geometry and depthwise-ness."""
    convs = [(name, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
              mod.groups == mod.in_channels and mod.groups > 1, mod.bias is not None)
             for name, mod in net.named_modules() if isinstance(mod, nn.Conv2d)]
    upscales = [(name, mod.upscale) for name, mod in net.named_modules() if hasattr(mod, "upscale")]
    return list(net.state_dict().keys()), convs, upscales


def network(m):
    full = m.MobileV2_MLSD_Large()
    torch.manual_seed(SEED)
    net = reduced(m)
    assert layout(net) == layout(full), "the reduced wiring is not MobileV2_MLSD_Large's"
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out")
                if mod.bias is not None:
                    mod.bias.uniform_(-0.2, 0.2)
            elif isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
                mod.running_mean.uniform_(-0.3, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
        # The BatchNorms before a ReLU6 scaled so its cap is reached (the script checks that
        # it is).
        for mod in net.backbone.modules():
            if isinstance(mod, m.ConvBNReLU):
                mod[1].weight.mul_(2.0)
        # Channel 7 (the centre) and 8..11 (the displacements) of the last conv: a random
        # network's centre logits hover near 0 and its displacements under a pixel.
        w = net.block23.conv3.weight
        b = net.block23.conv3.bias
        w[7].mul_(0.6)
        b[7] = -1.0
        w[8:12].mul_(3.5)
    return net.float().eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extension", default=os.environ.get("SD_WEBUI_CONTROLNET_DIR"),
                    help="a checkout of sd-webui-controlnet (default: $SD_WEBUI_CONTROLNET_DIR)")
    args = ap.parse_args()
    if not args.extension:
        print("make_mlsd_fixtures.py: skipped (needs --extension or SD_WEBUI_CONTROLNET_DIR)")
        return
    assert cv2.__version__ == "4.10.0", cv2.__version__
    torch.set_num_threads(1)
    ext = args.extension
    modules = types.ModuleType("modules")
    modules.devices = CPU
    sys.modules["modules"] = modules
    model_path = os.path.join(ext, "annotator", "mlsd", "models", "mbv2_mlsd_large.py")
    m = import_file("mbv2_mlsd_large", model_path)
    utils_path = os.path.join(ext, "annotator", "mlsd", "utils.py")
    utils = import_file("mlsd_utils", utils_path)
    digests = {"annotator/mlsd/models/mbv2_mlsd_large.py": sha(model_path),
               "annotator/mlsd/utils.py": sha(utils_path)}
    net = network(m)

    # apply_mlsd with its model loaded (the global it reads); pred_lines wrapped to keep the
    # segments it returns.
    caught = []

    def pred_lines(*a, **k):
        lines = utils.pred_lines(*a, **k)
        caught.append(np.array(lines, dtype=np.float64).reshape(-1, 4))
        return lines

    ns = {"torch": torch, "np": np, "cv2": cv2, "os": os, "mlsdmodel": net, "devices": CPU,
          "pred_lines": pred_lines, "MobileV2_MLSD_Large": None, "modeldir": None,
          "old_modeldir": None, "remote_model_path": None}
    f, d = functions(os.path.join(ext, "annotator", "mlsd", "__init__.py"), ["apply_mlsd"], ns)
    digests.update({f"annotator/mlsd/__init__.py {k}": v for k, v in d.items()})
    util, d = functions(os.path.join(ext, "annotator", "util.py"), ["HWC3"], {"np": np})
    digests.update(d)
    annotator_mlsd = types.ModuleType("annotator.mlsd")
    annotator_mlsd.apply_mlsd = f["apply_mlsd"]
    sys.modules.setdefault("annotator", types.ModuleType("annotator"))
    sys.modules["annotator.mlsd"] = annotator_mlsd
    legacy, d = functions(
        os.path.join(ext, "scripts", "preprocessor", "legacy", "processor.py"),
        ["pad64", "safer_memory", "resize_image_with_pad", "mlsd"],
        {"cv2": cv2, "np": np, "HWC3": util["HWC3"], "model_mlsd": None})
    digests.update(d)

    os.makedirs(OUT, exist_ok=True)
    torch.save(net.state_dict(), os.path.join(OUT, "mlsd_large_512_fp32.pth"))
    tensors, cases = {}, []
    for name, make in IMAGES.items():
        img = make()
        tensors[f"image.{name}"] = torch.from_numpy(img.copy())
        for res in RESOLUTIONS[name]:
            padded, _ = legacy["resize_image_with_pad"](img, res)
            tensors[f"padded.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(padded))
            # pred_lines' input at the image's own size, and the network's output on it.
            x = np.concatenate([padded, np.ones(padded.shape[:2] + (1,))], axis=-1)
            x = np.expand_dims(x.transpose((2, 0, 1)), 0).astype("float32") / 127.5 - 1.0
            capped = []
            # Before the activation (it runs in place).
            hooks = [mod.register_forward_pre_hook(lambda _m, i: capped.append((i[0] > 6).sum().item()))
                     for mod in net.modules() if isinstance(mod, nn.ReLU6)]
            with torch.no_grad():
                out = net(torch.from_numpy(x)).numpy()[0]
            for h in hooks:
                h.remove()
            assert sum(capped) > 0, "ReLU6 never caps"
            print(f"  ReLU6 caps {sum(capped)} values")
            if res == min(img.shape[:2]):
                # Kept at the image's own size only (the larger outputs would swell the file).
                tensors[f"output.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(out))
            heat = 1 / (1 + np.exp(-out[0]))
            dist = np.hypot(out[1] - out[3], out[2] - out[4])
            # No centre saturates (equal scores would leave topk's order to torch).
            assert heat.max() < 0.99, heat.max()
            print(f"{name} {res}: padded {padded.shape[1]}x{padded.shape[0]}, centre "
                  f"{heat.min():.2f}..{heat.max():.2f}, length up to {dist.max():.1f}")
            for case, (thr_v, thr_d) in THRESHOLDS.items():
                caught.clear()
                result, is_image = legacy["mlsd"](img.copy(), res, thr_v, thr_d)
                out_map = util["HWC3"](result) if is_image else result
                assert out_map.dtype == np.uint8 and out_map.shape[2] == 3
                (lines,) = caught
                k = f"{name}.{res}.{case}"
                tensors[f"lines.{k}"] = torch.from_numpy(lines)
                assert (out_map == out_map[..., :1]).all()
                tensors[f"mlsd.{k}"] = torch.from_numpy(np.ascontiguousarray(out_map[..., 0]))
                white = (out_map[..., 0] == 255).mean()
                print(f"  {case}: {len(lines)} lines, {white:.3f} white")
                assert len(lines) > 0 and white > 0, k
                cases.append({"image": name, "resolution": res, "case": case,
                              "value_threshold": thr_v, "distance_threshold": thr_d,
                              "lines": len(lines), "key": k})
    # cv2.line alone: segments across, along and off small canvases, steep and shallow.
    rng = np.random.default_rng(SEED)
    for k, (h, w) in enumerate([(17, 23), (40, 9), (1, 30)]):
        segs = rng.integers(-12, max(h, w) + 12, size=(120, 4))
        segs[:20, 2:] = segs[:20, :2]  # single points
        segs[20:40, 3] = segs[20:40, 1]  # horizontal
        segs[40:60, 2] = segs[40:60, 0]  # vertical
        canvas = np.zeros((h, w, 3), np.uint8)
        drawn = []
        for s in segs:
            one = np.zeros((h, w, 3), np.uint8)
            cv2.line(one, (int(s[0]), int(s[1])), (int(s[2]), int(s[3])), [255, 255, 255], 1)
            drawn.append(one[..., 0])
        # Each segment's own canvas, so a wrong pixel points at its segment.
        tensors[f"segments.{k}"] = torch.from_numpy(segs.astype(np.int64))
        tensors[f"canvas.{k}"] = torch.from_numpy(np.stack(drawn))
    save_file(tensors, os.path.join(OUT, "mlsd.safetensors"))
    with open(os.path.join(OUT, "mlsd.json"), "w") as fh:
        json.dump({"opencv": cv2.__version__, "numpy": np.__version__, "torch": torch.__version__,
                   "seed": SEED, "first": FIRST, "stages": STAGES, "decoder": DECODER,
                   "extension_sources": {k: f"sha256 {v}" for k, v in digests.items()},
                   "cases": cases}, fh, indent=1)
        fh.write("\n")
    print(f"wrote {len(tensors)} tensors, {len(cases)} cases to {OUT}/")


if __name__ == "__main__":
    main()
