#!/usr/bin/env bash
# Builds, offline from any registry, the base images the sipalias images are built FROM, when
# they are missing from the local Docker engine (docs/deployment.md, "Images"):
#
#   sipalias-base:bookworm   Debian 12 `debootstrap --variant=minbase` (the same packages as the
#                            registry's debian:bookworm-slim: Essential + apt), made with
#                            `docker import`. The runtime image (deploy/Dockerfile) is built
#                            FROM it here; with a registry, FROM debian:bookworm-slim.
#   sipalias-tools:bookworm  The base plus sipp (Debian's sip-tester), tcpdump, iproute2 and
#                            redis-server: the test phones of tests/compose/, the `vip`
#                            container of deploy/docker-compose.yml that holds the virtual and
#                            alias IPs, and its Redis. deploy/docker/Dockerfile.tools builds the
#                            same from debian:bookworm-slim where a registry is reachable.
#
# Needs root (debootstrap), debootstrap (installed with apt-get when missing) and Debian's
# package mirror (MIRROR, default http://deb.debian.org/debian). FORCE=1 rebuilds both images.
set -euo pipefail

MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
BASE_IMAGE=${SIPALIAS_BASE_IMAGE:-sipalias-base:bookworm}
TOOLS_IMAGE=${SIPALIAS_TOOLS_IMAGE:-sipalias-tools:bookworm}
TOOLS_PACKAGES=sip-tester,tcpdump,iproute2,redis-server

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

if [ "${FORCE:-0}" != 1 ] && have_image "$BASE_IMAGE" && have_image "$TOOLS_IMAGE"; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "base-image.sh: debootstrap needs root; run it as root (or pull debian:bookworm-slim" \
    "and pass --build-arg BASE=debian:bookworm-slim to docker build)" >&2
  exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

work=$(mktemp -d /tmp/sipalias-rootfs.XXXXXX)
trap 'rm -rf "$work"' EXIT

# One root file system per image; the package cache and lists are dropped from both, as in
# debian:bookworm-slim, so that the images carry only what is installed.
import_rootfs() { # DIR IMAGE
  local dir=$1 image=$2
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/tmp/* \
    "$dir"/var/log/*.log "$dir"/usr/share/doc/* "$dir"/usr/share/man/* \
    "$dir"/usr/share/locale/*
  printf 'deb %s %s main\ndeb %s %s-updates main\n' "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" \
    >"$dir/etc/apt/sources.list"
  tar --numeric-owner -C "$dir" -c . |
    docker import -c 'CMD ["bash"]' -c 'ENV LANG=C.UTF-8' - "$image" >/dev/null
  echo "built $image ($(docker image inspect -f '{{.Size}}' "$image" | numfmt --to=iec))"
}

# The two root file systems are bootstrapped side by side (mostly waiting on the mirror).
# bootstrap NAME [DEBOOTSTRAP_ARGS...]: $work/NAME, its log in $work/NAME.log.
bootstrap() {
  local name=$1
  shift
  debootstrap --variant=minbase "$@" "$SUITE" "$work/$name" "$MIRROR" >"$work/$name.log" 2>&1 ||
    { tail -20 "$work/$name.log" >&2; return 1; }
}
pids=()
if [ "${FORCE:-0}" = 1 ] || ! have_image "$BASE_IMAGE"; then
  bootstrap base &
  pids+=("$!:base:$BASE_IMAGE")
fi
if [ "${FORCE:-0}" = 1 ] || ! have_image "$TOOLS_IMAGE"; then
  bootstrap tools --include="$TOOLS_PACKAGES" &
  pids+=("$!:tools:$TOOLS_IMAGE")
fi
for entry in "${pids[@]}"; do
  IFS=: read -r pid name image <<<"$entry"
  wait "$pid" || { echo "base-image.sh: debootstrap of $image failed" >&2; exit 1; }
  import_rootfs "$work/$name" "$image"
  rm -rf "${work:?}/$name"
done
