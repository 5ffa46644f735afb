"""fit_slim: Patch Slimming's top-down pyramid on calibration images."""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

import paretoken
from paretoken.compress import applied_plan
from paretoken.compress.slim import fit_slim, pyramid_plan
from paretoken.evaluators.data import load_split
from paretoken.evaluators.models import create_model


def _kl(model, images, plan, base):
    paretoken.apply(model, plan)
    with torch.no_grad():
        return F.kl_div(model(images).log_softmax(-1), base, log_target=True, reduction="batchmean").item()


def test_top_down_pyramid_is_minimal_and_within_tolerance():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=96).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(6.0)
    images = torch.randn(16, 3, 96, 96)
    with torch.no_grad():
        base = model(images).log_softmax(-1)
    tolerance = 0.02
    plan = fit_slim(model, images, layers=[2, 5, 8], tolerance=tolerance)

    assert {s.layer for s in plan.stages} <= {2, 5, 8} and all(s.op == "slim" and s.r > 0 for s in plan.stages)
    counts, current, r = {}, 36, {s.layer: s.r for s in plan.stages}
    for layer in (2, 5, 8):  # a layer without a stage keeps what it gets
        current -= r.get(layer, 0)
        counts[layer] = current
    assert counts[2] >= counts[5] >= counts[8] >= 1  # never grows with depth
    assert counts[8] < 36  # it did compress
    assert _kl(model, images, plan, base) <= tolerance
    # Minimal: one token fewer at the first layer (chosen last, top-down) breaks the budget.
    if counts[2] > counts[5]:
        fewer = pyramid_plan(counts | {2: counts[2] - 1}, 36)
        assert _kl(model, images, fewer, base) > tolerance


def test_stages_that_cost_more_than_they_save_are_dropped():
    """On the embedded model a top-down pyramid has stages dropping a token or a few; with a cost that
    charges each stage a fixed price besides its GFLOPs (a stage's latency, say), such stages cost
    more than they save, and none is left that could go (its layers keeping their input count) at a
    lower cost within the tolerance."""
    model = create_model("default")
    images, _ = load_split(None, model, "calib", n=32)
    with torch.no_grad():
        base = model(images).log_softmax(-1)
    tolerance = 0.05

    def patched_cost(patched) -> float:  # GFLOPs, and 0.002 more per stage
        return paretoken.count_flops(patched, images[:1]) + 0.002 * len(applied_plan(patched).stages)

    def cost(plan) -> float:
        return patched_cost(paretoken.apply(model, plan))

    plain = fit_slim(model, images, layers=range(1, 12), tolerance=tolerance)
    plan = fit_slim(model, images, layers=range(1, 12), tolerance=tolerance, cost=patched_cost)
    assert cost(plan) < cost(plain) and len(plan.stages) < len(plain.stages)
    assert _kl(model, images, plan, base) <= tolerance
    for i, stage in enumerate(plan.stages):  # its tokens dropped by the next stage instead, or by none
        rest = [paretoken.Stage(s.layer, "slim", r=s.r + (stage.r if j == i + 1 else 0))
                for j, s in enumerate(plan.stages) if j != i]
        without = paretoken.Plan(tuple(rest))
        assert cost(without) >= cost(plan) or _kl(model, images, without, base) > tolerance
