"""The ask/tell driver of a search: the only writer of the study. It asks Optuna for trials, turns
each into a plan (:func:`resolve_plan`), hands it to an executor (:mod:`paretoken.search.executors`),
and tells Optuna the worker's result, written as the study record says (:mod:`paretoken.search.record`).

A trial whose plan a COMPLETE trial measured already takes that trial's values (``same_plan_as``);
one whose plan a worker is measuring waits for it. A trial that raises is recorded FAIL with its
``error`` and the search goes on; a worker that cannot set up (``setup_error``) stops the search once
the results at hand are recorded, its trial's plan enqueued again.

With successive halving (``rungs``) a trial is measured rung by rung on the new images of each
(:mod:`paretoken.search.halving`): after each rung it is promoted, or told COMPLETE with that rung's
values and user attr ``images`` below the study's, so the samplers learn from it as a low-fidelity point.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Callable

import numpy as np

from paretoken.compress.plan import Plan, plan_as_run
from paretoken.errors import ParetokenError
from paretoken.evaluators.metrics import Budgets
from paretoken.jsonvalues import json_ready
from paretoken.search import halving, pareto, record
from paretoken.search import study as st
from paretoken.search.executors import Executor
from paretoken.search.lifecycle import Beater, CtrlC, Liveness, requeue
from paretoken.search.report import Progress
from paretoken.search.worker import nan_objectives, one_line


def resolve_plan(trial, space, depth: int) -> Plan:
    """The plan ``trial`` runs: its ``enqueued_plan``; else its space's plan, as published for a preset,
    otherwise prefix-only and without a last-block stage (moot then: the plan stored is the plan run)."""
    fixed = trial.user_attrs.get(record.ENQUEUED_PLAN)
    if fixed is not None:
        return Plan.from_dict(fixed)
    plan = space.sample(trial, depth)
    if not record.runs_prefix_only(trial.user_attrs):
        return plan
    short = dataclasses.replace(plan, prefix_only_last=True)
    return dataclasses.replace(short, stages=short.stages_run(depth))


def _stored_result(trial) -> dict[str, Any]:
    """A COMPLETE trial's metrics as a worker reports them (null, i.e. not measured, back to NaN)."""
    result = {"metrics": record.stored_metrics(trial.user_attrs), record.DEVICE: trial.user_attrs.get(record.DEVICE),
              record.DURATION_S: 0.0}
    if record.IMAGES in trial.user_attrs:  # measured on that many images (successive halving)
        result[record.IMAGES] = trial.user_attrs[record.IMAGES]
    return result


class LoopState:
    """What the ask/tell loop of one search process knows: the trials it holds RUNNING (``in_flight``:
    handed to a worker, or waiting for another trial's measurement of the same plan), the plans its
    workers are measuring, and what it printed (:class:`~paretoken.search.report.Progress`).

    ``space``: a space of :mod:`paretoken.spaces`; ``depth``: blocks of the model; ``config``: the
    EvalConfig as the dict a worker receives; ``log``: receives the lines; ``rungs``, ``eta`` and ``promotion``:
    the successive-halving schedule (images per rung), its keep fraction 1/eta and its promotion rule
    (:data:`~paretoken.search.halving.PROMOTIONS`), None without it."""

    def __init__(self, study, space, depth: int, objectives: tuple[str, ...], n_trials: int, budgets: Budgets,
                 config: dict[str, Any], log: Callable[[str], None], rungs: tuple[int, ...] | None = None,
                 eta: int | None = None, promotion: str | None = None) -> None:
        self.study, self.space, self.depth, self.objectives = study, space, depth, objectives
        self.n_trials, self.budgets, self.config, self.log = n_trials, budgets, config, log
        self.rungs, self.eta, self.promotion = rungs, eta, promotion
        self.plans: dict[int, dict[str, Any]] = {}  # halving: trial number -> its plan, for its next rungs
        self.entries: dict[int, list[dict[str, Any]]] = {}  # halving: trial number -> the rungs it finished
        self.last: dict[int, dict[str, Any]] = {}  # halving: trial number -> its worker's last result
        self.in_flight: dict[int, Any] = {}
        self.measuring: dict[Plan, int] = {}  # plan as run -> number of the trial a worker measures it in
        self.waiting: dict[int, list[tuple[Any, dict[str, Any]]]] = {}  # that number -> (trial, plan) waiting for it
        self.runs: dict[int, Plan | None] = {}  # COMPLETE trial number -> its plan as run (see plan_as_run)
        self.stopping: str | None = None  # why the search stops once the results at hand are recorded
        self.ran = 0
        self.progress = Progress(study, objectives, n_trials, log, rungs)

    def launch(self, executor: Executor, liveness: Liveness, beater: Beater) -> None:
        """Ask for one trial and :meth:`dispatch` its plan; a trial whose plan cannot be built fails here."""
        trial = self.study.ask()
        self.in_flight[trial.number] = trial
        beater.add(trial._trial_id)
        liveness.beat([trial._trial_id])
        try:
            plan = resolve_plan(trial, self.space, self.depth).to_dict()
            trial.set_user_attr(record.PLAN, plan)
            trial.set_user_attr(record.SPACE, self.space.name)
        except Exception as exc:  # noqa: BLE001 - a space or enqueued plan that cannot be built
            self.finish(trial, {record.ERROR: one_line(exc)}, beater)
            return
        self.dispatch(trial, plan, executor, beater)

    def dispatch(self, trial, plan: dict[str, Any], executor: Executor, beater: Beater) -> None:
        """Hand ``plan`` to a worker, unless it was measured: a trial whose plan a COMPLETE trial measured
        already takes that trial's values (``same_plan_as``); one whose plan a worker of this process is
        measuring now waits for it (:meth:`settle`)."""
        run = plan_as_run(plan, self.depth)
        earlier = self.measured_before(run)
        if earlier is not None:  # same model, images and plan: the same figures (samplers repeat on small grids)
            trial.set_user_attr(record.SAME_PLAN_AS, earlier.number)
            self.finish(trial, _stored_result(earlier), beater)
            return
        if run in self.measuring:
            self.waiting.setdefault(self.measuring[run], []).append((trial, plan))
            return
        self.measuring[run] = trial.number
        if self.rungs is None:
            executor.submit(trial.number, plan, self.config)
            return
        self.plans[trial.number] = plan
        self.entries[trial.number] = list(trial.user_attrs.get(record.RUNGS) or [])  # a retry's finished rungs
        if self.entries[trial.number]:
            self.advance(trial, executor, beater)
        else:
            executor.submit(trial.number, plan, halving.slice_config(self.config, self.rungs, 0))

    def receive(self, number: int, result: dict[str, Any], executor: Executor, beater: Beater) -> None:
        """A worker's result for trial ``number``: told (:meth:`finish`), or with successive halving its
        rung recorded on the trial (``rungs``, ``images``) and the trial promoted or told (:meth:`advance`)."""
        import optuna

        trial = self.in_flight.get(number)
        if trial is not None and self.rungs is not None and "metrics" in result:
            entries = self.entries[number]
            seen = entries[-1]["images"] if entries else 0
            images = self.rungs[len(entries)]
            metrics = halving.combine(record.stored_metrics(entries[-1]["metrics"]) if entries else None, seen,
                                      result["metrics"], images - seen)
            entry = {"images": images, "metrics": json_ready(metrics),
                     record.DURATION_S: result.get(record.DURATION_S) or 0.0}
            result = {**result, "metrics": metrics, record.IMAGES: images,
                      record.DURATION_S: sum(e[record.DURATION_S] or 0.0 for e in [*entries, entry])}
            if not nan_objectives(metrics, self.objectives):  # else told FAIL below
                try:
                    trial.set_user_attr(record.RUNGS, [*entries, entry])
                    trial.set_user_attr(record.IMAGES, images)
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass  # failed as stale meanwhile: finish() says so
                else:
                    entries.append(entry)
                    self.last[number] = result
                    self.advance(trial, executor, beater)
                    return
        if trial is not None:
            self.finish(trial, result, beater)
        self.settle(number, executor, beater)

    def advance(self, trial, executor: Executor, beater: Beater) -> None:
        """After a trial's latest rung: hand the next rung's new images to a worker when the trial is
        promoted (a preset, the uncompressed model included, always is: they are the front's yardsticks
        and the hypervolume's reference), else tell it COMPLETE with the rung's values."""
        number, entries, rungs = trial.number, self.entries[trial.number], self.rungs
        k, images = len(entries) - 1, entries[-1]["images"]
        metrics = record.stored_metrics(entries[-1]["metrics"])
        if k + 1 < len(rungs):
            if trial.user_attrs.get(record.PRESET):
                why = "a preset: measured on every rung"
            else:
                others = [m for n, m in halving.rung_trials(self.study.get_trials(deepcopy=False), images)
                          if n != number]
                rows = [metrics, *others]
                losses = pareto.as_losses([[m.get(o, math.nan) for o in self.objectives] for m in rows],
                                          self.objectives)
                penalty = np.array([halving.penalty(m, self.budgets) for m in rows])
                why = (f"ranked among {len(rows)} plans on {images}"
                       if halving.promoted(losses, penalty, 0, self.eta, self.promotion) else None)
            if why is not None:
                self.log(f"trial {number:4d} promoted to {rungs[k + 1]} of {rungs[-1]} images ({why})")
                executor.submit(number, self.plans[number], halving.slice_config(self.config, rungs, k + 1))
                return
        total = sum(e.get(record.DURATION_S) or 0.0 for e in entries)
        self.finish(trial, {**self.last.get(number, {}), "metrics": metrics, record.IMAGES: images,
                            record.DURATION_S: total}, beater)
        self.settle(number, executor, beater)

    def measured_before(self, run: Plan | None):
        """The first COMPLETE trial of the study that measured the plan ``run`` (as :func:`plan_as_run`
        gives it), or None."""
        from optuna.trial import TrialState

        if run is None:
            return None
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.number not in self.runs:
                self.runs[t.number] = plan_as_run(t.user_attrs.get(record.PLAN), self.depth)
            if self.runs[t.number] == run:
                return t
        return None

    def settle(self, number: int, executor: Executor, beater: Beater) -> None:
        """After trial ``number``'s worker reported: the trials that waited for its plan take its values
        when it completed, else one of them is measured (and the others wait for that one). When the
        search stops, they stay in flight (:meth:`abandon` enqueues their plans again)."""
        self.measuring = {run: n for run, n in self.measuring.items() if n != number}
        if self.stopping:
            return
        for trial, plan in self.waiting.pop(number, []):
            self.dispatch(trial, plan, executor, beater)

    def finish(self, trial, result: dict[str, Any], beater: Beater) -> None:
        """Write the worker's result into the study and print the progress line (a ``setup_error``:
        :meth:`fail_setup`)."""
        import optuna
        from optuna.trial import TrialState

        if record.SETUP_ERROR in result:
            self.fail_setup(trial, result, beater)
            return
        error = result.get(record.ERROR)
        metrics = result.get("metrics") or {}
        try:
            record.write_run(trial, result)
            record.write_metrics(trial, metrics)
            if record.IMAGES in result:
                trial.set_user_attr(record.IMAGES, result[record.IMAGES])
            if error is None:
                bad = nan_objectives(metrics, self.objectives)
                if bad:
                    error = f"objective {', '.join(bad)} is not a finite number (NaN or missing)"
            if error is None:
                for name, excess in self.budgets.constraints(metrics).items():
                    trial.set_constraint(name, excess)
                told = self.study.tell(trial, [metrics[o] for o in self.objectives], skip_if_finished=True)
            else:
                trial.set_user_attr(record.ERROR, error)
                told = self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            told = None
        self._release(trial, beater)
        if told is None or (error is None and told.state != TrialState.COMPLETE):  # failed by a stale-trial sweep
            self.log(f"trial {trial.number}: already failed as stale (its heartbeat stopped) and its plan enqueued "
                     "again; result dropped")
            return
        self.ran += 1
        self.progress.trial_finished(trial, metrics, error, result)

    def fail_setup(self, trial, result: dict[str, Any], beater: Beater) -> None:
        """A worker could not prepare what every trial shares (``setup_error``): record the trial FAIL
        with that error but interrupted (not counted, its plan enqueued again), and stop the search
        once the other results at hand are recorded (``stopping``; :func:`drive` raises it)."""
        import optuna
        from optuna.trial import TrialState

        storage = self.study._storage
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # failed as stale: enqueued again
            record.write_run(trial, result)
            trial.set_user_attr(record.SETUP_ERROR, result[record.SETUP_ERROR])
            if storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                requeue(self.study, storage.get_trial(trial._trial_id))
        self._release(trial, beater)
        self.stopping = self.stopping or (
            f"{result[record.SETUP_ERROR]} (trial {trial.number}, on {result.get(record.HOSTNAME, '?')}); every trial "
            "needs this, so the search stopped: fix it and run the same command again to go on (the trial's plan "
            "runs again)")

    def _release(self, trial, beater: Beater) -> None:
        """The trial is finished (by this process or a sweep): no more heartbeats, not in flight."""
        beater.discard(trial._trial_id)
        self.in_flight.pop(trial.number, None)
        for held in (self.plans, self.entries, self.last):
            held.pop(trial.number, None)

    def abandon(self) -> None:
        """On Ctrl-C or an error that stops the search: fail this process's running trials at once and
        enqueue their plans again (what a resumed search would do once their heartbeats went stale)."""
        import optuna
        from optuna.trial import TrialState

        for trial in list(self.in_flight.values()):
            try:
                if self.study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                    requeue(self.study, self.study._storage.get_trial(trial._trial_id))
            except (optuna.exceptions.UpdateFinishedTrialError, KeyError):
                pass
        self.in_flight.clear()


def drive(state: LoopState, executor: Executor, liveness: Liveness, beater: Beater, poll_s: float,
          ctrl_c: CtrlC) -> None:
    """Launch trials while a worker is free and the study's target is not reached, tell each result,
    sweep stale trials every heartbeat interval; returns once the study holds ``n_trials`` finished
    trials (ones running elsewhere included), raises what stops the search. ``poll_s``: seconds
    between looks at the executor."""
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
            state.receive(number, result, executor, beater)
        if state.stopping:
            raise ParetokenError(state.stopping)
