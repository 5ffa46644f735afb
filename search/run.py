"""run_search, the public entry of a search: an Optuna multi-objective study driven by an ask/tell loop,
trials evaluated in process (``local``) or as Ray Tune trials on Ray workers (``ray``).

This module only wires the parts together: checked options (:mod:`~paretoken.search.options`), the
storage and the executor, the study opened or resumed (:mod:`~paretoken.search.opening`), heartbeats
and Ctrl-C (:mod:`~paretoken.search.lifecycle`), the driver (:mod:`~paretoken.search.driver`) and the
report (:mod:`~paretoken.search.report`). The driver is the only process that writes the study, so
the storage holds every trial of every backend in the same form, and a search is resumed by running
the same command again:

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
import warnings
from typing import Any, Callable, Sequence

from paretoken.evaluators.metrics import Budgets
from paretoken.search import study as st
from paretoken.search.driver import LoopState, drive
from paretoken.search.executors import make_executor
from paretoken.search.lifecycle import Beater, CtrlC, Liveness, stale_callback
from paretoken.search.opening import check_existing, open_study
from paretoken.search.options import SearchOptions, check_options
from paretoken.search.report import SearchResult, final_report
from paretoken.search.storage import open_storage, storage_file


def run_search(study: str, *, storage: str | None = None, space: str = "mixed",
               objectives: Sequence[str] | str = st.DEFAULT_OBJECTIVES, sampler: str = "tpe", n_trials: int = 40,
               backend: str = "local", workers: int = 1, ray_address: str | None = None,
               cpus_per_trial: float | None = None, gpus_per_trial: float | None = None,
               budgets: Budgets | None = None, eval_config=None, seed: int = 0, presets: bool = True,
               heartbeat_s: int = 10, grace_s: int | None = None, poll_s: float = 1.0,
               ops: Sequence[str] | str | None = None, min_images: int | None = None, eta: int | None = None,
               promotion: str | None = None,
               log: Callable[[str], None] | None = None) -> SearchResult:
    """Run (or resume) study ``study`` until it holds ``n_trials`` finished trials.

    study / storage: the Optuna study's name and its storage URL (default ``sqlite:///studies/<study>.db``;
      ``journal:PATH``; ``postgresql://...``).
    space: a name of :data:`paretoken.spaces.SPACES` (or a Space).
    ops: mixed only: the ops its overriding blocks choose among (default: every op registered for
      mixed); recorded with the study, which must be resumed with the same ops.
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
    heartbeat_s / grace_s: heartbeat interval of running trials (s); a RUNNING trial silent for
      ``grace_s`` (default 3 heartbeats) is failed and its plan re-run.
    poll_s: seconds between the driver's looks at its workers.
    min_images / eta / promotion: successive halving: each plan is measured first on the first
      ``min_images`` of the ``eval_config.images`` images and promoted rung by rung (``min_images`` times
      the powers of ``eta`` (default 4), then all images) while it ranks in the top 1/eta of its rung,
      by the rule ``promotion`` names (:data:`~paretoken.search.halving.PROMOTIONS`, default ``front``:
      the non-dominated go on too); a plan stopped below the full rung is COMPLETE with that rung's
      values and user attr ``images``, and counts towards ``n_trials``. Recorded with the study.
    log: receives the progress lines (default: print).

    Bad input is one :class:`~paretoken.errors.ParetokenError` line, raised before the study is touched.
    """
    import optuna

    log = log or (lambda line: print(line, flush=True))
    options = check_options(study, storage=storage, space=space, objectives=objectives, sampler=sampler,
                            n_trials=n_trials, backend=backend, workers=workers, ray_address=ray_address,
                            cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, budgets=budgets,
                            eval_config=eval_config, seed=seed, presets=presets, heartbeat_s=heartbeat_s,
                            grace_s=grace_s, poll_s=poll_s, ops=ops, min_images=min_images, eta=eta,
                            promotion=promotion)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        _quiet_warnings()
        return _run(options, log)


def _run(options: SearchOptions, log: Callable[[str], None]) -> SearchResult:
    def storage() -> Any:
        return open_storage(options.storage, heartbeat_interval=options.heartbeat_s, grace_period=options.grace_s,
                            stale_callback=stale_callback(log))

    sampler = st.make_sampler(options.sampler, options.seed, options.objectives)
    ctrl_c = CtrlC()
    path = storage_file(options.storage)
    new_file = path is not None and not path.exists()
    storage_obj = None if new_file else storage()  # a file is made once the cluster has been joined
    if storage_obj is not None:
        check_existing(options.study, storage_obj, options.settings)  # before Ray's start-up (tens of seconds)
    # the cluster is joined before the study is touched: an unreachable one writes nothing to it
    executor = make_executor(options, ctrl_c, log)
    try:
        storage_obj = storage() if storage_obj is None else storage_obj
        study = open_study(options, storage_obj, sampler, log)
        liveness = Liveness(study, options.heartbeat_s, options.grace_s, log)
        beater = Beater(liveness)
        beater.start()
        state = LoopState(study, options.space, options.depth, options.objectives, options.n_trials,
                          options.budgets, options.config_dict, log, options.rungs, options.eta,
                          options.promotion)
        with ctrl_c.installed():
            try:
                drive(state, executor, liveness, beater, options.poll_s, ctrl_c)
            except BaseException:  # Ctrl-C, or an error that stops the search (Ray Tune gone, storage lost)
                with contextlib.suppress(Exception):  # what stopped the search is the error to show
                    state.abandon()
                raise
            finally:
                beater.stop()
    finally:
        executor.close()
    return final_report(study, options.storage, options.objectives, state.ran, log)


def _quiet_warnings() -> None:
    import optuna

    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")
    warnings.filterwarnings("ignore", module="fvcore")
