#!/usr/bin/env python3
"""Writes a 4x RRDBNet of the size of the common ESRGAN models (RealESRGAN_x4plus, 4x-UltraSharp:
23 RRDB blocks, 64 features, growth 32, two x2 upsamplings) with torch's default convolution
initialisation, in Real-ESRGAN's key names, using torch alone: the lent GPU machine has torch but
not spandrel (tools/bench_esrgan.py --make-random builds the same shapes with spandrel's class).
For benchmarks only (tools/gpu_session.sh's `upscalers` stage), never for tests.

    python3 tools/make_random_rrdbnet.py OUT.pth
"""

import sys

import torch


def conv(state, name, cin, cout):
    c = torch.nn.Conv2d(cin, cout, 3, padding=1)
    state[f"{name}.weight"] = c.weight.detach().clone()
    state[f"{name}.bias"] = c.bias.detach().clone()


def main():
    out = sys.argv[1]
    torch.manual_seed(0)
    nf, gc, blocks = 64, 32, 23
    state = {}
    conv(state, "conv_first", 3, nf)
    for b in range(blocks):
        for k in (1, 2, 3):
            for j in range(1, 6):
                cout = nf if j == 5 else gc
                conv(state, f"body.{b}.rdb{k}.conv{j}", nf + (j - 1) * gc, cout)
    conv(state, "conv_body", nf, nf)
    conv(state, "conv_up1", nf, nf)
    conv(state, "conv_up2", nf, nf)
    conv(state, "conv_hr", nf, nf)
    conv(state, "conv_last", nf, 3)
    torch.save(state, out)
    print(f"wrote {out}: {sum(t.numel() for t in state.values())} parameters", file=sys.stderr)


if __name__ == "__main__":
    main()
