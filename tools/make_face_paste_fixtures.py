#!/usr/bin/env python3
"""Reference fixtures for face restoration's paste-back (crates/pipeline/src/face_restore/
parsenet.rs, paste.rs): facexlib 0.3.0's own `FaceRestoreHelper.get_inverse_affine` and
`paste_faces_to_input_image` (use_parse=True, upscale_factor 1: A1111's helper) run on
chosen affines and synthetic "restored" faces, every cv2 call and the ParseNet recorded.

The ParseNet is facexlib's own class, built as `init_parsing_model('parsenet')` builds it
(in_size 512, out_size 512, 19 classes) but narrowed through its own constructor arguments
(base_ch 8, ch_range [8, 32] where the release has 64 and [32, 256]; res_depth stays 10):
the same blocks in the same order, 0.34M parameters in place of 21.3M (43 MB even in f16).
The weights are random (seeded) and rounded to f16 (0.7 MB), saved as the real
`parsing_parsenet.pth` is: a bare state dict with the same names (num_batches_tracked too),
and loaded back with `load_state_dict(strict=True)` as facexlib loads it.

Random weights make one class win every pixel: the mask would be all 0 or all 255 and the
blur would test nothing. So the final layer's bias (out_mask_conv.conv2d.bias) is set so
each class's mean logit over the first face is 0: the argmax then follows the logits'
variation and several classes (of both mask colours) win regions; the script checks it.

facexlib builds its detector and parser in `FaceRestoreHelper.__init__` (downloading
weights); here `init_detection_model` is replaced by None (no detection runs) and
`init_parsing_model` by the narrowed net loaded from the fixture file; the constructor
runs with A1111's arguments (`create_face_helper`). The helper's `cv2` is wrapped to record
each call's result (GaussianBlur, warpAffine, resize), its `face_parse` to record the
logits. A1111's `restore_with_face_helper` flips the RGB image to BGR before and back
after; the restored faces are BGR (`rgb_tensor_to_bgr_image`): done the same here.

Writes crates/pipeline/tests/fixtures/face_paste/: parsenet.pth, per case <case>.png (the
RGB input), <case>.face<i>.png (the RGB restored faces), <case>.out.png (A1111's RGB
result), <case>.inv_restored<i>.png (cv2.warpAffine of each face), <case>.argmax<i>.png
(the parse classes, gray), face_paste.safetensors (strided logits, masks before and after
each blur, the inverse-warped masks, getGaussianKernel) and face_paste.json (affines,
inverse affines, strides, a small warpAffine case, the measured margins).

Rerun: /tmp/venv-ref/bin/python tools/make_face_paste_fixtures.py
"""

import json
import os
import sys

import cv2
import numpy as np
import torch

SEED = 20261208
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "pipeline",
                   "tests", "fixtures", "face_paste")
NARROW = {"base_ch": 8, "ch_range": [8, 32]}
LOGIT_STRIDE = 16
MASK_STRIDE = 4
BLUR1_STRIDE = 8
# The logits' spread the final layer is scaled to (see the module doc).
LOGIT_STD = 8.0
INV_MASK_STRIDE = 2


def similarity(scale, angle, center):
    """The forward affine (image -> 512 crop) as estimateAffinePartial2D gives it: a rotation
    by `angle` and a scale, taking the image point `center` to the crop's centre."""
    a, b = scale * np.cos(angle), scale * np.sin(angle)
    cx, cy = center
    return np.array([[a, -b, 256 - (a * cx - b * cy)],
                     [b, a, 256 - (b * cx + a * cy)]], dtype=np.float64)


# (name, (width, height), [(scale, angle, centre)]): sizes not multiples of 64, not square;
# "edge" puts its face over the image's top-right corner (the warps' border paths), "two"
# overlaps two faces (the second pasted over the first).
CASES = [
    ("edge", (300, 236), [(512 / 150.0, 0.27, (251.3, 58.6))]),
    ("two", (332, 250), [(512 / 170.0, 0.21, (128.4, 121.7)),
                         (512 / 140.0, -0.35, (212.9, 139.2))]),
]


def background(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([30 + x * 0.5, 90 + y * 0.4, 200 - (x + y) * 0.2], -1)
    img += 20 * np.sin(x / 9)[..., None] * np.cos(y / 13)[..., None]
    img += rng.normal(0, 2, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def face(seed, tint):
    """512x512 RGB: a gradient, a skin ellipse with eyes and a mouth, a ripple."""
    y, x = np.mgrid[0:512, 0:512].astype(np.float64)
    img = np.stack([40 + x * 0.2, 60 + y * 0.25, 120 + (x + y) * 0.1], -1)

    def ellipse(cy, cx, ry, rx):
        return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1

    img[ellipse(260, 256, 190, 150)] = tint
    for cx in (196, 316):
        img[ellipse(220, cx, 18, 34)] = [250, 250, 245]
        img[ellipse(220, cx, 12, 12)] = [60, 40, 30]
    img[ellipse(350, 256, 22, 70)] = [170, 70, 80]
    img += 10 * np.sin(x / (5 + seed))[..., None] * np.cos(y / 11)[..., None]
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def narrowed_parsenet():
    from facexlib.parsing.parsenet import ParseNet

    # init_parsing_model('parsenet')'s arguments, narrowed as the module doc says.
    return ParseNet(in_size=512, out_size=512, parsing_ch=19, **NARROW)


def randomise(net, generator):
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=generator))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=generator))
            elif name.endswith("num_batches_tracked"):
                b.fill_(1000)


def parse_input(bgr):
    """paste_faces_to_input_image's ParseNet input (the resize to 512 is a copy here)."""
    from facexlib.utils.misc import img2tensor
    from torchvision.transforms.functional import normalize

    t = img2tensor(bgr.astype("float32") / 255., bgr2rgb=True, float32=True)
    normalize(t, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), inplace=True)
    return t.unsqueeze(0)


def build_weights(path, first_face_bgr):
    torch.manual_seed(SEED)
    net = narrowed_parsenet().eval()
    randomise(net, torch.Generator().manual_seed(SEED + 1))
    with torch.no_grad():
        net.out_mask_conv.conv2d.bias.zero_()
        conv = net.out_mask_conv.conv2d
        logits = net(parse_input(first_face_bgr))[0]
        conv.weight.mul_(LOGIT_STD / float(logits.std()))
        conv.bias.copy_(-net(parse_input(first_face_bgr))[0].mean(dim=(0, 2, 3)))
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    torch.save(state, path)


def load_parsenet(path):
    """init_parsing_model('parsenet') on the fixture file: torch.load, strict load, eval."""
    net = narrowed_parsenet()
    load_net = torch.load(path, map_location=lambda storage, loc: storage)
    net.load_state_dict(load_net, strict=True)
    return net.eval()


class Recorder:
    """facexlib's `cv2` with each GaussianBlur, warpAffine and resize result kept."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        fn = getattr(cv2, name)
        if name not in ("GaussianBlur", "warpAffine", "resize"):
            return fn

        def recorded(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.calls.append((name, args, kwargs, out.copy()))
            return out

        return recorded


def small_warp_case(tensors):
    """A 7x5 3-channel image through a rotation and scale into 6x6: every border path. The
    float64 values and the matrix go in the tensors too, bit for bit."""
    rng = np.random.default_rng(SEED + 7)
    src = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    m = similarity(1.3, 0.4, (3.2, 2.1)) - np.array([[0, 0, 253], [0, 0, 253.5]])
    out = cv2.warpAffine(src, m, (6, 6))
    f = src[:, :, 0].astype(np.float64) / 255
    out_f = cv2.warpAffine(f, m, (6, 6), flags=3)
    tensors["small_warp.affine"] = torch.from_numpy(m.copy())
    tensors["small_warp.src_f64"] = torch.from_numpy(f.copy())
    tensors["small_warp.out_f64"] = torch.from_numpy(out_f.copy())
    return {"src": src.reshape(-1).tolist(), "src_shape": [5, 7, 3], "affine": m.tolist(),
            "dsize": [6, 6], "out": out.reshape(-1).tolist()}


def _border(a, thres=10):
    """paste_faces_to_input_image's "remove the black borders": the outer 10 pixels."""
    b = np.zeros(a.shape, dtype=bool)
    b[:thres, :] = b[-thres:, :] = b[:, :thres] = b[:, -thres:] = True
    return b


def run_case(name, size, faces, net, tensors, pngs):
    import facexlib.utils.face_restoration_helper as frh

    w, h = size
    rgb = background(w, h, SEED + len(name))
    restored_rgb = [face(i + len(name), tint) for i, tint in
                    zip(range(len(faces)), ([224, 180, 150], [190, 140, 110]))]
    affines = [similarity(*f) for f in faces]

    recorder = Recorder()
    frh.cv2 = recorder
    frh.init_detection_model = lambda *a, **k: None
    frh.init_parsing_model = lambda *a, **k: net
    logits = []

    def face_parse(x):
        out = net(x)
        logits.append(out[0].detach().clone())
        return out

    # A1111's create_face_helper.
    helper = frh.FaceRestoreHelper(upscale_factor=1, face_size=512, crop_ratio=(1, 1),
                                   det_model='retinaface_resnet50', save_ext='png',
                                   use_parse=True, device=torch.device("cpu"))
    helper.face_parse = face_parse
    # restore_with_face_helper: RGB -> BGR, read_image; the detector's and aligner's work is
    # the affines set directly; the restored faces are BGR.
    helper.clean_all()
    helper.read_image(rgb[:, :, ::-1])
    helper.affine_matrices = [m.copy() for m in affines]
    for f in restored_rgb:
        helper.add_restored_face(np.ascontiguousarray(f[:, :, ::-1]))
    helper.get_inverse_affine(None)
    inverse = [m.copy() for m in helper.inverse_affine_matrices]
    with torch.no_grad():
        img = helper.paste_faces_to_input_image()
    out_rgb = img[:, :, ::-1]
    assert out_rgb.shape[:2] == (h, w) and out_rgb.dtype == np.uint8

    pngs[f"{name}.png"] = rgb
    pngs[f"{name}.out.png"] = out_rgb
    # Per face: resize (the background, once), warpAffine (face), resize (to 512),
    # GaussianBlur twice, resize (the mask), warpAffine (the mask).
    calls = recorder.calls
    assert calls[0][0] == "resize" and np.array_equal(calls[0][3], rgb[:, :, ::-1]), \
        "the same-size LANCZOS4 resize is a copy"
    per_face = 6
    assert len(calls) == 1 + per_face * len(faces), [c[0] for c in calls]
    margins = []
    for i in range(len(faces)):
        c = calls[1 + per_face * i: 1 + per_face * (i + 1)]
        assert [x[0] for x in c] == ["warpAffine", "resize", "GaussianBlur", "GaussianBlur",
                                     "resize", "warpAffine"], [x[0] for x in c]
        inv_restored, parse_resized, blur1, blur2, mask_resized, inv_mask = (
            c[0][3], c[1][3], c[2][3], c[3][3], c[4][3], c[5][3])
        assert np.array_equal(parse_resized, restored_rgb[i][:, :, ::-1])
        assert c[5][2].get("flags") == 3
        # warpAffine's INTER_AREA runs as INTER_LINEAR.
        assert np.array_equal(inv_mask, cv2.warpAffine(mask_resized, inverse[i], (w, h),
                                                       flags=cv2.INTER_LINEAR))
        assert blur1.dtype == np.float64 and inv_mask.dtype == np.float64
        cls = logits[i].argmax(dim=1).squeeze().numpy()
        colormap = np.array([0, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255,
                             255, 0, 255, 0, 0, 0], dtype=np.float64)
        mask = colormap[cls]
        share = float((mask == 255).mean())
        assert 0.1 < share < 0.9, f"{name} face {i}: {share} of the mask is 255"
        classes = int(len(np.unique(cls)))
        assert classes >= 4, classes
        top2 = torch.topk(logits[i][0], 2, dim=0).values
        margin = (top2[0] - top2[1]).numpy()
        margins.append({"min_top2_margin": float(margin.min()),
                        "pixels_under_1e-4": int((margin < 1e-4).sum()),
                        "pixels_under_1e-3": int((margin < 1e-3).sum()),
                        "mask_255_share": share, "classes": classes})
        # The matrices bit for bit (a JSON reader may round a float's last bit).
        tensors[f"{name}.affine{i}"] = torch.from_numpy(affines[i].copy())
        tensors[f"{name}.inverse_affine{i}"] = torch.from_numpy(inverse[i].copy())
        pngs[f"{name}.face{i}.png"] = restored_rgb[i]
        pngs[f"{name}.inv_restored{i}.png"] = inv_restored[:, :, ::-1]
        pngs[f"{name}.argmax{i}.png"] = cls.astype(np.uint8)
        s = LOGIT_STRIDE
        tensors[f"{name}.logits{i}"] = logits[i][:, :, ::s, ::s].contiguous()
        # Kept in f32 (the float64 values to 6e-8 relative), strided: a few MB otherwise.
        assert np.array_equal(mask_resized, np.where(_border(blur2), 0, blur2) / 255.)
        for key, values, stride in [("blur1_", blur1, BLUR1_STRIDE),
                                    ("mask", mask_resized, MASK_STRIDE),
                                    ("inv_mask", inv_mask, INV_MASK_STRIDE)]:
            tensors[f"{name}.{key}{i}"] = torch.from_numpy(
                np.ascontiguousarray(values[::stride, ::stride]).astype(np.float32))
    return {"name": name, "size": [w, h], "affines": [m.tolist() for m in affines],
            "inverse_affines": [m.tolist() for m in inverse], "faces": len(faces),
            "parse": margins,
            "changed_share": float((out_rgb != rgb).any(-1).mean())}


def main():
    from PIL import Image
    from safetensors.torch import save_file

    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "parsenet.pth")
    first = CASES[0]
    build_weights(path, np.ascontiguousarray(face(len(first[0]), [224, 180, 150])[:, :, ::-1]))
    net = load_parsenet(path)
    tensors = {"gaussian_kernel_101_11": torch.from_numpy(
        cv2.getGaussianKernel(101, 11, cv2.CV_64F).reshape(-1).copy())}
    pngs = {}
    cases = [run_case(n, s, f, net, tensors, pngs) for n, s, f in CASES]
    small_warp = small_warp_case(tensors)
    for k, v in pngs.items():
        Image.fromarray(np.ascontiguousarray(v)).save(os.path.join(OUT, k), optimize=True)
    save_file(tensors, os.path.join(OUT, "face_paste.safetensors"))
    import facexlib
    meta = {
        "source": "facexlib 0.3.0 FaceRestoreHelper.get_inverse_affine and "
                  "paste_faces_to_input_image (use_parse=True, upscale_factor=1), "
                  "ParseNet narrowed (see the tool's doc)",
        "versions": {"torch": torch.__version__, "cv2": cv2.__version__,
                     "facexlib": getattr(facexlib, "__version__", "0.3.0"),
                     "numpy": np.__version__},
        "seed": SEED,
        "narrow": NARROW,
        "classes": net.out_mask_conv.conv2d.out_channels,
        "depths": [len(net.encoder) - 1, len(net.body), len(net.decoder)],
        "logit_stride": LOGIT_STRIDE,
        "mask_stride": MASK_STRIDE,
        "blur1_stride": BLUR1_STRIDE,
        "logit_std": LOGIT_STD,
        "inv_mask_stride": INV_MASK_STRIDE,
        "cases": cases,
        "small_warp": small_warp,
    }
    with open(os.path.join(OUT, "face_paste.json"), "w") as f:
        json.dump(meta, f, indent=1)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {OUT}: {total / 1e6:.2f} MB; " +
          "; ".join(f"{c['name']}: {c['parse']}, changed {c['changed_share']:.3f}"
                    for c in cases), file=sys.stderr)


if __name__ == "__main__":
    main()
