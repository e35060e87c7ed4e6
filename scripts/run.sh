#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: `specdist generate` with configs/default.yaml.
# Extra arguments go to `specdist generate` (e.g. --set steps=20 --out outputs/quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
specdist generate --config configs/default.yaml "$@"
