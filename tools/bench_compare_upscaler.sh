#!/usr/bin/env bash
# Runs our upscaler bench (crates/pipeline/benches/upscaler.rs: any file upscaler::Network reads,
# ESRGAN, Real-ESRGAN Compact or SwinIR) and spandrel's on torch
# (tools/bench_esrgan.py) back to back on the same model file, tile sides and thread count, then
# prints a table of medians and ours/spandrel ratios.
#
#   tools/bench_compare_upscaler.sh MODEL_FILE [THREADS] [TILES] [REPEATS] [IMAGE_SIZES]
#   e.g. python3 tools/bench_esrgan.py --make-random /tmp/esrgan-4x.pth   # full size, random
#        python3 tools/bench_esrgan.py --make-random /tmp/compact-4x.pth --arch compact
#        python3 tools/bench_esrgan.py --make-random /tmp/swinir-m-4x.pth --arch swinir
#        tools/bench_compare_upscaler.sh /tmp/swinir-m-4x.pth 2 64 3
#        tools/bench_compare_upscaler.sh /tmp/esrgan-4x.pth 2 64,192 3
# IMAGE_SIZES: A1111's whole tiled upscale of a picture of that side (ours only; "" none).
# Writes upscaler-ours.json, upscaler-spandrel.json and upscaler-compare.json in $OUT_DIR.
# PYTHON names a python with torch and spandrel (tools/requirements.txt).
set -euo pipefail
MODEL=${1:?upscaler model file}
THREADS=${2:-2}
TILES=${3:-64,192}
REPEATS=${4:-3}
IMAGES=${5-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT_DIR=${OUT_DIR:-.}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

# Build first so compile time is not measured, then run ours and spandrel's back to back.
(cd "$ROOT" && cargo bench -p sdserve-pipeline --bench upscaler --no-run)
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
(cd "$ROOT" && ESRGAN="$MODEL" cargo bench -p sdserve-pipeline --bench upscaler -- \
    --tiles "$TILES" --image-sizes "$IMAGES" --repeats "$REPEATS" \
    --json "$OUT_DIR/upscaler-ours.json" >/dev/null)
(cd "$ROOT/tools" && "${PYTHON:-python3}" bench_esrgan.py --model "$MODEL" --threads "$THREADS" \
    --tiles "$TILES" --repeats "$REPEATS" --json "$OUT_DIR/upscaler-spandrel.json" >/dev/null)

python3 - "$OUT_DIR" <<'PY'
import json, sys
d = sys.argv[1]
ours = json.load(open(f"{d}/upscaler-ours.json"))
ref = {s["stage"]: s for s in json.load(open(f"{d}/upscaler-spandrel.json"))["stages"]}
print(f"threads {ours['threads']}  model {ours['model']}")
print(f"{'stage':<24}{'ours s':>9}{'cpu s':>9}{'spandrel s':>12}{'cpu s':>9}{'ratio':>7}")
rows = []
for s in ours["stages"]:
    r = ref.get(s["stage"])
    ratio = s["median_s"] / r["median_s"] if r else None
    rows.append({"stage": s["stage"], "ours_s": s["median_s"], "ours_cpu_s": s["cpu_median_s"],
                 "spandrel_s": r and r["median_s"], "spandrel_cpu_s": r and r["cpu_median_s"],
                 "ratio": ratio})
    fmt = lambda v, w, f=".3f": f"{'-':>{w}}" if v is None else f"{v:{w}{f}}"
    print(f"{s['stage']:<24}{s['median_s']:9.3f}{fmt(s['cpu_median_s'], 9)}"
          f"{fmt(r and r['median_s'], 12)}{fmt(r and r['cpu_median_s'], 9)}{fmt(ratio, 7, '.2f')}")
json.dump({"threads": ours["threads"], "model": ours["model"], "rows": rows},
          open(f"{d}/upscaler-compare.json", "w"), indent=1)
PY
