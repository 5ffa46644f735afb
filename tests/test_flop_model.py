"""GFLOPs counted from token counts (evaluators/flop_model.py) against fvcore's trace of each image alone.

fvcore is the reference: every preset, one plan per op and score, a predictor plan, a prefix-only plan
and plans sampled by ``mixed``, on the four model families the reducers are tested on, must count
within 1e-6 of the trace of each image by itself (fvcore rounds an einsum's count to four significant
digits, the only difference there is: well under 1e-6 of a forward).
"""
from __future__ import annotations

import optuna
import pytest
import timm
import torch
from timm.data import resolve_data_config

import paretoken
from paretoken.compress import Plan, Stage, apply
from paretoken.compress.ops import get_op, op_names
from paretoken.compress.presets import PRESETS
from paretoken.errors import ParetokenError
from paretoken.evaluators.evaluate import EvalConfig, evaluate
from paretoken.evaluators.flop_model import counted_gflops, flop_model, plan_counts
from paretoken.evaluators.flops import count_flops
from paretoken.evaluators.models import create_model
from paretoken.spaces import get_space

MODELS = ["default", "deit_tiny_patch16_224", "deit_small_distilled_patch16_224", "deit3_small_patch16_224"]

#: An amount of every registered op (a new op must add one: its counted FLOPs are then tested too).
OP_AMOUNTS = {"prune": {"keep": 0.7}, "prune_fuse": {"keep": 0.6}, "merge": {"r": 9}, "joint": {"mass": 0.9, "sim": 0.3},
              "threshold": {"threshold": 0.9}, "slim": {"keep": 0.7}, "pitome": {"r": 7, "margin": 0.4},
              "prune_merge": {"pruned": 10, "merged": 7}}


def _plans() -> dict[str, tuple[Plan, bool]]:
    """Name -> (plan, needs fresh predictors)."""
    plans = {name: (paretoken.preset(name), False) for name in PRESETS}
    for op in op_names():
        for score in get_op(op).search_scores:
            stages = tuple(Stage(layer=layer, op=op, score=score, **OP_AMOUNTS[op]) for layer in (1, 4, 7))
            plans[f"{op}/{score}"] = (Plan(stages=stages), False)
    plans["prune/predictor"] = (Plan(stages=tuple(Stage(layer=layer, op="prune", score="predictor", keep=0.7)
                                                  for layer in (3, 6, 9))), True)
    plans["merge+prefix_only_last"] = (Plan(stages=(Stage(layer=2, op="merge", r=20),), prefix_only_last=True), False)
    space = get_space("mixed")
    for seed in range(3):
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
        plans[f"mixed/{seed}"] = (space.sample(trial, 12), False)
    return plans


PLANS = _plans()


def test_every_op_has_an_amount_here():
    assert set(OP_AMOUNTS) == set(op_names())


@pytest.fixture(scope="module", params=MODELS)
def model_and_images(request):
    torch.manual_seed(0)
    model = create_model(request.param) if request.param == "default" else timm.create_model(request.param)
    if request.param != "default":  # timm's initialisation attends almost uniformly (DeiT-III's layer scales are
        with torch.no_grad():  # 1e-5): sharpen it so that per-image plans keep different counts per image
            for block in model.blocks:
                block.attn.qkv.weight.mul_(8)
                for scale in (block.ls1, block.ls2):
                    if hasattr(scale, "gamma"):
                        scale.gamma.fill_(1.0)
    images = torch.randn(2, *resolve_data_config(model=model)["input_size"], generator=torch.Generator().manual_seed(1))
    return model.eval(), images


def test_counted_gflops_equal_fvcore_traces_of_each_image_alone(model_and_images):
    model, images = model_and_images
    counting = flop_model(model)
    differing = 0
    for name, (plan, predictors) in PLANS.items():
        apply(model, plan, init_predictors=predictors)
        counts = plan_counts(model, images)
        counted = counting.multiply_adds(plan, counts).double() / 1e9
        alone = range(len(images)) if plan.per_image else range(1)  # a static plan's counts are every image's
        for i in alone:
            traced = count_flops(model, images[i:i + 1])
            assert counted[i].item() == pytest.approx(traced, rel=1e-6), (name, i)
        if not plan.per_image:
            assert bool((counts == counts[0]).all()), name
        differing += bool((counts != counts[0]).any())
    assert differing >= 2  # the per-image plans' counts do differ between these images


def test_counting_leaves_the_model_as_it_was_and_needs_no_plan():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=3).eval()
    images = torch.randn(2, 3, 224, 224)
    plain = count_flops(model, images)
    assert counted_gflops(model, images) == pytest.approx(plain, rel=1e-12)  # no plan applied
    plan = paretoken.Plan(stages=(Stage(layer=1, op="merge", r=30),))
    apply(model, plan)
    with torch.no_grad():
        before = model(images)
    counted = paretoken.count_flops(model, images)
    assert counted == pytest.approx(count_flops(model, images), rel=1e-12) and counted < plain
    with torch.no_grad():
        assert torch.equal(model(images), before)  # calibrated on a copy: the plan and weights are as they were
    assert paretoken.compress.applied_plan(model) == plan


def test_a_block_that_mixes_tokens_beyond_attention_is_refused():
    """Counting assumes a block's MLP works token by token; one that does not is a one-line error."""

    class TokenMixingMlp(torch.nn.Module):
        def __init__(self, mlp: torch.nn.Module) -> None:
            super().__init__()
            self.mlp = mlp

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mlp(x) + (x @ x.transpose(1, 2)) @ x

    model = timm.create_model("deit_tiny_patch16_224", depth=2)
    model.blocks[1].mlp = TokenMixingMlp(model.blocks[1].mlp)
    with pytest.raises(ParetokenError, match=r"model: block 1 .* fvcore traces .*; valid: --flops trace"):
        flop_model(model)


def test_a_trial_counts_every_image_and_trace_keeps_the_first_ones():
    plan = paretoken.preset("asvit")
    config = EvalConfig(images=40, batch_size=20, speed=False, flops_images=4)
    counted = evaluate(plan, config)["gflops"]
    traced = evaluate(plan, EvalConfig(images=40, batch_size=20, speed=False, flops_images=4, flops="trace"))["gflops"]
    model = create_model("default")
    from paretoken.evaluators.data import load_split

    images = load_split(None, model, "eval", n=40, seed=0)[0]
    apply(model, plan)
    every = count_flops(model, images, per_image=True, max_images=40)
    first = count_flops(model, images, per_image=True, max_images=4)
    assert counted == pytest.approx(every, rel=1e-6) and traced == pytest.approx(first, rel=1e-9)
    assert counted != pytest.approx(traced, rel=1e-6)  # the first four images are not the mean of forty
    static = paretoken.preset("tome-r13")
    assert evaluate(static, config)["gflops"] == pytest.approx(
        evaluate(static, EvalConfig(images=40, batch_size=20, speed=False, flops="trace"))["gflops"], rel=1e-9)


def test_an_unknown_flops_method_is_one_line():
    with pytest.raises(ParetokenError, match="flops: 'exact' is unknown; valid: count, trace"):
        EvalConfig(flops="exact")
