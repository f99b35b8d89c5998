#!/usr/bin/env python3
"""CPU timings of the sd-webui-controlnet extension's network annotators on torch, as the Rust
bench `crates/pipeline/benches/annotators.rs` measures ours, with the same weights files
(tools/make_random_annotators.py: real widths, random weights), image (its bench_photo.png,
512 x 512) and thread count:
  <module>       the extension's whole legacy preprocessor call at resolution 512 (resize with
                 pad, the detector, the pad removed, HWC3): softedge_hed, softedge_pidinet,
                 lineart_realistic, lineart_coarse, lineart_anime, lineart_anime_denoise,
                 softedge_teed (safe_steps 2), mlsd (thresholds 0.1, 0.1), and
                 depth_anything_v2 (colored=False) with --depth-anything, depth_anything
                 (colored=False) with $DEPTH_ANYTHING_DIR and $DINOV2_DIR, depth_midas,
                 normal_bae, depth_leres
  <module>_net   the network's forward alone (no_grad) on the padded image as the detector
                 feeds it
  openpose_body, openpose_hand, openpose_face
                 the extension's Body, Hand (the image as the hand's crop) and Face (the same)
                 calls on the image, with the peaks (Face.compute_peaks_from_heatmaps), where
                 make_random_annotators.py wrote openpose/; with `_net`, the network alone on
                 the inputs those calls feed it (the hand's: its four scale_search squares,
                 184 to 736 pixels)
Each stage runs once untimed, then `--repeats` times: the median, min, max, the process's median
CPU time (all threads) and peak RSS (the schema of tools/bench_diffusers.py).

    python3 tools/bench_annotators.py --extension EXT --annotators DIR --threads 2 --repeats 3 \
        [--depth-anything DA2] [--modules mlsd,softedge_teed] [--json out.json]
Prints a table on stderr and one JSON object on stdout.
"""
import argparse
import json
import os
import sys

import cv2
import numpy as np
import torch
from safetensors.torch import load_file as load_safetensors

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_diffusers import measure, status_kb  # noqa: E402
from make_random_annotators import build, openpose  # noqa: E402


def load_file(net, path):
    """The file into the extension's class as the extension loads it (the `module.` prefix and
    PiDiNet's checkpoint wrapper dropped), strictly: the weights timed are the file's."""
    if path.endswith(".safetensors"):
        state = load_safetensors(path)
    else:
        state = torch.load(path, map_location="cpu")
    for wrapper in ["state_dict", "model", "depth_model"]:  # PiDiNet's, Bae's, LeReS's
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    net.load_state_dict({k.replace("module.", ""): v for k, v in state.items()}, strict=True)


def openpose_stages(ext, annotators, image, wanted, repeats):
    """The openpose_* stages (see the module's docstring) where their files are."""
    nets, package = openpose(ext)
    stats = []
    for sub, name, detector, _ in nets:
        module = {"body_pose_model.pth": "openpose_body", "hand_pose_model.pth": "openpose_hand",
                  "facenet.pth": "openpose_face"}[name]
        path = os.path.join(annotators, sub, name)
        if (wanted and module not in wanted) or not os.path.exists(path):
            continue
        det = detector(path)
        det.cn_device = "cpu"
        util = package.util
        if module == "openpose_body":
            x = torch.zeros(1, 3, 184, 184)  # 0.5 * 368 / 512 of the image, padded to 8
            run = lambda: det(image.copy())  # noqa: E731
        elif module == "openpose_hand":
            blurred = cv2.GaussianBlur(image, (0, 0), 0.8)
            x = []
            for s in [0.5, 1.0, 1.5, 2.0]:
                padded, _ = util.padRightDownCorner(util.smart_resize(blurred, (s * 368, s * 368)), 8, 128)
                x.append(torch.from_numpy(np.ascontiguousarray(
                    np.float32(padded).transpose(2, 0, 1)[None] / 256 - 0.5)))
            run = lambda: det(image.copy())  # noqa: E731
        else:
            x = torch.zeros(1, 3, 384, 384)
            run = lambda: det.compute_peaks_from_heatmaps(det(image.copy()))  # noqa: E731
        run()
        stats.append(measure(module, repeats, run))

        def forward():
            with torch.no_grad():
                for xi in (x if isinstance(x, list) else [x]):
                    det.model(xi)

        forward()
        stats.append(measure(f"{module}_net", repeats, forward))
    return stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extension", default=os.environ.get("SD_WEBUI_CONTROLNET_DIR"))
    ap.add_argument("--annotators", required=True, help="make_random_annotators.py's folder")
    ap.add_argument("--depth-anything", default=os.environ.get("DEPTH_ANYTHING_V2_DIR"),
                    help="a checkout of (Upgraded-)Depth-Anything-V2 (else depth_anything_v2 "
                         "is left out)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--modules", default="", help="comma-separated; all by default")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not args.extension:
        sys.exit("bench_annotators.py: needs --extension or SD_WEBUI_CONTROLNET_DIR")
    if args.depth_anything:
        os.environ["DEPTH_ANYTHING_V2_DIR"] = args.depth_anything
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    wanted = [m for m in args.modules.split(",") if m]
    bgr = cv2.imread(os.path.join(args.annotators, "bench_photo.png"), cv2.IMREAD_COLOR)
    image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    stats = []
    networks, resize_image_with_pad = build(args.extension)
    for sub, name, net, _, modules, feed in networks:
        for module, run in modules.items():
            if wanted and module not in wanted:
                continue
            load_file(net, os.path.join(args.annotators, sub, name))
            if name != "res101.pth":  # apply_leres never calls eval()
                net.eval()
            run(image.copy(), args.resolution)
            stats.append(measure(module, args.repeats, lambda: run(image.copy(), args.resolution)))
            x = feed(resize_image_with_pad(image, args.resolution)[0])

            def forward():
                with torch.no_grad():
                    net(x)

            forward()
            stats.append(measure(f"{module}_net", args.repeats, forward))
    stats += openpose_stages(args.extension, args.annotators, image, wanted, args.repeats)
    out = {"implementation": "torch", "torch": torch.__version__, "opencv": cv2.__version__,
           "threads": str(args.threads), "annotators": args.annotators,
           "peak_rss_mb": round(status_kb("VmHWM:") / 1024), "stages": stats}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
