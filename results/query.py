"""Read an Optuna study into a table and answer Pareto questions about it.

``load(study, storage)`` gives one row per trial (columns below); ``front``,
``hypervolume`` and ``compare`` are pure pandas/numpy on that table, so they
work on any DataFrame with the metric columns.

Columns of :func:`load`:
  number, state           Optuna trial number and state name (COMPLETE, FAIL, ...)
  preset                  published schedule the trial ran (user attr ``preset``,
                          else the preset whose plan equals the trial's), or None
  plan                    the plan in dict form (user attr ``plan``)
  plan_str                a compact readable form, e.g. ``prune_fuse(keep=0.7)@3,6,9``
  top1 ... padding_pct    every metric of :data:`METRICS` (NaN where not measured)
  constraint:<name>       each Optuna constraint value (feasible when <= 0)
  feasible                all constraints <= 0 (True when the study has none)
  error                   a FAIL trial's error; an interrupted one's ``setup_error`` where its worker could not set up
  device, duration_s, worker_pid, datetime_start, datetime_complete, values
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from paretoken.errors import ParetokenError
from paretoken.evaluators.metrics import METRICS, Budgets
from paretoken.search import storage as search_storage
from paretoken.search.storage import default_storage, study_storage
from paretoken.search.study import DEFAULT_OBJECTIVES, DIRECTIONS, UNCOMPRESSED, check_objectives, reference_value

#: Whether each objective is maximised (True) or minimised (False).
MAXIMIZE: dict[str, bool] = {name: way == "maximize" for name, way in DIRECTIONS.items()} | {"duration_s": False}


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


# --------------------------------------------------------------------------- plans
def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _layers(layers: Sequence[int]) -> str:
    """[1,2,3,5] -> '1-3,5'."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}" if layer > start + 1
                         else f"{start},{layer}")
            start = None
    return ",".join(parts)


def plan_label(plan: Mapping[str, Any] | Any) -> str:
    """Compact readable form of a plan (dict or Plan): identical stages grouped by layers.

    ``merge(r=8)@0-11``, ``prune_fuse(keep=0.7)@3,6,9 + prefix-only last``, ``none`` for the uncompressed plan.
    The score is shown only where it is not the op's default.
    """
    from paretoken.compress.ops import get_op
    from paretoken.compress.plan import Plan

    if plan is None:
        return ""
    try:
        plan = plan if isinstance(plan, Plan) else Plan.from_dict(plan)
    except ParetokenError as err:
        return f"invalid plan ({err})"
    tail = ["prefix-only last"] if plan.prefix_only_last else []
    if not plan.stages:
        return " + ".join(tail) or "none"
    groups: dict[tuple, list[int]] = {}
    for stage in plan.stages:
        fields = {k: v for k, v in stage.to_dict().items() if k not in ("layer", "op")}
        if fields.get("score") == get_op(stage.op).scores[0]:
            del fields["score"]
        groups.setdefault((stage.op, tuple(fields.items())), []).append(stage.layer)
    return " + ".join([f"{op}({', '.join(f'{k}={_fmt(v)}' for k, v in fields)})@{_layers(layers)}"
                       for (op, fields), layers in sorted(groups.items(), key=lambda g: g[1][0])] + tail)


def _preset_of(plan: Mapping[str, Any] | None) -> str | None:
    """The preset whose plan equals ``plan`` (``uncompressed`` for a plan that changes nothing), or None."""
    from paretoken.compress.plan import Plan
    from paretoken.compress.presets import PRESETS

    if not plan:
        return None
    try:
        parsed = Plan.from_dict(plan)
    except ParetokenError:
        return None
    if parsed == Plan():
        return UNCOMPRESSED
    for name, p in PRESETS.items():
        if p.plan == parsed:
            return name
    return None


# --------------------------------------------------------------------------- load
def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def trials_frame(study) -> pd.DataFrame:
    """The table of :func:`load` for an already-open ``optuna.Study``.

    Presets: the trials' ``preset`` user attr (the search sets it on every trial it enqueued,
    ``uncompressed`` for the baseline); in a study where no trial has one, the preset whose plan
    equals the trial's.
    """
    names = list(getattr(study, "metric_names", None) or study.user_attrs.get("objectives") or [])
    trials = study.get_trials(deepcopy=False)
    explicit = any(t.user_attrs.get("preset") for t in trials)
    rows = []
    constraint_keys: list[str] = []
    for trial in trials:
        attrs = trial.user_attrs
        plan = attrs.get("plan")
        if plan is None and isinstance(attrs.get("enqueued_plan"), Mapping):
            plan = attrs["enqueued_plan"]
        row: dict[str, Any] = {
            "number": trial.number,
            "state": trial.state.name,
            "preset": attrs.get("preset") if explicit else _preset_of(plan),
            "plan": plan,
            "plan_str": plan_label(plan),
        }
        values = list(trial.values) if trial.values is not None else []
        for metric in METRICS:
            row[metric] = _float(attrs.get(metric))
        for name, value in zip(names, values):  # objectives the trial reported but did not store by name
            if name in METRICS and math.isnan(row[name]):
                row[name] = _float(value)
        constraints = trial.constraints
        for key, value in constraints.items():
            if key not in constraint_keys:
                constraint_keys.append(key)
            row[f"constraint:{key}"] = float(value)
        row["feasible"] = all(v <= 0.0 for v in constraints.values())
        duration = attrs.get("duration_s")
        if duration is None and trial.duration is not None:
            duration = trial.duration.total_seconds()
        row.update({
            "device": attrs.get("device"),
            "duration_s": _float(duration),
            "worker_pid": attrs.get("worker_pid"),
            "error": attrs.get("error", attrs.get("setup_error")),
            # FAIL without an error of its own (its process died, or its worker could not set up):
            # the search runs the plan again
            "interrupted": trial.state.name == "FAIL" and "error" not in attrs,
            "retry_of": attrs.get("retry_of"),
            "same_plan_as": attrs.get("same_plan_as"),
            "space": attrs.get("space"),
            "versions": attrs.get("versions"),
            "datetime_start": trial.datetime_start,
            "datetime_complete": trial.datetime_complete,
            "values": tuple(values) if values else None,
        })
        rows.append(row)
    columns = (["number", "state", "preset", "plan", "plan_str", *METRICS]
               + [f"constraint:{k}" for k in constraint_keys]
               + ["feasible", "device", "duration_s", "worker_pid", "error", "interrupted", "retry_of",
                  "same_plan_as", "space", "versions", "datetime_start", "datetime_complete", "values"])
    df = pd.DataFrame(rows, columns=columns)
    for text in ("preset", "plan_str", "device", "error", "worker_pid", "retry_of", "same_plan_as", "space"):
        df[text] = pd.Series([row.get(text) for row in rows], dtype=object, index=df.index)  # None, not NaN
    for metric in METRICS:
        df[metric] = df[metric].astype(float)
    df["feasible"] = df["feasible"].astype(bool)
    df["interrupted"] = df["interrupted"].astype(bool)
    df.attrs["study"] = study.study_name
    df.attrs["user_attrs"] = dict(study.user_attrs)
    df.attrs["objectives"] = names
    return df.sort_values("number", ignore_index=True)


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
def _check_objectives(objectives: Iterable[str] | str, df: pd.DataFrame | None = None) -> tuple[str, ...]:
    objectives = check_objectives(objectives, valid=MAXIMIZE)
    for name in objectives:
        if df is not None and name not in df.columns:
            raise ParetokenError(f"objectives: {name!r} is not a column of this table")
    return objectives


def losses(df: pd.DataFrame, objectives: Sequence[str]) -> np.ndarray:
    """(n, k) array of the objectives turned into minimisation (maximised ones negated)."""
    objectives = _check_objectives(objectives, df)
    return np.column_stack([-df[o].to_numpy(float) if MAXIMIZE[o] else df[o].to_numpy(float)
                            for o in objectives]) if len(df) else np.empty((0, len(objectives)))


def budget(df: pd.DataFrame, budgets: Budgets | None = None, feasible_only: bool = True) -> pd.DataFrame:
    """The COMPLETE rows within ``budgets`` and, with ``feasible_only``, within the study's own
    constraints (column ``feasible``), as the search's front is. A study from before a budget's
    metric (no such column) has no row within that budget."""
    keep = df["state"] == "COMPLETE" if "state" in df.columns else pd.Series(True, index=df.index)
    if feasible_only and "feasible" in df.columns:
        keep &= df["feasible"].astype(bool)
    budgets = budgets or Budgets()
    if any(metric not in df.columns for _, metric, _, _ in budgets.bounds()):
        return df[keep & False]
    for excess in budgets.constraints(df).values():
        keep &= excess <= 0
    return df[keep]


def dominating(points: np.ndarray, target: np.ndarray, slack: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the rows of ``points`` (n, k), minimisation, that dominate ``target`` (k,):
    no worse in every column and better in one.

    With ``slack`` (k,), a row only has to come within ``slack`` of ``target`` in every column and
    need not be better in any: a match within the measurement's resolution (e.g. one evaluation image
    of top-1).
    """
    if slack is not None:
        return np.all(points - slack <= target, axis=1)
    return np.all(points <= target, axis=1) & np.any(points < target, axis=1)


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of ``points`` (minimisation) that no other row dominates.

    A row dominates another when it is no worse in every column and better in one; equal rows do
    not dominate each other (both stay). Lexicographic sweep: a point can only be dominated by one
    that sorts before it, and then by one already on the front, so each point is checked against
    the front found so far.
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


def preset_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The COMPLETE rows of presets, feasible or not (the uncompressed model is not one)."""
    done = budget(df, feasible_only=False)
    return done[done["preset"].notna() & (done["preset"] != UNCOMPRESSED)]


def uncompressed_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``df`` whose plan changes nothing (the uncompressed model), in ``df``'s order."""
    from paretoken.compress.plan import is_uncompressed

    return df[df["plan"].map(is_uncompressed)] if "plan" in df.columns else df.iloc[:0]


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
    objectives = _check_objectives(objectives, df)
    presets = preset_rows(df)
    found = losses(budget(df[df["preset"].isna()]), objectives)
    margin = None if slack is None else np.array([float(slack.get(o, 0.0)) for o in objectives])
    return list(dict.fromkeys(name for name, point in zip(presets["preset"], losses(presets, objectives))
                              if dominating(found, point, margin).any()))


def reference_point(df: pd.DataFrame, objectives: Sequence[str] | str = DEFAULT_OBJECTIVES,
                    top1_margin: float = 10.0) -> dict[str, float]:
    """A fixed reference point for hypervolume, the search's convention.

    From the first COMPLETE trial of the uncompressed model (a plan that changes nothing), as the search
    does (:func:`paretoken.search.study.reference_value`). Without that trial, or where it lacks an
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


def _reference_losses(reference: Mapping[str, float] | Sequence[float], objectives: Sequence[str]) -> np.ndarray:
    if isinstance(reference, Mapping):
        missing = [o for o in objectives if o not in reference]
        if missing:
            raise ParetokenError(f"reference: no value for objective {missing[0]!r}")
        values = [float(reference[o]) for o in objectives]
    else:
        values = [float(v) for v in reference]
        if len(values) != len(objectives):
            raise ParetokenError(f"reference: {len(values)} values for {len(objectives)} objectives")
    return np.array([-v if MAXIMIZE[o] else v for o, v in zip(objectives, values)])


def _hv(points: np.ndarray, ref: np.ndarray) -> float:
    points = points[np.all(np.isfinite(points), axis=1) & np.all(points <= ref, axis=1)]
    if len(points) == 0:
        return 0.0
    try:
        from optuna._hypervolume import compute_hypervolume
    except ImportError:  # pragma: no cover - exact 2-D sweep for Optuna versions without it
        if points.shape[1] != 2:
            raise
        pts = points[non_dominated(points)]
        pts = pts[np.argsort(pts[:, 0])]
        area, prev_y = 0.0, ref[1]
        for x, y in pts:
            area += (ref[0] - x) * (prev_y - y)
            prev_y = y
        return float(area)
    return float(compute_hypervolume(points, ref))


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
    return _hv(losses(budget(df), objectives), _reference_losses(reference, objectives))


def hypervolume_history(df: pd.DataFrame, objectives: Sequence[str] | str = DEFAULT_OBJECTIVES,
                        reference: Mapping[str, float] | Sequence[float] | None = None) -> pd.DataFrame:
    """Hypervolume after each trial (COMPLETE and feasible ones count), in trial-number order:
    columns number, state, hypervolume."""
    objectives = _check_objectives(objectives, df)
    if reference is None:
        reference = reference_point(df, objectives)
    ref = _reference_losses(reference, objectives)
    ordered = df.sort_values("number")
    points = losses(ordered, objectives)
    complete = (ordered["state"] == "COMPLETE").to_numpy()
    if "feasible" in ordered.columns:
        complete = complete & ordered["feasible"].astype(bool).to_numpy()
    values, current, seen = [], 0.0, []
    for point, ok in zip(points, complete):
        if ok and np.all(np.isfinite(point)) and np.all(point <= ref):
            seen.append(point)
            current = _hv(np.asarray(seen), ref)
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
           "open_storage", "plan_label", "reference_point", "study_names", "trials_frame"]
