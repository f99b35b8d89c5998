#!/usr/bin/env bash
# Fills the folder a device run carries (default /work/main/.gpu, git-ignored there) with what
# tools/gpu_session.sh needs: the stripped, xz-compressed CUDA binary and GPU test binary,
# the diffusers wheels and the Python tools. Run after `SDSERVE_CUDA_TESTS=1 scripts/build-cuda.sh sm90`.
#
#   tools/gpu_stage.sh [DEST]      env: TARGET_DIR (default target/cuda-sm90), WHEELS (dir of .whl),
#                                  RANDOM_SD15 (make_random_sd15.py), SM61_PTX (dir of
#                                  scripts/sm61-ptx.sh output)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-/work/main/.gpu}
target=${TARGET_DIR:-$root/target/cuda-sm90}
wheels=${WHEELS:-/work/gpu-stage/whl}
mkdir -p "$dest/tools" "$dest/whl"
for pair in "sdserve:$target/release/sdserve" "pipeline-tests:$target/release/pipeline-tests"; do
    name=${pair%%:*} src=${pair#*:}
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
cp "${RANDOM_SD15:-/work/shared/tools/make_random_sd15.py}" "$dest/tools/"
du -sh "$dest" "$dest"/* >&2
