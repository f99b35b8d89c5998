#!/usr/bin/env python3
"""Compiles kernels.cu (crates/pipeline/src/kernels/cuda/cu/*.cu in name order) with NVRTC for
some architectures, as sdserve does at run time, and reports errors and per-kernel register/spill
use (from ptxas when one is on PATH). Needs only libnvrtc (e.g. the nvidia-cuda-nvrtc wheel), no
GPU.

    python3 tools/nvrtc_check.py [--lib path/libnvrtc.so.13] [--arch 75,80,90] [--ptx-dir DIR]
        [--filter NAME_PART]
"""
import argparse, ctypes, os, shutil, subprocess, sys, tempfile

ap = argparse.ArgumentParser()
ap.add_argument("--lib", default="libnvrtc.so.13")
ap.add_argument("--arch", default="75,80,90")
ap.add_argument("--src", default=os.path.join(os.path.dirname(__file__), "..", "crates", "pipeline",
                                              "src", "kernels", "cuda", "cu"),
                help="kernels.cu: the folder of its parts (concatenated in name order) or one file")
ap.add_argument("--ptx-dir")
ap.add_argument("--filter", help="report only kernels whose name contains this")
a = ap.parse_args()
nv = ctypes.CDLL(a.lib)
src = (b"".join(open(os.path.join(a.src, f), "rb").read()
                for f in sorted(os.listdir(a.src)) if f.endswith(".cu"))
       if os.path.isdir(a.src) else open(a.src, "rb").read())
ok = True
for arch in a.arch.split(","):
    prog = ctypes.c_void_p()
    assert nv.nvrtcCreateProgram(ctypes.byref(prog), src, b"kernels.cu", 0, None, None) == 0
    opts = [f"--gpu-architecture=compute_{arch}".encode(), b"-std=c++17", b"--use_fast_math"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = nv.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    nv.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    nv.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        ok = False
        print(f"compute_{arch}: FAILED\n{log.value.decode()}")
        continue
    nv.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    nv.nvrtcGetPTX(prog, ptx)
    print(f"compute_{arch}: ok, {n.value} bytes of PTX {log.value.decode().strip()}")
    path = os.path.join(a.ptx_dir or tempfile.mkdtemp(), f"kernels_{arch}.ptx")
    open(path, "wb").write(ptx.value)
    if shutil.which("ptxas"):
        r = subprocess.run(["ptxas", f"-arch=sm_{arch}", "-v", path, "-o", os.devnull],
                           capture_output=True, text=True)
        # "Compiling entry function 'NAME'" precedes each kernel's spill and register lines.
        name = "?"
        for l in r.stderr.splitlines():
            if "entry function" in l:
                name = l.split("'")[1]
            elif "Used" in l or "spill" in l and "0 bytes" not in l or "error" in l:
                if not a.filter or a.filter in name:
                    print(f"   {name}: {l.split(':', 1)[-1].strip()}")
sys.exit(0 if ok else 1)
