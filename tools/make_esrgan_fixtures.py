#!/usr/bin/env python3
"""Tiny ESRGAN (RRDBNet) upscalers and reference outputs for crates/pipeline/src/upscaler.

The network is spandrel's own `ESRGAN` architecture (PyPI spandrel, what A1111 1.8+ and
ComfyUI load ESRGAN models with), its growth width narrowed from its fixed 32 to 4 so the
weights stay a few KB (`B.RRDB` is wrapped to pass gc=4; nothing else is changed). Each file
is loaded back through spandrel's `ModelLoader` (its detection and key mapping) and must give
the network's output: the files are what spandrel reads.

Files (random weights, seeded):
  x4-old.pth             ESRGAN's original names (model.0, model.1.sub.N.RDBk.convj.0, ...),
                         nf 8, 2 blocks, x4
  x4-new.safetensors     the same weights under Real-ESRGAN / BasicSR names (conv_first,
                         body.N.rdbk.convj, conv_body, conv_up1, conv_hr, conv_last)
  x2-unshuffle.pth       a Real-ESRGAN x2 network (pixel-unshuffled input, 12 channels; 1
                         block), BasicSR names under `params_ema` as Real-ESRGAN ships them
  x2-old.safetensors     one x2 upsampling, old names, 1 block
  plus-x4.pth            ESRGAN+ (spandrel's `plus`: conv1x1 shortcuts in the dense blocks),
                         old names, 1 block
  x8-old.pth             three x2 upsamplings, old names, 1 block
  x3-old.pth             a "3x" ESRGAN (one x3 upsampling, as spandrel's RRDBNet(scale=3)
                         builds it): spandrel reads its length as one x2 upsampling and runs it
                         as a 2x network, and so does A1111 1.8+; the reference is that
  compact-x4.pth         Real-ESRGAN Compact (spandrel's `Compact`, SRVGGNetCompact): nf 8,
                         3 body convs, x4, under `params` as realesr-general-x4v3 ships
  compact-x2.safetensors the same architecture, 2 body convs, x2
  compact-x1.pth         a 1x compact network (1 body conv), as community "1x" models are
  not-rrdbnet.pth        a state dict of some other network (two convs)
(A transformer spandrel loads and this server does not run: tools/make_swinir_fixtures.py's
swin2sr-x2.pth.)

References, A1111's own code run here (taken with `ast` from a checkout of
AUTOMATIC1111/stable-diffusion-webui, not copied; it needs A1111 1.8.0 or later, the spandrel
era, and was run on v1.10.1, master's head): modules/upscaler_utils.py `upscale_with_model`
with `upscale_pil_patch`, `pil_image_to_torch_bgr` and `torch_bgr_to_pil_image` (BGR in, tiles
of ESRGAN_tile 192 px overlapping by 8, each tile's output clamped and rounded to bytes) with
modules/images.py `split_grid` / `combine_grid`, and modules/upscaler.py `Upscaler.upscale`
(the model repeated while the image is below the size, then Lanczos); the network in float32,
as `UpscalerESRGAN` loads it (`load_spandrel_model` without `prefer_half`):
  forward.safetensors    the network's raw output for `input.small.png` (as A1111 feeds it:
                         BGR, /255), per model (x8: of its top-left 6x8 only)
  input.<name>.png       the images
  tiled.<case>.png       upscale_with_model's result
  upscale.<case>.png     Upscaler.upscale's result at a factor (below 1 and at the size the
                         image already floors to, no round runs; at exactly 1 a 1x model
                         runs once)
  esrgan.json            the cases, the sources' digests and the versions

Usage: python tools/make_esrgan_fixtures.py --a1111 PATH/TO/stable-diffusion-webui [--out DIR]
"""

import collections
import json
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
DEFAULT_OUT = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures", "esrgan")

TILE, OVERLAP = 192, 8
FORWARD_CROP = (6, 8)  # rows, columns of input.small.png the x8 network's forward is of


def narrow_growth():
    """spandrel's RRDBNet with gc 4 instead of its fixed 32."""
    from spandrel.architectures.__arch_helpers import block as B
    rrdb = B.RRDB

    def narrow(*args, **kwargs):
        kwargs["gc"] = 4
        return rrdb(*args, **kwargs)

    B.RRDB = narrow


def network(seed, nb, scale, shuffle=None, plus=False):
    from spandrel.architectures.ESRGAN import ESRGAN
    torch.manual_seed(seed)
    in_nc = 3 * (shuffle or 1) ** 2
    net = ESRGAN(in_nc=in_nc, out_nc=3, num_filters=8, num_blocks=nb,
                 scale=scale * (shuffle or 1), shuffle_factor=shuffle, plus=plus)
    with torch.no_grad():
        for name, p in net.named_parameters():
            # torch's default init, a little stronger so the tiny trunk changes the picture;
            # the last bias centres the output in 0..1.
            p.mul_(1.5)
        last = max(int(k.split(".")[1]) for k in net.state_dict() if k.startswith("model."))
        getattr(net.model, str(last)).bias.fill_(0.5)
    return net.eval()


def compact(seed, num_conv, scale):
    from spandrel.architectures.Compact import Compact
    torch.manual_seed(seed)
    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=num_conv, upscale=scale)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() == 1 and name.endswith(".weight"):
                # PReLU slopes: each channel its own, some negative (torch's init is 0.25
                # everywhere, which a plain LeakyReLU would also match).
                p.uniform_(-0.5, 0.5)
        # The residual onto the nearest-upsampled input: small enough to leave the picture.
        net.body[-1].weight.mul_(0.5)
    return net.eval()


def new_names(old, nb):
    """spandrel's `_to_old_arch` mapping, inverted: old names to BasicSR's."""
    out = collections.OrderedDict()
    ups = (max(int(k.split(".")[1]) for k in old) - 4) // 3
    for k, v in old.items():
        p = k.split(".")
        if k.startswith("model.0."):
            out["conv_first." + p[2]] = v
        elif k.startswith("model.1.sub.") and p[3] == str(nb):
            out["conv_body." + p[4]] = v
        elif k.startswith("model.1.sub."):
            # model.1.sub.N.RDBk.convj.0.w -> body.N.rdbk.convj.w
            out[f"body.{p[3]}.rdb{p[4][3:]}.{p[5]}.{p[7]}"] = v
        else:
            i = int(p[1])
            if i == 3 * ups + 2:
                out["conv_hr." + p[2]] = v
            elif i == 3 * ups + 4:
                out["conv_last." + p[2]] = v
            else:
                out[f"conv_up{i // 3}.{p[2]}"] = v
    return out


def a1111(checkout):
    import contextlib
    import logging
    import tqdm
    from typing import Callable

    class Grid(collections.namedtuple("Grid", ["tiles", "tile_w", "tile_h", "image_w",
                                               "image_h", "overlap"])):
        @property
        def tile_count(self):
            return sum(len(row[2]) for row in self.tiles)

    mod = os.path.join(checkout, "modules")
    img_fns, d1 = functions(os.path.join(mod, "images.py"), ["split_grid", "combine_grid"],
                            {"math": __import__("math"), "np": np, "Image": Image,
                             "Grid": Grid})
    images = types.SimpleNamespace(Grid=Grid, **img_fns)
    shared = types.SimpleNamespace(
        opts=types.SimpleNamespace(enable_upscale_progressbar=False),
        state=types.SimpleNamespace(interrupted=False, skipped=False))
    ns = {"np": np, "torch": torch, "Image": Image, "images": images, "tqdm": tqdm,
          "Callable": Callable, "logger": logging.getLogger("a1111"), "shared": shared,
          "devices": types.SimpleNamespace(without_autocast=contextlib.nullcontext),
          "torch_utils": types.SimpleNamespace(get_param=lambda m: next(m.parameters()))}
    utils, d2 = functions(os.path.join(mod, "upscaler_utils.py"),
                          ["pil_image_to_torch_bgr", "torch_bgr_to_pil_image",
                           "upscale_pil_patch", "upscale_with_model"], ns)
    up, d3 = functions(os.path.join(mod, "upscaler.py"), ["Upscaler.upscale"],
                       {"Image": Image, "PIL": PIL, "LANCZOS": Image.Resampling.LANCZOS,
                        "shared": shared})

    def tiled(model, img):
        return utils["upscale_with_model"](model, img, tile_size=TILE, tile_overlap=OVERLAP)

    class Esrgan:
        upscale = up["Upscaler.upscale"]

        def __init__(self, model):
            self.model = model

        # UpscalerESRGAN.do_upscale: esrgan_upscale(model, img).
        def do_upscale(self, img, selected_model):
            return tiled(self.model, img)

    def upscale(model, img, scale):
        return Esrgan(model).upscale(img, scale, None)

    return tiled, utils["upscale_pil_patch"], upscale, {**d1, **d2, **d3}


def inputs():
    rng = np.random.default_rng(20261205)

    def smooth(h, w):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                         (128 + 100 * np.sin((x + 2 * y) / 9)).astype(int)], axis=-1)
        noise = rng.integers(-12, 13, size=(h, w, 3))
        return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")

    return {"small": smooth(15, 21), "wide": smooth(30, 200), "tall": smooth(203, 37)}


def main():
    args = a1111_args(__file__, __doc__, DEFAULT_OUT)
    if args is None:
        return
    narrow_growth()
    tiled, _, upscale, digests = a1111(args.a1111)
    out = args.out
    os.makedirs(out, exist_ok=True)

    nets = {"x4-old": network(1, 2, 4), "x2-unshuffle": network(2, 1, 2, shuffle=2),
            "x2-old": network(3, 1, 2), "plus-x4": network(4, 1, 4, plus=True),
            "x8-old": network(5, 1, 8), "x3-old": network(6, 1, 3),
            "compact-x4": compact(7, 3, 4), "compact-x2": compact(8, 2, 2),
            "compact-x1": compact(9, 1, 1)}
    files = {
        "x4-old.pth": ("x4-old", nets["x4-old"].state_dict()),
        "x4-new.safetensors": ("x4-old", new_names(nets["x4-old"].state_dict(), 2)),
        "x2-unshuffle.pth": ("x2-unshuffle",
                             {"params_ema": new_names(nets["x2-unshuffle"].state_dict(), 1)}),
        "x2-old.safetensors": ("x2-old", nets["x2-old"].state_dict()),
        "plus-x4.pth": ("plus-x4", nets["plus-x4"].state_dict()),
        "x8-old.pth": ("x8-old", nets["x8-old"].state_dict()),
        "x3-old.pth": ("x3-old", nets["x3-old"].state_dict()),
        "compact-x4.pth": ("compact-x4", {"params": nets["compact-x4"].state_dict()}),
        "compact-x2.safetensors": ("compact-x2", nets["compact-x2"].state_dict()),
        "compact-x1.pth": ("compact-x1", nets["compact-x1"].state_dict()),
    }
    # What spandrel reads each file as: (architecture, scale, ESRGAN+).
    expect = {"plus-x4.pth": ("ESRGAN", 4, True), "x3-old.pth": ("ESRGAN", 2, False),
              "x8-old.pth": ("ESRGAN", 8, False), "compact-x4.pth": ("Compact", 4, None),
              "compact-x2.safetensors": ("Compact", 2, None),
              "compact-x1.pth": ("Compact", 1, None)}
    images = inputs()
    for name, img in images.items():
        img.save(os.path.join(out, f"input.{name}.png"))
    sent = {k: Image.open(os.path.join(out, f"input.{k}.png")).convert("RGB") for k in images}
    small = torch.from_numpy(np.ascontiguousarray(
        np.transpose(np.array(sent["small"])[:, :, ::-1], (2, 0, 1))) / 255).float()[None]
    forward = {}
    for fname, (net, sd) in files.items():
        path = os.path.join(out, fname)
        sd = {k: (v.contiguous() if isinstance(v, torch.Tensor) else
                  {kk: vv.contiguous() for kk, vv in v.items()}) for k, v in sd.items()}
        if fname.endswith(".safetensors"):
            safetensors.torch.save_file(sd, path)
        else:
            torch.save(sd, path)
        loaded = spandrel.ModelLoader().load_from_file(path)
        arch, scale, plus = expect.get(fname, ("ESRGAN", None, False))
        assert loaded.architecture.id == arch, loaded.architecture.id
        assert scale is None or loaded.scale == scale, (fname, loaded.scale)
        if plus is not None:
            assert ("ESRGAN+" in loaded.tags) == plus, (fname, loaded.tags)
        # The x8 network's output is kept small: the input's top-left FORWARD_CROP.
        x = small[:, :, :FORWARD_CROP[0], :FORWARD_CROP[1]] if fname == "x8-old.pth" else small
        with torch.no_grad():
            got = loaded.model.eval()(x)
            if fname != "x3-old.pth":  # read as another network: its own output is not it
                assert torch.equal(nets[net](x), got), fname
        if fname != "x4-new.safetensors":  # the same network as x4-old.pth
            forward[fname] = got[0].contiguous()
        print(f"{fname}: spandrel loads it as {loaded.architecture.id} x{loaded.scale} "
              f"{loaded.tags}, "
              f"{os.path.getsize(path)} bytes, output {tuple(got.shape)} "
              f"range {got.min():.3f}..{got.max():.3f}")
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "conv2.weight": torch.zeros(3, 4, 1, 1)},
               os.path.join(out, "not-rrdbnet.pth"))
    safetensors.torch.save_file(forward, os.path.join(out, "forward.safetensors"))

    def model(name):
        return spandrel.ModelLoader().load_from_file(os.path.join(out, name)).model.eval()

    cases = {}
    # Several tiles each way, and an image smaller than a tile (black-padded tiles).
    for label, (fname, img) in {"x4_wide": ("x4-old.pth", "wide"),
                                "x2_unshuffle_tall": ("x2-unshuffle.pth", "tall"),
                                "x4_small": ("x4-new.safetensors", "small"),
                                "compact_x4_wide": ("compact-x4.pth", "wide"),
                                "plus_x4_small": ("plus-x4.pth", "small")}.items():
        res = tiled(model(fname), sent[img])
        res.save(os.path.join(out, f"tiled.{label}.png"))
        cases[label] = dict(kind="tiled", model=fname, input=img, size=list(res.size))
        print(label, sent[img].size, "->", res.size)
    # Upscaler.upscale: x4 to 2.5 (one pass, Lanczos down); x2 to 3 (two passes, Lanczos
    # down); x4 to 0.5 and to 1.02 of a 37x203 image (37.74 x 207.06 floor to 32 x 200, which
    # it already covers: no pass, Lanczos alone); a 1x model at exactly 1 (one pass, then
    # Lanczos to 32x200).
    for label, (fname, img, scale) in {"x4_by_2_5": ("x4-old.pth", "tall", 2.5),
                                       "x2_by_3": ("x2-old.safetensors", "small", 3.0),
                                       "compact_x2_by_3": ("compact-x2.safetensors", "small",
                                                           3.0),
                                       "x4_by_0_5": ("x4-old.pth", "tall", 0.5),
                                       "x4_by_1_02": ("x4-old.pth", "tall", 1.02),
                                       "compact_x1_by_1": ("compact-x1.pth", "tall",
                                                           1.0)}.items():
        res = upscale(model(fname), sent[img], scale)
        res.save(os.path.join(out, f"upscale.{label}.png"))
        cases[label] = dict(kind="upscale", model=fname, input=img, scale=scale,
                            size=list(res.size))
        print(label, sent[img].size, "->", res.size)
    meta = {
        "generated_by": "tools/make_esrgan_fixtures.py",
        "versions": {"spandrel": spandrel.__version__, "torch": torch.__version__,
                     "pillow": PIL.__version__, "numpy": np.__version__},
        "a1111_sources": {k: f"sha256 {v}" for k, v in digests.items()},
        "tile": TILE, "overlap": OVERLAP, "forward_crop": {"x8-old.pth": list(FORWARD_CROP)},
        "cases": cases,
    }
    with open(os.path.join(out, "esrgan.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
