#!/usr/bin/env python3
"""Writes the PTX that sdserve compiles at run time from kernels.cu
(crates/pipeline/src/kernels/cuda/cu/*.cu in name order): the same NVRTC call with the same
options as kernels/cuda/imp.rs (`--gpu-architecture=compute_N -std=c++17`, program name
sdserve_kernels.cu), through whichever libnvrtc is given. No GPU needed.

With NVRTC 12 and --arch 61 this is, byte for byte, what the sm61 build compiles on a GTX 1060;
a binary whose NVRTC cannot target compute_61 (CUDA 13) loads it with SDSERVE_CUDA_KERNELS_PTX.

    python3 tools/kernels_ptx.py --lib .../libnvrtc.so.12 --arch 61 -o sdserve_kernels_sm61.ptx
"""
import argparse, ctypes, hashlib, os, sys

ap = argparse.ArgumentParser()
ap.add_argument("--lib", required=True, help="libnvrtc.so.N to compile with")
ap.add_argument("--arch", required=True, type=int, help="compute capability, e.g. 61")
ap.add_argument("-o", "--out", required=True)
ap.add_argument("--src", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates",
                                              "pipeline", "src", "kernels", "cuda", "cu"),
                help="kernels.cu: the folder of its parts (concatenated in name order) or one file")
a = ap.parse_args()

nv = ctypes.CDLL(a.lib)
major, minor = ctypes.c_int(), ctypes.c_int()
nv.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
src = (b"".join(open(os.path.join(a.src, f), "rb").read()
                for f in sorted(os.listdir(a.src)) if f.endswith(".cu"))
       if os.path.isdir(a.src) else open(a.src, "rb").read())
prog = ctypes.c_void_p()
rc = nv.nvrtcCreateProgram(ctypes.byref(prog), src, b"sdserve_kernels.cu", 0, None, None)
if rc != 0:
    sys.exit(f"nvrtcCreateProgram: error {rc}")
# Keep in step with imp.rs's `ptx()`.
opts = [f"--gpu-architecture=compute_{a.arch}".encode(), b"-std=c++17"]
rc = nv.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
n = ctypes.c_size_t()
nv.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
nv.nvrtcGetProgramLog(prog, log)
if rc != 0:
    sys.exit(f"NVRTC {major.value}.{minor.value} compute_{a.arch}: error {rc}\n{log.value.decode()}")
nv.nvrtcGetPTXSize(prog, ctypes.byref(n))
buf = ctypes.create_string_buffer(n.value)
nv.nvrtcGetPTX(prog, buf)
ptx = buf.value  # without the terminating NUL, as cudarc's Ptx::to_src gives it
with open(a.out, "wb") as f:
    f.write(ptx)
target = next((l.split()[1] for l in ptx.decode().splitlines() if l.startswith(".target")), "?")
print(f"{a.out}: NVRTC {major.value}.{minor.value}, .target {target}, {len(ptx)} bytes, "
      f"{ptx.count(b'.entry')} kernels, sha256 {hashlib.sha256(ptx).hexdigest()}")
