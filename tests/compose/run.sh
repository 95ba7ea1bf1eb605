#!/usr/bin/env bash
# The compose suite: the cluster of deploy/docker-compose.yml, built from this checkout, against
# phones that are containers on the same network (sipp and tcpdump in sipalias-tools:bookworm),
# so every SIP message crosses the container network and the phones see the addresses a real
# phone sees. Each step below is one requirement of docs/deployment.md ("Tested"):
#
#   1. alias path   a phone registered through the alias 172.31.240.11 and one through the main
#                   IP call each other; the INVITE reaches each phone from the address it
#                   registered through (read from a packet capture in the phone's container)
#                   with From/To rewritten to that address
#   2. processor    3 processors, 30 concurrent calls (half hung up by the caller, half by the
#      killed       callee), `docker kill` of the processor holding most of them mid-call:
#                   every call ends cleanly, then 10 new calls succeed
#   3. scale out    --scale processor=4 while calls run: no call fails, a new processor takes
#                   calls
#   4. Redis        restarted (append-only file on its volume): the registrations are kept and
#      restart      calls work again without anyone acting
#   5. dispatcher   stopped and started: the processors link again and the phone registered in
#      restart      step 1 is called through its alias
#   6. down -v      leaves no container, network or volume of the project
#
# Builds the images first (deploy/docker/build.sh: base images offline with debootstrap when
# missing, release binaries, stripped). Needs root or a user of the docker group; uses the
# project name COMPOSE_PROJECT (default sipalias-ci) and the network 172.31.240.0/24.
# BUILD=0 skips cargo (binaries up to date). Exit status 0 when every step passed.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PROJECT=${COMPOSE_PROJECT:-sipalias-ci}
TOOLS=${SIPALIAS_TOOLS_IMAGE:-sipalias-tools:bookworm}
MAIN=172.31.240.10
ALIAS1=172.31.240.11
ALIAS2=172.31.240.12
DOMAIN=sip.example.net
OUT=$(mktemp -d /tmp/sipalias-compose.XXXXXX)
START=$SECONDS

if docker compose version >/dev/null 2>&1; then
  DC=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  DC=(docker-compose)
else
  echo "compose: neither 'docker compose' nor docker-compose; install docker-compose" >&2
  exit 1
fi
compose() { "${DC[@]}" -p "$PROJECT" -f deploy/docker-compose.yml "$@"; }

log() { printf '%s compose [%3ss]: %s\n' "$(date +%T)" "$((SECONDS - START))" "$*"; }

# On failure: what each service logged, for the CI log.
dump() {
  compose ps || true
  for s in dispatcher processor billing redis; do
    echo "----- $s (last 40 lines)"
    compose logs --no-color --tail=40 "$s" 2>&1 | cut -c1-400 || true
  done
  echo "----- traces in $OUT"
  ls -la "$OUT" || true
}
fail() {
  log "FAIL: $*"
  dump
  exit 1
}

# Removes the phones and the project, volumes included; checks that nothing is left.
cleanup() {
  local rc=$?
  docker ps -aq --filter "label=sipalias-compose-test=$PROJECT" | xargs -r docker rm -f >/dev/null
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  exit "$rc"
}
trap cleanup EXIT
# A time bound (tests/run.sh runs this under `timeout`) must still clean up.
trap 'exit 143' TERM INT

# wait_until DESCRIPTION SECONDS COMMAND...: polls COMMAND every 0.2 s until it succeeds.
wait_until() {
  local what=$1 limit=$2
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${limit}s waiting for $what"
    sleep 0.2
  done
}

# ---- the cluster's view, through the dispatcher's own CLI -----------------------------------
# `docker exec` in a service's container (much faster than `compose exec`).
container_of() {
  docker ps -q --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$1" | head -1
}
in_service() {
  local c
  c=$(container_of "$1")
  shift
  [ -n "$c" ] || return 1
  docker exec -i "$c" "$@"
}
status() { in_service dispatcher sipalias-dispatcher status; }
# Its table's last columns are TRANSACTIONS DIALOGS STATE ROUTED (CONNECTED SINCE holds a space).
# The ids of the linked, active processors.
active_processors() { status | awk '$(NF-1) == "active" { print $1 }'; }
active_count_is() { [ "$(active_processors | wc -l)" -eq "$1" ]; }
# ROUTED of one processor.
routed_of() { status | awk -v id="$1" '$1 == id { print $NF }'; }
redis_cli() { in_service redis redis-cli "$@"; }
dialogs() { redis_cli --scan --pattern 'sipalias:dlg:*' | grep -c . || true; }
dialogs_at_least() { [ "$(dialogs)" -ge "$1" ]; }
status_dialogs_at_least() {
  [ "$(status | awk '$(NF-1) == "active" { n += $(NF-2) } END { print n + 0 }')" -ge "$1" ]
}
all_healthy() {
  local ids
  ids=$(compose ps -q)
  [ -n "$ids" ] || return 1
  ! docker inspect -f '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' $ids |
    grep -v ' exited ' | grep -v ' healthy$' | grep -q .
}

# ---- phones ---------------------------------------------------------------------------------
NET=
# phone NAME IP: a container on the cluster's network at IP, idle until told what to run.
phone() {
  docker run -d --name "$PROJECT-$1" --hostname "$1" --label "sipalias-compose-test=$PROJECT" \
    --network "$NET" --ip "$2" -v "$ROOT/tests/sipp:/sipp:ro" -v "$OUT:/out" -w /out \
    "$TOOLS" sleep infinity >/dev/null
}
in_phone() {
  local name=$1
  shift
  docker exec "$PROJECT-$name" "$@"
}
phone_ip() { docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$PROJECT-$1"; }

# sipp_run PHONE TAG PORT ARGS...: sipp in the phone, on its address and PORT (audio and video
# media on 4 ports of their own), with statistics,
# errors and messages traced into $OUT/TAG.*; returns sipp's exit status (0: every call
# succeeded).
sipp_run() {
  local name=$1 tag=$2 port=$3
  shift 3
  in_phone "$name" sipp -i "$(phone_ip "$name")" -p "$port" -mp $((10000 + (port - 5000) * 4)) -nostdin \
    -timeout_error -recv_timeout 20000 -timeout 120s \
    -trace_stat -fd 1 -stf "/out/$tag.stat.csv" -trace_err -error_file "/out/$tag.err.log" \
    -trace_msg -message_file "/out/$tag.msg.log" "$@" >"$OUT/$tag.out" 2>&1
}
# sipp_bg ...: sipp_run in the background; its host PID in $!.
sipp_bg() { sipp_run "$@" & }
listening() { in_phone "$1" ss -Hlun "sport = :$2" | grep -q .; }
# A sipp statistics column (last row) of TAG.
stat_col() {
  local col
  col=$(head -1 "$OUT/$1.stat.csv" | tr ';' '\n' | grep -nx "$2" | cut -d: -f1)
  tail -1 "$OUT/$1.stat.csv" | cut -d';' -f"$col"
}
# callee_start PHONE TAG SCENARIO [ARGS...]: the phone answers calls on port 5062 (and the
# cluster's NAT keepalive OPTIONS, so it runs without -m) until callee_stop; returns when it
# listens.
declare -A CALLEE_PID
callee_start() {
  local name=$1 tag=$2 scenario=$3
  shift 3
  sipp_bg "$name" "$tag" 5062 -sf "/sipp/$scenario" "$@"
  CALLEE_PID[$tag]=$!
  wait_until "$name's phone listening" 10 listening "$name" 5062
}
# callee_stop PHONE TAG CALLS: stops the phone's sipp (SIGUSR1: it ends gracefully); it must
# have answered at least CALLS calls (keepalives count too) and failed none.
callee_stop() {
  local name=$1 tag=$2 calls=$3
  in_phone "$name" sh -c 'kill -USR1 $(pidof sipp)'
  expect_sipp "$tag" "${CALLEE_PID[$tag]}"
  local ok failed
  ok=$(stat_col "$tag" 'SuccessfulCall(C)')
  failed=$(stat_col "$tag" 'FailedCall(C)')
  [ "$failed" -eq 0 ] && [ "$ok" -ge "$calls" ] ||
    fail "$name answered $ok calls with $failed failures, expected at least $calls, none failed"
}
expect_sipp() { # TAG PID: sipp's exit status must be 0
  wait "$2" || {
    cat "$OUT/$1.out" "$OUT/$1.err.log" 2>/dev/null | tail -30
    fail "sipp $1 failed"
  }
}

# register PHONE USER PASS SERVER_IP SERVER_PORT DOMAIN CONTACT_PORT
register() {
  local name=$1 user=$2 pass=$3 ip=$4 port=$5 domain=$6 cport=$7
  printf 'SEQUENTIAL\n%s;%s;[authentication username=%s password=%s]\n' \
    "$user" "$pass" "$user" "$pass" >"$OUT/reg-$user.csv"
  sipp_run "$name" "reg-$user" 5090 "$ip:$port" -sf /sipp/register_auth.xml -m 1 \
    -inf "/out/reg-$user.csv" -key domain "$domain" -key expires 3600 \
    -key contact_hostport "$(phone_ip "$name"):$cport" -auth_uri "$domain" ||
    fail "$user could not register through $ip:$port: $(tail -5 "$OUT/reg-$user.err.log" 2>/dev/null)"
}
# calls_csv FILE CALLER PASS CALLEE: the injection file of uac_call*.xml.
calls_csv() {
  printf 'SEQUENTIAL\n%s;%s;[authentication username=%s password=%s]\n' "$2" "$4" "$2" "$3" >"$OUT/$1"
}

# The first packet of the capture FILE in PHONE that carries an INVITE: "SRC > DST".
invite_path() {
  in_phone "$1" tcpdump -nn -r "/out/$2" 2>/dev/null | grep -m1 'INVITE sip:' |
    awk '{ print $3, $4, $5 }' | tr -d ':'
}
# capture PHONE FILE PORT: tcpdump on the phone's interface, UDP to PORT; returns when live.
capture() {
  in_phone "$1" sh -c "tcpdump -nn -U -i eth0 -w /out/$2 udp port $3 2>/out/$2.log &"
  wait_until "tcpdump in $1" 10 grep -q 'listening on' "$OUT/$2.log"
}
# The value of header NAME in the first INVITE of a sipp message trace.
invite_header() {
  awk -v h="$2" 'found && index($0, h ":") == 1 { sub(/^[^:]*: */, ""); print; exit }
    /^INVITE sip:/ { found = 1 }' "$OUT/$1"
}

# call_and_capture CALLER PASS SERVER DOMAIN CALLEE SOURCE TAG: CALLER's phone calls CALLEE
# through SERVER (port 5060; DOMAIN in its URIs, as the phone is configured), CALLEE's phone
# answers on 5062 while capturing; the INVITE must reach it from SOURCE ("ip.port"). Sets path
# ("SRC > DST" of the INVITE); the callee's message trace is $OUT/uas-TAG.msg.log.
call_and_capture() {
  local caller=$1 pass=$2 server=$3 domain=$4 callee=$5 source=$6 tag=$7
  capture "$callee" "$tag.pcap" 5062
  callee_start "$callee" "uas-$tag" uas_callee.xml
  calls_csv "$tag.csv" "$caller" "$pass" "$callee"
  sipp_run "$caller" "$tag" 5070 "$server:5060" -sf /sipp/uac_call.xml -m 1 -d 200 \
    -inf "/out/$tag.csv" -key domain "$domain" -auth_uri "$callee@$domain" ||
    fail "$caller's call to $callee: $(tail -5 "$OUT/$tag.err.log")"
  callee_stop "$callee" "uas-$tag" 1
  path=$(invite_path "$callee" "$tag.pcap")
  [ "$path" = "$source > $(phone_ip "$callee").5062" ] ||
    fail "$callee's INVITE came $path, not from $source"
}

# ---- build and start ------------------------------------------------------------------------
log "building images"
bash deploy/docker/build.sh
docker ps -aq --filter "label=sipalias-compose-test=$PROJECT" | xargs -r docker rm -f >/dev/null
compose down -v --remove-orphans >/dev/null 2>&1 || true

# ---- 0. the image on its own ------------------------------------------------------------------
IMAGE=${SIPALIAS_IMAGE:-sipalias:latest}
log "0. image $IMAGE: $(docker image inspect -f '{{.Size}}' "$IMAGE" | numfmt --to=iec)"
[ "$(docker run --rm "$IMAGE" id -u)" = 10001 ] || fail "the image does not run as uid 10001"
# expect_refusal WHAT KEY DOCKER_RUN_ARGS...: the container must exit non-zero naming KEY.
expect_refusal() {
  local what=$1 key=$2 out
  shift 2
  if out=$(docker run --rm -v "$ROOT/deploy/docker/compose.toml:/etc/sipalias/sipalias.toml:ro" \
    "$@" 2>&1); then
    fail "$what: started anyway"
  fi
  case "$out" in *"$key"*) ;; *) fail "$what: the refusal does not name $key: $out" ;; esac
}
expect_refusal "a hostile processor id" processor.id \
  -e 'SIPALIAS_PROCESSOR__ID=a.b;$(reboot)' "$IMAGE" processor
expect_refusal "a hostname that is no id" processor.id --hostname 'bad_host' "$IMAGE" processor
expect_refusal "a short link secret" billing.link_secret \
  -e SIPALIAS_BILLING__LINK_SECRET=short "$IMAGE" billing
expect_refusal "a health check without a role" "no role" "$IMAGE" health
# A host's FQDN gives its first label as the id: valid, so the next key is the one refused.
expect_refusal "a FQDN hostname" processor.redis_url --hostname p7.example.net \
  -e SIPALIAS_PROCESSOR__REDIS_URL=nowhere "$IMAGE" processor

log "starting the cluster (project $PROJECT)"
compose up -d 2>"$OUT/up.log" || {
  cat "$OUT/up.log"
  fail "docker compose up"
}
NET=$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT" |
  xargs docker network inspect -f '{{.Name}}' | head -1)
[ -n "$NET" ] || fail "no network of project $PROJECT"
wait_until "every service healthy" 90 all_healthy
wait_until "one processor linked" 30 active_count_is 1
log "cluster up: $(active_processors | tr '\n' ' ')"

for acct in alice:pw-alice bob:pw-bob carol:pw-carol dave:pw-dave; do
  in_service billing sipalias-billing account add --force --aor "${acct%%:*}@$DOMAIN" \
    --password "${acct#*:}" --realm "$DOMAIN" --realm voip.oldprovider.example \
    --realm sip.another-old.example >/dev/null
done

phone alice 172.31.240.101 # a migrated phone: its server is the old provider's IP (alias 1)
phone bob 172.31.240.102   # a phone of ours: the main IP
phone carol 172.31.240.103 # another old provider's phone, on its extra port (alias 2, 5080)
phone dave 172.31.240.104  # alias 1 as well
phone callers 172.31.240.110

# ---- 1. the alias path ------------------------------------------------------------------------
log "1. alias path: alice through $ALIAS1, bob through $MAIN, calls both ways"
register alice alice pw-alice "$ALIAS1" 5060 "$ALIAS1" 5062
register bob bob pw-bob "$MAIN" 5060 "$DOMAIN" 5062
binding=$(redis_cli hgetall "sipalias:loc:{alice@$DOMAIN}" | grep '"ingress"' || true)
case "$binding" in
  *"\"ip\":\"$ALIAS1\""*) ;;
  *) fail "alice's binding does not record the alias $ALIAS1: $(redis_cli hgetall "sipalias:loc:{alice@$DOMAIN}")" ;;
esac

call_and_capture bob pw-bob "$MAIN" "$DOMAIN" alice "$ALIAS1.5060" bob-calls-alice
from=$(invite_header uas-bob-calls-alice.msg.log From)
to=$(invite_header uas-bob-calls-alice.msg.log To)
case "$from|$to" in
  *"@$ALIAS1"*"|"*"@$ALIAS1"*) ;;
  *) fail "alice's INVITE has From: $from, To: $to (not rewritten to $ALIAS1)" ;;
esac
log "   INVITE to alice: $path, From: $from, To: $to"

call_and_capture alice pw-alice "$ALIAS1" "$ALIAS1" bob "$MAIN.5060" alice-calls-bob
log "   INVITE to bob: $path, From: $(invite_header uas-alice-calls-bob.msg.log From)"

# ---- 2. a processor killed mid-call -------------------------------------------------------------
log "2. three processors, 30 calls, one processor killed mid-call"
compose up -d --no-recreate --scale processor=3 2>>"$OUT/up.log"
wait_until "three processors linked" 60 active_count_is 3
register carol carol pw-carol "$ALIAS2" 5080 "$ALIAS2" 5062
register dave dave pw-dave "$ALIAS1" 5060 "$ALIAS1" 5062
callee_start carol uas-carol uas_callee.xml
callee_start dave uas-dave uas_callee_hangs_up.xml -d 8000
calls_csv bob-carol.csv bob pw-bob carol
calls_csv bob-dave.csv bob pw-bob dave
# 15 calls hung up by the caller after 8 s, 15 by the callee after 8 s: all set up within ~2 s.
sipp_bg callers to-carol 5070 "$MAIN:5060" -sf /sipp/uac_call.xml -m 15 -r 10 -l 15 -d 8000 \
  -inf /out/bob-carol.csv -key domain "$DOMAIN" -auth_uri "carol@$DOMAIN"
to_carol=$!
sipp_bg callers to-dave 5072 "$MAIN:5060" -sf /sipp/uac_call_callee_hangs_up.xml -m 15 -r 10 \
  -l 15 -inf /out/bob-dave.csv -key domain "$DOMAIN" -auth_uri "dave@$DOMAIN"
to_dave=$!
wait_until "30 calls up" 20 dialogs_at_least 30
# ... and reported by the processors (heartbeats), so the victim is the one holding most.
wait_until "30 dialogs in the cluster view" 10 status_dialogs_at_least 30
victim=$(status | awk '$(NF-1) == "active" && $(NF-2) > max { max = $(NF-2); id = $1 } END { print id }')
held=$(routed_of "$victim")
victim_container=$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" \
  --filter "label=com.docker.compose.service=processor" |
  xargs docker inspect -f '{{.Id}} {{.Config.Hostname}}' | awk -v h="$victim" '$2 == h { print $1 }')
[ -n "$victim_container" ] || fail "no container for processor $victim"
log "   killing processor $victim ($(status | awk -v id="$victim" '$1 == id { print $(NF-2) }') dialogs, $held routed)"
[ "$(status | awk -v id="$victim" '$1 == id { print $(NF-2) }')" -ge 10 ] ||
  fail "the busiest of 3 processors holds fewer than 10 of 30 calls: $(status)"
docker kill "$victim_container" >/dev/null
expect_sipp to-carol "$to_carol"
expect_sipp to-dave "$to_dave"
callee_stop carol uas-carol 15
callee_stop dave uas-dave 15
log "   all 30 calls ended cleanly (15 hung up by the caller, 15 by the callee)"
docker rm -f "$victim_container" >/dev/null
callee_start carol uas-carol-after uas_callee.xml
sipp_run callers after-kill 5070 "$MAIN:5060" -sf /sipp/uac_call.xml -m 10 -r 10 -d 200 \
  -inf /out/bob-carol.csv -key domain "$DOMAIN" -auth_uri "carol@$DOMAIN" ||
  fail "new calls after the kill: $(tail -5 "$OUT/after-kill.err.log")"
callee_stop carol uas-carol-after 10
log "   10 new calls succeeded on the survivors"

# ---- 3. scale out under load --------------------------------------------------------------------
log "3. scale to 4 processors under call load"
before=$(active_processors | sort)
callee_start carol uas-carol-load uas_callee.xml
sipp_bg callers load 5070 "$MAIN:5060" -sf /sipp/uac_call.xml -m 150 -r 10 -d 1000 \
  -inf /out/bob-carol.csv -key domain "$DOMAIN" -auth_uri "carol@$DOMAIN"
load=$!
wait_until "calls under way" 10 dialogs_at_least 5
compose up -d --no-recreate --scale processor=4 2>>"$OUT/up.log"
wait_until "four processors linked" 60 active_count_is 4
log "   four linked while calls run: $(active_processors | tr '\n' ' ')"
expect_sipp load "$load"
callee_stop carol uas-carol-load 150
new_routed=0
for id in $(comm -13 <(echo "$before") <(active_processors | sort)); do
  new_routed=$((new_routed + $(routed_of "$id")))
done
[ "$new_routed" -gt 0 ] || fail "the new processors took no call: $(status)"
log "   150 calls, none failed; the new processors routed $new_routed messages"

# ---- 4. Redis restarted --------------------------------------------------------------------------
log "4. Redis restarted (append-only file on its volume)"
bindings_before=$(redis_cli --scan --pattern 'sipalias:loc:*' | sort)
compose restart redis >/dev/null 2>&1
wait_until "Redis healthy again" 30 all_healthy
bindings_after=$(redis_cli --scan --pattern 'sipalias:loc:*' | sort)
[ "$bindings_before" = "$bindings_after" ] ||
  fail "bindings changed across the restart: before [$bindings_before] after [$bindings_after]"
# Calls work again by themselves: the first attempts may meet processors still reconnecting.
callee_start alice uas-alice-redis uas_callee.xml
calls_csv bob-alice.csv bob pw-bob alice
call_alice() {
  sipp_run bob redis-call 5070 "$MAIN:5060" -sf /sipp/uac_call.xml -m 1 -d 200 \
    -inf /out/bob-alice.csv -key domain "$DOMAIN" -auth_uri "alice@$DOMAIN" -timeout 10s
}
wait_until "a call after the Redis restart" 60 call_alice
callee_stop alice uas-alice-redis 1
log "   $(echo "$bindings_after" | grep -c .) registrations kept; calls work again"

# ---- 5. dispatcher stopped and started -------------------------------------------------------------
log "5. dispatcher stopped and started"
linked=$(active_processors | wc -l)
compose stop dispatcher >/dev/null 2>&1
compose start dispatcher >/dev/null 2>&1
t0=$SECONDS
wait_until "the processors to link again" 60 active_count_is "$linked"
log "   $linked processors linked again $((SECONDS - t0)) s after the start"
call_and_capture bob pw-bob "$MAIN" "$DOMAIN" alice "$ALIAS1.5060" after-dispatcher
log "   alice (registered in step 1) called through $ALIAS1 again"

# ---- 6. down -v ------------------------------------------------------------------------------------
log "6. docker compose down -v"
docker ps -aq --filter "label=sipalias-compose-test=$PROJECT" | xargs -r docker rm -f >/dev/null
compose down -v --remove-orphans >/dev/null 2>&1
left=$(
  docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"
  docker network ls -q --filter "label=com.docker.compose.project=$PROJECT"
  docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT"
)
[ -z "$left" ] || fail "left after down -v: $left"
log "passed in $((SECONDS - START)) s"
rm -rf "$OUT" 2>/dev/null || true
