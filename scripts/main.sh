#!/usr/bin/env bash
# Set up, then run the main job: a multi-objective search (top-1 up, GFLOPs down) over
# the mixed space on the embedded default model and Fashion-MNIST, seeded with the
# published presets, within a budget of 10 top-1 points lost against the uncompressed
# model. Ends with the Pareto table and studies/default_front.png.
# Running it again resumes the same study.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec paretoken search --study default --trials 30 --max-top1-drop 10 --plot studies/default_front.png "$@"
