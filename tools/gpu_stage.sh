#!/usr/bin/env bash
# Fills the folder a device run carries (default /work/main/.gpu, git-ignored there) with what
# tools/gpu_session.sh needs: the stripped, xz-compressed CUDA binary and GPU test binary,
# the diffusers wheels and the Python tools. Run after `SDSERVE_CUDA_TESTS=1 scripts/build-cuda.sh sm90`.
#
#   tools/gpu_stage.sh [DEST]      env: TARGET_DIR (default target/cuda-sm90), WHEELS (dir of .whl),
#                                  RANDOM_SD15 (make_random_sd15.py), SM61_PTX (dir of
#                                  scripts/sm61-ptx.sh output), SM61_TARGET (target dir of
#                                  `scripts/build-cuda.sh sm61`: its candle PTX, plus kernels.cu
#                                  compiled by that build's nvcc), NO_TESTS=1 (no test binary)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-/work/main/.gpu}
target=${TARGET_DIR:-$root/target/cuda-sm90}
wheels=${WHEELS:-/work/gpu-stage/whl}
mkdir -p "$dest/tools" "$dest/whl"
for pair in "sdserve:$target/release/sdserve" "pipeline-tests:$target/release/pipeline-tests"; do
    name=${pair%%:*} src=${pair#*:}
    if [[ ! -x $src && $name == pipeline-tests && -n ${NO_TESTS:-} ]]; then
        rm -f "$dest/$name.xz"
        continue
    fi
    [[ -x $src ]] || { echo "missing $src" >&2; exit 1; }
    strip -o "$dest/$name" "$src"
    xz -T2 -3 -f "$dest/$name"
done
cp "$wheels"/*.whl "$dest/whl/"
cp "$root"/tools/{gpu_session.sh,gpu_summary.py,bench_diffusers_gpu.py,api_schedulers.py,compare_images.py,ptx_check_gpu.py} "$dest/tools/"
if [[ -n ${SM61_PTX:-} ]]; then
    mkdir -p "$dest/sm61"
    for p in "$SM61_PTX"/*.ptx; do xz -T2 -2 -c "$p" >"$dest/sm61/$(basename "$p").xz"; done
fi
if [[ -n ${SM61_TARGET:-} ]]; then
    # The sm_61 binary's own device code: candle's kernel modules as its build embedded them,
    # and our kernels.cu through the same nvcc (at run time NVRTC 12 compiles the same source).
    rm -rf "$dest/sm61"
    mkdir -p "$dest/sm61"
    out=$(ls -dt "$SM61_TARGET"/release/build/candle-kernels-*/out | head -1)
    for p in "$out"/*.ptx; do xz -T2 -2 -c "$p" >"$dest/sm61/candle_$(basename "$p").xz"; done
    nvcc=${SM61_NVCC:-$HOME/.cache/sdserve-cuda/cu12/cuda-home/bin/nvcc}
    "$nvcc" --gpu-architecture=sm_61 --ptx -std=c++17 -O3 -o "$dest/sm61/sdserve_kernels.ptx" \
        "$root/crates/pipeline/src/kernels/cuda/kernels.cu"
    xz -T2 -2 -f "$dest/sm61/sdserve_kernels.ptx"
fi
cp "${RANDOM_SD15:-/work/shared/tools/make_random_sd15.py}" "$dest/tools/"
du -sh "$dest" "$dest"/* >&2
