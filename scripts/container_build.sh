#!/usr/bin/env bash
# Builds liftoff's container image with buildah (no Docker daemon; root, storage driver vfs)
# from what this machine can reach: the base from scripts/container_base.sh (Debian's package
# registry), the binary built here and staged as the Dockerfile's `prebuilt/` context.
#
#   scripts/container_build.sh cpu  [TAG]   release CPU binary + the default model (default tag liftoff-cpu:dev)
#   scripts/container_build.sh cuda [TAG]   the CUDA binary (scripts/cuda_build.sh, run here) + its
#                                           CUDA libraries from the PyPI wheels (default liftoff-cuda:dev)
#
# Prints the image name; writes the build time and the image size to stderr.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
KIND=${1:?usage: $0 cpu|cuda [TAG]}
TAG=${2:-liftoff-$KIND:dev}
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
cd "$ROOT"
start=$(date +%s)
scripts/container_base.sh >/dev/null
STAGE="$ROOT/prebuilt/$KIND"
rm -rf "$STAGE"
mkdir -p "$STAGE"
case "$KIND" in
  cpu)
    BIN=${LIFTOFF_RELEASE_BIN:-$ROOT/target/release/liftoff}
    if [ -z "${LIFTOFF_RELEASE_BIN:-}" ]; then
      cargo build --release -p liftoff >&2
    fi
    cp "$BIN" "$STAGE/liftoff"
    strip "$STAGE/liftoff"
    mkdir -p "$STAGE/cache/models"
    cp "$(scripts/fetch_default_model.sh)" "$STAGE/cache/models/"
    ;;
  cuda)
    scripts/cuda_build.sh >&2   # incremental: a few minutes when the sources changed
    cp target/cuda/release/liftoff "$STAGE/liftoff"
    scripts/cuda_runtime_libs.sh "$STAGE/lib"
    ;;
  *) echo "usage: $0 cpu|cuda [TAG]" >&2; exit 2 ;;
esac
ARTIFACTS=$(echo "$KIND" | tr a-z A-Z)_ARTIFACTS
buildah --storage-driver "$STORAGE_DRIVER" bud --quiet --isolation chroot --format docker \
  --layers=false --pull=never --build-arg "$ARTIFACTS=prebuilt-$KIND" --target "$KIND" \
  -t "$TAG" . >/dev/null
rm -rf "$STAGE"
# Drop the previous build's image layers that no tag names any more.
buildah --storage-driver "$STORAGE_DRIVER" rmi --prune >/dev/null 2>&1 || true
echo "built $TAG in $(( $(date +%s) - start )) s; $(buildah --storage-driver "$STORAGE_DRIVER" images --format '{{.Size}}' "$TAG" | head -1)" >&2
echo "$TAG"
