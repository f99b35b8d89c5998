#!/usr/bin/env python3
"""References for the sd-webui-controlnet extension's `inpaint_only+lama` preprocessor
(crates/pipeline/src/controlnet/preprocess/lama.rs and lama/), run as the extension runs it:
  annotator/lama/__init__.py (imported whole): LamaInpainting.__call__ (the feed: colour / 255
      zeroed where the mask / 255 is above 0.5, the mask appended; the generator; its output
      composited with the feed's colour; * 255, clipped, to uint8)
  annotator/lama/saicinpainting/training/modules/ (imported whole): make_generator with
      config.yaml's `generator` section (ffc_resnet: FFCResNetGenerator, FFC, SpectralTransform,
      FourierUnit), as DefaultInpaintingTrainingModule builds it
  scripts/preprocessor/lama_inpaint.py: PreprocessorLamaInpaint.__call__ (taken with `ast`:
      resolution 256, resize_image_with_pad of the RGBA image, remove_pad, cv2.resize back,
      the composite with the raw mask as alpha); scripts/utils.py: pad64, safer_memory,
      resize_image_with_pad, visualize_inpaint_mask
config.yaml is read as shipped; its `${...}` interpolations are resolved here (OmegaConf is
not needed for them). The packages the training code imports but inference never runs
(pytorch_lightning, kornia, omegaconf, the trainers) are stubs. No weights are downloaded.
The generator is narrowed so the fixtures stay small: ngf NGF (the real 64) and N_BLOCKS
resnet blocks (the real 18); n_downsampling, the ratios and flags are the config's. Seeded
random weights (BN running statistics too), rounded to f16, saved as the real file is: the
generator's state_dict (`model.<i>....`), torch.save.

Writes crates/pipeline/tests/fixtures/lama/:
  ControlNetLama.pth   the weights
  lama.safetensors     image.<n> (uint8 HxWx3), mask.<n> (uint8 HxW), feed.<n> (the padded
                       RGBA the model gets, uint8), net.<n> (the generator's output on it,
                       every STRIDE-th row and column), net_no_fft.<n> (the same with every
                       FourierUnit's output zeroed: how much the spectral branch matters),
                       out.<n> (the module's RGBA); net_input.odd / net.odd: the generator alone on a 4x72x88 input
                       (a bottleneck of 9x11: odd FFT sides)
  lama.json            the cases, sources
Run from the repository root with a python that has torch, opencv-python-headless 4.10.0,
einops, pyyaml, safetensors:
  python3 tools/make_lama_fixtures.py --extension /path/to/sd-webui-controlnet
(default: $SD_WEBUI_CONTROLNET_DIR; without it the script says so and writes nothing).
With `--full-width PATH` it writes only PATH: the generator at the config's widths (ngf 64,
18 blocks) with seeded random weights in f32 (`full_width`, also tools/make_random_annotators.py's),
and with `--full-width-ref DIR` the extension's run of it on image.wide in DIR.
"""
import argparse
import json
import os
import re
import sys
import tempfile
import types

import cv2
import numpy as np
import torch
import yaml
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import functions  # noqa: E402
from make_depth_anything_v2_fixtures import digest  # noqa: E402
from make_preprocess_fixtures import photo  # noqa: E402

OUT = os.path.join("crates", "pipeline", "tests", "fixtures", "lama")
SEED = 20210430
STRIDE = 5
NGF, N_BLOCKS = 8, 2
ODD = (1, 4, 72, 88)


def soft_ellipse(h, w):
    """A blurred ellipse: grey edges, so the 0.5 threshold and the alpha composite differ."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    m = ((y - h * 0.5) / (h * 0.3)) ** 2 + ((x - w * 0.45) / (w * 0.25)) ** 2 < 1
    return cv2.GaussianBlur((m * 255).astype(np.uint8), (9, 9), 3)


def rect(h, w):
    m = np.zeros((h, w), np.uint8)
    m[int(h * 0.2):int(h * 0.55), int(w * 0.3):int(w * 0.8)] = 255
    return m


def border(h, w):
    """Outpainting's mask: the right third and the top rows, touching the image's border."""
    m = np.zeros((h, w), np.uint8)
    m[:, int(w * 0.65):] = 255
    m[:5, :] = 200
    return m


# (image, mask): enlarged by 2.67 to 256x363 (padded to 384), by 3.2 to 352x256 (padded to
# 384), by exactly 2 (the resize back is then OpenCV's 2x area).
IMAGES = {
    "wide": (lambda: photo(96, 136, 5, 6.0), soft_ellipse),
    "tall": (lambda: photo(110, 80, 6, 10.0), rect),
    "border": (lambda: photo(128, 128, 7, 4.0), border),
}


class Anything(types.ModuleType):
    """A stub module: any attribute is a placeholder (names imported, never called)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def stubs(models_dir):
    """A1111's modules, and what the training code imports without inference needing it."""
    devices = types.ModuleType("modules.devices")
    devices.get_device_for = lambda _: torch.device("cpu")
    modules = types.ModuleType("modules")
    modules.devices = devices
    sys.modules["modules"] = modules
    sys.modules["modules.devices"] = devices
    path = types.ModuleType("annotator.annotator_path")
    path.models_path = models_dir
    sys.modules["annotator.annotator_path"] = path
    for name in ["omegaconf", "pytorch_lightning", "kornia", "kornia.geometry",
                 "kornia.geometry.transform", "kornia.augmentation",
                 "annotator.lama.saicinpainting.training.trainers"]:
        sys.modules[name] = Anything(name)


def generator_config(ext):
    """config.yaml's `generator` section with its `${a.b}` interpolations resolved."""
    path = os.path.join(ext, "annotator", "lama", "config.yaml")
    with open(path, encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)

    def lookup(dotted):
        v = cfg
        for part in dotted.split("."):
            v = v[part]
        return resolve(v)

    def resolve(v):
        if isinstance(v, dict):
            return {k: resolve(x) for k, x in v.items()}
        if isinstance(v, str):
            m = re.fullmatch(r"\$\{([a-z_.]+)\}", v)
            if m:
                return lookup(m.group(1))
        return v

    return resolve(cfg["generator"]), digest(path)


def generator(ext, ngf=None, n_blocks=None):
    """make_generator(config, **config.generator), as the trainer builds it, optionally
    narrowed."""
    sys.path.insert(0, ext)
    from annotator.lama.saicinpainting.training.modules import make_generator
    cfg, _ = generator_config(ext)
    if ngf is not None:
        cfg["ngf"], cfg["n_blocks"] = ngf, n_blocks
    return make_generator(None, **cfg)


def randomize(model, seed):
    """Seeded weights: convs by fan-in (the resnet blocks' scaled down, so 18 of them keep the
    activations in range), BN affine and running statistics near identity; rounded to f16."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith(".weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith(".bias"):
                p.copy_((torch.rand(p.shape, generator=gen) - 0.5) * 0.4)
            else:
                fan_in = p[0].numel()
                scale = 0.5 if ("conv1." in name or "conv2." in name) else 1.0
                p.copy_(torch.randn(p.shape, generator=gen) * scale / fan_in ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_((torch.rand(b.shape, generator=gen) - 0.5) * 0.4)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
        for p in list(model.parameters()) + list(model.buffers()):
            if p.is_floating_point():
                p.copy_(p.half().float())
    return model.eval()


def no_fft(model):
    """The same generator with every FourierUnit's output zeroed (its spectral branch gone)."""
    from annotator.lama.saicinpainting.training.modules.ffc import FourierUnit
    hooks = [m.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
             for m in model.modules() if isinstance(m, FourierUnit)]
    assert hooks
    return hooks


def extension_parts(ext, model):
    """The extension's LamaInpainting (its model set, as load_model would) and the preprocessor's
    __call__ with the utilities it uses."""
    import annotator.lama as lama
    inpainter = lama.LamaInpainting()
    inpainter.model = model
    utils, digests = functions(os.path.join(ext, "scripts", "utils.py"),
                               ["pad64", "safer_memory", "resize_image_with_pad",
                                "visualize_inpaint_mask"], {"cv2": cv2, "np": np})

    class Preprocessor:
        class Result:
            def __init__(self, value, display_images):
                self.value = value

    ns = {"cv2": cv2, "np": np, "Preprocessor": Preprocessor, **utils}
    path = os.path.join(ext, "scripts", "preprocessor", "lama_inpaint.py")
    call, d = functions(path, ["PreprocessorLamaInpaint.__call__"], ns)
    digests.update({f"scripts/preprocessor/lama_inpaint.py {k}": v for k, v in d.items()})
    this = types.SimpleNamespace(model=inpainter)

    def module(rgba):
        return call["PreprocessorLamaInpaint.__call__"](this, rgba, 512).value

    return inpainter, module, utils["resize_image_with_pad"], digests


def feed_tensor(feed):
    """LamaInpainting.__call__'s tensor of a padded RGBA image (what the generator gets)."""
    color = feed[:, :, :3].astype(np.float32) / 255.0
    mask = (feed[:, :, 3:4].astype(np.float32) / 255.0 > 0.5).astype(np.float32)
    x = np.concatenate([color * (1 - mask), mask], axis=2)
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()


def full_width(ext):
    tmp = tempfile.mkdtemp()
    stubs(tmp)
    return randomize(generator(ext), SEED)


def reference_full(ext, model, out):
    """The module on image.wide with the real-width model, as raw arrays in `out`:
    feed.bin (the padded RGBA, uint8), net.f32 (the generator's output on it, f32 3xHxW),
    out.bin (the module's RGBA, uint8)."""
    _, module, resize, _ = extension_parts(ext, model)
    img = IMAGES["wide"][0]()
    mask = IMAGES["wide"][1](*img.shape[:2])
    rgba = np.concatenate([img, mask[:, :, None]], axis=2)
    feed, _ = resize(rgba, 256)
    with torch.no_grad():
        net = model(feed_tensor(feed))[0].numpy()
    result = module(rgba.copy())
    os.makedirs(out, exist_ok=True)
    np.ascontiguousarray(feed).tofile(os.path.join(out, "feed.bin"))
    np.ascontiguousarray(net, dtype=np.float32).tofile(os.path.join(out, "net.f32"))
    np.ascontiguousarray(result).tofile(os.path.join(out, "out.bin"))
    print(f"{out}: feed {feed.shape}, net {net.min():.3f}..{net.max():.3f}, out {result.shape}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extension", default=os.environ.get("SD_WEBUI_CONTROLNET_DIR"))
    ap.add_argument("--full-width", metavar="PATH",
                    help="write only the real-width generator with random weights to PATH")
    ap.add_argument("--full-width-ref", metavar="DIR",
                    help="with --full-width: the extension's run of it on image.wide in DIR")
    args = ap.parse_args()
    if not args.extension:
        print("make_lama_fixtures.py: skipped (needs --extension or SD_WEBUI_CONTROLNET_DIR)")
        return
    torch.set_num_threads(1)
    if args.full_width:
        model = full_width(args.extension)
        torch.save(model.state_dict(), args.full_width)
        if args.full_width_ref:
            reference_full(args.extension, model, args.full_width_ref)
        n = sum(v.numel() for v in model.state_dict().values())
        print(f"{args.full_width}: {n / 1e6:.1f} M values")
        return
    assert cv2.__version__ == "4.10.0", cv2.__version__
    tmp = tempfile.mkdtemp()
    stubs(tmp)
    model = randomize(generator(args.extension, NGF, N_BLOCKS), SEED)
    os.makedirs(OUT, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(OUT, "ControlNetLama.pth"))
    _, module, resize, digests = extension_parts(args.extension, model)
    _, d = generator_config(args.extension)
    digests["annotator/lama/config.yaml"] = d
    lama_dir = os.path.join(args.extension, "annotator", "lama")
    for rel in ["__init__.py", "saicinpainting/training/modules/ffc.py",
                "saicinpainting/training/modules/__init__.py",
                "saicinpainting/training/modules/base.py"]:
        digests[f"annotator/lama/{rel}"] = digest(os.path.join(lama_dir, rel))
    tensors, cases = {}, []
    worst_fft = np.inf
    for name, (make_image, make_mask) in IMAGES.items():
        img = make_image()
        mask = make_mask(*img.shape[:2])
        rgba = np.concatenate([img, mask[:, :, None]], axis=2)
        feed, _ = resize(rgba, 256)
        with torch.no_grad():
            net = model(feed_tensor(feed))[0].numpy()
            hooks = no_fft(model)
            net_no_fft = model(feed_tensor(feed))[0].numpy()
            for h in hooks:
                h.remove()
        out = module(rgba.copy())
        assert out.shape == rgba.shape, out.shape
        worst_fft = min(worst_fft, float(np.abs(net - net_no_fft).max()))
        tensors[f"image.{name}"] = torch.from_numpy(np.ascontiguousarray(img))
        tensors[f"mask.{name}"] = torch.from_numpy(np.ascontiguousarray(mask))
        tensors[f"feed.{name}"] = torch.from_numpy(np.ascontiguousarray(feed))
        tensors[f"net.{name}"] = torch.from_numpy(np.ascontiguousarray(net[:, ::STRIDE, ::STRIDE]))
        tensors[f"net_no_fft.{name}"] = torch.from_numpy(
            np.ascontiguousarray(net_no_fft[:, ::STRIDE, ::STRIDE]))
        tensors[f"out.{name}"] = torch.from_numpy(np.ascontiguousarray(out))
        print(f"{name}: image {img.shape[:2]}, feed {feed.shape}, net {net.min():.3f}.."
              f"{net.max():.3f} (std {net.std():.3f}), without the FFT differs by up to "
              f"{np.abs(net - net_no_fft).max():.3f}")
        cases.append({"image": name})
    gen = torch.Generator().manual_seed(SEED)
    x = torch.rand(ODD, generator=gen)
    x[:, 3] = (x[:, 3] > 0.7).float()
    tensors["net_input.odd"] = x
    with torch.no_grad():
        tensors["net.odd"] = model(x)[0, :, ::STRIDE, ::STRIDE].contiguous()
    save_file(tensors, os.path.join(OUT, "lama.safetensors"))
    with open(os.path.join(OUT, "lama.json"), "w") as fh:
        json.dump({"opencv": cv2.__version__, "numpy": np.__version__, "torch": torch.__version__,
                   "seed": SEED, "stride": STRIDE, "ngf": NGF, "n_blocks": N_BLOCKS,
                   "odd_input": list(ODD),
                   "fft_branch_min_effect": worst_fft,
                   "sources": {k: f"sha256 {v}" for k, v in digests.items()},
                   "cases": cases}, fh, indent=1)
        fh.write("\n")
    print(f"wrote {len(tensors)} tensors, {len(cases)} cases to {OUT}/")


if __name__ == "__main__":
    main()
