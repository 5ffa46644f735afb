"""The lifecycle of the trials one search process runs: heartbeats while they run (:class:`Beater`,
:class:`Liveness`), the sweep that fails and re-runs trials whose process died (stale trials,
:func:`requeue`, :func:`stale_callback`), and Ctrl-C raised only where it is safe (:class:`CtrlC`).
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
import warnings
from datetime import datetime
from typing import Callable, Iterable, Iterator

import optuna

from paretoken.search import record


class CtrlC:
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


class Beater(threading.Thread):
    """Records a heartbeat for this process's running trials every ``interval`` seconds."""

    def __init__(self, liveness: Liveness) -> None:
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


def requeue(study, trial) -> bool:
    """Run an interrupted trial's plan again: enqueue its parameters (and fixed plan) as a new trial.

    Trials that failed with an ``error`` of their own are not re-run.
    """
    if record.ERROR in trial.user_attrs:
        return False
    attrs = record.retry_attrs(trial.number, trial.user_attrs)
    ran = trial.user_attrs.get(record.PLAN)  # set before the trial was handed to a worker
    if record.ENQUEUED_PLAN not in attrs and isinstance(ran, dict) and (
            bool(ran.get("prefix_only_last")) != record.runs_prefix_only(attrs)):
        attrs[record.ENQUEUED_PLAN] = ran  # its params would not make it: a study from before runs_prefix_only
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
                storage.set_trial_system_attr(trial_id, record.HEARTBEAT, time.time())
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
            seen = [trial.system_attrs.get(record.HEARTBEAT)]
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
