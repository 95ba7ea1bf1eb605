#!/usr/bin/env bash
# Memory over a long call run: runs bench/run.sh with LEAK_SECS of calls at LEAK_RATE calls/s
# (as 30-second steps back to back: the shared harness caps a step at 30 s) and samples every
# process's RSS every SAMPLE_SECS. Prints, per processor, RSS at minute 1 and at the end, and
# their ratio (the target: within 10 %).
#
#   LEAK_RATE=950 bash bench/leak.sh              # 5 minutes at 950 calls/s
#   LEAK_RATE=500 LEAK_SECS=120 bash bench/leak.sh
#
# Everything else (USERS, PROCESSORS, OUT_DIR, BUILD, ...) is bench/run.sh's.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LEAK_RATE=${LEAK_RATE:?set LEAK_RATE, e.g. half the maximum calls/s}
LEAK_SECS=${LEAK_SECS:-300}
SAMPLE_SECS=${SAMPLE_SECS:-10}
export OUT_DIR=${OUT_DIR:-/tmp/sipalias-leak-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR"
BIN=${CARGO_TARGET_DIR:-$REPO/target}/release

steps=$(( (LEAK_SECS + 29) / 30 ))
rates=$(for _ in $(seq "$steps"); do printf '%s ' "$LEAK_RATE"; done)
PHASES="prime calls" CALL_RATES="${rates% }" REFINE=0 HALF_RATE_STEP=0 STEP_SECS=30 \
  bash "$REPO/bench/run.sh" > "$OUT_DIR/run.log" 2>&1 &
RUN=$!
trap 'kill "$RUN" 2>/dev/null || true' INT TERM

# Sample from the first calls step until the run ends (the steps have short pauses between
# them, so the cluster's own end is the only reliable one).
samples="$OUT_DIR/rss.tsv"
echo -e "t_s\tprocess\trss_kb" > "$samples"
while kill -0 "$RUN" 2>/dev/null && ! pgrep -f "uac_call.xml" >/dev/null; do sleep 1; done
t0=$(date +%s)
while kill -0 "$RUN" 2>/dev/null; do
  t=$(($(date +%s) - t0))
  # Transactions and dialogs per processor, from the cluster view, next to the RSS.
  "$BIN/sipalias-dispatcher" status --grpc "http://127.0.0.1:${GRPC_PORT:-17070}" 2>/dev/null \
    | awk -v t="$t" 'NR > 2 && NF >= 8 { print t "\tview:" $1 "\ttx=" $(NF-3) " dialogs=" $(NF-2) }' \
    >> "$OUT_DIR/view.tsv" || true
  for name in processor dispatcher billing; do
    for pid in $(pgrep -f "$BIN/sipalias-$name" || true); do
      rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
      [ -n "$rss" ] && echo -e "$t\t$name:$pid\t$rss" >> "$samples"
    done
  done
  sleep "$SAMPLE_SECS"
done
wait "$RUN" || true

grep -E "^step sipalias calls" "$OUT_DIR/run.log" | sed -e 's/cpu_sipp.*//' || true
awk -F'\t' 'NR > 1 { if (!($2 in first) && $1 >= 60) first[$2] = $3; last[$2] = $3; lt[$2] = $1 }
  END { for (p in last) if (p ~ /^processor/ && (p in first))
    printf "sipalias leak process=%s rss_kb_minute1=%d rss_kb_end=%d end_s=%d ratio=%.3f\n", p, first[p], last[p], lt[p], last[p] / first[p] }' "$samples"
echo "samples: $samples (transactions and dialogs: $OUT_DIR/view.tsv)"
