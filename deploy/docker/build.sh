#!/usr/bin/env bash
# Builds the sipalias runtime image (deploy/Dockerfile), tagged SIPALIAS_IMAGE (default
# sipalias:latest):
#   1. the release binaries, on this host (BUILD=0 skips cargo when they are up to date);
#   2. stripped copies in target/docker/bin/ (the build context holds nothing else, see
#      .dockerignore): the image carries no debug information (the release profile keeps some
#      for profiling on the host);
#   3. docker build FROM SIPALIAS_BASE_IMAGE: by default debian:bookworm-slim when the engine
#      has it, else sipalias-base:bookworm, which deploy/docker/base-image.sh builds offline
#      with debootstrap (with sipalias-tools:bookworm, the image of the phones, vip and Redis).
# The host must be Debian 12 (glibc 2.36, as the base image): see docs/deployment.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=${SIPALIAS_IMAGE:-sipalias:latest}
BASE=${SIPALIAS_BASE_IMAGE:-}
if [ -z "$BASE" ]; then
  if docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
    BASE=debian:bookworm-slim
  else
    BASE=sipalias-base:bookworm
  fi
fi
if [ "$BASE" = sipalias-base:bookworm ] ||
  ! docker image inspect "${SIPALIAS_TOOLS_IMAGE:-sipalias-tools:bookworm}" >/dev/null 2>&1; then
  bash deploy/docker/base-image.sh
fi

if [ "${BUILD:-1}" != 0 ]; then
  cargo build --release --workspace --bins --quiet
fi
mkdir -p target/docker/bin
for bin in sipalias-dispatcher sipalias-processor sipalias-billing; do
  strip --strip-debug -o "target/docker/bin/$bin" "target/release/$bin"
done

# The classic builder: the engines this runs on need not have BuildKit (buildx).
previous=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0} docker build --quiet -f deploy/Dockerfile \
  --build-arg BASE="$BASE" -t "$IMAGE" . >/dev/null
# The image this one replaces, now untagged, unless a container still uses it.
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$IMAGE")" ]; then
  docker rmi "$previous" >/dev/null 2>&1 || true
fi
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
base_size=$(docker image inspect -f '{{.Size}}' "$BASE")
echo "built $IMAGE from $BASE: $(numfmt --to=iec "$size") ($(numfmt --to=iec $((size - base_size))) over the base)"
