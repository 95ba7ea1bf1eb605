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
# Health per role, from the service's operations listener on 127.0.0.1:$SIPALIAS_HEALTH_PORT
# (default 9090, the port of metrics_listen in deploy/docker/compose.toml): dispatcher
# /healthz (alive, its SIP sockets bound; its /readyz also wants a processor linked, which
# processors starting after it cannot give it yet: that one is for keepalived and load
# balancers), processor and billing /readyz (processor: linked to its dispatchers, Redis and
# billing answering; billing: Redis answering). Where nothing listens on that port
# (metrics_listen unset): dispatcher: its Status RPC answers; billing: the gRPC health
# protocol says SERVING; processor: the dispatcher at SIPALIAS_HEALTH_GRPC lists this
# processor as linked and active, or without it only that the process runs.
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

# `http_status PATH`: the HTTP status of GET PATH on the operations listener, or nothing when
# nothing listens there. bash's /dev/tcp: the image needs no HTTP client.
http_status() {
  bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 0
    printf "GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n" "$2" >&3
    read -r _ status _ <&3 && printf "%s\n" "$status"' http_status \
    "${SIPALIAS_HEALTH_PORT:-9090}" "$1" 2>/dev/null
}

health() {
  role=$(cat "$ROLE_FILE" 2>/dev/null || true)
  case "$role" in
    dispatcher) path=/healthz ;;
    *) path=/readyz ;;
  esac
  status=$(http_status "$path" || true)
  if [ -n "$status" ]; then
    [ "$status" = 200 ]
    return
  fi
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
