#!/usr/bin/env bash
# Builds the CUDA sdserve binary on a machine WITHOUT a GPU, from NVIDIA's PyPI wheels.
#
#   scripts/build-cuda.sh sm90   # Hopper (H100/H200): CUDA 13.0 toolchain, compute cap 90
#   scripts/build-cuda.sh sm61   # Pascal (GTX 1060):  CUDA 12.4 toolchain, compute cap 61
#                                # (CUDA 13 dropped Pascal; nvcc 12.4 comes from Debian trixie)
#   scripts/build-cuda.sh sm61-on-cu13  # sm61's device code (same nvcc 12.4, same fixes, same
#                                # PTX) linked against CUDA 13's libraries: runs the GTX 1060
#                                # build's kernels on a CUDA 13 machine (docs/GPU.md, "Pascal")
#
# Steps (each idempotent): pip-install the toolchain into a private folder (no system changes),
# make a folder of unversioned library symlinks (the wheels ship only `libfoo.so.N`), generate a
# stub `libcuda.so` (soname libcuda.so.1) so the link finishes without a driver, then
# `cargo build --release -p sdserve --features cuda`. The stub is only for linking: it is built
# under the toolchain folder, never committed, never shipped; at run time the real driver's
# libcuda.so.1 is used. The binary needs libcuda.so.1 (driver), libcudart, libcublas(Lt),
# libcurand, libnvrtc and libcudnn at start (LD_LIBRARY_PATH), see docs/GPU.md.
#
# Environment:
#   SDSERVE_CUDA_TOOLCHAIN  where the wheels go (default ~/.cache/sdserve-cuda/<cu13|cu12>)
#   CARGO_TARGET_DIR        build folder (default target/cuda-<target>, apart from the CPU build)
#   BUNDLE_DIR              if set, copy the CUDA runtime libraries the binary needs there
#                           (cudart, cublas, cublasLt, curand, nvrtc, cudnn; not libcuda)
#   NO_CUDNN=1              build without cuDNN (candle's own conv kernels); e.g. old GPUs
#   TOOLCHAIN_ONLY=1        stop after preparing the toolchain (no cargo build)
#   SDSERVE_CUDA_TESTS=1    also build the pipeline's unit tests with CUDA (the GPU kernel tests
#                           of kernels/cuda) as <target dir>/release/pipeline-tests, to run on a GPU
#   CLIPPY=1                instead of building, run clippy (-D warnings, all targets) on our
#                           crates with the CUDA feature in the same target dir (about 1 minute
#                           once that dir is built)
#   CARGO_BUILD_JOBS, PIP   as usual (PIP defaults to "python3 -m pip")
set -euo pipefail

usage() {
    sed -n '2,11p' "$0" >&2
    exit 2
}

target=${1:-}
case "$target" in
sm90)
    cuda=13
    cap=90
    # The libraries are the versions torch 2.11 (cu130) pins, i.e. what the GPU machine has at
    # run time. nvvm and crt must match nvcc: unpinned they resolve to 13.5, whose PTX (ISA 9.5)
    # neither nvcc 13.0's ptxas nor a CUDA 13.0 driver accepts.
    packages=(
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
        nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
    )
    cudnn_package=nvidia-cudnn-cu13==9.19.0.56
    ;;
sm61)
    cuda=12
    cap=61
    # CUDA 13 dropped Pascal, and PyPI's CUDA 12 nvcc wheels (nvidia-cuda-nvcc-cu12, checked
    # 12.4.131 and 12.9.86) ship only ptxas, libnvvm and libdevice, not nvcc. So the compiler
    # comes from Debian: trixie's non-free nvidia-cuda-toolkit 12.4.131 (nvcc,
    # cicc, ptxas, fatbinary, nvlink, cudafe++; NVIDIA's binaries, run on bookworm too) and
    # trixie main's libcu++/cub/thrust 2.3.2 (the CCCL of CUDA 12.4), downloaded with a private
    # apt state (nothing installed system-wide) and unpacked into the toolchain folder; headers,
    # libdevice and libraries from the PyPI wheels below. An installed toolkit (CUDA_HOME) is
    # not used: candle's kernels need the nvcc wrapper below, which is built around this tree.
    if [[ -n ${CUDA_HOME:-} ]]; then
        echo "[build-cuda sm61] not using CUDA_HOME=$CUDA_HOME: sm61 builds with nvcc 12.4 from Debian (docs/GPU.md)" >&2
    fi
    # 12.4 is the newest toolkit whose PTX a 550-series driver (common on Pascal boxes) JITs;
    # override the library versions if the target driver is newer.
    v=${CU12_VERSION:-12.4.127}
    packages=(
        "nvidia-cuda-runtime-cu12==$v" "nvidia-cuda-nvcc-cu12==${CU12_NVCC_VERSION:-12.4.131}"
        "nvidia-cublas-cu12==${CU12_CUBLAS_VERSION:-12.4.5.8}"
        "nvidia-curand-cu12==${CU12_CURAND_VERSION:-10.3.5.147}"
        "nvidia-cuda-nvrtc-cu12==$v"
    )
    debs=(
        "nvidia-cuda-toolkit=${CU12_DEB_VERSION:-12.4.131~12.4.1-2}"
        "libcu++-dev=${CCCL_DEB_VERSION:-2.3.2-2}" "libcub-dev=${CCCL_DEB_VERSION:-2.3.2-2}"
        "libthrust-dev=${CCCL_DEB_VERSION:-2.3.2-2}"
    )
    cudnn_package=nvidia-cudnn-cu12==9.1.0.70
    ;;
sm61-on-cu13)
    # The sm61 artifact's device code on a machine that has only CUDA 13 (the lent GPU): candle's
    # kernels compiled exactly as for sm61 (Debian's nvcc 12.4 with the Pascal fixes below,
    # CUDA_COMPUTE_CAP=61: `.target sm_61` PTX), everything else as sm90 (cudarc's CUDA 13
    # bindings, CUDA 13's cuBLAS/cuDNN/NVRTC). Our kernels.cu is compiled by NVRTC 12 for
    # compute_61 into <target dir>/release/sdserve_kernels_sm61.ptx, which the binary loads with
    # SDSERVE_CUDA_KERNELS_PTX (NVRTC 13 has no compute_61); SDSERVE_CUDA_ARCH_AS=61 makes the
    # host choose as on sm_61. tools/ptx_modules.py proves the PTX identical to sm61's.
    cuda=13
    cap=61
    nvcc_from=sm61
    packages=(
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
        nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
    )
    cudnn_package=nvidia-cudnn-cu13==9.19.0.56
    ;;
*) usage ;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
toolchain=${SDSERVE_CUDA_TOOLCHAIN:-$HOME/.cache/sdserve-cuda/cu$cuda}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target/cuda-$target}
pip=${PIP:-python3 -m pip}
features=cuda
if [[ -z ${NO_CUDNN:-} ]]; then
    packages+=("$cudnn_package")
fi

say() { printf '[build-cuda %s] %s\n' "$target" "$*" >&2; }

# 1. Toolchain wheels into a private --target folder.
site=$toolchain/site
stamp=$toolchain/.installed-$(printf '%s\n' "${packages[@]}" | sha256sum | cut -c1-16)
if [[ ! -f $stamp ]]; then
    say "installing ${#packages[@]} wheels into $site"
    mkdir -p "$site"
    $pip install --quiet --no-deps --upgrade --target "$site" "${packages[@]}"
    touch "$stamp"
fi

# 2. CUDA_HOME: CUDA 13 wheels share one tree (nvidia/cu13); for CUDA 12, Debian's compiler and
#    the wheels' headers and libraries are merged into one tree.
if [[ $cuda == 13 ]]; then
    cuda_home=$site/nvidia/cu13
    libdirs=("$cuda_home/lib")
    [[ -d $site/nvidia/cudnn/lib ]] && libdirs+=("$site/nvidia/cudnn/lib")
else
    # CUDA 12: Debian's nvcc 12.4 plus the wheels, merged into one tree (bin/ include/ lib/
    # nvvm/) that an nvcc.profile of our own points at.
    cuda_home=$toolchain/cuda-home
    debdir=$toolchain/debs
    dstamp=$debdir/.unpacked-$(printf '%s\n' "${debs[@]}" | sha256sum | cut -c1-16)
    if [[ ! -f $dstamp ]]; then
        say "downloading ${debs[*]} from Debian trixie (private apt state)"
        rm -rf "$debdir"
        mkdir -p "$debdir/apt/lists/partial" "$debdir/apt/cache/archives/partial" "$debdir/root"
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main non-free" \
            >"$debdir/apt/sources.list"
        apt_opts=(-o "Dir::Etc::SourceList=$debdir/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
            -o "Dir::State::Lists=$debdir/apt/lists" -o "Dir::Cache=$debdir/apt/cache"
            -o APT::Architecture=amd64 -o APT::Sandbox::User=root)
        apt-get "${apt_opts[@]}" -qq update
        (cd "$debdir" && apt-get "${apt_opts[@]}" -qq download "${debs[@]}")
        for d in "$debdir"/*.deb; do dpkg-deb -x "$d" "$debdir/root"; done
        rm -f "$debdir"/*.deb
        touch "$dstamp"
    fi
    rm -rf "$cuda_home"
    mkdir -p "$cuda_home"/{bin,include,lib,nvvm/libdevice}
    r=$debdir/root
    cp -a "$r"/usr/lib/nvidia-cuda-toolkit/bin/{cicc,crt} "$cuda_home/bin/"
    cp -a "$r"/usr/lib/nvidia-cuda-toolkit/bin/nvcc "$cuda_home/bin/nvcc.real"
    cp -a "$r"/usr/bin/{ptxas,fatbinary,nvlink,cudafe++,bin2c} "$cuda_home/bin/"
    libdirs=()
    for pkg in "$site"/nvidia/*/; do
        [[ -d $pkg/include ]] && cp -a "$pkg"include/. "$cuda_home/include/"
        [[ -d $pkg/lib ]] && libdirs+=("${pkg}lib")
    done
    rm -f "$cuda_home/include/__init__.py"
    cp -a "$r"/usr/include/{cuda,nv,cub,thrust} "$cuda_home/include/"
    cp "$site"/nvidia/cuda_nvcc/nvvm/libdevice/libdevice.10.bc "$cuda_home/nvvm/libdevice/"
    for d in "${libdirs[@]}"; do ln -sf "$d"/* "$cuda_home/lib/"; done
    cat >"$cuda_home/bin/nvcc.profile" <<'PROFILE'
TOP              = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
LD_LIBRARY_PATH += $(TOP)/lib:
PATH            += $(_HERE_):
INCLUDES        +=  "-I$(TOP)/include" $(_SPACE_)
LIBRARIES        =+ $(_SPACE_) "-L$(TOP)/lib"
PROFILE
    # Two fixes for candle 0.11's kernels on Pascal, applied by an nvcc wrapper:
    # - reduce.cu's f16 sum calls atomicAdd(__half *), which cuda_fp16.h declares only from
    #   sm_70 (nvcc rejects it for sm_61): a pre-included header defines it below sm_70 as a CAS
    #   loop on the enclosing 32-bit word (the code candle's compatibility.cuh has commented out).
    # - moe_wmma.cu and moe_wmma_gguf.cu (statically linked MoE kernels, never called by
    #   sdserve) use WMMA, which needs sm_70: those two files are compiled for sm_70; their
    #   kernels would fail to launch on Pascal, and nothing launches them.
    cat >"$cuda_home/include/sdserve-pascal-shim.h" <<'SHIM'
#pragma once
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
    cat >"$cuda_home/bin/nvcc" <<'WRAP'
#!/usr/bin/env bash
# scripts/build-cuda.sh sm61: Debian's nvcc 12.4 with sdserve's two Pascal fixes (see there).
here=$(dirname "$(readlink -f "$0")")
args=("$@")
case " $* " in
*" --version "* | *" -V "*) exec "$here/nvcc.real" "$@" ;;
*moe_wmma*.cu*) args=("${args[@]//compute_61/compute_70}"); args=("${args[@]//sm_61/sm_70}") ;;
esac
exec "$here/nvcc.real" -include sdserve-pascal-shim.h "${args[@]}"
WRAP
    chmod +x "$cuda_home/bin/nvcc"
fi
[[ -x $cuda_home/bin/nvcc ]] || { say "nvcc missing under $cuda_home/bin"; exit 1; }

# 3. Unversioned names for the linker (-lcublas needs libcublas.so).
links=$toolchain/link
mkdir -p "$links"
for d in "${libdirs[@]}"; do
    for f in "$d"/lib*.so.*; do
        [[ -e $f ]] || continue
        base=$(basename "$f")
        ln -sf "$f" "$links/${base%%.so.*}.so"
    done
done

# 4. A stub libcuda.so exporting every driver entry point cudarc declares. Never executed: at
#    run time the dynamic loader finds the real driver's libcuda.so.1 (same soname).
cudarc_src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/ 2>/dev/null | tail -1 || true)
if [[ -z $cudarc_src ]]; then
    (cd "$root" && cargo fetch --quiet)
    cudarc_src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/ | tail -1)
fi
stub_c=$toolchain/libcuda-stub.c
grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+' "$cudarc_src/src/driver/sys/mod.rs" |
    awk '{print $4}' | sort -u |
    awk 'BEGIN{print "/* generated by scripts/build-cuda.sh: link-time stand-in, never loaded */"}
         {print "int " $1 "(void) { return 999; }"}' >"$stub_c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$links/libcuda.so.tmp$$" "$stub_c"
mv -f "$links/libcuda.so.tmp$$" "$links/libcuda.so" # atomic: another build may be linking
if [[ -n ${TOOLCHAIN_ONLY:-} ]]; then
    say "toolchain ready: CUDA_HOME=$cuda_home, link folder $links"
    exit 0
fi

# 5. Build.
export CUDA_HOME=$cuda_home CUDA_PATH=$cuda_home CUDA_ROOT=$cuda_home
export PATH=$cuda_home/bin:$PATH
export CUDA_COMPUTE_CAP=$cap
if [[ -n ${nvcc_from:-} ]]; then
    # candle-kernels finds nvcc on PATH: the sm61 toolchain's (its own script prepares it, in
    # its own folder). cudarc would take its CUDA version from that nvcc (12.4): pin it to the
    # libraries linked here instead.
    sm61_toolchain=${SM61_TOOLCHAIN:-$HOME/.cache/sdserve-cuda/cu12}
    env -u CUDA_HOME -u CUDA_PATH -u CUDA_ROOT SDSERVE_CUDA_TOOLCHAIN="$sm61_toolchain" \
        TOOLCHAIN_ONLY=1 "$0" "$nvcc_from"
    sm61_home=$sm61_toolchain/cuda-home
    export PATH=$sm61_home/bin:$PATH
    export CUDARC_CUDA_VERSION=13000
fi
export LIBRARY_PATH=$links${LIBRARY_PATH:+:$LIBRARY_PATH}
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$links"
if [[ -n ${NO_CUDNN:-} ]]; then
    # The pipeline's `cuda` feature turns cuDNN on; build the pieces without it.
    features=cuda-core
fi
say "nvcc: $(nvcc --version | tail -1); compute cap $cap; target dir $CARGO_TARGET_DIR"
if [[ -n ${CLIPPY:-} ]]; then
    (cd "$root" && cargo clippy --release -p sdserve-pipeline -p sdserve \
        --features "sdserve/$features" --all-targets -- -D warnings)
    say "clippy clean with --features $features"
    exit 0
fi
(cd "$root" && cargo build --release -p sdserve --features "$features")
bin=$CARGO_TARGET_DIR/release/sdserve
say "built $bin"
if [[ -n ${nvcc_from:-} ]]; then
    # Our kernels.cu as the sm61 build's NVRTC 12 compiles it on a GTX 1060 at run time.
    python3 "$root/tools/kernels_ptx.py" --arch "$cap" \
        --lib "$sm61_toolchain/site/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" \
        -o "$CARGO_TARGET_DIR/release/sdserve_kernels_sm$cap.ptx" >&2
fi
if [[ -n ${SDSERVE_CUDA_TESTS:-} ]]; then
    # Same profile, flags and package set as the binary (so the same dependency features: a
    # pipeline-only build would unify them differently and rebuild candle's kernels); only our
    # crates are compiled again, in test mode.
    tests=$(cd "$root" && cargo test --release --no-run --lib -p sdserve-pipeline -p sdserve \
        --features "sdserve/$features" \
        --message-format=json | grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4)
    cp "$tests" "$CARGO_TARGET_DIR/release/pipeline-tests"
    say "built $CARGO_TARGET_DIR/release/pipeline-tests (from $tests)"
fi
say "needs at run time: $(readelf -d "$bin" | awk '/NEEDED/ {gsub(/[][]/, "", $5); printf "%s ", $5}')"
if [[ -n ${BUNDLE_DIR:-} ]]; then
    mkdir -p "$BUNDLE_DIR"
    for d in "${libdirs[@]}"; do
        for f in "$d"/lib{cudart,cublas,cublasLt,curand,nvrtc,cudnn}*.so.*; do
            [[ -e $f ]] && cp -L "$f" "$BUNDLE_DIR/"
        done
    done
    say "runtime libraries copied to $BUNDLE_DIR ($(du -sh "$BUNDLE_DIR" | cut -f1))"
fi
