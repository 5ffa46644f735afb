"""SIGKILL a running `paretoken search`, run the same command again: nothing finished is lost or repeated,
the trial left RUNNING is marked FAIL and its plan runs again (SQLite with Optuna's heartbeat; a journal
file with the explicit sweep)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

import paretoken
from paretoken.evaluators.metrics import Budgets
from paretoken.search.storage import open_storage

TRIALS = 7


def search_command(study, storage, checkpoint, trials, images=16):
    return [sys.executable, "-m", "paretoken.cli", "search", "--study", study, "--storage", storage,
            "--space", "evit", "--trials", str(trials), "--checkpoint", checkpoint, "--images", str(images),
            "--batch-size", "16", "--no-speed", "--heartbeat", "1", "--seed", "0"]


def load(study, storage):
    return optuna.load_study(study_name=study, storage=open_storage(storage))


def wait_until(predicate, timeout, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"search exited early ({proc.returncode}): {proc.stdout.read()}")
        try:
            if predicate():
                return
        except KeyError:  # the study does not exist yet
            pass
        time.sleep(0.2)
    raise AssertionError("timed out")


def sigkill_when(predicate, cmd, cwd, env, timeout=120):
    """Run ``cmd`` and SIGKILL it once ``predicate()`` holds."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(predicate, timeout, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


def snapshot(trial):
    return (trial.number, trial.state.name, trial.values, trial.params, trial.user_attrs.get("plan"),
            trial.datetime_complete)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_sigkill_then_the_same_command_resumes(kind, checkpoint, tmp_path):
    storage = f"sqlite:///{tmp_path}/k.db" if kind == "sqlite" else f"journal:{tmp_path}/k.log"
    cmd = search_command("k", storage, checkpoint, TRIALS, images=160)  # trials long enough to be killed in one
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    def mid_trial():
        trials = load("k", storage).get_trials(deepcopy=False)
        states = [t.state.name for t in trials]
        return states.count("COMPLETE") >= 3 and "RUNNING" in states

    sigkill_when(mid_trial, cmd, tmp_path, env)

    before = load("k", storage).get_trials()
    finished = {t.number: snapshot(t) for t in before if t.state.is_finished()}
    killed = [t for t in before if t.state.name == "RUNNING"]
    assert len(finished) >= 3 and len(killed) == 1 and len(finished) < TRIALS

    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    after = load("k", storage).get_trials()
    by_number = {t.number: t for t in after}
    # nothing finished before the kill is lost or changed
    for number, snap in finished.items():
        assert snapshot(by_number[number]) == snap
    # the trial left RUNNING is FAIL (interrupted: no error of its own) and its plan ran again
    lost = by_number[killed[0].number]
    assert lost.state.name == "FAIL" and "error" not in lost.user_attrs
    reruns = [t for t in after if t.user_attrs.get("retry_of") == lost.number]
    assert len(reruns) == 1 and reruns[0].state.name == "COMPLETE"
    # its parameters are fixed in the re-run (all of them, or those sampled before the kill)
    assert lost.params.items() <= reruns[0].params.items()
    if "plan" in lost.user_attrs:
        assert reruns[0].user_attrs["plan"] == lost.user_attrs["plan"]
    assert f"[re-run of trial {lost.number}]" in out.stdout
    # the target counts finished trials; nothing finished was repeated; presets ran once each
    done = [t for t in after if t.state.name == "COMPLETE" or (t.state.name == "FAIL" and "error" in t.user_attrs)]
    assert len(done) == TRIALS and all(t.state.name == "COMPLETE" for t in done)
    assert all(by_number[t.user_attrs["retry_of"]].number == lost.number for t in after if "retry_of" in t.user_attrs)
    presets = [t.user_attrs["preset"] for t in done if t.user_attrs.get("preset")]
    assert sorted(presets) == ["evit-0.5", "evit-0.7", "uncompressed"]
    assert not [t for t in after if t.state.name in ("RUNNING", "WAITING")]
    assert f"resumed with {sum(1 for s in finished.values() if s[1] == 'COMPLETE')} complete" in out.stdout


def test_ctrl_c_fails_the_running_trial_and_enqueues_its_plan_at_once(checkpoint, tmp_path):
    storage = f"sqlite:///{tmp_path}/c.db"
    # trials of a few seconds, so the one seen RUNNING is still running when the signal lands (on a busy machine too)
    cmd = search_command("c", storage, checkpoint, 50, images=480)
    # Ctrl-C as from a terminal, also where this test runs with SIGINT ignored (a background job of a script)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        def mid_trial():
            states = [t.state.name for t in load("c", storage).get_trials(deepcopy=False)]
            return states.count("COMPLETE") >= 2 and "RUNNING" in states

        wait_until(mid_trial, 120, proc)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "paretoken: interrupted" in out and "Traceback" not in out
    trials = load("c", storage).get_trials()
    assert not [t for t in trials if t.state.name == "RUNNING"]
    interrupted = [t for t in trials if t.state.name == "FAIL" and "error" not in t.user_attrs]
    assert len(interrupted) == 1
    waiting = [t for t in trials if t.state.name == "WAITING" and t.user_attrs.get("retry_of") == interrupted[0].number]
    assert len(waiting) == 1
    assert interrupted[0].params.items() <= waiting[0].system_attrs["fixed_params"].items()


@pytest.fixture
def sigint_default():
    """SIGINT raising KeyboardInterrupt, as in a terminal, whatever this process was started with."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_is_held_outside_a_trial_and_raised_at_once_inside_one(sigint_default):
    from paretoken.search.lifecycle import CtrlC

    ctrl_c = CtrlC()
    with ctrl_c.installed():
        os.kill(os.getpid(), signal.SIGINT)  # e.g. inside a storage call: held
        time.sleep(0.05)
        assert ctrl_c.received
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.check()  # the loop's next check
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    ctrl_c, reached = CtrlC(), []
    with ctrl_c.installed(), pytest.raises(KeyboardInterrupt):
        with ctrl_c.at_once():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)
            reached.append("after the signal")
    assert not reached

    ctrl_c = CtrlC()
    with ctrl_c.installed(), pytest.raises(KeyboardInterrupt):
        with ctrl_c.at_once():
            try:  # code that turns the interrupt into an ordinary failure
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1.0)
            except KeyboardInterrupt:
                pass


def test_a_search_started_to_ignore_ctrl_c_keeps_ignoring_it(sigint_default):
    from paretoken.search.lifecycle import CtrlC

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctrl_c = CtrlC()
    with ctrl_c.installed(), ctrl_c.at_once():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    assert not ctrl_c.received


def test_an_enqueued_trial_killed_before_its_plan_was_sampled_reruns_the_enqueued_plan():
    from paretoken.search.lifecycle import requeue

    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial({"r_first": 8, "r_last": 8, "overrides": 0}, user_attrs={"preset": "tome-r8"})
    killed = study.ask()  # the process dies here, before the space samples: no params yet
    assert killed.params == {}
    study._storage.set_trial_state_values(killed._trial_id, optuna.trial.TrialState.FAIL)
    assert requeue(study, study.trials[0])
    rerun = study.ask()
    assert rerun.user_attrs == {"preset": "tome-r8", "retry_of": 0}
    assert [rerun.suggest_int(k, 0, 24) for k in ("r_first", "r_last", "overrides")] == [8, 8, 0]


def test_a_sampled_plan_is_prefix_only_without_its_moot_last_block_stage_and_a_preset_is_as_published():
    from paretoken.search.driver import resolve_plan
    from paretoken.spaces import get_space

    tome_r8 = {"r_first": 8, "r_last": 8, "overrides": 0}
    sampled = resolve_plan(optuna.trial.FixedTrial(tome_r8), get_space("mixed"), 12)
    assert sampled == paretoken.Plan(paretoken.preset("tome-r8").stages[:11], prefix_only_last=True)
    preset = optuna.trial.FixedTrial(tome_r8)
    preset.set_user_attr("preset", "tome-r8")
    assert resolve_plan(preset, get_space("mixed"), 12) == paretoken.preset("tome-r8")


def test_a_retry_runs_the_plan_its_trial_ran():
    """A sampled trial's retry samples the same parameters and, like it, runs prefix-only; one from
    a study made when sampled plans could run without it runs its plan as a fixed plan."""
    from paretoken.search.driver import resolve_plan
    from paretoken.search.lifecycle import requeue
    from paretoken.spaces import get_space

    space = get_space("mixed")
    for ran_prefix_only in (True, False):
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(0))
        killed = study.ask()
        plan = resolve_plan(killed, space, 12)
        assert plan.prefix_only_last
        ran = paretoken.Plan(plan.stages, prefix_only_last=ran_prefix_only)
        killed.set_user_attr("plan", ran.to_dict())
        study._storage.set_trial_state_values(killed._trial_id, optuna.trial.TrialState.FAIL)
        assert requeue(study, study.trials[0])
        rerun = study.ask()
        assert resolve_plan(rerun, space, 12) == ran
        assert ("enqueued_plan" in rerun.user_attrs) is (not ran_prefix_only)


def test_a_result_for_a_trial_another_process_failed_as_stale_is_dropped_not_raised():
    from paretoken.search.driver import LoopState

    class Beater:
        def discard(self, trial_id):
            pass

    study = optuna.create_study(directions=["maximize", "minimize"])
    lines: list[str] = []
    state = LoopState(study, None, 12, ("top1", "gflops"), 1, Budgets(), {}, lines.append)
    tell = study.tell

    def swept_just_before_tell(trial, *args, **kwargs):  # another process's sweep lands in between
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        return tell(trial, *args, **kwargs)

    study.tell = swept_just_before_tell
    state.finish(study.ask(), {"metrics": {"top1": 80.0, "gflops": 0.1}}, Beater())
    assert study.trials[-1].state == optuna.trial.TrialState.FAIL and state.ran == 0
    assert "already failed as stale" in lines[-1] and "result dropped" in lines[-1]
    state.finish(study.ask(), {"error": "out of memory"}, Beater())  # failed either way: no error raised
    assert study.trials[-1].state == optuna.trial.TrialState.FAIL


def test_a_mixed_study_is_resumed_with_the_ops_it_was_made_with():
    """Mixed's op choices grew with the registry (pitome, prune_merge): a study that records none was made
    with the five before, and resuming it with other choices is one line naming --ops, nothing written."""
    from paretoken.errors import ParetokenError
    from paretoken.search.opening import MIXED_OPS_BEFORE_REGISTRY, check_settings

    legacy = {"space": "mixed", "objectives": ["top1", "gflops"]}
    now = {**legacy, "ops": ["prune", "prune_fuse", "merge", "joint", "threshold", "pitome", "prune_merge"]}
    with pytest.raises(ParetokenError, match="created with ops prune,prune_fuse,merge,joint,threshold, not "
                                             "prune,.*prune_merge; pass --ops as before"):
        check_settings("old", legacy, now)
    check_settings("old", legacy, {**legacy, "ops": list(MIXED_OPS_BEFORE_REGISTRY)})
    check_settings("new", now, now)
    with pytest.raises(ParetokenError, match="created with ops"):
        check_settings("new", now, {**now, "ops": ["merge", "pitome"]})


def test_a_study_made_before_counted_flops_is_resumed_with_traced_ones():
    """GFLOPs were fvcore traces before they were counted: a study whose measurement records no ``flops``
    measured by trace, and resuming it with counted GFLOPs is one line naming --flops."""
    from paretoken.errors import ParetokenError
    from paretoken.search.opening import check_settings

    legacy = {"space": "tome", "measurement": {"model": "default", "images": 500, "flops_images": 16}}
    counted = {**legacy, "measurement": {**legacy["measurement"], "flops": "count"}}
    with pytest.raises(ParetokenError, match="measures with flops 'trace', not 'count'; pass the same --flops"):
        check_settings("old", legacy, counted)
    check_settings("old", legacy, {**legacy, "measurement": {**legacy["measurement"], "flops": "trace"}})
    check_settings("new", counted, counted)


def test_sigkill_mid_rung_resumes_the_trial_at_its_rung(tmp_path):
    """Successive halving on a journal file: a trial killed between rungs goes on, in its retry, after
    the rungs it finished; they are carried, not measured again."""
    storage = f"journal:{tmp_path}/h.log"
    cmd = [sys.executable, "-m", "paretoken.cli", "search", "--study", "h", "--storage", storage, "--space", "evit",
           "--trials", "4", "--model", "default", "--images", "32", "--min-images", "8", "--eta", "2",
           "--batch-size", "32", "--no-speed", "--heartbeat", "1", "--seed", "0"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    def mid_rung():
        return any(t.state.name == "RUNNING" and t.user_attrs.get("rungs")
                   for t in load("h", storage).get_trials(deepcopy=False))

    sigkill_when(mid_rung, cmd, tmp_path, env)
    killed = next(t for t in load("h", storage).get_trials() if t.state.name == "RUNNING")
    carried = killed.user_attrs["rungs"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    after = load("h", storage).get_trials()
    assert after[killed.number].state.name == "FAIL" and "error" not in after[killed.number].user_attrs
    retry = next(t for t in after if t.user_attrs.get("retry_of") == killed.number)
    assert retry.state.name == "COMPLETE" and retry.user_attrs["rungs"][:len(carried)] == carried
    if retry.user_attrs.get("preset"):  # presets run every rung: the retry measured only the rungs left
        assert [e["images"] for e in retry.user_attrs["rungs"]] == [8, 16, 32] and retry.user_attrs["images"] == 32
    assert f"[re-run of trial {killed.number}]" in out.stdout
    done = [t for t in after if t.state.name == "COMPLETE"]
    assert len(done) == 4 and not [t for t in after if t.state.name in ("RUNNING", "WAITING")]


def test_a_study_measured_eager_resumes_only_eager():
    """Compiled speed is another measurement: a study that records none was measured eager, and resuming
    it (or an eager study) with --compile is one line naming --compile."""
    from paretoken.errors import ParetokenError
    from paretoken.search.opening import check_settings

    legacy = {"space": "tome", "measurement": {"model": "default", "images": 500, "flops": "count"}}
    eager = {**legacy, "measurement": {**legacy["measurement"], "compile": False}}
    compiled = {**legacy, "measurement": {**legacy["measurement"], "compile": True}}
    check_settings("old", legacy, eager)
    for stored in (legacy, eager):
        with pytest.raises(ParetokenError, match="measures with compile False, not True; pass the same --compile"):
            check_settings("s", stored, compiled)
    check_settings("new", compiled, compiled)
