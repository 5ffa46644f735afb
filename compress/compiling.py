"""torch.compile for a model with a plan applied.

A plan without per-image stages keeps every image's token count a function of shapes (the uniform
reduce of each op, :attr:`~paretoken.compress.ops.OpSpec.reduce_uniform`), so its whole forward
compiles to one graph with static shapes (``fullgraph=True``). A per-image plan's counts come back to
the host after each stage (to trim and split the batch, :mod:`~paretoken.compress.grouping`): it
compiles with dynamic shapes, each block's two halves (attention, the MLP) a graph of its own, and
the batch bookkeeping, token counts included, runs eagerly between them, as does each stage (its op
brings counts to the host to trim the batch): the halves of blocks that take the same path share
their graphs (one MLP graph for every block, not twelve).
"""
from __future__ import annotations

from typing import Callable

import torch

from paretoken.compress.ops import get_op
from paretoken.compress.patch import applied_plan
from paretoken.compress.plan import Plan
from paretoken.errors import ParetokenError


def compiles_whole(plan: Plan, depth: int) -> bool:
    """Whether ``plan`` on a ``depth``-block model compiles to one graph: no per-image stage, and every
    stage's op has a uniform reduce."""
    return not plan.per_image and all(get_op(s.op).reduce_uniform is not None for s in plan.stages_run(depth))


def compile_model(model: torch.nn.Module, backend: str = "inductor", mode: str | None = None) -> Callable:
    """``torch.compile(model)`` as its applied plan allows (:func:`compiles_whole`): one static graph, or
    dynamic shapes with graph breaks. Returns the compiled callable; ``model`` itself is unchanged, so
    :func:`~paretoken.compress.token_counts` reads it after a compiled forward, and applying another plan
    to it makes the callable compile that plan on its next call (both stay cached). Compilation happens
    on the first call of each input shape, so time that call apart from timed ones."""
    plan = applied_plan(model)
    if plan is None:
        raise ParetokenError("model: no plan applied; call paretoken.apply(model, plan) first")
    depth = len(model.blocks)
    whole = compiles_whole(plan, depth)
    if not whole:  # block halves whose stages differ compile apart: let every one keep its graphs
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * depth)
    return torch.compile(model, fullgraph=whole, dynamic=not whole, backend=backend, mode=mode)
