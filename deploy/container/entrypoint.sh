#!/bin/sh
# Container entry point: secrets mounted as files (compose `secrets:`, Kubernetes Secret
# volumes) named like the variable in lower case, e.g. /run/secrets/lightbox_api_token, become
# LIGHTBOX_* variables; then `lightbox ARGS...` replaces this shell (signals reach it directly).
set -eu
for file in /run/secrets/lightbox_*; do
  [ -f "$file" ] || continue
  name=$(basename "$file" | tr '[:lower:]' '[:upper:]')
  value=$(cat "$file")
  export "$name=$value"
done
exec lightbox "$@"
