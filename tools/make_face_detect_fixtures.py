#!/usr/bin/env python3
"""A small random RetinaFace and facexlib's detections and aligned crops with it, for
crates/pipeline/src/face_restore (detection and alignment, as A1111 runs them).

The network is facexlib 0.3.0's own `RetinaFace(network_name='resnet50', half=False)`, loaded by
facexlib's own `init_detection_model` (the `module.` strip, `load_state_dict(strict=True)`), run
by facexlib's own `FaceRestoreHelper` exactly as A1111's `restore_with_face_helper` calls it:
`FaceRestoreHelper(upscale_factor=1, face_size=512, crop_ratio=(1, 1),
det_model='retinaface_resnet50', save_ext='png', use_parse=True)`, then on the image as BGR
`clean_all(); read_image(bgr); get_face_landmarks_5(only_center_face=False, resize=640,
eye_dist_threshold=5); align_warp_face()`. Nothing is downloaded: facexlib's
`load_file_from_url` is patched to return the fixture's path, and the ParseNet that
`use_parse=True` builds is a random one made in memory (its mask is another fixture's).

Size. facexlib builds the body with torchvision's `resnet50()` (conv1 64 wide, bottleneck planes
64/128/256/512, 3/4/6/3 blocks, outputs 256/512/1024/2048) and FPN/SSH at 256 channels: 27M
parameters, 54 MB even in f16. So that the fixture stays small, while the construction is
torchvision's and facexlib's, two things are narrowed here:
- torchvision's `ResNet._make_layer` is wrapped to build each stage with `planes // NARROW`
  (the block counts 3/4/6/3, the stem and every forward stay torchvision's);
- facexlib's `generate_config('resnet50')` gives `in_channel` 256 // NARROW (the FPN's inputs are
  2x/4x/8x that: the stages' outputs) and `out_channel` OUT_CHANNEL. OUT_CHANNEL stays above 64,
  as the real 256 is: facexlib's FPN and SSH use LeakyReLU(0.1) only when out_channel <= 64,
  plain ReLU otherwise, and the fixture keeps the real one.
Our loader reads every width and block count from the weights, so the narrowed file runs the
same code as the real one.

Weights: torch's default initialisation, seeded, then every BatchNorm's weight, bias, running
mean and variance given random values (defaults of 1 and 0 would hide a swapped or skipped
one), rounded to f16 and saved as facexlib's release file is loaded (a plain state dict, every
key under `module.`: facexlib strips that prefix from each key, "remove unnecessary
'module.'"; the fixture has it so that the strip is exercised).

Detections. A random network gives scores near 0.5 everywhere; facexlib keeps scores above 0.97.
The class heads (one conv per FPN level, per anchor the logits [background, face]) are
rescaled so that a handful of anchors clear it: the face logit's weights are scaled by
CLASS_GAIN and its bias set, per level, so that on the first picture the level's
DETECTIONS_PER_LEVEL[level] highest anchors clear 0.97 (then the other pictures get what they
get). Level 0 (stride 8, 16/32 px priors) gives small faces (eye distances near facexlib's
5 px threshold, some dropped), level 2 (stride 32, 256/512 px priors) large ones; neighbouring
anchors of one place overlap and NMS drops them. The script checks that no kept anchor's
score lies within SCORE_MARGIN of 0.97, no IoU that NMS compares within IOU_MARGIN of 0.4,
and no eye distance within EYE_MARGIN of 5, so that float noise cannot flip a decision, and
records the margins.

Writes crates/pipeline/tests/fixtures/face_detect/:
  retinaface.pth          the weights (f16, `module.` keys)
  <name>.png              each picture (RGB)
  <name>.crop<i>.png      facexlib's aligned 512x512 crops (RGB; cropped_faces are BGR)
  face_detect.safetensors per picture: <name>.raw.index / .loc / .conf / .landm (the
                          network's outputs at the TOP anchors of the highest face score,
                          on the resized picture: for debugging the network alone),
                          <name>.detections (detect_faces' rows before the eye-distance
                          filter, times facexlib's scale, float64: box, score, 5 landmarks),
                          <name>.det_faces, <name>.landmarks, <name>.affine (the kept faces:
                          facexlib's det_faces rows (the score there is times the scale
                          too), all_landmarks_5, affine_matrices)
  face_detect.json        sizes, versions, counts, margins

Usage (the venv of tools/requirements.txt, with facexlib==0.3.0 installed --no-deps):
  python3 tools/make_face_detect_fixtures.py
"""

import json
import os
import sys

import numpy as np
import torch

OUT = os.path.join("crates", "pipeline", "tests", "fixtures", "face_detect")
SEED = int(os.environ.get("FACE_DETECT_SEED", "4"))
NARROW = 8
OUT_CHANNEL = 96
CLASS_GAIN = 4.0
BOX_GAIN = 0.3
LANDMARK_GAIN = 0.5
DETECTIONS_PER_LEVEL = [5, 3, 2]
THRESHOLD = 0.97
SCORE_MARGIN = 3e-4
IOU_MARGIN = 1e-3
EYE_MARGIN = 1e-2
TOP = 40
# (name, width, height): short side above 640 (shrunk to it), below (enlarged), equal (kept).
PICTURES = [("wide", 800, 660), ("small", 520, 400), ("tall", 640, 720)]


def narrowed_construction():
    """Patches torchvision's stages and facexlib's config; returns the undo."""
    import torchvision.models.resnet as resnet
    import facexlib.detection.retinaface as rf

    make_layer = resnet.ResNet._make_layer
    generate_config = rf.generate_config

    def narrow_layer(self, block, planes, blocks, stride=1, dilate=False):
        return make_layer(self, block, planes // NARROW, blocks, stride, dilate)

    def config(network_name):
        cfg = dict(generate_config(network_name))
        cfg["in_channel"] = 256 // NARROW
        cfg["out_channel"] = OUT_CHANNEL
        return cfg

    resnet.ResNet._make_layer = narrow_layer
    rf.generate_config = config

    def undo():
        resnet.ResNet._make_layer = make_layer
        rf.generate_config = generate_config

    return undo


def randomise(net, generator):
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=generator))
                m.bias.copy_(0.1 * torch.randn(n, generator=generator))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                m.running_var.copy_(1 + 0.5 * torch.rand(n, generator=generator))
            elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))


def picture(w, h, seed):
    """RGB uint8: a smooth background and a few face-like ellipses (eyes, mouth)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([60 + x * 120 / w, 90 + y * 100 / h, 150 - (x + y) * 60 / (w + h)], -1)

    def ellipse(cy, cx, ry, rx):
        return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1

    for _ in range(4):
        r = rng.uniform(0.08, 0.3) * min(w, h)
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        img[ellipse(cy, cx, 1.25 * r, r)] = rng.uniform(150, 235, 3)
        for side in (-1, 1):
            img[ellipse(cy - 0.25 * r, cx + side * 0.4 * r, 0.12 * r, 0.2 * r)] = [245, 245, 240]
            img[ellipse(cy - 0.25 * r, cx + side * 0.4 * r, 0.08 * r, 0.08 * r)] = [50, 35, 30]
        img[ellipse(cy + 0.5 * r, cx, 0.12 * r, 0.4 * r)] = [170, 70, 80]
    img += 6 * np.sin(x / 9)[..., None] * np.cos(y / 13)[..., None]
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def network_outputs(net, bgr):
    """facexlib's detect_faces on `bgr` (already resized) up to the softmax."""
    x = torch.from_numpy(bgr.astype(np.float32).transpose(2, 0, 1)).unsqueeze(0)
    x = x - net.mean_tensor
    with torch.no_grad():
        return net(x)


def face_logits_by_level(net, bgr):
    """The face-minus-background logit of every anchor, per FPN level."""
    x = torch.from_numpy(bgr.astype(np.float32).transpose(2, 0, 1)).unsqueeze(0)
    x = x - net.mean_tensor
    with torch.no_grad():
        out = list(net.body(x).values())
        fpn = net.fpn(out)
        feats = [net.ssh1(fpn[0]), net.ssh2(fpn[1]), net.ssh3(fpn[2])]
        return [net.ClassHead[i](f)[0] for i, f in enumerate(feats)]


def resized(bgr):
    """get_face_landmarks_5's resize=640: the input facexlib's detector sees."""
    import cv2

    h, w = bgr.shape[0:2]
    scale = min(h, w) / 640
    h, w = int(h / scale), int(w / scale)
    return cv2.resize(bgr, (w, h), interpolation=cv2.INTER_LANCZOS4)


def tune_heads(net, pictures):
    """The heads rescaled (see the module's doc): box and landmark regressions by BOX_GAIN and
    LANDMARK_GAIN, the face logit by CLASS_GAIN with a bias per level."""
    logit_at = np.log(THRESHOLD / (1 - THRESHOLD))
    with torch.no_grad():
        for heads, gain in [(net.BboxHead, BOX_GAIN), (net.LandmarkHead, LANDMARK_GAIN)]:
            for head in heads:
                head.conv1x1.weight *= gain
                head.conv1x1.bias *= gain
        for head in net.ClassHead:
            w, b = head.conv1x1.weight, head.conv1x1.bias
            w[1::2] *= CLASS_GAIN
            b.zero_()
        per_picture = [face_logits_by_level(net, resized(bgr)) for bgr in pictures]
        for i, head in enumerate(net.ClassHead):
            # Each picture gets at most the level's count: the threshold lands halfway between
            # some picture's n-th and (n+1)-th anchor, the highest such place.
            n = DETECTIONS_PER_LEVEL[i]
            mids = []
            for p in per_picture:
                diff = (p[i][:, 1] - p[i][:, 0]).sort(descending=True).values
                mids.append(float(diff[n - 1] + diff[n]) / 2)
            mid = max(mids)
            head.conv1x1.bias[1::2] += logit_at - mid


def main():
    import cv2
    import facexlib
    import facexlib.detection as detection
    import torchvision
    import facexlib.utils.face_restoration_helper as frh
    from facexlib.detection.retinaface import RetinaFace
    from facexlib.detection.retinaface_utils import PriorBox
    from facexlib.parsing.parsenet import ParseNet
    from PIL import Image
    from safetensors.torch import save_file

    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        os.remove(os.path.join(OUT, f))
    pictures = [(n, picture(w, h, SEED + i)) for i, (n, w, h) in enumerate(PICTURES)]

    undo = narrowed_construction()
    try:
        torch.manual_seed(SEED)
        net = RetinaFace(network_name="resnet50", half=False, device="cpu")
        randomise(net, torch.Generator().manual_seed(SEED + 1))
        tune_heads(net, [rgb[:, :, ::-1] for _, rgb in pictures])
        state = {"module." + k: v.half() if v.is_floating_point() else v
                 for k, v in net.state_dict().items()}
        path = os.path.join(OUT, "retinaface.pth")
        torch.save(state, path)

        # facexlib's own loading of that file, through A1111's helper construction.
        detection.load_file_from_url = lambda url, **kw: os.path.abspath(path)
        frh.init_parsing_model = lambda **kw: ParseNet(in_size=512, out_size=512,
                                                        parsing_ch=19).eval()
        helper = frh.FaceRestoreHelper(upscale_factor=1, face_size=512, crop_ratio=(1, 1),
                                       det_model="retinaface_resnet50", save_ext="png",
                                       use_parse=True, device=torch.device("cpu"))
    finally:
        undo()
    det = helper.face_det
    n_params = sum(p.numel() for p in det.parameters())

    tensors, cases = {}, []
    margins = {"score": 1.0, "iou": 1.0, "eye": 1e9}
    for name, rgb in pictures:
        Image.fromarray(rgb).save(os.path.join(OUT, f"{name}.png"))
        # A1111's restore_with_face_helper: the RGB array reversed to BGR, then facexlib.
        bgr = rgb[:, :, ::-1]
        helper.clean_all()
        helper.read_image(bgr)
        helper.get_face_landmarks_5(only_center_face=False, resize=640, eye_dist_threshold=5)
        helper.align_warp_face()

        # The same steps again, kept apart, for what the helper does not keep.
        small = resized(bgr)
        h, w = bgr.shape[0:2]
        scale = min(h, w) / 640
        with torch.no_grad():
            rows = det.detect_faces(small, THRESHOLD) * scale
        loc, conf, landm = network_outputs(det, small)
        scores = conf[0, :, 1]
        top = scores.argsort(descending=True)[:TOP]
        tensors[f"{name}.raw.index"] = top.to(torch.int64)
        tensors[f"{name}.raw.loc"] = loc[0, top].contiguous()
        tensors[f"{name}.raw.conf"] = conf[0, top].contiguous()
        tensors[f"{name}.raw.landm"] = landm[0, top].contiguous()
        tensors[f"{name}.detections"] = torch.from_numpy(np.ascontiguousarray(rows))
        det_faces = np.array(helper.det_faces, dtype=np.float64).reshape(-1, 5)
        tensors[f"{name}.det_faces"] = torch.from_numpy(det_faces)
        tensors[f"{name}.landmarks"] = torch.from_numpy(
            np.array(helper.all_landmarks_5, dtype=np.float64).reshape(-1, 5, 2))
        tensors[f"{name}.affine"] = torch.from_numpy(
            np.array(helper.affine_matrices, dtype=np.float64).reshape(-1, 2, 3))
        for i, crop in enumerate(helper.cropped_faces):
            Image.fromarray(np.ascontiguousarray(crop[:, :, ::-1])).save(
                os.path.join(OUT, f"{name}.crop{i}.png"))

        # Margins of the decisions float noise could flip.
        margins["score"] = min(margins["score"], float((scores - THRESHOLD).abs().min()))
        kept = scores > THRESHOLD
        if kept.sum() > 1:
            from facexlib.detection.retinaface_utils import decode
            priors = PriorBox(det.cfg, image_size=small.shape[0:2]).forward()
            boxes = decode(loc[0], priors, det.cfg["variance"])[kept]
            iou = torchvision.ops.box_iou(boxes, boxes)
            iou = iou[~torch.eye(len(boxes), dtype=torch.bool)]
            margins["iou"] = min(margins["iou"], float((iou - 0.4).abs().min()))
        eye = np.hypot(rows[:, 5] - rows[:, 7], rows[:, 6] - rows[:, 8])
        if len(eye):
            margins["eye"] = min(margins["eye"], float(np.abs(eye - 5).min()))
        cases.append({"name": name, "width": int(w), "height": int(h),
                      "resized": [int(small.shape[1]), int(small.shape[0])],
                      "scale": scale, "anchors_over_threshold": int(kept.sum()),
                      "after_nms": int(len(rows)), "kept": int(len(helper.det_faces)),
                      "eye_distances": [float(e) for e in eye]})
        print(f"{name} {w}x{h} -> {small.shape[1]}x{small.shape[0]}: {int(kept.sum())} "
              f"anchors over {THRESHOLD}, {len(rows)} after NMS, {len(helper.det_faces)} "
              f"kept; eye distances {np.round(eye, 2).tolist()}", file=sys.stderr)

    save_file(tensors, os.path.join(OUT, "face_detect.safetensors"))
    meta = {
        "source": "facexlib 0.3.0 RetinaFace(resnet50) and FaceRestoreHelper as A1111 calls "
                  "them; body and FPN/SSH narrowed (see the tool's doc)",
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "opencv": cv2.__version__,
                     "facexlib": getattr(facexlib, "__version__", "0.3.0")},
        "seed": SEED, "narrow": NARROW, "out_channel": OUT_CHANNEL, "class_gain": CLASS_GAIN,
        "parameters": n_params, "threshold": THRESHOLD, "top": TOP,
        "margins": margins, "cases": cases,
    }
    with open(os.path.join(OUT, "face_detect.json"), "w") as f:
        json.dump(meta, f, indent=1)
    bad = [k for k, m in [("score", SCORE_MARGIN), ("iou", IOU_MARGIN), ("eye", EYE_MARGIN)]
           if margins[k] < m]
    print(f"wrote {OUT}: {n_params} parameters, weights "
          f"{os.path.getsize(path) / 1e6:.2f} MB; margins {margins}", file=sys.stderr)
    if bad:
        sys.exit(f"margins too small: {bad}")


if __name__ == "__main__":
    main()
