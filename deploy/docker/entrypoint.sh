#!/bin/sh
# The sipalias image's entry point: `sipalias-entrypoint ROLE [ARGS...]`.
#
#   dispatcher [ARGS]   sipalias-dispatcher (SIP on the addresses of [dispatcher], edge link)
#   processor [ARGS]    sipalias-processor; its cluster-unique id is the container's hostname
#                       (its first label; unique per replica, so `--scale processor=N` needs
#                       no per-replica setting) unless SIPALIAS_PROCESSOR__ID is set
#   billing [ARGS]      sipalias-billing serve
#   demo-accounts       creates (or resets) the demo accounts 1001 and 1002 (passwords pw1001,
#                       pw1002) in every realm of deploy/docker/compose.toml, then exits
#   health              the HEALTHCHECK: checks the role this container was started with
#   any other command   run as given (e.g. sipalias-billing account list)
#
# Health per role: dispatcher: its Status RPC answers; billing: the gRPC health protocol says
# SERVING; processor: the dispatcher at SIPALIAS_HEALTH_GRPC (the URL the processor links to)
# lists this processor as linked and active; without SIPALIAS_HEALTH_GRPC, only that the
# process runs.
set -eu

ROLE_FILE=/tmp/sipalias-role

# The first label of the hostname: a container's is its short id; a host's may be a FQDN.
processor_id() {
  if [ -n "${SIPALIAS_PROCESSOR__ID:-}" ]; then
    printf '%s\n' "$SIPALIAS_PROCESSOR__ID"
  else
    host=$(hostname)
    printf '%s\n' "${host%%.*}"
  fi
}

health() {
  role=$(cat "$ROLE_FILE" 2>/dev/null || true)
  case "$role" in
    dispatcher) sipalias-dispatcher status >/dev/null ;;
    billing) sipalias-billing health >/dev/null ;;
    processor)
      if [ -z "${SIPALIAS_HEALTH_GRPC:-}" ]; then
        kill -0 1
      else
        id=$(processor_id)
        sipalias-dispatcher status --grpc "$SIPALIAS_HEALTH_GRPC" |
          awk -v id="$id" '$1 == id && $0 ~ / active / { found = 1 } END { exit !found }'
      fi
      ;;
    *) echo "sipalias-entrypoint: no role recorded in $ROLE_FILE" >&2; exit 1 ;;
  esac
}

cmd=${1:-help}
[ "$#" -gt 0 ] && shift
case "$cmd" in
  dispatcher)
    echo dispatcher >"$ROLE_FILE"
    exec sipalias-dispatcher "$@"
    ;;
  processor)
    echo processor >"$ROLE_FILE"
    SIPALIAS_PROCESSOR__ID=$(processor_id)
    export SIPALIAS_PROCESSOR__ID
    exec sipalias-processor "$@"
    ;;
  billing)
    echo billing >"$ROLE_FILE"
    exec sipalias-billing serve "$@"
    ;;
  demo-accounts)
    for user in 1001 1002; do
      sipalias-billing account add --force --aor "$user@sip.example.net" --password "pw$user" \
        --realm sip.example.net --realm voip.oldprovider.example --realm sip.another-old.example
    done
    ;;
  health) health ;;
  help | --help | -h)
    sed -n '2,/^set -eu/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    ;;
  *) exec "$cmd" "$@" ;;
esac
