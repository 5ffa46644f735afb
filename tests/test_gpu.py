"""On a CUDA device: the patched model under AMP matches fp32 on CPU, per-image batching holds, peak
memory and speedup are measured."""
from __future__ import annotations

import math

import pytest
import timm
import torch

import paretoken

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("preset", ["tome-r13", "evit-0.7", "asvit", "jmp"])
def test_amp_on_gpu_matches_cpu(preset):
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224").eval()
    images = torch.randn(8, 3, 224, 224)
    paretoken.apply(model, paretoken.preset(preset))
    with torch.no_grad():
        cpu = model(images)
        model.cuda()
        with torch.autocast("cuda", dtype=torch.float16):
            gpu = model(images.cuda()).float().cpu()
    assert (cpu.argmax(1) == gpu.argmax(1)).float().mean() >= 0.75
    torch.testing.assert_close(gpu, cpu, atol=5e-2, rtol=5e-2)


def test_per_image_batched_equals_alone_on_gpu():
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224").eval().cuda()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(6.0)
    plan = paretoken.Plan.from_dict({"stages": [{"layer": 3, "op": "threshold", "threshold": 0.8},
                                                {"layer": 6, "op": "joint", "mass": 0.8, "sim": 0.3}]})
    paretoken.apply(model, plan)
    images = torch.randn(6, 3, 224, 224, device="cuda")
    with torch.no_grad():
        batched = model(images)
        for i in range(6):
            torch.testing.assert_close(batched[i], model(images[i:i + 1])[0], atol=1e-4, rtol=1e-4)


def test_peak_memory_is_the_plans_activations():
    """peak_mem_mb counts what a forward allocates above what is allocated before it, so it
    falls with the tokens a plan keeps (speed timed too: speedup's uncompressed forwards in the pass do
    not count)."""
    from paretoken.evaluators.evaluate import EvalConfig, evaluate

    config = EvalConfig(images=2000, batch_size=100, device="cuda")
    full = evaluate(paretoken.Plan(), config)["peak_mem_mb"]
    merged = evaluate(paretoken.preset("tome-r16"), config)["peak_mem_mb"]
    assert 0 < merged < full


def test_speedup_is_measured_on_gpu():
    """speedup pairs the plan's timed batches with uncompressed forwards on the GPU too (a tiny model at
    batch 100 may be launch-bound there, so only that it is a speed-up figure is asserted)."""
    from paretoken.evaluators.evaluate import EvalConfig, evaluate

    metrics = evaluate(paretoken.preset("evit-0.5"), EvalConfig(images=400, batch_size=100, device="cuda"))
    assert 0 < metrics["speedup"] < math.inf and metrics["img_per_s"] > 0
