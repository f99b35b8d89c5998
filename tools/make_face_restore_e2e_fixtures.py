#!/usr/bin/env python3
"""A1111's whole face restoration on a picture, with the three fixture networks, for
crates/pipeline/src/face_restore/restorer.rs and the server's `restore_faces` and Extras.

The networks are the committed fixtures, loaded as their own tools load them:
  - RetinaFace: crates/pipeline/tests/fixtures/face_detect/retinaface.pth through facexlib's
    `init_detection_model` (tools/make_face_detect_fixtures.py's narrowed construction);
  - ParseNet: crates/pipeline/tests/fixtures/face_paste/parsenet.pth
    (tools/make_face_paste_fixtures.py's `load_parsenet`);
  - CodeFormer: crates/pipeline/tests/fixtures/codeformer/codeformer.pth, spandrel's network
    (tools/make_face_restore_fixtures.py's `narrowed`).
They run in facexlib 0.3.0's `FaceRestoreHelper` built as A1111's `create_face_helper` builds
it, through the steps of A1111's `restore_with_face_helper` (modules/face_restoration_utils.py,
A1111 1.8 to 1.10; followed here line by line, as A1111 itself cannot be imported without its
web UI), with `restore_face` as A1111 1.9+'s CodeFormer calls it: `net(face, weight=w,
adain=True)[0]` (1.8 passed `w=`, which spandrel ignored: every weight ran as 0.5).

Cases, on face_detect's `small.png` (520x400, four faces found; the script checks that
facexlib's affines and crops there are face_detect's fixture's, which the tests restore):
  restore.w<W>   `restore_faces(np_image)` at CodeFormer weight W (0.5: A1111's default
                 `code_former_weight`; 0.25): the whole image after paste-back
  extras         Extras' CodeFormer step (scripts/postprocessing_codeformer.py) with
                 codeformer_visibility 0.6 and codeformer_weight 0.25, no upscaler: its info
                 as A1111's `postprocessing` text (the image is restore.w0_25's,
                 `Image.blend`ed over the input)
Writes crates/pipeline/tests/fixtures/face_restore/: <case>.png (RGB) and face_restore.json.

Usage (the venv of tools/requirements.txt, facexlib==0.3.0 --no-deps):
  python3 tools/make_face_restore_e2e_fixtures.py
"""

import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
FIXTURES = os.path.join(HERE, "..", "crates", "pipeline", "tests", "fixtures")
OUT = os.path.join(FIXTURES, "face_restore")
PICTURE = os.path.join(FIXTURES, "face_detect", "small.png")
WEIGHTS = [(0.5, "0_5"), (0.25, "0_25")]
EXTRAS = {"codeformer_visibility": 0.6, "codeformer_weight": 0.25}


def face_helper():
    """A1111's `create_face_helper(cpu)`, its two facexlib networks the fixtures."""
    import facexlib.detection as detection
    import facexlib.utils.face_restoration_helper as frh
    import make_face_detect_fixtures as det
    import make_face_paste_fixtures as paste

    detection.load_file_from_url = lambda url, **kw: os.path.abspath(
        os.path.join(FIXTURES, "face_detect", "retinaface.pth"))
    frh.init_parsing_model = lambda **kw: paste.load_parsenet(
        os.path.join(FIXTURES, "face_paste", "parsenet.pth"))
    undo = det.narrowed_construction()
    try:
        return frh.FaceRestoreHelper(upscale_factor=1, face_size=512, crop_ratio=(1, 1),
                                     det_model="retinaface_resnet50", save_ext="png",
                                     use_parse=True, device=torch.device("cpu"))
    finally:
        undo()


def codeformer():
    import make_face_restore_fixtures as cf

    net = cf.narrowed()
    state = torch.load(os.path.join(FIXTURES, "codeformer", "codeformer.pth"),
                       map_location="cpu")["params_ema"]
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net.eval()


def restore_with_face_helper(np_image, face_helper, restore_face):
    """A1111's `restore_with_face_helper`, step for step."""
    import cv2
    from torchvision.transforms.functional import normalize

    np_image = np_image[:, :, ::-1]
    original_resolution = np_image.shape[0:2]
    face_helper.clean_all()
    face_helper.read_image(np_image)
    face_helper.get_face_landmarks_5(only_center_face=False, resize=640, eye_dist_threshold=5)
    face_helper.align_warp_face()
    for cropped_face in face_helper.cropped_faces:
        # bgr_image_to_rgb_tensor(cropped_face / 255.0)
        img = (cropped_face / 255.0).astype("float32")
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        t = torch.from_numpy(img.transpose(2, 0, 1)).float()
        normalize(t, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), inplace=True)
        t = t.unsqueeze(0)
        with torch.no_grad():
            t = restore_face(t)
        # rgb_tensor_to_bgr_image(t, min_max=(-1, 1))
        t = t.squeeze(0).float().detach().cpu().clamp_(-1, 1)
        t = (t - -1) / (1 - -1)
        restored = cv2.cvtColor(t.numpy().transpose(1, 2, 0), cv2.COLOR_BGR2RGB)
        restored = (restored * 255.0).astype("uint8")
        face_helper.add_restored_face(restored)
    face_helper.get_inverse_affine(None)
    img = face_helper.paste_faces_to_input_image()
    img = img[:, :, ::-1]
    assert original_resolution == img.shape[0:2]
    faces = [(np.array(m), c[:, :, ::-1]) for m, c in
             zip(face_helper.affine_matrices, face_helper.cropped_faces)]
    face_helper.clean_all()
    return np.ascontiguousarray(img), faces


def main():
    import facexlib
    from PIL import Image

    os.makedirs(OUT, exist_ok=True)
    helper = face_helper()
    net = codeformer()
    picture = np.asarray(Image.open(PICTURE).convert("RGB"))
    cases = {}
    for w, tag in WEIGHTS:
        out, found = restore_with_face_helper(
            picture, helper, lambda t: net(t, weight=w, adain=True)[0])
        faces = len(found)
        assert faces > 1, faces
        # The faces are face_detect's fixture's, which our tests take facexlib's crops from.
        from safetensors.numpy import load_file
        detected = load_file(os.path.join(FIXTURES, "face_detect", "face_detect.safetensors"))
        assert np.array_equal(detected["small.affine"], np.stack([m for m, _ in found]))
        for i, (_, crop) in enumerate(found):
            saved = np.asarray(Image.open(os.path.join(FIXTURES, "face_detect",
                                                       f"small.crop{i}.png")).convert("RGB"))
            assert np.array_equal(saved, crop), i
        Image.fromarray(out).save(os.path.join(OUT, f"restore.w{tag}.png"))
        changed = float((out != picture).any(-1).mean())
        cases[f"restore.w{tag}"] = {"weight": w, "faces": faces, "pixels_changed": changed}
        print(f"restore w={w}: {faces} faces, {changed:.1%} of pixels changed", file=sys.stderr)

    # scripts/postprocessing_codeformer.py: restore, `Image.blend` (below visibility 1) and
    # its info; the blend is Pillow's, which crates/pipeline's upscale::blend is held to.
    vis, w = EXTRAS["codeformer_visibility"], EXTRAS["codeformer_weight"]
    info = {"CodeFormer visibility": round(vis, 3), "CodeFormer weight": round(w, 3)}
    # A1111's postprocessing text: `k: v` joined by ", " (infotext_utils.quote leaves these).
    text = ", ".join(f"{k}: {v}" for k, v in info.items())
    cases["extras"] = {"fields": EXTRAS, "postprocessing": text,
                       "html_info": f"<p>{text}</p>"}

    meta = {
        "source": "A1111 restore_with_face_helper (face_restoration_utils.py) on facexlib "
                  "0.3.0's FaceRestoreHelper with the face_detect, face_paste and codeformer "
                  "fixtures; CodeFormer called with weight= (A1111 1.9+)",
        "versions": {"torch": torch.__version__,
                     "facexlib": getattr(facexlib, "__version__", "0.3.0")},
        "picture": "face_detect/small.png",
        "cases": cases,
    }
    with open(os.path.join(OUT, "face_restore.json"), "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
