#!/usr/bin/env python3
"""References for the sd-webui-controlnet extension's Depth Anything V2 preprocessor
(depth_anything_v2; crates/pipeline/src/controlnet/preprocess/depth_anything.rs), run as the
extension runs it:
  the `depth_anything_v2` package (the extension installs a wheel built from
      MackinationsAi/Upgraded-Depth-Anything-V2; its depth_anything_v2/ is the same as
      DepthAnything/Depth-Anything-V2's): dpt.py (DepthAnythingV2, DPTHead), dinov2.py and
      dinov2_layers/ (the DINOv2 ViT), util/blocks.py, util/transform.py, imported whole
  annotator/depth_anything_v2.py: the module-level `transform` and
      DepthAnythingV2Detector.__call__ (BGR2RGB, / 255, the transform, the model, the bilinear
      resize back, min-max to 0..255, uint8), taken with `ast`
  scripts/utils.py: pad64, safer_memory, resize_image_with_pad
  scripts/preprocessor/legacy/processor.py: depth_anything_v2 (called with colored=False, as
      preprocessor_compiled.py's entry does)
No weights are downloaded. The one change to the model: the encoder's widths. `DINOv2("vitl")`
builds `vit_large` (embed 1024, 16 heads, 24 blocks); here `vit_large` is swapped for the same
DinoVisionTransformer call with embed 16 and 2 heads, still 24 blocks (so `vitl`'s
intermediate layers 4, 11, 17, 23 are the ones taken), and the head gets features=8,
out_channels=[8, 16, 32, 32] (the detector's 256, [256, 512, 1024, 1024] scaled down). Weights
are seeded random, rounded to f16 (saved so, to keep the file small; the model runs them in
f32), in the real file's key layout (the model's state_dict, safetensors).

Writes crates/pipeline/tests/fixtures/depth_anything_v2/:
  depth_anything_v2_vitl.safetensors   the weights
  depth_anything_v2.safetensors        image.<n> (uint8 HxWx3), padded.<n>.<res>,
                                       depth.<n>.<res> (f32: the model's output, every
                                       STRIDE-th row and column), map.<n>.<res> (uint8 HxW)
  depth_anything_v2.json               the cases (with the network's input size), sources
Run from the repository root:
  python3 tools/make_depth_anything_v2_fixtures.py --extension /path/to/sd-webui-controlnet \
      --depth-anything /path/to/Upgraded-Depth-Anything-V2
(defaults: $SD_WEBUI_CONTROLNET_DIR, $DEPTH_ANYTHING_V2_DIR; without them the script says so and
writes nothing). With --full-width PATH it also writes the detector's own configuration
(vitl, features 256, out_channels [256, 512, 1024, 1024]) with seeded random weights there
(1.3 GB, f32, as the real file), for timing (`depth_anything_v2_at_real_widths`, ignored).
"""
import argparse
import ast
import functools
import hashlib
import json
import os
import sys
import types

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import functions  # noqa: E402
from make_preprocess_fixtures import photo  # noqa: E402
from make_preprocess_module_fixtures import sketch  # noqa: E402

OUT = os.path.join("crates", "pipeline", "tests", "fixtures", "depth_anything_v2")
SEED = 20240620
STRIDE = 7
EMBED, HEADS = 16, 2
FEATURES, OUT_CHANNELS = 8, [8, 16, 32, 32]

IMAGES = {
    "square": lambda: photo(50, 50, 4, 8.0),
    "wide": lambda: photo(37, 52, 1, 3.0),
    "tall": lambda: photo(45, 33, 2, 25.0),
    "sketch": lambda: sketch(58, 47),
}
# The padded image 64x64 (518x518 in: the position embedding as it is), 64x128, 192x128
# (777 / 14 = 55.5: numpy's round to even), shrinking and enlarging.
RESOLUTIONS = {"square": [64], "wide": [64], "tall": [100, 30], "sketch": [40, 47]}


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def depth_anything_package(folder):
    """The package as installed; torchvision (only its Compose, which runs the steps in
    order) is stubbed where it is missing."""
    try:
        import torchvision.transforms  # noqa: F401
    except ImportError:
        class Compose:
            def __init__(self, steps):
                self.steps = steps

            def __call__(self, x):
                for s in self.steps:
                    x = s(x)
                return x
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        tv.transforms.Compose = Compose
        sys.modules["torchvision"] = tv
        sys.modules["torchvision.transforms"] = tv.transforms
    sys.path.insert(0, folder)
    import depth_anything_v2.dinov2 as dinov2
    import depth_anything_v2.dpt as dpt
    import depth_anything_v2.util.transform as transform
    digests = {}
    for rel in ["dpt.py", "dinov2.py", "util/blocks.py", "util/transform.py",
                "dinov2_layers/attention.py", "dinov2_layers/block.py",
                "dinov2_layers/layer_scale.py", "dinov2_layers/mlp.py",
                "dinov2_layers/patch_embed.py"]:
        digests[f"depth_anything_v2/{rel}"] = digest(os.path.join(folder, "depth_anything_v2", rel))
    return dinov2, dpt, transform, digests


def network(dinov2, dpt):
    def narrow_vit_large(patch_size=16, num_register_tokens=0, **kwargs):
        # vit_large's call with the widths reduced (depth and all else as it is).
        return dinov2.DinoVisionTransformer(
            patch_size=patch_size, embed_dim=EMBED, depth=24, num_heads=HEADS, mlp_ratio=4,
            block_fn=functools.partial(dinov2.Block, attn_class=dinov2.MemEffAttention),
            num_register_tokens=num_register_tokens, **kwargs)

    dinov2.vit_large = narrow_vit_large
    torch.manual_seed(SEED)
    model = dpt.DepthAnythingV2(encoder="vitl", features=FEATURES, out_channels=OUT_CHANNELS)
    return randomize(model)


def randomize(model):
    """Seeded random weights for a Depth Anything model (V2's, or V1's DPT_DINOv2: the same
    parameter names), rounded to f16; the torch RNG is seeded by the caller."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "pretrained.norm.weight":
                p.uniform_(0.5, 1.5)
            elif ".ls1." in name or ".ls2." in name:
                p.uniform_(0.2, 1.0)
            elif name.endswith(".bias") or name == "pretrained.cls_token":
                p.uniform_(-0.2, 0.2)
            elif name == "pretrained.pos_embed":
                p.normal_(0, 0.5)
            elif ".weight" in name and p.ndim >= 2 and name.startswith("pretrained."):
                p.normal_(0, 0.25)
        # The last conv's bias: some of the depth clipped at 0 by the ReLUs, most not.
        model.depth_head.scratch.output_conv2[2].bias.fill_(0.042)
        for p in model.parameters():
            p.copy_(p.half().float())
    return model.float().eval()


def assignment(path, name, namespace):
    """Runs the module-level `name = ...` of a file in `namespace`."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    (node,) = [n for n in ast.parse(source).body if isinstance(n, ast.Assign)
               and any(isinstance(t, ast.Name) and t.id == name for t in n.targets)]
    exec(compile(ast.Module(body=[node], type_ignores=[]), path, "exec"), namespace)
    return hashlib.sha256(ast.get_source_segment(source, node).encode()).hexdigest()


def load(ext, da2):
    dinov2, dpt, tr, digests = depth_anything_package(da2)
    model = network(dinov2, dpt)
    from torchvision.transforms import Compose
    det_path = os.path.join(ext, "annotator", "depth_anything_v2.py")
    ns = {"torch": torch, "cv2": cv2, "np": np, "F": F, "Compose": Compose,
          "Resize": tr.Resize, "NormalizeImage": tr.NormalizeImage,
          "PrepareForNet": tr.PrepareForNet}
    digests["annotator/depth_anything_v2.py transform"] = assignment(det_path, "transform", ns)
    f, d = functions(det_path, ["DepthAnythingV2Detector.__call__"], ns)
    digests.update({f"annotator/depth_anything_v2.py {k}": v for k, v in d.items()})
    detector = types.SimpleNamespace(model=model, device="cpu")
    call = f["DepthAnythingV2Detector.__call__"]
    detector_obj = lambda image, colored=True: call(detector, image, colored)  # noqa: E731
    utils, d = functions(os.path.join(ext, "scripts", "utils.py"),
                         ["pad64", "safer_memory", "resize_image_with_pad"], {"cv2": cv2, "np": np})
    digests.update(d)
    ns_proc = {"resize_image_with_pad": utils["resize_image_with_pad"],
               "model_depth_anything_v2": detector_obj}
    f, d = functions(os.path.join(ext, "scripts", "preprocessor", "legacy", "processor.py"),
                     ["depth_anything_v2"], ns_proc)
    digests.update(d)
    module = functools.partial(f["depth_anything_v2"], colored=False)

    def net_input(padded):
        # The detector's own steps up to the model's input.
        image = cv2.cvtColor(padded, cv2.COLOR_BGR2RGB) / 255.0
        return torch.from_numpy(ns["transform"]({"image": image})["image"]).unsqueeze(0)

    def depth(padded):
        with torch.no_grad():
            return model(net_input(padded))[0].numpy()

    return module, utils["resize_image_with_pad"], depth, model, digests, net_input


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extension", default=os.environ.get("SD_WEBUI_CONTROLNET_DIR"))
    ap.add_argument("--depth-anything", default=os.environ.get("DEPTH_ANYTHING_V2_DIR"),
                    help="a checkout of (Upgraded-)Depth-Anything-V2")
    ap.add_argument("--full-width", help="also write a full-width random network here")
    args = ap.parse_args()
    if not args.extension or not args.depth_anything:
        print("make_depth_anything_v2_fixtures.py: skipped (needs --extension and "
              "--depth-anything, or SD_WEBUI_CONTROLNET_DIR and DEPTH_ANYTHING_V2_DIR)")
        return
    assert cv2.__version__ == "4.10.0", cv2.__version__
    torch.set_num_threads(1)
    if args.full_width:
        _, dpt, _, _ = depth_anything_package(args.depth_anything)
        torch.manual_seed(SEED)
        full = dpt.DepthAnythingV2(encoder="vitl", features=256, out_channels=[256, 512, 1024, 1024])
        save_file({k: v.contiguous() for k, v in full.state_dict().items()}, args.full_width)
        print(f"wrote the full-width network to {args.full_width}")
    module, resize_image_with_pad, depth, model, digests, _ = load(
        args.extension, args.depth_anything)
    os.makedirs(OUT, exist_ok=True)
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(OUT, "depth_anything_v2_vitl.safetensors"))
    tensors, cases = {}, []
    for name, make in IMAGES.items():
        img = make()
        tensors[f"image.{name}"] = torch.from_numpy(img.copy())
        for res in RESOLUTIONS[name]:
            padded, _ = resize_image_with_pad(img, res)
            tensors[f"padded.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(padded))
            d = depth(padded)
            tensors[f"depth.{name}.{res}"] = torch.from_numpy(
                np.ascontiguousarray(d[::STRIDE, ::STRIDE]))
            out, is_image = module(img.copy(), res=res)
            assert is_image and out.dtype == np.uint8 and out.ndim == 2, out.shape
            tensors[f"map.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(out))
            print(f"{name} {res}: padded {padded.shape[:2]}, net {d.shape}, depth "
                  f"{d.min():.3f}..{d.max():.3f} ({(d == 0).mean():.3f} zero), map "
                  f"{len(np.unique(out))} levels")
            cases.append({"image": name, "resolution": res, "net_height": d.shape[0],
                          "net_width": d.shape[1], "depth": f"depth.{name}.{res}",
                          "map": f"map.{name}.{res}"})
    save_file(tensors, os.path.join(OUT, "depth_anything_v2.safetensors"))
    with open(os.path.join(OUT, "depth_anything_v2.json"), "w") as f:
        json.dump({"opencv": cv2.__version__, "numpy": np.__version__, "torch": torch.__version__,
                   "seed": SEED, "stride": STRIDE, "embed_dim": EMBED, "heads": HEADS,
                   "sources": {k: f"sha256 {v}" for k, v in digests.items()},
                   "cases": cases}, f, indent=1)
        f.write("\n")
    print(f"wrote {len(tensors)} tensors, {len(cases)} cases to {OUT}/")


if __name__ == "__main__":
    main()
