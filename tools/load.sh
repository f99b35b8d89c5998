#!/usr/bin/env bash
# Load and soak figures for README's reliability section, with oha (crates.io) against the real
# binary and its fake generator (so the figures are the server's, not the model's).
#
#   tools/load.sh [burst|soak|all]      (default: all)
#
# burst: far past the admission limits: 200 connections posting /generate at a server admitting
#        MAX_CONCURRENT_REQUESTS=4 (expect 429 overloaded, no 5xx) while /health is timed; then
#        2000 requests at RATE_LIMIT_PER_MINUTE=600 (expect 600 answered, the rest 429).
# soak:  SOAK_SECONDS (600) of mixed traffic: valid generations, invalid bodies, requests without
#        a key, generations the client abandons after 30 ms (cancelled), /health; RSS sampled
#        every 30 s. Fails on any 5xx or an RSS growth past RSS_GROWTH_MB (16). Finished jobs are
#        kept JOB_TTL_SECONDS (here 30, so the soak reaches its steady state in its first 30 s;
#        with the server's default of 600 the records of the last 10 minutes are held, about
#        35 KB per finished job with this fake's images: 171 MB after 600 s at 8 jobs/s).
#
# Env: SDSERVE (binary, default target/debug/sdserve), OHA (default: oha on PATH, else
# /tmp/security-oha/bin/oha; install: cargo install oha --locked --root /tmp/oha
# --target-dir /tmp/oha-target), OUT (results folder, default target/load).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-all}
SDSERVE=${SDSERVE:-target/debug/sdserve}
OHA=${OHA:-$(command -v oha || echo /tmp/security-oha/bin/oha)}
OUT=${OUT:-target/load}
SOAK_SECONDS=${SOAK_SECONDS:-600}
RSS_GROWTH_MB=${RSS_GROWTH_MB:-16}
KEY=load-test-key
mkdir -p "$OUT"
[ -x "$SDSERVE" ] || { echo "no binary at $SDSERVE (cargo build -p sdserve)" >&2; exit 1; }
[ -x "$OHA" ] || { echo "no oha at $OHA" >&2; exit 1; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# start_server NAME ENV... : starts sdserve, sets ADDR and SPID.
start_server() {
  local name=$1; shift
  local log="$OUT/$name.log"
  env -i PATH="$PATH" HOST=127.0.0.1 PORT=0 LOG_FORMAT=json LOG_LEVEL=warn,sdserve::serve=info \
    "$@" "$SDSERVE" serve >"$log" 2>&1 &
  SPID=$!
  PIDS+=("$SPID")
  ADDR=
  for _ in $(seq 200); do
    ADDR=$(grep -o '"addr":"[^"]*"' "$log" | head -1 | cut -d'"' -f4 || true)
    [ -n "$ADDR" ] && break
    sleep 0.1
  done
  [ -n "$ADDR" ] || { cat "$log"; echo "sdserve did not start" >&2; exit 1; }
  until curl -fsS "http://$ADDR/health" >/dev/null 2>&1; do sleep 0.1; done
}

rss_mb() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }

# oha_json NAME ARGS... : one oha run, JSON kept in $OUT/NAME.json.
oha_json() {
  local name=$1; shift
  "$OHA" --no-tui --output-format json "$@" >"$OUT/$name.json"
}

# summary FILE: statuses, p50/p99 in ms, errors.
summary() {
  python3 - "$1" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
s = j["summary"]; p = j.get("latencyPercentiles", {})
ms = lambda v: "-" if v is None else f"{v*1000:.1f}"
codes = j.get("statusCodeDistribution", {})
errs = j.get("errorDistribution", {})
print(f"requests/s {s.get('requestsPerSec', 0):.0f}  p50 {ms(p.get('p50'))} ms  p99 {ms(p.get('p99'))} ms  "
      f"statuses {dict(sorted(codes.items()))}  client-side errors {errs or 'none'}")
EOF
}

# no_5xx FILE...: fails if any run saw a 5xx.
no_5xx() {
  python3 - "$@" <<'EOF'
import json, sys
bad = {f: c for f in sys.argv[1:] for c, n in json.load(open(f)).get("statusCodeDistribution", {}).items() if c.startswith("5")}
if bad:
    sys.exit(f"5xx answers: {bad}")
EOF
}

GEN='{"prompt":"a lighthouse","steps":4,"width":256,"height":256}'
SLOW='{"prompt":"a lighthouse","steps":50,"width":256,"height":256}'

burst() {
  echo "== burst: 200 connections x 4000 POST /generate, MAX_CONCURRENT_REQUESTS=4, fake 10 ms/step"
  start_server burst SDSERVE_FAKE_GENERATOR=step_ms=10 MAX_CONCURRENT_REQUESTS=4 API_KEYS=$KEY \
    RESPONSE_CACHE_MB=0
  local rss0; rss0=$(rss_mb "$SPID")
  oha_json burst-health -z 12s -c 2 -q 50 "http://$ADDR/health" &
  local hp=$!
  sleep 1
  oha_json burst-generate -n 4000 -c 200 -m POST -T application/json -H "X-Api-Key: $KEY" \
    -d "$GEN" "http://$ADDR/generate"
  wait $hp
  echo "generate: $(summary "$OUT/burst-generate.json")"
  echo "health during the burst: $(summary "$OUT/burst-health.json")"
  echo "RSS before $rss0 MB, after $(rss_mb "$SPID") MB"
  no_5xx "$OUT/burst-generate.json" "$OUT/burst-health.json"
  kill "$SPID"

  echo "== rate limit: 2000 GET /openapi.json at RATE_LIMIT_PER_MINUTE=600, one key"
  start_server ratelimit SDSERVE_FAKE_GENERATOR=step_ms=0 API_KEYS=$KEY RATE_LIMIT_PER_MINUTE=600
  oha_json ratelimit -n 2000 -c 50 -H "X-Api-Key: $KEY" "http://$ADDR/openapi.json"
  echo "openapi.json: $(summary "$OUT/ratelimit.json")"
  no_5xx "$OUT/ratelimit.json"
  kill "$SPID"
}

soak() {
  echo "== soak: ${SOAK_SECONDS}s of mixed traffic (fake 20 ms/step, MAX_CONCURRENT_REQUESTS=4)"
  start_server soak SDSERVE_FAKE_GENERATOR=step_ms=20 MAX_CONCURRENT_REQUESTS=4 API_KEYS=$KEY \
    RESPONSE_CACHE_MB=64 JOB_TTL_SECONDS=${JOB_TTL_SECONDS:-30}
  # Warm up (allocator pools, first requests), then take the starting RSS.
  "$OHA" --no-tui --output-format quiet -n 50 -c 4 -m POST -T application/json -H "X-Api-Key: $KEY" \
    -d "$GEN" "http://$ADDR/generate" || true
  local rss0; rss0=$(rss_mb "$SPID")
  local z="${SOAK_SECONDS}s"
  local auth=(-H "X-Api-Key: $KEY")
  oha_json soak-valid -z "$z" -c 2 -q 4 -m POST -T application/json "${auth[@]}" -d "$GEN" "http://$ADDR/generate" &
  local p1=$!
  oha_json soak-invalid -z "$z" -c 2 -q 20 -m POST -T application/json "${auth[@]}" \
    -d '{"prompt":"x","steps":0,"width":100,"sampler":"?"}' "http://$ADDR/generate" &
  local p2=$!
  oha_json soak-badjson -z "$z" -c 1 -q 10 -m POST -T application/json "${auth[@]}" -d '{"prompt":' "http://$ADDR/generate" &
  local p3=$!
  oha_json soak-nokey -z "$z" -c 2 -q 20 "http://$ADDR/metrics" &
  local p4=$!
  oha_json soak-cancelled -z "$z" -c 2 -q 4 -t 30ms -m POST -T application/json "${auth[@]}" -d "$SLOW" "http://$ADDR/generate" &
  local p5=$!
  oha_json soak-health -z "$z" -c 1 -q 10 "http://$ADDR/health" &
  local p6=$!
  echo "seconds,rss_mb" >"$OUT/soak-rss.csv"
  local t=0
  while [ $t -lt "$SOAK_SECONDS" ]; do
    echo "$t,$(rss_mb "$SPID")" >>"$OUT/soak-rss.csv"
    sleep 30; t=$((t + 30))
  done
  wait $p1 $p2 $p3 $p4 $p5 $p6
  sleep 2
  local rss1; rss1=$(rss_mb "$SPID")
  echo "$SOAK_SECONDS,$rss1" >>"$OUT/soak-rss.csv"
  for f in valid invalid badjson nokey cancelled health; do
    echo "$f: $(summary "$OUT/soak-$f.json")"
  done
  echo "cancelled runs (server): $(curl -fsS -H "X-Api-Key: $KEY" "http://$ADDR/metrics" | grep '^sdserve_cancelled_total' || true)"
  echo "rejections: $(curl -fsS -H "X-Api-Key: $KEY" "http://$ADDR/metrics" | grep '^sdserve_rejections_total' | tr '\n' ' ')"
  echo "RSS after warm-up $rss0 MB, at the end $rss1 MB (samples in $OUT/soak-rss.csv)"
  no_5xx "$OUT"/soak-*.json
  python3 -c "import sys; a, b, lim = map(float, sys.argv[1:]); sys.exit(f'RSS grew {b-a:.1f} MB > {lim} MB' if b - a > lim else 0)" \
    "$rss0" "$rss1" "$RSS_GROWTH_MB"
  kill "$SPID"
}

case "$MODE" in
  burst) burst ;;
  soak) soak ;;
  all) burst; soak ;;
  *) echo "usage: $0 [burst|soak|all]" >&2; exit 2 ;;
esac
echo "== ok"
