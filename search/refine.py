"""Front steps: a share of the trials refines the Pareto front instead of asking the sampler.

A front step takes a trial of the current feasible Pareto front (``study.best_trials``) and
proposes its parameters with one or two of them moved one grid step (an int or stepped float up
or down, a categorical to another choice), skipping parameter sets the study already holds.
Parameters that the moved ones make newly needed (a block that now overrides the base, say) are
left to the wrapped sampler.

Why: on a grid space the published schedules and the model-based samplers' best plans sit in a
narrow band of near-equal plans, where which neighbour is better is decided by a few evaluation
images; TPE, NSGA-II, GP and random sampling rarely propose the exact neighbour of a front point,
a step does (bench/search_quality.py measures the difference).
"""
from __future__ import annotations

import itertools
from typing import Any, Mapping

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

STEP_ATTR = "paretoken:step_of"  # system attr of a step trial: the number of the front trial it moved from
CONTINUOUS_STEPS = 20  # a float without a step moves by 1/20 of its range (of its log range when log)


def moves(value: Any, distribution: BaseDistribution) -> list[Any]:
    """The values one grid step from ``value`` inside ``distribution``: up and down for an int or
    float (a stepless float: 1/20 of its range), every other choice for a categorical."""
    if isinstance(distribution, CategoricalDistribution):
        return [c for c in distribution.choices if c != value]
    if isinstance(distribution, IntDistribution):
        return [v for v in (value - distribution.step, value + distribution.step)
                if distribution.low <= v <= distribution.high]
    if isinstance(distribution, FloatDistribution):
        low, high = distribution.low, distribution.high
        if distribution.step is not None:
            k = round((value - low) / distribution.step)
            out = [low + (k + d) * distribution.step for d in (-1, 1)]
        elif distribution.log:
            ratio = (high / low) ** (1.0 / CONTINUOUS_STEPS)
            out = [value / ratio, value * ratio]
        else:
            out = [value + d * (high - low) / CONTINUOUS_STEPS for d in (-1, 1)]
        return [v for v in out if low - 1e-12 <= v <= high + 1e-12]
    return []


def _key(params: Mapping[str, Any]) -> frozenset:
    """Hashable form of a parameter set; floats rounded so that a grid value read back matches."""
    return frozenset((k, round(v, 9) if isinstance(v, float) else v) for k, v in params.items())


def neighbours(params: Mapping[str, Any], distributions: Mapping[str, BaseDistribution]) -> list[dict[str, Any]]:
    """Every parameter set that moves one or two of ``params`` one step (:func:`moves`), singles first."""
    steps = {name: moves(value, distributions[name]) for name, value in params.items()}
    names = [name for name in params if steps[name]]
    out = [{**params, name: v} for name in names for v in steps[name]]
    for a, b in itertools.combinations(names, 2):
        out += [{**params, a: va, b: vb} for va in steps[a] for vb in steps[b]]
    return out


def choose_step(front: list, tried: list[frozenset], rng: np.random.Generator) -> tuple[Any, dict[str, Any]] | None:
    """(parent, parameters) of one untried neighbour of a random front trial that has one, or None.

    front: frozen trials (their ``params`` and ``distributions``); tried: :func:`_key` of every
    non-empty parameter set the study holds. A neighbour counts as tried when a tried set is part of it: a
    define-by-run space asks the same parameters for the same answers, so such a neighbour would
    run that trial again (a move that makes parameters unused, e.g. one block fewer).
    """
    for i in rng.permutation(len(front)):
        parent = front[i]
        candidates = neighbours(parent.params, parent.distributions) if parent.params else []
        for j in rng.permutation(len(candidates)):
            key = _key(candidates[j])
            if not any(t <= key for t in tried):
                return parent, candidates[j]
    return None


class FrontStepSampler(optuna.samplers.BaseSampler):
    """Wraps a sampler; before each trial that is not enqueued, with probability ``share`` (drawn
    from ``seed`` and the trial number, so reproducible), the trial becomes a front step: its
    parameters come from :func:`choose_step` as relative parameters, and the wrapped sampler
    answers only for parameters the step does not fix. The step's parent is recorded in the
    trial's system attr ``paretoken:step_of``."""

    def __init__(self, inner: optuna.samplers.BaseSampler, share: float, seed: int) -> None:
        self.inner, self.share, self.seed = inner, share, seed
        self._steps: dict[int, tuple[Any, dict[str, Any]]] = {}  # trial id -> (parent, params)

    def before_trial(self, study, trial) -> None:
        self.inner.before_trial(study, trial)
        rng = np.random.default_rng([self.seed, trial.number, 1])
        if "fixed_params" in trial.system_attrs or rng.random() >= self.share:
            return
        tried = [_key(t.params) for t in study.get_trials(deepcopy=False) if t.params]
        step = choose_step(study.best_trials, tried, rng)
        if step is not None:
            self._steps[trial._trial_id] = step
            study._storage.set_trial_system_attr(trial._trial_id, STEP_ATTR, step[0].number)

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        step = self._steps.get(trial._trial_id)
        if step is None:
            return self.inner.infer_relative_search_space(study, trial)
        return {name: step[0].distributions[name] for name in step[1]}

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        step = self._steps.get(trial._trial_id)
        return dict(step[1]) if step is not None else self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._steps.pop(trial._trial_id, None)
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()

    def __repr__(self) -> str:
        return f"FrontStepSampler({self.inner!r}, share={self.share})"
