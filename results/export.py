"""Export a trial's plan with what a training run needs to rebuild and check it.

The file is a plan (``paretoken.load_plan`` reads it) whose ``meta`` says::

    meta:
      model: default                       # timm name or 'default'
      checkpoint: null                     # the weights file the trial ran with (null: packaged / timm)
      pretrained: false                    # weights from the local Hugging Face cache
      weights: {file: .../default_fmnist.safetensors, sha256: ...}
      input_size: [1, 28, 28]
      data: fashion-mnist                  # what the metrics were measured on
      eval: {images: 1000, seed: 0, batch_size: 100}
      metrics: {top1: ..., gflops: ..., ...}
      plan_str: prune_fuse(keep=0.7)@3,6,9
      search: {space: mixed, objectives: [top1, gflops], max_gflops: null, min_top1: null}
      preset: evit-0.7                     # when the plan is a published schedule
      provenance: {study, trial, storage, device, duration_s, versions, exported_at, exported_with}

so ``create_model(meta.model, meta.checkpoint)`` + ``paretoken.apply(model, load_plan(path))``
rebuilds the measured model, and re-evaluating ``meta.eval`` on ``meta.data`` gives ``meta.metrics``.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from paretoken.errors import ParetokenError
from paretoken.evaluators.metrics import BOUNDS, Budgets
from paretoken.results import query
from paretoken.search import record
from paretoken.search.storage import redact, study_storage

#: The measurement settings (:data:`~paretoken.search.record.MEASUREMENT_KEYS`) are looked up, in this
#: order, in the trial's user attrs, the search's study record (``study.user_attrs["paretoken"]["measurement"]``,
#: then ``["paretoken"]``), then the study's user attrs; in each, also inside a config dict (these keys).
_CONFIG_KEYS = ("eval", "eval_config", "config")
_VERSION_PACKAGES = ("paretoken", "torch", "timm", "optuna", "ray", "fvcore", "python")


def _lookup(sources: list[Mapping[str, Any]], key: str) -> Any:
    for source in sources:
        if key in source and source[key] is not None:
            return source[key]
        for name in _CONFIG_KEYS:
            nested = source.get(name)
            if isinstance(nested, Mapping) and nested.get(key) is not None:
                return nested[key]
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights(model: str, checkpoint: str | None, pretrained: bool) -> dict[str, Any]:
    """Which weights the trial ran with: the file and its sha256 where there is one."""
    if checkpoint:
        path = Path(checkpoint)
        return {"file": str(path), "sha256": _sha256(path) if path.is_file() else None}
    if model == "default":
        from paretoken.evaluators.models import DEFAULT_WEIGHTS

        return {"file": str(DEFAULT_WEIGHTS), "packaged": "paretoken.evaluators/weights/" + DEFAULT_WEIGHTS.name,
                "sha256": _sha256(DEFAULT_WEIGHTS) if DEFAULT_WEIGHTS.is_file() else None}
    return {"timm": model, "source": "local Hugging Face cache" if pretrained else "random init (no weights)"}


def _input_size(model: str) -> list[int] | None:
    if model == "default":
        from paretoken.evaluators.models import build_default_architecture

        return list(build_default_architecture().pretrained_cfg["input_size"])
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(model)
    except Exception:  # an unknown name: leave it out rather than fail the export
        return None
    return list(cfg.input_size) if cfg is not None and cfg.input_size else None


def _versions() -> dict[str, str]:
    """Package versions of this process (the evaluators' environment() without importing fvcore)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in _VERSION_PACKAGES:
        if package == "python":
            out[package] = platform.python_version()
            continue
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "absent"
    return out


def _plain(value: Any) -> Any:
    """YAML-safe plain data (tuples to lists, numpy scalars to Python)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def choose_trial(df, trial: int | None = None, best: bool = False, budgets: Budgets | None = None, *,
                 cheapest: bool = False):
    """The row of ``df`` to export: trial number ``trial``; with ``best``, the best top1 within
    ``budgets``; with ``cheapest``, the fewest GFLOPs within them (ties: the better top1)."""
    if (trial is not None) + best + cheapest != 1:
        raise ParetokenError("export: give exactly one of --trial N, --best or --cheapest")
    limits = str(budgets or "")
    if best or cheapest:
        row = query.best(df, "top1" if best else "gflops", budgets)
        if row is None:
            within = f" within {limits}" if limits else ""
            low = df.loc[df["state"] == "COMPLETE", "gflops"].min() if len(df) else math.nan
            hint = f"; the fewest GFLOPs of a COMPLETE trial is {low:.4g}" if not math.isnan(low) else ""
            raise ParetokenError(f"export: no COMPLETE trial{within}{hint}")
        return row
    if limits:
        raise ParetokenError("export: --max-gflops/--min-top1/--max-top1-drop go with --best or --cheapest, "
                             "not with --trial")
    rows = df[df["number"] == trial]
    if rows.empty:
        valid = f"0..{int(df['number'].max())}" if len(df) else "(the study has no trials)"
        raise ParetokenError(f"export: trial {trial} is not in the study; valid: {valid}")
    row = rows.iloc[0]
    if row["state"] != "COMPLETE":
        why = f" ({row['error']})" if isinstance(row.get("error"), str) else ""
        raise ParetokenError(f"export: trial {trial} is {row['state']}{why}; export a COMPLETE trial")
    if not row.get("full_fidelity", True):
        raise ParetokenError(f"export: trial {trial} was measured on {row['images']:.0f} images only (successive "
                             "halving stopped it below the full rung); valid: a full-fidelity trial, as "
                             "`paretoken front` lists them")
    return row


def export_meta(study, row, storage: str) -> dict[str, Any]:
    """The ``meta`` of an exported plan for ``row`` (a :func:`query.load` row) of ``study``."""
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == int(row["number"]))
    settings = record.settings_of(study.user_attrs)  # space, objectives, budgets, measurement
    measurement = record.measurement_of(settings)
    sources = [trial.user_attrs, measurement, settings, study.user_attrs]
    model = _lookup(sources, "model") or "default"
    checkpoint = _lookup(sources, "checkpoint")
    pretrained = bool(_lookup(sources, "pretrained") or False)
    data = _lookup(sources, "data") or "fashion-mnist"
    evaluation = {k: _lookup(sources, k) for k in record.EVALUATION_KEYS}
    versions = record.versions_of(trial.user_attrs, _VERSION_PACKAGES)
    now = _versions()
    return _plain({
        "model": model,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "pretrained": pretrained,
        "weights": _weights(model, checkpoint, pretrained),
        "input_size": _input_size(model),
        "data": str(data),
        "eval": {k: v for k, v in evaluation.items() if v is not None},
        "metrics": {m: float(row[m]) for m in query.METRICS if m in row and math.isfinite(float(row[m]))},
        "plan_str": row.get("plan_str"),
        "preset": row.get("preset") if isinstance(row.get("preset"), str) else None,
        "search": {k: settings[k] for k in ("space", "objectives", *BOUNDS)
                   if k in settings}
        or None,
        "provenance": {
            "study": study.study_name,
            "trial": int(row["number"]),
            "storage": redact(storage),
            "device": row.get("device"),
            "duration_s": None if math.isnan(float(row.get("duration_s", math.nan))) else float(row["duration_s"]),
            "versions": versions,
            "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "exported_with": {k: now[k] for k in _VERSION_PACKAGES if k in now},
        },
    })


def export(study: str, storage: str | None = None, trial: int | None = None, best: bool = False,
           budgets: Budgets | None = None, out: str | Path = "plan.yaml", *, cheapest: bool = False) -> Path:
    """Write trial ``trial`` of ``study`` (or, with ``best``, the best top1 within ``budgets``; with
    ``cheapest``, the fewest GFLOPs within them) as a plan file with ``meta`` (model, weights, input
    size, metrics, provenance); returns its path.

    YAML for ``.yaml``/``.yml``, JSON otherwise. ``paretoken.load_plan(out)`` reads it back.
    """
    from paretoken.compress.plan import Plan

    storage = study_storage(study, storage)
    opened = query.load_study(study, storage)
    df = query.trials_frame(opened)
    row = choose_trial(df, trial, best, budgets, cheapest=cheapest)
    if not isinstance(row["plan"], Mapping):
        raise ParetokenError(f"export: trial {int(row['number'])} stores no plan (user attr 'plan')")
    plan = Plan.from_dict({k: v for k, v in row["plan"].items() if k != "meta"})
    exported = dataclasses.replace(plan, meta=export_meta(opened, row, storage))
    return exported.save(out)


__all__ = ["choose_trial", "export", "export_meta"]
