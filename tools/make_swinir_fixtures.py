#!/usr/bin/env python3
"""Tiny SwinIR upscalers and reference outputs for crates/pipeline/src/upscaler/swinir.rs.

The networks are spandrel's own `SwinIR` class (PyPI spandrel 0.4.2, what A1111 1.8+ and
ComfyUI load SwinIR with), built small with random weights (seeded, made strong enough that
the relative position bias, the shifted windows and every layer change the output), one per
upsampler spandrel tells apart. Each file is loaded back through spandrel's `ModelLoader` (its
detection and its reading of every hyper-parameter from the state dict) and must give the
network's output: the files are what spandrel reads. The SwinIR class fixes the upsamplers'
width at 64 features, so the weights of those files are stored in float16 (the values are
float16's; the networks run in float32) to keep them small.

Files:
  nc-x4.pth            "nearest+conv" x4 (real-world SR, as A1111's "SwinIR 4x"): 3conv
                       residual convs, 8 features, two groups of 2 blocks (heads 2, 1),
                       window 4, img_size 16; under `params_ema` as SwinIR's releases ship
  ps-x2.safetensors    "pixelshuffle" x2 (classical SR): 1conv, 6 features, one group of 3
                       blocks (2 heads), window 4, img_size 12
  psd-x3.pth           "pixelshuffledirect" x3 (lightweight SR): 1conv, 8 features, two
                       groups of one block (no shift, so spandrel's img_size default 64),
                       window 8
  dn-x1.pth            no upsampler (denoising / JPEG: x + conv_last(features)): window 7,
                       so spandrel's img_range 255; 6 features, one group of 2 blocks (3 heads)
  swin2sr-x2.pth       a tiny Swin2SR (spandrel's class): a transformer spandrel loads (before
                       SwinIR, whose names it shares) and this server does not run, refused by
                       its name (its relative_position_index an int64 buffer too)

References:
  forward.safetensors  each network's raw output (spandrel's `model(x)`: unclamped) for
                       input.small.png as A1111 feeds it (BGR, /255, float32)
  tiled.<case>.png     A1111's `upscaler_utils.upscale_2` (SwinIR's tiles: SWIN_tile 192,
                       SWIN_tile_overlap 8, the model's scale; the spandrel descriptor as the
                       model, as `UpscalerSwinIR.do_upscale` passes it)
  upscale.<case>.png   `Upscaler.upscale` with that `do_upscale` (rounds, then Lanczos)
  input.<name>.png     the images (not multiples of any window)
  swinir.json          the cases, the A1111 sources' digests and the versions

A1111's functions are executed from a checkout of AUTOMATIC1111/stable-diffusion-webui (taken
with `ast`, not copied; A1111 1.8.0 or later, run on v1.10.1, master's head): modules/upscaler_utils.py `pil_image_to_torch_bgr`,
`torch_bgr_to_pil_image`, `tiled_upscale_2`, `upscale_2`, and modules/upscaler.py
`Upscaler.upscale`.

Usage: python tools/make_swinir_fixtures.py --a1111 PATH/TO/stable-diffusion-webui [--out DIR]
"""

import json
import math
import os
import sys
import types

import numpy as np
import PIL
import safetensors.torch
import spandrel
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import a1111_args, functions  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures", "swinir")

SWIN_TILE, SWIN_TILE_OVERLAP = 192, 8  # A1111's SWIN_tile / SWIN_tile_overlap defaults


def swinir(seed, out_scale=0.3, **kw):
    from spandrel.architectures.SwinIR import SwinIR
    torch.manual_seed(seed)
    net = SwinIR(**kw)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 1.0)  # strong enough to move attention
            elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or \
                    name.startswith("norm.") or "patch_embed.norm" in name:
                if name.endswith("weight"):
                    p.uniform_(0.6, 1.4)
                else:
                    p.uniform_(-0.2, 0.2)
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                p.normal_(0, 1.0 / math.sqrt(fan_in))
            else:
                p.uniform_(-0.1, 0.1)
        last = net.upsample[0] if kw.get("upsampler") == "pixelshuffledirect" else net.conv_last
        last.weight.mul_(out_scale)
        last.bias.zero_()
        for p in net.parameters():
            p.copy_(p.half().float())  # float16's values, so the files may be stored so
    return net.eval()


def get_param(model):
    # modules/torch_utils.get_param: a spandrel descriptor's model's first parameter.
    if hasattr(model, "model") and hasattr(model.model, "parameters"):
        model = model.model
    for param in model.parameters():
        return param


def a1111(checkout):
    import logging
    import tqdm
    mod = os.path.join(checkout, "modules")
    ns = {"np": np, "torch": torch, "Image": Image, "tqdm": tqdm,
          "logger": logging.getLogger("a1111"),
          "shared": types.SimpleNamespace(
              opts=types.SimpleNamespace(enable_upscale_progressbar=False),
              state=types.SimpleNamespace(interrupted=False, skipped=False)),
          "torch_utils": types.SimpleNamespace(get_param=get_param)}
    utils, d1 = functions(os.path.join(mod, "upscaler_utils.py"),
                          ["pil_image_to_torch_bgr", "torch_bgr_to_pil_image",
                           "tiled_upscale_2", "upscale_2"], ns)
    up, d2 = functions(os.path.join(mod, "upscaler.py"), ["Upscaler.upscale"],
                       {"Image": Image, "PIL": PIL, "LANCZOS": Image.Resampling.LANCZOS,
                        "shared": ns["shared"]})

    def tiled(model, img):
        # UpscalerSwinIR.do_upscale (extensions-builtin/SwinIR/scripts/swinir_model.py).
        return utils["upscale_2"](img, model, tile_size=SWIN_TILE,
                                  tile_overlap=SWIN_TILE_OVERLAP, scale=model.scale,
                                  desc="SwinIR")

    class Swin:
        upscale = up["Upscaler.upscale"]

        def __init__(self, model):
            self.model = model

        def do_upscale(self, img, selected_model):
            return tiled(self.model, img)

    def upscale(model, img, scale):
        return Swin(model).upscale(img, scale, None)

    return tiled, upscale, {**d1, **d2}


def inputs():
    rng = np.random.default_rng(20261206)

    def smooth(h, w):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                         (128 + 100 * np.sin((x + 2 * y) / 9)).astype(int)], axis=-1)
        noise = rng.integers(-12, 13, size=(h, w, 3))
        return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")

    return {"small": smooth(15, 21), "wide": smooth(30, 200), "square": smooth(196, 201)}


def main():
    args = a1111_args(__file__, __doc__, DEFAULT_OUT)
    if args is None:
        return
    tiled, upscale, digests = a1111(args.a1111)
    out = args.out
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(2)

    nets = {
        "nc-x4.pth": swinir(1, img_size=16, embed_dim=8, depths=[2, 2], num_heads=[2, 1],
                            window_size=4, mlp_ratio=2.0, upscale=4, upsampler="nearest+conv",
                            resi_connection="3conv"),
        "ps-x2.safetensors": swinir(2, img_size=12, embed_dim=6, depths=[3], num_heads=[2],
                                    window_size=4, mlp_ratio=1.5, upscale=2,
                                    upsampler="pixelshuffle", resi_connection="1conv"),
        "psd-x3.pth": swinir(3, img_size=64, embed_dim=8, depths=[1, 1], num_heads=[2, 4],
                             window_size=8, mlp_ratio=2.0, upscale=3,
                             upsampler="pixelshuffledirect", resi_connection="1conv"),
        "dn-x1.pth": swinir(4, out_scale=0.3, img_size=14, embed_dim=6, depths=[2],
                            num_heads=[3], window_size=7, mlp_ratio=2.0, upscale=1,
                            img_range=255.0, upsampler="", resi_connection="1conv"),
    }
    # What spandrel reads each file as: (scale, tags it must carry).
    expect = {"nc-x4.pth": (4, ["s16w4", "3conv"]), "ps-x2.safetensors": (2, ["s12w4"]),
              "psd-x3.pth": (3, ["s64w8"]), "dn-x1.pth": (1, ["s14w7"])}
    images = inputs()
    for name, img in images.items():
        img.save(os.path.join(out, f"input.{name}.png"))
    sent = {k: Image.open(os.path.join(out, f"input.{k}.png")).convert("RGB") for k in images}
    small = torch.from_numpy(np.ascontiguousarray(
        np.transpose(np.array(sent["small"])[:, :, ::-1], (2, 0, 1))) / 255).float()[None]
    forward, loaded = {}, {}
    for fname, net in nets.items():
        path = os.path.join(out, fname)
        sd = {k: (v.half() if v.is_floating_point() else v).contiguous()
              for k, v in net.state_dict().items()}
        if fname.endswith(".safetensors"):
            safetensors.torch.save_file(sd, path)
        elif fname == "nc-x4.pth":
            torch.save({"params_ema": sd}, path)
        else:
            torch.save(sd, path)
        desc = spandrel.ModelLoader().load_from_file(path)
        scale, tags = expect[fname]
        assert desc.architecture.id == "SwinIR", desc.architecture.id
        assert desc.scale == scale, (fname, desc.scale)
        assert all(t in desc.tags for t in tags), (fname, desc.tags)
        desc.model.eval()
        with torch.no_grad():
            got = desc.model(small)
            assert torch.equal(net(small), got), fname
        forward[fname] = got[0].contiguous()
        loaded[fname] = desc
        print(f"{fname}: spandrel loads it as {desc.architecture.id} x{desc.scale} {desc.tags}, "
              f"{os.path.getsize(path)} bytes, output {tuple(got.shape)} "
              f"range {got.min():.3f}..{got.max():.3f}")
    safetensors.torch.save_file(forward, os.path.join(out, "forward.safetensors"))
    from spandrel.architectures.Swin2SR import Swin2SR
    torch.manual_seed(10)
    swin2sr = Swin2SR(img_size=8, embed_dim=6, depths=[1], num_heads=[1], window_size=4,
                      upscale=2, upsampler="pixelshuffledirect", mlp_ratio=1.0)
    torch.save(swin2sr.state_dict(), os.path.join(out, "swin2sr-x2.pth"))
    other = spandrel.ModelLoader().load_from_file(os.path.join(out, "swin2sr-x2.pth"))
    assert other.architecture.id == "Swin2SR", other.architecture.id

    cases = {}
    # Tiles of the shorter side overlapping by 8 (wide), tiles of 192 both ways (square), and
    # tiles under spandrel's 16 px minimum (small: padded by the descriptor).
    for label, (fname, img) in {"nc_x4_wide": ("nc-x4.pth", "wide"),
                                "psd_x3_small": ("psd-x3.pth", "small"),
                                "dn_x1_square": ("dn-x1.pth", "square"),
                                "dn_x1_small": ("dn-x1.pth", "small")}.items():
        with torch.no_grad():
            res = tiled(loaded[fname], sent[img])
        res.save(os.path.join(out, f"tiled.{label}.png"))
        cases[label] = dict(kind="tiled", model=fname, input=img, size=list(res.size))
        print(label, sent[img].size, "->", res.size)
    # Upscaler.upscale: x2 to 3 (two rounds, Lanczos down); x1 to 2 (one round, Lanczos up).
    for label, (fname, img, scale) in {"ps_x2_by_3": ("ps-x2.safetensors", "small", 3.0),
                                       "dn_x1_by_2": ("dn-x1.pth", "small", 2.0)}.items():
        with torch.no_grad():
            res = upscale(loaded[fname], sent[img], scale)
        res.save(os.path.join(out, f"upscale.{label}.png"))
        cases[label] = dict(kind="upscale", model=fname, input=img, scale=scale,
                            size=list(res.size))
        print(label, sent[img].size, "->", res.size)
    meta = {
        "generated_by": "tools/make_swinir_fixtures.py",
        "versions": {"spandrel": spandrel.__version__, "torch": torch.__version__,
                     "pillow": PIL.__version__, "numpy": np.__version__},
        "a1111_sources": {k: f"sha256 {v}" for k, v in digests.items()},
        "swin_tile": SWIN_TILE, "swin_tile_overlap": SWIN_TILE_OVERLAP,
        "cases": cases,
    }
    with open(os.path.join(out, "swinir.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
