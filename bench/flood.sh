#!/usr/bin/env bash
# sipalias under a flood (issue 11, docs/security.md "Floods"): while legitimate calls run from
# one address, a flooder sends unauthenticated INVITEs at FLOOD_RATE for FLOOD_SECS, from one
# source (MODE=single) or from SOURCES addresses on 127.0.1.x, each below the per-source rate
# limit (MODE=spoofed, the style of a spoofed-source flood). With every defence at its default
# (the load generator is NOT exempted from the rate limit here), it reports:
#
#   - legitimate calls/s before and during the flood, and their ratio (target >= 0.5);
#   - HELD calls set up before the flood and hung up after it: how many ended normally (target:
#     all);
#   - peak RSS of the dispatcher and every processor before and during the flood, and the ratio
#     (target <= 2);
#   - whether every process is still running, the dispatcher's guard counters (bans).
#
#   bash bench/flood.sh                          # MODE=single, then MODE=spoofed: see below
#   MODE=spoofed SOURCES=30 bash bench/flood.sh
#
# Environment (defaults in brackets): MODE [both: single then spoofed, each on a fresh cluster]
#   FLOOD_RATE [12000: about 5x the cluster's maximum sustained calls/s on a 2-core host]
#   FLOOD_SECS [60]  SOURCES [30]  LEGIT_RATE [50 calls/s]  BASE_SECS [20]  HELD [100]
#   USERS [2000]  BUILD [1]  and everything bench/run.sh takes (it starts and stops the cluster).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ "${1:-}" != --inside ]; then
  MODE=${MODE:-both}
  modes=$MODE
  [ "$MODE" = both ] && modes="single spoofed"
  for m in $modes; do
    case "$m" in single | spoofed) ;; *) echo "flood: MODE must be single, spoofed or both" >&2; exit 2 ;; esac
    MODE=$m EXEMPT_LOAD_GENERATOR=0 PHASES=prime PRIME_RATE=${PRIME_RATE:-200} \
      USERS=${USERS:-2000} HALF_RATE_STEP=0 LOAD_CMD="bash '$REPO/bench/flood.sh' --inside" \
      bash "$REPO/bench/run.sh"
    BUILD=0
    export BUILD
  done
  exit 0
fi

# ---- inside bench/run.sh: the cluster is up and USERS are registered -------------------------
FLOOD_RATE=${FLOOD_RATE:-12000}
FLOOD_SECS=${FLOOD_SECS:-60}
SOURCES=${SOURCES:-30}
LEGIT_RATE=${LEGIT_RATE:-50}
BASE_SECS=${BASE_SECS:-20}
HELD=${HELD:-100}
SCEN=${SHARED_BENCH:-$REPO/../shared/bench}/scenarios
D=$OUT_DIR/flood-$MODE
mkdir -p "$D"
say() { echo "flood[$MODE]: $*"; }
PIDS=()
cleanup() { local p; for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

pid() { echo "$CPU_WATCH" | tr ' ' '\n' | awk -F: -v n="$1" '$1 == n { print $2 }'; }
WATCH=$(echo "$CPU_WATCH" | tr ' ' '\n' | cut -d: -f1 | grep -E '^(dispatcher|p[0-9]+)$' | paste -sd' ')
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$(pid "$1")/status" 2>/dev/null || echo 0; }
# sample_rss FILE SECS: the largest RSS of each watched process, sampled every second.
sample_rss() {
  local f=$1 n=$2 i p
  : > "$f"
  for i in $(seq 1 "$n"); do
    for p in $WATCH; do echo "$p $(rss_kb "$p")"; done >> "$f"
    sleep 1
  done
}
peak() { awk -v p="$2" '$1 == p && $2 > m { m = $2 } END { print m + 0 }' "$1"; }
# stat_col FILE COLUMN: the last value of COLUMN in a sipp -trace_stat file (0 when missing).
stat_col() { awk -F';' -v col="$2" 'NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i; next } { l = $0 }
  END { split(l, f, ";"); print f[c[col]] + 0 }' "$1" 2>/dev/null || echo 0; }
succ() { stat_col "$1" "SuccessfulCall(C)"; }

# The callee phones (every registered user's Contact is the UAS).
sipp -sf "$SCEN/uas_callee.xml" -i "$UAS_IP" -p "$UAS_PORT" -nostdin -trace_stat -stf "$D/uas.stat.csv" \
  -fd 1 > "$D/uas.out" 2>&1 &
PIDS+=($!)
sleep 0.5

# Calls up before the flood and hung up after it (their BYE crosses the end of the flood).
hold_ms=$(((BASE_SECS + FLOOD_SECS + 15) * 1000))
sipp "$MAIN_IP:$SIP_PORT" -sf "$SCEN/uac_call.xml" -inf "$OUT_DIR/calls.csv" -key domain "$SIP_DOMAIN" \
  -i "$UAC_IP" -p 5072 -d "$hold_ms" -r 10 -m "$HELD" -nostdin -recv_timeout 20000 \
  -timeout "$((hold_ms / 1000 + 60))s" -timeout_error -trace_stat -stf "$D/held.stat.csv" -fd 1 \
  > "$D/held.out" 2>&1 &
HELD_PID=$!
PIDS+=("$HELD_PID")

# legit SECS FILE: legitimate calls at LEGIT_RATE for SECS from UAC_IP.
legit() {
  sipp "$MAIN_IP:$SIP_PORT" -sf "$SCEN/uac_call.xml" -inf "$OUT_DIR/calls.csv" -key domain "$SIP_DOMAIN" \
    -i "$UAC_IP" -p 5071 -d 200 -r "$LEGIT_RATE" -m "$((LEGIT_RATE * $1))" -nostdin -recv_timeout 10000 \
    -timeout "$(($1 + 40))s" -timeout_error -trace_stat -stf "$2" -fd 1 > "${2%.stat.csv}.out" 2>&1
}

say "baseline: $LEGIT_RATE calls/s for $BASE_SECS s, $HELD calls held"
t0=$(date +%s.%N)
sample_rss "$D/rss-base.txt" "$BASE_SECS" &
RSS_PID=$!
legit "$BASE_SECS" "$D/legit-base.stat.csv"
t1=$(date +%s.%N)
wait "$RSS_PID" || true
base_ok=$(succ "$D/legit-base.stat.csv")
base_rate=$(awk -v s="$base_ok" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", s / (b - a) }')

say "flood: $FLOOD_RATE INVITE/s for $FLOOD_SECS s ($MODE), legitimate calls going on"
FLOOD_PIDS=()
if [ "$MODE" = single ]; then
  srcs=("127.0.0.20")
else
  srcs=()
  for i in $(seq 1 "$SOURCES"); do srcs+=("127.0.1.$i"); done
fi
per=$((FLOOD_RATE / ${#srcs[@]}))
for s in "${srcs[@]}"; do
  sipp "$MAIN_IP:$SIP_PORT" -sf "$REPO/bench/sipp/flood_invite.xml" -key domain "$SIP_DOMAIN" \
    -i "$s" -p 5090 -r "$per" -m "$((per * FLOOD_SECS))" -nostdin -timeout "$((FLOOD_SECS + 20))s" \
    -trace_stat -stf "$D/flood-$s.stat.csv" -fd 1 > "$D/flood-$s.out" 2>&1 &
  FLOOD_PIDS+=($!)
  PIDS+=($!)
done
t2=$(date +%s.%N)
sample_rss "$D/rss-flood.txt" "$FLOOD_SECS" &
RSS_PID=$!
legit "$FLOOD_SECS" "$D/legit-flood.stat.csv"
t3=$(date +%s.%N)
wait "$RSS_PID" || true
for p in "${FLOOD_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
t4=$(date +%s.%N)
flood_ok=$(succ "$D/legit-flood.stat.csv")
flood_rate=$(awk -v s="$flood_ok" -v a="$t2" -v b="$t3" 'BEGIN { printf "%.1f", s / (b - a) }')
sent=0
for s in "${srcs[@]}"; do sent=$((sent + $(stat_col "$D/flood-$s.stat.csv" TotalCallCreated))); done
sent_rate=$(awk -v n="$sent" -v a="$t2" -v b="$t4" 'BEGIN { printf "%.0f", n / (b - a) }')

say "waiting for the $HELD held calls to hang up"
wait "$HELD_PID" || true
held_ok=$(succ "$D/held.stat.csv")
held_failed=$(stat_col "$D/held.stat.csv" "FailedCall(C)")

alive=yes
for p in $WATCH billing redis; do kill -0 "$(pid "$p")" 2>/dev/null || alive="no ($p gone)"; done
rss=""
worst=0
for p in $WATCH; do
  b=$(peak "$D/rss-base.txt" "$p"); f=$(peak "$D/rss-flood.txt" "$p")
  r=$(awk -v b="$b" -v f="$f" 'BEGIN { printf "%.2f", b ? f / b : 0 }')
  worst=$(awk -v w="$worst" -v r="$r" 'BEGIN { print (r > w) ? r : w }')
  rss="$rss ${p}_kb=$b->$f(${r}x)"
done
ratio=$(awk -v a="$base_rate" -v b="$flood_rate" 'BEGIN { printf "%.2f", a ? b / a : 0 }')
bans=$("$BIN/sipalias-dispatcher" bans --config "$CFG" 2>&1 | head -1 | sed 's/^dispatcher [^:]*: //')
line="flood mode=$MODE sources=${#srcs[@]} asked_per_s=$FLOOD_RATE sent_per_s=$sent_rate secs=$FLOOD_SECS"
line="$line legit_base_per_s=$base_rate legit_flood_per_s=$flood_rate legit_ratio=$ratio"
line="$line held_ok=$held_ok/$HELD held_failed=$held_failed rss_peak_ratio=$worst$rss alive=$alive"
echo "$line"
echo "flood guard: $bans"
echo "$line" > "$D/summary.txt"
echo "flood guard: $bans" >> "$D/summary.txt"
