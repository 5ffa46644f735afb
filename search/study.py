"""The Optuna study behind a search: objectives, samplers, creation and resume, presets,
stale trials, counts, hypervolume and the Pareto table.

The study is the single source of truth. Its user attributes record how it was
made (``paretoken``: space, objectives, budgets, measurement; ``objectives``);
each trial's user attributes record its plan, metrics, device, versions, timings
and worker, or its error.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import optuna

from paretoken.errors import ParetokenError
from paretoken.evaluators.metrics import BOUNDS, DIRECTIONS, HEADLINE, Budgets

DEFAULT_OBJECTIVES = ("top1", "gflops")
SAMPLERS = ("tpe", "nsga2", "gp", "random")
SPEED_OBJECTIVES = ("img_per_s", "latency_ms", "speedup")
NOISY_OBJECTIVES = (*SPEED_OBJECTIVES, "peak_mem_mb")  # measured, so they vary between runs of one plan
#: The measurement settings that must match to add trials to an existing study.
MEASUREMENT_KEYS = ("model", "checkpoint", "pretrained", "data", "images", "seed", "skip", "batch_size",
                    "flops_images")
UNCOMPRESSED = "uncompressed"
HEARTBEAT_ATTR = "paretoken:heartbeat"
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


# --------------------------------------------------------------------------- create / resume
def study_settings(space: str, objectives: Sequence[str], budgets: Budgets,
                   config: dict[str, Any], depth: int, heartbeat_s: int, grace_s: int) -> dict[str, Any]:
    """What a resumed study must match: space, objectives, budgets (max_gflops, min_top1, max_top1_drop),
    measurement, model depth, and the heartbeat and grace period (s) by which every process judges
    the others' running trials (a process with a shorter grace would fail live trials as stale)."""
    return {"space": space, "objectives": list(objectives), **budgets.as_dict(),
            "measurement": {k: config.get(k) for k in MEASUREMENT_KEYS}, "depth": depth,
            "heartbeat_s": heartbeat_s, "grace_s": grace_s}


def check_settings(study_name: str, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    """One-line error when a study is resumed with settings that would mix incomparable trials."""
    labels = {"space": "--space", "objectives": "--objectives", **{b: "--" + b.replace("_", "-") for b in BOUNDS},
              "depth": "the model depth", "heartbeat_s": "--heartbeat", "grace_s": "grace_s"}
    def shown(value: Any) -> str:
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else repr(value)

    for key, flag in labels.items():
        if key in stored and stored[key] != wanted[key]:
            raise ParetokenError(f"study: {study_name!r} was created with {key} {shown(stored[key])}, not "
                                 f"{shown(wanted[key])}; pass {flag} as before or start a new --study")
    from paretoken.evaluators.data import canonical_data

    for key, value in (stored.get("measurement") or {}).items():
        same = (canonical_data(value) == canonical_data(wanted["measurement"].get(key)) if key == "data"
                else wanted["measurement"].get(key) == value)
        if not same:
            raise ParetokenError(f"study: {study_name!r} measures with {key} {value!r}, not "
                                 f"{wanted['measurement'].get(key)!r}; pass the same --{key.replace('_', '-')} "
                                 "or start a new --study")


def wait_for_study_attr(study, key: str, timeout: float = 15.0) -> Any:
    """Study user attr ``key`` that another process writes right after creating the study (None if it
    has not within ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        value = study.user_attrs.get(key)
        if value is not None or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


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

    done = {t.user_attrs.get("preset") for t in study.get_trials(deepcopy=False)}
    wanted = [(UNCOMPRESSED, Plan())] + ([(n, p.plan) for n, p in PRESETS.items()] if presets else [])
    names = []
    for name, plan in wanted:
        if name in done:
            continue
        params = space.params_for(plan, depth)
        if params is None and name != UNCOMPRESSED:
            continue
        _enqueue(study, params, plan, {"preset": name})
        names.append(name)
    if log and names:
        log(f"enqueued first: {', '.join(names)} (the first {len(names)} trials measure them; "
            "the sampler's own plans follow)")
    return names


def runs_prefix_only(user_attrs: Mapping[str, Any]) -> bool:
    """Whether a trial whose plan comes from its space (not ``enqueued_plan``) runs that plan with
    ``prefix_only_last``: every trial but a preset's, which is measured as published.

    The field is exact and never costs more, so the search sets it instead of spending a sampler
    dimension on it (as a sampled choice, TPE left it off in 88 % of one 60-trial search).
    """
    return "preset" not in user_attrs


def _enqueue(study, params, plan, attrs: dict[str, Any]) -> None:
    """As the space's parameters when they make the plan the trial will run (so the sampler learns
    from it), else as a fixed plan."""
    if params is None or plan.prefix_only_last != runs_prefix_only(attrs):
        study.enqueue_trial({}, user_attrs={**attrs, "enqueued_plan": plan.to_dict()})
    else:
        study.enqueue_trial(params, user_attrs=attrs)


def enqueue_plan(study, plan, label: str | None = None) -> None:
    """Enqueue a plan of your own in a search study (made by :func:`run_search`): it runs before
    any sampled trial, as the space's parameters when those make exactly this plan (see
    :func:`runs_prefix_only`), else as a fixed plan. ``label`` is stored as user attr ``preset``."""
    from paretoken.spaces import get_space

    settings = study.user_attrs.get("paretoken")
    if not settings:
        raise ParetokenError(f"study: {study.study_name!r} was not made by paretoken search (no settings)")
    params = get_space(settings["space"]).params_for(plan, settings["depth"])
    _enqueue(study, params, plan, {"preset": label} if label else {})


# --------------------------------------------------------------------------- liveness
def requeue(study, trial) -> bool:
    """Run an interrupted trial's plan again: enqueue its parameters (and fixed plan) as a new trial.

    Trials that failed with an ``error`` of their own are not re-run.
    """
    if "error" in trial.user_attrs:
        return False
    attrs = {k: trial.user_attrs[k] for k in ("preset", "enqueued_plan") if k in trial.user_attrs}
    attrs["retry_of"] = trial.number
    ran = trial.user_attrs.get("plan")  # set before the trial was handed to a worker
    if "enqueued_plan" not in attrs and isinstance(ran, dict) and (
            bool(ran.get("prefix_only_last")) != runs_prefix_only(attrs)):
        attrs["enqueued_plan"] = ran  # its params would not make it: a study from before runs_prefix_only
    # an enqueued trial killed before its space sampled has no params yet, only the enqueued ones
    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    study.enqueue_trial(params, user_attrs=attrs)
    return True


class Liveness:
    """Heartbeats of the trials this process runs, and the sweep that fails trials nobody runs any more.

    RDB storages (SQLite, PostgreSQL) use Optuna's heartbeat and ``fail_stale_trials`` (its stale-trial
    callback re-enqueues the plan). Every storage also gets an explicit sweep: a RUNNING trial whose
    last sign of life (start, or heartbeat system attr ``paretoken:heartbeat``) is older than the grace
    period is failed and re-enqueued; this covers journal files, which have no heartbeat of their own,
    and a process killed between creating a trial and its first heartbeat.
    """

    def __init__(self, study, interval: float, grace: float, log: Callable[[str], None]) -> None:
        from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

        self.study, self.interval, self.grace, self.log = study, interval, grace, log
        self.optuna_heartbeat = isinstance(study._storage, BaseHeartbeat) and is_heartbeat_enabled(study._storage)

    def beat(self, trial_ids: Iterable[int]) -> None:
        storage = self.study._storage
        for trial_id in list(trial_ids):
            try:
                if self.optuna_heartbeat:
                    storage.record_heartbeat(trial_id)
                storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
            except (optuna.exceptions.UpdateFinishedTrialError, KeyError):
                pass  # finished meanwhile

    def sweep(self) -> int:
        """Fail and re-enqueue stale RUNNING trials; returns how many the explicit sweep failed."""
        from optuna.trial import TrialState

        failed = 0
        if self.optuna_heartbeat:  # its stale-trial callback re-enqueues (see stale_callback)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optuna.storages.fail_stale_trials(self.study)
        now = time.time()
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            seen = [trial.system_attrs.get(HEARTBEAT_ATTR)]
            if trial.datetime_start is not None:
                seen.append(_timestamp(trial.datetime_start))
            last = max((s for s in seen if isinstance(s, (int, float))), default=None)
            if last is None or now - last <= self.grace:
                continue
            try:
                if not self.study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another process failed it first and re-enqueues it
            failed += 1
            if requeue(self.study, trial):
                self.log(f"trial {trial.number} was left RUNNING (no heartbeat for {now - last:.0f} s): "
                         "marked FAIL, its plan runs again")
        return failed


def stale_callback(log: Callable[[str], None]):
    """Optuna's heartbeat_stale_trial_callback: re-enqueue the stale trial's plan."""

    def callback(study, trial) -> None:
        if requeue(study, trial):
            log(f"trial {trial.number} was left RUNNING (heartbeat stale): marked FAIL, its plan runs again")

    return callback


def _timestamp(when: datetime) -> float:
    return when.timestamp() if when.tzinfo else time.mktime(when.timetuple()) + when.microsecond / 1e6


# --------------------------------------------------------------------------- counts, front, hypervolume
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


def is_interrupted(trial) -> bool:
    """FAIL without an ``error`` of its own: not counted towards the target, its plan enqueued again."""
    from optuna.trial import TrialState

    return trial.state == TrialState.FAIL and "error" not in trial.user_attrs


def counts(study) -> Counts:
    from optuna.trial import TrialState

    c = Counts()
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            c.complete += 1
        elif t.state == TrialState.FAIL:
            if is_interrupted(t):
                c.interrupted += 1
            else:
                c.failed += 1
        elif t.state == TrialState.RUNNING:
            c.running += 1
        elif t.state == TrialState.WAITING:
            c.waiting += 1
    return c


def baseline(study) -> dict[str, float] | None:
    """Metrics of the first COMPLETE trial of the uncompressed model (a plan that changes nothing)."""
    from optuna.trial import TrialState

    from paretoken.compress.plan import is_uncompressed

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if is_uncompressed(t.user_attrs.get("plan")):
            return {k: v for k, v in t.user_attrs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return None


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


def reference_point(base: dict[str, float] | None, objectives: Sequence[str],
                    top1_margin: float = 10.0) -> dict[str, float] | None:
    """The worst case per objective (:func:`reference_value`) from the uncompressed model's metrics
    ``base``; None without them or where one is missing."""
    if base is None:
        return None
    ref = {}
    for o in objectives:
        value = reference_value(o, base.get(o, math.nan), top1_margin)
        if not math.isfinite(value):
            return None
        ref[o] = float(value)
    return ref


def _losses(trials, objectives: Sequence[str]) -> np.ndarray:
    """The trials' ``values`` as minimisation, shape (n, len(objectives)): maximised objectives negated."""
    rows = [[-v if DIRECTIONS[o] == "maximize" else v for o, v in zip(objectives, t.values)] for t in trials]
    return np.asarray(rows, dtype=float).reshape(len(rows), len(objectives))


def feasible(trial) -> bool:
    return all(v <= 0.0 for v in trial.constraints.values())


def front_trials(study) -> list:
    """The non-dominated feasible COMPLETE trials (Optuna's ``best_trials``), less those that took the
    values of another one on it (``same_plan_as``: the same plan, not measured again)."""
    best = study.best_trials
    numbers = {t.number for t in best}
    return [t for t in best if t.user_attrs.get("same_plan_as") not in numbers]


def hypervolume(trials, objectives: Sequence[str], reference: dict[str, float] | None) -> float:
    """Exact hypervolume of ``trials`` (feasible, COMPLETE) against ``reference`` (objective units)."""
    if reference is None:
        return math.nan
    trials = [t for t in trials if t.values is not None and feasible(t)]
    if not trials:
        return 0.0
    from optuna._hypervolume import compute_hypervolume

    points = _losses(trials, objectives)
    ref = np.array([-reference[o] if DIRECTIONS[o] == "maximize" else reference[o] for o in objectives])
    points = points[np.all(np.isfinite(points), axis=1) & np.all(points < ref, axis=1)]
    if len(points) == 0:
        return 0.0
    return float(compute_hypervolume(points, ref))


def front_table(study, objectives: Sequence[str]):
    """The Pareto front as a DataFrame, best first objective first."""
    import pandas as pd

    from paretoken.results.query import plan_label

    metrics = list(dict.fromkeys([*objectives, *HEADLINE]))
    rows = []
    for t in front_trials(study):
        attrs = t.user_attrs
        row = {"trial": t.number, "preset": attrs.get("preset") or ""}
        for name in metrics:
            value = attrs.get(name)
            row[name] = float(value) if isinstance(value, (int, float)) else math.nan
        label = plan_label(attrs.get("plan"))
        row["plan"] = label if len(label) <= 90 else label[:87] + "..."
        rows.append(row)
    df = pd.DataFrame(rows, columns=["trial", "preset", *metrics, "plan"])
    df = df.drop(columns=[m for m in metrics if m not in objectives and df[m].isna().all()])  # e.g. --no-speed
    first = objectives[0]
    return df.sort_values(first, ascending=DIRECTIONS[first] == "minimize", kind="stable").reset_index(drop=True)
