"""The study read back as a table: :func:`trials_frame` gives one row per trial of an Optuna study,
every attribute of the study record (:mod:`paretoken.search.record`) in a column, with each plan in
a compact readable form (:func:`plan_label`). ``paretoken.results`` and the search's report read it.

Columns:
  number, state           Optuna trial number and state name (COMPLETE, FAIL, ...)
  preset                  published schedule the trial ran (user attr ``preset``,
                          else the preset whose plan equals the trial's), or None
  plan                    the plan in dict form (user attr ``plan``)
  plan_str                a compact readable form, e.g. ``prune_fuse(keep=0.7)@3,6,9``
  top1 ... padding_pct    every metric of :data:`METRICS` (NaN where not measured)
  constraint:<name>       each Optuna constraint value (feasible when <= 0)
  feasible                all constraints <= 0 (True when the study has none)
  error                   a FAIL trial's error; an interrupted one's ``setup_error`` where its worker could not set up
  interrupted             FAIL without an error of its own: the search runs its plan again
  images                  the images its metrics are measured on (user attr ``images``; the study's where absent)
  full_fidelity           measured on all the study's images: not stopped by successive halving below them
  device, duration_s, worker_pid, retry_of, same_plan_as, space, versions, datetime_start,
  datetime_complete, values
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from paretoken.errors import ParetokenError
from paretoken.evaluators.metrics import METRICS
from paretoken.search import record


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


def preset_of(plan: Mapping[str, Any] | None) -> str | None:
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
        return record.UNCOMPRESSED
    for name, p in PRESETS.items():
        if p.plan == parsed:
            return name
    return None


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def trials_frame(study) -> pd.DataFrame:
    """One row per trial of an open ``optuna.Study`` (columns: this module's docstring), by trial number.

    Presets: the trials' ``preset`` user attr (the search sets it on every trial it enqueued,
    ``uncompressed`` for the baseline); in a study where no trial has one, the preset whose plan
    equals the trial's.
    """
    names = list(getattr(study, "metric_names", None) or study.user_attrs.get(record.OBJECTIVES) or [])
    trials = study.get_trials(deepcopy=False)
    full = record.full_images(record.settings_of(study.user_attrs))
    explicit = any(t.user_attrs.get(record.PRESET) for t in trials)
    rows = []
    constraint_keys: list[str] = []
    for trial in trials:
        attrs = trial.user_attrs
        plan = record.plan_of(attrs)
        row: dict[str, Any] = {
            "number": trial.number,
            "state": trial.state.name,
            "preset": attrs.get(record.PRESET) if explicit else preset_of(plan),
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
        duration = attrs.get(record.DURATION_S)
        if duration is None and trial.duration is not None:
            duration = trial.duration.total_seconds()
        row.update({
            "device": attrs.get(record.DEVICE),
            "duration_s": _float(duration),
            "worker_pid": attrs.get(record.WORKER_PID),
            "error": record.error_of(attrs),
            "interrupted": record.is_interrupted(trial.state.name, attrs),
            "images": _float(attrs.get(record.IMAGES, full)),
            "full_fidelity": record.is_full_fidelity(attrs, full),
            "retry_of": attrs.get(record.RETRY_OF),
            "same_plan_as": attrs.get(record.SAME_PLAN_AS),
            "space": attrs.get(record.SPACE),
            "versions": attrs.get(record.VERSIONS),
            "datetime_start": trial.datetime_start,
            "datetime_complete": trial.datetime_complete,
            "values": tuple(values) if values else None,
        })
        rows.append(row)
    columns = (["number", "state", "preset", "plan", "plan_str", *METRICS]
               + [f"constraint:{k}" for k in constraint_keys]
               + ["feasible", "device", "duration_s", "worker_pid", "error", "interrupted", "images", "full_fidelity",
                  "retry_of",
                  "same_plan_as", "space", "versions", "datetime_start", "datetime_complete", "values"])
    df = pd.DataFrame(rows, columns=columns)
    for text in ("preset", "plan_str", "device", "error", "worker_pid", "retry_of", "same_plan_as", "space"):
        df[text] = pd.Series([row.get(text) for row in rows], dtype=object, index=df.index)  # None, not NaN
    for metric in METRICS:
        df[metric] = df[metric].astype(float)
    df["feasible"] = df["feasible"].astype(bool)
    df["interrupted"] = df["interrupted"].astype(bool)
    df["full_fidelity"] = df["full_fidelity"].astype(bool)
    df.attrs["study"] = study.study_name
    df.attrs["user_attrs"] = dict(study.user_attrs)
    df.attrs["objectives"] = names
    return df.sort_values("number", ignore_index=True)
