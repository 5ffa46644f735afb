"""paretoken.results.export: a trial measured by the real evaluator, exported, rebuilt in a fresh process
with create_model + paretoken.apply(model, paretoken.load_plan(path)), gives the same logits and metrics."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import optuna
import pytest
import safetensors.torch
import torch
import yaml

import paretoken
from paretoken.errors import ParetokenError
from paretoken.evaluators import evaluate as ev
from paretoken.evaluators.metrics import Budgets
from paretoken.evaluators.models import build_default_architecture
from paretoken.results import export as ex
from paretoken.results import query

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
optuna.logging.set_verbosity(optuna.logging.WARNING)

PLANS = {
    "none": paretoken.Plan(),
    "evit-0.5": paretoken.preset("evit-0.5"),
    "tome-r8": paretoken.preset("tome-r8"),
    "threshold": paretoken.Plan((paretoken.Stage(4, "threshold", threshold=0.8),
                                 paretoken.Stage(8, "threshold", threshold=1.0))),
}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A real study: the default architecture with seeded random weights (a checkpoint file), each plan
    measured by evaluate() on 64 Fashion-MNIST images, stored the way the search stores trials."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = build_default_architecture()
    with torch.no_grad():
        for blk in model.blocks:  # peaky attention, so plans change predictions
            blk.attn.qkv.weight.mul_(4.0)
    checkpoint = root / "weights.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(checkpoint))
    config = ev.EvalConfig(checkpoint=str(checkpoint), images=64, batch_size=32, speed=False, flops_images=2)
    storage = f"sqlite:///{root / 'studies.db'}"
    study = optuna.create_study(study_name="real", storage=storage, directions=["maximize", "minimize"])
    study.set_metric_names(["top1", "gflops"])
    # the study record paretoken.search writes: space, objectives, budgets, measurement
    study.set_user_attr("objectives", ["top1", "gflops"])
    study.set_user_attr("paretoken", {
        "space": "mixed", "objectives": ["top1", "gflops"], "max_gflops": None, "min_top1": None, "depth": 12,
        "measurement": {"model": "default", "checkpoint": str(checkpoint), "pretrained": False, "data": None,
                        "images": config.images, "seed": config.seed, "flops": config.flops}})
    env = dict(ev.environment("cpu"))
    device, threads = env.pop("device"), env.pop("threads")
    for name, plan in PLANS.items():
        metrics = ev.evaluate(plan, config)
        attrs = {"plan": plan.to_dict(), **{k: v for k, v in metrics.items() if v == v}, "device": device,
                 "threads": threads, "duration_s": 0.5, "versions": env, "worker_pid": 1, "space": "mixed"}
        if name in paretoken.PRESETS or name == "none":
            attrs["preset"] = name if name != "none" else "uncompressed"
        study.add_trial(optuna.trial.create_trial(values=[metrics["top1"], metrics["gflops"]], user_attrs=attrs))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                              user_attrs={"plan": PLANS["tome-r8"].to_dict(), "error": "boom"}))
    return {"root": root, "storage": storage, "config": config, "checkpoint": checkpoint}


REBUILD = textwrap.dedent("""
    import json, sys, torch, paretoken
    from paretoken.evaluators.models import create_model
    from paretoken.evaluators.data import load_split
    results = []
    for path in sys.argv[1:]:
        plan = paretoken.load_plan(path)
        meta = plan.meta
        model = create_model(meta["model"], checkpoint=meta["checkpoint"])
        images, labels = load_split(meta["data"], model, "eval", n=meta["eval"]["images"], seed=meta["eval"]["seed"])
        def run(p):
            paretoken.apply(model, p)
            with torch.no_grad():
                batch = meta["eval"].get("batch_size", 100)
                return torch.cat([model(images[i:i + batch]).float() for i in range(0, len(images), batch)])
        base = run(paretoken.Plan())
        out = run(plan)
        torch.save(out, path + ".logits.pt")
        results.append({"top1": 100.0 * (out.argmax(1) == labels).float().mean().item(),
                        "agreement": 100.0 * (out.argmax(1) == base.argmax(1)).float().mean().item(),
                        "input_size": list(images.shape[1:])})
    print(json.dumps(results))
""")


def test_exported_plans_rebuild_the_same_model_in_a_fresh_process(measured, tmp_path):
    df = query.load("real", measured["storage"])
    cases = [("evit-0.5", 1), ("threshold", 3)]  # a fixed-count and a per-image plan
    paths = []
    for name, number in cases:
        path = ex.export("real", measured["storage"], trial=number, out=tmp_path / f"{name}.yaml")
        plan = paretoken.load_plan(path)
        assert plan == PLANS[name]
        meta, stored = plan.meta, df.loc[number]
        assert meta["model"] == "default" and meta["checkpoint"] == str(measured["checkpoint"])
        assert meta["input_size"] == [1, 28, 28] and meta["data"] == "fashion-mnist"
        assert meta["eval"] == {"images": 64, "seed": 0, "flops": "count", "compile": False}
        assert meta["search"] == {"space": "mixed", "objectives": ["top1", "gflops"], "max_gflops": None,
                                  "min_top1": None}
        assert meta["metrics"]["top1"] == stored["top1"] and meta["metrics"]["gflops"] == stored["gflops"]
        assert meta["provenance"]["study"] == "real" and meta["provenance"]["trial"] == number
        assert meta["provenance"]["versions"]["torch"] == ev.environment()["torch"]
        assert meta["weights"]["sha256"] and len(meta["weights"]["sha256"]) == 64
        assert meta["preset"] == (name if name in paretoken.PRESETS else None)
        paths.append(str(path))

    proc = subprocess.run([sys.executable, "-c", REBUILD, *paths], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    bench = ev.prepare(measured["config"])  # the trial's own evaluation model, in this process
    for (name, number), path, rebuilt in zip(cases, paths, json.loads(proc.stdout)):
        stored = df.loc[number]
        assert rebuilt["top1"] == stored["top1"] and rebuilt["agreement"] == stored["agreement"]
        assert rebuilt["input_size"] == [1, 28, 28]
        paretoken.apply(bench.model, PLANS[name])
        with torch.no_grad():
            here = torch.cat([bench.model(bench.images[i:i + 32]) for i in range(0, 64, 32)])
        there = torch.load(path + ".logits.pt")
        torch.testing.assert_close(there, here, rtol=1e-5, atol=1e-5)
        assert torch.equal(there.argmax(1), here.argmax(1))


def test_best_within_a_budget(measured, tmp_path):
    df = query.load("real", measured["storage"])
    full = df.loc[0, "gflops"]
    path = ex.export("real", measured["storage"], best=True, budgets=Budgets(max_gflops=full - 1e-6),
                     out=tmp_path / "best.json")
    meta = paretoken.load_plan(path).meta
    compressed = df[(df["state"] == "COMPLETE") & (df["gflops"] < full)]
    expected = compressed.sort_values(["top1", "gflops", "number"], ascending=[False, True, True]).iloc[0]
    assert meta["provenance"]["trial"] == expected["number"]
    assert json.loads(path.read_text())["meta"]["metrics"]["top1"] == expected["top1"]
    drop = float(compressed["top1_drop"].max())  # the worst compressed trial is still in
    within = ex.export("real", measured["storage"], best=True,
                       budgets=Budgets(max_gflops=full - 1e-6, max_top1_drop=drop), out=tmp_path / "drop.json")
    assert paretoken.load_plan(within).meta["provenance"]["trial"] == expected["number"]
    whole = ex.export("real", measured["storage"], best=True, out=tmp_path / "any.yaml")
    assert yaml.safe_load(whole.read_text())["meta"]["metrics"]["top1"] == df["top1"].max()


def test_cheapest_within_a_top1_drop(measured, tmp_path):
    df = query.load("real", measured["storage"])
    done = [r for r in df.to_dict("records") if r["state"] == "COMPLETE"]
    for drop in sorted({r["top1_drop"] for r in done}):
        path = ex.export("real", measured["storage"], cheapest=True, budgets=Budgets(max_top1_drop=drop),
                         out=tmp_path / f"cheapest-{drop}.json")
        fits = [r for r in done if r["top1_drop"] <= drop]
        low = min(r["gflops"] for r in fits)
        top = max(r["top1"] for r in fits if r["gflops"] == low)
        expected = min(r["number"] for r in fits if r["gflops"] == low and r["top1"] == top)
        meta = paretoken.load_plan(path).meta
        assert meta["provenance"]["trial"] == expected and meta["metrics"]["gflops"] == low


def test_bad_exports_are_one_line(measured, tmp_path):
    storage = measured["storage"]
    cases = [
        (dict(trial=4), "trial 4 is FAIL (boom)"),
        (dict(trial=99), "trial 99 is not in the study; valid: 0..4"),
        (dict(), "exactly one of --trial N, --best or --cheapest"),
        (dict(trial=1, best=True), "exactly one of"),
        (dict(best=True, cheapest=True), "exactly one of"),
        (dict(best=True, budgets=Budgets(max_gflops=1e-6)), "no COMPLETE trial within gflops <= 1e-06"),
        (dict(trial=1, budgets=Budgets(max_gflops=1.0)), "go with --best or --cheapest"),
        (dict(trial=1, budgets=Budgets(max_top1_drop=1.0)), "go with --best or --cheapest"),
        (dict(cheapest=True, budgets=Budgets(min_top1=101.0)), "no COMPLETE trial within top1 >= 101"),
        (dict(best=True, budgets=Budgets(max_top1_drop=-1.0)), "no COMPLETE trial within top1_drop <= -1"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ParetokenError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ex.export("real", storage, out=tmp_path / "x.yaml", **kwargs)
    with pytest.raises(ParetokenError, match="studies there: real"):
        ex.export("nope", storage, trial=0, out=tmp_path / "x.yaml")
    assert not (tmp_path / "x.yaml").exists()
