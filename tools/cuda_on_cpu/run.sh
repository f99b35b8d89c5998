#!/usr/bin/env bash
# Runs kernels.cu's CUDA-core attention kernels on this CPU (no GPU, no CUDA toolkit: g++ only)
# against a double-precision reference: tools/cuda_on_cpu/README.md.
#   tools/cuda_on_cpu/run.sh [--quick] [--asan]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# kernels.cu: the folder of its parts (one translation unit, in name order) or one file.
src=${KERNELS_CU:-$here/../../crates/pipeline/src/kernels/cuda/cu}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The dynamic shared memory declaration becomes a use of the emulator's buffer.
if [[ -d $src ]]; then (LC_ALL=C; cat "$src"/*.cu); else cat "$src"; fi |
    sed -E 's/^[[:space:]]*extern __shared__ __align__\(16\) unsigned char smem_raw\[\];//' >"$tmp/kernels_emu.cu"
flags=(-O2)
args=()
for a in "$@"; do
    case $a in
    --asan) flags=(-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer) ;;
    *) args+=("$a") ;;
    esac
done
${CXX:-g++} -std=c++20 "${flags[@]}" -DSDSERVE_CPU_EMU -include "$here/cuda_emu.h" -I"$tmp" \
    -Wno-unknown-pragmas "$here/attention_check.cpp" -o "$tmp/attention_check"
"$tmp/attention_check" "${args[@]}"
