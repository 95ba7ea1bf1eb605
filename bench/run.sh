#!/usr/bin/env bash
# sipalias load benchmark: starts a cluster of its own (Redis, billing, 1 dispatcher, PROCESSORS
# processors) from a benchmark config, provisions USERS accounts, and drives it with the shared
# sipp harness (../shared/bench/lib/run-load.sh, the same load the Kamailio anchor gets).
#
#   bash bench/run.sh                                     # full ladder (~10 min on a quiet host)
#   STEP_SECS=3 REG_RATES=100 CALL_RATES=50 REFINE=0 USERS=200 bash bench/run.sh   # smoke
#   PROCESSORS=4 bash bench/run.sh                        # scale-out check (CPU µs per call)
#
# It prints the run-load figures (REGISTER/s, calls/s, CPU % and µs per operation of every
# process) and adds: the total sipalias CPU µs per operation, call-setup latency p50/p99 (sipp
# buckets) at the maximum and at half of it, peak RSS per process, Redis memory per binding,
# and, with ANCHOR_SUMMARY, the ratios to a Kamailio anchor run. See docs/benchmarks.md.
#
# Everything it starts is stopped again, by PID, on exit (also on Ctrl-C or an error).
#
# Environment (defaults in brackets):
#   USERS [10000]  PROCESSORS [2]  OUT_DIR [/tmp/sipalias-bench-<time>]  BUILD [1: cargo build --release]
#   MAIN_IP [127.0.0.1]  ALIAS_IP [127.0.0.2]  SIP_PORT [5060]  SIP_DOMAIN [bench.local]
#   GRPC_PORT [17070: dispatcher edge]  BILLING_PORT [17080]  REDIS_PORT [0: unix socket in OUT_DIR]
#   PROVISION [pipe: HA1s computed here, written with one redis-cli --pipe | cli: the billing CLI,
#              PROVISION_JOBS [2] in parallel]
#   RUST_LOG [warn: like the anchor's debug=0; info logs every REGISTER and call]
#   HALF_RATE_STEP [1: one more calls step at half the maximum, for the p99 target]
#   ANCHOR_SUMMARY [-: a Kamailio summary (shared/bench/results/*.txt or <run dir>/anchor-summary.txt)
#                   to print ratios against]
#   SHARED_BENCH [../shared/bench]
#   EXEMPT_LOAD_GENERATOR [1: UAC_IP and UAS_IP in rate_limit_exempt. One sipp sends tens of
#                          thousands of messages a second from one address, which is exactly what
#                          source_rate_limit bans; an operator exempts an SBC the same way]
#   LOAD_CMD [-: a command run after PHASES instead of nothing (bench/flood.sh uses it), with
#             CFG BIN OUT_DIR MAIN_IP ALIAS_IP SIP_PORT SIP_DOMAIN UAC_IP UAS_IP UAS_PORT
#             CPU_WATCH USERS REPO exported]
#   and every load parameter of run-load.sh, passed through unchanged: PHASES, STEP_SECS,
#   REG_RATES, CALL_RATES, REFINE, PRIME_RATE, HOLD_MS, EXPIRES, QUIET_MAX_PCT, QUIET_WAIT_SECS, ...
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED_BENCH=${SHARED_BENCH:-$REPO/../shared/bench}
USERS=${USERS:-10000}
PROCESSORS=${PROCESSORS:-2}
MAIN_IP=${MAIN_IP:-127.0.0.1}
ALIAS_IP=${ALIAS_IP:-127.0.0.2}
SIP_PORT=${SIP_PORT:-5060}
SIP_DOMAIN=${SIP_DOMAIN:-bench.local}
GRPC_PORT=${GRPC_PORT:-17070}
BILLING_PORT=${BILLING_PORT:-17080}
REDIS_PORT=${REDIS_PORT:-0}
PROVISION=${PROVISION:-pipe}
PROVISION_JOBS=${PROVISION_JOBS:-2}
BUILD=${BUILD:-1}
HALF_RATE_STEP=${HALF_RATE_STEP:-1}
EXEMPT_LOAD_GENERATOR=${EXEMPT_LOAD_GENERATOR:-1}
LOAD_CMD=${LOAD_CMD:-}
ANCHOR_SUMMARY=${ANCHOR_SUMMARY:-}
PHASES=${PHASES:-prime smoke register calls}
OUT_DIR=${OUT_DIR:-/tmp/sipalias-bench-$(date +%Y%m%d-%H%M%S)}
export RUST_LOG=${RUST_LOG:-warn}
BIN=${CARGO_TARGET_DIR:-$REPO/target}/release
KEY_PREFIX="sipalias:"
UAS_IP=${UAS_IP:-127.0.0.11}
UAS_PORT=${UAS_PORT:-5062}
UAC_IP=${UAC_IP:-127.0.0.10}

say() { echo "bench: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

case "$PROCESSORS" in '' | *[!0-9]* | 0) die "PROCESSORS must be a positive number" ;; esac
case "$USERS" in '' | *[!0-9]* | 0) die "USERS must be a positive number" ;; esac
for a in "$MAIN_IP" "$ALIAS_IP" "$UAC_IP" "$UAS_IP"; do
  case "$a" in 127.*) ;; *) die "refusing non-loopback address $a" ;; esac
done
[ -x "$SHARED_BENCH/lib/run-load.sh" ] || [ -f "$SHARED_BENCH/lib/run-load.sh" ] \
  || die "shared harness not found at $SHARED_BENCH (set SHARED_BENCH=.../shared/bench)"

# ---- tools -------------------------------------------------------------------------------------
need=()
command -v sipp >/dev/null 2>&1 || need+=(sip-tester)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v ss >/dev/null 2>&1 || need+=(iproute2)
if [ "$PROVISION" = pipe ] && ! command -v python3 >/dev/null 2>&1; then need+=(python3); fi
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    die "missing: ${need[*]} (sudo apt-get install -y ${need[*]})"
  fi
fi

# ---- ports: everything this bench binds must be free ------------------------------------------
# A listener on the exact address or on the wildcard would take our traffic (or refuse our bind).
listeners() { # proto(u|t) ip port -> matching ss lines, with the owning process when visible
  ss -Hl"$1"np "sport = :$3" 2>/dev/null | awk -v ip="$2" '{ a = $4; sub(/:[0-9]+$/, "", a); gsub(/[][]/, "", a)
    if (a == ip || a == "0.0.0.0" || a == "*" || a == "::") print }'
}
busy=0
check_port() { # proto ip port what
  local l; l=$(listeners "$1" "$2" "$3")
  if [ -n "$l" ]; then
    say "PORT IN USE: $4 ${2}:${3}/$([ "$1" = u ] && echo udp || echo tcp) is already taken by:"
    echo "$l" | sed 's/^/    /' >&2
    busy=1
  fi
}
check_port u "$MAIN_IP" "$SIP_PORT" "dispatcher main"
check_port u "$ALIAS_IP" "$SIP_PORT" "dispatcher alias"
check_port u "$UAC_IP" 5070 "sipp UAC (REGISTER)"
check_port u "$UAC_IP" 5071 "sipp UAC (calls)"
check_port u "$UAS_IP" "$UAS_PORT" "sipp UAS (callee)"
check_port t 127.0.0.1 "$GRPC_PORT" "dispatcher gRPC (GRPC_PORT)"
check_port t 127.0.0.1 "$BILLING_PORT" "billing gRPC (BILLING_PORT)"
[ "$REDIS_PORT" != 0 ] && check_port t 127.0.0.1 "$REDIS_PORT" "redis (REDIS_PORT)"
[ "$busy" = 0 ] || die "ports in use (listed above): stop what holds them, or change SIP_PORT/GRPC_PORT/BILLING_PORT/REDIS_PORT"
say "ports free: udp $MAIN_IP:$SIP_PORT $ALIAS_IP:$SIP_PORT $UAC_IP:5070,5071 $UAS_IP:$UAS_PORT; tcp 127.0.0.1:$GRPC_PORT,$BILLING_PORT$([ "$REDIS_PORT" != 0 ] && echo ",$REDIS_PORT")"

# ---- build -------------------------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
  say "cargo build --release (dispatcher, processor, billing)"
  (cd "$REPO" && cargo build --release -q -p sipalias-dispatcher -p sipalias-processor -p sipalias-billing --bins)
fi
for b in sipalias-dispatcher sipalias-processor sipalias-billing; do
  [ -x "$BIN/$b" ] || die "$BIN/$b missing (run with BUILD=1)"
done

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
say "run dir $OUT_DIR"
CFG=$OUT_DIR/bench.toml
if [ "$REDIS_PORT" = 0 ]; then
  REDIS_SOCK=$OUT_DIR/redis.sock
  REDIS_URL="redis+unix://$REDIS_SOCK"
  rcli() { redis-cli -s "$REDIS_SOCK" "$@"; }
else
  REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"
  rcli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }
fi

# ---- cleanup: stop exactly what we started, by PID -----------------------------------------------
PIDS=()
NAMES=()
LOAD_PID=""
TAIL_PID=""
descendants() { # pid -> its descendants, deepest last
  local c
  for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done
}
stop_pid() { # pid name
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then say "$2 (pid $pid) ignored TERM: KILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$? i p
  trap - EXIT INT TERM
  if [ -n "$LOAD_PID" ] && kill -0 "$LOAD_PID" 2>/dev/null; then
    for p in $LOAD_PID $(descendants "$LOAD_PID"); do kill -TERM "$p" 2>/dev/null || true; done
    wait "$LOAD_PID" 2>/dev/null || true
  fi
  [ -z "$TAIL_PID" ] || { kill -TERM "$TAIL_PID" 2>/dev/null; wait "$TAIL_PID" 2>/dev/null; } || true
  # Reverse start order: processors, dispatcher, billing, redis.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[$i]}" "${NAMES[$i]}"; done
  [ "${#PIDS[@]}" -gt 0 ] && say "stopped ${NAMES[*]} (pids ${PIDS[*]}); logs in $OUT_DIR"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
started() { PIDS+=("$2"); NAMES+=("$1"); }
pid_of() { local i; for i in "${!NAMES[@]}"; do if [ "${NAMES[$i]}" = "$1" ]; then echo "${PIDS[$i]}"; fi; done; }
alive_or_die() { kill -0 "$2" 2>/dev/null || die "$1 exited at start: $(tail -3 "$OUT_DIR/$1.log")"; }

# ---- config ------------------------------------------------------------------------------------
EXEMPT=""
[ "$EXEMPT_LOAD_GENERATOR" = 1 ] && EXEMPT="rate_limit_exempt = [\"$UAC_IP/32\", \"$UAS_IP/32\"]"
cat > "$CFG" <<EOF
# Written by bench/run.sh for one benchmark run.
[dispatcher]
id = "d1"
grpc_listen = "127.0.0.1:$GRPC_PORT"
# The defences are measured on: the links authenticated as in production.
link_secret = "sipalias-bench-link-secret-0123"
# Every other edge defence keeps its default (docs/security.md).
$EXEMPT
# One runtime thread each (the processor's default): on a 2-core host shared by five services
# and sipp, a second thread per service only adds context switches (docs/benchmarks.md).
worker_threads = 1

[dispatcher.main]
ip = "$MAIN_IP"
domain = "$SIP_DOMAIN"
transports = ["udp"]
udp_port = $SIP_PORT

# The alias phones register through; realm = domain, as the shared scenarios expect.
[[dispatcher.aliases]]
ip = "$ALIAS_IP"
domain = "$SIP_DOMAIN"
realm = "$SIP_DOMAIN"
transports = ["udp"]
udp_port = $SIP_PORT

[processor]
id = "p1"
dispatchers = ["http://127.0.0.1:$GRPC_PORT"]
billing_url = "http://127.0.0.1:$BILLING_PORT"
redis_url = "$REDIS_URL"
key_prefix = "$KEY_PREFIX"
auth_secret = "sipalias-bench-secret-0123456789"
link_secret = "sipalias-bench-link-secret-0123"
# No NAT keepalives: the anchor sends none either.
keepalive_interval_secs = 0
drain_timeout_secs = 2
# The shared harness's sipp computes the INVITE digest over uri="sip:127.0.0.1:5060" (the
# server socket, sipp's default) rather than the Request-URI; the anchor does not compare
# them. Accept the socket's own URI, as an operator with such clients would
# (docs/security.md). The one-use nonce-count is checked either way.
digest_uri_check = "request-uri-or-socket"

[billing]
listen = "127.0.0.1:$BILLING_PORT"
redis_url = "$REDIS_URL"
key_prefix = "$KEY_PREFIX"
worker_threads = 1
link_secret = "sipalias-bench-link-secret-0123"
EOF

# ---- redis -------------------------------------------------------------------------------------
if [ "$REDIS_PORT" = 0 ]; then
  redis-server --port 0 --unixsocket "$REDIS_SOCK" --unixsocketperm 700 --save '' --appendonly no \
    --dir "$OUT_DIR" > "$OUT_DIR/redis.log" 2>&1 &
else
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$OUT_DIR" > "$OUT_DIR/redis.log" 2>&1 &
fi
started redis $!
for _ in $(seq 1 50); do rcli ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
rcli ping 2>/dev/null | grep -q PONG || die "redis did not start: $(tail -3 "$OUT_DIR/redis.log")"
say "redis-server pid $(pid_of redis) on ${REDIS_SOCK:-127.0.0.1:$REDIS_PORT} (no persistence)"

# ---- billing -----------------------------------------------------------------------------------
"$BIN/sipalias-billing" --config "$CFG" serve > "$OUT_DIR/billing.log" 2>&1 &
started billing $!
tcp_up() { ss -Hltn "sport = :$2" 2>/dev/null | awk '{ print $4 }' | grep -x "$1:$2" >/dev/null; }
for _ in $(seq 1 100); do tcp_up 127.0.0.1 "$BILLING_PORT" && break; alive_or_die billing "$(pid_of billing)"; sleep 0.1; done
tcp_up 127.0.0.1 "$BILLING_PORT" || die "billing not listening: $(tail -3 "$OUT_DIR/billing.log")"
say "billing pid $(pid_of billing) on 127.0.0.1:$BILLING_PORT"

# ---- accounts ----------------------------------------------------------------------------------
bash "$SHARED_BENCH/lib/gen_csv.sh" "$OUT_DIR" "$USERS" 2>/dev/null
t0=$(date +%s.%N)
case $PROVISION in
  pipe)
    # The keys `sipalias-billing account add` writes (docs/billing.md, "Redis keys"; the script
    # ADD_ACCOUNT in billing/src/store/accounts.rs): HSET acct:<aor> status active, created_ms,
    # kind postpaid, balance_micros 0, ha1:md5:<realm>, ha1:sha256:<realm> (lower-case hex of
    # user:realm:password); SADD accts <aor>. One redis-cli --pipe for all of them.
    python3 - "$OUT_DIR/users.csv" "$SIP_DOMAIN" "$KEY_PREFIX" "$SIP_DOMAIN" > "$OUT_DIR/accounts.resp" <<'PY'
import hashlib, sys, time
users_csv, domain, prefix, *realms = sys.argv[1:]
domain = domain.lower()
realms = list(dict.fromkeys(realms))
now_ms = str(int(time.time() * 1000))
out = sys.stdout.buffer
def cmd(*args):
    b = [a.encode() for a in args]
    out.write(b"*%d\r\n" % len(b) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in b))
with open(users_csv) as f:
    next(f)  # SEQUENTIAL
    for line in f:
        user, password = line.split(";")[:2]
        aor = f"{user}@{domain}"
        fields = ["status", "active", "created_ms", now_ms, "kind", "postpaid", "balance_micros", "0"]
        for realm in realms:
            a1 = f"{user}:{realm}:{password}".encode()
            fields += [f"ha1:md5:{realm}", hashlib.md5(a1).hexdigest(),
                       f"ha1:sha256:{realm}", hashlib.sha256(a1).hexdigest()]
        cmd("HSET", f"{prefix}acct:{aor}", *fields)
        cmd("SADD", f"{prefix}accts", aor)
PY
    rcli --pipe < "$OUT_DIR/accounts.resp" > "$OUT_DIR/provision.log" 2>&1 \
      || die "redis-cli --pipe failed: $(tail -3 "$OUT_DIR/provision.log")"
    grep -q 'errors: 0' "$OUT_DIR/provision.log" || die "provisioning errors: $(tail -3 "$OUT_DIR/provision.log")"
    ;;
  cli)
    cat > "$OUT_DIR/add-account.sh" <<EOF
#!/usr/bin/env bash
exec "$BIN/sipalias-billing" --config "$CFG" account add --aor "\$1@$SIP_DOMAIN" --password "\$2" --realm "$SIP_DOMAIN" >/dev/null
EOF
    tail -n +2 "$OUT_DIR/users.csv" | awk -F';' '{ print $1, $2 }' \
      | xargs -P "$PROVISION_JOBS" -n 2 bash "$OUT_DIR/add-account.sh" 2> "$OUT_DIR/provision.log" \
      || die "account add failed: $(tail -3 "$OUT_DIR/provision.log")"
    ;;
  *) die "PROVISION must be pipe or cli" ;;
esac
t1=$(date +%s.%N)
naccts=$(rcli scard "${KEY_PREFIX}accts")
[ "$naccts" = "$USERS" ] || die "provisioned $naccts accounts, expected $USERS"
PROV_LINE="sipalias provisioning method=$PROVISION accounts=$naccts secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') per_s=$(awk -v a="$t0" -v b="$t1" -v n="$USERS" 'BEGIN { printf "%.0f", n / (b - a) }')"
say "${PROV_LINE#sipalias }"

# ---- dispatcher and processors -----------------------------------------------------------------
"$BIN/sipalias-dispatcher" --config "$CFG" > "$OUT_DIR/dispatcher.log" 2>&1 &
started dispatcher $!
udp_up() { ss -Hlun "sport = :$SIP_PORT" 2>/dev/null | awk '{ print $4 }' | grep -x "$1:$SIP_PORT" >/dev/null; }
for _ in $(seq 1 100); do udp_up "$MAIN_IP" && udp_up "$ALIAS_IP" && break; alive_or_die dispatcher "$(pid_of dispatcher)"; sleep 0.1; done
udp_up "$MAIN_IP" && udp_up "$ALIAS_IP" || die "dispatcher not listening: $(tail -3 "$OUT_DIR/dispatcher.log")"
say "dispatcher pid $(pid_of dispatcher) on udp $MAIN_IP:$SIP_PORT (main) and $ALIAS_IP:$SIP_PORT (alias)"

for i in $(seq 1 "$PROCESSORS"); do
  SIPALIAS_PROCESSOR__ID=p$i "$BIN/sipalias-processor" --config "$CFG" > "$OUT_DIR/p$i.log" 2>&1 &
  started "p$i" $!
done
linked=0
for _ in $(seq 1 100); do
  linked=$("$BIN/sipalias-dispatcher" status --config "$CFG" 2>/dev/null \
    | sed -n 's/.* \([0-9][0-9]*\) processors\{0,1\} linked.*/\1/p' | head -1 || true)
  [ "${linked:-0}" -ge "$PROCESSORS" ] && break
  for i in $(seq 1 "$PROCESSORS"); do alive_or_die "p$i" "$(pid_of "p$i")"; done
  sleep 0.2
done
[ "${linked:-0}" -ge "$PROCESSORS" ] || die "only ${linked:-0} of $PROCESSORS processors linked (see $OUT_DIR/p*.log)"
say "processors linked: $(for i in $(seq 1 "$PROCESSORS"); do printf 'p%s=%s ' "$i" "$(pid_of "p$i")"; done)"

CPU_WATCH="dispatcher:$(pid_of dispatcher)"
for i in $(seq 1 "$PROCESSORS"); do CPU_WATCH="$CPU_WATCH p$i:$(pid_of "p$i")"; done
CPU_WATCH="$CPU_WATCH billing:$(pid_of billing) redis:$(pid_of redis)"
LABELS=$(echo "$CPU_WATCH" | tr ' ' '\n' | cut -d: -f1 | paste -sd' ')

# ---- load --------------------------------------------------------------------------------------
# run_load OUT PHASES [VAR=value ...]: one run-load.sh invocation, in the background so that the
# trap can stop it (and its sipps) by PID; its output is shown as it comes.
export SUT_NAME=sipalias REG_TARGET="$ALIAS_IP:$SIP_PORT" CALL_TARGET="$MAIN_IP:$SIP_PORT" \
  SIP_DOMAIN USERS CSV_DIR="$OUT_DIR" CPU_WATCH UAS_IP UAS_PORT UAC_IP
run_load() {
  local out=$1 phases=$2; shift 2
  mkdir -p "$out"
  : > "$out/run-load.out"
  env OUT_DIR="$out" PHASES="$phases" "$@" bash "$SHARED_BENCH/lib/run-load.sh" > "$out/run-load.out" 2>&1 &
  LOAD_PID=$!
  # Both in the background: the `wait` builtin returns at once on a signal, so Ctrl-C or a TERM
  # stops the run now rather than at the end of the step.
  tail -n +1 --pid="$LOAD_PID" -f "$out/run-load.out" &
  TAIL_PID=$!
  local rc=0
  wait "$LOAD_PID" || rc=$?
  wait "$TAIL_PID" || true
  LOAD_PID=""
  TAIL_PID=""
  [ "$rc" = 0 ] || say "run-load.sh exited $rc (see $out)"
}
mem() { rcli info memory | tr -d '\r' | awk -F: '$1 == "used_memory" { print $2 }'; }

SUMMARIES=()
MEM_LINE="sipalias redis_memory n/a (no prime phase)"
rest=""
for ph in $PHASES; do [ "$ph" = prime ] || rest="$rest $ph"; done
if [[ " $PHASES " == *" prime "* ]]; then
  m0=$(mem); k0=$(rcli dbsize)
  run_load "$OUT_DIR/prime" prime
  SUMMARIES+=("$OUT_DIR/prime/summary.txt")
  sleep 1
  m1=$(mem); k1=$(rcli dbsize)
  nloc=$(rcli --scan --pattern "${KEY_PREFIX}loc:*" | wc -l)
  sample=$(rcli memory usage "${KEY_PREFIX}loc:{$(sed -n 2p "$OUT_DIR/users.csv" | cut -d';' -f1)@$SIP_DOMAIN}")
  MEM_LINE="sipalias redis_memory used_before=$m0 used_after_prime=$m1 bytes_per_binding=$(awk -v a="$m0" -v b="$m1" -v n="$USERS" 'BEGIN { printf "%.0f", (b - a) / n }') keys_added=$((k1 - k0)) location_keys=$nloc sample_loc_key_memory_usage=${sample:-n/a}"
fi
if [ -n "${rest// /}" ]; then
  # Redis commands issued by the load phases (round trips per operation): redis-commandstats.txt.
  rcli config resetstat >/dev/null
  run_load "$OUT_DIR/load" "${rest# }"
  SUMMARIES+=("$OUT_DIR/load/summary.txt")
  rcli info commandstats | tr -d '\r' > "$OUT_DIR/redis-commandstats.txt"
fi
if [ -n "$LOAD_CMD" ]; then
  export CFG BIN OUT_DIR MAIN_IP ALIAS_IP SIP_PORT SIP_DOMAIN UAC_IP UAS_IP UAS_PORT CPU_WATCH USERS REPO
  bash -c "$LOAD_CMD" > "$OUT_DIR/load-cmd.out" 2>&1 &
  LOAD_PID=$!
  tail -n +1 --pid="$LOAD_PID" -f "$OUT_DIR/load-cmd.out" &
  TAIL_PID=$!
  wait "$LOAD_PID" || say "LOAD_CMD exited $? (see $OUT_DIR/load-cmd.out)"
  wait "$TAIL_PID" || true
  LOAD_PID=""
  TAIL_PID=""
fi

# ---- call-setup latency from sipp's response-time buckets (INVITE sent -> 200 received) ---------
# p50/p99 as the upper bound of the bucket holding them: 5 10 20 50 100 200 500 1000 ms.
latency() { # stat.csv -> "p50_ms_lt=N p99_ms_lt=N"
  awk -F';' 'NR == 1 { for (i = 1; i <= NF; i++) if ($i ~ /^ResponseTimeRepartition1_/) c[$i] = i; next } { l = $0 }
    END { n = split(l, f, ";"); split("5 10 20 50 100 200 500 1000", b, " "); tot = 0
      for (i = 1; i <= 8; i++) { v[i] = f[c["ResponseTimeRepartition1_<" b[i]]] + 0; tot += v[i] }
      tot += f[c["ResponseTimeRepartition1_>=1000"]] + 0
      if (tot == 0) { print "p50_ms_lt=n/a p99_ms_lt=n/a"; exit }
      cum = 0; p50 = ">=1000"; p99 = ">=1000"; s50 = 0; s99 = 0
      for (i = 1; i <= 8; i++) { cum += v[i]
        if (!s50 && cum >= 0.50 * tot) { p50 = b[i]; s50 = 1 }
        if (!s99 && cum >= 0.99 * tot) { p99 = b[i]; s99 = 1 } }
      printf "p50_ms_lt=%s p99_ms_lt=%s", p50, p99 }' "$1"
}
field() { echo "$1" | tr ' ' '\n' | awk -F= -v k="$2" '$1 == k { print $2; exit }'; }
num() { local v; v=$(field "$1" "$2"); echo "${v:-0}"; }
step_stat() { { ls -1 "$1"/"$2"-r"$3"-*.stat.csv 2>/dev/null || true; } | { grep -v '\.uas\.' || true; } | sort | tail -1; }

EXTRA=()
US_register=""
US_calls=""
SUMMARY_TXT=""
[ "${#SUMMARIES[@]}" -eq 0 ] || SUMMARY_TXT=$(cat "${SUMMARIES[@]}" 2>/dev/null || true)
CALLS_LINE=$(echo "$SUMMARY_TXT" | grep 'figure=calls' || true)
REG_LINE=$(echo "$SUMMARY_TXT" | grep 'figure=register' || true)
for line in "$REG_LINE" "$CALLS_LINE"; do
  [ -n "$line" ] || continue
  kind=$(field "$line" figure)
  tot_us=0; tot_cpu=0
  for l in $LABELS; do
    tot_us=$((tot_us + $(num "$line" "us_per_op_$l")))
    tot_cpu=$((tot_cpu + $(num "$line" "cpu_${l}_pct")))
  done
  printf -v "US_$kind" '%s' "$tot_us"
  rate=$(field "$line" "$([ "$kind" = calls ] && echo calls_per_s || echo register_per_s)")
  lat=""
  st=$(step_stat "$OUT_DIR/load" "$kind" "$rate")
  [ -n "$st" ] && lat=" $(latency "$st")"
  EXTRA+=("sipalias total figure=$kind rate=$rate us_per_op_sipalias=$tot_us cpu_sipalias_pct=$tot_cpu (sum of: $LABELS)$lat")
done

# p99 at half the maximum call rate (the latency target is stated there).
best_calls=$(field "$CALLS_LINE" calls_per_s)
if [ "$HALF_RATE_STEP" = 1 ] && [ -n "$best_calls" ] && [ "${best_calls:-0}" -ge 2 ]; then
  half=$((best_calls / 2))
  run_load "$OUT_DIR/half" calls CALL_RATES="$half" REFINE=0
  hline=$(grep '^step ' "$OUT_DIR/half/steps.log" | tail -1 || true)
  st=$(step_stat "$OUT_DIR/half" calls "$half")
  EXTRA+=("sipalias half_rate calls_per_s=$half pass=$(field "$hline" pass) fail_pct=$(field "$hline" fail_pct) rt_avg_ms=$(field "$hline" rt_avg_ms) $([ -z "$st" ] || latency "$st")")
fi

# ---- memory of every process, before stopping them --------------------------------------------
rss="sipalias peak_rss_kb"
for i in "${!NAMES[@]}"; do
  rss="$rss ${NAMES[$i]}=$(awk '/^VmHWM:/ { print $2 }' "/proc/${PIDS[$i]}/status" 2>/dev/null || echo gone)"
done
EXTRA+=("$rss" "$MEM_LINE")

# ---- ratios against a Kamailio anchor run -------------------------------------------------------
if [ -n "$ANCHOR_SUMMARY" ] && [ -f "$ANCHOR_SUMMARY" ]; then
  ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b + 0 == 0) print "n/a"; else printf "%.2f", a / b }'; }
  kr=$(grep -m1 'kamailio figure=register' "$ANCHOR_SUMMARY" || true)
  kc=$(grep -m1 'kamailio figure=calls' "$ANCHOR_SUMMARY" || true)
  kam_us() { [ -z "$1" ] || echo $(( $(num "$1" us_per_op_kamailio) + $(num "$1" us_per_op_redis) )); }
  EXTRA+=("sipalias vs_anchor file=$(basename "$ANCHOR_SUMMARY") register_per_s=$(field "$REG_LINE" register_per_s)/$(field "$kr" register_per_s)=$(ratio "$(field "$REG_LINE" register_per_s)" "$(field "$kr" register_per_s)") calls_per_s=$best_calls/$(field "$kc" calls_per_s)=$(ratio "$best_calls" "$(field "$kc" calls_per_s)") us_per_reg=$US_register/$(kam_us "$kr")=$(ratio "$US_register" "$(kam_us "$kr")") us_per_call=$US_calls/$(kam_us "$kc")=$(ratio "$US_calls" "$(kam_us "$kc")") (anchor us = kamailio + its redis)")
fi

CONFIG_LINE="sipalias config commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo -)$(git -C "$REPO" diff --quiet 2>/dev/null || echo +dirty) processors=$PROCESSORS users=$USERS register_auth=digest(401) call_auth=digest(407, every INVITE) location_store=redis($([ "$REDIS_PORT" = 0 ] && echo unix-socket || echo tcp), no persistence) billing=redis sockets=udp:$MAIN_IP:$SIP_PORT,udp:$ALIAS_IP:$SIP_PORT keepalive=off rust_log=$RUST_LOG step_secs=${STEP_SECS:-10} hold_ms=${HOLD_MS:-200}"
{
  echo "# $(date -Is) $(uname -n) $(nproc) cores; run dir $OUT_DIR"
  echo "# command: $(for v in USERS PROCESSORS STEP_SECS REG_RATES CALL_RATES REFINE PRIME_RATE HOLD_MS PHASES PROVISION RUST_LOG QUIET_WAIT_SECS; do [ -n "${!v:-}" ] && printf '%s=%q ' "$v" "${!v}"; done)bash bench/run.sh"
  echo "$CONFIG_LINE"
  echo "$PROV_LINE"
  echo "$SUMMARY_TXT" | sed '/^$/d'
  printf '%s\n' "${EXTRA[@]}"
} > "$OUT_DIR/summary.txt"
echo
echo "==== sipalias load benchmark summary ($OUT_DIR/summary.txt)"
cat "$OUT_DIR/summary.txt"
