"""Pareto maths, one definition for the search's progress lines and for ``paretoken front``/``compare``.

Every objective is turned into a loss (maximised ones negated, :data:`MAXIMIZE`), so that:

* a point *dominates* another when it is no worse in every objective and better in one
  (``<=`` everywhere and ``<`` somewhere): :func:`dominating`, :func:`non_dominated`;
* the *hypervolume* is the volume dominated by the points and bounded by a reference point, the
  worst case per objective (:func:`reference_value`, from the uncompressed model's metrics); a point
  counts when it is no worse than the reference in every objective (``<=``: one on the reference's
  boundary adds nothing, as Optuna's ``compute_hypervolume`` requires); it is computed exactly by
  Optuna (:func:`loss_hypervolume`).

Arrays: ``points`` (n, k) losses, one row per trial and one column per objective. Trials: Optuna
``FrozenTrial``. Tables: :func:`paretoken.search.table.trials_frame`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from paretoken.errors import ParetokenError
from paretoken.evaluators.metrics import DIRECTIONS, Budgets
from paretoken.search import record
from paretoken.search.study import DEFAULT_OBJECTIVES
from paretoken.search.study import check_objectives as _check_names

#: Whether each objective is maximised (True) or minimised (False); a table's ``duration_s`` (s) too.
MAXIMIZE: dict[str, bool] = {name: way == "maximize" for name, way in DIRECTIONS.items()} | {"duration_s": False}


def check_objectives(objectives: Iterable[str] | str, df: pd.DataFrame | None = None) -> tuple[str, ...]:
    """Objective names of :data:`MAXIMIZE` ("a,b" or a sequence), each a column of ``df`` when given;
    one-line error otherwise."""
    objectives = _check_names(objectives, valid=MAXIMIZE)
    for name in objectives:
        if df is not None and name not in df.columns:
            raise ParetokenError(f"objectives: {name!r} is not a column of this table")
    return objectives


# --------------------------------------------------------------------------- arrays
def as_losses(values: np.ndarray, objectives: Sequence[str]) -> np.ndarray:
    """``values`` (n, k) in the objectives' units as losses (maximised columns negated)."""
    values = np.asarray(values, dtype=float).reshape(-1, len(objectives))
    return values * np.array([-1.0 if MAXIMIZE[o] else 1.0 for o in objectives])


def reference_losses(reference: Mapping[str, float] | Sequence[float], objectives: Sequence[str]) -> np.ndarray:
    """A reference point (by objective name, or a sequence in ``objectives`` order) as losses (k,)."""
    if isinstance(reference, Mapping):
        missing = [o for o in objectives if o not in reference]
        if missing:
            raise ParetokenError(f"reference: no value for objective {missing[0]!r}")
        values = [float(reference[o]) for o in objectives]
    else:
        values = [float(v) for v in reference]
        if len(values) != len(objectives):
            raise ParetokenError(f"reference: {len(values)} values for {len(objectives)} objectives")
    return as_losses(np.array([values]), objectives)[0]


def dominating(points: np.ndarray, target: np.ndarray, slack: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the rows of ``points`` (n, k) that dominate ``target`` (k,): no worse in every
    column and better in one.

    With ``slack`` (k,), a row only has to come within ``slack`` of ``target`` in every column and
    need not be better in any: a match within the measurement's resolution (e.g. one evaluation image
    of top-1).
    """
    if slack is not None:
        return np.all(points - slack <= target, axis=1)
    return np.all(points <= target, axis=1) & np.any(points < target, axis=1)


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of ``points`` that no other row dominates (:func:`dominating`).

    Equal rows do not dominate each other (both stay). Lexicographic sweep: a point can only be
    dominated by one that sorts before it, and then by one already on the front, so each point is
    checked against the front found so far.
    """
    n = len(points)
    mask = np.zeros(n, dtype=bool)
    if n == 0:
        return mask
    order = np.lexsort(points.T[::-1])
    front: list[np.ndarray] = []
    for i in order:
        p = points[i]
        if front and dominating(np.asarray(front), p).any():
            continue
        front.append(p)
        mask[i] = True
    return mask


def loss_hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
    """Exact hypervolume of ``points`` (n, k) against ``ref`` (k,), both losses; rows that are not
    finite or worse than ``ref`` in some column add nothing. Units: product of the objectives'."""
    points = np.asarray(points, dtype=float).reshape(-1, len(ref))
    points = points[np.all(np.isfinite(points), axis=1) & np.all(points <= ref, axis=1)]
    if len(points) == 0:
        return 0.0
    from optuna._hypervolume import compute_hypervolume

    return float(compute_hypervolume(points, ref))


# --------------------------------------------------------------------------- reference point
def reference_value(objective: str, base_value: float, top1_margin: float = 10.0) -> float:
    """The hypervolume reference's coordinate for ``objective``, given the uncompressed model's value
    (NaN when unknown): top1/agreement minus ``top1_margin`` points, top1_drop ``top1_margin`` points,
    kl 1 nat, padding 100 %, speedup 1 (the uncompressed model's by definition; its measured value is
    noise around it), gflops/latency/memory/throughput as they are."""
    if objective == "speedup":
        return 1.0
    if objective == "top1_drop":
        return top1_margin
    if objective == "kl":
        return 1.0
    if objective == "padding_pct":
        return 100.0
    return base_value - top1_margin if objective in ("top1", "agreement") else base_value


def reference_point(base: Mapping[str, float] | None, objectives: Sequence[str],
                    top1_margin: float = 10.0) -> dict[str, float] | None:
    """The worst case per objective (:func:`reference_value`) from the uncompressed model's metrics
    ``base`` (:func:`baseline`); None without them or where one is missing."""
    if base is None:
        return None
    ref = {}
    for o in objectives:
        value = reference_value(o, base.get(o, math.nan), top1_margin)
        if not math.isfinite(value):
            return None
        ref[o] = float(value)
    return ref


def baseline(study) -> dict[str, float] | None:
    """Metrics of the first full-fidelity COMPLETE trial of the uncompressed model (a plan that changes
    nothing)."""
    from paretoken.compress.plan import is_uncompressed

    for t in full_fidelity_trials(study):
        if is_uncompressed(t.user_attrs.get(record.PLAN)):
            return {k: v for k, v in t.user_attrs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return None


# --------------------------------------------------------------------------- trials
def feasible(trial) -> bool:
    """All of the trial's Optuna constraints are <= 0 (True without constraints)."""
    return all(v <= 0.0 for v in trial.constraints.values())


def full_fidelity_trials(study) -> list:
    """The COMPLETE trials of ``study`` measured on all its images (:func:`record.is_full_fidelity`:
    every trial but those successive halving stopped below the full rung), in trial order."""
    from optuna.trial import TrialState

    full = record.full_images(record.settings_of(study.user_attrs))
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if record.is_full_fidelity(t.user_attrs, full)]


def front_trials(study) -> list:
    """The non-dominated feasible full-fidelity COMPLETE trials of ``study`` (:func:`full_fidelity_trials`),
    in trial order, less those that took the values of another one on it (``same_plan_as``: the same plan,
    not measured again)."""
    from optuna.study import StudyDirection

    done = [t for t in full_fidelity_trials(study) if feasible(t)]
    signs = np.array([-1.0 if d == StudyDirection.MAXIMIZE else 1.0 for d in study.directions])
    points = np.asarray([t.values for t in done], dtype=float).reshape(-1, len(signs)) * signs
    best = [t for t, keep in zip(done, non_dominated(points)) if keep]
    numbers = {t.number for t in best}
    return [t for t in best if t.user_attrs.get(record.SAME_PLAN_AS) not in numbers]


def hypervolume(trials, objectives: Sequence[str], reference: Mapping[str, float] | None) -> float:
    """Exact hypervolume of the feasible COMPLETE ``trials`` against ``reference`` (objective units);
    NaN without a reference."""
    if reference is None:
        return math.nan
    values = [t.values for t in trials if t.values is not None and feasible(t)]
    return loss_hypervolume(as_losses(values, objectives), reference_losses(reference, objectives))


# --------------------------------------------------------------------------- tables
def losses(df: pd.DataFrame, objectives: Sequence[str]) -> np.ndarray:
    """(n, k) array of the table's objective columns as losses."""
    objectives = check_objectives(objectives, df)
    return as_losses(df[list(objectives)].to_numpy(float), objectives)


def budget(df: pd.DataFrame, budgets: Budgets | None = None, feasible_only: bool = True) -> pd.DataFrame:
    """The COMPLETE full-fidelity rows (column ``full_fidelity``: not stopped by successive halving below
    the full rung) within ``budgets`` and, with ``feasible_only``, within the study's own constraints
    (column ``feasible``), as the search's front is. A study from before a budget's metric (no such
    column) has no row within that budget."""
    keep = df["state"] == "COMPLETE" if "state" in df.columns else pd.Series(True, index=df.index)
    if "full_fidelity" in df.columns:
        keep &= df["full_fidelity"].astype(bool)
    if feasible_only and "feasible" in df.columns:
        keep &= df["feasible"].astype(bool)
    budgets = budgets or Budgets()
    if any(metric not in df.columns for _, metric, _, _ in budgets.bounds()):
        return df[keep & False]
    for excess in budgets.constraints(df).values():
        keep &= excess <= 0
    return df[keep]


def preset_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The COMPLETE rows of presets, feasible or not (the uncompressed model is not one)."""
    done = budget(df, feasible_only=False)
    return done[done["preset"].notna() & (done["preset"] != record.UNCOMPRESSED)]


def preset_names(df: pd.DataFrame) -> list[str]:
    """Names of the presets with a COMPLETE row (the uncompressed model is not one), each once, in order."""
    return list(dict.fromkeys(preset_rows(df)["preset"]))


def presets_dominated(df: pd.DataFrame, objectives: Sequence[str] | str = DEFAULT_OBJECTIVES,
                      slack: Mapping[str, float] | None = None) -> list[str]:
    """Names of the presets (COMPLETE rows whose ``preset`` is not the uncompressed model) that a
    searched row dominates on ``objectives``, each once, in the table's order. Searched rows are
    those with no preset that are COMPLETE and feasible, as on the search's front.

    ``slack`` ({objective: amount}, in the objective's units): a searched row need only come within
    that amount of the preset in each objective (:func:`dominating`), e.g. one evaluation image of top-1.
    """
    objectives = check_objectives(objectives, df)
    presets = preset_rows(df)
    found = losses(budget(df[df["preset"].isna()]), objectives)
    margin = None if slack is None else np.array([float(slack.get(o, 0.0)) for o in objectives])
    return list(dict.fromkeys(name for name, point in zip(presets["preset"], losses(presets, objectives))
                              if dominating(found, point, margin).any()))
