#!/usr/bin/env bash
# Runs our network annotator bench (crates/pipeline/benches/annotators.rs) and the extension's
# own detector calls on torch (tools/bench_annotators.py) back to back on the same weights
# folder (tools/make_random_annotators.py: real widths, random weights), image and thread
# count, ROUNDS times interleaved (ours, torch, ours, torch, ...: a load that comes and goes
# hits both), then prints the median over the rounds of each side's median, and ours/torch.
#
#   tools/bench_compare_annotators.sh ANNOTATOR_DIR [THREADS] [REPEATS] [ROUNDS] [MODULES]
#   e.g. python3 tools/make_random_annotators.py --extension EXT /tmp/annotators
#        SD_WEBUI_CONTROLNET_DIR=EXT tools/bench_compare_annotators.sh /tmp/annotators 2 3 2
#        SD_WEBUI_CONTROLNET_DIR=EXT tools/bench_compare_annotators.sh /tmp/annotators 2 3 1 mlsd
# Writes annotators-ours.<round>.json, annotators-torch.<round>.json and
# annotators-compare.json in $OUT_DIR. PYTHON names a python with torch, opencv-python-headless,
# numpy, einops and safetensors; SD_WEBUI_CONTROLNET_DIR a checkout of the extension;
# DEPTH_ANYTHING_V2_DIR (optional) a checkout of the depth_anything_v2 package, for
# depth_anything_v2; DEPTH_ANYTHING_DIR and DINOV2_DIR (optional) checkouts of the
# depth_anything package and facebookresearch/dinov2, for depth_anything (both scripts leave
# each out without them).
set -euo pipefail
DIR=${1:?make_random_annotators.py folder}
THREADS=${2:-2}
REPEATS=${3:-3}
ROUNDS=${4:-1}
MODULES=${5-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=$(cd "$DIR" && pwd)
OUT_DIR=${OUT_DIR:-.}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
: "${SD_WEBUI_CONTROLNET_DIR:?a checkout of sd-webui-controlnet}"

# Build first so compile time is not measured.
(cd "$ROOT" && cargo bench -p sdserve-pipeline --bench annotators --no-run)
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
for r in $(seq 1 "$ROUNDS"); do
    echo "round $r: load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    (cd "$ROOT" && ANNOTATOR_DIR="$DIR" cargo bench -q -p sdserve-pipeline --bench annotators -- \
        --repeats "$REPEATS" --modules "$MODULES" --json "$OUT_DIR/annotators-ours.$r.json" >/dev/null)
    (cd "$ROOT/tools" && "${PYTHON:-python3}" bench_annotators.py --annotators "$DIR" \
        --threads "$THREADS" --repeats "$REPEATS" --modules "$MODULES" \
        --json "$OUT_DIR/annotators-torch.$r.json" >/dev/null)
done
echo "after: load $(cut -d' ' -f1-3 /proc/loadavg)" >&2

python3 - "$OUT_DIR" "$ROUNDS" <<'PY'
import json, statistics, sys
d, rounds = sys.argv[1], int(sys.argv[2])
def medians(side):
    """Per stage, the median over the rounds of each round's median wall and CPU seconds."""
    runs = [json.load(open(f"{d}/annotators-{side}.{r}.json")) for r in range(1, rounds + 1)]
    out = {}
    for s0 in runs[0]["stages"]:
        same = [s for run in runs for s in run["stages"] if s["stage"] == s0["stage"]]
        out[s0["stage"]] = (statistics.median(s["median_s"] for s in same),
                            statistics.median(s["cpu_median_s"] for s in same))
    return runs[0], out
ours_run, ours = medians("ours")
torch_run, ref = medians("torch")
print(f"threads {ours_run['threads']}  rounds {rounds}  torch {torch_run.get('torch')}  "
      f"peak RSS {ours_run['peak_rss_mb']} MB against {torch_run['peak_rss_mb']} MB")
print(f"{'stage':<28}{'ours s':>8}{'cpu s':>8}{'torch s':>9}{'cpu s':>8}{'ratio':>7}{'cpu ratio':>10}")
rows = []
for name, (o, oc) in ours.items():
    t, tc = ref.get(name, (None, None))
    ratio = o / t if t else None
    cpu_ratio = oc / tc if tc else None
    rows.append({"stage": name, "ours_s": o, "ours_cpu_s": oc, "torch_s": t, "torch_cpu_s": tc,
                 "ratio": ratio, "cpu_ratio": cpu_ratio})
    fmt = lambda v, w: f"{'-':>{w}}" if v is None else f"{v:{w}.3f}"
    print(f"{name:<28}{o:8.3f}{oc:8.3f}{fmt(t, 9)}{fmt(tc, 8)}{fmt(ratio, 7)}{fmt(cpu_ratio, 10)}")
json.dump({"threads": ours_run["threads"], "rounds": rounds, "rows": rows},
          open(f"{d}/annotators-compare.json", "w"), indent=1)
PY
