"""The trial function both backends run: one plan evaluated, never raising.

:func:`run_trial` is what a worker does with a plan: it calls the evaluator and
returns plain data (metrics, device, versions, duration, pid, or the error as
one line: the plan's, or that of the set-up every trial shares). The driver writes
that into the Optuna study; the worker never touches the storage, so the study has
a single writer per trial.
"""
from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import asdict, fields
from typing import Any

_ENV: dict[str, dict[str, str]] = {}


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (ParetokenError keeps just its message)."""
    from paretoken.errors import ParetokenError

    text = " ".join(str(exc).split())[:500]
    if isinstance(exc, ParetokenError):
        return text or "ParetokenError"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def config_to_dict(config) -> dict[str, Any]:
    return asdict(config)


def config_from_dict(data: dict[str, Any]):
    from paretoken.evaluators.evaluate import EvalConfig

    known = {f.name for f in fields(EvalConfig)}
    return EvalConfig(**{k: v for k, v in data.items() if k in known})


def _environment(device: str) -> dict[str, str]:
    if device not in _ENV:
        from paretoken.evaluators.evaluate import environment

        _ENV[device] = environment(device)
    return _ENV[device]


def run_trial(plan: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Evaluate ``plan`` (dict form) under ``config`` (EvalConfig as a dict).

    Returns ``{"metrics": {...}}``, ``{"error": "..."}`` or ``{"setup_error": "..."}`` plus ``device``,
    ``threads``, ``versions``, ``hostname``, ``worker_pid``, ``duration_s`` and, on the CPU, ``host_memory``. An exception of the plan's
    evaluation (a bad plan, out of memory, non-finite logits) becomes ``error``: the search records the
    trial FAIL and goes on. One raised while preparing what every trial shares (model, images, the
    uncompressed forward; :func:`~paretoken.evaluators.evaluate.prepare`) becomes ``setup_error``: the
    search stops, as every trial would fail the same way.
    """
    start = time.perf_counter()
    out: dict[str, Any] = {"worker_pid": os.getpid(), "hostname": socket.gethostname()}
    device = str(config.get("device", "cpu"))
    failure = "setup_error"
    try:
        from paretoken.compress.plan import Plan
        from paretoken.evaluators.evaluate import evaluate, prepare

        cfg = config_from_dict(config)
        prepare(cfg)
        failure = "error"
        metrics = evaluate(Plan.from_dict(plan), cfg)
        out["metrics"] = {k: float(v) for k, v in metrics.items()}
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the trial
        out[failure] = one_line(exc)
        if "out of memory" in str(exc).lower():
            _release_cuda()
    try:
        env = dict(_environment(device))
    except Exception as exc:  # noqa: BLE001 - environment is informative only
        env = {"device": device, "error": one_line(exc)}
    out["device"] = env.pop("device", device)
    out["threads"] = env.pop("threads", "")
    out["versions"] = env
    if out["device"].startswith("cpu"):  # speed.timing_context(): whether the timed forwards could take page faults
        from paretoken.evaluators.speed import timing_context

        out["host_memory"] = timing_context()["host_memory"]
    out["duration_s"] = time.perf_counter() - start
    return out


def _release_cuda() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def nan_objectives(metrics: dict[str, float], objectives) -> list[str]:
    """Objectives whose value is missing or not finite."""
    bad = []
    for name in objectives:
        value = metrics.get(name)
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            bad.append(name)
    return bad
