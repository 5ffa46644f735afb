"""The ``ray`` backend: Ray Tune runs each trial on a worker that declares its resources.

The search's ask/tell driver (:mod:`paretoken.search.run`) stays the only writer of the Optuna
study; Ray Tune does the scheduling. ``Tuner.fit`` runs in a background thread of the driver with
:class:`PlanFeed` as its search algorithm: the feed hands Tune each plan the driver submits, Tune
starts it as a function trainable in a Ray worker process holding ``cpus``/``gpus`` (at most
``workers`` at once), and the feed hands the trial's result back. Tune reuses the worker actors
between trials, so each keeps the evaluator's cached model and baseline logits. Tune's own
experiment files go to a temporary folder that is removed at the end: the study is the record.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import queue
import shutil
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ray.tune.search import Searcher

from paretoken.errors import ParetokenError
from paretoken.search.worker import run_trial

#: Tune pickles its search algorithm (into its experiment state); the feeds' queues stay here, by token.
_CHANNELS: dict[int, "_Channel"] = {}
_TOKENS = itertools.count()
IDLE_WAIT_S = 5.0  # longest a suggest() waits for the driver's next plan while no trial runs
WORKER_DIED = ("worker died: the Ray worker process ended before the trial reported "
               "(killed, out of memory or crashed)")


@dataclass
class _Channel:
    todo: queue.Queue = field(default_factory=queue.Queue)  # (key, trial config) from the driver
    done: queue.Queue = field(default_factory=queue.Queue)  # (key, result) to the driver
    closing: threading.Event = field(default_factory=threading.Event)
    keys: dict[str, int] = field(default_factory=dict)  # Tune trial id -> the driver's key


class PlanFeed(Searcher):
    """A Tune search algorithm that proposes nothing of its own: it passes on the trials the driver
    submits and returns their results. Until the driver closes it, an empty feed asks Tune to wait."""

    def __init__(self) -> None:
        super().__init__()
        self.token = next(_TOKENS)
        _CHANNELS[self.token] = _Channel()

    @property
    def channel(self) -> _Channel:
        return _CHANNELS[self.token]

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        channel = self.channel
        try:
            # With no trial of ours running, Tune's loop has nothing else to do and would poll an
            # empty feed once a second: wait here instead, so the driver's next plan starts at once.
            key, config = channel.todo.get(timeout=IDLE_WAIT_S if not channel.keys else 0)
        except queue.Empty:
            return Searcher.FINISHED if channel.closing.is_set() else None
        if key is None:  # close()'s wake-up
            return Searcher.FINISHED
        channel.keys[trial_id] = key
        return config

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        channel = self.channel
        key = channel.keys.pop(trial_id, None)
        if key is None:
            return
        report = (result or {}).get("paretoken")
        channel.done.put((key, json.loads(report) if report and not error else
                          {"error": WORKER_DIED, "duration_s": math.nan}))

    def release(self) -> None:
        _CHANNELS.pop(self.token, None)


def tune_trial(config: dict[str, Any]) -> None:
    """The Tune function trainable: one paretoken trial (:func:`~paretoken.search.worker.run_trial`),
    reported once, as JSON (Tune flattens nested results)."""
    import torch
    from ray import tune

    torch.set_num_threads(config["threads"])
    tune.report({"paretoken": json.dumps(run_trial(config["plan"], config["eval"]))})


def quiet_ray_env() -> None:
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's older reporter, which verbose=0 silences


def _unreachable(address: str, timeout_s: float = 5.0) -> str | None:
    """Why nothing answers at a ``host:port`` (or ``ray://host:port``) address; None when something
    does or the address has another form ("auto"). ``ray.init`` itself retries for minutes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    return None


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Send this process's file descriptor 2 to /dev/null: Ray's C++ core logs each failed attempt
    to join a cluster there (a line a second, for about 20 s); the caller reports the failure once."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as sink:
        os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during, innermost last."""
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


class TuneExecutor:
    """Trials on Ray Tune: ``workers`` at once, each declaring ``cpus`` CPUs and ``gpus`` GPUs, on a
    local Ray it starts or the cluster at ``address``. The executor interface of the search loop:
    :meth:`free`, :meth:`submit`, :meth:`busy`, :meth:`wait`, :meth:`close`.

    ``trainable`` runs a trial's config ({"plan", "eval", "threads"}) and reports
    ``{"paretoken": JSON of the result}`` (default :func:`tune_trial`).
    """

    def __init__(self, workers: int, cpus: float, gpus: float, address: str | None,
                 log: Callable[[str], None], trainable: Callable[[dict[str, Any]], None] = tune_trial) -> None:
        quiet_ray_env()
        import ray
        from ray import tune

        self.ray, self.workers, self.pending = ray, workers, 0
        self.started = self._connect(ray, workers, cpus, gpus, address)
        have = ray.cluster_resources()
        if cpus > have.get("CPU", 0) or gpus > have.get("GPU", 0):
            self._shutdown()
            raise ParetokenError(
                f"ray: a trial with {cpus:g} CPU and {gpus:g} GPU does not fit in the cluster's "
                f"{have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU; lower --cpus-per-trial or "
                "--gpus-per-trial")
        self.tune_logger = logging.getLogger("ray.tune")
        self.tune_level = self.tune_logger.level
        self.tune_logger.setLevel(logging.CRITICAL)  # a dead worker is the trial's one-line error, not a traceback
        self.feed = PlanFeed()
        self.threads = max(1, int(cpus))
        self.folder = tempfile.mkdtemp(prefix="paretoken-tune-")
        self.tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": cpus, "gpu": gpus}),
            tune_config=tune.TuneConfig(search_alg=self.feed, num_samples=-1, max_concurrent_trials=workers,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name="paretoken", storage_path=self.folder, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)))
        self.crash: BaseException | None = None
        self.thread = threading.Thread(target=self._fit, name="paretoken-ray-tune", daemon=True)
        self.thread.start()
        at_once = min(workers, int(have.get("CPU", 0) // cpus),  # cpus > 0: run_search checks it
                      int(have.get("GPU", 0) // gpus) if gpus else workers)
        log(f"ray: {workers} workers (Ray Tune trials), {cpus:g} CPU + {gpus:g} GPU per trial, cluster "
            f"{have.get('CPU', 0):g} CPU / {have.get('GPU', 0):g} GPU"
            + ("" if at_once >= workers else f"; only {at_once} trials fit at once"))

    @staticmethod
    def _connect(ray, workers: int, cpus: float, gpus: float, address: str | None) -> bool:
        """Start a local Ray (True) or join the cluster at ``address``; False when Ray is already up."""
        if ray.is_initialized():
            return False
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR,
                                  "log_to_driver": False, "configure_logging": True}
        unreachable = _unreachable(address) if address else None
        if unreachable:
            raise ParetokenError(
                f"ray: cannot connect to the Ray cluster at {address!r}: nothing answers there ({unreachable}); "
                "valid: host:port of a running head node (port 6379 unless `ray start --head --port` chose "
                "another), 'auto' on a node of the cluster, or no --ray-address for a local Ray")
        try:
            if address:
                with _stderr_silenced():
                    ray.init(address=address, **kwargs)
            else:
                num_gpus = 0
                if gpus > 0:
                    import torch

                    num_gpus = torch.cuda.device_count()
                # address="local": always a fresh local Ray, never a cluster left in /tmp/ray by `ray start`
                ray.init(address="local", num_cpus=max(1, math.ceil(workers * cpus)), num_gpus=num_gpus, **kwargs)
        except Exception as exc:  # noqa: BLE001 - unreachable cluster, bad address
            where = f"connect to the Ray cluster at {address!r}" if address else "start a local Ray"
            hint = ("; the cluster uses token authentication: set RAY_AUTH_MODE=token here, with its token in "
                    "RAY_AUTH_TOKEN or ~/.ray/auth_token (Ray does this by itself only for --ray-address auto)"
                    if any("AuthenticationError" in f"{type(e).__name__}: {e}" for e in _chain(exc)) else "")
            raise ParetokenError(f"ray: cannot {where} ({' '.join(str(exc).split())[:200]}){hint}") from None
        return True

    def _fit(self) -> None:
        try:
            self.tuner.fit()
        except BaseException as exc:  # noqa: BLE001 - reported to the driver by wait()
            self.crash = exc

    def free(self) -> bool:
        return self.pending < self.workers

    def submit(self, key: int, plan: dict[str, Any], config: dict[str, Any]) -> None:
        self.pending += 1
        self.feed.channel.todo.put((key, {"plan": plan, "eval": config, "threads": self.threads}))

    def busy(self) -> bool:
        return self.pending > 0

    def wait(self, timeout: float) -> list[tuple[int, dict[str, Any]]]:
        done = self.feed.channel.done
        try:
            results = [done.get(timeout=timeout)]
        except queue.Empty:
            results = []
        while not done.empty():
            results.append(done.get_nowait())
        if not results and not self.thread.is_alive():
            raise ParetokenError(f"ray: Ray Tune stopped with {self.pending} trials running"
                                 + (f" ({' '.join(str(self.crash).split())[:200]})" if self.crash else ""))
        self.pending -= len(results)
        return results

    def close(self) -> None:
        """Let Tune finish; with trials still running (Ctrl-C, an error), a Ray this executor
        started is shut down under them."""
        self.feed.channel.closing.set()
        self.feed.channel.todo.put((None, None))
        if not self.pending:
            self.thread.join(timeout=60)
        self._shutdown()
        self.feed.release()
        self.tune_logger.setLevel(self.tune_level)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _shutdown(self) -> None:
        if self.started:
            self.ray.shutdown()
