"""The study record: every user attribute a search writes on its Optuna study and trials, by name,
with the functions that write and read them.

The search writes them (:mod:`paretoken.search.driver`, :mod:`~paretoken.search.opening`,
:mod:`~paretoken.search.study`); :mod:`paretoken.search.table`, ``paretoken.results`` (front,
holdout, export) read them back. The key strings are the stored format: studies written by any
earlier version load because they never change.

Study user attrs:
  ``paretoken``         the settings a resumed search must match (:func:`study_settings`): space,
                        objectives, budgets, ``measurement`` (:data:`MEASUREMENT_KEYS`), depth,
                        heartbeat_s, grace_s; with successive halving also ``min_images``, ``eta`` and
                        ``promotion`` (a study that records no min_images measures every trial on all
                        its images; one that records no promotion was made before it, by ``front``)
  ``objectives``        the objective names, in order
  ``presets_enqueued``  the creating process finished enqueueing the presets (bool)

Trial user attrs:
  ``plan``, ``space``   the plan run (dict form) and the space's name
  ``preset``            the published schedule it runs (``uncompressed`` for the reference)
  ``enqueued_plan``     a fixed plan to run instead of the space's sample
  ``retry_of``          the interrupted trial whose plan it runs again
  ``same_plan_as``      the COMPLETE trial whose values it took (the same plan, not measured again)
  ``error``             its own error: recorded FAIL, counted, not re-run
  ``setup_error``       its worker could not prepare what every trial shares: FAIL, interrupted, re-run
  ``images``            successive halving: the images its metrics (and values) are measured on, the
                        rung it reached; full fidelity when it is the study's ``images`` (or absent)
  ``rungs``             successive halving: each rung it finished, written as it runs and carried by
                        its retry (:mod:`paretoken.search.halving`)
  every metric of :data:`~paretoken.evaluators.metrics.METRICS` under its name (null: not measured)
  :data:`RUN_KEYS`      where and how long the worker ran it

Trial system attr :data:`HEARTBEAT`: the last heartbeat (Unix time, s) of a RUNNING trial.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from paretoken.evaluators.metrics import METRICS, Budgets
from paretoken.jsonvalues import json_ready

# study user attrs
SETTINGS = "paretoken"
OBJECTIVES = "objectives"
PRESETS_ENQUEUED = "presets_enqueued"

# trial user attrs
PLAN = "plan"
SPACE = "space"
PRESET = "preset"
ENQUEUED_PLAN = "enqueued_plan"
RETRY_OF = "retry_of"
SAME_PLAN_AS = "same_plan_as"
ERROR = "error"
SETUP_ERROR = "setup_error"
IMAGES = "images"
RUNGS = "rungs"
WORKER_PID = "worker_pid"
HOSTNAME = "hostname"
DEVICE = "device"  # the evaluation device, e.g. "cpu", "cuda:0 (NVIDIA H200)"
THREADS = "threads"
VERSIONS = "versions"  # {package: version} of the worker
DURATION_S = "duration_s"  # s, the worker's time for the trial
HOST_MEMORY = "host_memory"  # how its CPU forwards were timed: glibc's heap kept or the allocator's defaults
#: What a worker reports about its run of a trial (:func:`paretoken.search.worker.run_trial`), stored as is.
RUN_KEYS = (WORKER_PID, HOSTNAME, DEVICE, THREADS, VERSIONS, DURATION_S, HOST_MEMORY)
#: What a retry carries over from the trial it re-runs.
CARRIED_BY_RETRY = (PRESET, ENQUEUED_PLAN, RUNGS)

# trial system attr
HEARTBEAT = "paretoken:heartbeat"

#: ``preset`` of the uncompressed model (the plan that changes nothing: the hypervolume's reference).
UNCOMPRESSED = "uncompressed"

#: What is measured: the model, its weights and the images' data set.
MODEL_KEYS = ("model", "checkpoint", "pretrained", "data")
#: How it is measured: which images (``images`` after ``skip`` in the ``seed``'s order), in what batches,
#: GFLOPs counted or traced (``flops``), traced on how many, speed eager or compiled (``compile``).
EVALUATION_KEYS = ("images", "seed", "skip", "batch_size", "flops", "flops_images", "compile")
#: What a measurement recorded before a key existed measured with: GFLOPs were fvcore traces, speed eager.
MEASUREMENT_BEFORE = {"flops": "trace", "compile": False}
#: The evaluation settings that make two measurements comparable: they must match to add trials to a
#: study, holdout measures on the images after them, export records them.
MEASUREMENT_KEYS = (*MODEL_KEYS, *EVALUATION_KEYS)


# --------------------------------------------------------------------------- study
def study_settings(space: str, objectives: Sequence[str], budgets: Budgets,
                   config: Mapping[str, Any], depth: int, heartbeat_s: int, grace_s: int) -> dict[str, Any]:
    """Study user attr ``paretoken``: what a resumed study must match: space, objectives, budgets
    (max_gflops, min_top1, max_top1_drop), measurement (``config``, an EvalConfig as a dict, at
    :data:`MEASUREMENT_KEYS`), model depth, and the heartbeat and grace period (s) by which every
    process judges the others' running trials (a process with a shorter grace would fail live
    trials as stale)."""
    return {"space": space, "objectives": list(objectives), **budgets.as_dict(),
            "measurement": {k: config.get(k) for k in MEASUREMENT_KEYS}, "depth": depth,
            "heartbeat_s": heartbeat_s, "grace_s": grace_s}


def full_images(settings: Mapping[str, Any]) -> int | None:
    """The images a full-fidelity trial of the study is measured on (its ``measurement``'s); None when
    the study records none."""
    images = measurement_of(settings).get("images")
    return images if isinstance(images, int) else None


def is_full_fidelity(attrs: Mapping[str, Any], full: int | None) -> bool:
    """Whether a trial (user attrs ``attrs``) is measured on all ``full`` images of its study: every
    trial without successive halving (no ``images`` attr), and those that reached its last rung."""
    images = attrs.get(IMAGES)
    return images is None or full is None or images == full


def write_study(study, objectives: Sequence[str], settings: Mapping[str, Any]) -> None:
    """Record how the study was made: its objectives and settings (:func:`study_settings`)."""
    study.set_user_attr(OBJECTIVES, list(objectives))
    study.set_user_attr(SETTINGS, dict(settings))


def settings_of(study_attrs: Mapping[str, Any]) -> Mapping[str, Any]:
    """The study's ``paretoken`` settings; {} for a study not made by a search."""
    settings = study_attrs.get(SETTINGS)
    return settings if isinstance(settings, Mapping) else {}


def measurement_of(settings: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``measurement`` of a study's settings (keys recorded later at :data:`MEASUREMENT_BEFORE`'s
    values); {} when it records none."""
    measurement = settings.get("measurement") if isinstance(settings, Mapping) else None
    return {**MEASUREMENT_BEFORE, **measurement} if isinstance(measurement, Mapping) and measurement else {}


# --------------------------------------------------------------------------- trials
def plan_of(attrs: Mapping[str, Any]) -> Any:
    """The plan (dict form) a trial ran, else the fixed plan it was enqueued with; None without either."""
    plan = attrs.get(PLAN)
    if plan is None and isinstance(attrs.get(ENQUEUED_PLAN), Mapping):
        return attrs[ENQUEUED_PLAN]
    return plan


def runs_prefix_only(attrs: Mapping[str, Any]) -> bool:
    """Whether a trial whose plan comes from its space (not ``enqueued_plan``) runs that plan with
    ``prefix_only_last``: every trial but a preset's, which is measured as published.

    The field is exact and never costs more, so the search sets it instead of spending a sampler
    dimension on it (as a sampled choice, TPE left it off in 88 % of one 60-trial search).
    """
    return PRESET not in attrs


def write_run(trial, result: Mapping[str, Any]) -> None:
    """Where and how long the worker ran the trial (:data:`RUN_KEYS` of its ``result``)."""
    for key in RUN_KEYS:
        if key in result:
            trial.set_user_attr(key, result[key])


def write_metrics(trial, metrics: Mapping[str, float]) -> None:
    """Each metric under its own name; NaN (not measured) as null, valid JSON for dashboards."""
    for key, value in metrics.items():
        trial.set_user_attr(key, json_ready(value))


def stored_metrics(attrs: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of :data:`METRICS` a trial stores, null (not measured) back to NaN."""
    return {k: math.nan if attrs[k] is None else attrs[k] for k in METRICS if k in attrs}


def error_of(attrs: Mapping[str, Any]) -> str | None:
    """A FAIL trial's own error, else its worker's set-up error; None for neither."""
    return attrs.get(ERROR, attrs.get(SETUP_ERROR))


def is_interrupted(state_name: str, attrs: Mapping[str, Any]) -> bool:
    """FAIL without an ``error`` of its own (its process died, Ctrl-C, a ``setup_error``): not counted
    towards the target, its plan enqueued again. ``state_name``: the Optuna state's name."""
    return state_name == "FAIL" and ERROR not in attrs


def retry_attrs(number: int, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The user attrs of the trial that re-runs trial ``number`` (user attrs ``attrs``)."""
    return {**{k: attrs[k] for k in CARRIED_BY_RETRY if k in attrs}, RETRY_OF: number}


def versions_of(attrs: Mapping[str, Any], packages: Sequence[str]) -> dict[str, Any]:
    """The package versions a trial ran with: its ``versions``, or in older studies the ``packages``
    stored one by one."""
    versions = attrs.get(VERSIONS)
    if isinstance(versions, Mapping):
        return dict(versions)
    return {k: attrs[k] for k in packages if k in attrs}
