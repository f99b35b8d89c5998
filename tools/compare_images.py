#!/usr/bin/env python3
"""Pixel differences between two folders of PNGs with the same names (e.g. `sdserve bench
--png-dir ours` and `tools/bench_diffusers_gpu.py --png-dir ref`): per image the mean absolute
difference (of 255), the largest, and the fraction of channel values off by more than 8.

    python3 tools/compare_images.py REF_DIR OURS_DIR [--label f16-vs-diffusers-fp16]

Prints one JSON object: {label, images: [{name, mean_abs, max_abs, frac_over_8}], worst: {...}}.
"""

import argparse
import json
import os
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ref")
    ap.add_argument("ours")
    ap.add_argument("--label", default="")
    args = ap.parse_args()

    import numpy as np
    from PIL import Image

    names = sorted(n for n in os.listdir(args.ref) if n.endswith(".png"))
    images = []
    for n in names:
        p = os.path.join(args.ours, n)
        if not os.path.exists(p):
            print(f"missing in {args.ours}: {n}", file=sys.stderr)
            continue
        a = np.asarray(Image.open(os.path.join(args.ref, n)).convert("RGB"), dtype=np.int16)
        b = np.asarray(Image.open(p).convert("RGB"), dtype=np.int16)
        if a.shape != b.shape:
            print(f"{n}: shapes differ {a.shape} vs {b.shape}", file=sys.stderr)
            continue
        d = np.abs(a - b)
        images.append({
            "name": n,
            "mean_abs": round(float(d.mean()), 4),
            "max_abs": int(d.max()),
            "frac_over_8": round(float((d > 8).mean()), 6),
        })
    worst = {
        "mean_abs": max((i["mean_abs"] for i in images), default=None),
        "max_abs": max((i["max_abs"] for i in images), default=None),
        "frac_over_8": max((i["frac_over_8"] for i in images), default=None),
    }
    print(json.dumps({"label": args.label, "images": images, "worst": worst}, indent=1))


if __name__ == "__main__":
    main()
