#!/usr/bin/env python3
"""References for the sd-webui-controlnet extension's Depth Anything (v1) preprocessor
(depth_anything; crates/pipeline/src/controlnet/preprocess/depth_anything.rs), run as the
extension runs it:
  the `depth_anything` package (huchenlei's wheel of LiheYoung/Depth-Anything, which the
      extension installs): dpt.py (DPT_DINOv2, DPTHead), blocks.py, util/transform.py,
      imported whole
  facebookresearch/dinov2 (what DPT_DINOv2(localhub=False)'s
      `torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')` runs): hub/backbones.py's
      dinov2_vitl14 and models/vision_transformer.py, imported whole; torch.hub.load is
      pointed at the checkout with pretrained=False (the DINOv2 weights it would download are
      replaced by the detector's load_state_dict anyway)
  annotator/depth_anything.py: the module-level `transform` and
      DepthAnythingDetector.__call__, taken with `ast`
  scripts/utils.py: pad64, safer_memory, resize_image_with_pad
  scripts/preprocessor/legacy/processor.py: depth_anything (called with colored=False, as
      preprocessor_compiled.py's entry does)
As for V2 (make_depth_anything_v2_fixtures.py, whose images, cases and weight draw this
shares), the one change to the model is the encoder's widths: vit_large with embed 16 and 2
heads, still 24 blocks (so the last four, 20..23, are the ones `get_intermediate_layers(x, 4)`
takes), the head at features=8, out_channels=[8, 16, 32, 32]. Seeded random weights rounded
to f16, saved as the real file is: the model's state_dict through torch.save.

Writes crates/pipeline/tests/fixtures/depth_anything/:
  depth_anything_vitl14.pth    the weights
  depth_anything.safetensors   image.<n> (uint8 HxWx3), padded.<n>.<res>, depth.<n>.<res> (every STRIDE-th row and
                               column of the model's output), map.<n>.<res> (uint8 HxW)
  depth_anything.json          the cases, sources
Run from the repository root:
  python3 tools/make_depth_anything_fixtures.py --extension /path/to/sd-webui-controlnet \
      --depth-anything /path/to/huchenlei/Depth-Anything --dinov2 /path/to/dinov2
(defaults: $SD_WEBUI_CONTROLNET_DIR, $DEPTH_ANYTHING_DIR, $DINOV2_DIR; without them the
script says so and writes nothing). With --full-width PATH it also writes the detector's own
configuration (vitl, features 256, out_channels [256, 512, 1024, 1024]) with random weights
there (1.3 GB, f32), for timing.
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
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import functions  # noqa: E402
from make_depth_anything_v2_fixtures import (  # noqa: E402
    EMBED, FEATURES, HEADS, IMAGES, OUT_CHANNELS, RESOLUTIONS, SEED, STRIDE, assignment,
    digest, randomize)

OUT = os.path.join("crates", "pipeline", "tests", "fixtures", "depth_anything")


def stub_modules():
    """What the package imports but these steps never run: torchvision (only Compose, which
    runs the steps in order; transform.py's other imports are unused), PIL (unused),
    huggingface_hub (the hub mixin of the `DepthAnything` subclass, not DPT_DINOv2)."""
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
    for name, attrs in [("PIL", ["Image", "ImageOps", "ImageFilter"]),
                        ("huggingface_hub", ["PyTorchModelHubMixin", "hf_hub_download"])]:
        try:
            __import__(name)
        except ImportError:
            m = types.ModuleType(name)
            for a in attrs:
                setattr(m, a, type(a, (), {}))
            sys.modules[name] = m


def packages(da1, dinov2_dir, narrow):
    """The depth_anything package, with torch.hub.load giving dinov2's own dinov2_<enc>14
    from the checkout (vit_large narrowed when `narrow`)."""
    stub_modules()
    sys.path.insert(0, dinov2_dir)
    import dinov2.hub.backbones as backbones
    import dinov2.models.vision_transformer as vits
    if narrow:
        def narrow_vit_large(patch_size=16, num_register_tokens=0, **kwargs):
            # vit_large's call with the widths reduced (depth and all else as it is).
            return vits.DinoVisionTransformer(
                patch_size=patch_size, embed_dim=EMBED, depth=24, num_heads=HEADS,
                mlp_ratio=4, block_fn=functools.partial(vits.Block, attn_class=vits.MemEffAttention),
                num_register_tokens=num_register_tokens, **kwargs)
        vits.vit_large = narrow_vit_large

    def hub_load(repo, model, **kwargs):
        assert repo == "facebookresearch/dinov2" and not kwargs, (repo, kwargs)
        return getattr(backbones, model)(pretrained=False)

    torch.hub.load = hub_load
    sys.path.insert(0, da1)
    import depth_anything.dpt as dpt
    import depth_anything.util.transform as tr
    digests = {f"depth_anything/{rel}": digest(os.path.join(da1, "depth_anything", rel))
               for rel in ["dpt.py", "blocks.py", "util/transform.py"]}
    for rel in ["hubconf.py", "dinov2/hub/backbones.py", "dinov2/models/vision_transformer.py",
                "dinov2/layers/attention.py", "dinov2/layers/block.py",
                "dinov2/layers/layer_scale.py", "dinov2/layers/mlp.py",
                "dinov2/layers/patch_embed.py"]:
        digests[f"dinov2/{rel}"] = digest(os.path.join(dinov2_dir, rel))
    return dpt, tr, digests


def detector_model(dpt, features, out_channels):
    # DepthAnythingDetector.__init__'s construction (its widths as given).
    return dpt.DPT_DINOv2(encoder="vitl", features=features, out_channels=out_channels,
                          localhub=False)


def load(ext, da1, dinov2_dir, full=False):
    """The legacy module, resize_image_with_pad, the model's depth, the model, the sources'
    digests and the model's input of a padded image; `full`: the detector's own widths, the
    package's initialisation (tools/make_random_annotators.py's timing network)."""
    dpt, tr, digests = packages(da1, dinov2_dir, narrow=not full)
    torch.manual_seed(SEED)
    if full:
        model = detector_model(dpt, 256, [256, 512, 1024, 1024]).float().eval()
    else:
        model = randomize(detector_model(dpt, FEATURES, OUT_CHANNELS))
    from torchvision.transforms import Compose
    det_path = os.path.join(ext, "annotator", "depth_anything.py")
    ns = {"torch": torch, "cv2": cv2, "np": np, "F": F, "Compose": Compose,
          "Resize": tr.Resize, "NormalizeImage": tr.NormalizeImage,
          "PrepareForNet": tr.PrepareForNet}
    digests["annotator/depth_anything.py transform"] = assignment(det_path, "transform", ns)
    f, d = functions(det_path, ["DepthAnythingDetector.__call__"], ns)
    digests.update({f"annotator/depth_anything.py {k}": v for k, v in d.items()})
    detector = types.SimpleNamespace(model=model, device="cpu")
    call = f["DepthAnythingDetector.__call__"]
    detector_obj = lambda image, colored=True: call(detector, image, colored)  # noqa: E731
    utils, d = functions(os.path.join(ext, "scripts", "utils.py"),
                         ["pad64", "safer_memory", "resize_image_with_pad"], {"cv2": cv2, "np": np})
    digests.update(d)
    ns_proc = {"resize_image_with_pad": utils["resize_image_with_pad"],
               "model_depth_anything": detector_obj}
    f, d = functions(os.path.join(ext, "scripts", "preprocessor", "legacy", "processor.py"),
                     ["depth_anything"], ns_proc)
    digests.update(d)
    module = functools.partial(f["depth_anything"], colored=False)

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
    ap.add_argument("--depth-anything", default=os.environ.get("DEPTH_ANYTHING_DIR"),
                    help="a checkout of (huchenlei's) Depth-Anything")
    ap.add_argument("--dinov2", default=os.environ.get("DINOV2_DIR"),
                    help="a checkout of facebookresearch/dinov2")
    ap.add_argument("--full-width", help="write a full-width random network here (only that)")
    args = ap.parse_args()
    if not args.extension or not args.depth_anything or not args.dinov2:
        print("make_depth_anything_fixtures.py: skipped (needs --extension, --depth-anything "
              "and --dinov2, or SD_WEBUI_CONTROLNET_DIR, DEPTH_ANYTHING_DIR and DINOV2_DIR)")
        return
    assert cv2.__version__ == "4.10.0", cv2.__version__
    torch.set_num_threads(1)
    if args.full_width:
        # Alone: the narrowed vit_large must not be in place for this one.
        dpt, _, _ = packages(args.depth_anything, args.dinov2, narrow=False)
        torch.manual_seed(SEED)
        full = detector_model(dpt, 256, [256, 512, 1024, 1024])
        torch.save(full.state_dict(), args.full_width)
        print(f"wrote the full-width network to {args.full_width}")
        return
    module, resize_image_with_pad, depth, model, digests, _ = load(
        args.extension, args.depth_anything, args.dinov2)
    os.makedirs(OUT, exist_ok=True)
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(OUT, "depth_anything_vitl14.pth"))
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
    save_file(tensors, os.path.join(OUT, "depth_anything.safetensors"))
    with open(os.path.join(OUT, "depth_anything.json"), "w") as f:
        json.dump({"opencv": cv2.__version__, "numpy": np.__version__, "torch": torch.__version__,
                   "seed": SEED, "stride": STRIDE, "embed_dim": EMBED, "heads": HEADS,
                   "sources": {k: f"sha256 {v}" for k, v in digests.items()},
                   "cases": cases}, f, indent=1)
        f.write("\n")
    print(f"wrote {len(tensors)} tensors, {len(cases)} cases to {OUT}/")


if __name__ == "__main__":
    main()
