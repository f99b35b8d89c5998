#!/usr/bin/env python3
"""torch's CPU conv2d on the annotator conv shapes that `cargo bench -p sdserve-pipeline --bench
stages -- --kernels-only` times on our kernels (KERNEL_FILTER there, --filter here), to set the
two side by side: the OpenPose CPM stages' 7x7 convs (the hand network at its 736 and 368
squares, the body's at 23x23) and the hand's VGG 3x3 convs at 736.

  python3 tools/bench_conv_shapes.py [--threads 2] [--repeats 5] [--filter 7x7]

Each shape runs once untimed, then --repeats times (no_grad, f32, stride 1, padding k // 2, with
a bias, as nn.Conv2d): the median and the rate in direct-conv GFLOP/s, the stages bench's names.
"""
import argparse
import statistics
import time

import torch

# (batch, cin, size, cout, kernel): benches/stages.rs' annotator shapes.
SHAPES = [
    (1, 150, 92, 128, 7),
    (1, 128, 92, 128, 7),
    (1, 128, 46, 128, 7),
    (1, 185, 23, 128, 7),
    (1, 512, 92, 512, 3),
    (1, 64, 368, 128, 3),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--filter", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for b, cin, hw, cout, k in SHAPES:
        name = f"conv{k}x{k}_b{b}_{cin}_{hw}x{hw}_{cout}"
        if args.filter not in name:
            continue
        conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2).eval()
        x = torch.randn(b, cin, hw, hw)
        times = []
        with torch.no_grad():
            conv(x)
            for _ in range(args.repeats):
                start = time.perf_counter()
                conv(x)
                times.append(time.perf_counter() - start)
        med = statistics.median(times)
        gflop = 2 * b * cout * cin * k * k * hw * hw / 1e9
        print(f"{name + '_torch':<40} median {med:7.3f} s  min {min(times):7.3f}  "
              f"{gflop / med:6.1f} GFLOP/s (direct-conv FLOPs)")


if __name__ == "__main__":
    main()
