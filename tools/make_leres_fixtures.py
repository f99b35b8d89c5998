#!/usr/bin/env python3
"""References for the sd-webui-controlnet extension's LeReS depth preprocessor (depth_leres;
crates/pipeline/src/controlnet/preprocess/leres.rs), run as the extension runs it:
  annotator/leres/ (imported whole): __init__.py (apply_leres: res101.pth's `depth_model`
      with its `module.` prefix stripped into RelDepthModel("resnext101"), estimateleres,
      the 16-bit min-max, convertScaleAbs to 8 bits, the near threshold, the inversion, the
      background threshold), leres/depthmap.py (estimateleres: channels reversed, cv2.resize
      to (w, h), ToTensor + ImageNet Normalize on the float image, the model, INTER_CUBIC
      back), leres/multi_depth_model_woauxi.py, leres/network_auxi.py (DepthNet, Decoder,
      FTB, FFM, AO), leres/Resnext_torch.py (ResNet, Bottleneck), leres/net_tools.py
  scripts/utils.py: pad64, safer_memory, resize_image_with_pad; scripts/preprocessor/legacy/
      processor.py: leres (taken with `ast`; preprocessor_compiled.py's depth_leres calls it
      with boost=False)
No weights are downloaded. The model is narrowed so the fixtures stay small: the ResNeXt's
stem 16 wide and its stages' planes (8, 16, 24, 32) (the real (64, 128, 256, 512)), with 4
groups of 16 per group (`width_per_group`; the real 32 x 8) and DEPTHS blocks (the real
(3, 4, 23, 3)), built by the extension's own ResNet._make_layer and Bottleneck; the decoder's
in-widths follow (32, 64, 96, 128) and its mid-widths are MIDS (the real (256, 256, 256,
512)), its modules the extension's FTB, FFM and AO wired as Decoder.__init__ wires them.
Seeded random weights (BatchNorm running statistics too, though apply_leres never calls
eval(): its BatchNorms run in training mode, on each image's own statistics), rounded to
f16, saved as the real file is: torch.save of a dict whose `depth_model` is RelDepthModel's state dict with
DataParallel's `module.` prefix, beside a stand-in `shift_model` (AdelaiDepth's checkpoints
carry its shift and focal networks too; apply_leres reads only `depth_model`).

Writes crates/pipeline/tests/fixtures/leres/:
  res101.pth          the weights
  leres.safetensors   image.<n>, padded.<n>.<res>, depth.<n>.<res> (the model's output on the
                      padded image, every STRIDE-th row and column), map.<n>.<res>.<near>.<bg>
                      (uint8, the module's output)
  leres.json          the cases, sources
Run from the repository root with a python that has torch, torchvision, opencv-python-headless
4.10.0, safetensors:
  python3 tools/make_leres_fixtures.py --extension /path/to/sd-webui-controlnet
(default: $SD_WEBUI_CONTROLNET_DIR; without it the script says so and writes nothing).
With `--full-width PATH` it writes only PATH: RelDepthModel("resnext101") as the extension
builds it, these seeded random weights in f32, for the annotator bench.
"""
import argparse
import json
import os
import sys
import tempfile
import types

import cv2
import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import functions  # noqa: E402
from make_depth_anything_v2_fixtures import IMAGES, digest  # noqa: E402

OUT = os.path.join("crates", "pipeline", "tests", "fixtures", "leres")
SEED = 20230512
STRIDE = 3
STEM, PLANES, GROUPS, WIDTH_PER_GROUP = 16, (8, 16, 24, 32), 4, 16
DEPTHS = (2, 1, 2, 1)
MIDS = (12, 12, 12, 16)
# A square padded to 64, a tall one padded to 192 x 128 (the resolution no multiple of 64).
RESOLUTIONS = {"square": [64], "tall": [100]}
# (Remove Near %, Remove Background %): off, both on (thresholds 76.5 and 51), near alone.
THRESHOLDS = [(0, 0), (30, 20), (55.5, 0)]


def stubs(models_dir):
    """A1111's modules the package imports: the device (CPU), shared.opts, the folder."""
    devices = types.ModuleType("modules.devices")
    devices.get_device_for = lambda _: torch.device("cpu")
    shared = types.ModuleType("modules.shared")
    shared.opts = types.SimpleNamespace()
    modules = types.ModuleType("modules")
    modules.devices, modules.shared = devices, shared
    sys.modules.update({"modules": modules, "modules.devices": devices, "modules.shared": shared})
    path = types.ModuleType("annotator.annotator_path")
    path.models_path = models_dir
    sys.modules["annotator.annotator_path"] = path


def narrow(ext):
    """The package with its widths narrowed (see the docstring); the digests of its sources."""
    import torch.nn as nn
    import annotator.leres.leres.Resnext_torch as resnext
    import annotator.leres.leres.multi_depth_model_woauxi as mdm
    import annotator.leres.leres.network_auxi as net

    def narrow_resnext101_32x8d(pretrained=True, **kwargs):
        assert not pretrained
        model = resnext.ResNet(resnext.Bottleneck, [1, 1, 1, 1], groups=GROUPS,
                               width_per_group=WIDTH_PER_GROUP)
        model.inplanes = STEM
        model.conv1 = nn.Conv2d(3, STEM, kernel_size=7, stride=2, padding=3, bias=False)
        model.bn1 = nn.BatchNorm2d(STEM)
        for i, (planes, depth) in enumerate(zip(PLANES, DEPTHS)):
            layer = model._make_layer(resnext.Bottleneck, planes, depth, stride=1 if i == 0 else 2)
            setattr(model, f"layer{i + 1}", layer)
        return model

    def narrow_decoder():
        # Decoder.__init__'s modules at the narrow widths.
        d = net.Decoder()
        ins = [p * resnext.Bottleneck.expansion for p in PLANES]
        d.conv = net.FTB(inchannels=ins[3], midchannels=MIDS[3])
        d.conv1 = nn.Conv2d(MIDS[3], MIDS[2], kernel_size=3, padding=1, stride=1, bias=True)
        d.ffm2 = net.FFM(ins[2], MIDS[2], MIDS[2], upfactor=2)
        d.ffm1 = net.FFM(ins[1], MIDS[1], MIDS[1], upfactor=2)
        d.ffm0 = net.FFM(ins[0], MIDS[0], MIDS[0], upfactor=2)
        d.outconv = net.AO(inchannels=MIDS[0], outchannels=1, upfactor=2)
        return d

    resnext.resnext101_32x8d = narrow_resnext101_32x8d
    # DepthModel builds `network.Decoder()` (its super() call names the class: not replaced).
    mdm.network = types.SimpleNamespace(__name__=net.__name__, Decoder=narrow_decoder)


def sources(ext):
    return {f"annotator/leres/{rel}": digest(os.path.join(ext, "annotator", "leres", rel))
            for rel in ["__init__.py", "leres/depthmap.py", "leres/multi_depth_model_woauxi.py",
                        "leres/network_auxi.py", "leres/Resnext_torch.py", "leres/net_tools.py"]}


def legacy(ext, apply_leres):
    """The legacy `leres` (with scripts/utils.py's resize_image_with_pad) calling apply_leres;
    resize_image_with_pad; the digests of their sources."""
    utils, digests = functions(os.path.join(ext, "scripts", "utils.py"),
                               ["pad64", "safer_memory", "resize_image_with_pad"],
                               {"cv2": cv2, "np": np})
    ns = {"np": np, "resize_image_with_pad": utils["resize_image_with_pad"],
          "model_leres": apply_leres}
    f, d = functions(os.path.join(ext, "scripts", "preprocessor", "legacy", "processor.py"),
                     ["leres"], ns)
    digests.update(d)
    return f, utils["resize_image_with_pad"], digests


def full_width(ext):
    """The extension's package unnarrowed, RelDepthModel("resnext101") with this script's
    random weights (f32, left in training mode as apply_leres leaves it), the legacy `leres`
    running it (apply_leres's global set to it) and depthmap.py's scale_torch. The model's
    call is its depth_model's (estimateleres's call), for the bench's network stage."""
    stubs(tempfile.mkdtemp())
    sys.path.insert(0, ext)
    import annotator.leres as leres_pkg
    from annotator.leres.leres.depthmap import scale_torch
    from annotator.leres.leres.multi_depth_model_woauxi import RelDepthModel
    torch.manual_seed(SEED)
    model = randomize(RelDepthModel(backbone="resnext101"))
    model.forward = model.depth_model.forward
    leres_pkg.model = model
    f, _, _ = legacy(ext, leres_pkg.apply_leres)
    return model, f, scale_torch


def randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith(".weight"):  # BatchNorm's gamma
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.uniform_(-0.2, 0.2)
            else:
                p.normal_(0, 1.5 / p[0].numel() ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.uniform_(-0.3, 0.3)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
    return model


def checkpoint(model, half):
    """The real file's layout: DataParallel's names under `depth_model`, a shift network beside."""
    state = {f"module.{k}": (v.half() if half and v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items()}
    shift = {"module.conv1.weight": torch.zeros(2, 1, 1, dtype=torch.float16)}
    return {"depth_model": state, "shift_model": shift}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extension", default=os.environ.get("SD_WEBUI_CONTROLNET_DIR"))
    ap.add_argument("--full-width", metavar="PATH",
                    help="write only the real-width model with random weights to PATH")
    args = ap.parse_args()
    if not args.extension:
        print("make_leres_fixtures.py: skipped (needs --extension or SD_WEBUI_CONTROLNET_DIR)")
        return
    if args.full_width:
        model = full_width(args.extension)[0]
        torch.save(checkpoint(model, half=False), args.full_width)
        n = sum(v.numel() for v in model.state_dict().values())
        print(f"{args.full_width}: {n / 1e6:.1f} M values")
        return
    tmp = tempfile.mkdtemp()
    stubs(tmp)
    sys.path.insert(0, args.extension)
    narrow(args.extension)
    from annotator.leres.leres.multi_depth_model_woauxi import RelDepthModel
    torch.manual_seed(SEED)
    model = randomize(RelDepthModel(backbone="resnext101"))
    assert cv2.__version__ == "4.10.0", cv2.__version__
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    weights = os.path.join(OUT, "res101.pth")
    torch.save(checkpoint(model, half=True), weights)
    # apply_leres loads res101.pth from its download folder on its first call.
    os.makedirs(os.path.join(tmp, "leres"))
    os.symlink(os.path.abspath(weights), os.path.join(tmp, "leres", "res101.pth"))
    import annotator.leres as leres_pkg
    digests = sources(args.extension)
    f, resize_image_with_pad, d = legacy(args.extension, leres_pkg.apply_leres)
    digests.update(d)
    from annotator.leres.leres.depthmap import scale_torch
    tensors, cases = {}, []
    for name, res_list in RESOLUTIONS.items():
        img = IMAGES[name]()
        tensors[f"image.{name}"] = torch.from_numpy(img.copy())
        for res in res_list:
            padded, _ = resize_image_with_pad(img, res)
            tensors[f"padded.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(padded))
            maps = []
            for near, bg in THRESHOLDS:
                out, _ = f["leres"](img.copy(), res=res, thr_a=near, thr_b=bg, boost=False)
                key = f"map.{name}.{res}.{near}.{bg}"
                tensors[key] = torch.from_numpy(np.ascontiguousarray(out))
                maps.append({"remove_near": near, "remove_background": bg, "map": key})
            # estimateleres's network call on the padded image (its resize is to the same size).
            x = scale_torch(padded[:, :, ::-1].copy())[None]
            with torch.no_grad():
                depth = leres_pkg.model.depth_model(x)[0, 0].numpy()
            tensors[f"depth.{name}.{res}"] = torch.from_numpy(
                np.ascontiguousarray(depth[::STRIDE, ::STRIDE]))
            print(f"{name} {res}: padded {padded.shape[:2]}, depth {depth.shape} "
                  f"{depth.min():.3f}..{depth.max():.3f}, "
                  f"map levels {[len(np.unique(tensors[m['map']].numpy())) for m in maps]}")
            cases.append({"image": name, "resolution": res, "depth": f"depth.{name}.{res}",
                          "maps": maps})
    save_file(tensors, os.path.join(OUT, "leres.safetensors"))
    with open(os.path.join(OUT, "leres.json"), "w") as fh:
        json.dump({"opencv": cv2.__version__, "numpy": np.__version__, "torch": torch.__version__,
                   "seed": SEED, "stride": STRIDE, "stem": STEM, "planes": PLANES,
                   "groups": GROUPS, "width_per_group": WIDTH_PER_GROUP, "depths": DEPTHS,
                   "mids": MIDS, "sources": {k: f"sha256 {v}" for k, v in digests.items()},
                   "cases": cases}, fh, indent=1)
        fh.write("\n")
    print(f"wrote {len(tensors)} tensors, {len(cases)} cases to {OUT}/")


if __name__ == "__main__":
    main()
