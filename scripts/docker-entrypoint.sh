#!/bin/sh
# The container's entrypoint: the liftoff launcher, configured by TAKEOFF_* variables.
# - A Takeoff manifest mounted at /code/config.yaml is used unless TAKEOFF_CONFIG_FILE names another.
# - HF_TOKEN is accepted for TAKEOFF_ACCESS_TOKEN.
# - With no arguments the launcher serves (`liftoff serve`); any arguments are passed through,
#   e.g. `docker run liftoff generate --prompt hi`.
set -eu
if [ -z "${TAKEOFF_CONFIG_FILE:-}" ] && [ -f /code/config.yaml ]; then
  export TAKEOFF_CONFIG_FILE=/code/config.yaml
fi
if [ -z "${TAKEOFF_ACCESS_TOKEN:-}" ] && [ -n "${HF_TOKEN:-}" ]; then
  export TAKEOFF_ACCESS_TOKEN="$HF_TOKEN"
fi
LIFTOFF="${LIFTOFF_BIN:-liftoff}"
if [ "$#" -eq 0 ]; then
  exec "$LIFTOFF" serve
fi
exec "$LIFTOFF" "$@"
