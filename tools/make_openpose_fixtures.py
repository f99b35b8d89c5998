#!/usr/bin/env python3
"""References for the sd-webui-controlnet extension's `openpose` preprocessor (body only;
crates/pipeline/src/controlnet/preprocess/openpose.rs, openpose_body.rs, pose_draw.rs), run as
the extension runs it: its own package annotator/openpose/ (OpenposeDetector, Body, model.py's
bodypose_model, util.py's resizes and drawing) imported from a checkout, with the modules it
imports but never runs for the body (matplotlib, torchvision, skimage, A1111's `modules`) given
as stubs; the legacy processor's resize_image_with_pad / OpenposeModel.run_model from
scripts/preprocessor/legacy/processor.py.

No weights are downloaded. Three sets of references:
  openpose-draw.*      OpenCV 4.10 itself on random shapes: cv2.ellipse2Poly's points,
                       cv2.fillConvexPoly and cv2.circle(thickness=-1) canvases; and cv2.resize
                       with INTER_LANCZOS4 (f32 maps, an 8-bit image) and INTER_AREA (f32).
  openpose-crafted.*   Body.__call__ and the whole detector with its network replaced by crafted
                       outputs (Gaussian blobs on the 18 heatmaps of one or two people, unit
                       vectors along their limbs on the PAFs, the background heatmap 1 - max):
                       the candidate peaks, subset rows and the drawn map.
  openpose-net.*       the real bodypose_model with weights made from a formula the Rust test
                       repeats (no 52 MB file committed): value i of each tensor, in model.py's
                       order, is ((i * 2654435761 + 97 * t) mod 2^32 / 2^32 - 0.5) * 2 *
                       sqrt(6 / fan_in) for weights (t: the tensor's number), a twentieth of
                       that for biases; its outputs on two padded images and the maps.
Run from the repository root:
  python3 tools/make_openpose_fixtures.py --extension /path/to/sd-webui-controlnet
(default: $SD_WEBUI_CONTROLNET_DIR; without one the script says so and writes nothing).
"""
import argparse
import hashlib
import importlib
import json
import os
import sys
import tempfile
import types
import typing

import cv2
import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import functions  # noqa: E402
from make_preprocess_fixtures import photo  # noqa: E402

OUT = os.path.join("crates", "pipeline", "tests", "fixtures", "openpose")
SEED = 20261206


def stub(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def load(ext):
    """annotator.openpose imported from `ext`, its unused imports stubbed."""
    stub("matplotlib", colors=types.SimpleNamespace(hsv_to_rgb=None), pyplot=None)
    stub("matplotlib.pyplot")
    stub("torchvision")
    stub("torchvision.transforms", ToTensor=lambda: None, ToPILImage=lambda: None, transforms=None)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    stub("skimage")
    stub("skimage.measure", label=None)
    stub("modules", devices=types.SimpleNamespace(get_device_for=lambda _: "cpu"))
    stub("modules.devices", get_device_for=lambda _: "cpu")
    annotator = stub("annotator")
    annotator.__path__ = [os.path.join(ext, "annotator")]
    stub("annotator.annotator_path", models_path=tempfile.gettempdir())
    openpose = importlib.import_module("annotator.openpose")
    digests = {}
    for f in ["__init__.py", "body.py", "util.py", "model.py", "types.py"]:
        with open(os.path.join(ext, "annotator", "openpose", f), "rb") as fh:
            digests[f"annotator/openpose/{f}"] = hashlib.sha256(fh.read()).hexdigest()
    util, d = functions(os.path.join(ext, "annotator", "util.py"), ["HWC3"], {"cv2": cv2, "np": np})
    digests.update(d)
    legacy, d = functions(
        os.path.join(ext, "scripts", "preprocessor", "legacy", "processor.py"),
        ["pad64", "safer_memory", "resize_image_with_pad", "OpenposeModel"],
        {"cv2": cv2, "np": np, "HWC3": util["HWC3"], "Callable": typing.Callable, "Tuple": typing.Tuple})
    digests.update(d)
    return openpose, legacy, digests


def draw_refs(tensors, meta):
    """OpenCV's own rasterisers and resizes on random inputs."""
    rng = np.random.default_rng(SEED)
    polys, canvases = [], []
    for c in range(16):
        h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
        canvas = np.zeros((h, w, 3), np.uint8)
        ops = []
        for _ in range(6):
            center = [int(rng.integers(-10, w + 10)), int(rng.integers(-10, h + 10))]
            axes = [int(rng.integers(0, 40)), int(rng.choice([0, 1, 4, int(rng.integers(0, 20))]))]
            angle = int(rng.integers(-200, 400))
            pts = cv2.ellipse2Poly(tuple(center), tuple(axes), angle, 0, 360, 1)
            color = [int(v) for v in rng.integers(1, 256, 3)]
            cv2.fillConvexPoly(canvas, pts, color)
            polys.append({"center": center, "axes": axes, "angle": angle, "points": pts.tolist()})
            ops.append({"poly": len(polys) - 1, "color": color})
        for _ in range(4):
            center = [int(rng.integers(-6, w + 6)), int(rng.integers(-6, h + 6))]
            radius = int(rng.choice([3, 4, int(rng.integers(0, 15))]))
            color = [int(v) for v in rng.integers(1, 256, 3)]
            cv2.circle(canvas, tuple(center), radius, color, thickness=-1)
            ops.append({"circle": center, "radius": radius, "color": color})
        tensors[f"canvas.{c}"] = torch.from_numpy(canvas)
        canvases.append(ops)
    meta["polys"] = polys
    meta["canvases"] = canvases
    resizes = []
    for r, (sh, sw, dh, dw) in enumerate([(23, 20, 184, 160), (92, 77, 96, 80), (17, 29, 50, 61),
                                          (46, 40, 24, 21), (48, 40, 24, 20)]):
        m = (rng.standard_normal((sh, sw)) * 0.5).astype(np.float32)
        interp = cv2.INTER_AREA if dh < sh else cv2.INTER_LANCZOS4
        tensors[f"resize.{r}.in"] = torch.from_numpy(m)
        tensors[f"resize.{r}.out"] = torch.from_numpy(cv2.resize(m, (dw, dh), interpolation=interp))
        resizes.append({"key": f"resize.{r}", "kind": "area" if dh < sh else "lanczos4"})
    img = photo(40, 30, 4, 10.0)
    tensors["resize_u8.in"] = torch.from_numpy(img)
    tensors["resize_u8.out"] = torch.from_numpy(cv2.resize(img, (138, 184), interpolation=cv2.INTER_LANCZOS4))
    meta["resizes"] = resizes


# Two people's keypoints (x, y) in the crafted outputs' grid (None: not there).
PEOPLE = [
    [(10, 3), (10, 6), (7.2, 6), (6, 9.5), (5, 12.5), (12.8, 6), (14, 9.6), (15, 12.4), (8.5, 12.5),
     (8.3, 16), (8.2, 19.2), (11.5, 12.5), (11.8, 16), (12, 19.3), (9.3, 2.4), (10.7, 2.4), (8.6, 3),
     (11.4, 3)],
    [(3, 4), (3, 6.5), (1.6, 6.5), None, None, (4.4, 6.5), (5, 9), (5.4, 11), (2.2, 11), (2.2, 14),
     (2, 17), (3.8, 11), (4, 14), (4.1, 17), (2.6, 3.5), (3.4, 3.5), None, (3.9, 3.8)],
]
LIMBS = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13],
         [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [3, 17], [6, 18]]
MAP_IDX = [[31, 32], [39, 40], [33, 34], [35, 36], [41, 42], [43, 44], [19, 20], [21, 22], [23, 24],
           [25, 26], [27, 28], [29, 30], [47, 48], [49, 50], [53, 54], [51, 52], [55, 56], [37, 38],
           [45, 46]]


def crafted_outputs(gh, gw, people, rng):
    """PAFs [1, 38, gh, gw] and heatmaps [1, 19, gh, gw] of `people` on the output grid."""
    y, x = np.mgrid[0:gh, 0:gw].astype(np.float64)
    heat = np.zeros((19, gh, gw))
    paf = np.zeros((38, gh, gw))
    for person in people:
        for part, p in enumerate(person):
            if p is not None:
                blob = 0.85 * np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2) / (2 * 0.7 ** 2))
                heat[part] = np.maximum(heat[part], blob)
        for (a, b), (cx, cy) in zip(LIMBS, MAP_IDX):
            pa, pb = person[a - 1], person[b - 1]
            if pa is None or pb is None:
                continue
            v = np.array(pb, float) - np.array(pa, float)
            n = np.linalg.norm(v)
            u = v / n
            t = ((x - pa[0]) * u[0] + (y - pa[1]) * u[1])
            d = np.abs((x - pa[0]) * u[1] - (y - pa[1]) * u[0])
            on = (t >= -0.5) & (t <= n + 0.5) & (d <= 0.9)
            paf[cx - 19][on] = u[0]
            paf[cy - 19][on] = u[1]
    heat[18] = 1 - heat[:18].max(axis=0)
    heat += rng.normal(0, 0.01, heat.shape)
    return (torch.from_numpy(paf[None].astype(np.float32)), torch.from_numpy(heat[None].astype(np.float32)))


class Fixed(torch.nn.Module):
    """A stand-in for bodypose_model returning given outputs (and the input size it got)."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return self.outputs


def detector(openpose, model):
    det = openpose.OpenposeDetector()
    body = openpose.Body.__new__(openpose.Body)
    body.model = model
    det.body_estimation = body
    det.hand_estimation = det.face_estimation = types.SimpleNamespace(model=torch.nn.Identity())
    return det


def run_detector(det, padded):
    """OpenposeModel.run_model's call on the padded image: the map and the pose JSON."""
    poses = []
    out = det(padded, include_body=True, include_hand=False, include_face=False,
              json_pose_callback=poses.append)
    return out, poses[0]


def crafted_refs(openpose, tensors, meta):
    rng = np.random.default_rng(SEED + 1)
    cases = []
    for name, (h, w), people in [("two", (192, 160), PEOPLE), ("one", (208, 176), PEOPLE[:1]),
                                 ("partial", (160, 192), PEOPLE[1:])]:
        scale = 0.5 * 368 / h
        rh, rw = int(h * scale), int(w * scale)
        gh, gw = -(-rh // 8), -(-rw // 8)
        outputs = crafted_outputs(gh, gw, people, rng)
        model = Fixed(outputs)
        det = detector(openpose, model)
        padded = np.zeros((h, w, 3), np.uint8)
        det.body_estimation.cn_device = "cpu"
        candidate, subset = det.body_estimation(padded[:, :, ::-1].copy())
        out, pose_json = run_detector(det, padded)
        assert model.seen[0] == (1, 3, gh * 8, gw * 8), (model.seen, gh, gw)
        tensors[f"crafted.{name}.paf"] = outputs[0][0]
        tensors[f"crafted.{name}.heat"] = outputs[1][0]
        tensors[f"crafted.{name}.map"] = torch.from_numpy(np.ascontiguousarray(out))
        tensors[f"crafted.{name}.candidate"] = torch.from_numpy(np.asarray(candidate, np.float64).reshape(-1, 4))
        tensors[f"crafted.{name}.subset"] = torch.from_numpy(np.asarray(subset, np.float64).reshape(-1, 20))
        print(f"crafted {name}: {len(candidate)} peaks, {len(subset)} people, "
              f"parts {[int(r[-1]) for r in subset]}")
        cases.append({"name": name, "height": h, "width": w, "scaled": [rh, rw], "pose": pose_json})
    meta["crafted"] = cases


def formula_state(model):
    """The weights the Rust test makes: see the docstring."""
    state = {}
    for t, (name, p) in enumerate(model.state_dict().items()):
        i = np.arange(p.numel(), dtype=np.uint64)
        u = ((i * np.uint64(2654435761) + np.uint64(97 * t)) % np.uint64(1 << 32)).astype(np.float64)
        u = u / 2.0 ** 32 - 0.5
        fan_in = model.state_dict()[name.replace(".bias", ".weight")][0].numel()
        gain = 2 * np.sqrt(6.0 / fan_in) * (0.05 if name.endswith(".bias") else 1.0)
        state[name] = torch.from_numpy((u * gain).astype(np.float32).reshape(p.shape))
    return state


def net_refs(openpose, legacy, tensors, meta):
    model = openpose.model.bodypose_model()
    state = formula_state(model)
    # Saved with the file's bare names, which util.transfer maps back, and loaded by Body.
    bare = {".".join(k.split(".")[1:]): v for k, v in state.items()}
    path = os.path.join(tempfile.gettempdir(), "openpose_formula_body.pth")
    torch.save(bare, path)
    body = openpose.Body(path)
    os.remove(path)
    body.cn_device = "cpu"
    meta["formula"] = [[k, list(v.shape)] for k, v in bare.items()]
    cases = []
    for name, img, res in [("small", photo(48, 40, 5, 8.0), 64), ("square", photo(70, 70, 6, 8.0), 192)]:
        padded, _ = legacy["resize_image_with_pad"](img, res)
        caught = []
        hook = body.model.register_forward_hook(lambda _m, i, o: caught.append((i[0], o)))
        det = detector(openpose, body.model)
        det.body_estimation = body
        out, pose_json = run_detector(det, padded)
        # The legacy module whole (OpenposeModel.run_model: the pad, the detector, remove_pad).
        model = legacy["OpenposeModel"]()
        model.model_openpose = det
        whole, is_image = model.run_model(img.copy(), include_body=True, include_hand=False,
                                          include_face=False, res=res)
        hook.remove()
        x, (l1, l2) = caught[0]
        tensors[f"net.{name}.image"] = torch.from_numpy(img)
        tensors[f"net.{name}.whole"] = torch.from_numpy(np.ascontiguousarray(whole))
        tensors[f"net.{name}.padded"] = torch.from_numpy(np.ascontiguousarray(padded))
        tensors[f"net.{name}.paf"] = l1[0].contiguous()
        tensors[f"net.{name}.heat"] = l2[0].contiguous()
        tensors[f"net.{name}.map"] = torch.from_numpy(np.ascontiguousarray(out))
        print(f"net {name}: input {tuple(x.shape)}, paf {l1.min():.3f}..{l1.max():.3f}, "
              f"heat {l2.min():.3f}..{l2.max():.3f}, people {len(pose_json['people'])}")
        cases.append({"name": name, "resolution": res, "pose": pose_json})
    meta["net"] = cases


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extension", default=os.environ.get("SD_WEBUI_CONTROLNET_DIR"),
                    help="a checkout of sd-webui-controlnet (default: $SD_WEBUI_CONTROLNET_DIR)")
    args = ap.parse_args()
    if not args.extension:
        print("make_openpose_fixtures.py: skipped (needs --extension or SD_WEBUI_CONTROLNET_DIR)")
        return
    assert cv2.__version__ == "4.10.0", cv2.__version__
    torch.set_num_threads(1)
    openpose, legacy, digests = load(args.extension)
    os.makedirs(OUT, exist_ok=True)
    versions = {"opencv": cv2.__version__, "numpy": np.__version__, "torch": torch.__version__,
                "scipy": importlib.import_module("scipy").__version__,
                "extension_sources": {k: f"sha256 {v}" for k, v in digests.items()}}
    for part, make in [("draw", lambda t, m: draw_refs(t, m)),
                       ("crafted", lambda t, m: crafted_refs(openpose, t, m)),
                       ("net", lambda t, m: net_refs(openpose, legacy, t, m))]:
        tensors, meta = {}, dict(versions)
        make(tensors, meta)
        meta["cases"] = []
        save_file(tensors, os.path.join(OUT, f"openpose-{part}.safetensors"))
        with open(os.path.join(OUT, f"openpose-{part}.json"), "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        print(f"wrote openpose-{part}: {len(tensors)} tensors")


if __name__ == "__main__":
    main()
