#!/usr/bin/env bash
# One measurement session on a lent GPU, prepared on a machine without one (docs/GPU.md,
# "Measuring"). Everything it needs travels in one folder ($GPU_DIR, default .gpu), made by
# tools/gpu_stage.sh:
#   sdserve.xz          the sm90 CUDA binary (scripts/build-cuda.sh sm90), stripped, xz
#   pipeline-tests.xz   the pipeline's unit tests built with --features cuda (GPU kernel tests)
#   whl/                diffusers 0.42.1 (+ importlib_metadata) wheels
#   tools/              make_random_sd15.py, bench_diffusers_gpu.py, api_schedulers.py,
#                       compare_images.py, gpu_summary.py, ptx_check_gpu.py, make_random_rrdbnet.py
#   sm61/               sm_61 PTX from scripts/sm61-ptx.sh (optional)
#   sm61-on-cu13/       sdserve.xz from `scripts/build-cuda.sh sm61-on-cu13` (the GTX 1060 build's
#                       device code linked against CUDA 13) and sdserve_kernels_sm61.ptx.xz (our
#                       kernels as its NVRTC 12 compiles them for compute_61) (optional)
# and it writes, under $OUT: log.txt (everything), results.json (every stage's JSON, collected
# by gpu_summary.py, which also prints the comparison table last), images.tar.gz (the PNGs).
#
#   OUT=/tmp/out tools/gpu_session.sh                  # on the GPU machine
#   DRY_RUN=1 OUT=/tmp/out tools/gpu_session.sh        # here: tiny model, CPU, stub driver
#   STAGES="tests ours_f16" tools/gpu_session.sh       # a subset (rerun what failed)
#
# Stages (in this order; each under its own timeout, a failure does not stop the next):
#   setup tests model ours_f16 diffusers_f16 diffusers_f32 ours_f32 sm61_on_cu13 variants profile
#   pre_ampere upscalers sm61 summary   (and, only when named in STAGES: ablate algos)
# A device command runs at most 10 minutes: a stage that would end past SESSION_BUDGET_S
# (540 on a GPU; 0 = no budget, the dry run's default) after the start is skipped, or run with
# what is left when that is at least half its limit and 60 s. Skipped stages are listed in
# $OUT/skipped_stages; the last line says how to run them in a second command (the summary
# always runs, and a warm machine keeps $WORK, so the model is not made twice).
set -uo pipefail

G=$(cd "${GPU_DIR:-.gpu}" && pwd)
OUT=${OUT:-/tmp/sdserve-gpu-out}
WORK=${WORK:-/tmp/sdserve-gpu}
DRY=${DRY_RUN:-}
STAGES=${STAGES:-setup tests model ours_f16 diffusers_f16 diffusers_f32 ours_f32 sm61_on_cu13 variants profile pre_ampere upscalers sm61 summary}
BUDGET=${SESSION_BUDGET_S:-$([[ -n $DRY ]] && echo 0 || echo 540)}
mkdir -p "$OUT" "$WORK/json" "$WORK/png"
LOG=$OUT/log.txt
exec > >(tee -a "$LOG") 2>&1
T0=$(date +%s)

say() { printf '[gpu-session +%ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
# want STAGE: whether STAGE is to run; it becomes the group that run_stage skips for time.
GROUP=
want() { [[ " $STAGES " == *" $1 "* ]] && GROUP=$1; }
# run_stage NAME SECONDS CMD...: logs duration and exit status to $WORK/json/stages.tsv.
run_stage() {
    local name=$1 limit=$2 t rc left
    shift 2
    if ((BUDGET > 0)); then
        left=$((BUDGET - ($(date +%s) - T0)))
        if ((left < limit)); then
            if ((left < 60 || left < limit / 2)); then
                say "stage $name skipped: ${left}s left of the ${BUDGET}s budget"
                printf '%s\tskipped\t0\n' "$name" >>"$WORK/json/stages.tsv"
                grep -qx "$GROUP" "$OUT/skipped_stages" 2>/dev/null || echo "$GROUP" >>"$OUT/skipped_stages"
                return 125
            fi
            limit=$left
        fi
    fi
    say "stage $name (limit ${limit}s): $*"
    t=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t))" >>"$WORK/json/stages.tsv"
    say "stage $name: rc=$rc in $(($(date +%s) - t))s"
    return $rc
}

# ---------------------------------------------------------------- environment
if [[ -n $DRY ]]; then
    # Here: the CUDA binary against the link stub (cuInit fails, so DEVICE=cpu paths only), the
    # toolchain's libraries, the tiny test model, little work per stage.
    tc=${SDSERVE_CUDA_TOOLCHAIN:-$HOME/.cache/sdserve-cuda/cu13}
    mkdir -p "$WORK/stub"
    ln -sf "$tc/link/libcuda.so" "$WORK/stub/libcuda.so.1"
    export LD_LIBRARY_PATH=$WORK/stub:$tc/site/nvidia/cu13/lib:$tc/site/nvidia/cudnn/lib
    PY=${PY:-/work/venv/ref/bin/python}
    MODEL=${MODEL:-$(pwd)/crates/pipeline/tests/fixtures/tiny-b}
    DEV=cpu SIZES=64 STEPS=3 REPEATS=1 SEEDS=1
else
    PY=${PY:-python3}
    nv=$($PY -c "import nvidia, os; print(list(nvidia.__path__)[0])")
    export LD_LIBRARY_PATH=$nv/cu13/lib:$nv/cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    MODEL=$WORK/sd15
    DEV=cuda SIZES=${SIZES:-512,768} STEPS=${STEPS:-20} REPEATS=${REPEATS:-3} SEEDS=${SEEDS:-1,2}
fi
export PYTHONUNBUFFERED=1 RUST_LOG=${RUST_LOG:-warn}
BIN=$WORK/sdserve
TESTS=$WORK/pipeline-tests
J=$WORK/json

if want setup; then
    say "setup: $(uname -m), $(nproc) cores"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
    for f in sdserve pipeline-tests; do
        if [[ -f $G/$f.xz ]]; then
            $PY -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
                "$G/$f.xz" "$WORK/$f" && chmod +x "$WORK/$f"
        else
            say "missing $G/$f.xz"
        fi
    done
    if [[ -f $G/sm61-on-cu13/sdserve.xz ]]; then
        mkdir -p "$WORK/sm61-on-cu13"
        for f in sdserve sdserve_kernels_sm61.ptx; do
            $PY -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
                "$G/sm61-on-cu13/$f.xz" "$WORK/sm61-on-cu13/$f" || say "cannot unpack sm61-on-cu13/$f.xz"
        done
        chmod +x "$WORK/sm61-on-cu13/sdserve"
        "$WORK/sm61-on-cu13/sdserve" --version || say "the sm61-on-cu13 sdserve does not start"
    fi
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$G"/whl/*.whl || say "wheel install failed"
    "$BIN" --version || say "sdserve does not start"
fi
export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}

# ---------------------------------------------------------------- GPU kernel tests
if want tests; then
    filter=(kernels::cuda)
    # No GPU here: the tests that need none.
    [[ -n $DRY ]] && filter=(kernels::cuda::tests::kernel_switch kernels::cuda::tests::linear_switch
        kernels::cuda::lt::tests::gemm_descriptions)
    run_stage tests 240 "$TESTS" "${filter[@]}" --test-threads=1 2>&1 | tee "$J/tests.txt"
    # A kernel that failed its test is switched off for the measurements (and said so).
    if grep -q "^test .*::attention_matches.*FAILED" "$J/tests.txt"; then
        export SDSERVE_CUDA_ATTENTION=mma1
        say "attention test failed: measuring with SDSERVE_CUDA_ATTENTION=mma1"
        # The register-tiled CUDA-core kernel (the pre-Ampere default) failing: the old one there.
        if grep -q " Simt: rel" "$J/tests.txt"; then
            PRE_AMPERE_ATTENTION=simt_warp
            say "tiled CUDA-core attention failed: pre_ampere with SDSERVE_CUDA_ATTENTION=simt_warp"
        fi
    fi
    if grep -q "^test .*::f32_attention_matches.*FAILED" "$J/tests.txt"; then
        export SDSERVE_CUDA_ATTENTION_F32=candle
        say "f32 attention test failed: measuring f32 with SDSERVE_CUDA_ATTENTION_F32=candle"
    fi
    if grep -q "group_norm_matches.*FAILED" "$J/tests.txt"; then
        export SDSERVE_CUDA_GROUP_NORM=single
        say "group norm test failed: measuring with SDSERVE_CUDA_GROUP_NORM=single"
    fi
    # The cuBLASLt linear layers (SDSERVE_CUDA_LINEAR=lt, opt-in) failing: their variants skipped.
    if grep -Eq "^test .*::lt_linear_(matches|reads).*FAILED" "$J/tests.txt"; then
        LT_FAILED=1
        say "cuBLASLt linear test failed: the SDSERVE_CUDA_LINEAR=lt variants are skipped"
    fi
    if grep -q "^test .*::lt_linear_is_captured.*FAILED" "$J/tests.txt"; then
        LT_GRAPH_FAILED=1
        say "cuBLASLt linear inside a CUDA graph failed its test: graph_lt_f16 is skipped"
    fi
    if grep -q "^test .*::nchw_projections.*FAILED" "$J/tests.txt"; then
        NCHW_FAILED=1
        say "cuBLASLt NCHW projection test failed: the SDSERVE_CUDA_LINEAR=lt_nchw variants are skipped"
    fi
    if grep -q "bias_add_covers.*FAILED" "$J/tests.txt"; then
        export SDSERVE_CUDA_KERNELS=attention,group_norm,layer_norm,geglu,conv
        say "bias_add test failed: measuring without it"
    fi
fi

# ---------------------------------------------------------------- the random full-size model
if want model && [[ -z $DRY ]] && [[ ! -f $MODEL/model_index.json ]]; then
    run_stage model 300 $PY "$G/tools/make_random_sd15.py" "$MODEL" --no-check
fi

bench() { # bench NAME LIMIT [ENV=..] -- ARGS...: ours ($BENCH_BIN, else $BIN), JSON into $J/NAME.json
    local name=$1 limit=$2
    shift 2
    local envs=()
    while [[ $1 != -- ]]; do envs+=("$1"); shift; done
    shift
    run_stage "$name" "$limit" env "${envs[@]}" "${BENCH_BIN:-$BIN}" bench --model "$MODEL" --device "$DEV" \
        --steps "$STEPS" "$@" >"$J/$name.json"
}
dbench() { # dbench NAME LIMIT [ENV=..] -- ARGS...: diffusers, JSON into $J/NAME.json
    local name=$1 limit=$2
    shift 2
    local envs=()
    while [[ $1 != -- ]]; do envs+=("$1"); shift; done
    shift
    if [[ -n $DRY ]]; then
        say "dry run: would run diffusers: ${envs[*]} bench_diffusers_gpu.py $*"
        $PY "$G/tools/bench_diffusers_gpu.py" --help >/dev/null || say "bench_diffusers_gpu.py broken"
        return 0
    fi
    run_stage "$name" "$limit" env "${envs[@]}" $PY "$G/tools/bench_diffusers_gpu.py" \
        --model "$MODEL" --steps "$STEPS" "$@" >"$J/$name.json"
}

# ---------------------------------------------------------------- measurements
# f16 under the default 5 GB plan, 512 and 768: steps, whole images, peak memory, PNGs.
if want ours_f16; then
    bench ours_f16 240 X=1 -- --dtype f16 --vram-limit-mb 5120 --sizes "$SIZES" \
        --repeats "$REPEATS" --seeds "$SEEDS" --png-dir "$WORK/png/ours_f16"
fi
if want diffusers_f16; then
    dbench diffusers_f16 240 X=1 -- --dtype fp16 --sizes "$SIZES" --repeats "$REPEATS" \
        --seeds "$SEEDS" --png-dir "$WORK/png/diffusers_f16" --profile
fi
# The strict f32 reference (no TF32 on either side), 512: step time and reference images.
if want diffusers_f32; then
    dbench diffusers_f32 180 NVIDIA_TF32_OVERRIDE=0 -- --dtype fp32 --sizes "${SIZES%%,*}" \
        --repeats 2 --seeds "$SEEDS" --png-dir "$WORK/png/diffusers_f32" --profile
fi
if want ours_f32; then
    bench ours_f32 180 NVIDIA_TF32_OVERRIDE=0 -- --dtype f32 --vram-limit-mb 200000 \
        --sizes "${SIZES%%,*}" --repeats 2 --seeds "$SEEDS" --png-dir "$WORK/png/ours_f32"
fi
# The GTX 1060 build's own device code in the whole pipeline (scripts/build-cuda.sh
# sm61-on-cu13: candle's kernels as sm_61 PTX from the sm61 build's nvcc, our kernels as its
# NVRTC 12 compiles them for compute_61, every architecture-dependent choice as on sm_61:
# CUDA-core attention, cuDNN and cuBLAS without tensor cores), all JIT-compiled forward by the
# driver: f16 under the default plan and f32, 512, images against diffusers fp32, step times,
# and device time per kind of op. If the f16 run fails it is retried with cuBLAS's default math
# (tensor cores allowed), and says so.
if want sm61_on_cu13; then
    if [[ -x $WORK/sm61-on-cu13/sdserve ]]; then
        one=${SIZES%%,*}
        as61=(SDSERVE_CUDA_ARCH_AS=61 "SDSERVE_CUDA_KERNELS_PTX=$WORK/sm61-on-cu13/sdserve_kernels_sm61.ptx")
        export BENCH_BIN=$WORK/sm61-on-cu13/sdserve
        bench sm61_f16 200 "${as61[@]}" -- --dtype f16 --vram-limit-mb 5120 --sizes "$one" \
            --repeats 2 --seeds "$SEEDS" --png-dir "$WORK/png/sm61_f16"
        rc=$?
        if ((rc != 0 && rc != 125)); then
            say "sm61_f16 failed: retrying with SDSERVE_CUBLAS_MATH=default"
            bench sm61_f16_blas_default 200 "${as61[@]}" SDSERVE_CUBLAS_MATH=default -- --dtype f16 \
                --vram-limit-mb 5120 --sizes "$one" --repeats 2 --seeds "$SEEDS" --png-dir "$WORK/png/sm61_f16_blas_default"
        fi
        bench sm61_f32 200 "${as61[@]}" NVIDIA_TF32_OVERRIDE=0 -- --dtype f32 --vram-limit-mb 200000 \
            --sizes "$one" --repeats 2 --seeds "$SEEDS" --png-dir "$WORK/png/sm61_f32"
        bench sm61_profile_f16 120 "${as61[@]}" SDSERVE_CUDA_PROFILE=1 -- --dtype f16 --vram-limit-mb 5120 \
            --sizes "$one" --repeats 1 --seeds "${SEEDS%%,*}"
        unset BENCH_BIN
        # Convolutions cuDNN could not plan with FMA math run through candle's path instead.
        n=$(grep -c "cuDNN cannot plan.*arch 61" "$LOG")
        echo "{\"convolutions_left_to_candle\": $n}" >"$J/sm61_cudnn.json"
        say "sm61_on_cu13: $n convolution shapes cuDNN could not plan as on sm_61 (0 expected)"
    else
        say "no sm61-on-cu13 binary staged: skipping"
    fi
fi

# The same binary with one of this session's changes undone, 512 and 768 (steps and images):
# the first tensor-core attention kernel, one block per group in group norm, cuDNN algorithms
# timed per shape instead of the heuristics' first pick. And the f32 step (512) with attention
# through candle's ops, as before the f32 kernel (ours_f32 runs the kernel).
if want variants; then
    # Linear layers as one cuBLASLt GEMM with bias and residual in its epilogue
    # (SDSERVE_CUDA_LINEAR=lt, off by default), against ours_f16 / ours_f32 of this run: f16
    # at 512 and 768, f32 (no TF32) at 512, and with the CUDA graph (capture must still work:
    # the log lines saying it failed are counted). Images against diffusers fp32 and the plain run.
    if [[ -z ${LT_FAILED:-} ]]; then
        nlt=$(grep -c "cuBLASLt cannot plan" "$LOG")
        bench lt_f16 150 SDSERVE_CUDA_LINEAR=lt -- --dtype f16 --vram-limit-mb 5120 --sizes "$SIZES" \
            --repeats 2 --seeds "${SEEDS%%,*}" --png-dir "$WORK/png/lt_f16"
        bench lt_f32 120 SDSERVE_CUDA_LINEAR=lt NVIDIA_TF32_OVERRIDE=0 -- --dtype f32 --vram-limit-mb 200000 \
            --sizes "${SIZES%%,*}" --repeats 2 --seeds "${SEEDS%%,*}" --png-dir "$WORK/png/lt_f32"
        ngr=$(grep -c "CUDA graph of the UNet step failed" "$LOG")
        [[ -n ${LT_GRAPH_FAILED:-} ]] || bench graph_lt_f16 150 SDSERVE_CUDA_GRAPH=1 SDSERVE_CUDA_LINEAR=lt -- \
            --dtype f16 --vram-limit-mb 5120 --sizes "$SIZES" --repeats 2 --seeds "${SEEDS%%,*}" \
            --png-dir "$WORK/png/graph_lt_f16"
        ngr=$(($(grep -c "CUDA graph of the UNet step failed" "$LOG") - ngr))
        # And the projections around each transformer on the NCHW image (no transposes, the
        # residual in proj_out's GEMM): SDSERVE_CUDA_LINEAR=lt_nchw.
        if [[ -z ${NCHW_FAILED:-} ]]; then
            bench lt_nchw_f16 150 SDSERVE_CUDA_LINEAR=lt_nchw -- --dtype f16 --vram-limit-mb 5120 \
                --sizes "$SIZES" --repeats 2 --seeds "${SEEDS%%,*}" --png-dir "$WORK/png/lt_nchw_f16"
        fi
        nlt=$(($(grep -c "cuBLASLt cannot plan" "$LOG") - nlt))
        echo "{\"linear_shapes_left_to_cublas\": $nlt, \"graph_lt_capture_failures\": $ngr}" >"$J/lt_checks.json"
        say "cuBLASLt: $nlt linear shapes it could not plan (0 expected); graph_lt: $ngr capture failures (0 expected)"
    fi
    # The UNet step as a CUDA graph (SDSERVE_CUDA_GRAPH=1, off by default): steps and images.
    bench graph_f16 150 SDSERVE_CUDA_GRAPH=1 -- --dtype f16 --vram-limit-mb 5120 --sizes "$SIZES" \
        --repeats 2 --seeds "${SEEDS%%,*}" --png-dir "$WORK/png/graph_f16"
    bench f32_candle_attention 150 SDSERVE_CUDA_ATTENTION_F32=candle NVIDIA_TF32_OVERRIDE=0 -- \
        --dtype f32 --vram-limit-mb 200000 --sizes "${SIZES%%,*}" --repeats 2 --seeds "${SEEDS%%,*}"
    for v in "attention_mma1:SDSERVE_CUDA_ATTENTION=mma1" "group_norm_single:SDSERVE_CUDA_GROUP_NORM=single" \
        "cudnn_find:SDSERVE_CUDNN_FIND=1"; do
        # shellcheck disable=SC2086
        bench "variant_${v%%:*}" 150 ${v#*:} -- --dtype f16 --vram-limit-mb 5120 --sizes "$SIZES" \
            --repeats 2 --seeds "${SEEDS%%,*}"
    done
fi
# Device time per kind of op (CUDA events around each of our calls; SDSERVE_CUDA_PROFILE=1):
# per denoising step and for the decode after the last step.
if want profile; then
    bench profile_f16 180 SDSERVE_CUDA_PROFILE=1 -- --dtype f16 --vram-limit-mb 5120 \
        --sizes "$SIZES" --repeats 1 --seeds "${SEEDS%%,*}"
    bench profile_f32 120 SDSERVE_CUDA_PROFILE=1 NVIDIA_TF32_OVERRIDE=0 -- --dtype f32 \
        --vram-limit-mb 200000 --sizes "${SIZES%%,*}" --repeats 1 --seeds "${SEEDS%%,*}"
    # The same with the cuBLASLt linear layers: "gemm_lt" replaces "gemm", and the bias adds
    # left are the convolutions' and the ResNets' time embedding; with lt_nchw also no
    # "transformer_io" (the NCHW <-> tokens copies and the transformer's residual add).
    if [[ -z ${LT_FAILED:-} ]]; then
        bench profile_lt_f16 150 SDSERVE_CUDA_PROFILE=1 SDSERVE_CUDA_LINEAR=lt -- --dtype f16 \
            --vram-limit-mb 5120 --sizes "$SIZES" --repeats 1 --seeds "${SEEDS%%,*}"
        [[ -n ${NCHW_FAILED:-} ]] || bench profile_lt_nchw_f16 150 SDSERVE_CUDA_PROFILE=1 \
            SDSERVE_CUDA_LINEAR=lt_nchw -- --dtype f16 --vram-limit-mb 5120 --sizes "$SIZES" \
            --repeats 1 --seeds "${SEEDS%%,*}"
    fi
fi
# What each lever is worth (512, f16, default plan): every kernel off, each one off, the
# host settings back to candle's defaults.
if want ablate; then
    one=${SIZES%%,*}
    for v in "none:SDSERVE_CUDA_KERNELS=none" \
        "no_attention:SDSERVE_CUDA_KERNELS=group_norm,layer_norm,geglu,bias_add,conv" \
        "no_group_norm:SDSERVE_CUDA_KERNELS=attention,layer_norm,geglu,bias_add,conv" \
        "no_layer_norm_geglu:SDSERVE_CUDA_KERNELS=attention,group_norm,bias_add,conv" \
        "no_bias_add:SDSERVE_CUDA_KERNELS=attention,group_norm,layer_norm,geglu,conv" \
        "no_conv:SDSERVE_CUDA_KERNELS=attention,group_norm,layer_norm,geglu,bias_add" \
        "candle_host:SDSERVE_CUDA_EVENT_TRACKING=1 SDSERVE_CUDA_POOL_KEEP_MB=0"; do
        # shellcheck disable=SC2086
        bench "ablate_${v%%:*}" 120 ${v#*:} -- --dtype f16 --vram-limit-mb 5120 --sizes "$one" \
            --repeats 2 --seeds 1
    done
fi
# The pre-Ampere code path (CUDA-core attention, what a GTX 1060 runs): our kernels compiled
# for compute_75 (the oldest NVRTC 13 targets) and JIT-compiled forward by the driver; then the
# same with the first CUDA-core attention kernel (one warp per query row) instead of the
# register-tiled one.
if want pre_ampere; then
    bench pre_ampere 150 SDSERVE_CUDA_KERNEL_ARCH=75 SDSERVE_CUDA_ATTENTION=${PRE_AMPERE_ATTENTION:-auto} -- \
        --dtype f16 --vram-limit-mb 5120 \
        --sizes "${SIZES%%,*}" --repeats 2 --seeds "$SEEDS" --png-dir "$WORK/png/pre_ampere"
    bench pre_ampere_simt_warp 120 SDSERVE_CUDA_KERNEL_ARCH=75 SDSERVE_CUDA_ATTENTION=simt_warp -- \
        --dtype f16 --vram-limit-mb 5120 --sizes "${SIZES%%,*}" --repeats 2 --seeds "${SEEDS%%,*}"
fi

# An upscaler model on the GPU: the hires fix (512 -> 1024, f16, default plan, Euler) with a
# full-size random 4x RRDBNet (the size of RealESRGAN_x4plus / 4x-UltraSharp, made here with
# torch alone) against Lanczos, the same binary: the second pass's transition (decode, upscale,
# encode), its steps, and peak memory with the network on the device (outside the memory plan).
if want upscalers; then
    net=$WORK/upscalers/4x-Random.pth
    mkdir -p "$WORK/upscalers"
    [[ -f $net ]] || run_stage upscaler_model 60 $PY "$G/tools/make_random_rrdbnet.py" "$net"
    dt=f16
    [[ -n $DRY ]] && dt=f32 # the CPU refuses f16
    for u in "lanczos:Lanczos" "rrdbnet:$net"; do
        bench "hires_${u%%:*}_f16" 150 -- --dtype $dt --vram-limit-mb 5120 --sizes "${SIZES%%,*}" \
            --repeats 2 --seeds "${SEEDS%%,*}" --schedulers euler --hires-scale 2 \
            --hires-upscaler "${u#*:}" --png-dir "$WORK/png/hires_${u%%:*}_f16"
    done
fi

# cuDNN's forward algorithm for the f16 convolutions (SDSERVE_CUDNN_ALGO; the default is
# implicit precomputed GEMM, `heuristic` asks cuDNN on every call).
if want algos; then
    for a in heuristic implicit_gemm gemm winograd_nonfused fft_tiling; do
        bench "algo_$a" 90 SDSERVE_CUDNN_ALGO=$a -- --dtype f16 --vram-limit-mb 5120 \
            --sizes "${SIZES%%,*}" --repeats 1 --seeds 1
    done
fi
# Pascal: candle's and our kernels as sm_61 PTX from clang (scripts/sm61-ptx.sh), loaded and
# JIT-compiled forward here; ours run against NumPy.
if want sm61 && [[ -d $G/sm61 ]]; then
    if [[ -n $DRY ]]; then
        say "dry run: would check $(ls "$G"/sm61/ | wc -l) PTX files with ptx_check_gpu.py"
    else
        run_stage sm61 180 $PY "$G/tools/ptx_check_gpu.py" "$G/sm61" >"$J/sm61_ptx.json"
    fi
fi

# ---------------------------------------------------------------- images and summary
if want summary; then
    ref=$WORK/png/diffusers_f32
    [[ -n $DRY ]] && ref=$WORK/png/ours_f32
    for ours in ours_f16 ours_f32 pre_ampere sm61_f16 sm61_f16_blas_default sm61_f32 diffusers_f16 graph_f16 \
        lt_f16 lt_f32 graph_lt_f16 lt_nchw_f16; do
        [[ -d $WORK/png/$ours && -d $ref ]] || continue
        $PY "$G/tools/compare_images.py" "$ref" "$WORK/png/$ours" --label "$ours-vs-$(basename "$ref")" \
            >"$J/compare_$ours.json" || say "compare $ours failed"
    done
    # The graph's images against the same binary's plain run (same seed): expected identical.
    if [[ -d $WORK/png/graph_f16 && -d $WORK/png/ours_f16 ]]; then
        $PY "$G/tools/compare_images.py" "$WORK/png/graph_f16" "$WORK/png/ours_f16" \
            --label graph-vs-plain >"$J/compare_graph_vs_plain.json" || say "compare graph failed"
    fi
    # cuBLASLt against the default path (same seed; one f16 rounding fewer: near, not equal),
    # its graph against its plain run (expected identical), the NCHW projections against it.
    for pair in "lt_f16:ours_f16:lt_vs_plain" "lt_f32:ours_f32:lt_f32_vs_plain" "graph_lt_f16:lt_f16:graph_lt_vs_lt" \
        "lt_nchw_f16:lt_f16:lt_nchw_vs_lt"; do
        IFS=: read -r a b label <<<"$pair"
        [[ -d $WORK/png/$a && -d $WORK/png/$b ]] || continue
        $PY "$G/tools/compare_images.py" "$WORK/png/$a" "$WORK/png/$b" --label "$label" \
            >"$J/compare_$label.json" || say "compare $label failed"
    done
    tar -C "$WORK" -czf "$OUT/images.tar.gz" png 2>/dev/null
    $PY "$G/tools/gpu_summary.py" "$J" >"$OUT/results.json.tmp" && mv "$OUT/results.json.tmp" "$OUT/results.json"
    $PY "$G/tools/gpu_summary.py" "$J" --table
fi
if [[ -s $OUT/skipped_stages ]]; then
    say "skipped for time: $(tr '\n' ' ' <"$OUT/skipped_stages")"
    say "run them next: STAGES=\"setup $(tr '\n' ' ' <"$OUT/skipped_stages")summary\" tools/gpu_session.sh"
fi
say "done"
