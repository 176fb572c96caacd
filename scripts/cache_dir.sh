#!/usr/bin/env bash
# liftoff's cache folder: $LIFTOFF_CACHE, else $XDG_CACHE_HOME/liftoff, else ~/.cache/liftoff
# (the rule of engine/src/cache_dir.rs). Source it for $LIFTOFF_CACHE_DIR, or run it to print
# the folder.
LIFTOFF_CACHE_DIR="${LIFTOFF_CACHE:-${XDG_CACHE_HOME:-${HOME:+$HOME/.cache}}}"
if [ -z "${LIFTOFF_CACHE:-}" ]; then
  LIFTOFF_CACHE_DIR="${LIFTOFF_CACHE_DIR:-.cache}/liftoff"
fi
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  echo "$LIFTOFF_CACHE_DIR"
fi
