#!/usr/bin/env bash
# Fills the folder a device run carries (default /work/main/.gpu, git-ignored there) with what
# tools/gpu_session.sh needs: the stripped, xz-compressed CUDA binary and GPU test binary,
# the diffusers wheels and the Python tools. Run after `SDSERVE_CUDA_TESTS=1 scripts/build-cuda.sh sm90`.
#
#   tools/gpu_stage.sh [DEST]      env: TARGET_DIR (default target/cuda-sm90), WHEELS (dir of .whl),
#                                  RANDOM_SD15 (make_random_sd15.py), SM61_PTX (dir of
#                                  scripts/sm61-ptx.sh output), SM61_TARGET (target dir of
#                                  `scripts/build-cuda.sh sm61`: its candle PTX, plus kernels.cu
#                                  as that build's NVRTC 12 compiles it), NO_TESTS=1 (no test binary),
#                                  SM61_ON_CU13_TARGET (target dir of `scripts/build-cuda.sh
#                                  sm61-on-cu13`: its binary and sdserve_kernels_sm61.ptx, into
#                                  DEST/sm61-on-cu13; default target/cuda-sm61-on-cu13 when built,
#                                  else an already staged copy is kept)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-/work/main/.gpu}
target=${TARGET_DIR:-$root/target/cuda-sm90}
wheels=${WHEELS:-/work/gpu-stage/whl}
mkdir -p "$dest/tools" "$dest/whl"
# SM61_ON_CU13_ONLY=1: (re)stage only the sm61-on-cu13 folder, keep the rest as staged.
[[ -n ${SM61_ON_CU13_ONLY:-} ]] || for pair in "sdserve:$target/release/sdserve" "pipeline-tests:$target/release/pipeline-tests"; do
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
cp "$root"/tools/{gpu_session.sh,gpu_summary.py,bench_diffusers_gpu.py,api_schedulers.py,compare_images.py,ptx_check_gpu.py,make_random_rrdbnet.py} "$dest/tools/"
if [[ -n ${SM61_PTX:-} ]]; then
    mkdir -p "$dest/sm61"
    for p in "$SM61_PTX"/*.ptx; do xz -T2 -2 -c "$p" >"$dest/sm61/$(basename "$p").xz"; done
fi
if [[ -n ${SM61_TARGET:-} ]]; then
    # The sm_61 binary's own device code: candle's kernel modules as its build embedded them,
    # and our kernels.cu as that binary's NVRTC 12 compiles it at run time (same call, same PTX).
    rm -rf "$dest/sm61"
    mkdir -p "$dest/sm61"
    out=$(ls -dt "$SM61_TARGET"/release/build/candle-kernels-*/out | head -1)
    for p in "$out"/*.ptx; do xz -T2 -2 -c "$p" >"$dest/sm61/candle_$(basename "$p").xz"; done
    python3 "$root/tools/kernels_ptx.py" --arch 61 -o "$dest/sm61/sdserve_kernels.ptx" \
        --lib "${SM61_NVRTC:-$HOME/.cache/sdserve-cuda/cu12/site/nvidia/cuda_nvrtc/lib/libnvrtc.so.12}" >&2
    xz -T2 -2 -f "$dest/sm61/sdserve_kernels.ptx"
fi
variant=${SM61_ON_CU13_TARGET:-$root/target/cuda-sm61-on-cu13}
if [[ -x $variant/release/sdserve ]]; then
    # The GTX 1060 build's device code linked against CUDA 13 (gpu_session.sh's sm61_on_cu13).
    [[ -f $variant/release/sdserve_kernels_sm61.ptx ]] || { echo "missing $variant/release/sdserve_kernels_sm61.ptx" >&2; exit 1; }
    rm -rf "$dest/sm61-on-cu13"
    mkdir -p "$dest/sm61-on-cu13"
    strip -o "$dest/sm61-on-cu13/sdserve" "$variant/release/sdserve"
    cp "$variant/release/sdserve_kernels_sm61.ptx" "$dest/sm61-on-cu13/"
    xz -T2 -3 -f "$dest/sm61-on-cu13/sdserve" "$dest/sm61-on-cu13/sdserve_kernels_sm61.ptx"
elif [[ -n ${SM61_ON_CU13_TARGET:-} ]]; then
    echo "missing $variant/release/sdserve" >&2
    exit 1
fi
cp "${RANDOM_SD15:-/work/shared/tools/make_random_sd15.py}" "$dest/tools/"
du -sh "$dest" "$dest"/* >&2
total=$(du -sb "$dest" | cut -f1)
if ((total > 60 << 20)); then
    echo "staged $((total >> 20)) MiB: over 60 MiB (a device run carries 64 MiB in all)" >&2
    exit 1
fi
