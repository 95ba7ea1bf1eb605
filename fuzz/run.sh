#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a bounded time (see docs/fuzzing.md).
#
#   bash fuzz/run.sh [SECONDS]      # SECONDS per target, default 60
#
# Environment: FUZZ_TARGETS (default "parse framing scan digest"), FUZZ_SANITIZER (default
# "none"; "address" works too, about 5x slower), FUZZ_RUNS (stop a target after that many
# executions, or after SECONDS, whichever comes first; the long run of docs/fuzzing.md is
# `FUZZ_RUNS=10000000 bash fuzz/run.sh 600`). Installs cargo-fuzz when missing, seeds
# fuzz/corpus/<target>/ with the RFC 4475 / RFC 5118 torture messages, builds, runs each target
# on one core (one process, one thread), prints one line per target with the executions done,
# and exits non-zero if any target crashed, printing the input that crashed it.
#
# Stable Rust only: cargo-fuzz passes `-Z` flags (sanitizer coverage) to rustc, which stable
# accepts with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-60}"
targets="${FUZZ_TARGETS:-parse framing scan digest}"
sanitizer="${FUZZ_SANITIZER:-none}"
runs=()
if [ -n "${FUZZ_RUNS:-}" ]; then runs=(-runs="$FUZZ_RUNS"); fi
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi

# Seeds, copied (never committed): the torture messages as they are on disk.
torture=../sipmsg/tests/torture
mkdir -p corpus/parse corpus/scan corpus/framing corpus/digest
for f in "$torture"/rfc4475/*.dat "$torture"/rfc5118/*.dat; do
  name="$(basename "$(dirname "$f")")-$(basename "$f" .dat)"
  cp "$f" "corpus/parse/$name"
  cp "$f" "corpus/scan/$name"
  # framing: control byte 0x00 (limit 65535, no split) + the message; then 0x08 (two split
  # points, at bytes 5 and 40) + two messages with a CRLF ping between them.
  { printf '\x00'; cat "$f"; } >"corpus/framing/$name"
  { printf '\x08\x05\x00\x28\x00'; cat "$f"; printf '\r\n\r\n'; cat "$f"; } >"corpus/framing/$name-twice"
  # digest: the Request-URI of the start line (for Uri::parse).
  head -n 1 "$f" | awk '{ printf "%s", $2 }' >"corpus/digest/$name-uri"
done
# digest: credentials as phones send them (RFC 3261 §22.4, RFC 8760), and the torture one.
grep -hi '^\(proxy-\)\?authorization:' "$torture"/rfc4475/*.dat | sed 's/^[^:]*: *//' | tr -d '\r\n' \
  >corpus/digest/torture-authorization
printf '%s' 'Digest username="alice", realm="sip.example.net", nonce="ea9c8e88df84f1cec4341ae6cbe5a359", uri="sip:sip.example.net", response="dfe56131d1958046689d83306477ecc", algorithm=MD5, qop=auth, nc=00000001, cnonce="0a4f113b", opaque="5ccc069c403ebaf9f0171e9517f40e41"' \
  >corpus/digest/md5-qop
printf '%s' 'Digest username="1001",realm="voip.oldprovider.example",nonce="n",uri="sip:1002@127.0.0.2",response="r",algorithm=SHA-256' \
  >corpus/digest/sha256-compact
printf '%s' 'Digest  username = "a\"b" ,  nonce="x" , response="y", uri="sips:bob@[2001:db8::10]:5061;transport=tls"' \
  >corpus/digest/escaped-spaces

build=(cargo fuzz build --sanitizer "$sanitizer")
echo "fuzz: building ($sanitizer sanitizer)"
"${build[@]}" 2>&1 | grep -v '^ *Compiling ' || { echo "fuzz: build failed" >&2; exit 1; }

# One log directory per run: two runs at once (a CI run next to a long run) must not share.
logs="target/logs/$(date +%Y%m%d-%H%M%S)-$$"
mkdir -p "$logs"
failed=()
for t in $targets; do
  log="$logs/$t.log"
  status=0
  # One process, one thread (no -jobs/-workers: with them libFuzzer forks and writes
  # fuzz-N.log into the working directory). -timeout: a unit slower than 10 s is a hang.
  cargo fuzz run --sanitizer "$sanitizer" "$t" "corpus/$t" -- \
    -max_total_time="$seconds" -print_final_stats=1 -timeout=10 "${runs[@]}" >"$log" 2>&1 || status=$?
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
  rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)"
  took="$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)"
  units="$(find "corpus/$t" -type f | wc -l)"
  if [ "$status" -eq 0 ]; then
    echo "fuzz $t: ${execs:-?} executions in ${took:-?} s (${rate:-?} exec/s), corpus $units inputs"
  else
    artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
    case "$artifact" in /* | "") ;; *) artifact="fuzz/${artifact#./}" ;; esac
    echo "fuzz $t: FAILED (exit $status) after ${execs:-?} executions; input: ${artifact:-none}; log: fuzz/$log"
    grep -m 1 -A 12 -E "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer" "$log" || tail -n 30 "$log"
    echo "  reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $sanitizer $t ${artifact:-}"
    failed+=("$t")
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: crashed: ${failed[*]}" >&2
  exit 1
fi
