#!/usr/bin/env bash
# Makes the base image the Dockerfile names, `debian:bookworm-slim`, from Debian's package
# registry (debootstrap --variant=minbase, trimmed of package caches and docs), for machines
# that cannot pull from a container registry. The root filesystem is cached as a tarball in
# liftoff's cache folder (made once, under a minute) and imported into buildah's storage under
# the name a `FROM debian:bookworm-slim` resolves to. Needs root, buildah and debootstrap.
#
# Usage: scripts/container_base.sh        (prints the image name)
set -euo pipefail
. "$(dirname "$0")/cache_dir.sh"
NAME=docker.io/library/debian:bookworm-slim
TAR="$LIFTOFF_CACHE_DIR/container/debian-bookworm-minbase.tar"
BUILDAH=(buildah --storage-driver "${STORAGE_DRIVER:-vfs}")
if "${BUILDAH[@]}" inspect --type image "$NAME" >/dev/null 2>&1; then
  echo "$NAME"
  exit 0
fi
if [ ! -s "$TAR" ]; then
  mkdir -p "$(dirname "$TAR")"
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >"$TAR.log" 2>&1 ||
    { tail -20 "$TAR.log" >&2; exit 1; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log
  # The mirror debootstrap used, for apt in images built on this base.
  echo "deb http://deb.debian.org/debian bookworm main" > "$root/etc/apt/sources.list"
  tar -C "$root" -cf "$TAR.part" .
  mv "$TAR.part" "$TAR"
fi
ctr=$("${BUILDAH[@]}" from scratch)
mnt=$("${BUILDAH[@]}" mount "$ctr")
tar -C "$mnt" -xf "$TAR"
"${BUILDAH[@]}" umount "$ctr" >/dev/null
"${BUILDAH[@]}" config --cmd /bin/bash "$ctr"
"${BUILDAH[@]}" commit --quiet --format docker "$ctr" "$NAME" >/dev/null
"${BUILDAH[@]}" rm "$ctr" >/dev/null
echo "$NAME"
