"""paretoken.compress: the plan schema, the op registry and the patching of timm models.

The plan schema and the registry import without torch; the patching functions load torch and timm
on first use.
"""
from __future__ import annotations

import importlib

from paretoken.compress.ops import SCORES, OpSpec, get_op, op_names, register
from paretoken.compress.plan import Plan, Stage, load_plan

_LAZY = {name: "paretoken.compress.patch"
         for name in ("applied_plan", "apply", "learn_thresholds", "learned_plan", "token_counts",
                      "token_slots")}
_LAZY["compile_model"] = "paretoken.compress.compiling"


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'paretoken.compress' has no attribute {name!r}")


__all__ = ["SCORES", "OpSpec", "Plan", "Stage", "get_op", "load_plan", "op_names", "register", *_LAZY]
