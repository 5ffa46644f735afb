#!/usr/bin/env bash
# The GPU checks in one call, for a machine with one CUDA device (the `device` tool's machines):
# the GPU tests, then DeiT-S throughput of every preset eager and compiled (batch 256, bf16 autocast),
# then paretoken's ToMe against ToMe's own code when TOME_SRC names a checkout of
# facebookresearch/ToMe. Figures go to bench/results/ and, where $OUT is set, are copied there too.
#
#     bash bench/gpu.sh                        # not yet run on a GPU: no session has had one
#     TOME_SRC=~/src/ToMe bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
python3 bench/throughput.py --device cuda --batch-size 256 --rounds 3 --amp bf16 --out throughput_cuda
python3 bench/throughput.py --device cuda --batch-size 256 --rounds 3 --amp bf16 --compile --out throughput_cuda_compiled
if [ -n "${TOME_SRC:-}" ]; then
  python3 bench/tome_reference.py --tome-src "$TOME_SRC" --device cuda --batch-size 256 --amp bf16 --compile
fi
if [ -n "${OUT:-}" ]; then
  cp bench/results/throughput_cuda*.json "$OUT"/
  cp bench/results/tome_reference_cuda.json "$OUT"/ 2>/dev/null || true
fi
