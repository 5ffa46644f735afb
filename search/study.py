"""The Optuna study behind a search: its objectives and directions, the seeded samplers, the trials
enqueued first (presets, plans of your own) and the count of its trials by state.

The study is the single source of truth; what its attributes hold is :mod:`paretoken.search.record`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import optuna

from paretoken.errors import ParetokenError
from paretoken.evaluators.metrics import DIRECTIONS
from paretoken.search import record

DEFAULT_OBJECTIVES = ("top1", "gflops")
SAMPLERS = ("tpe", "nsga2", "gp", "random")
SPEED_OBJECTIVES = ("img_per_s", "latency_ms", "speedup")
NOISY_OBJECTIVES = (*SPEED_OBJECTIVES, "peak_mem_mb")  # measured, so they vary between runs of one plan
NSGA2_POPULATION = 16


def check_objectives(objectives: Iterable[str] | str, valid: Iterable[str] = DIRECTIONS) -> tuple[str, ...]:
    """Parse "a,b" or a sequence into distinct objective names from ``valid``; one-line error otherwise."""
    if isinstance(objectives, str):
        objectives = [o.strip() for o in objectives.split(",") if o.strip()]
    objectives, valid = tuple(objectives), tuple(valid)
    if not objectives:
        raise ParetokenError(f"objectives: none given; valid: {', '.join(valid)}")
    for name in objectives:
        if name not in valid:
            raise ParetokenError(f"objectives: {name!r} is unknown; valid: {', '.join(valid)}")
    if len(set(objectives)) != len(objectives):
        raise ParetokenError(f"objectives: {','.join(objectives)} names one twice; valid: each objective once")
    return objectives


def directions(objectives: Sequence[str]) -> list[str]:
    return [DIRECTIONS[o] for o in objectives]


# --------------------------------------------------------------------------- samplers
class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Wraps an Optuna sampler and reseeds its random states from (seed, trial number) before
    each trial: one process is reproducible, and processes sharing a study with the same seed
    do not propose the same plans (trial numbers are unique across processes)."""

    def __init__(self, inner, seed: int) -> None:
        self.inner, self.seed = inner, seed

    def _reseed(self, number: int) -> None:
        from optuna.samplers._lazy_random_state import LazyRandomState

        derived = int(np.random.SeedSequence([self.seed, number]).generate_state(1)[0])
        seen: set[int] = set()

        def walk(obj, depth: int) -> None:
            if id(obj) in seen or depth > 3:
                return
            seen.add(id(obj))
            if isinstance(obj, LazyRandomState):
                obj.rng.seed(derived)
            elif isinstance(obj, np.random.RandomState):
                obj.seed(derived)
            elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("optuna"):
                for value in vars(obj).values():
                    walk(value, depth + 1)

        walk(self.inner, 0)

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._reseed(trial.number)
        self.inner.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()

    def __repr__(self) -> str:
        return f"TrialSeededSampler({type(self.inner).__name__}, seed={self.seed})"


def make_sampler(name: str, seed: int = 0, objectives: Sequence[str] = DEFAULT_OBJECTIVES):
    """A seeded Optuna sampler: tpe (multivariate, grouped for conditional spaces), nsga2, gp, random.

    GP treats ``objectives`` as deterministic unless one is timed or measured (img_per_s,
    latency_ms, speedup, peak_mem_mb): a plan's top-1 or GFLOPs on fixed images does not change, and with
    a fitted noise term GP proposed the same plan again and again (one plan 14 times in 60 trials
    on the embedded model), each time re-measured for nothing.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # multivariate/group are "experimental"
        if name == "tpe":
            inner = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                               n_startup_trials=10, warn_independent_sampling=False)
        elif name == "nsga2":
            inner = optuna.samplers.NSGAIISampler(seed=seed, population_size=NSGA2_POPULATION)
        elif name == "gp":
            inner = optuna.samplers.GPSampler(seed=seed, n_startup_trials=10, warn_independent_sampling=False,
                                              deterministic_objective=not set(objectives) & set(NOISY_OBJECTIVES))
        elif name == "random":
            inner = optuna.samplers.RandomSampler(seed=seed)
        else:
            raise ParetokenError(f"sampler: {name!r} is unknown; valid: {', '.join(SAMPLERS)}")
    return TrialSeededSampler(inner, seed)


# --------------------------------------------------------------------------- enqueued first
def enqueue_presets(study, space, depth: int, presets: bool = True,
                    log: Callable[[str], None] | None = None) -> list[str]:
    """Enqueue the uncompressed model (the hypervolume's reference) and, with ``presets``, every
    published schedule the space can express; each at most once per study.

    They go in as the parameters that make the space produce them (``space.params_for``), so the
    sampler learns from them like from any trial; each carries user attr ``preset``. A plan the
    space cannot express (only ever the uncompressed one) goes in as a fixed plan (``enqueued_plan``).
    """
    from paretoken.compress.plan import Plan
    from paretoken.compress.presets import PRESETS

    done = {t.user_attrs.get(record.PRESET) for t in study.get_trials(deepcopy=False)}
    wanted = [(record.UNCOMPRESSED, Plan())] + ([(n, p.plan) for n, p in PRESETS.items()] if presets else [])
    names = []
    for name, plan in wanted:
        if name in done:
            continue
        params = space.params_for(plan, depth)
        if params is None and name != record.UNCOMPRESSED:
            continue
        _enqueue(study, params, plan, {record.PRESET: name})
        names.append(name)
    if log and names:
        log(f"enqueued first: {', '.join(names)} (the first {len(names)} trials measure them; "
            "the sampler's own plans follow)")
    return names


def _enqueue(study, params, plan, attrs: dict[str, Any]) -> None:
    """As the space's parameters when they make the plan the trial will run (so the sampler learns
    from it), else as a fixed plan."""
    if params is None or plan.prefix_only_last != record.runs_prefix_only(attrs):
        study.enqueue_trial({}, user_attrs={**attrs, record.ENQUEUED_PLAN: plan.to_dict()})
    else:
        study.enqueue_trial(params, user_attrs=attrs)


def enqueue_plan(study, plan, label: str | None = None) -> None:
    """Enqueue a plan of your own in a search study (made by :func:`run_search`): it runs before
    any sampled trial, as the space's parameters when those make exactly this plan (see
    :func:`~paretoken.search.record.runs_prefix_only`), else as a fixed plan. ``label`` is stored as
    user attr ``preset``."""
    from paretoken.spaces import get_space

    settings = record.settings_of(study.user_attrs)
    if not settings:
        raise ParetokenError(f"study: {study.study_name!r} was not made by paretoken search (no settings)")
    params = get_space(settings["space"]).params_for(plan, settings["depth"])
    _enqueue(study, params, plan, {record.PRESET: label} if label else {})


# --------------------------------------------------------------------------- counts
@dataclass
class Counts:
    complete: int = 0
    failed: int = 0  # FAIL with an error of their own
    interrupted: int = 0  # FAIL without an error of their own (process died, Ctrl-C, setup_error): plans run again
    running: int = 0
    waiting: int = 0

    @property
    def finished(self) -> int:
        """Trials that count towards ``n_trials``: COMPLETE plus FAIL with an error."""
        return self.complete + self.failed


def counts(study) -> Counts:
    from optuna.trial import TrialState

    c = Counts()
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            c.complete += 1
        elif t.state == TrialState.FAIL:
            if record.is_interrupted(t.state.name, t.user_attrs):
                c.interrupted += 1
            else:
                c.failed += 1
        elif t.state == TrialState.RUNNING:
            c.running += 1
        elif t.state == TrialState.WAITING:
            c.waiting += 1
    return c
