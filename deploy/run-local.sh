#!/usr/bin/env bash
# Runs a sipalias cluster on this machine with deploy/local.toml: Redis, billing, one dispatcher
# (main IP 127.0.0.1, aliases 127.0.0.2 and 127.0.0.3; UDP and TCP 5060 on each, TLS 5061 on
# 127.0.0.1 and 127.0.0.3, and 127.0.0.3's extra ports UDP/TCP 5080, TLS 5081) and two
# processors. Generates self-signed TLS certificates for 127.0.0.1 and 127.0.0.3 with openssl
# when missing. Creates two demo accounts (1001 and 1002, passwords pw1001/pw1002). Ctrl-C
# stops everything it started. Installs redis-server and openssl when missing and running as
# root.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-deploy/local.toml}
RUN_DIR=${RUN_DIR:-$(mktemp -d /tmp/sipalias-run.XXXXXX)}

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing: ${need[*]} — install them with: sudo apt-get install -y ${need[*]}" >&2; exit 1
  fi
fi

# Self-signed certificates for the IPs local.toml gives TLS (never committed; kept in target/).
# Replace the files to try a reload: the dispatcher picks them up within tls_reload_secs.
TLS_DIR=target/local-tls
mkdir -p "$TLS_DIR"
for ip in 127.0.0.1 127.0.0.3; do
  if [ ! -s "$TLS_DIR/$ip.crt" ] || [ ! -s "$TLS_DIR/$ip.key" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
      -subj "/CN=$ip" -addext "subjectAltName=IP:$ip" \
      -keyout "$TLS_DIR/$ip.key" -out "$TLS_DIR/$ip.crt" 2>/dev/null
  fi
done

cargo build --release --workspace --bins
BIN=target/release
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped; logs in $RUN_DIR"
}
trap cleanup EXIT INT TERM

# Redis with append-only persistence, so registrations survive restarts of Redis too.
redis-server --port 6379 --bind 127.0.0.1 --dir "$RUN_DIR" --appendonly yes --save "" \
  >"$RUN_DIR/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done

"$BIN/sipalias-billing" --config "$CONFIG" serve 2>"$RUN_DIR/billing.log" &
pids+=($!)
for user in 1001 1002; do
  "$BIN/sipalias-billing" --config "$CONFIG" account add --force --aor "$user@sip.example.net" \
    --password "pw$user" --realm sip.example.net --realm voip.oldprovider.example \
    --realm sip.another-old.example
done

"$BIN/sipalias-dispatcher" --config "$CONFIG" 2>"$RUN_DIR/dispatcher.log" &
pids+=($!)
SIPALIAS_PROCESSOR__ID=p1 "$BIN/sipalias-processor" --config "$CONFIG" 2>"$RUN_DIR/p1.log" &
pids+=($!)
SIPALIAS_PROCESSOR__ID=p2 SIPALIAS_PROCESSOR__METRICS_LISTEN=127.0.0.1:9092 \
  "$BIN/sipalias-processor" --config "$CONFIG" 2>"$RUN_DIR/p2.log" &
pids+=($!)

echo "sipalias running: SIP on 127.0.0.1:5060 (main), 127.0.0.2:5060, 127.0.0.3:5060 and :5080 (aliases), UDP and TCP;"
echo "  TLS on 127.0.0.1:5061, 127.0.0.3:5061 and :5081 (certificates in $TLS_DIR)"
echo "accounts 1001/pw1001 and 1002/pw1002 @ sip.example.net; logs in $RUN_DIR; Ctrl-C to stop"
echo "  /metrics, /healthz, /readyz: dispatcher 127.0.0.1:9090, p1 :9091, p2 :9092, billing :9093"
wait -n "${pids[@]}" || true
echo "a component exited; see $RUN_DIR" >&2
