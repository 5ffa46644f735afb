#!/usr/bin/env bash
# Set up, then run the default test suite (about 12 minutes on 2 CPU cores; the 15 slowest tests listed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec python3 -m pytest -q "$@"
