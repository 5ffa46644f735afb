"""paretoken.search: multi-objective searches over plans, kept in an Optuna study.

    from paretoken.search import Budgets, run_search
    from paretoken.evaluators.evaluate import EvalConfig
    result = run_search("demo", space="mixed", objectives=("top1", "gflops"), n_trials=40,
                        backend="local", budgets=Budgets(max_top1_drop=2), eval_config=EvalConfig(images=500))
    print(result.front)

The study (default ``sqlite:///studies/<study>.db``; ``journal:PATH``; ``postgresql://...``) is the
single source of truth; :mod:`paretoken.results` reads it and builds on this package, never the
other way round. Importing this package is cheap: the heavy parts (Optuna, torch, Ray) load on first use.

Modules: ``run`` (run_search: wires the parts), ``options`` (inputs checked), ``opening`` (study
created or resumed), ``driver`` (ask/tell loop), ``executors`` (local, and Ray in ``ray_tune``),
``worker`` (one trial), ``lifecycle`` (heartbeats, stale trials, Ctrl-C), ``report`` (progress lines,
front table), ``record`` (the study's attributes), ``table`` (the study as a table), ``pareto``
(dominance, reference point, hypervolume), ``study`` (objectives, samplers, enqueued trials, counts),
``storage`` (storage URLs).
"""
from __future__ import annotations

from paretoken.evaluators.metrics import Budgets
from paretoken.search.storage import default_storage, open_storage

_LAZY = {
    "run_search": "paretoken.search.run",
    "SearchResult": "paretoken.search.report",
    "SearchOptions": "paretoken.search.options",
    "BACKENDS": "paretoken.search.options",
    "DIRECTIONS": "paretoken.search.study",
    "SAMPLERS": "paretoken.search.study",
    "DEFAULT_OBJECTIVES": "paretoken.search.study",
    "make_sampler": "paretoken.search.study",
    "enqueue_plan": "paretoken.search.study",
    "hypervolume": "paretoken.search.pareto",
    "reference_point": "paretoken.search.pareto",
    "run_trial": "paretoken.search.worker",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'paretoken.search' has no attribute {name!r}")


__all__ = ["Budgets", "default_storage", "open_storage", *_LAZY]
