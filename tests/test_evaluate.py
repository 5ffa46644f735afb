"""evaluate(): every metric, on a real timm ViT and real Fashion-MNIST images."""
from __future__ import annotations

import math
import platform
import subprocess
import sys
from dataclasses import replace

import pytest
import safetensors.torch
import torch

import paretoken
from paretoken.compress import applied_plan
from paretoken.errors import ParetokenError
from paretoken.evaluators import evaluate as ev
from paretoken.evaluators.data import load_split
from paretoken.evaluators.metrics import METRICS
from paretoken.evaluators.models import build_default_architecture
from paretoken.evaluators.speed import paired_speedup
from reference import DEFAULT_GFLOPS


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """The default architecture with seeded random weights, written as a checkpoint file."""
    torch.manual_seed(0)
    model = build_default_architecture()
    with torch.no_grad():
        for blk in model.blocks:  # peaky attention so per-image counts differ
            blk.attn.qkv.weight.mul_(4.0)
    path = tmp_path_factory.mktemp("ckpt") / "weights.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    return ev.EvalConfig(checkpoint=str(path), images=120, batch_size=40, latency_repeats=2, flops_images=4)


def test_uncompressed_metrics(config):
    metrics = ev.evaluate(paretoken.Plan(), config)
    assert set(metrics) == set(METRICS)
    assert metrics["agreement"] == 100.0 and metrics["kl"] == 0.0 and metrics["padding_pct"] == 0.0
    assert metrics["top1_drop"] == 0.0
    assert 0.0 <= metrics["top1"] <= 100.0
    assert metrics["img_per_s"] > 0 and metrics["latency_ms"] > 0
    assert 0 < metrics["speedup"] < math.inf
    assert math.isnan(metrics["peak_mem_mb"])  # CPU: no allocator peak
    assert metrics["gflops"] == pytest.approx(DEFAULT_GFLOPS, rel=1e-12)


def test_top1_agreement_and_kl_against_a_direct_computation(config):
    plan = paretoken.preset("evit-0.5")
    metrics = ev.evaluate(plan, config)
    model = ev.prepare(config).model
    images, labels = load_split(None, model, "eval", n=config.images, seed=config.seed)
    with torch.no_grad():
        paretoken.apply(model, paretoken.Plan())
        base = model(images)
        paretoken.apply(model, plan)
        out = model(images)
    assert metrics["top1"] == pytest.approx(100.0 * (out.argmax(1) == labels).float().mean().item())
    assert metrics["agreement"] == pytest.approx(100.0 * (out.argmax(1) == base.argmax(1)).float().mean().item())
    p = base.softmax(1)
    kl = (p * (p.log() - out.log_softmax(1))).sum(1).mean().item()
    assert metrics["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert metrics["agreement"] < 100.0 and metrics["gflops"] < DEFAULT_GFLOPS


def test_speedup_leaves_the_model_running_the_plan_and_needs_speed(config):
    plan = paretoken.preset("evit-0.5")
    assert 0 < ev.evaluate(plan, config)["speedup"] < math.inf
    assert applied_plan(ev.prepare(config).model) == plan
    assert math.isnan(ev.evaluate(plan, replace(config, speed=False))["speedup"])


@pytest.mark.parametrize(("images", "batch_size", "order"), [
    (120, 40, "PPBBP"),  # batch 0 a warm-up; 1: base right after the plan; 2: right before it
    (30, 40, "PB"),  # one batch, of all 30 images: timed, and paired
])
def test_speedup_pairs_the_timed_batches_and_leaves_the_plan(config, monkeypatch, images, batch_size, order):
    small = replace(config, images=images, batch_size=batch_size)
    ev.prepare(small)  # the uncompressed logits, cached before the recording starts
    calls, real = [], ev.timed_forward

    def recording(model, batch):
        calls.append((applied_plan(model), len(batch)))
        return real(model, batch)

    monkeypatch.setattr(ev, "timed_forward", recording)
    plan = paretoken.preset("tome-r13")
    ev.evaluate(plan, small)
    assert "".join("P" if p == plan else "B" for p, _ in calls) == order
    assert all(p in (plan, paretoken.Plan()) for p, _ in calls)
    assert {n for _, n in calls} == {min(images, batch_size)}
    assert applied_plan(ev.prepare(small).model) == plan


def test_speedup_and_img_per_s_come_from_the_right_timings(config, monkeypatch):
    """With made-up times (the plan's batches 5, 1, 2 s, the first a warm-up; the uncompressed model's
    3 and 6 s on the two paired batches) speedup is 3 and img_per_s 40 images / 1.5 s: an inverted
    ratio, a warm-up batch paired or timed, or a pair of two batches would each give another figure."""
    small = replace(config, images=120, batch_size=40)
    ev.prepare(small)
    plan = paretoken.preset("evit-0.5")
    times = {True: iter([5.0, 1.0, 2.0]), False: iter([3.0, 6.0])}
    real = ev.timed_forward

    def fixed(model, batch):
        logits, _ = real(model, batch)
        return logits, next(times[applied_plan(model) == plan])

    monkeypatch.setattr(ev, "timed_forward", fixed)
    metrics = ev.evaluate(plan, small)
    assert metrics["speedup"] == pytest.approx(3.0)
    assert metrics["img_per_s"] == pytest.approx(40 / 1.5)
    with pytest.raises(ParetokenError, match="speedup_pairs: 0 is invalid; valid: an integer >= 1"):
        replace(small, speedup_pairs=0)


def test_predictor_plans_measure_the_same_with_and_without_speedup_pairs(tmp_path):
    """Each pair re-applies the plan after an uncompressed forward, so the predictors are attached again
    from the checkpoint's weights: the accuracy figures equal those of a pass without pairs."""
    torch.manual_seed(0)
    model = build_default_architecture()
    plan = paretoken.Plan((paretoken.Stage(3, "prune", keep=0.5, score="predictor"),
                           paretoken.Stage(7, "prune_fuse", keep=0.6, score="predictor")))
    paretoken.apply(model, plan, init_predictors=True)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "token_predictor" in name:
                weight.normal_()  # not an initialisation a fresh predictor would repeat
    path = tmp_path / "with_predictors.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    config = ev.EvalConfig(checkpoint=str(path), images=120, batch_size=40, latency_repeats=1, flops_images=2)
    paired = ev.evaluate(plan, config)
    alone = ev.evaluate(plan, replace(config, speed=False))
    assert {k: paired[k] for k in ("top1", "agreement", "kl", "gflops")} == {
        k: alone[k] for k in ("top1", "agreement", "kl", "gflops")}
    assert paired["agreement"] < 100.0 and 0 < paired["speedup"] < math.inf


def test_paired_speedup_cancels_drift_and_resists_an_outlier_pair():
    """The machine slows down steadily (base seconds 1.0, 1.5, 2.0, 2.5 at the four pairs); the plan
    runs three times as fast as the base next to it, but for one outlier. The speed-up is 3; the
    plan's median over the base's first timing would say 2.4."""
    base = [1.0, 1.5, 2.0, 2.5]
    plan = [1.0 / 3, 1.5 / 3, 0.01, 2.5 / 3]
    assert paired_speedup(base, plan) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        paired_speedup(base, plan[:3])


def test_baseline_is_computed_once_per_config(config):
    ev.evaluate(paretoken.Plan(), config)
    bench = ev.prepare(config)
    ev.evaluate(paretoken.preset("tome-r8"), config)
    assert ev.prepare(config) is bench
    other = ev.EvalConfig(**{**config.__dict__, "seed": 1})
    assert ev.prepare(other) is not bench


def test_per_image_plan_reports_padding(config):
    plan = paretoken.Plan.from_dict({"stages": [{"layer": 2, "op": "threshold", "threshold": 1.0}]})
    metrics = ev.evaluate(plan, config)
    assert metrics["padding_pct"] > 0.0
    assert metrics["gflops"] < DEFAULT_GFLOPS


def test_bad_device():
    with pytest.raises(paretoken.ParetokenError, match="device: 'cuda:7'"):
        ev.evaluate(paretoken.Plan(), ev.EvalConfig(device="cuda:7"))


@pytest.mark.parametrize("name", ["mps", "meta", "cpu:1", "tpu", "cuda:x"])
def test_devices_other_than_cpu_and_cuda_are_refused(name):
    with pytest.raises(paretoken.ParetokenError, match=rf"^device: '{name}' is (unknown|not available)"):
        ev.resolve_device(name)


def test_auto_device_is_cuda_where_present():
    assert ev.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


_FAULTS = """
import resource, sys, torch
from paretoken.evaluators.models import build_default_architecture
from paretoken.evaluators.speed import timed_forward, timing_context
torch.set_num_threads(1)
model = build_default_architecture().eval()
images = torch.randn(32, *model.pretrained_cfg["input_size"])
forward = (lambda: timed_forward(model, images)) if sys.argv[1] == "timed" else (lambda: model(images))
with torch.inference_mode():
    for _ in range(4):
        forward()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        forward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, timing_context()["host_memory"])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_timed_cpu_forwards_keep_the_heap_and_take_no_page_faults():
    """Timed CPU forwards run with glibc's heap kept (speed.keep_host_memory): none of the page faults
    that the default allocator's fresh mappings cost an untimed forward of the same model."""
    runs = {}
    for mode in ("plain", "timed"):
        done = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        faults, memory = done.stdout.split(maxsplit=1)
        runs[mode] = int(faults), memory.strip()
    assert runs["plain"][0] > 1000 and runs["timed"][0] < runs["plain"][0] / 10
    assert runs["timed"][1].startswith("kept") and runs["plain"][1] == "allocator default"
