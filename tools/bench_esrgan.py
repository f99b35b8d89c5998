#!/usr/bin/env python3
"""CPU timings of an upscaler (ESRGAN, Real-ESRGAN Compact, SwinIR, ...) run by spandrel 0.4.2 on torch 2.11.0, as the Rust bench
`crates/pipeline/benches/upscaler.rs` measures ours: one forward pass of the network on a square
tile (A1111 upscales in tiles of 192 px, one at a time), the same synthetic picture as the Rust
bench; medians over repeats with min/max, the median CPU time of the process (all threads) and
peak RSS (VmHWM, reset before each stage).

    python3 tools/bench_esrgan.py --model 4x.pth --threads 2 --tiles 64,192 --repeats 3 --json ref.json
    python3 tools/bench_esrgan.py --make-random /tmp/esrgan-4x-random.pth   # a full-size model
    python3 tools/bench_esrgan.py --make-random /tmp/compact-4x.pth --arch compact
    python3 tools/bench_esrgan.py --make-random /tmp/swinir-m-4x.pth --arch swinir

--make-random writes an ESRGAN of the size of the common 4x models (RealESRGAN_x4plus,
4x-UltraSharp: 23 RRDB blocks, 64 features, growth 32, two x2 upsamplings) with torch's default
initialisation, in the original ESRGAN key names, and exits; with --arch compact, a Real-ESRGAN
Compact of realesr-general-x4v3's size (64 features, 32 body convs, PReLU, x4; --scale sets the
factor); with --arch swinir, a SwinIR-M of 001_classicalSR_DF2K_s64w8_SwinIR-M_x4's size (180
features, 6 groups of 6 blocks, 6 heads, window 8, pixelshuffle x4). For benchmarks only, never
for tests.
Prints a table on stderr and one JSON object on stdout (the schema of tools/bench_diffusers.py).
"""

import argparse
import json
import sys
import time

from bench_diffusers import measure, status_kb


def tile(side):
    """The Rust bench's picture: value (x, y, c) = ((x * 255 / side + y * 97 / side + c * 60) % 256) / 255."""
    import numpy as np
    import torch

    c, y, x = np.meshgrid(np.arange(3), np.arange(side), np.arange(side), indexing="ij")
    v = (x * 255 // side + y * 97 // side + c * 60) % 256
    return torch.from_numpy((v / 255.0).astype(np.float32))[None]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--make-random", metavar="OUT")
    ap.add_argument("--scale", type=int, default=4, help="with --make-random")
    ap.add_argument("--arch", choices=["esrgan", "compact", "swinir"], default="esrgan",
                    help="with --make-random")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiles", default="64,192")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.make_random:
        torch.manual_seed(0)
        if args.arch == "swinir":
            from spandrel.architectures.SwinIR import SwinIR

            # SwinIR-M's classical SR (001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth).
            net = SwinIR(img_size=64, window_size=8, embed_dim=180, depths=[6] * 6,
                         num_heads=[6] * 6, mlp_ratio=2.0, upscale=args.scale,
                         upsampler="pixelshuffle", resi_connection="1conv")
        elif args.arch == "compact":
            from spandrel.architectures.Compact import Compact

            net = Compact(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=32, upscale=args.scale)
        else:
            from spandrel.architectures.ESRGAN import ESRGAN

            net = ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=args.scale)
        torch.save(net.state_dict(), args.make_random)
        print(f"wrote {args.make_random}", file=sys.stderr)
        return
    if not args.model:
        ap.error("--model or --make-random")

    from spandrel import ModelLoader

    start = time.perf_counter()
    net = ModelLoader("cpu").load_from_file(args.model).model.eval()
    load_s = time.perf_counter() - start
    stats = []
    with torch.inference_mode():
        for side in [int(s) for s in args.tiles.split(",") if s]:
            x = tile(side)
            stats.append(measure(f"esrgan_tile_{side}", args.repeats, lambda: net(x)))
    out = {
        "implementation": "spandrel",
        "model": args.model,
        "threads": str(args.threads),
        "load_s": round(load_s, 3),
        "peak_rss_mb": max([round(status_kb("VmHWM:") / 1024)] + [s["peak_rss_mb"] for s in stats]),
        "stages": stats,
    }
    text = json.dumps(out)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
