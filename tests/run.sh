#!/usr/bin/env bash
# Runs the whole sipalias test suite on this machine: formatting, lints, unit tests, the
# end-to-end tests (real redis-server, billing, dispatcher, processors and sipp on 127.0.0.x),
# then the compose suite (tests/compose/run.sh: the images, built offline, as a docker-compose
# cluster with phones in containers).
# Installs redis-server, sipp (Debian package sip-tester), baresip (baresip-core, the real
# phone of tests/tests/e2e/phones.rs), debootstrap (the offline base images) and fail2ban (its
# fail2ban-regex checks the shipped filter against real log lines) when missing and running as
# root. Needs a running Docker Engine and Docker Compose (the plugin or the
# docker-compose package).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v sipp >/dev/null 2>&1 || need+=(sip-tester)
command -v baresip >/dev/null 2>&1 || need+=(baresip-core)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v fail2ban-regex >/dev/null 2>&1 || need+=(fail2ban)
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1 ||
  need+=(docker-compose)
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

if ! docker info >/dev/null 2>&1; then
  echo "the compose suite needs a running Docker Engine (docker info failed):" \
    "install docker.io and start it, or run as a user of the docker group" >&2
  exit 1
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# Fuzzing (docs/fuzzing.md): every cargo-fuzz target of fuzz/ for FUZZ_SECONDS (default 60)
# each, on one core; fails if any crashes. Adds about 5–6 minutes.
# Meanwhile, on the core the fuzzer leaves idle, what the compose suite needs: the release
# binaries (niced, so the fuzzer keeps its core) and, when missing, the offline base images
# (mostly waiting on Debian's mirror). Saves about 5 minutes on 2 cores.
release_log=$(mktemp /tmp/sipalias-release.XXXXXX)
base_log=$(mktemp /tmp/sipalias-base.XXXXXX)
nice -n 10 cargo build --release --workspace --bins --quiet >"$release_log" 2>&1 &
release=$!
nice -n 10 bash deploy/docker/base-image.sh >"$base_log" 2>&1 &
base=$!
bash fuzz/run.sh "${FUZZ_SECONDS:-60}"
for job in "release:$release:$release_log" "base images:$base:$base_log"; do
  IFS=: read -r what pid log <<<"$job"
  wait "$pid" || { cat "$log" >&2; echo "building the $what for the compose suite failed" >&2; exit 1; }
  cat "$log"
  rm -f "$log"
done
# The end-to-end tests start the real binaries, so build them first.
cargo build --workspace --bins --quiet
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi

# The compose suite, time-bounded (about 75 s; the binaries and base images are built above).
BUILD=0 timeout 900 bash tests/compose/run.sh
