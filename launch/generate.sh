#!/usr/bin/env bash
# Run one specdist generation job on this node (one device), for batch schedulers and job scripts.
# Settings come from environment variables with defaults; extra arguments go to `specdist generate`.
#   SPECDIST_CONFIG   config file                 (default: configs/default.yaml)
#   SPECDIST_OUT      output directory            (default: outputs/$(date +%Y%m%d-%H%M%S))
#   SPECDIST_DEVICE   auto | cpu | cuda           (default: auto)
#   SPECDIST_METHOD   full | fora | taylorseer | speca (default: the config's)
# Example: SPECDIST_METHOD=speca SPECDIST_DEVICE=cuda launch/generate.sh --set steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${SPECDIST_CONFIG:-configs/default.yaml}
OUT=${SPECDIST_OUT:-outputs/$(date +%Y%m%d-%H%M%S)}
ARGS=(--config "$CONFIG" --out "$OUT" --set "device=${SPECDIST_DEVICE:-auto}")
[ -n "${SPECDIST_METHOD:-}" ] && ARGS+=(--set "method=$SPECDIST_METHOD")
if [ -x .venv/bin/specdist ]; then SPECDIST=.venv/bin/specdist; else SPECDIST=specdist; fi
exec "$SPECDIST" generate "${ARGS[@]}" "$@"
