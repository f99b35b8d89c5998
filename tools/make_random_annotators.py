#!/usr/bin/env python3
"""Every network annotator's weights file at the REAL widths, with seeded random weights, for
benchmarks only (never for tests): the sd-webui-controlnet extension's own model classes, built
as the extension builds them for its real files, and saved with torch.save in the real files'
key layout, in a folder laid out as ANNOTATOR_DIR expects (`<subfolder>/<file>`, networks.rs
`AnnotatorFile`):

  hed/ControlNetHED.pth                 ControlNetHED_Apache2() (widths 64, 128, 256, 512, 512)
  pidinet/table5_pidinet.pth            PiDiNet(60, carv4, dil=24, sa=True), {"epoch",
                                        "state_dict": {"module.<name>"}}
  lineart/sk_model.pth, sk_model2.pth   Generator(3, 1, 3) (64, 128, 256, 3 residual blocks)
  lineart_anime/netG.pth                UnetGenerator(3, 1, 8, 64) with the `module.` prefix
  manga_line/erika.pth                  res_skip() with the `module.` prefix
  TEED/7_model.pth                      TED()
  mlsd/mlsd_large_512_fp32.pth          MobileV2_MLSD_Large()
  depth_anything_v2/depth_anything_v2_vitl.safetensors
                                        DepthAnythingV2("vitl", features 256, out_channels
                                        [256, 512, 1024, 1024]) as the detector builds it
                                        (safetensors, as the real file; only with
                                        --depth-anything or $DEPTH_ANYTHING_V2_DIR, a checkout of
                                        the depth_anything_v2 package)
  depth_anything/depth_anything_vitl14.pth
                                        DPT_DINOv2("vitl", features 256, out_channels
                                        [256, 512, 1024, 1024]) as the detector builds it
                                        (only with $DEPTH_ANYTHING_DIR, a checkout of the
                                        depth_anything package, and $DINOV2_DIR, one of
                                        facebookresearch/dinov2)
  openpose/body_pose_model.pth, hand_pose_model.pth, facenet.pth
                                        bodypose_model(), handpose_model() (bare layer names,
                                        as util.transfer reads them) and FaceNet() (only with
                                        scipy, scikit-image and matplotlib, which the
                                        extension's annotator/openpose imports)
  midas/dpt_hybrid-midas-501f0c75.pt    DPTDepthModel(backbone "vitb_rn50_384", non_negative) as
                                        load_model("dpt_hybrid") builds it (timm 1.0's
                                        R50+ViT-B/16 hybrid)
  normal_bae/scannet.pt                 NNET(architecture BN) as NormalBaeDetector builds it
                                        (tf_efficientnet_b5_ap), {"model": {"module.<name>"}}
  leres/res101.pth                      RelDepthModel("resnext101") as apply_leres builds it,
                                        under `depth_model` with `module.` names
  lama/ControlNetLama.pth               FFCResNetGenerator as config.yaml builds it (ngf 64, 3
                                        downsamplings, 18 FFC resnet blocks at ratio 0.75), the
                                        generator's state dict (make_lama_fixtures.full_width)
  bench_photo.png                       the benchmarks' 512 x 512 photo-like image (PHOTO)

The classes are taken from a checkout of the extension the way the fixture scripts
(tools/make_<name>_fixtures.py) take them: their `load` functions are reused with the
fixtures' width reductions undone (each `network` builder swapped for the full-width one
here), so the extension's detector calls come with them (`build`, which
tools/bench_annotators.py uses to time those calls). The weights are each class's own
initialisation from the fixture's seed (plus the fixture's rescaling of a few layers, which
keeps the maps away from all-black; timings do not depend on the values).

    python3 tools/make_random_annotators.py --extension /path/to/sd-webui-controlnet \
        [--depth-anything /path/to/Upgraded-Depth-Anything-V2] OUT_DIR
"""
import argparse
import os
import sys
import types

import cv2
import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_depth_anything_v2_fixtures as da2_fx  # noqa: E402
import make_hed_fixtures as hed_fx  # noqa: E402
import make_lineart_fixtures as lineart_fx  # noqa: E402
import make_manga_line_fixtures as manga_fx  # noqa: E402
import make_mlsd_fixtures as mlsd_fx  # noqa: E402
import make_pidinet_fixtures as pidinet_fx  # noqa: E402
import make_teed_fixtures as teed_fx  # noqa: E402
from a1111_source import functions  # noqa: E402
from make_preprocess_fixtures import photo  # noqa: E402

RESIZE = []
# The benchmarks' image: photo()'s sky, disc, rectangle, stripe and noise at 512 x 512.
PHOTO = (512, 512, 11, 8.0)


def with_prefix(state):
    """A DataParallel save's names (the real netG.pth, erika.pth, table5_pidinet.pth)."""
    return {f"module.{k}": v for k, v in state.items()}


def full_hed(ns):
    torch.manual_seed(hed_fx.SEED)
    net = ns["ControlNetHED_Apache2"]()
    with torch.no_grad():
        net.norm.copy_(torch.tensor([120.0, 115.0, 105.0]).reshape(1, 3, 1, 1))
    return net.float().eval()


def hed(ext):
    hed_fx.network = full_hed
    net, modules, resize, _, _ = hed_fx.load(ext)
    # The extension's resize_image_with_pad (scripts/preprocessor/legacy/processor.py's copy).
    RESIZE[:] = [resize]
    return [("hed", "ControlNetHED.pth", net, net.state_dict(),
             {"softedge_hed": modules["softedge_hed"]}, lambda p: chw(p, 1.0))]


def pidinet(ext):
    # annotator/pidinet/model.py's pidinet(): PiDiNet(60, config_model('carv4'), dil=24, sa=True).
    pidinet_fx.INPLANE, pidinet_fx.DIL = 60, 24
    net, modules, _, _, _ = pidinet_fx.load(ext)
    state = {"epoch": 14, "state_dict": with_prefix(net.state_dict())}
    # apply_pidinet feeds BGR / 255.
    return [("pidinet", "table5_pidinet.pth", net, state,
             {"softedge_pidinet": modules["softedge_pidinet"]},
             lambda p: chw(np.ascontiguousarray(p[:, :, ::-1]), 1 / 255.0))]


def lineart(ext):
    # The fixture divides widths of 64 and more by SHRINK and builds netG at ngf NGF; the real
    # files are at 1 and LineartAnimeDetector's 64.
    lineart_fx.SHRINK, lineart_fx.NGF = 1, 64
    nets, modules, _, _ = lineart_fx.load(ext)
    return [
        ("lineart", "sk_model.pth", nets["sk_model.pth"], nets["sk_model.pth"].state_dict(),
         {"lineart_realistic": modules["lineart_realistic"]}, lambda p: chw(p, 1 / 255.0)),
        ("lineart", "sk_model2.pth", nets["sk_model2.pth"], nets["sk_model2.pth"].state_dict(),
         {"lineart_coarse": modules["lineart_coarse"]}, lambda p: chw(p, 1 / 255.0)),
        ("lineart_anime", "netG.pth", nets["netG.pth"], with_prefix(nets["netG.pth"].state_dict()),
         {"lineart_anime": modules["lineart_anime"]}, lambda p: chw(p, 1 / 127.5, -1.0)),
    ]


def manga_line(ext):
    manga_fx.WIDTHS = {}  # res_skip's own widths (24, 48, 96, 192, 384, 16)
    net, module, _, _ = manga_fx.load(ext)

    def grey(p):
        g = cv2.cvtColor(p, cv2.COLOR_RGB2GRAY)
        return torch.from_numpy(g).float()[None, None]

    return [("manga_line", "erika.pth", net, with_prefix(net.state_dict()),
             {"lineart_anime_denoise": module}, grey)]


def teed(ext):
    caught = []
    built = teed_fx.network

    def network(ted):
        caught.append(built(ted))
        return caught[-1]

    teed_fx.network = network
    module, _, _, _ = teed_fx.load(ext)
    net = caught[-1]
    return [("TEED", "7_model.pth", net, net.state_dict(),
             {"softedge_teed": lambda img, res: module(img, res, 2)}, lambda p: chw(p, 1.0))]


def mlsd(ext):
    """MobileV2_MLSD_Large() and the legacy `mlsd` at its default thresholds (0.1, 0.1), wired
    as make_mlsd_fixtures.main wires them."""
    modules = types.ModuleType("modules")
    modules.devices = mlsd_fx.CPU
    sys.modules["modules"] = modules
    m = mlsd_fx.import_file("mbv2_mlsd_large", os.path.join(ext, "annotator", "mlsd", "models",
                                                             "mbv2_mlsd_large.py"))
    utils = mlsd_fx.import_file("mlsd_utils", os.path.join(ext, "annotator", "mlsd", "utils.py"))
    mlsd_fx.reduced = lambda m: m.MobileV2_MLSD_Large()
    net = mlsd_fx.network(m)
    ns = {"torch": torch, "np": np, "cv2": cv2, "os": os, "mlsdmodel": net, "devices": mlsd_fx.CPU,
          "pred_lines": utils.pred_lines, "MobileV2_MLSD_Large": None, "modeldir": None,
          "old_modeldir": None, "remote_model_path": None}
    f, _ = functions(os.path.join(ext, "annotator", "mlsd", "__init__.py"), ["apply_mlsd"], ns)
    util, _ = functions(os.path.join(ext, "annotator", "util.py"), ["HWC3"], {"np": np})
    annotator_mlsd = types.ModuleType("annotator.mlsd")
    annotator_mlsd.apply_mlsd = f["apply_mlsd"]
    sys.modules.setdefault("annotator", types.ModuleType("annotator"))
    sys.modules["annotator.mlsd"] = annotator_mlsd
    legacy, _ = functions(
        os.path.join(ext, "scripts", "preprocessor", "legacy", "processor.py"),
        ["pad64", "safer_memory", "resize_image_with_pad", "mlsd"],
        {"cv2": cv2, "np": np, "HWC3": util["HWC3"], "model_mlsd": None})

    def module(img, res):
        result, is_image = legacy["mlsd"](img, res=res)
        return util["HWC3"](result) if is_image else result

    def feed(p):
        # pred_lines' input: the image (already 512 x 512) and a channel of ones, / 127.5 - 1.
        x = np.concatenate([p, np.ones(p.shape[:2] + (1,))], axis=-1)
        x = np.expand_dims(x.transpose((2, 0, 1)), 0).astype("float32") / 127.5 - 1.0
        return torch.from_numpy(x)

    return [("mlsd", "mlsd_large_512_fp32.pth", net, net.state_dict(), {"mlsd": module}, feed)]


def depth_anything_v2(ext):
    """The detector's DepthAnythingV2 (vitl at its real widths, the package's own
    initialisation from the fixture's seed) and the legacy `depth_anything_v2` (colored=False),
    wired as make_depth_anything_v2_fixtures.load wires them; nothing without the package."""
    da2 = os.environ.get("DEPTH_ANYTHING_V2_DIR")
    if not da2:
        print("make_random_annotators.py: no DEPTH_ANYTHING_V2_DIR, depth_anything_v2 left out",
              file=sys.stderr)
        return []

    def full(_dinov2, dpt):
        torch.manual_seed(da2_fx.SEED)
        net = dpt.DepthAnythingV2(encoder="vitl", features=256, out_channels=[256, 512, 1024, 1024])
        return net.float().eval()

    da2_fx.network = full
    module, _, _, net, _, net_input = da2_fx.load(ext, da2)
    return [("depth_anything_v2", "depth_anything_v2_vitl.safetensors", net,
             {k: v.contiguous() for k, v in net.state_dict().items()},
             {"depth_anything_v2": lambda img, res: module(img, res=res)}, net_input)]


def depth_anything(ext):
    """The detector's DPT_DINOv2 (vitl at its real widths, the package's own initialisation
    from the fixture's seed) and the legacy `depth_anything` (colored=False), wired as
    make_depth_anything_fixtures.load wires them; nothing without the depth_anything package
    (DEPTH_ANYTHING_DIR) and facebookresearch/dinov2 (DINOV2_DIR)."""
    da1, dinov2 = os.environ.get("DEPTH_ANYTHING_DIR"), os.environ.get("DINOV2_DIR")
    if not da1 or not dinov2:
        print("make_random_annotators.py: no DEPTH_ANYTHING_DIR and DINOV2_DIR, depth_anything "
              "left out", file=sys.stderr)
        return []
    import make_depth_anything_fixtures as da1_fx
    module, _, _, net, _, net_input = da1_fx.load(ext, da1, dinov2, full=True)
    return [("depth_anything", "depth_anything_vitl14.pth", net, net.state_dict(),
             {"depth_anything": lambda img, res: module(img, res=res)}, net_input)]


def openpose_package(ext):
    """The extension's annotator.openpose (make_openpose_hand_fixtures.load), or None without
    the packages it imports."""
    try:
        import make_openpose_hand_fixtures as openpose_fx
        return openpose_fx.load(ext)[0], openpose_fx.SEED
    except ImportError as e:
        print(f"openpose left out: {e}", file=sys.stderr)
        return None, None


def openpose(ext):
    """[(subfolder, file, detector class, state)] of the three OpenPose networks, each its
    class's own initialisation from the hand fixture's seed."""
    package, seed = openpose_package(ext)
    if package is None:
        return [], None
    torch.manual_seed(seed)
    out = []
    for name, cls, bare, detector in [
            ("body_pose_model.pth", package.model.bodypose_model, True, package.body.Body),
            ("hand_pose_model.pth", package.model.handpose_model, True, package.hand.Hand),
            ("facenet.pth", package.face.FaceNet, False, package.face.Face)]:
        state = cls().float().state_dict()
        if bare:
            # util.transfer reads `conv1_1.weight` for the module's `model0.conv1_1.weight`.
            state = {k.split(".", 1)[1]: v for k, v in state.items()}
        out.append(("openpose", name, detector, state))
    return out, package


def annotator_package(ext):
    """The extension's `annotator` as a package again: hed's and mlsd's parts stand a bare
    module in for it, under which `annotator.midas` and `annotator.normalbae` cannot be found."""
    stub = sys.modules.get("annotator")
    if stub is not None and not hasattr(stub, "__path__"):
        stub.__path__ = [os.path.join(ext, "annotator")]


def midas(ext):
    """DPT-Hybrid at its real widths (make_midas_fixtures.full_width: the fixture's random
    weights) and the legacy `midas` (depth_midas) running it."""
    import make_midas_fixtures as midas_fx
    annotator_package(ext)
    net, legacy, _ = midas_fx.full_width(ext)
    return [("midas", "dpt_hybrid-midas-501f0c75.pt", net, net.state_dict(),
             {"depth_midas": lambda img, res: legacy["midas"](img, res=res)},
             lambda p: chw(p, 1 / 127.5, -1.0))]


def normalbae(ext):
    """NNET at its real widths (make_normalbae_fixtures.full_width: the fixture's random
    weights, saved as scannet.pt is: {'model': state_dict} under `module.`) and the legacy
    `normal_bae` running it; the network's input is the detector's: / 255, Normalize."""
    import make_normalbae_fixtures as normalbae_fx
    annotator_package(ext)
    net, legacy, norm = normalbae_fx.full_width(ext)
    return [("normal_bae", "scannet.pt", net, normalbae_fx.checkpoint(net, torch.float32),
             {"normal_bae": lambda img, res: legacy(img, res=res)},
             lambda p: norm(chw(p, 1 / 255.0)))]


def leres(ext):
    """LeReS at its real widths (make_leres_fixtures.full_width: the fixture's random weights)
    and the legacy `leres` (depth_leres, boost=False) running it."""
    import make_leres_fixtures as leres_fx
    annotator_package(ext)
    net, legacy, scale_torch = leres_fx.full_width(ext)
    return [("leres", "res101.pth", net, leres_fx.checkpoint(net, half=False),
             {"depth_leres": lambda img, res: legacy["leres"](img, res=res, boost=False)},
             lambda p: scale_torch(p[:, :, ::-1].copy())[None])]


def lama(ext):
    """LaMa's generator at its real widths (make_lama_fixtures.full_width: the fixture's random
    weights) and the extension's inpaint_only+lama running it on the image with a centred
    rectangle masked; the network's input is LamaInpainting's feed of the padded RGBA."""
    import make_lama_fixtures as lama_fx
    annotator_package(ext)
    net = lama_fx.full_width(ext)
    _, module, _, _ = lama_fx.extension_parts(ext, net)

    def with_mask(img):
        h, w = img.shape[:2]
        return np.concatenate([img, lama_fx.rect(h, w)[:, :, None]], axis=2)

    return [("lama", "ControlNetLama.pth", net, net.state_dict(),
             {"inpaint_only+lama": lambda img, res: module(with_mask(img))[:, :, :3]},
             lambda p: lama_fx.feed_tensor(with_mask(p)))]


def chw(padded, scale, offset=0.0):
    """The padded HWC uint8 image as the detectors feed it: 1 x C x H x W f32, v * scale + offset."""
    x = torch.from_numpy(np.ascontiguousarray(padded)).float() * scale + offset
    return x.permute(2, 0, 1)[None].contiguous()


def build(ext):
    """Every network as (subfolder, file, net, state as saved, {module: fn(img, res) -> map},
    fn(padded) -> the network's input), and the extension's resize_image_with_pad."""
    out = []
    for part in [hed, pidinet, lineart, manga_line, teed, mlsd, depth_anything_v2, depth_anything,
                 midas, normalbae, leres, lama]:
        out += part(ext)
    return out, RESIZE[0]


def bench_photo():
    return photo(*PHOTO)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extension", default=os.environ.get("SD_WEBUI_CONTROLNET_DIR"),
                    help="a checkout of sd-webui-controlnet (default: $SD_WEBUI_CONTROLNET_DIR)")
    ap.add_argument("out")
    ap.add_argument("--depth-anything", default=os.environ.get("DEPTH_ANYTHING_V2_DIR"),
                    help="a checkout of (Upgraded-)Depth-Anything-V2 (else depth_anything_v2 "
                         "is left out)")
    args = ap.parse_args()
    if not args.extension:
        sys.exit("make_random_annotators.py: needs --extension or SD_WEBUI_CONTROLNET_DIR")
    if args.depth_anything:
        os.environ["DEPTH_ANYTHING_V2_DIR"] = args.depth_anything
    torch.set_num_threads(2)
    for sub, name, net, state, _, _ in build(args.extension)[0]:
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
        path = os.path.join(args.out, sub, name)
        if name.endswith(".safetensors"):
            save_file(state, path)
        else:
            torch.save(state, path)
        n = sum(p.numel() for p in net.state_dict().values())
        print(f"{path}: {n / 1e6:.2f} M values, {os.path.getsize(path) / 1e6:.1f} MB")
    for sub, name, _, state in openpose(args.extension)[0]:
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
        path = os.path.join(args.out, sub, name)
        torch.save(state, path)
        print(f"{path}: {sum(v.numel() for v in state.values()) / 1e6:.2f} M values")
    cv2.imwrite(os.path.join(args.out, "bench_photo.png"), cv2.cvtColor(bench_photo(), cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    main()
