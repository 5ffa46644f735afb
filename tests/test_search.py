"""run_search in process: a small local search, presets, budgets, failures recorded, Ray with 2 workers, CLI."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import safetensors.torch
import torch

import paretoken
from paretoken.errors import ParetokenError
from paretoken.results import query
from paretoken.evaluators import evaluate as ev
from paretoken.evaluators.metrics import METRICS, Budgets, format_metric
from paretoken.evaluators.models import build_default_architecture
from paretoken.search import enqueue_plan, run_search
from paretoken.search.storage import default_storage, journal_path, open_storage


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """The default architecture with seeded random weights; tiny evaluation so a trial takes about a second."""
    torch.manual_seed(0)
    model = build_default_architecture()
    path = tmp_path_factory.mktemp("ckpt") / "weights.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    return ev.EvalConfig(checkpoint=str(path), images=16, batch_size=16, speed=False, flops_images=2)


@pytest.fixture
def lines():
    out: list[str] = []
    return out


def _load(name, storage):
    return optuna.load_study(study_name=name, storage=open_storage(storage))


def test_local_search_stores_every_trial_and_resumes_without_repeating(config, tmp_path, monkeypatch, lines):
    monkeypatch.chdir(tmp_path)
    result = run_search("small", space="evit", n_trials=5, eval_config=config, seed=1, log=lines.append)
    assert result.storage == default_storage("small") == "sqlite:///studies/small.db"
    assert (tmp_path / "studies" / "small.db").is_file()
    study = _load("small", result.storage)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 5
    # the uncompressed model and the family's presets ran first, with the exact preset plans
    assert [t.user_attrs.get("preset") for t in trials[:3]] == ["uncompressed", "evit-0.7", "evit-0.5"]
    assert trials[1].user_attrs["plan"] == paretoken.preset("evit-0.7").to_dict()
    assert trials[0].user_attrs["plan"] == {"version": 1, "stages": []}
    # the sampler's own plans run prefix-only (the search's choice, not a parameter)
    assert [t.user_attrs["plan"].get("prefix_only_last", False) for t in trials] == [False] * 3 + [True] * 2
    assert not any("prefix_only_last" in t.params for t in trials)
    for t in trials:
        attrs = t.user_attrs
        paretoken.Plan.from_dict(attrs["plan"])
        for metric in METRICS:
            assert metric in attrs
        assert t.values == [attrs["top1"], attrs["gflops"]]
        assert attrs["device"].startswith("cpu") and attrs["duration_s"] > 0 and attrs["worker_pid"] > 0
        assert attrs["versions"]["optuna"] == optuna.__version__ and "torch" in attrs["versions"]
        assert attrs["host_memory"].startswith("kept")  # its timed forwards took no page faults (glibc)
        assert attrs["space"] == "evit"
    assert trials[2].user_attrs["gflops"] < trials[1].user_attrs["gflops"] < trials[0].user_attrs["gflops"]
    assert study.user_attrs["objectives"] == ["top1", "gflops"] and study.metric_names == ["top1", "gflops"]
    assert study.user_attrs["paretoken"]["space"] == "evit"
    # progress: one line per trial with counts, front size and hypervolume; then the Pareto table
    progress = [line for line in lines if line.startswith("trial ")]
    assert len(progress) == 5 and "done 5/5, failed 0" in progress[-1] and "hypervolume" in progress[-1]
    assert any(line.startswith("Pareto front:") for line in lines)
    # and the front itself whenever it changed, cheapest first
    fronts = [line for line in lines if line.startswith("  front now (top1/gflops): ")]
    best = sorted(study.best_trials, key=lambda t: t.values[1])
    assert 1 <= len(fronts) <= 5 and re.findall(r"#(\d+)", fronts[-1]) == [str(t.number) for t in best]
    shown = "/".join(format_metric(o, v) for o, v in zip(("top1", "gflops"), trials[0].values))
    assert fronts[0].endswith("#0 uncompressed " + shown)
    beaten = [line for line in lines if line.startswith("presets dominated by a searched plan: ")]
    df = query.trials_frame(study)
    assert len(beaten) == 1 and f"{len(query.presets_dominated(df))} of 2" in beaten[0]
    assert "paretoken holdout" in beaten[0]
    assert ("a larger --trials continues this study" in beaten[0]) == (len(query.presets_dominated(df)) < 2)
    assert not result.front.empty and {"trial", "top1", "gflops", "plan"} <= set(result.front.columns)
    assert result.reference == pytest.approx({"top1": trials[0].user_attrs["top1"] - 10,
                                              "gflops": trials[0].user_attrs["gflops"]})
    assert result.hypervolume > 0

    # the same call with a larger target runs only the missing trials; presets are not enqueued again
    lines.clear()
    again = run_search("small", space="evit", n_trials=7, eval_config=config, seed=1, log=lines.append)
    assert again.ran == 2
    trials2 = _load("small", again.storage).get_trials()
    assert len(trials2) == 7 and all(t.state.name == "COMPLETE" for t in trials2)
    assert [t.values for t in trials2[:5]] == [t.values for t in trials]
    presets = [t.user_attrs["preset"] for t in trials2 if t.user_attrs.get("preset")]
    assert sorted(presets) == sorted(["uncompressed", "evit-0.7", "evit-0.5"])
    assert any("resumed with 5 complete" in line for line in lines)
    # a target already reached runs nothing
    assert run_search("small", space="evit", n_trials=3, eval_config=config, log=lines.append).ran == 0


def test_resuming_with_other_settings_is_a_one_line_error(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_search("s", space="tome", n_trials=0, eval_config=config, log=lambda _: None)
    with pytest.raises(ParetokenError, match="created with space 'tome'.*--space"):
        run_search("s", space="evit", n_trials=0, eval_config=config, log=lambda _: None)
    import ray

    assert not ray.is_initialized()
    with pytest.raises(ParetokenError, match="created with space 'tome'"):  # said before Ray starts
        run_search("s", space="evit", backend="ray", workers=2, n_trials=0, eval_config=config, log=lambda _: None)
    assert not ray.is_initialized()
    with pytest.raises(ParetokenError, match="objectives top1,gflops"):
        run_search("s", space="tome", objectives="top1,kl", n_trials=0, eval_config=config, log=lambda _: None)
    other = ev.EvalConfig(**{**config.__dict__, "images": 32})
    with pytest.raises(ParetokenError, match="images 16"):
        run_search("s", space="tome", n_trials=0, eval_config=other, log=lambda _: None)
    other = ev.EvalConfig(**{**config.__dict__, "flops_images": 1})  # per-image GFLOPs average other images
    with pytest.raises(ParetokenError, match="flops_images 2, not 1; pass the same --flops-images"):
        run_search("s", space="tome", n_trials=0, eval_config=other, log=lambda _: None)
    # a shorter grace would fail the other processes' live trials as stale
    with pytest.raises(ParetokenError, match="heartbeat_s 10, not 1; pass --heartbeat as before"):
        run_search("s", space="tome", n_trials=0, eval_config=config, heartbeat_s=1, log=lambda _: None)
    # Debian's Fashion-MNIST named by its directory is the default data, not other data
    default_dir = ev.EvalConfig(**{**config.__dict__, "data": "/usr/share/datasets/fashion-mnist"})
    assert run_search("s", space="tome", n_trials=0, eval_config=default_dir, log=lambda _: None).ran == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"space": "nope"}, "space: 'nope' is unknown"),
    ({"objectives": "top1,flops"}, "objectives: 'flops' is unknown"),
    ({"sampler": "cmaes"}, "sampler: 'cmaes' is unknown; valid: tpe, nsga2, gp, random"),
    ({"backend": "dask"}, "backend: 'dask' is unknown"),
    ({"workers": 2}, "local backend runs one trial at a time"),
    ({"objectives": "top1,img_per_s"}, "needs speed measurement"),
    ({"objectives": "top1,speedup"}, "'speedup' needs speed measurement"),
    ({"objectives": "top1,peak_mem_mb"}, "CUDA devices only"),
    ({"storage": "postgresql://nobody:secret@127.0.0.1:1/none"}, "storage: cannot open postgresql://nobody:\\*\\*\\*@"),
    ({"storage": "mysql:/x"}, "not a storage URL"),
    ({"n_trials": -1}, "trials: -1 is invalid"),
    ({"budgets": Budgets(max_gflops=0.0)}, "max-gflops"),
])
def test_bad_input_is_a_one_line_error(config, tmp_path, monkeypatch, kwargs, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParetokenError, match=message) as err:
        run_search("bad", **{"n_trials": 1, "eval_config": config, "log": lambda _: None, **kwargs})
    assert "\n" not in str(err.value) and "secret" not in str(err.value)


@pytest.mark.parametrize("change, message", [
    ({"checkpoint": "missing.safetensors"}, r"^checkpoint: {cwd}/missing.safetensors does not exist; pass --checkpoint"),
    ({"data": "no-such-dir"}, r"^data: {cwd}/no-such-dir is not a directory; pass 'fashion-mnist', a Fashion-MNIST"),
    ({"images": 10_001}, r"^images: 10001 is invalid; valid: an integer in 1..10000 \(10000 images available in .*fashion-mnist \(test\)\)"),
    ({"model": "vit_nonexistent"}, r"^model: 'vit_nonexistent' is not 'default' nor a timm model name"),
])
def test_a_model_checkpoint_or_data_that_does_not_load_is_one_line_and_no_study(config, tmp_path, monkeypatch,
                                                                               change, message):
    """Checked before the study is touched, not found out trial by trial (each a FAIL)."""
    monkeypatch.chdir(tmp_path)
    bad = ev.EvalConfig(**{**config.__dict__, **change})
    with pytest.raises(ParetokenError, match=message.format(cwd=re.escape(str(tmp_path)))):
        run_search("unloadable", space="evit", n_trials=2, eval_config=bad, log=lambda _: None)
    assert not (tmp_path / "studies").exists()


def test_relative_checkpoint_and_data_paths_are_stored_absolute(config, tmp_path, monkeypatch):
    """Trials may run in another working directory (Ray Tune's), so the study keeps absolute paths."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.safetensors").write_bytes(open(config.checkpoint, "rb").read())
    os.symlink("/usr/share/datasets/fashion-mnist", tmp_path / "fm")
    rel = ev.EvalConfig(**{**config.__dict__, "checkpoint": "w.safetensors", "data": "fm"})
    result = run_search("rel", space="evit", n_trials=1, eval_config=rel, log=lambda _: None)
    stored = result.study.user_attrs["paretoken"]["measurement"]
    assert stored["checkpoint"] == str(tmp_path / "w.safetensors") and stored["data"] == str(tmp_path / "fm")
    assert result.counts.complete == 1


def test_journal_url_forms():
    assert str(journal_path("journal:studies/a.log")) == "studies/a.log"
    assert str(journal_path("journal:///tmp/a.log")) == "/tmp/a.log"
    assert journal_path("sqlite:///a.db") is None


def test_failing_trials_are_recorded_and_the_search_goes_on(config, tmp_path, monkeypatch, lines):
    """A bad plan (ParetokenError), a NaN metric and an out-of-memory error each make one FAIL trial
    with its error; the other trials complete and the target counts the failures."""
    monkeypatch.chdir(tmp_path)
    run_search("fail", space="evit", n_trials=0, eval_config=config, presets=False, log=lines.append)
    study = _load("fail", default_storage("fail"))
    # layer 20 does not exist in this 12-block model: evaluate raises ParetokenError
    enqueue_plan(study, paretoken.Plan((paretoken.Stage(20, "prune", keep=0.5),)), label="bad-layer")
    enqueue_plan(study, paretoken.preset("evit-0.7"), label="nan")
    enqueue_plan(study, paretoken.preset("evit-0.5"), label="oom")

    real = ev.evaluate

    def flaky(plan, cfg):  # test double around the real evaluator: NaN top1, then CUDA OOM
        metrics = real(plan, cfg)
        if plan == paretoken.preset("evit-0.7"):
            metrics["top1"] = math.nan
        if plan == paretoken.preset("evit-0.5"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return metrics

    monkeypatch.setattr(ev, "evaluate", flaky)
    result = run_search("fail", space="evit", n_trials=6, eval_config=config, presets=False, log=lines.append)
    trials = _load("fail", result.storage).get_trials()
    by_label = {t.user_attrs.get("preset"): t for t in trials}
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert by_label["uncompressed"].state.name == "COMPLETE"
    bad = by_label["bad-layer"]
    assert "layer 20 is out of range" in bad.user_attrs["error"] and bad.user_attrs["plan"]["stages"][0]["layer"] == 20
    assert "top1" in by_label["nan"].user_attrs["error"] and "NaN" in by_label["nan"].user_attrs["error"]
    assert by_label["oom"].user_attrs["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert result.counts.failed == 3 and result.counts.complete == 3
    fail_lines = [line for line in lines if " FAIL " in line]
    assert len(fail_lines) == 3 and "done 6/6, failed 3" in lines[[i for i, l in enumerate(lines)
                                                                   if l.startswith("trial")][-1]]


def test_a_setup_every_trial_needs_stops_the_search_and_the_same_command_goes_on(config, tmp_path, monkeypatch):
    """An image the search's own check did not read (it reads the first) cannot be read by the worker:
    one line naming it, the trial FAIL with ``setup_error`` and not counted, its plan run on resume."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    from paretoken.evaluators.data import _seeded_indices

    monkeypatch.chdir(tmp_path)
    for name in ("bag", "coat", "shirt"):
        (tmp_path / "val" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (28, 28), 40 * i + 60).save(tmp_path / "val" / name / f"{i}.png")
    paths = [path for path, _ in ImageFolder(str(tmp_path / "val")).samples]
    broken = Path(paths[_seeded_indices(len(paths), None, 0, "val")[-1]])  # read last, after the check's first
    good = broken.read_bytes()
    broken.write_bytes(b"not a png")
    folder = dataclasses.replace(config, data=str(tmp_path / "val"), images=len(paths))
    lines: list[str] = []
    with pytest.raises(ParetokenError) as excinfo:
        run_search("setup", space="evit", n_trials=3, eval_config=folder, log=lines.append)
    message = str(excinfo.value)
    assert message.startswith(f"data: cannot read image {broken}") and "\n" not in message
    assert "(trial 0, on " in message and "the search stopped" in message
    study = _load("setup", default_storage("setup"))
    first, *waiting, retry = study.get_trials()
    assert [t.user_attrs["preset"] for t in waiting] == ["evit-0.7", "evit-0.5"]
    assert first.state.name == "FAIL" and "error" not in first.user_attrs
    assert first.user_attrs["setup_error"].startswith(f"data: cannot read image {broken}")
    assert retry.state.name == "WAITING" and retry.user_attrs["retry_of"] == 0
    assert retry.user_attrs["preset"] == "uncompressed" and not any(" COMPLETE " in line for line in lines)
    table = query.trials_frame(study)
    assert table.loc[0, "interrupted"] and table.loc[0, "error"] == first.user_attrs["setup_error"]

    broken.write_bytes(good)
    result = run_search("setup", space="evit", n_trials=3, eval_config=folder, log=lines.append)
    trials = study.get_trials()
    assert result.counts.complete == 3 and result.counts.failed == 0 and result.counts.interrupted == 1
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert trials[3].user_attrs["retry_of"] == 0 and trials[3].user_attrs["preset"] == "uncompressed"


def test_weights_whose_logits_are_not_finite_stop_the_search_at_setup(tmp_path, monkeypatch, lines):
    """Every trial would fail the same way (the uncompressed model too), so it is a setup error."""
    monkeypatch.chdir(tmp_path)
    weights = build_default_architecture().state_dict()
    weights["head.weight"][0, 0] = math.nan
    path = tmp_path / "nan.safetensors"
    safetensors.torch.save_file(weights, str(path))
    nan_config = ev.EvalConfig(checkpoint=str(path), images=16, batch_size=16, speed=False, flops_images=2)
    with pytest.raises(ParetokenError) as excinfo:
        run_search("nan", space="evit", n_trials=3, eval_config=nan_config, log=lines.append)
    assert str(excinfo.value).startswith(f"checkpoint: the uncompressed model's logits with '{path}' are not finite")
    trials = _load("nan", default_storage("nan")).get_trials()
    first, retry = trials[0], trials[-1]
    assert first.user_attrs["setup_error"].startswith("checkpoint: ") and retry.state.name == "WAITING"


def test_a_study_of_another_program_is_not_taken_over(config, tmp_path, lines):
    storage = f"sqlite:///{tmp_path / 'theirs.db'}"
    theirs = optuna.create_study(study_name="theirs", storage=storage, directions=["maximize", "minimize"])
    theirs.optimize(lambda trial: (trial.suggest_float("x", 0, 1), 1.0), n_trials=2)
    with pytest.raises(ParetokenError, match="study: 'theirs' in .* was not made by a paretoken search"):
        run_search("theirs", storage=storage, space="evit", n_trials=3, eval_config=config, log=lines.append)
    again = _load("theirs", storage)
    assert again.user_attrs == {} and len(again.trials) == 2 and not lines
    optuna.create_study(study_name="empty", storage=storage, directions=["maximize", "minimize"])
    result = run_search("empty", storage=storage, space="evit", n_trials=1, eval_config=config, log=lines.append)
    assert result.counts.complete == 1 and _load("empty", storage).user_attrs["paretoken"]["space"] == "evit"


def test_a_plan_measured_before_takes_its_values_without_a_second_run(config, tmp_path, monkeypatch, lines):
    monkeypatch.chdir(tmp_path)
    run_search("dup", space="evit", n_trials=0, eval_config=config, presets=False, log=lines.append)
    study = _load("dup", default_storage("dup"))
    for label in ("first", "again"):
        enqueue_plan(study, paretoken.preset("evit-0.7"), label=label)
    short = paretoken.Plan(paretoken.preset("evit-0.7").stages, prefix_only_last=True)
    enqueue_plan(study, short, label="short")
    moot = paretoken.Stage(11, "prune_fuse", keep=0.7)  # a stage prefix_only_last makes moot: the same plan
    enqueue_plan(study, paretoken.Plan((*short.stages, moot), prefix_only_last=True), label="short+moot")
    enqueue_plan(study, paretoken.Plan(short.stages, prefix_only_last=True, meta={"from": "an export"}),
                 label="short+meta")  # provenance does not tell plans apart
    measured: list = []
    real = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda plan, cfg: measured.append(plan) or real(plan, cfg))
    result = run_search("dup", space="evit", n_trials=6, eval_config=config, presets=False, log=lines.append)
    by_label = {t.user_attrs.get("preset"): t for t in _load("dup", result.storage).get_trials()}
    assert by_label["short+meta"].user_attrs["plan"]["meta"] == {"from": "an export"}
    # the repeats never reached a worker
    assert measured == [paretoken.Plan(()), paretoken.preset("evit-0.7"), short]
    for first, again in ((by_label["first"], by_label["again"]), (by_label["short"], by_label["short+moot"]),
                         (by_label["short"], by_label["short+meta"])):
        assert again.state.name == "COMPLETE" and again.values == first.values
        assert again.user_attrs["same_plan_as"] == first.number and again.user_attrs["duration_s"] == 0.0
        assert {k: again.user_attrs[k] for k in METRICS} == {k: first.user_attrs[k] for k in METRICS}
        assert any(f"[same plan as trial {first.number}: its values, not measured again]" in line for line in lines)


def test_sampled_plans_run_prefix_only_and_enqueued_plans_as_given(config, tmp_path, monkeypatch):
    """``prefix_only_last`` is the search's, not a sampled choice: on for every sampled plan, as
    published for presets, as given for a plan of one's own, labelled or not."""
    monkeypatch.chdir(tmp_path)
    run_search("pol", space="evit", n_trials=0, eval_config=config, presets=False, log=lambda _: None)
    study = _load("pol", default_storage("pol"))
    plain = paretoken.preset("evit-0.5")
    short = paretoken.Plan(paretoken.preset("evit-0.7").stages, prefix_only_last=True)
    enqueue_plan(study, plain)
    enqueue_plan(study, short, label="mine")
    result = run_search("pol", space="evit", n_trials=5, eval_config=config, presets=False, log=lambda _: None)
    trials = _load("pol", result.storage).get_trials()
    plans = [paretoken.Plan.from_dict(t.user_attrs["plan"]) for t in trials]
    assert plans[:3] == [paretoken.Plan(), plain, short]
    assert len(plans) == 5 and all(p.prefix_only_last for p in plans[3:])
    assert all("prefix_only_last" not in t.params for t in trials)
    # the uncompressed preset is the space's parameters (the sampler learns from it); the two plans
    # the space would not run as given are fixed plans
    assert trials[0].params and not trials[1].params and not trials[2].params


def test_budgets_are_optuna_constraints(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_search("budget", space="tome", n_trials=4, eval_config=config,
                        budgets=Budgets(max_gflops=0.12, min_top1=1.0), log=lambda _: None)
    trials = _load("budget", result.storage).get_trials()
    for t in trials:
        assert t.constraints["max_gflops"] == pytest.approx(t.user_attrs["gflops"] - 0.12)
        assert t.constraints["min_top1"] == pytest.approx(1.0 - t.user_attrs["top1"])
    assert trials[0].constraints["max_gflops"] > 0  # uncompressed: over budget, kept out of the front
    # the front: the non-dominated trials among those within both budgets (possibly none)
    feasible = [t for t in trials if t.user_attrs["gflops"] <= 0.12 and t.user_attrs["top1"] >= 1.0]
    expected = {t.number for t in feasible if not any(
        o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values for o in feasible)}
    assert set(result.front["trial"]) == expected and list(result.front.columns[:2]) == ["trial", "preset"]


def test_top1_drop_budget_is_relative_to_the_uncompressed_trial(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_search("drop", space="evit", n_trials=4, eval_config=config, budgets=Budgets(max_top1_drop=0.0),
                        log=lambda _: None)
    trials = _load("drop", result.storage).get_trials()
    base_top1 = trials[0].user_attrs["top1"]  # the uncompressed model, enqueued first
    assert trials[0].user_attrs["top1_drop"] == 0.0
    for t in trials:
        assert t.user_attrs["top1_drop"] == pytest.approx(base_top1 - t.user_attrs["top1"])
        assert t.constraints == {"max_top1_drop": pytest.approx(t.user_attrs["top1_drop"])}
    assert set(result.front["trial"]) <= {t.number for t in trials if t.user_attrs["top1"] >= base_top1}
    with pytest.raises(ParetokenError, match=r"^study: 'drop' was created with max_top1_drop 0\.0, not 2\.0; "
                                             r"pass --max-top1-drop as before"):
        run_search("drop", space="evit", n_trials=5, eval_config=config, budgets=Budgets(max_top1_drop=2.0),
                   log=lambda _: None)
    with pytest.raises(ParetokenError, match=r"^max-top1-drop: -1\.0 is invalid; valid: 0\.\.100 \(points\)$"):
        run_search("drop2", space="evit", n_trials=1, eval_config=config, budgets=Budgets(max_top1_drop=-1.0),
                   log=lambda _: None)
    assert not (tmp_path / "studies" / "drop2.db").exists()


@pytest.mark.parametrize("sampler", ["nsga2", "gp", "random"])
def test_other_samplers_run(config, tmp_path, monkeypatch, sampler):
    monkeypatch.chdir(tmp_path)
    result = run_search(f"s-{sampler}", space="mixed", sampler=sampler, n_trials=3, eval_config=config,
                        presets=False, seed=3, log=lambda _: None)
    assert result.counts.complete == 3


def test_search_on_speedup_pairs_timings_in_every_trial(config, tmp_path, monkeypatch, lines):
    monkeypatch.chdir(tmp_path)
    timed = dataclasses.replace(config, speed=True, latency_repeats=1)
    result = run_search("fast", space="evit", objectives="top1,speedup", n_trials=3, eval_config=timed,
                        log=lines.append)
    trials = _load("fast", result.storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert all(t.values == [t.user_attrs["top1"], t.user_attrs["speedup"]] and 0 < t.values[1] < math.inf
               for t in trials)
    assert result.reference == pytest.approx({"top1": trials[0].user_attrs["top1"] - 10, "speedup": 1.0})
    assert "speedup" in result.front.columns


def test_gp_models_noise_only_for_measured_objectives():
    from paretoken.search.study import make_sampler

    # Optuna's GPSampler keeps the flag as _deterministic; a rename there fails here, not silently
    assert make_sampler("gp", 0, ("top1", "gflops")).inner._deterministic is True
    assert make_sampler("gp", 0, ("top1", "img_per_s")).inner._deterministic is False
    assert make_sampler("gp", 0, ("top1", "speedup")).inner._deterministic is False


def test_ray_backend_runs_trials_on_two_worker_processes(config, tmp_path, monkeypatch, lines):
    monkeypatch.chdir(tmp_path)
    # a checkpoint path relative to here, where the search runs; Tune runs trials in working dirs of its own
    (tmp_path / "w.safetensors").write_bytes(open(config.checkpoint, "rb").read())
    relative = ev.EvalConfig(**{**config.__dict__, "checkpoint": "w.safetensors"})
    result = run_search("ray", space="evit", n_trials=6, backend="ray", workers=2, cpus_per_trial=1,
                        eval_config=relative, log=lines.append)
    trials = _load("ray", result.storage).get_trials()
    assert len(trials) == 6 and all(t.state.name == "COMPLETE" for t in trials)
    pids = {t.user_attrs["worker_pid"] for t in trials}
    assert len(pids) >= 2 and os.getpid() not in pids
    for t in trials:
        assert {"plan", "top1", "gflops", "device", "duration_s", "versions"} <= set(t.user_attrs)
    assert any(line.startswith("ray: 2 workers") for line in lines)


def test_a_plan_a_worker_is_measuring_is_not_measured_again_by_another(config, tmp_path, monkeypatch, lines):
    """Two Ray workers and three copies of one plan launched together: one worker measures it, the
    other copies wait for it and take its values; the second worker goes on with other trials."""
    monkeypatch.chdir(tmp_path)
    run_search("busy", space="evit", n_trials=1, eval_config=config, presets=False, log=lines.append)
    study = _load("busy", default_storage("busy"))
    plan = paretoken.Plan((paretoken.Stage(4, "prune_fuse", keep=0.6),))
    for label in ("first", "again", "once more"):
        enqueue_plan(study, plan, label=label)
    run_search("busy", space="evit", n_trials=6, backend="ray", workers=2, cpus_per_trial=1, eval_config=config,
               presets=False, log=lines.append)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6
    first, *copies = trials[1:4]
    assert "same_plan_as" not in first.user_attrs and first.user_attrs["duration_s"] > 0
    for again in copies:
        assert again.user_attrs["same_plan_as"] == first.number and again.user_attrs["duration_s"] == 0.0
        assert again.values == first.values and again.user_attrs["plan"] == first.user_attrs["plan"]
    measured = [t for t in trials if "same_plan_as" not in t.user_attrs]
    assert len({json.dumps(t.user_attrs["plan"], sort_keys=True) for t in measured}) == len(measured)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head():
    """A two-node Ray cluster started the way a user starts one: `ray start --head` with no CPUs for
    trials, and a node of 2 CPUs joined to it with `ray start --address`; stopped afterwards."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    common = ["--num-gpus=0", "--disable-usage-stats"]
    subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                    *common], check=True, capture_output=True, timeout=180)
    try:
        subprocess.run([ray_cli, "start", f"--address=127.0.0.1:{port}", "--num-cpus=2", *common], check=True,
                       capture_output=True, timeout=180, env={**os.environ, "RAY_AUTH_MODE": "token"})
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=180)


def test_ray_backend_joins_a_running_cluster_and_leaves_it_running(config, tmp_path, monkeypatch, lines,
                                                                   ray_head):
    monkeypatch.chdir(tmp_path)
    # `ray start` clusters use token authentication, which a driver joining by host:port must opt into
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    refused = subprocess.run([sys.executable, "-m", "paretoken.cli", "search", "--study", "refused", "--space",
                              "evit", "--trials", "2", "--backend", "ray", "--ray-address", ray_head],
                             capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith(f"paretoken: error: ray: cannot connect to the Ray cluster at '{ray_head}' (")
    assert line.endswith("; the cluster uses token authentication: set RAY_AUTH_MODE=token here, with its token "
                         "in RAY_AUTH_TOKEN or ~/.ray/auth_token (Ray does this by itself only for --ray-address "
                         "auto)")
    assert not (tmp_path / "studies").exists()  # no study file made before the cluster was joined

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    result = run_search("joined", space="evit", n_trials=3, backend="ray", workers=2, ray_address=ray_head,
                        eval_config=config, log=lines.append)
    trials = _load("joined", result.storage).get_trials()
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    assert os.getpid() not in {t.user_attrs["worker_pid"] for t in trials}
    assert "ray: 2 workers (Ray Tune trials), 1 CPU + 0 GPU per trial, cluster 2 CPU / 0 GPU" in lines
    status = subprocess.run([str(Path(sys.executable).with_name("ray")), "status", f"--address={ray_head}"],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "2.0 CPU" in status.stdout.replace("/", " ")  # still up for others
    assert status.stdout.count(" node_") == 2  # the head has no CPUs: Ray could place the trials only on the other


def test_unreachable_ray_cluster_is_one_line_and_writes_no_study(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    with pytest.raises(ParetokenError, match=rf"^ray: cannot connect to the Ray cluster at '{address}': nothing "
                                             r"answers there \(.+\); valid: host:port of a running head node"):
        run_search("nowhere", space="evit", n_trials=2, backend="ray", ray_address=address, eval_config=config)
    assert not (tmp_path / "studies").exists()  # no study file made before the cluster was joined


def test_cli_search_and_spaces(config, tmp_path, monkeypatch, capsys):
    from paretoken.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["spaces"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("tome", "evit", "dynamicvit", "asvit", "jmp", "slim", "mixed"))
    assert "every sampled plan with prefix_only_last" in out  # the search's, not a parameter:
    assert not any(line.split()[:1] == ["prefix_only_last"] for line in out.splitlines())
    assert main(["spaces", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {e["name"] for e in listing} >= {"mixed"} and "evit-0.7" in next(e for e in listing
                                                                            if e["name"] == "evit")["presets"]
    argv = ["search", "--study", "cli", "--space", "dynamicvit", "--trials", "3", "--checkpoint", config.checkpoint,
            "--images", "16", "--no-speed", "--storage", "journal:studies/cli.log", "--plot", "front.png",
            "--max-top1-drop", "5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "done 3/3" in out and "Pareto front:" in out and (tmp_path / "front.png").is_file()
    assert (tmp_path / "studies" / "cli.log").is_file()
    study = _load("cli", "journal:studies/cli.log")
    assert study.user_attrs["paretoken"]["max_top1_drop"] == 5.0
    assert all(set(t.constraints) == {"max_top1_drop"} for t in study.get_trials())
    assert main(["search", "--study", "cli2", "--objectives", "top1,speed", "--checkpoint", config.checkpoint]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "objectives: 'speed' is unknown" in err
