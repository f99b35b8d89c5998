#!/usr/bin/env python3
"""References for the sd-webui-controlnet extension's normal_bae preprocessor
(crates/pipeline/src/controlnet/preprocess/normalbae.rs), run as the extension runs it:
  annotator/normalbae/ (imported whole): __init__.py (NormalBaeDetector: load_checkpoint with
      its `module.` prefixes, NNET(args) with architecture BN, the ImageNet Normalize,
      `normal[0][-1][:, :3]`, (n + 1) / 2 clipped, * 255 to uint8), models/NNET.py,
      models/submodules/encoder.py (tf_efficientnet_b5_ap through torch.hub.load(source='local')
      from the vendored efficientnet_repo/geffnet: 'same' padding, BN eps 1e-3, swish, SE),
      decoder.py (eval: mode='test', every pixel through the MLPs), submodules.py
  scripts/utils.py: pad64, safer_memory, resize_image_with_pad; scripts/preprocessor/legacy/
      processor.py: normal_bae (taken with `ast`)
No weights are downloaded. The model is narrowed so the fixtures stay small: geffnet's
_gen_efficientnet gets channel multiplier 0.3 and depth multiplier 1.0 (b5's 1.6 and 2.2: stem
16, stage widths 8, 8, 16, 24, 32, 56, 96, blocks 1, 2, 2, 3, 3, 4, 1; the first block, as b5's,
narrows the stem without a residual), its 1280-wide head at 0.05 (64, not 2048);
decoder.py's width literals are replaced by WIDTHS' (b5's 2048 / 176 / 64 / 40 / 24 by the
narrowed encoder's, 1024 / 512 / 256 / 128 by 32 / 24 / 16 / 16; the 4 of the normal and kappa
kept) in its parsed source, which then runs as the module. Seeded random weights (BN running statistics too), rounded to f16, saved as the real
file is: torch.save({'model': state_dict}) with DataParallel's `module.` prefixes.

Writes crates/pipeline/tests/fixtures/normalbae/:
  scannet.pt                 the weights
  normalbae.safetensors      image.<n>, padded.<n>.<res>, normal.<n>.<res> (the network's
                             out_res1[:, :3], every STRIDE-th row and column), map.<n>.<res>
                             (uint8, the module's image); net_input.odd / normal.odd: the
                             network alone on an input whose sides are not multiples of 32
  normalbae.json             the cases, sources
Run from the repository root with a python that has torch, torchvision, opencv-python-headless
4.10.0, einops, safetensors:
  python3 tools/make_normalbae_fixtures.py --extension /path/to/sd-webui-controlnet
(default: $SD_WEBUI_CONTROLNET_DIR; without it the script says so and writes nothing).
With `--full-width PATH` it writes only PATH: NNET at the real widths (tf_efficientnet_b5_ap,
the BN decoder) with the same seeded random weights in f32 (`full_width`, also the annotator
bench's: tools/make_random_annotators.py).
"""
import argparse
import ast
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

OUT = os.path.join("crates", "pipeline", "tests", "fixtures", "normalbae")
SEED = 20230418
STRIDE = 3
CHANNEL_MULT, DEPTH_MULT, HEAD_MULT = 0.3, 1.0, 0.05
# decoder.py's widths -> the narrowed ones (the encoder's as _gen_efficientnet builds them at
# CHANNEL_MULT / HEAD_MULT; the decoder's own scaled down; 4, the normal and kappa, as is).
WIDTHS = {2048: 64, 176: 32, 64: 16, 40: 8, 24: 8, 1024: 32, 512: 24, 256: 16, 128: 16}
ODD = (1, 3, 88, 72)


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


def geffnet_dir(ext):
    return os.path.join(ext, "annotator", "normalbae", "models", "submodules", "efficientnet_repo")


def narrow(ext):
    """The package with b5's multipliers and the decoder's widths narrowed (see the
    docstring); torch.hub.load then finds this geffnet already imported."""
    sys.path.insert(0, ext)
    sys.path.insert(0, geffnet_dir(ext))
    import geffnet.gen_efficientnet as ge
    import annotator.normalbae.models.submodules.decoder as decoder
    import annotator.normalbae.models.NNET as NNET

    gen, round_channels = ge._gen_efficientnet, ge.round_channels

    def narrow_gen(variant, channel_multiplier=1.0, depth_multiplier=1.0, **kwargs):
        assert (variant, channel_multiplier, depth_multiplier) == ("tf_efficientnet_b5_ap", 1.6, 2.2)
        return gen(variant, CHANNEL_MULT, DEPTH_MULT, **kwargs)

    def narrow_round(channels, multiplier=1.0, divisor=8, channel_min=None):
        # Only _gen_efficientnet's num_features (and the stem's 32) go through this one.
        m = HEAD_MULT if channels == 1280 else multiplier
        return round_channels(channels, m, divisor, channel_min)

    ge._gen_efficientnet = narrow_gen
    ge.round_channels = narrow_round
    # decoder.py with its width literals narrowed (`2048 + 176`, `view(B, 512 + 4, -1)`):
    # the same module otherwise, executed in its own namespace.
    path = decoder.__file__
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())

    class Widths(ast.NodeTransformer):
        def visit_Constant(self, node):
            if type(node.value) is int and node.value in WIDTHS:
                return ast.copy_location(ast.Constant(WIDTHS[node.value]), node)
            return node

    tree = ast.fix_missing_locations(Widths().visit(tree))
    exec(compile(tree, path, "exec"), vars(decoder))
    NNET.Decoder = decoder.Decoder  # NNET.py's own import of it, made before
    files = ["__init__.py", "models/NNET.py", "models/submodules/encoder.py",
             "models/submodules/decoder.py", "models/submodules/submodules.py",
             "models/submodules/efficientnet_repo/geffnet/gen_efficientnet.py",
             "models/submodules/efficientnet_repo/geffnet/efficientnet_builder.py",
             "models/submodules/efficientnet_repo/geffnet/conv2d_layers.py"]
    return {f"annotator/normalbae/{rel}": digest(os.path.join(ext, "annotator", "normalbae", rel))
            for rel in files}


def nnet(ext):
    """NNET as NormalBaeDetector.load_model builds it."""
    sys.path.insert(0, ext)
    from annotator.normalbae.models.NNET import NNET
    args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet",
                                 sampling_ratio=0.4, importance_ratio=0.7)
    return NNET(args)


def full_width(ext):
    """NNET at the real widths with this script's random weights (f32, eval), the legacy
    `normal_bae` running it (NormalBaeDetector.load_model as it is, its load_checkpoint handed
    this model instead of a file's), and the detector's Normalize (built on the first call)."""
    tmp = tempfile.mkdtemp()
    stubs(tmp)
    sys.path.insert(0, ext)
    sys.path.insert(0, geffnet_dir(ext))
    import annotator.normalbae as normalbae
    torch.manual_seed(SEED)
    model = randomize(nnet(ext)).eval()
    # load_model downloads where the file is missing: an empty one stands in.
    normalbae.NormalBaeDetector.model_dir = os.path.join(tmp, "normal_bae")
    os.makedirs(normalbae.NormalBaeDetector.model_dir)
    open(os.path.join(normalbae.NormalBaeDetector.model_dir, "scannet.pt"), "wb").close()
    normalbae.load_checkpoint = lambda fpath, _: model
    utils, _ = functions(os.path.join(ext, "scripts", "utils.py"),
                         ["pad64", "safer_memory", "resize_image_with_pad"], {"cv2": cv2, "np": np})
    ns = {"np": np, "resize_image_with_pad": utils["resize_image_with_pad"], "model_normal_bae": None}
    legacy, _ = functions(os.path.join(ext, "scripts", "preprocessor", "legacy", "processor.py"),
                          ["normal_bae"], ns)
    return model, legacy["normal_bae"], lambda x: ns["model_normal_bae"].norm(x)


def reference_512(ext, model, legacy, norm, out):
    """The legacy normal_bae of image.wide at 512 on the real-width model, as raw arrays in
    `out`: padded_512.bin (its padded image, uint8 HxWx3), normal_512.f32 (the network's
    out_res1[:, :3] on it, f32 3xHxW) and map_512.bin (the module's map, uint8)."""
    utils, _ = functions(os.path.join(ext, "scripts", "utils.py"),
                         ["pad64", "safer_memory", "resize_image_with_pad"], {"cv2": cv2, "np": np})
    img = IMAGES["wide"]()
    padded, _ = utils["resize_image_with_pad"](img, 512)
    out_map, _ = legacy(img.copy(), res=512)
    x = norm(torch.from_numpy(padded).float().permute(2, 0, 1)[None] / 255.0)
    with torch.no_grad():
        normal = model(x)[0][-1][0, :3].numpy()
    os.makedirs(out, exist_ok=True)
    np.ascontiguousarray(padded).tofile(os.path.join(out, "padded_512.bin"))
    np.ascontiguousarray(normal, dtype=np.float32).tofile(os.path.join(out, "normal_512.f32"))
    np.ascontiguousarray(out_map).tofile(os.path.join(out, "map_512.bin"))
    print(f"{out}: padded {padded.shape}, map {out_map.shape}")


def randomize(model):
    """Seeded weights: convs by fan-in, BN affine and running statistics near identity."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith(".weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.uniform_(-0.2, 0.2)
            else:
                fan_in = p[0].numel()
                p.normal_(0, 1.5 / fan_in ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.uniform_(-0.2, 0.2)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
        for p in list(model.parameters()) + list(model.buffers()):
            if p.is_floating_point():
                p.copy_(p.half().float())
    return model


def checkpoint(model, dtype):
    """The real file's layout: {'model': state_dict}, keys under DataParallel's `module.`
    (BN's num_batches_tracked kept, as a training checkpoint has it)."""
    state = {}
    for k, v in model.state_dict().items():
        v = v.to(dtype) if v.is_floating_point() else v
        state[f"module.{k}"] = v.contiguous()
    return {"model": state}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extension", default=os.environ.get("SD_WEBUI_CONTROLNET_DIR"))
    ap.add_argument("--full-width", metavar="PATH",
                    help="write only the real-width model with random weights to PATH")
    ap.add_argument("--full-width-ref", metavar="DIR",
                    help="with --full-width: the extension's run of it on image.wide at 512 in DIR")
    args = ap.parse_args()
    if not args.extension:
        print("make_normalbae_fixtures.py: skipped (needs --extension or SD_WEBUI_CONTROLNET_DIR)")
        return
    if args.full_width:
        model, legacy, norm = full_width(args.extension)
        torch.save(checkpoint(model, torch.float32), args.full_width)
        if args.full_width_ref:
            reference_512(args.extension, model, legacy, norm, args.full_width_ref)
        n = sum(v.numel() for v in model.state_dict().values())
        print(f"{args.full_width}: {n / 1e6:.1f} M values")
        return
    assert cv2.__version__ == "4.10.0", cv2.__version__
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp()
    stubs(tmp)
    digests = narrow(args.extension)
    torch.manual_seed(SEED)
    model = randomize(nnet(args.extension))
    os.makedirs(OUT, exist_ok=True)
    weights = os.path.join(OUT, "scannet.pt")
    torch.save(checkpoint(model, torch.float16), weights)
    # NormalBaeDetector.load_model reads models_path/normal_bae/scannet.pt.
    os.makedirs(os.path.join(tmp, "normal_bae"))
    os.symlink(os.path.abspath(weights), os.path.join(tmp, "normal_bae", "scannet.pt"))
    utils, d = functions(os.path.join(args.extension, "scripts", "utils.py"),
                         ["pad64", "safer_memory", "resize_image_with_pad"], {"cv2": cv2, "np": np})
    digests.update(d)
    ns = {"np": np, "resize_image_with_pad": utils["resize_image_with_pad"], "model_normal_bae": None}
    f, d = functions(os.path.join(args.extension, "scripts", "preprocessor", "legacy",
                                  "processor.py"), ["normal_bae"], ns)
    digests.update(d)
    tensors, cases = {}, []

    def network(x):
        """The detector's model (built on the module's first call) on its normalised input."""
        det = ns["model_normal_bae"]
        with torch.no_grad():
            return det.model(x)[0][-1][0, :3].numpy()

    for name, make in IMAGES.items():
        img = make()
        tensors[f"image.{name}"] = torch.from_numpy(img.copy())
        for res in RESOLUTIONS[name]:
            padded, _ = utils["resize_image_with_pad"](img, res)
            tensors[f"padded.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(padded))
            out, is_image = f["normal_bae"](img.copy(), res=res)
            assert is_image
            det = ns["model_normal_bae"]
            x = det.norm(torch.from_numpy(padded).float().permute(2, 0, 1)[None] / 255.0)
            normal = network(x)
            tensors[f"normal.{name}.{res}"] = torch.from_numpy(
                np.ascontiguousarray(normal[:, ::STRIDE, ::STRIDE]))
            tensors[f"map.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(out))
            print(f"{name} {res}: padded {padded.shape[:2]}, out {out.shape}, normal "
                  f"{normal.min():.3f}..{normal.max():.3f}, {len(np.unique(out))} levels")
            cases.append({"image": name, "resolution": res, "normal": f"normal.{name}.{res}",
                          "map": f"map.{name}.{res}"})
    # The network alone at sides of multiples of 8 but not of 16 or 32 ('same' padding's odd cases, the
    # decoder's resizes to odd sizes); its output is 2 * ceil(side / 2).
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(ODD, generator=gen)
    tensors["net_input.odd"] = x
    tensors["normal.odd"] = torch.from_numpy(np.ascontiguousarray(network(x)[:, ::STRIDE, ::STRIDE]))
    save_file(tensors, os.path.join(OUT, "normalbae.safetensors"))
    with open(os.path.join(OUT, "normalbae.json"), "w") as fh:
        json.dump({"opencv": cv2.__version__, "numpy": np.__version__, "torch": torch.__version__,
                   "seed": SEED, "stride": STRIDE, "channel_multiplier": CHANNEL_MULT,
                   "depth_multiplier": DEPTH_MULT, "head_multiplier": HEAD_MULT,
                   "decoder_widths": {str(k): v for k, v in WIDTHS.items()},
                   "odd_input": list(ODD),
                   "sources": {k: f"sha256 {v}" for k, v in digests.items()},
                   "cases": cases}, fh, indent=1)
        fh.write("\n")
    print(f"wrote {len(tensors)} tensors, {len(cases)} cases to {OUT}/")


if __name__ == "__main__":
    main()
