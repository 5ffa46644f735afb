"""run_search: an Optuna multi-objective study driven by an ask/tell loop, trials evaluated
in process (``local``) or as Ray Tune trials on Ray workers (``ray``, :mod:`paretoken.search.ray_tune`).

The driver is the only process that writes the study: it asks Optuna for a trial,
turns it into a plan (the space's, with ``prefix_only_last`` unless a preset's, or a fixed
enqueued plan), hands the plan to a worker, and tells Optuna the result with every metric as
a user attribute. The storage therefore holds every trial of every backend in the same form,
and a search is resumed by running the same command again:

* ``n_trials`` is the study's target of finished trials (COMPLETE, plus FAIL with an
  error of their own); a resumed run only runs the missing ones, and several processes
  sharing a storage (journal file, PostgreSQL) share the target;
* trials left RUNNING by a killed process are failed once their heartbeat is stale
  (``grace_s``) and their plans enqueued again; finished trials are never repeated;
* a trial that raises (bad plan, out of memory, NaN metric) is recorded FAIL with user attr
  ``error`` and the search goes on;
* a worker that cannot prepare what every trial shares (an image that cannot be read, out of
  memory in the uncompressed forward) stops the search with that error as one line; the
  trial is recorded FAIL with user attr ``setup_error`` and its plan enqueued again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from paretoken.argtypes import MAX_SEED
from paretoken.compress.plan import Plan, plan_as_run
from paretoken.errors import ParetokenError, check_int
from paretoken.evaluators.metrics import METRICS, Budgets, format_metric
from paretoken.jsonvalues import json_ready
from paretoken.search import study as st
from paretoken.search.storage import (MAX_HEARTBEAT_S, check_study_name, open_storage, redact, storage_file,
                                      study_storage)
from paretoken.search.worker import config_to_dict, nan_objectives, run_trial

BACKENDS = ("local", "ray")


@dataclass
class SearchResult:
    """What a search leaves: the study's counts, its Pareto front (a DataFrame) and hypervolume."""

    study_name: str
    storage: str
    counts: st.Counts
    front: Any  # pandas.DataFrame
    hypervolume: float
    reference: dict[str, float] | None
    ran: int = 0  # trials this call finished
    study: Any = field(default=None, repr=False)


# --------------------------------------------------------------------------- executors
class LocalExecutor:
    """Runs one trial at a time in this process (the evaluator caches the model between trials).

    Ctrl-C lands at once while a trial computes (``ctrl_c.at_once``): its code holds no storage lock.
    """

    def __init__(self, ctrl_c: _CtrlC) -> None:
        self._done: list[tuple[int, dict[str, Any]]] = []
        self.ctrl_c = ctrl_c

    def free(self) -> bool:
        return not self._done

    def submit(self, key: int, plan: dict[str, Any], config: dict[str, Any]) -> None:
        with self.ctrl_c.at_once():
            result = run_trial(plan, config)
        self._done.append((key, result))

    def busy(self) -> bool:
        return bool(self._done)

    def wait(self, timeout: float) -> list[tuple[int, dict[str, Any]]]:
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        pass


class _Beater(threading.Thread):
    """Records a heartbeat for this process's running trials every ``interval`` seconds."""

    def __init__(self, liveness: st.Liveness) -> None:
        super().__init__(name="paretoken-heartbeat", daemon=True)
        self.liveness, self.ids, self.lock, self.halt = liveness, set(), threading.Lock(), threading.Event()

    def add(self, trial_id: int) -> None:
        with self.lock:
            self.ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self.lock:
            self.ids.discard(trial_id)

    def run(self) -> None:
        while not self.halt.wait(self.liveness.interval):
            with self.lock:
                ids = list(self.ids)
            try:
                self.liveness.beat(ids)
            except Exception:  # noqa: BLE001 - a missed beat is retried; the sweep has a grace period
                pass

    def stop(self) -> None:
        self.halt.set()


# --------------------------------------------------------------------------- helpers
class _CtrlC:
    """Ctrl-C (SIGINT) during a search's loop, raised as KeyboardInterrupt only where it is safe.

    Inside :meth:`at_once` (a trial computing in this process) it is raised at once; elsewhere it is
    held until the loop's next :meth:`check`, where no finished result waits to be told. Raised
    asynchronously inside a storage call, it could leave a connection-pool lock taken or a trial
    half written, and the clean-up that fails the running trials would then hang or lose one.
    """

    def __init__(self) -> None:
        self.received = False
        self.immediate = False

    def _handle(self, signum, frame) -> None:
        self.received = True
        if self.immediate:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.received:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def at_once(self) -> Iterator[None]:
        self.check()
        self.immediate = True
        try:
            yield
        finally:
            self.immediate = False
        self.check()  # also when code inside caught the KeyboardInterrupt and went on

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The handler for the block. Not installed off the main thread (Python delivers no signal
        there), nor where SIGINT is ignored: a process started that way (``cmd &`` in a non-interactive
        script) is meant to outlive Ctrl-C, as Python itself leaves it."""
        if threading.current_thread() is not threading.main_thread() \
                or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            yield
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


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


def _resolve_plan(trial, space, depth: int) -> Plan:
    """The plan ``trial`` runs: its ``enqueued_plan``; else its space's plan, as published for a preset,
    otherwise prefix-only and without a last-block stage (moot then: the plan stored is the plan run)."""
    fixed = trial.user_attrs.get("enqueued_plan")
    if fixed is not None:
        return Plan.from_dict(fixed)
    plan = space.sample(trial, depth)
    if not st.runs_prefix_only(trial.user_attrs):
        return plan
    short = dataclasses.replace(plan, prefix_only_last=True)
    return dataclasses.replace(short, stages=short.stages_run(depth))


def _fmt(value: Any) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:.4g}" if abs(value) < 10 else f"{value:.2f}"


def _check_inputs(objectives, backend, workers, ray_address, n_trials, cpus_per_trial, gpus_per_trial, budgets,
                  config, seed) -> None:
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
    budgets.check()
    if not config.speed:
        for o in objectives:
            if o in st.SPEED_OBJECTIVES:
                raise ParetokenError(f"objectives: {o!r} needs speed measurement; drop --no-speed")
    if "peak_mem_mb" in objectives and not str(config.device).startswith("cuda"):
        raise ParetokenError("objectives: 'peak_mem_mb' is measured on CUDA devices only; "
                             "valid on CPU: " + ", ".join(o for o in st.DIRECTIONS if o != "peak_mem_mb"))


# --------------------------------------------------------------------------- the search
def run_search(study_name: str, storage: str | None = None, space: str = "mixed",
               objectives: Sequence[str] | str = st.DEFAULT_OBJECTIVES, sampler: str = "tpe", n_trials: int = 40,
               backend: str = "local", workers: int = 1, ray_address: str | None = None,
               cpus_per_trial: float | None = None, gpus_per_trial: float | None = None, budgets: Budgets | None = None,
               eval_config=None, seed: int = 0,
               presets: bool = True, heartbeat_s: int = 10, grace_s: int | None = None, poll_s: float = 1.0,
               log: Callable[[str], None] | None = None) -> SearchResult:
    """Run (or resume) study ``study_name`` until it holds ``n_trials`` finished trials.

    study_name / storage: the Optuna study and its storage URL (default ``sqlite:///studies/<study>.db``;
      ``journal:PATH``; ``postgresql://...``).
    space: a name of :data:`paretoken.spaces.SPACES`.
    objectives: metric names, each maximised or minimised as
      :data:`~paretoken.evaluators.metrics.DIRECTIONS` says.
    sampler: tpe, nsga2, gp or random, seeded with ``seed``.
    backend: ``local`` (in process, one trial at a time) or ``ray`` (Ray Tune trials, ``workers`` at
      once, with ``cpus_per_trial`` (default 1) and ``gpus_per_trial`` each, on a local Ray or
      ``ray_address``; default one GPU per trial when the evaluation device is CUDA; both are refused
      on the local backend).
    budgets: :class:`~paretoken.evaluators.metrics.Budgets` (GFLOPs per image at most; top-1 % at least;
      top-1 points lost against the uncompressed model at most), recorded as Optuna constraints
      (``trial.set_constraint``): infeasible trials stay in the study but leave the front, and the
      samplers learn to avoid them.
    eval_config: :class:`paretoken.evaluators.evaluate.EvalConfig` (default: EvalConfig()).
    presets: when the study is created, enqueue every published preset the space can express (the
      uncompressed model, the hypervolume's reference, is enqueued in any case).
    heartbeat_s / grace_s: heartbeat interval of running trials; a RUNNING trial silent for ``grace_s``
      (default 3 heartbeats) is failed and its plan re-run.
    log: receives the progress lines (default: print).
    """
    import optuna

    from paretoken.evaluators.evaluate import EvalConfig, checked_config, device_name
    from paretoken.spaces import get_space

    log = log or (lambda line: print(line, flush=True))
    check_study_name(study_name)
    objectives = st.check_objectives(objectives)
    space_obj = get_space(space)
    config = eval_config if eval_config is not None else EvalConfig()
    config = dataclasses.replace(config, device=device_name(config.device))  # auto: what this machine has
    if sampler not in st.SAMPLERS:
        raise ParetokenError(f"sampler: {sampler!r} is unknown; valid: {', '.join(st.SAMPLERS)}")
    budgets = budgets if budgets is not None else Budgets()
    _check_inputs(objectives, backend, workers, ray_address, n_trials, cpus_per_trial, gpus_per_trial, budgets, config,
                  seed)
    check_int("heartbeat", heartbeat_s, 1, MAX_HEARTBEAT_S, note="seconds")
    grace_s = int(grace_s) if grace_s is not None else 3 * heartbeat_s
    if grace_s <= heartbeat_s:
        raise ParetokenError(f"grace: {grace_s} s must exceed the heartbeat interval {heartbeat_s} s")
    config = checked_config(config)  # a missing model, checkpoint or data is one line, not a study of failures
    depth = model_depth(config)
    url = study_storage(study_name, storage)
    config_dict = config_to_dict(config)
    settings = st.study_settings(space_obj.name, objectives, budgets, config_dict, depth, heartbeat_s, grace_s)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        _quiet_warnings()
        return _run(study_name, url, space_obj, objectives, sampler, n_trials, backend, workers, ray_address,
                    cpus_per_trial, gpus_per_trial, budgets, config, seed, presets, heartbeat_s,
                    grace_s, poll_s, log, depth, settings, config_dict)


def _check_existing(study_name: str, storage, settings: dict[str, Any]) -> None:
    """The one-line settings error for a study that exists already, without touching it."""
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return
    stored = storage.get_study_user_attrs(study_id).get("paretoken")
    if stored:
        st.check_settings(study_name, stored, settings)


def _quiet_warnings() -> None:
    import optuna

    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")
    warnings.filterwarnings("ignore", module="fvcore")


def _run(study_name, url, space_obj, objectives, sampler, n_trials, backend, workers, ray_address, cpus_per_trial,
         gpus_per_trial, budgets, config, seed, presets, heartbeat_s, grace_s, poll_s, log, depth,
         settings, config_dict) -> SearchResult:
    def storage() -> Any:
        return open_storage(url, heartbeat_interval=heartbeat_s, grace_period=grace_s,
                            stale_callback=st.stale_callback(log))

    sampler_obj = st.make_sampler(sampler, seed, objectives)
    ctrl_c = _CtrlC()
    path = storage_file(url)
    new_file = path is not None and not path.exists()
    storage_obj = None if new_file else storage()  # a file is made once the cluster has been joined
    if storage_obj is not None:
        _check_existing(study_name, storage_obj, settings)  # before Ray's start-up (tens of seconds)
    if backend == "ray":  # joined before the study is touched: an unreachable cluster writes nothing to it
        gpus = gpus_per_trial if gpus_per_trial is not None else (1.0 if str(config.device).startswith("cuda")
                                                                  else 0.0)
        from paretoken.search.ray_tune import TuneExecutor

        executor: Any = TuneExecutor(workers, cpus_per_trial or 1.0, gpus, ray_address, log)
    else:
        executor = LocalExecutor(ctrl_c)
    try:
        storage_obj = storage() if storage_obj is None else storage_obj
        study = _open_study(study_name, url, storage_obj, sampler_obj, space_obj, objectives, sampler, seed,
                            n_trials, presets, depth, settings, log)
        liveness = st.Liveness(study, heartbeat_s, grace_s, log)
        beater = _Beater(liveness)
        beater.start()
        state = _LoopState(study, space_obj, depth, objectives, n_trials, budgets, config_dict, log)
        with ctrl_c.installed():
            try:
                _loop(state, executor, liveness, beater, poll_s, ctrl_c)
            except BaseException:  # Ctrl-C, or an error that stops the search (Ray Tune gone, storage lost)
                with contextlib.suppress(Exception):  # what stopped the search is the error to show
                    state.abandon()
                raise
            finally:
                beater.stop()
    finally:
        executor.close()

    c = st.counts(study)
    ref = st.reference_point(st.baseline(study), objectives)
    fr = st.front_trials(study)
    hv = st.hypervolume(fr, objectives, ref)
    table = st.front_table(study, objectives)
    shown_ref = f" (reference {', '.join(f'{k} {v:.4g}' for k, v in ref.items())})" if ref else ""
    log(f"done: {c.complete} complete, {c.failed} failed, {c.interrupted} interrupted and re-run; "
        f"front {len(fr)}, hypervolume {_fmt(hv)}{shown_ref}")
    if not table.empty:
        import pandas as pd

        with pd.option_context("display.width", 200, "display.max_colwidth", 70):
            log("Pareto front:\n" + table.to_string(index=False, na_rep="-", formatters={
                c: functools.partial(format_metric, c) for c in table.columns if table[c].dtype == float}))
    line = _presets_line(study, objectives)
    if line:
        log(line)
    return SearchResult(study_name, url, c, table, hv, ref, state.ran, study)


def _open_study(study_name, url, storage_obj, sampler_obj, space_obj, objectives, sampler, seed, n_trials,
                presets, depth, settings, log):
    """Create the study (settings stored, presets enqueued) or load it after checking its settings."""
    import optuna

    try:
        study = optuna.create_study(study_name=study_name, storage=storage_obj, sampler=sampler_obj,
                                    directions=st.directions(objectives))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=storage_obj, sampler=sampler_obj)
        created = False
    except Exception as exc:  # noqa: BLE001 - e.g. a read-only file, a dropped connection
        raise ParetokenError(f"storage: cannot create study {study_name!r} in {redact(url)} "
                             f"({' '.join(str(exc).split())[:200]})") from None
    if created:
        study.set_metric_names(list(objectives))
        study.set_user_attr("objectives", list(objectives))
        study.set_user_attr("paretoken", settings)
        st.enqueue_presets(study, space_obj, depth, presets, log)
        study.set_user_attr("presets_enqueued", bool(presets))
    else:
        if study.user_attrs.get("paretoken") is None and study.get_trials(deepcopy=False):
            raise ParetokenError(f"study: {study_name!r} in {redact(url)} was not made by a paretoken search (it "
                                 "holds trials without paretoken's settings); valid: a new --study name")
        if [d.name.lower() for d in study.directions] != st.directions(objectives):
            stored = study.user_attrs.get("objectives") or [d.name.lower() for d in study.directions]
            raise ParetokenError(f"study: {study_name!r} has objectives {','.join(map(str, stored))}, not "
                                 f"{','.join(objectives)}; pass --objectives as before or start a new --study")
        stored = st.wait_for_study_attr(study, "paretoken")
        if stored is None:  # made empty elsewhere (e.g. `optuna create-study`): adopt it
            study.set_user_attr("paretoken", settings)
            study.set_user_attr("objectives", list(objectives))
        else:
            st.check_settings(study_name, stored, settings)
        if st.wait_for_study_attr(study, "presets_enqueued") is None:
            # the creating process died while enqueueing: finish its job (each preset at most once)
            st.enqueue_presets(study, space_obj, depth, presets, log)
            study.set_user_attr("presets_enqueued", bool(presets))

    c0 = st.counts(study)
    log(f"study {study_name} in {redact(url)}: " + ("created" if created else
        f"resumed with {c0.complete} complete, {c0.failed} failed, {c0.interrupted} interrupted, "
        f"{c0.running} running, {c0.waiting} waiting")
        + f"; space {space_obj.name}, objectives {','.join(objectives)}, sampler {sampler} (seed {seed}), "
          f"target {n_trials} trials")
    return study


def _presets_line(study, objectives: Sequence[str]) -> str | None:
    """How many of the study's presets a searched plan dominates (None when it ran none)."""
    from paretoken.results import query

    table = query.trials_frame(study)
    presets = query.preset_names(table)
    if not presets:
        return None
    beaten = query.presets_dominated(table, objectives)
    left = [name for name in presets if name not in beaten]
    return (f"presets dominated by a searched plan: {len(beaten)} of {len(presets)}"
            + (f" (not: {', '.join(left)}; the same command with a larger --trials continues this study)"
               if left else "")
            + "; `paretoken holdout` re-measures the front on test images the search never saw")


def _stored_result(trial) -> dict[str, Any]:
    """A COMPLETE trial's metrics as a worker reports them (null, i.e. not measured, back to NaN)."""
    attrs = trial.user_attrs
    return {"metrics": {k: math.nan if attrs[k] is None else attrs[k] for k in METRICS if k in attrs},
            "device": attrs.get("device"), "duration_s": 0.0}


class _LoopState:
    """What the ask/tell loop of one search process knows: the trials it holds RUNNING (``in_flight``:
    handed to a worker, or waiting for another trial's measurement of the same plan), the plans its
    workers are measuring, and the front at the last progress line."""

    def __init__(self, study, space, depth, objectives, n_trials, budgets, config, log) -> None:
        self.study, self.space, self.depth, self.objectives = study, space, depth, objectives
        self.n_trials, self.budgets, self.config, self.log = n_trials, budgets, config, log
        self.in_flight: dict[int, Any] = {}
        self.measuring: dict[Plan, int] = {}  # plan as run -> number of the trial a worker measures it in
        self.waiting: dict[int, list[tuple[Any, dict[str, Any]]]] = {}  # that number -> (trial, plan) waiting for it
        self.runs: dict[int, Plan | None] = {}  # COMPLETE trial number -> its plan as run (see plan_as_run)
        self.stopping: str | None = None  # why the search stops once the results at hand are recorded
        self.ran = 0
        self.reference: dict[str, float] | None = None
        self.front: list[int] = []  # trial numbers on the front at the last progress line

    def launch(self, executor, liveness, beater) -> None:
        """Ask for one trial and :meth:`dispatch` its plan; a trial whose plan cannot be built fails here."""
        trial = self.study.ask()
        self.in_flight[trial.number] = trial
        beater.add(trial._trial_id)
        liveness.beat([trial._trial_id])
        try:
            plan = _resolve_plan(trial, self.space, self.depth).to_dict()
            trial.set_user_attr("plan", plan)
            trial.set_user_attr("space", self.space.name)
        except Exception as exc:  # noqa: BLE001 - a space or enqueued plan that cannot be built
            from paretoken.search.worker import one_line

            self.finish(trial, {"error": one_line(exc)}, beater)
            return
        self.dispatch(trial, plan, executor, beater)

    def dispatch(self, trial, plan: dict[str, Any], executor, beater) -> None:
        """Hand ``plan`` to a worker, unless it was measured: a trial whose plan a COMPLETE trial measured
        already takes that trial's values (``same_plan_as``); one whose plan a worker of this process is
        measuring now waits for it (:meth:`settle`)."""
        run = plan_as_run(plan, self.depth)
        earlier = self.measured_before(run)
        if earlier is not None:  # same model, images and plan: the same figures (samplers repeat on small grids)
            trial.set_user_attr("same_plan_as", earlier.number)
            self.finish(trial, _stored_result(earlier), beater)
            return
        if run in self.measuring:
            self.waiting.setdefault(self.measuring[run], []).append((trial, plan))
            return
        executor.submit(trial.number, plan, self.config)
        self.measuring[run] = trial.number

    def measured_before(self, run: Plan | None):
        """The first COMPLETE trial of the study that measured the plan ``run`` (as :func:`plan_as_run`
        gives it), or None."""
        from optuna.trial import TrialState

        if run is None:
            return None
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.number not in self.runs:
                self.runs[t.number] = plan_as_run(t.user_attrs.get("plan"), self.depth)
            if self.runs[t.number] == run:
                return t
        return None

    def settle(self, number: int, executor, beater) -> None:
        """After trial ``number``'s worker reported: the trials that waited for its plan take its values
        when it completed, else one of them is measured (and the others wait for that one). When the
        search stops, they stay in flight (:meth:`abandon` enqueues their plans again)."""
        self.measuring = {run: n for run, n in self.measuring.items() if n != number}
        if self.stopping:
            return
        for trial, plan in self.waiting.pop(number, []):
            self.dispatch(trial, plan, executor, beater)

    def finish(self, trial, result: dict[str, Any], beater) -> None:
        """Write the worker's result into the study and print the progress line (a ``setup_error``:
        :meth:`fail_setup`)."""
        import optuna
        from optuna.trial import TrialState

        if "setup_error" in result:
            self.fail_setup(trial, result, beater)
            return
        error = result.get("error")
        metrics = result.get("metrics") or {}
        try:
            self._store_run(trial, result)
            for key, value in metrics.items():  # NaN (not measured) is stored as null: valid JSON for dashboards
                trial.set_user_attr(key, json_ready(value))
            if error is None:
                bad = nan_objectives(metrics, self.objectives)
                if bad:
                    error = f"objective {', '.join(bad)} is not a finite number (NaN or missing)"
            if error is None:
                for name, excess in self.budgets.constraints(metrics).items():
                    trial.set_constraint(name, excess)
                told = self.study.tell(trial, [metrics[o] for o in self.objectives], skip_if_finished=True)
            else:
                trial.set_user_attr("error", error)
                told = self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            told = None
        self._release(trial, beater)
        if told is None or (error is None and told.state != TrialState.COMPLETE):  # failed by a stale-trial sweep
            self.log(f"trial {trial.number}: already failed as stale (its heartbeat stopped) and its plan enqueued "
                     "again; result dropped")
            return
        self.ran += 1
        self.progress(trial, metrics, error, result)

    def fail_setup(self, trial, result: dict[str, Any], beater) -> None:
        """A worker could not prepare what every trial shares (``setup_error``): record the trial FAIL
        with that error but interrupted (not counted, its plan enqueued again), and stop the search
        once the other results at hand are recorded (``stopping``; :func:`_loop` raises it)."""
        import optuna
        from optuna.trial import TrialState

        storage = self.study._storage
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # failed as stale: enqueued again
            self._store_run(trial, result)
            trial.set_user_attr("setup_error", result["setup_error"])
            if storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                st.requeue(self.study, storage.get_trial(trial._trial_id))
        self._release(trial, beater)
        self.stopping = self.stopping or (
            f"{result['setup_error']} (trial {trial.number}, on {result.get('hostname', '?')}); every trial needs "
            "this, so the search stopped: fix it and run the same command again to go on (the trial's plan runs "
            "again)")

    @staticmethod
    def _store_run(trial, result: dict[str, Any]) -> None:
        """Where and how long the worker ran the trial, as user attributes."""
        for key in ("worker_pid", "hostname", "device", "threads", "versions", "duration_s"):
            if key in result:
                trial.set_user_attr(key, result[key])

    def _release(self, trial, beater) -> None:
        """The trial is finished (by this process or a sweep): no more heartbeats, not in flight."""
        beater.discard(trial._trial_id)
        self.in_flight.pop(trial.number, None)

    def progress(self, trial, metrics, error, result) -> None:
        c = st.counts(self.study)
        if self.reference is None:
            self.reference = st.reference_point(st.baseline(self.study), self.objectives)
        front = st.front_trials(self.study)
        hv = st.hypervolume(front, self.objectives, self.reference)
        preset = trial.user_attrs.get("preset")
        what = ("FAIL  " + error) if error else "COMPLETE " + "  ".join(
            f"{o} {format_metric(o, metrics.get(o))}" for o in self.objectives)
        extra = f" [{preset}]" if preset else ""
        if trial.user_attrs.get("same_plan_as") is not None:
            extra += f" [same plan as trial {trial.user_attrs['same_plan_as']}: its values, not measured again]"
        if trial.user_attrs.get("retry_of") is not None:
            extra += f" [re-run of trial {trial.user_attrs['retry_of']}]"
        self.log(f"trial {trial.number:4d} {what}{extra} ({_fmt(result.get('duration_s'))} s, "
                 f"pid {result.get('worker_pid', '?')}) | done {c.finished}/{self.n_trials}, failed {c.failed}, "
                 f"front {len(front)}, hypervolume {_fmt(hv)}")
        front = sorted(front, key=lambda t: t.values[-1])
        if [t.number for t in front] != self.front:
            self.front = [t.number for t in front]
            self.log(f"  front now ({'/'.join(self.objectives)}): " + ", ".join(
                f"#{t.number}" + (f" {t.user_attrs['preset']}" if t.user_attrs.get("preset") else "") + " "
                + "/".join(format_metric(o, v) for o, v in zip(self.objectives, t.values)) for t in front))

    def abandon(self) -> None:
        """On Ctrl-C or an error that stops the search: fail this process's running trials at once and
        enqueue their plans again (what a resumed search would do once their heartbeats went stale)."""
        import optuna
        from optuna.trial import TrialState

        for trial in list(self.in_flight.values()):
            try:
                if self.study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                    st.requeue(self.study, self.study._storage.get_trial(trial._trial_id))
            except (optuna.exceptions.UpdateFinishedTrialError, KeyError):
                pass
        self.in_flight.clear()


def _loop(state: _LoopState, executor, liveness: st.Liveness, beater: _Beater, poll_s: float,
          ctrl_c: _CtrlC) -> None:
    last_sweep = -math.inf
    while True:
        ctrl_c.check()  # every result received so far has been told
        if time.monotonic() - last_sweep >= liveness.interval:
            liveness.sweep()
            last_sweep = time.monotonic()
        if executor.free():  # (counting reads every trial: only when a worker could take one)
            c = st.counts(state.study)
            launched = c.finished + c.running
            while executor.free() and launched < state.n_trials:
                state.launch(executor, liveness, beater)
                launched += 1
        if not executor.busy():
            if st.counts(state.study).finished >= state.n_trials:
                return
            time.sleep(poll_s)  # the rest of the target is running in other processes (or is stale)
            continue
        for number, result in executor.wait(poll_s):
            trial = state.in_flight.get(number)
            if trial is not None:
                state.finish(trial, result, beater)
            state.settle(number, executor, beater)
        if state.stopping:
            raise ParetokenError(state.stopping)
