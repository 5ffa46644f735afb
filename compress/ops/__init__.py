"""paretoken.compress.ops: the registry of token-reduction ops, one module per op.

    from paretoken.compress.ops import get_op, op_names
    spec = get_op("merge")      # OpSpec: amounts, scores, per_image, needs, reduce, grids, mixed
    op_names()                  # ('prune', 'prune_fuse', 'merge', 'joint', 'threshold', 'slim', 'pitome', ...)

:mod:`~paretoken.compress.ops.base` says what an op declares and how to register a new one.
"""
from __future__ import annotations

from paretoken.compress.ops.base import (FUSE, KEEP, KEEP_GRID, NEEDS, R, SCORE_NEEDS, SCORES, TRAINED_SCORES,
                                         Amount, Choice, Grid, OpSpec, Option, TokenDims, get_op, no_flops, op_names,
                                         op_table, ops, register, stage_fields, unregister)
# the built-in ops, registered in this order (the order of error messages and of ``mixed``'s choices)
from paretoken.compress.ops import (prune, prune_fuse, merge, joint, threshold, slim, pitome,  # noqa: E402,F401
                                    prune_merge)  # isort: skip

__all__ = ["FUSE", "KEEP", "KEEP_GRID", "NEEDS", "R", "SCORES", "SCORE_NEEDS", "TRAINED_SCORES", "Amount", "Choice",
           "Grid", "OpSpec", "Option", "TokenDims", "get_op", "no_flops", "op_names", "op_table", "ops", "register",
           "stage_fields", "unregister"]
