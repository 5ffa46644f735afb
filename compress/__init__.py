"""paretoken.compress: the plan schema and the token reducers.

The plan schema imports without torch; the patching functions load torch and timm on first use.
"""
from __future__ import annotations

import importlib

from paretoken.compress.plan import OPS, SCORES, Plan, Stage, load_plan

_LAZY = {name: "paretoken.compress.patch"
         for name in ("applied_plan", "apply", "learn_thresholds", "learned_plan", "token_counts")}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'paretoken.compress' has no attribute {name!r}")


__all__ = ["OPS", "SCORES", "Plan", "Stage", "load_plan", *_LAZY]
