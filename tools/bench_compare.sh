#!/usr/bin/env bash
# Runs our stage bench and diffusers' (tools/bench_diffusers.py) back to back on the same model
# folder, sizes and thread count, then prints a table of medians and ours/diffusers ratios.
#
#   tools/bench_compare.sh MODEL_DIR [THREADS] [SIZES] [REPEATS] [FULL_SIZES] [STEPS] [IMAGE_SIZES]
#   e.g. tools/bench_compare.sh /work/models/sd15-random 2 256,512 3 256 20 512
# IMAGE_SIZES: img2img (strength 0.75) and inpaint (strength 1.0) generations, both sides ("": none).
# LORA_DIR=DIR LORA=NAME [LORA_SIZES=512] [LORA_STEPS=STEPS]: also our LoRA cost (merge, restore, generations with and
# without it; tools/make_random_lora.py writes one), ours only.
# Then tools/bench_load.py: start-up of both as whole processes (load warm and cold, peak RSS through
# one request; SKIP_LOAD=1 skips it, DIFFUSERS_PYTHON names a python with torch + diffusers).
# Writes bench-ours.json, bench-diffusers.json, bench-compare.json and bench-load.json in $OUT_DIR.
set -euo pipefail
MODEL=${1:?model folder}
THREADS=${2:-2}
SIZES=${3:-256,512}
REPEATS=${4:-3}
FULL=${5-256}  # an empty list ("") skips whole generations
STEPS=${6:-20}
IMAGES=${7-512}
LORA_ARGS=()
if [ -n "${LORA:-}" ]; then
    LORA_ARGS=(--lora-dir "${LORA_DIR:?LORA_DIR}" --lora "$LORA" --lora-sizes "${LORA_SIZES:-512}" --lora-steps "${LORA_STEPS:-$STEPS}")
fi
OUT_DIR=${OUT_DIR:-.}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

# Build first so compile time is not measured, then run ours and diffusers back to back.
(cd "$ROOT" && cargo bench -p sdserve-pipeline --bench stages --no-run)
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
(cd "$ROOT" && MODEL_DIR="$MODEL" cargo bench -p sdserve-pipeline --bench stages -- \
    --sizes "$SIZES" --repeats "$REPEATS" --full-sizes "$FULL" --steps "$STEPS" \
    --image-sizes "$IMAGES" "${LORA_ARGS[@]}" --json "$OUT_DIR/bench-ours.json" >/dev/null)
"${DIFFUSERS_PYTHON:-python3}" "$ROOT/tools/bench_diffusers.py" --model "$MODEL" --threads "$THREADS" \
    --sizes "$SIZES" --repeats "$REPEATS" --full-sizes "$FULL" --steps "$STEPS" \
    --image-sizes "$IMAGES" --json "$OUT_DIR/bench-diffusers.json" >/dev/null

python3 - "$OUT_DIR" <<'PY'
import json, sys
d = sys.argv[1]
ours = json.load(open(f"{d}/bench-ours.json"))
ref = json.load(open(f"{d}/bench-diffusers.json"))
refs = {s["stage"]: s for s in ref["stages"]}
rows = []
print(f"threads {ours['threads']}  model {ours['model']}")
print(f"{'stage':<34}{'ours s':>9}{'(min-max)':>17}{'cpu s':>9}{'diffusers s':>13}{'(min-max)':>17}{'cpu s':>9}{'ratio':>7}{'cpu ratio':>10}")
def num(v, w, f=".3f"):
    return f"{'-':>{w}}" if v is None else f"{v:{w}{f}}"
for s in ours["stages"]:
    r = refs.get(s["stage"])
    ratio = s["median_s"] / r["median_s"] if r and r["median_s"] > 0 else None
    cpu, rcpu = s.get("cpu_median_s"), (r or {}).get("cpu_median_s")
    cpu_ratio = cpu / rcpu if cpu and rcpu else None
    rows.append({"stage": s["stage"], "ours_s": s["median_s"],
                 "diffusers_s": r["median_s"] if r else None, "ratio": ratio,
                 "ours_cpu_s": cpu, "diffusers_cpu_s": rcpu, "cpu_ratio": cpu_ratio,
                 "ours_peak_rss_mb": s["peak_rss_mb"],
                 "diffusers_peak_rss_mb": r["peak_rss_mb"] if r else None})
    rs = f"{r['median_s']:13.3f}{'(' + format(r['min_s'], '.2f') + '-' + format(r['max_s'], '.2f') + ')':>17}" if r else f"{'-':>13}{'':>17}"
    print(f"{s['stage']:<34}{s['median_s']:9.3f}{'(' + format(s['min_s'], '.2f') + '-' + format(s['max_s'], '.2f') + ')':>17}"
          f"{num(cpu, 9)}{rs}{num(rcpu, 9)}{num(ratio, 7, '.2f')}{num(cpu_ratio, 10, '.2f')}")
print(f"{'peak RSS MB':<34}{ours['peak_rss_mb']:9.0f}{'':>17}{ref['peak_rss_mb']:13.0f}")
print(f"{'weights RSS MB':<34}{ours['weights_rss_mb']:9.0f}{'':>17}{ref['weights_rss_mb']:13.0f}")
print(f"{'load peak RSS MB':<34}{ours['load_peak_rss_mb']:9.0f}{'':>17}{ref['load_peak_rss_mb']:13.0f}")
json.dump({"threads": ours["threads"], "model": ours["model"], "rows": rows,
           "ours_peak_rss_mb": ours["peak_rss_mb"], "ours_weights_rss_mb": ours["weights_rss_mb"],
           "diffusers_peak_rss_mb": ref["peak_rss_mb"]}, open(f"{d}/bench-compare.json", "w"), indent=1)
PY

# Start-up as whole processes (load warm and cold, peak RSS through one request), unless SKIP_LOAD=1.
if [ "${SKIP_LOAD:-0}" != 1 ]; then
    (cd "$ROOT" && cargo build --release -p sdserve)
    python3 "$ROOT/tools/bench_load.py" --model "$MODEL" --sdserve "$ROOT/target/release/sdserve" \
        --python "${DIFFUSERS_PYTHON:-python3}" --threads "$THREADS" --sizes 256,512 --cold 256 \
        --repeats "$REPEATS" --json "$OUT_DIR/bench-load.json" >/dev/null
fi
