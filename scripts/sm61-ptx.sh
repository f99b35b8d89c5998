#!/usr/bin/env bash
# PTX for Pascal (sm_61, GTX 1060) without NVIDIA's CUDA 12 compiler, which PyPI does not carry:
# clang's CUDA front end (Debian's clang-19) with the CUDA 12.4 headers and libdevice from
# NVIDIA's PyPI wheels. Emits candle 0.11's run-time kernel modules (affine, binary, cast, conv,
# fill, indexing, reduce, sort, ternary, unary, quantized) and sdserve's own kernels.cu, one
# .ptx each, into OUT_DIR. tools/ptx_check_gpu.py loads and runs them on a GPU (the driver
# compiles PTX forward to newer architectures).
#
#   scripts/sm61-ptx.sh OUT_DIR          env: CLANG (default clang++-19), ARCH (default sm_61)
#
# Two shims, both for clang rather than nvcc (see docs/GPU.md, "Pascal"): clang does not define
# nvcc's __CUDACC_VER_MAJOR__/__MINOR__ (candle's compatibility.cuh reads them), and CUDA 12's
# cuda_fp16.h declares atomicAdd on __half only from sm_70 while candle's f16 sum calls it on
# every architecture (nvcc 12 rejects reduce.cu for sm_61 too): a CAS loop on the enclosing
# 32-bit word stands in.
set -euo pipefail
out=${1:?usage: scripts/sm61-ptx.sh OUT_DIR}
arch=${ARCH:-sm_61}
clang=${CLANG:-clang++-19}
root=$(cd "$(dirname "$0")/.." && pwd)
tc=${SDSERVE_CUDA_TOOLCHAIN:-$HOME/.cache/sdserve-cuda/cu12-clang}
say() { printf '[sm61-ptx] %s\n' "$*" >&2; }

command -v "$clang" >/dev/null || { say "$clang missing (apt-get install clang-19)"; exit 1; }
# 1. CUDA 12.4 headers, libdevice and ptxas from PyPI, merged into one CUDA_PATH for clang.
v=12.4.127
pkgs=("nvidia-cuda-runtime-cu12==$v" "nvidia-cuda-cccl-cu12==$v" "nvidia-cuda-nvcc-cu12==12.4.131"
    "nvidia-curand-cu12==10.3.5.147")
if [[ ! -f $tc/.installed-ptx ]]; then
    for p in "${pkgs[@]}"; do
        python3 -m pip install --quiet --no-deps --target "$tc/site-${p%%==*}" "$p"
    done
    touch "$tc/.installed-ptx"
fi
home=$tc/cuda-home
rm -rf "$home"
mkdir -p "$home/include" "$home/bin"
for p in "${pkgs[@]}"; do
    for d in "$tc/site-${p%%==*}"/nvidia/*/include; do cp -rsn "$d/." "$home/include/" 2>/dev/null || true; done
done
nvcc_pkg=$(ls -d "$tc"/site-nvidia-cuda-nvcc-cu12/nvidia/cuda_nvcc)
ln -sfn "$nvcc_pkg/nvvm" "$home/nvvm"
ln -sf "$nvcc_pkg/bin/ptxas" "$home/bin/ptxas"
# CUDA 12.4's cccl wheel lacks libcu++'s <nv/target> and <cuda/std/...>: take them from the
# CUDA 13 toolchain of scripts/build-cuda.sh sm90 (header-only, version-independent macros).
cccl13=${CCCL13:-$HOME/.cache/sdserve-cuda/cu13/site/nvidia/cu13/include/cccl}
[[ -d $cccl13/nv ]] || { say "need $cccl13 (run scripts/build-cuda.sh sm90 once, or set CCCL13)"; exit 1; }

shim=$tc/pascal-shim.h
cat >"$shim" <<'SHIM'
#include <assert.h>
#include <cuda_fp16.h>
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
__device__ __forceinline__ __half atomicAdd(__half *address, __half val) {
    unsigned int *word = (unsigned int *)((char *)address - ((size_t)address & 2));
    bool high = (size_t)address & 2;
    unsigned int old = *word, assumed;
    do {
        assumed = old;
        unsigned short cur = high ? (old >> 16) : (old & 0xffff);
        unsigned short sum = __half_as_ushort(__float2half(__half2float(__ushort_as_half(cur)) + __half2float(val)));
        old = atomicCAS(word, assumed, high ? (old & 0xffffu) | ((unsigned int)sum << 16) : (old & 0xffff0000u) | sum);
    } while (assumed != old);
    return __ushort_as_half(high ? (old >> 16) : (old & 0xffff));
}
#endif
SHIM

candle=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-kernels-0.11.1 | tail -1)
mkdir -p "$out"
flags=(-x cuda --cuda-device-only "--cuda-gpu-arch=$arch" "--cuda-path=$home" -S -O3 -std=c++17
    -Wno-unknown-cuda-version -D__CUDACC_VER_MAJOR__=12 -D__CUDACC_VER_MINOR__=4 -idirafter "$cccl13")
for f in ${CANDLE_MODULES:-affine binary cast conv fill indexing reduce sort ternary unary quantized}; do
    "$clang" "${flags[@]}" -include "$shim" -I"$candle/src" -o "$out/candle_$f.ptx" "$candle/src/$f.cu"
done
# kernels.cu: its parts in name order, one translation unit (kernels/cuda/source.rs).
(LC_ALL=C; cat "$root"/crates/pipeline/src/kernels/cuda/cu/*.cu) >"$out/sdserve_kernels.cu"
"$clang" "${flags[@]}" -o "$out/sdserve_kernels.ptx" "$out/sdserve_kernels.cu"
rm "$out/sdserve_kernels.cu"
for p in "$out"/*.ptx; do
    printf '%s: %s entries, %s\n' "$(basename "$p")" "$(grep -c '\.entry' "$p")" "$(grep -m1 '^\.target' "$p")" >&2
done
