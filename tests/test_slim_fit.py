"""fit_slim: Patch Slimming's top-down pyramid on calibration images."""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

import paretoken
from paretoken.compress.slim import fit_slim, pyramid_plan


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
