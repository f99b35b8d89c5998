#!/usr/bin/env python3
"""References for the sd-webui-controlnet extension's MiDaS preprocessors (depth_midas,
normal_midas), run as the extension runs them:
  annotator/midas/ (imported whole): api.py (load_model("dpt_hybrid"), MiDaSInference),
      midas/dpt_depth.py (DPTDepthModel, backbone vitb_rn50_384, non_negative), midas/vit.py
      (the hybrid backbone, forward_flex with the position embedding resized bilinearly,
      forward_vit, ProjectReadout), midas/blocks.py (_make_encoder, _make_scratch, the fusion
      blocks), __init__.py (apply_midas: the image / 127.5 - 1 as it is, no resize; the depth
      min-max to uint8; the normal from Sobel, bg_th and a)
  timm's R50+ViT-B/16 hybrid (`vit_base_resnet50_384` = vit_base_r50_s16_384: ResNetV2 with
      StdConv2dSame (eps 1e-8), GroupNorm(32) and a 'same' stem, HybridEmbed, ViT blocks)
  scripts/utils.py: pad64, safer_memory, resize_image_with_pad; scripts/preprocessor/legacy/
      processor.py: midas and midas_normal (taken with `ast`)
No weights are downloaded. The model is narrowed so the fixtures stay small: the ResNetV2
stem 32 wide, its three stages one bottleneck each (the real (3, 4, 9)), 128 wide (mids 32,
so GroupNorm keeps its 32 groups); the ViT 16 wide with 2 heads, still 12 blocks (so hooks 8
and 11 are the ones taken); the scratch and fusion features 8 (DPTDepthModel's `features`);
the readout projection, act_postprocess3/4 and the head as they are at those widths. The
calls that hard-code the widths (timm.create_model("vit_base_resnet50_384"),
_make_pretrained_vitb_rn50_384's features, _make_encoder's _make_scratch in-shapes,
load_model's DPTDepthModel) are swapped for the same calls at these widths. Seeded random
weights, rounded to f16, saved as the real file is (torch.save of the state_dict).

Writes crates/pipeline/tests/fixtures/midas/:
  dpt_hybrid-midas-501f0c75.pt   the weights
  midas.safetensors              image.<n>, padded.<n>.<res>, depth.<n>.<res> (the model's
                                 output, every STRIDE-th row and column), depth_map.<n>.<res>,
                                 normal_map.<n>.<res>.<bg_th> (uint8)
  midas.json                     the cases, sources
Run from the repository root with a python that has torch, timm, opencv-python-headless
4.10.0, einops, safetensors:
  python3 tools/make_midas_fixtures.py --extension /path/to/sd-webui-controlnet
(default: $SD_WEBUI_CONTROLNET_DIR; without it the script says so and writes nothing).
With `--full-width PATH` it writes only PATH: the model at the real widths (load_model's
DPTDepthModel as it is, timm's vit_base_resnet50_384 unnarrowed), the same seeded random
weights in f32, for the timing test and the annotator bench (`full_width`).
"""
import argparse
import functools
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
from make_depth_anything_v2_fixtures import IMAGES, RESOLUTIONS, digest  # noqa: E402

OUT = os.path.join("crates", "pipeline", "tests", "fixtures", "midas")
SEED = 20231031
STRIDE = 5
STEM, STAGE, DEPTHS = 32, 128, (1, 1, 1)
EMBED, HEADS, FEATURES = 16, 2, 8
BG_THS = [0.4, 0.1]


def stubs(models_dir):
    """A1111's modules the package imports: the device (CPU) and the annotator folder."""
    devices = types.ModuleType("modules.devices")
    devices.get_device_for = lambda _: torch.device("cpu")
    modules = types.ModuleType("modules")
    modules.devices = devices
    sys.modules["modules"] = modules
    sys.modules["modules.devices"] = devices
    path = types.ModuleType("annotator.annotator_path")
    path.models_path = models_dir
    sys.modules["annotator.annotator_path"] = path


def narrow(ext):
    """The package with the width-fixing calls narrowed (see the docstring)."""
    sys.path.insert(0, ext)
    import timm
    from timm.layers import StdConv2dSame
    from timm.models import vision_transformer_hybrid as hybrid
    from timm.models.resnetv2 import ResNetV2
    import annotator.midas.api as api
    import annotator.midas.midas.blocks as blocks
    import annotator.midas.midas.vit as vit

    def narrow_vitb_rn50_384(pretrained, use_readout="ignore", hooks=None, use_vit_only=False):
        assert not pretrained
        # vit_base_r50_s16_384's _resnetv2((3, 4, 9)) and ViT, narrowed.
        backbone = ResNetV2(layers=DEPTHS, channels=(STAGE,) * 3, stem_chs=STEM, num_classes=0,
                            global_pool="", preact=False, stem_type="same",
                            conv_layer=functools.partial(StdConv2dSame, eps=1e-8))
        model = hybrid._create_vision_transformer_hybrid(
            "vit_base_r50_s16_384", backbone=backbone, pretrained=False, embed_dim=EMBED,
            depth=12, num_heads=HEADS)
        return vit._make_vit_b_rn50_backbone(
            model, features=[STAGE, STAGE, EMBED, EMBED], size=[384, 384],
            hooks=[0, 1, 8, 11] if hooks is None else hooks, use_vit_only=use_vit_only,
            use_readout=use_readout, vit_features=EMBED)

    make_scratch = blocks._make_scratch

    def narrow_scratch(in_shape, out_shape, groups=1, expand=False):
        assert list(in_shape) == [256, 512, 768, 768], in_shape
        return make_scratch([STAGE, STAGE, EMBED, EMBED], out_shape, groups, expand)

    blocks._make_pretrained_vitb_rn50_384 = narrow_vitb_rn50_384
    blocks._make_scratch = narrow_scratch
    api.DPTDepthModel = functools.partial(api.DPTDepthModel, features=FEATURES)
    digests = {f"annotator/midas/{rel}": digest(os.path.join(ext, "annotator", "midas", rel))
               for rel in ["__init__.py", "api.py", "midas/dpt_depth.py", "midas/vit.py",
                           "midas/blocks.py", "midas/base_model.py"]}
    return api, digests, timm.__version__


def full_width(ext):
    """The extension's package unnarrowed, its model at the real widths with this script's
    random weights (f32), and the legacy `midas` / `midas_normal` running that model
    (apply_midas's global set to it, as MiDaSInference would hold it)."""
    tmp = tempfile.mkdtemp()
    stubs(tmp)
    sys.path.insert(0, ext)
    import annotator.midas as midas_pkg
    import annotator.midas.api as api
    torch.manual_seed(SEED)
    model = randomize(api.DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True))
    model.eval()
    midas_pkg.model = model
    utils, _ = functions(os.path.join(ext, "scripts", "utils.py"),
                         ["pad64", "safer_memory", "resize_image_with_pad"], {"cv2": cv2, "np": np})
    ns = {"np": np, "resize_image_with_pad": utils["resize_image_with_pad"],
          "model_midas": midas_pkg.apply_midas}
    legacy, _ = functions(os.path.join(ext, "scripts", "preprocessor", "legacy", "processor.py"),
                          ["midas", "midas_normal"], ns)
    return model, legacy, utils["resize_image_with_pad"]


def randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias") or name.endswith("cls_token"):
                p.uniform_(-0.2, 0.2)
            elif name.endswith("pos_embed"):
                p.normal_(0, 0.5)
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                p.normal_(0, 1.5 / fan_in ** 0.5)
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def utils_first(ext):
    """The first case's padded image (for calibrate)."""
    utils, _ = functions(os.path.join(ext, "scripts", "utils.py"),
                         ["pad64", "safer_memory", "resize_image_with_pad"], {"cv2": cv2, "np": np})
    name = next(iter(IMAGES))
    return utils["resize_image_with_pad"](IMAGES[name](), RESOLUTIONS[name][0])[0]


def calibrate(model, padded):
    """The last conv's bias set so about 5% of the first case's depth is clipped by the
    non-negative ReLU (most of it not: both sides tested); the ReLU after it is in place,
    so the hook keeps a copy."""
    last = model.scratch.output_conv[4]
    seen = []
    hook = last.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    x = torch.from_numpy(padded).float() / 127.5 - 1.0
    with torch.no_grad():
        model(x.permute(2, 0, 1)[None])
        hook.remove()
        q = torch.quantile(seen[0].flatten(), 0.05)
        last.bias.sub_(q).copy_(last.bias.half().float())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extension", default=os.environ.get("SD_WEBUI_CONTROLNET_DIR"))
    ap.add_argument("--full-width", metavar="PATH",
                    help="write only the real-width model with random weights to PATH")
    args = ap.parse_args()
    if not args.extension:
        print("make_midas_fixtures.py: skipped (needs --extension or SD_WEBUI_CONTROLNET_DIR)")
        return
    if args.full_width:
        model = full_width(args.extension)[0]
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, args.full_width)
        n = sum(v.numel() for v in model.state_dict().values())
        print(f"{args.full_width}: {n / 1e6:.1f} M values")
        return
    assert cv2.__version__ == "4.10.0", cv2.__version__
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp()
    stubs(tmp)
    api, digests, timm_version = narrow(args.extension)
    torch.manual_seed(SEED)
    model = randomize(api.DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True))
    calibrate(model, utils_first(args.extension))
    os.makedirs(OUT, exist_ok=True)
    weights = os.path.join(OUT, "dpt_hybrid-midas-501f0c75.pt")
    torch.save({k: v.half().contiguous() for k, v in model.state_dict().items()}, weights)
    # load_model reads ISL_PATHS' file (the extension's download folder) through BaseModel.load.
    api.ISL_PATHS["dpt_hybrid"] = os.path.abspath(weights)
    api.OLD_ISL_PATHS["dpt_hybrid"] = os.path.join(tmp, "none")
    import annotator.midas as midas_pkg
    utils, d = functions(os.path.join(args.extension, "scripts", "utils.py"),
                         ["pad64", "safer_memory", "resize_image_with_pad"], {"cv2": cv2, "np": np})
    digests.update(d)
    ns = {"np": np, "resize_image_with_pad": utils["resize_image_with_pad"],
          "model_midas": midas_pkg.apply_midas}
    f, d = functions(os.path.join(args.extension, "scripts", "preprocessor", "legacy",
                                  "processor.py"), ["midas", "midas_normal"], ns)
    digests.update(d)
    tensors, cases = {}, []
    for name, make in IMAGES.items():
        img = make()
        tensors[f"image.{name}"] = torch.from_numpy(img.copy())
        for res in RESOLUTIONS[name]:
            padded, _ = utils["resize_image_with_pad"](img, res)
            tensors[f"padded.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(padded))
            out, _ = f["midas"](img.copy(), res=res)
            # apply_midas's model (built on its first call) on its input.
            x = torch.from_numpy(padded).float() / 127.5 - 1.0
            with torch.no_grad():
                depth = midas_pkg.model(x.permute(2, 0, 1)[None])[0].numpy()
            tensors[f"depth.{name}.{res}"] = torch.from_numpy(
                np.ascontiguousarray(depth[::STRIDE, ::STRIDE]))
            tensors[f"depth_map.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(out))
            normals = {}
            for bg in BG_THS:
                n, _ = f["midas_normal"](img.copy(), res=res, thr_a=bg)
                tensors[f"normal_map.{name}.{res}.{bg}"] = torch.from_numpy(
                    np.ascontiguousarray(n))
                normals[str(bg)] = f"normal_map.{name}.{res}.{bg}"
            print(f"{name} {res}: padded {padded.shape[:2]}, depth {depth.shape} "
                  f"{depth.min():.3f}..{depth.max():.3f} ({(depth == 0).mean():.3f} zero), "
                  f"map {len(np.unique(out))} levels")
            cases.append({"image": name, "resolution": res, "depth": f"depth.{name}.{res}",
                          "depth_map": f"depth_map.{name}.{res}", "normal_maps": normals})
    save_file(tensors, os.path.join(OUT, "midas.safetensors"))
    with open(os.path.join(OUT, "midas.json"), "w") as fh:
        json.dump({"opencv": cv2.__version__, "numpy": np.__version__, "torch": torch.__version__,
                   "timm": timm_version, "seed": SEED, "stride": STRIDE, "stem": STEM,
                   "stage": STAGE, "stage_depths": DEPTHS, "embed_dim": EMBED, "heads": HEADS,
                   "features": FEATURES, "a": 2 * np.pi,
                   "sources": {k: f"sha256 {v}" for k, v in digests.items()},
                   "cases": cases}, fh, indent=1)
        fh.write("\n")
    print(f"wrote {len(tensors)} tensors, {len(cases)} cases to {OUT}/")


if __name__ == "__main__":
    main()
