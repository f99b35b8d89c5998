#!/usr/bin/env python3
"""OpenCV's INTER_AREA resize where one side grows and the other shrinks (and the neighbouring
cases), as the sd-webui-controlnet extension's `clip` preprocessor stretches an IP-Adapter
image to the encoder's square (`cv2.resize(img, (S, S), interpolation=cv2.INTER_AREA)`).

OpenCV takes its area table only when neither side grows; otherwise both axes take the
`area_mode` bilinear weights, the shrinking one too. The pipeline's
`controlnet::preprocess::resize_area_any` follows that; these cases hold it to OpenCV.

Writes crates/pipeline/tests/fixtures/area-resize.{safetensors,json}:
  resize.<k>: [h, w, 3] u8 = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
  json: {"cases": [{"key", "image", "width", "height"}]}

Pinned: opencv-python-headless (tools/requirements.txt), numpy, Pillow, safetensors.
Usage: python3 tools/make_area_resize_fixtures.py
"""

import json
import os

import cv2
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "crates", "pipeline", "tests", "fixtures")

# (image, width, height): 96x72 and 50x70 stretched one way and shrunk the other, at whole and
# fractional ratios; one side kept while the other grows or shrinks; both growing to ViT-H's 224.
CASES = [
    ("ip-prompt-96x72.png", 120, 40),
    ("ip-prompt-96x72.png", 50, 100),
    ("ip-prompt-96x72.png", 192, 36),
    ("ip-prompt-96x72.png", 96, 50),
    ("ip-prompt-96x72.png", 96, 90),
    ("ip-prompt-b-50x70.png", 77, 33),
    ("ip-prompt-b-50x70.png", 31, 90),
    ("ip-prompt-b-50x70.png", 224, 224),
    ("ip-prompt-b-50x70.png", 49, 71),
]


def main():
    tensors, meta = {}, []
    for k, (name, w, h) in enumerate(CASES):
        image = np.array(Image.open(os.path.join(FIXTURES, "images", name)).convert("RGB"))
        out = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        assert out.shape == (h, w, 3), out.shape
        key = f"resize.{k}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(out))
        meta.append({"key": key, "image": name, "width": w, "height": h})
    save_file(tensors, os.path.join(FIXTURES, "area-resize.safetensors"))
    with open(os.path.join(FIXTURES, "area-resize.json"), "w") as f:
        json.dump({"opencv": cv2.__version__, "cases": meta}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
