#!/usr/bin/env python3
"""References for the sd-webui-controlnet extension's openpose_hand / openpose_face /
openpose_faceonly / openpose_full preprocessors (crates/pipeline/src/controlnet/preprocess/
openpose_hand.rs, openpose_face.rs, pose_draw.rs), run as the extension runs them: its own
package annotator/openpose/ (OpenposeDetector, Hand, Face, model.py's handpose_model, face.py's
FaceNet, util.py's handDetect / faceDetect / draw_handpose / draw_facepose) imported from a
checkout with the real matplotlib (hsv_to_rgb) and skimage (label); torchvision and A1111's
`modules` (imported, never run) given as stubs. The body side is make_openpose_fixtures.py's.

No weights are downloaded. Three sets of references:
  openpose-hand-draw.*     util.draw_handpose / draw_facepose on random float32 keypoints
                           (some at -1 / W, as a hand part not found) and cv2.line with
                           thickness 2 on random segments: the canvases.
  openpose-hand-crafted.*  the whole detector with its three networks replaced by crafted
                           outputs: openpose-crafted's body outputs (cases two and partial,
                           make_openpose_fixtures.py's people); hand outputs that
                           depend only on the input's size (Gaussian blobs at fixed fractions
                           of the output grid, see HAND_BLOBS; part 1 with a second, wider but
                           lower blob whose region holds the larger sum; parts 19 and 20
                           empty; the background 0); face outputs likewise (FACE_BLOBS; the
                           background channel a ramp down from the corner, whose peak is then not found):
                           the maps of the four modules and their pose JSON. And Hand.__call__
                           on a photo crop with a network whose outputs are a formula of its
                           input (8 x 8 means of the BGR planes mixed per part, POOL_MIX):
                           heatmap_avg's first channels.
  openpose-hand-net.*      handpose_model and FaceNet at their real widths with weights from
                           make_openpose_fixtures.py's formula (no 147 MB / 154 MB file): their
                           outputs on one small input each.
Run from the repository root:
  python3 tools/make_openpose_hand_fixtures.py --extension /path/to/sd-webui-controlnet
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
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import functions  # noqa: E402
from make_openpose_fixtures import Fixed, formula_state, stub  # noqa: E402
from make_preprocess_fixtures import photo  # noqa: E402

OUT = os.path.join("crates", "pipeline", "tests", "fixtures", "openpose")
SEED = 20261207

# Hand parts' blobs: (x, y) as fractions of the output grid, amplitude, sigma in grid widths.
# Part 18 is faint: smoothed, it peaks between 0.05 (the threshold) and 0.1.
HAND_BLOBS = [[0.5, 0.8, 0.9, 0.05]] + [
    [0.3 + 0.1 * (i % 5), 0.25 + 0.12 * (i // 5), 0.6 + 0.01 * i, 0.04] for i in range(17)
] + [[0.6, 0.7, 0.11, 0.04], [0.5, 0.5, 0.0, 0.04], [0.5, 0.5, 0.0, 0.04]]
# Part 1's second blob, away from the first: lower but wider, so its region's sum is the
# larger.
HAND_SECOND = [0.85, 0.85, 0.5, 0.09]
# Face landmarks' blobs (x, y fractions of the 48 x 48 grid, amplitude, sigma in cells);
# landmarks 60..69 empty; the background (70) a ramp 0.2 - 0.001 (x + y) over the grid, so its
# peak is the crop's corner, found as not found (-1).
# Landmarks 50..59 are faint (0.08: over the 0.05 threshold, under params' 0.1).
FACE_BLOBS = [[0.2 + 0.06 * (i % 10), 0.2 + 0.1 * (i // 10), 0.5 if i < 50 else 0.08, 1.0]
              for i in range(60)] + [
    [0.5, 0.5, 0.0, 1.0]] * 10
FACE_BACKGROUND = [0.2, 0.001]
# Hand.__call__ on a photo: part c's output is sum_k POOL_MIX[c][k] * mean8(plane k) (BGR).
POOL_MIX = [[((c * 3 + k) % 7 - 3) / 3.0 for k in range(3)] for c in range(22)]


def load(ext):
    """annotator.openpose imported from `ext` with the real matplotlib and skimage."""
    stub("torchvision")
    stub("torchvision.transforms", ToTensor=lambda: None, ToPILImage=lambda: None)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    stub("modules", devices=types.SimpleNamespace(get_device_for=lambda _: "cpu"))
    stub("modules.devices", get_device_for=lambda _: "cpu")
    annotator = stub("annotator")
    annotator.__path__ = [os.path.join(ext, "annotator")]
    stub("annotator.annotator_path", models_path=tempfile.gettempdir())
    openpose = importlib.import_module("annotator.openpose")
    digests = {}
    for f in ["__init__.py", "body.py", "hand.py", "face.py", "util.py", "model.py", "types.py"]:
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


def blobs(gh, gw, specs, background, second=None):
    """Channel-major f32 outputs [1, len(specs) + 1, gh, gw]: a Gaussian per spec (x, y
    fractions of the grid, amplitude, sigma in cells), the last channel `background`
    (b0, b1): b0 - b1 (x + y)."""
    y, x = np.mgrid[0:gh, 0:gw].astype(np.float64)
    out = np.zeros((len(specs) + 1, gh, gw))
    for c, (fx, fy, a, s) in enumerate(specs):
        out[c] = a * np.exp(-((x - fx * gw) ** 2 + (y - fy * gh) ** 2) / (2 * s * s))
    if second is not None:
        fx, fy, a, s = second
        out[1] = np.maximum(out[1], a * np.exp(-((x - fx * gw) ** 2 + (y - fy * gh) ** 2) / (2 * s * s)))
    out[-1] = background[0] - background[1] * (x + y)
    return torch.from_numpy(out[None].astype(np.float32))


class HandBlobs(torch.nn.Module):
    def forward(self, x):
        gh, gw = x.shape[2] // 8, x.shape[3] // 8
        specs = [[fx, fy, a, s * gw] for fx, fy, a, s in HAND_BLOBS]
        fx, fy, a, s = HAND_SECOND
        return blobs(gh, gw, specs, [0.0, 0.0], [fx, fy, a, s * gw])


class FaceBlobs(torch.nn.Module):
    def forward(self, x):
        return [blobs(x.shape[2] // 8, x.shape[3] // 8, FACE_BLOBS, FACE_BACKGROUND)]


class PoolMix(torch.nn.Module):
    def forward(self, x):
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        return torch.einsum("ck,bkhw->bchw", torch.tensor(POOL_MIX, dtype=torch.float32), pooled)


def draw_refs(openpose, tensors, meta):
    rng = np.random.default_rng(SEED)
    Keypoint = openpose.body.Keypoint
    canvases = []
    for c in range(10):
        h, w = int(rng.integers(24, 64)), int(rng.integers(24, 64))
        canvas = np.zeros((h, w, 3), np.uint8)
        ops = []
        for _ in range(2):
            pts = rng.uniform(-0.05, 1.02, (21, 2)).astype(np.float32)
            pts[rng.random(21) < 0.15] = np.float32(-1.0) / np.float32(w)
            canvas = openpose.util.draw_handpose(canvas, [Keypoint(x=p[0], y=p[1]) for p in pts])
            ops.append({"hand": [[float(v) for v in p] for p in pts]})
        pts = rng.uniform(0, 1, (int(rng.integers(1, 30)), 2)).astype(np.float32)
        canvas = openpose.util.draw_facepose(canvas, [Keypoint(x=p[0], y=p[1]) for p in pts])
        ops.append({"face": [[float(v) for v in p] for p in pts]})
        for _ in range(4):
            p1 = [int(v) for v in rng.integers(-8, max(h, w) + 8, 2)]
            p2 = [int(v) for v in rng.integers(-8, max(h, w) + 8, 2)]
            color = [int(v) for v in rng.integers(1, 256, 3)]
            cv2.line(canvas, tuple(p1), tuple(p2), color, thickness=2)
            ops.append({"line": [p1, p2], "color": color})
        tensors[f"canvas.{c}"] = torch.from_numpy(canvas)
        canvases.append(ops)
    meta["canvases"] = canvases


def crafted_detector(openpose, body_outputs):
    det = openpose.OpenposeDetector()
    body = openpose.Body.__new__(openpose.Body)
    body.model = Fixed(body_outputs)
    hand = openpose.Hand.__new__(openpose.Hand)
    hand.model = HandBlobs()
    face = openpose.Face.__new__(openpose.Face)
    face.model = FaceBlobs()
    det.body_estimation, det.hand_estimation, det.face_estimation = body, hand, face
    return det


MODULES = {"openpose_hand": (True, True, False), "openpose_face": (True, False, True),
           "openpose_faceonly": (False, False, True), "openpose_full": (True, True, True)}


def crafted_refs(openpose, tensors, meta):
    rng = np.random.default_rng(SEED + 1)
    body = load_file(os.path.join(OUT, "openpose-crafted.safetensors"))
    cases = []
    for name, (h, w), modules in [
            ("two", (192, 160), ["openpose_full", "openpose_faceonly"]),
            ("partial", (160, 192), ["openpose_hand", "openpose_face"])]:
        scale = 0.5 * 368 / h
        rh, rw = int(h * scale), int(w * scale)
        # The body outputs of openpose-crafted (make_openpose_fixtures.py's two cases).
        outputs = (body[f"crafted.{name}.paf"][None], body[f"crafted.{name}.heat"][None])
        padded = np.zeros((h, w, 3), np.uint8)
        runs = []
        for module in modules:
            with_body, hand, face = MODULES[module]
            det = crafted_detector(openpose, outputs)
            poses = []
            out = det(padded, include_body=with_body, include_hand=hand, include_face=face,
                      json_pose_callback=poses.append)
            tensors[f"crafted.{name}.{module}"] = torch.from_numpy(np.ascontiguousarray(out))
            found = [(p["hand_left_keypoints_2d"] is not None, p["hand_right_keypoints_2d"] is not None,
                      p["face_keypoints_2d"] is not None) for p in poses[0]["people"]]
            print(f"crafted {name} {module}: people (left, right, face) {found}")
            runs.append({"module": module, "pose": poses[0]})
        cases.append({"name": name, "height": h, "width": w, "scaled": [rh, rw], "runs": runs})
    meta["crafted"] = cases
    # handDetect and faceDetect on random bodies (keypoints in pixels, some missing, some
    # near or past the edges).
    Keypoint, BodyResult = openpose.body.Keypoint, openpose.body.BodyResult
    boxes = []
    for _ in range(60):
        h, w = int(rng.integers(40, 300)), int(rng.integers(40, 300))
        kps = []
        for _ in range(18):
            if rng.random() < 0.15:
                kps.append(None)
            else:
                kps.append([float(rng.uniform(-5, w + 5)), float(rng.uniform(-5, h + 5))])
        # Faces and arms of plausible sizes: parts placed near the nose and along arms.
        if kps[0] is not None:
            for k in (14, 15, 16, 17):
                if kps[k] is not None:
                    kps[k] = [kps[0][0] + float(rng.normal(0, 12)), kps[0][1] + float(rng.normal(0, 12))]
        body_result = BodyResult(keypoints=[Keypoint(*k) if k else None for k in kps])
        img = np.zeros((h, w, 3), np.uint8)
        hands = [list(b) for b in openpose.util.handDetect(body_result, img)]
        face = openpose.util.faceDetect(body_result, img)
        boxes.append({"width": w, "height": h, "keypoints": kps, "hands": hands,
                      "face": list(face) if face else None})
    meta["boxes"] = boxes
    print(f"boxes: {sum(len(b['hands']) for b in boxes)} hands, "
          f"{sum(b['face'] is not None for b in boxes)} faces")
    meta["hand_blobs"] = {"parts": HAND_BLOBS, "second": HAND_SECOND}
    meta["face_blobs"] = {"parts": FACE_BLOBS, "background": FACE_BACKGROUND}
    # Hand.__call__ on a photo crop, the network a formula of its input.
    hand = openpose.Hand.__new__(openpose.Hand)
    hand.model = PoolMix()
    hand.cn_device = "cpu"
    img = photo(52, 52, 7, 12.0)
    caught = []
    orig = openpose.hand.gaussian_filter

    def grab(m, sigma):
        caught.append(m.copy())
        return orig(m, sigma=sigma)
    openpose.hand.gaussian_filter = grab
    peaks = hand(img[:, :, ::-1].copy())
    openpose.hand.gaussian_filter = orig
    tensors["pool.image"] = torch.from_numpy(img)
    tensors["pool.heatmaps"] = torch.from_numpy(np.stack(caught[:2]).astype(np.float32))
    meta["pool"] = {"mix": POOL_MIX, "peaks": np.asarray(peaks).tolist()}
    print(f"pool: peaks {np.asarray(peaks).tolist()[:4]}...")


def net_refs(openpose, tensors, meta):
    for name, model, shape in [("hand", openpose.model.handpose_model(), (1, 3, 40, 32)),
                               ("face", openpose.face.FaceNet(), (1, 3, 32, 40))]:
        state = formula_state(model)
        if name == "hand":
            # The file's bare names, which util.transfer maps back, loaded by Hand itself.
            bare = {".".join(k.split(".")[1:]): v for k, v in state.items()}
            path = os.path.join(tempfile.gettempdir(), "openpose_formula_hand.pth")
            torch.save(bare, path)
            est = openpose.Hand(path)
        else:
            bare = state
            path = os.path.join(tempfile.gettempdir(), "openpose_formula_face.pth")
            torch.save(bare, path)
            est = openpose.Face(path)
        os.remove(path)
        x = torch.from_numpy(photo(shape[2], shape[3], 9, 8.0).astype(np.float32) / 256 - 0.5)
        x = x.permute(2, 0, 1)[None].contiguous()
        with torch.no_grad():
            out = est.model(x)
        out = out[-1] if isinstance(out, list) else out
        tensors[f"{name}.input"] = x[0]
        tensors[f"{name}.output"] = out[0].contiguous()
        meta[f"{name}_formula"] = [[k, list(v.shape)] for k, v in bare.items()]
        print(f"net {name}: output {tuple(out.shape)} {out.min():.4f}..{out.max():.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extension", default=os.environ.get("SD_WEBUI_CONTROLNET_DIR"),
                    help="a checkout of sd-webui-controlnet (default: $SD_WEBUI_CONTROLNET_DIR)")
    args = ap.parse_args()
    if not args.extension:
        print("make_openpose_hand_fixtures.py: skipped (needs --extension or SD_WEBUI_CONTROLNET_DIR)")
        return
    assert cv2.__version__ == "4.10.0", cv2.__version__
    torch.set_num_threads(1)
    openpose, _legacy, digests = load(args.extension)
    os.makedirs(OUT, exist_ok=True)
    versions = {"opencv": cv2.__version__, "numpy": np.__version__, "torch": torch.__version__,
                "scipy": importlib.import_module("scipy").__version__,
                "skimage": importlib.import_module("skimage").__version__,
                "matplotlib": importlib.import_module("matplotlib").__version__,
                "extension_sources": {k: f"sha256 {v}" for k, v in digests.items()}}
    for part, make in [("draw", lambda t, m: draw_refs(openpose, t, m)),
                       ("crafted", lambda t, m: crafted_refs(openpose, t, m)),
                       ("net", lambda t, m: net_refs(openpose, t, m))]:
        tensors, meta = {}, dict(versions)
        make(tensors, meta)
        meta["cases"] = []
        save_file(tensors, os.path.join(OUT, f"openpose-hand-{part}.safetensors"))
        with open(os.path.join(OUT, f"openpose-hand-{part}.json"), "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        print(f"wrote openpose-hand-{part}: {len(tensors)} tensors")


if __name__ == "__main__":
    main()
