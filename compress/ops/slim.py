"""``slim``: Patch Slimming's stage; top-k by class importance carried back one attention step.

The top-down choice of a whole pyramid on calibration images is :mod:`paretoken.compress.slim`.
"""
from __future__ import annotations

from paretoken.compress.ops import prune
from paretoken.compress.ops.base import KEEP, R, OpSpec, no_flops, register

SPEC = register(OpSpec(
    name="slim", summary="keep the top patch tokens by class importance propagated one attention step back",
    source="Patch Slimming (Tang et al., CVPR 2022)", amounts=((KEEP, R),), scores=("cls_attn", "head_weighted"),
    reduce=prune.reduce, needs=frozenset({"full"}), mixed=False, flops=no_flops,
    reduce_uniform=prune.reduce_uniform))
