"""A search's inputs, checked once: :func:`check_options` turns :func:`~paretoken.search.run.run_search`'s
keywords into one frozen :class:`SearchOptions`, or raises the one-line :class:`ParetokenError` that
names the field and its valid values, before anything is written to a study.

Checking includes probing the evaluated model for its depth (built on the meta device, no weights)
and the evaluation's files (model, checkpoint, data), so a bad input never becomes a study of failures.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

from paretoken.argtypes import MAX_SEED
from paretoken.errors import ParetokenError, check_int
from paretoken.evaluators.metrics import DIRECTIONS, Budgets
from paretoken.search import record
from paretoken.search.halving import check_halving, rung_schedule
from paretoken.search.storage import MAX_HEARTBEAT_S, check_study_name, study_storage
from paretoken.search.study import DEFAULT_OBJECTIVES, SAMPLERS, SPEED_OBJECTIVES, check_objectives

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class SearchOptions:
    """What one search runs with (see :func:`~paretoken.search.run.run_search` for each field's meaning)."""

    study: str
    storage: str  # the storage URL (resolved: default sqlite:///studies/<study>.db)
    space: Any  # a space of paretoken.spaces
    objectives: tuple[str, ...]
    sampler: str
    n_trials: int
    backend: str
    workers: int
    ray_address: str | None
    cpus_per_trial: float | None
    gpus_per_trial: float | None
    budgets: Budgets
    eval_config: Any  # EvalConfig, checked, its device resolved ("auto" -> what this machine has)
    seed: int
    presets: bool
    heartbeat_s: int  # s
    grace_s: int  # s
    poll_s: float  # s
    depth: int  # blocks of the evaluated model
    min_images: int | None = None  # successive halving: images of the first rung (None: every trial on all)
    eta: int | None = None  # successive halving: each rung keeps the top 1/eta; None without it
    promotion: str | None = None  # successive halving: its rule (halving.PROMOTIONS); None without it

    @property
    def config_dict(self) -> dict[str, Any]:
        """The evaluation config as the plain dict a worker receives."""
        from paretoken.search.worker import config_to_dict

        return config_to_dict(self.eval_config)

    @property
    def settings(self) -> dict[str, Any]:
        """The study's ``paretoken`` user attr (:func:`paretoken.search.record.study_settings`)."""
        settings = record.study_settings(self.space.name, self.objectives, self.budgets, self.config_dict,
                                         self.depth, self.heartbeat_s, self.grace_s)
        if hasattr(self.space, "ops"):  # mixed: the ops its overriding blocks choose among
            settings["ops"] = list(self.space.ops)
        if self.min_images is not None:
            settings.update(min_images=self.min_images, eta=self.eta, promotion=self.promotion)
        return settings

    @property
    def rungs(self) -> tuple[int, ...] | None:
        """Images of each successive-halving rung (:func:`~paretoken.search.halving.rung_schedule`); None
        without successive halving."""
        if self.min_images is None:
            return None
        return rung_schedule(self.min_images, self.eval_config.images, self.eta)

    @property
    def cpus(self) -> float:
        """CPUs per Ray trial (default 1)."""
        return self.cpus_per_trial or 1.0

    @property
    def gpus(self) -> float:
        """GPUs per Ray trial (default: one when the evaluation device is CUDA, else none)."""
        if self.gpus_per_trial is not None:
            return self.gpus_per_trial
        return 1.0 if str(self.eval_config.device).startswith("cuda") else 0.0


def check_options(study: str, *, storage: str | None = None, space: str = "mixed",
                  objectives: Sequence[str] | str = DEFAULT_OBJECTIVES, sampler: str = "tpe", n_trials: int = 40,
                  backend: str = "local", workers: int = 1, ray_address: str | None = None,
                  cpus_per_trial: float | None = None, gpus_per_trial: float | None = None,
                  budgets: Budgets | None = None, eval_config=None, seed: int = 0, presets: bool = True,
                  heartbeat_s: int = 10, grace_s: int | None = None, poll_s: float = 1.0,
                  ops: Sequence[str] | str | None = None, min_images: int | None = None,
                  eta: int | None = None, promotion: str | None = None) -> SearchOptions:
    """The checked :class:`SearchOptions` of :func:`~paretoken.search.run.run_search`'s keywords
    (defaults filled in: ``EvalConfig()``, ``Budgets()``, ``grace_s`` 3 heartbeats)."""
    from paretoken.evaluators.evaluate import EvalConfig, checked_config, device_name
    from paretoken.spaces import get_space

    check_study_name(study)
    objectives = check_objectives(objectives)
    space_obj = get_space(space)
    if ops is not None:
        from paretoken.spaces.families import MixedSpace

        if space_obj.name != "mixed":
            raise ParetokenError(f"ops: applies to the mixed space only, not {space_obj.name!r}; valid: --space mixed")
        space_obj = MixedSpace(ops=ops.split(",") if isinstance(ops, str) else ops)
    config = eval_config if eval_config is not None else EvalConfig()
    config = dataclasses.replace(config, device=device_name(config.device))  # auto: what this machine has
    if sampler not in SAMPLERS:
        raise ParetokenError(f"sampler: {sampler!r} is unknown; valid: {', '.join(SAMPLERS)}")
    budgets = budgets if budgets is not None else Budgets()
    _check_run(backend, workers, ray_address, n_trials, cpus_per_trial, gpus_per_trial, seed)
    budgets.check()
    _check_objectives_measured(objectives, config)
    eta, promotion = check_halving(min_images, eta, config.images, objectives, promotion)
    check_int("heartbeat", heartbeat_s, 1, MAX_HEARTBEAT_S, note="seconds")
    grace_s = int(grace_s) if grace_s is not None else 3 * heartbeat_s
    if grace_s <= heartbeat_s:
        raise ParetokenError(f"grace: {grace_s} s must exceed the heartbeat interval {heartbeat_s} s")
    config = checked_config(config)  # a missing model, checkpoint or data is one line, not a study of failures
    return SearchOptions(study=study, storage=study_storage(study, storage), space=space_obj, objectives=objectives,
                         sampler=sampler, n_trials=n_trials, backend=backend, workers=workers,
                         ray_address=ray_address, cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                         budgets=budgets, eval_config=config, seed=seed, presets=presets, heartbeat_s=heartbeat_s,
                         grace_s=grace_s, poll_s=poll_s, depth=model_depth(config), min_images=min_images, eta=eta,
                         promotion=promotion)


def _check_run(backend, workers, ray_address, n_trials, cpus_per_trial, gpus_per_trial, seed) -> None:
    """Backend, Ray address and resources, trial target, workers and seed."""
    if backend not in BACKENDS:
        raise ParetokenError(f"backend: {backend!r} is unknown; valid: {', '.join(BACKENDS)}")
    if ray_address is not None and not ray_address.strip():
        raise ParetokenError(f"ray-address: {ray_address!r} names no cluster; valid: host:port of a head node, "
                             "auto, ray://HOST:10001, or no --ray-address for a local Ray")
    if ray_address is not None and backend != "ray":
        raise ParetokenError(f"ray-address: {ray_address!r} needs --backend ray (the local backend runs in process)")
    check_int("seed", seed, 0, MAX_SEED)
    check_int("trials", n_trials, 0, note="the study's target")
    check_int("workers", workers, 1)
    if backend == "local" and workers != 1:
        raise ParetokenError(f"workers: the local backend runs one trial at a time, not {workers}; "
                             "use --backend ray for --workers K (or run K processes on a shared storage)")
    if cpus_per_trial is not None and not 0 < cpus_per_trial < math.inf:
        raise ParetokenError(f"cpus-per-trial: {cpus_per_trial!r} is invalid; valid: a finite number > 0")
    if gpus_per_trial is not None and not 0 <= gpus_per_trial < math.inf:
        raise ParetokenError(f"gpus-per-trial: {gpus_per_trial!r} is invalid; valid: a finite number >= 0")
    for flag, amount, local in (("cpus-per-trial", cpus_per_trial, "with torch's threads"),
                                ("gpus-per-trial", gpus_per_trial, "on --device")):
        if amount is not None and backend == "local":
            raise ParetokenError(f"{flag}: {amount:g} is for Ray trials; the local backend runs in process {local}; "
                                 f"valid: --backend ray, or no --{flag}")


def _check_objectives_measured(objectives: Sequence[str], config) -> None:
    """Every objective is measured under ``config`` (speed on, CUDA for peak memory)."""
    if not config.speed:
        for o in objectives:
            if o in SPEED_OBJECTIVES:
                raise ParetokenError(f"objectives: {o!r} needs speed measurement; drop --no-speed")
    if "peak_mem_mb" in objectives and not str(config.device).startswith("cuda"):
        raise ParetokenError("objectives: 'peak_mem_mb' is measured on CUDA devices only; "
                             "valid on CPU: " + ", ".join(o for o in DIRECTIONS if o != "peak_mem_mb"))


def model_depth(config) -> int:
    """Number of blocks of the evaluated model, built on the meta device (no weights loaded)."""
    import torch

    from paretoken.evaluators.models import DEFAULT_MODEL, _check_timm_name, build_default_architecture

    with torch.device("meta"):
        if config.model == DEFAULT_MODEL:
            model = build_default_architecture()
        else:
            _check_timm_name(config.model)
            import timm

            model = timm.create_model(config.model, pretrained=False)
    from paretoken.compress.patch import check_model

    check_model(model)
    return len(model.blocks)
