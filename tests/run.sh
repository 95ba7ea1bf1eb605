#!/usr/bin/env bash
# Runs the whole sipalias test suite on this machine: formatting, lints, unit tests and the
# end-to-end tests (real redis-server, billing, dispatcher, processors and sipp on 127.0.0.x).
# Installs redis-server, sipp (Debian package sip-tester) and baresip (baresip-core, the real
# phone of tests/tests/e2e/phones.rs) when missing and running as root.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v sipp >/dev/null 2>&1 || need+=(sip-tester)
command -v baresip >/dev/null 2>&1 || need+=(baresip-core)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing: ${need[*]} — install them with: sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# Fuzzing (docs/fuzzing.md): every cargo-fuzz target of fuzz/ for FUZZ_SECONDS (default 60)
# each, on one core; fails if any crashes. Adds about 5–6 minutes. Before the tests, so that
# the test runner's summary is the last thing printed.
bash fuzz/run.sh "${FUZZ_SECONDS:-60}"
# The end-to-end tests start the real binaries, so build them first.
cargo build --workspace --bins --quiet
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
