#!/usr/bin/env python3
"""Loads PTX made for an older GPU (scripts/sm61-ptx.sh: candle's kernel modules and sdserve's
kernels.cu for sm_61) on the GPU at hand, where the driver compiles it forward, and runs
sdserve's kernels from it against NumPy references: what a GTX 1060 would run, checked on a
newer card. Needs cupy. Prints one JSON object.

    python3 tools/ptx_check_gpu.py PTX_DIR      (*.ptx or *.ptx.xz)
"""

import glob
import json
import os
import re
import sys
import time

import cupy as cp
import numpy as np


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_sdserve(mod, rng):
    out = {}
    # Attention, CUDA-core kernels (the only ones below sm_80), head dims of SD 1.5.
    for d, heads, n, m in [(40, 8, 300, 300), (80, 2, 100, 77), (160, 1, 64, 77)]:
        b = 2
        q = rng.standard_normal((b, n, heads * d)).astype(np.float16)
        k = rng.standard_normal((b, m, heads * d)).astype(np.float16)
        v = rng.standard_normal((b, m, heads * d)).astype(np.float16)
        scale = 1.0 / np.sqrt(d)
        qh = q.astype(np.float32).reshape(b, n, heads, d).transpose(0, 2, 1, 3)
        kh = k.astype(np.float32).reshape(b, m, heads, d).transpose(0, 2, 1, 3)
        vh = v.astype(np.float32).reshape(b, m, heads, d).transpose(0, 2, 1, 3)
        s = qh @ kh.transpose(0, 1, 3, 2) * scale
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        want = (p @ vh).transpose(0, 2, 1, 3).reshape(b, n, heads * d)
        gq, gk, gv = cp.asarray(q), cp.asarray(k), cp.asarray(v)
        go = cp.full((b, n, heads * d), np.nan, dtype=cp.float16)
        f = mod.get_function(f"flash_simt_d{d}")
        smem = 16 * d * 4 + 2 * 32 * (d + 2) * 2
        f(((n + 15) // 16, b * heads), (128,), (gq, gk, gv, go, np.int32(n), np.int32(m),
                                               np.int32(heads), np.float32(scale * np.log2(np.e))),
          shared_mem=smem)
        got = cp.asnumpy(go).astype(np.float32)
        out[f"attention_d{d}"] = {"rel": rel(got, want), "finite": bool(np.isfinite(got).all())}
        # The register-tiled CUDA-core kernel (Pascal's default since kernels.cu has it): rows
        # per block and shared memory as kernels/cuda/attn.rs's tiled_shape.
        try:
            f = mod.get_function(f"flash_tiled_f16_d{d}")
        except Exception as e:  # PTX from before the kernel existed
            out[f"attention_tiled_d{d}"] = {"error": f"{type(e).__name__}: {e}"}
            continue
        rows = 64 if d <= 80 else 32
        smem = (d * rows + d * 32 + 32 * (rows + 4)) * 4
        go = cp.full((b, n, heads * d), np.nan, dtype=cp.float16)
        f(((n + rows - 1) // rows, b * heads), (128,), (gq, gk, gv, go, np.int32(n), np.int32(m),
                                                       np.int32(heads), np.float32(scale * np.log2(np.e))),
          shared_mem=smem)
        got = cp.asnumpy(go).astype(np.float32)
        out[f"attention_tiled_d{d}"] = {"rel": rel(got, want), "finite": bool(np.isfinite(got).all())}
    # Group norm + SiLU, f16 storage.
    x = (rng.standard_normal((2, 320, 32, 32)) * 3 + 5).astype(np.float16)
    w = rng.standard_normal(320).astype(np.float32)
    bb = rng.standard_normal(320).astype(np.float32)
    xg = x.astype(np.float32).reshape(2, 32, -1)
    xn = ((xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    want = xn * w[None, :, None, None] + bb[None, :, None, None]
    want = want / (1 + np.exp(-want))
    gy = cp.full(x.shape, np.nan, dtype=cp.float16)
    mod.get_function("group_norm_f16")((64,), (512,), (cp.asarray(x), gy, cp.asarray(w), cp.asarray(bb),
                                                        np.int32(320), np.int32(1024), np.int32(32),
                                                        np.float32(1e-5), np.int32(1)))
    out["group_norm_silu"] = {"rel": rel(cp.asnumpy(gy), want)}
    # GEGLU.
    h = rng.standard_normal((2, 77, 1280)).astype(np.float16)
    hf = h.astype(np.float32)
    import math
    erf = np.vectorize(math.erf)
    g = hf[..., 640:]
    want = hf[..., :640] * 0.5 * g * (1 + erf(g / np.sqrt(2)))
    gy = cp.full((2, 77, 640), np.nan, dtype=cp.float16)
    mod.get_function("geglu_f16")((int((154 * 640 + 255) // 256),), (256,),
                                  (cp.asarray(h), gy, np.int64(154), np.int32(640)))
    out["geglu"] = {"rel": rel(cp.asnumpy(gy), want)}
    return out


def main():
    d = sys.argv[1]
    rng = np.random.default_rng(0)
    report = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "modules": {}}
    for path in sorted(glob.glob(os.path.join(d, "*.ptx")) + glob.glob(os.path.join(d, "*.ptx.xz"))):
        if path.endswith(".xz"):  # carried compressed
            import lzma
            text = lzma.open(path, "rt").read()
            path = os.path.join("/tmp", os.path.basename(path)[:-3])
            open(path, "w").write(text)
        else:
            text = open(path).read()
        names = re.findall(r"\.entry\s+([A-Za-z0-9_]+)", text)
        target = re.search(r"^\.target\s+(\S+)", text, re.M)
        t0 = time.time()
        entry = {"target": target.group(1) if target else None, "entries": len(names)}
        try:
            mod = cp.RawModule(path=path)
            loaded = sum(1 for n in names if mod.get_function(n) is not None)
            entry.update(loaded=loaded, jit_s=round(time.time() - t0, 2))
            if os.path.basename(path) == "sdserve_kernels.ptx":
                entry["checks"] = check_sdserve(mod, rng)
        except Exception as e:  # report, keep going
            entry["error"] = repr(e)[:500]
        report["modules"][os.path.basename(path)] = entry
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
