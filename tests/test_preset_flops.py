"""Each preset lands within 0.1 GFLOPs of what its paper reports for DeiT-S."""
from __future__ import annotations

import pytest
import timm
import torch

import paretoken

PAPER_GFLOPS = {None: 4.608, "tome-r13": 2.7, "evit-0.7": 3.0, "dynamicvit-0.7": 2.9, "tofu-r13": 2.7,
                "diffrate-2.9": 2.905, "diffrate-2.3": 2.3}


@pytest.fixture(scope="module")
def deit_small():
    return timm.create_model("deit_small_patch16_224").eval()


@pytest.mark.parametrize("name", list(PAPER_GFLOPS), ids=str)
def test_preset_gflops_match_the_paper(deit_small, name):
    plan = paretoken.preset(name) if name else paretoken.Plan()
    paretoken.apply(deit_small, plan)
    gflops = paretoken.count_flops(deit_small, torch.randn(1, 3, 224, 224))
    tolerance = 5e-4 if name is None else 0.1
    assert abs(gflops - PAPER_GFLOPS[name]) <= tolerance, gflops


def test_per_image_plan_flops_average_over_images(deit_small):
    """A threshold plan's GFLOPs is the mean of the images run alone, and lies between their extremes."""
    torch.manual_seed(0)
    with torch.no_grad():
        for blk in deit_small.blocks:  # peaky attention, so images keep different counts
            blk.attn.qkv.weight.mul_(6.0)
    try:
        plan = paretoken.Plan.from_dict({"stages": [{"layer": 2, "op": "threshold", "threshold": 0.9}]})
        paretoken.apply(deit_small, plan)
        images = torch.randn(4, 3, 224, 224)
        each = [paretoken.count_flops(deit_small, images[i:i + 1]) for i in range(4)]
        assert len(set(round(e, 6) for e in each)) > 1
        assert paretoken.count_flops(deit_small, images) == pytest.approx(sum(each) / 4, rel=1e-9)
    finally:
        with torch.no_grad():
            for blk in deit_small.blocks:
                blk.attn.qkv.weight.div_(6.0)
