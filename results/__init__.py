"""paretoken.results: what users do after a search.

Query a study (:func:`load`, :func:`front`, :func:`hypervolume`, :func:`compare`), draw the front
(:mod:`paretoken.results.plots`), export a chosen plan (:func:`export`) and fine-tune it
(:mod:`paretoken.results.finetune`). Importing this package is cheap: pandas and Optuna load on
first use.
"""
from __future__ import annotations

import importlib

_LAZY = {name: "paretoken.results.query" for name in (
    "DEFAULT_OBJECTIVES", "MAXIMIZE", "best", "compare", "front", "hypervolume", "hypervolume_history", "load",
    "plan_label", "reference_point")}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'paretoken.results' has no attribute {name!r}")


__all__ = list(_LAZY)
