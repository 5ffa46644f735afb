"""Where a search's trials run: the :class:`Executor` protocol the ask/tell driver talks to, the
in-process :class:`LocalExecutor`, and :func:`make_executor`, which picks it or the Ray Tune
executor (:class:`paretoken.search.ray_tune.TuneExecutor`) for the options' backend.

An executor receives plans keyed by the driver's trial number and hands back each key with its
worker's result (:func:`paretoken.search.worker.run_trial`'s dict); it never touches the study.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from paretoken.search.lifecycle import CtrlC
from paretoken.search.options import SearchOptions
from paretoken.search.worker import run_trial


class Executor(Protocol):
    """What the driver needs of a backend."""

    def free(self) -> bool:
        """Whether a worker could take one more trial now."""

    def submit(self, key: int, plan: dict[str, Any], config: dict[str, Any]) -> None:
        """Run ``plan`` (dict form) under ``config`` (EvalConfig as a dict) as trial ``key``."""

    def busy(self) -> bool:
        """Whether a submitted trial has not been handed back yet."""

    def wait(self, timeout: float) -> list[tuple[int, dict[str, Any]]]:
        """The (key, result) pairs finished since the last call, waiting up to ``timeout`` s for one."""

    def close(self) -> None:
        """Release the workers (also with trials still running: Ctrl-C, an error)."""


class LocalExecutor:
    """Runs one trial at a time in this process (the evaluator caches the model between trials).

    Ctrl-C lands at once while a trial computes (``ctrl_c.at_once``): its code holds no storage lock.
    """

    def __init__(self, ctrl_c: CtrlC) -> None:
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


def make_executor(options: SearchOptions, ctrl_c: CtrlC, log: Callable[[str], None]) -> Executor:
    """The options' backend: ``local``, or ``ray`` (joins or starts the cluster: it may raise, before
    the study is touched)."""
    if options.backend == "ray":
        from paretoken.search.ray_tune import TuneExecutor

        return TuneExecutor(options.workers, options.cpus, options.gpus, options.ray_address, log)
    return LocalExecutor(ctrl_c)
