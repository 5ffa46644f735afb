"""paretoken.results.finetune: a few distillation steps on 256 Fashion-MNIST images lower the loss, and the
written checkpoint + plan evaluate with `paretoken eval`."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import paretoken
from paretoken.cli import main
from paretoken.errors import ParetokenError
from paretoken.evaluators.data import load_split
from paretoken.evaluators.models import build_default_architecture, create_model
from paretoken.results.finetune import FinetuneConfig, distillation_loss, finetune, meta_after_finetune
from paretoken.results.query import plan_label


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_default_architecture()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    path = tmp_path_factory.mktemp("ft") / "start.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    return path


def _loss_on(weights, plan, images, labels, teacher_weights) -> float:
    teacher = create_model("default", checkpoint=teacher_weights)
    student = paretoken.apply(create_model("default", checkpoint=weights), plan)
    with torch.no_grad():
        return distillation_loss(student(images), teacher(images), labels, 0.5, 1.0).item()


def test_distillation_lowers_the_loss_and_the_result_evaluates(checkpoint, tmp_path, capsys):
    plan_file = paretoken.preset("evit-0.5").save(tmp_path / "plan.yaml")
    out = tmp_path / "tuned.safetensors"
    assert main(["finetune", "--plan", str(plan_file), "--checkpoint", str(checkpoint), "--train-images", "256",
                 "--eval-images", "64", "--batch-size", "64", "--epochs", "1", "--lr", "1e-3", "--out", str(out),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 4 and len(report["loss"]) == 4
    assert out.is_file() and (tmp_path / "tuned.yaml").is_file()

    plan = paretoken.load_plan(tmp_path / "tuned.yaml")
    assert plan == paretoken.preset("evit-0.5")
    assert plan.meta["checkpoint"] == str(out) and plan.meta["finetune"]["steps"] == 4

    probe = create_model("default", checkpoint=checkpoint)
    images, labels = load_split(None, probe, "calib", n=256, seed=0)  # the training images
    before = _loss_on(checkpoint, plan, images, labels, checkpoint)
    after = _loss_on(out, plan, images, labels, checkpoint)
    assert after < 0.97 * before, (before, after)  # 1.158 -> 1.081 on this machine

    proc = subprocess.run([sys.executable, "-m", "paretoken.cli", "eval", "--checkpoint", str(out), "--plan",
                           str(tmp_path / "tuned.yaml"), "--images", "64", "--json"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout, parse_constant=pytest.fail)["metrics"]  # strict JSON: null, not NaN
    assert measured["top1"] == pytest.approx(report["after"]["top1"])


def test_a_loss_that_is_not_finite_is_one_line_naming_lr_and_writes_nothing(tmp_path):
    plan_file = paretoken.preset("evit-0.5").save(tmp_path / "plan.yaml")
    weights = build_default_architecture().state_dict()
    weights["head.weight"][0, 0] = math.inf
    bad_weights = tmp_path / "inf.safetensors"
    safetensors.torch.save_file(weights, str(bad_weights))
    out = tmp_path / "tuned.safetensors"
    common = ["finetune", "--plan", str(plan_file), "--train-images", "64", "--eval-images", "32",
              "--batch-size", "32", "--max-steps", "2", "--out", str(out), "--json"]
    proc = subprocess.run([sys.executable, "-m", "paretoken.cli", *common, "--lr", "1e30"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("paretoken: error: lr: the loss became nan at step 2/2 with lr 1e+30; valid: a "
                                  "lower --lr") and proc.stderr.count("\n") == 1
    proc = subprocess.run([sys.executable, "-m", "paretoken.cli", *common, "--lr", "1e38"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == ("paretoken: error: lr: the update overflowed at step 1/2 with lr "
                                                    "1e+38; valid: a lower --lr (or --learned-lr, --budget-weight)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inf.safetensors", "plan.yaml"]
    proc = subprocess.run([sys.executable, "-m", "paretoken.cli", "eval", "--checkpoint", str(bad_weights),
                           "--preset", "evit-0.7", "--images", "8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr == (f"paretoken: error: checkpoint: the uncompressed model's logits "
                                                    f"with '{bad_weights}' are not finite; valid: weights without "
                                                    f"NaN or infinity\n")


def test_weights_the_last_step_made_non_finite_are_one_line_and_write_nothing(tmp_path):
    """The loss is checked before each step; after the loop the weights are. Here the one step's decoupled
    weight decay (x -3.4e38) and update (3.4e37) send weights of magnitude ~1 past float32's largest."""
    config = FinetuneConfig(train_images=32, eval_images=16, batch_size=32, max_steps=1, lr=3.4e37, weight_decay=10.0)
    with pytest.raises(ParetokenError, match=r"^lr: the weights became non-finite at step 1/1 with lr 3.4e\+37"):
        finetune(paretoken.preset("evit-0.5"), config, out=tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_thresholds_learn_towards_the_budget(checkpoint, tmp_path, monkeypatch):
    plan = paretoken.Plan((paretoken.Stage(2, "threshold", threshold=0.5),
                           paretoken.Stage(6, "threshold", threshold=0.5)),
                          meta={"plan_str": "threshold(threshold=0.5)@2,6", "preset": "mine"})  # as exported
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "asvit.safetensors"
    config = FinetuneConfig(checkpoint=str(checkpoint), train_images=256, eval_images=64, batch_size=64,
                            epochs=2, lr=1e-4, budget=0.3, budget_weight=20.0, learned_lr=0.1)
    report = finetune(plan, config, out="asvit.safetensors")  # relative here; absolute in the plan it writes
    assert report["budget"] == 0.3
    before, after = report["before"]["thresholds"], report["after"]["thresholds"]
    assert set(before) == {2, 6} and all(after[k] > before[k] for k in before)  # fewer tokens to meet the budget
    assert report["after"]["mean_tokens"] < report["before"]["mean_tokens"]
    written = paretoken.load_plan(out.with_suffix(".yaml"))
    assert [s.threshold for s in written.stages] == [pytest.approx(after[2]), pytest.approx(after[6])]
    assert written.meta["checkpoint"] == written.meta["weights"]["file"] == str(out)
    # the exported label and preset name described the plan before its thresholds moved
    assert written.meta["plan_str_before_finetune"] == "threshold(threshold=0.5)@2,6"
    assert written.meta["plan_str"] == plan_label(written) != "threshold(threshold=0.5)@2,6"
    assert written.meta["preset_before_finetune"] == "mine" and "preset" not in written.meta
    assert not any("token_threshold" in k for k in safetensors.torch.load_file(str(out)))


def test_predictors_train_and_travel_with_the_checkpoint(checkpoint, tmp_path):
    plan_file = paretoken.Plan((paretoken.Stage(3, "prune", keep=0.6, score="predictor"),
                                paretoken.Stage(7, "prune_fuse", keep=0.6, score="predictor"))).save(tmp_path / "p.yaml")
    out = tmp_path / "dyn.safetensors"
    report = finetune(plan_file, FinetuneConfig(checkpoint=str(checkpoint), train_images=256, eval_images=64,
                                                batch_size=64, epochs=1), out=out)
    assert report["predictor_layers"] == [3, 7]
    saved = safetensors.torch.load_file(str(out))
    assert any(k.startswith("blocks.3.token_predictor.") for k in saved)
    assert any(k.startswith("blocks.7.token_predictor.") for k in saved)
    proc = subprocess.run([sys.executable, "-m", "paretoken.cli", "eval", "--checkpoint", str(out), "--plan",
                           str(out.with_suffix(".yaml")), "--images", "64", "--json"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["metrics"]["top1"] == pytest.approx(report["after"]["top1"])
    # without the trained weights the plan is refused with one line
    proc = subprocess.run([sys.executable, "-m", "paretoken.cli", "eval", "--checkpoint", str(checkpoint), "--plan",
                           str(plan_file), "--images", "8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "token_predictor" in proc.stderr and "Traceback" not in proc.stderr


def test_an_exported_plans_stale_meta_is_kept_as_before_finetune():
    before = paretoken.preset("asvit")
    after = paretoken.Plan(tuple(dataclasses.replace(s, threshold=s.threshold + 0.01) for s in before.stages))
    exported = {"model": "default", "metrics": {"top1": 80.0}, "plan_str": plan_label(before), "preset": "asvit"}
    once = meta_after_finetune(exported, before, after)
    assert once == {"model": "default", "metrics_before_finetune": {"top1": 80.0}, "plan_str": plan_label(after),
                    "plan_str_before_finetune": plan_label(before), "preset_before_finetune": "asvit"}
    later = paretoken.Plan(tuple(dataclasses.replace(s, threshold=s.threshold + 0.01) for s in after.stages))
    twice = meta_after_finetune(once, after, later)  # tuned again: the first fine-tuning's "before" stays
    assert twice == {**once, "plan_str": plan_label(later)}
    # weights only (a hard plan): the label and the preset still describe the plan
    hard = {"metrics": {"top1": 80.0}, "plan_str": "x", "preset": "tome-r13"}
    assert meta_after_finetune(hard, paretoken.preset("tome-r13"), paretoken.preset("tome-r13")) == {
        "metrics_before_finetune": {"top1": 80.0}, "plan_str": "x", "preset": "tome-r13"}
    # an export that was no preset (preset: null) gains no preset_before_finetune
    assert "preset_before_finetune" not in meta_after_finetune({"preset": None, "plan_str": "y"}, before, after)


def test_bad_finetune_requests(checkpoint, tmp_path):
    with pytest.raises(ParetokenError, match="budget"):
        finetune(paretoken.Plan(), FinetuneConfig(budget=1.5), out=tmp_path / "x.safetensors")
    asvit = paretoken.preset("asvit")
    for plan, config in ((paretoken.preset("evit-0.7"), FinetuneConfig(budget=0.5)),
                         (asvit, FinetuneConfig(budget=0.5, learn_thresholds=False)),  # it would be ignored
                         (paretoken.Plan((paretoken.Stage(11, "threshold", threshold=0.5),), prefix_only_last=True),
                          FinetuneConfig(budget=0.5))):  # the only threshold is moot
        with pytest.raises(ParetokenError, match="--budget steers learned thresholds; valid only for a plan with"):
            finetune(plan, config, out=tmp_path / "x.safetensors")
    with pytest.raises(ParetokenError, match="is the checkpoint it starts from; valid: another --out"):
        finetune(paretoken.Plan(), FinetuneConfig(checkpoint=str(checkpoint)), out=checkpoint)
    with pytest.raises(ParetokenError, match="out: .*x.pt' has suffix '.pt'; valid: a file ending in .safetensors"):
        finetune(paretoken.Plan(), FinetuneConfig(checkpoint=str(checkpoint)), out=tmp_path / "x.pt")
    with pytest.raises(ParetokenError, match="alpha"):
        finetune(paretoken.Plan(), FinetuneConfig(alpha=2.0), out=tmp_path / "x.safetensors")
    with pytest.raises(ParetokenError, match=r"weight_decay -0.1 is invalid; valid: a number >= 0"):
        finetune(paretoken.Plan(), FinetuneConfig(weight_decay=-0.1), out=tmp_path / "x.safetensors")
    with pytest.raises(ParetokenError, match=r"warmup 1.5 is out of range; valid: 0 <= warmup <= 1"):
        finetune(paretoken.Plan(), FinetuneConfig(warmup=1.5), out=tmp_path / "x.safetensors")
    with pytest.raises(ParetokenError, match="seed: -1 is invalid; valid: an integer in 0..4294967295"):
        finetune(paretoken.Plan(), FinetuneConfig(seed=-1), out=tmp_path / "x.safetensors")
    with pytest.raises(ParetokenError, match=r"plan: meta.checkpoint 5 is invalid; valid: a string or null"):
        finetune(paretoken.Plan(meta={"checkpoint": 5}), FinetuneConfig(), out=tmp_path / "x.safetensors")
    plan_file = paretoken.preset("asvit").save(tmp_path / "p.yaml")
    text = plan_file.read_text()
    with pytest.raises(ParetokenError, match="would write its plan over --plan"):
        finetune(plan_file, FinetuneConfig(checkpoint=str(checkpoint)), out=tmp_path / "p.safetensors")
    (tmp_path / "d.yaml").mkdir()  # the plan's place is taken: refused before training, nothing written
    with pytest.raises(ParetokenError, match="out: .*d.yaml. is a folder"):
        finetune(plan_file, FinetuneConfig(checkpoint=str(checkpoint)), out=tmp_path / "d.safetensors")
    assert plan_file.read_text() == text and not (tmp_path / "p.safetensors").exists()
    assert not (tmp_path / "d.safetensors").exists() and not (tmp_path / "x.safetensors").exists()


def test_an_exported_plan_names_the_weights_it_was_searched_with():
    from paretoken.results.finetune import _resolve

    meta = {"model": "deit_tiny_patch16_224", "checkpoint": None, "pretrained": True, "data": "/imagenet"}
    plan = paretoken.Plan(meta=meta)
    assert _resolve(plan, FinetuneConfig()) == ("deit_tiny_patch16_224", None, True, "/imagenet")
    assert _resolve(plan, FinetuneConfig(checkpoint="mine.pth")) == ("deit_tiny_patch16_224", "mine.pth", False,
                                                                     "/imagenet")
    assert _resolve(plan, FinetuneConfig(model="default")) == ("default", None, False, "/imagenet")
    searched = paretoken.Plan(meta={"model": "default", "checkpoint": "/w/s.safetensors", "pretrained": False})
    assert _resolve(searched, FinetuneConfig()) == ("default", "/w/s.safetensors", False, None)
