"""Read an Optuna study into a table and answer Pareto questions about it.

``load(study, storage)`` gives one row per trial (columns: :mod:`paretoken.search.table`); ``front``,
``hypervolume`` and ``compare`` are pure pandas/numpy on that table, so they work on any DataFrame
with the metric columns. The Pareto maths (dominance, hypervolume, the reference's convention) is
:mod:`paretoken.search.pareto`'s, the same the search prints with.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from paretoken.errors import ParetokenError
from paretoken.evaluators.metrics import METRICS, Budgets
from paretoken.search import storage as search_storage
from paretoken.search.pareto import (MAXIMIZE, budget, dominating, loss_hypervolume, losses, non_dominated,
                                     preset_names, preset_rows, presets_dominated, reference_losses,
                                     reference_value)
from paretoken.search.pareto import check_objectives as _check_objectives
from paretoken.search.storage import default_storage, study_storage
from paretoken.search.study import DEFAULT_OBJECTIVES
from paretoken.search.table import plan_label, trials_frame


# --------------------------------------------------------------------------- storage
def open_storage(url: str):
    """An Optuna storage for ``url`` as the search writes them: ``sqlite:///FILE``, ``journal:FILE``,
    ``postgresql://...``. Reading never creates anything: a missing SQLite or journal file, or one
    without studies, is an error."""
    return search_storage.open_storage(url, create=False)


def study_names(storage: str) -> list[str]:
    """Names of the studies in ``storage``."""
    import optuna

    return sorted(s.study_name for s in optuna.get_all_study_summaries(open_storage(storage),
                                                                        include_best_trial=False))


def load_study(study: str, storage: str | None = None):
    """``optuna.load_study`` with one-line errors naming the studies that do exist."""
    import optuna

    storage = study_storage(study, storage)
    backend = open_storage(storage)
    try:
        return optuna.load_study(study_name=study, storage=backend)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(backend, include_best_trial=False))
        valid = ", ".join(names) if names else "(none)"
        raise ParetokenError(f"study: {study!r} is not in {search_storage.redact(storage)}; studies there: {valid}") from None


def load(study: str, storage: str | None = None) -> pd.DataFrame:
    """One row per trial of ``study`` in ``storage`` (default: the search's default for that name).

    Unknown study or unreachable storage: a one-line :class:`ParetokenError` that lists the
    studies that exist. ``df.attrs`` holds ``study``, ``storage`` and the study's user attrs.
    """
    storage = study_storage(study, storage)
    df = trials_frame(load_study(study, storage))
    df.attrs["storage"] = storage
    return df


# --------------------------------------------------------------------------- fronts
def front(df: pd.DataFrame, objectives: Sequence[str] | str = DEFAULT_OBJECTIVES, budgets: Budgets | None = None,
          feasible_only: bool = True) -> pd.DataFrame:
    """The non-dominated COMPLETE rows of ``df`` on ``objectives`` within the budgets (and, with
    ``feasible_only``, the study's constraints: infeasible trials stay in the table but leave the front).

    Directions: :data:`~paretoken.evaluators.metrics.DIRECTIONS`. Rows missing an objective (NaN) are
    left out. The result is sorted by the first objective, best first. A row that took the values of
    another row on the front (``same_plan_as``: the same plan, not measured again) is left out.
    """
    objectives = _check_objectives(objectives, df)
    rows = budget(df, budgets, feasible_only)
    points = losses(rows, objectives)
    finite = np.all(np.isfinite(points), axis=1) if len(rows) else np.zeros(0, dtype=bool)
    rows, points = rows[finite], points[finite]
    out = rows[non_dominated(points)]
    if "same_plan_as" in out:
        out = out[~out["same_plan_as"].isin(set(out["number"]))]
    return out.sort_values(list(objectives), ascending=[not MAXIMIZE[o] for o in objectives], kind="stable")


def uncompressed_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``df`` whose plan changes nothing (the uncompressed model), in ``df``'s order."""
    from paretoken.compress.plan import is_uncompressed

    return df[df["plan"].map(is_uncompressed)] if "plan" in df.columns else df.iloc[:0]


def reference_point(df: pd.DataFrame, objectives: Sequence[str] | str = DEFAULT_OBJECTIVES,
                    top1_margin: float = 10.0) -> dict[str, float]:
    """A fixed reference point for hypervolume, the search's convention.

    From the first COMPLETE trial of the uncompressed model (a plan that changes nothing), as the search
    does (:func:`paretoken.search.pareto.reference_value`). Without that trial, or where it lacks an
    objective, the worst COMPLETE value in ``df``. An objective no COMPLETE trial measured is an error.
    """
    objectives = _check_objectives(objectives, df)
    done = budget(df, feasible_only=False)
    base = uncompressed_rows(done)
    first = base.sort_values("number").iloc[0] if len(base) else None
    ref: dict[str, float] = {}
    for o in objectives:
        column = done[o].dropna()
        if column.empty:
            measured = [c for c in METRICS if c in done and done[c].notna().any()]
            raise ParetokenError(f"objectives: no COMPLETE trial has {o!r} (not measured in this study); "
                                 f"valid here: {', '.join(measured)}")
        value = reference_value(o, float(first[o]) if first is not None and o in first else math.nan, top1_margin)
        if math.isnan(value):
            value = column.min() if MAXIMIZE[o] else column.max()
        ref[o] = float(value)
    return ref


def hypervolume(df: pd.DataFrame, objectives: Sequence[str] | str = DEFAULT_OBJECTIVES,
                reference: Mapping[str, float] | Sequence[float] | None = None) -> float:
    """Exact hypervolume of the COMPLETE rows of ``df`` against ``reference``.

    ``reference`` is in the objectives' own units (a mapping by name or a sequence in
    ``objectives`` order), default :func:`reference_point`. Points worse than the reference in
    some objective add nothing. Units: product of the objectives' units (top1 % x GFLOPs).
    """
    objectives = _check_objectives(objectives, df)
    if reference is None:
        reference = reference_point(df, objectives)
    return loss_hypervolume(losses(budget(df), objectives), reference_losses(reference, objectives))


def hypervolume_history(df: pd.DataFrame, objectives: Sequence[str] | str = DEFAULT_OBJECTIVES,
                        reference: Mapping[str, float] | Sequence[float] | None = None) -> pd.DataFrame:
    """Hypervolume after each trial (COMPLETE, full-fidelity and feasible ones count), in trial-number order:
    columns number, state, hypervolume."""
    objectives = _check_objectives(objectives, df)
    if reference is None:
        reference = reference_point(df, objectives)
    ref = reference_losses(reference, objectives)
    ordered = df.sort_values("number")
    points = losses(ordered, objectives)
    complete = (ordered["state"] == "COMPLETE").to_numpy()
    if "full_fidelity" in ordered.columns:  # successive halving: trials stopped below the full rung do not count
        complete = complete & ordered["full_fidelity"].astype(bool).to_numpy()
    if "feasible" in ordered.columns:
        complete = complete & ordered["feasible"].astype(bool).to_numpy()
    values, current, seen = [], 0.0, []
    for point, ok in zip(points, complete):
        if ok and np.all(np.isfinite(point)) and np.all(point <= ref):
            seen.append(point)
            current = loss_hypervolume(np.asarray(seen), ref)
        values.append(current)
    return pd.DataFrame({"number": ordered["number"].to_numpy(), "state": ordered["state"].to_numpy(),
                         "hypervolume": values})


def best(df: pd.DataFrame, metric: str = "top1", budgets: Budgets | None = None) -> pd.Series | None:
    """The COMPLETE row with the best ``metric`` within the budgets (ties: fewer GFLOPs, or for
    ``metric="gflops"`` the higher top1, then the earlier trial); None when no row fits."""
    _check_objectives([metric], df)
    rows = budget(df, budgets).dropna(subset=[metric])
    if rows.empty:
        return None
    tie = "top1" if metric == "gflops" else "gflops"
    keys = [metric] + ([tie] if tie in rows else []) + ["number"]
    return rows.sort_values(keys, ascending=[not MAXIMIZE[k] for k in keys[:-1]] + [True], kind="stable").iloc[0]


def compare(studies: Sequence[tuple[str, str | None]] | Sequence[str],
            objectives: Sequence[str] | str = DEFAULT_OBJECTIVES, budgets: Budgets | None = None,
            reference: Mapping[str, float] | Sequence[float] | None = None) -> pd.DataFrame:
    """One table of several studies: trials, complete, failed, interrupted, front size, best top1 within the budgets
    (and its GFLOPs and plan), hypervolume against one shared reference point.

    ``studies``: (name, storage) pairs, or names for the default storage. Without ``reference``
    the point comes from all studies together (:func:`reference_point` on their union), so the
    hypervolumes are comparable.
    """
    objectives = _check_objectives(objectives)
    frames = []
    for item in studies:
        name, storage = (item, None) if isinstance(item, str) else item
        frames.append((name, load(name, storage)))
    if reference is None and frames:
        reference = reference_point(pd.concat([f for _, f in frames], ignore_index=True), objectives)
    rows = []
    for name, df in frames:
        within = budget(df, budgets)
        top = best(df, "top1", budgets) if "top1" in df else None
        rows.append({
            "study": name,
            "storage": search_storage.redact(df.attrs.get("storage", "")),
            "trials": len(df),
            "complete": int((df["state"] == "COMPLETE").sum()),
            "failed": int(((df["state"] == "FAIL") & ~df["interrupted"]).sum()),
            "interrupted": int(df["interrupted"].sum()),  # killed or Ctrl-C, their plans re-run
            "within_budget": len(within),
            "front_size": len(front(df, objectives, budgets)),
            "best_top1": math.nan if top is None else float(top["top1"]),
            "best_gflops": math.nan if top is None else float(top["gflops"]),
            "best_trial": None if top is None else int(top["number"]),
            "best_plan": None if top is None else top["plan_str"],
            "hypervolume": hypervolume(within, objectives, reference) if reference is not None else math.nan,
        })
    out = pd.DataFrame(rows)
    if rows:  # int or None, not a float column that prints trial 12345 as 1.234e+04
        out["best_trial"] = pd.Series([row["best_trial"] for row in rows], index=out.index, dtype=object)
    out.attrs["reference"] = dict(reference) if isinstance(reference, Mapping) else reference
    return out


__all__ = ["DEFAULT_OBJECTIVES", "MAXIMIZE", "METRICS", "Budgets", "best", "budget", "compare", "default_storage",
           "dominating", "front", "hypervolume", "hypervolume_history", "load", "load_study", "losses", "non_dominated",
           "open_storage", "plan_label", "preset_names", "preset_rows", "presets_dominated", "reference_point",
           "study_names", "trials_frame", "uncompressed_rows"]
