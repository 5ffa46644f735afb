"""The Ray Tune executor on a real local Ray: trials run as Tune trials in worker processes, and a
worker that dies mid-trial becomes that trial's error while the others finish."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from ray.tune.search import Searcher  # noqa: E402

from paretoken.search.ray_tune import WORKER_DIED, PlanFeed, TuneExecutor  # noqa: E402


def echo_or_die(config: dict) -> None:
    """A trainable standing in for the evaluator: reports its plan back, or kills its own process."""
    from ray import tune

    if config["plan"]["die"]:
        os.kill(os.getpid(), signal.SIGKILL)
    tune.report({"paretoken": json.dumps({"worker_pid": os.getpid(), "metrics": {"x": config["plan"]["x"]},
                                          "threads": config["threads"]})})


def test_an_idle_feed_waits_for_the_next_plan_and_finishes_when_closed():
    """With none of its trials running, suggest() waits for the driver's next plan (Tune would
    otherwise poll it once a second) and a close wakes it up; with one running it never waits."""
    feed = PlanFeed()
    try:
        channel = feed.channel
        threading.Timer(0.2, channel.todo.put, args=((7, {"plan": "p"}),)).start()
        assert feed.suggest("a") == {"plan": "p"} and channel.keys == {"a": 7}
        assert feed.suggest("b") is None  # "a" is running: no waiting, nothing to start
        feed.on_trial_complete("a", {"paretoken": json.dumps({"metrics": {}})})
        assert channel.done.get_nowait() == (7, {"metrics": {}}) and not channel.keys
        channel.closing.set()
        threading.Timer(0.2, channel.todo.put, args=((None, None),)).start()
        assert feed.suggest("c") == Searcher.FINISHED
    finally:
        feed.release()


def test_trials_run_on_tune_workers_and_a_dead_worker_fails_only_its_trial():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests
    lines: list[str] = []
    executor = TuneExecutor(2, 1.0, 0.0, None, lines.append, trainable=echo_or_die)
    results: dict[int, dict] = {}
    try:
        for key in range(5):
            while not executor.free():  # two trials at a time
                results.update(executor.wait(1.0))
            executor.submit(key, {"x": key, "die": key == 1}, {})
            if key == 1:
                assert not executor.free() and executor.busy()
        deadline = time.monotonic() + 240
        while executor.busy() and time.monotonic() < deadline:
            results.update(executor.wait(1.0))
    finally:
        executor.close()
    assert sorted(results) == [0, 1, 2, 3, 4]
    assert results[1]["error"] == WORKER_DIED
    for key in (0, 2, 3, 4):
        assert results[key]["metrics"] == {"x": key} and results[key]["threads"] == 1
        assert results[key]["worker_pid"] != os.getpid()
    assert lines == ["ray: 2 workers (Ray Tune trials), 1 CPU + 0 GPU per trial, cluster 2 CPU / 0 GPU"]
    assert not ray.is_initialized()  # the executor started this Ray, so it stopped it


def test_a_trial_larger_than_the_cluster_is_one_line():
    from paretoken.errors import ParetokenError

    ray.init(address="local", num_cpus=1, include_dashboard=False)  # a Ray the executor finds running
    try:
        with pytest.raises(ParetokenError, match=r"^ray: a trial with 4 CPU and 0 GPU does not fit in the "
                                                 r"cluster's 1 CPU and 0 GPU; lower --cpus-per-trial or "
                                                 r"--gpus-per-trial$"):
            TuneExecutor(1, 4.0, 0.0, None, print)
        assert ray.is_initialized()  # not the executor's to stop
    finally:
        ray.shutdown()
