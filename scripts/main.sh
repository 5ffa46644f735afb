#!/usr/bin/env bash
# Set up, then run the main job on the embedded default model and data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec paretoken eval --preset tome-r13 "$@"
