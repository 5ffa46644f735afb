#!/usr/bin/env bash
# Set up, then run the main job: a multi-objective search (top-1 up, GFLOPs down) over
# the mixed space on the embedded default model and Fashion-MNIST, seeded with the
# published presets. Ends with the Pareto table and studies/default_front.png.
# Running it again resumes the same study.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec paretoken search --study default --trials 30 --plot studies/default_front.png "$@"
