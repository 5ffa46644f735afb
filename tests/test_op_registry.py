"""The op registry: a new op declared and registered in this module alone validates, applies to a
timm ViT, counts FLOPs and is sampled by ``mixed``; the registry refuses malformed ops."""
from __future__ import annotations

import copy

import optuna
import pytest
import timm
import torch

import paretoken
from paretoken.compress import ops, tokens
from paretoken.compress.ops import KEEP, R, Grid, OpSpec
from paretoken.results.query import plan_label
from paretoken.spaces import get_space
from paretoken.spaces.families import mixed_ops


def attn_merge(x, size, score, metric, prefix: int, keep: float | None = None, r: int | None = None):
    """Keep the top patch tokens by ``score``; merge every other one into its most similar kept token."""
    k = tokens.count_to_keep(tokens.patch_counts(size, prefix), keep, r)
    kept = tokens.topk_mask(score, size, prefix, k)
    kept_patches = kept.clone()
    kept_patches[:, :prefix] = False
    metric = torch.nn.functional.normalize(metric.float(), dim=-1)
    similarity = (metric @ metric.transpose(1, 2)).masked_fill(~kept_patches[:, None, :], tokens.NEG)
    merged = ~kept & (size > 0)
    x, size = tokens.merge_into(x, size, merged, similarity.argmax(dim=-1))
    return tokens.compact(x, size, size > 0)


ATTN_MERGE = OpSpec(
    name="attn_merge", summary="keep the top tokens by score, merge the rest into their most similar kept token",
    source="this test", amounts=((KEEP, R),), scores=("cls_attn", "head_weighted"),
    reduce=lambda x, size, info, prefix, **amount: attn_merge(x, size, info["score"], info["keys"], prefix, **amount),
    needs=frozenset({"keys"}), grids={"keep": Grid(0.5, 0.9, 0.1)})


@pytest.fixture
def registered():
    ops.register(ATTN_MERGE)
    yield ATTN_MERGE
    ops.unregister(ATTN_MERGE.name)


def test_a_plan_with_the_new_op_validates(registered):
    plan = paretoken.Plan.from_dict({"stages": [{"layer": 2, "op": "attn_merge", "keep": 0.5}]})
    assert plan.stages[0].score == "cls_attn" and plan.stages[0].keep == 0.5 and not plan.per_image
    assert plan_label(plan) == "attn_merge(keep=0.5)@2"
    with pytest.raises(paretoken.ParetokenError, match="score 'keys' does not fit op 'attn_merge'; "
                                                       "valid: cls_attn, head_weighted"):
        paretoken.Stage(2, "attn_merge", score="keys", keep=0.5)
    with pytest.raises(paretoken.ParetokenError, match="needs exactly one of keep or r; got 0"):
        paretoken.Stage(2, "attn_merge")


def test_the_new_op_applies_to_a_timm_vit_and_counts_flops(registered):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=96).eval()  # 36 patches
    images = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        full_gflops = paretoken.count_flops(model, images)
        plan = paretoken.Plan.from_dict({"stages": [{"layer": 1, "op": "attn_merge", "keep": 0.5},
                                                    {"layer": 4, "op": "attn_merge", "r": 6}]})
        patched = paretoken.apply(copy.deepcopy(model), plan)
        batched = patched(images)
        alone = torch.cat([patched(image[None]) for image in images])
    counts = paretoken.token_counts(patched)[0].tolist()
    assert counts == [37] + [19] * 3 + [13] * 8  # 36 patches -> 18 -> 12, plus the class token
    torch.testing.assert_close(batched, alone)
    with torch.no_grad():
        gflops = paretoken.count_flops(patched, images)
    assert 0 < gflops < 0.6 * full_gflops


def test_mixed_samples_the_new_op_and_inverts_it(registered):
    space = get_space("mixed")
    assert "attn_merge" in mixed_ops() and "attn_merge" in space.description
    assert any(p.name == "keep_<l>" and "attn_merge" in p.when and p.values == "float 0.5..0.9 step 0.1"
               for p in space.params)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sampled = []
    for _ in range(60):
        trial = study.ask()
        plan = space.sample(trial, 12)
        sampled += [s for s in plan.stages if s.op == "attn_merge"]
        study.tell(trial, 0.0)
    assert sampled and all(s.keep in (0.5, 0.6, 0.7, 0.8, 0.9) for s in sampled)
    plan = paretoken.Plan((paretoken.Stage(3, "attn_merge", score="head_weighted", keep=0.7),))
    params = space.params_for(plan, 12)
    assert params is not None and params["op_3"] == "attn_merge" and params["keep_3"] == 0.7
    assert space.sample(optuna.trial.FixedTrial(params), 12) == plan


def test_unregistering_restores_the_built_in_ops(registered):
    ops.unregister(registered.name)
    try:
        assert mixed_ops() == ("prune", "prune_fuse", "merge", "joint", "threshold", "pitome", "prune_merge")
        with pytest.raises(paretoken.ParetokenError, match="op 'attn_merge' is unknown; valid: prune, prune_fuse, "
                                                           "merge, joint, threshold, slim, pitome, prune_merge"):
            paretoken.Stage(1, "attn_merge", keep=0.5)
    finally:
        ops.register(registered)  # for the fixture's teardown


@pytest.mark.parametrize("change,message", [
    (dict(name="merge"), "registered already"),
    (dict(name="two words"), "must be an identifier"),
    (dict(scores=("attention",)), "valid: a non-empty tuple of cls_attn, head_weighted, keys, predictor"),
    (dict(needs=frozenset({"values"})), "needs \\['values'\\]"),
    (dict(grids={"mass": Grid(0.1, 0.9, 0.1)}), "a grid names a field it has not; valid: keep, r"),
    (dict(grids={}), "one grid for one field of each amount group"),
    (dict(grids={"keep": Grid(0.5, 0.9, 0.1), "r": Grid(1, 8, 1)}), "one grid for one field of each amount group"),
    (dict(amounts=((ops.Amount("keep", True, lambda v: v > 0, "an integer > 0", "other"),),)),
     "field 'keep' is declared already with another meaning"),
])
def test_the_registry_refuses_malformed_ops(change, message):
    import dataclasses

    with pytest.raises(paretoken.ParetokenError, match=message):
        ops.register(dataclasses.replace(ATTN_MERGE, **change))
    assert "attn_merge" not in ops.op_names()


def test_every_built_in_op_declares_what_it_needs():
    for spec in ops.ops():
        assert spec.summary and spec.source and spec.scores[0] in spec.scores
        assert spec.per_image == (spec.name in ("joint", "threshold"))
    assert ops.get_op("slim").needs == {"full"} and not ops.get_op("slim").mixed
    assert {s.name for s in ops.ops() if "keys" in s.needs} == {"merge", "joint", "pitome"}
    assert {s.name for s in ops.ops() if "fuse" in s.option_names} == {"merge", "pitome", "prune_merge"}


def test_the_docs_op_table_is_the_registry():
    """docs/plans.md's op table says what the registry declares, row for row."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "plans.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    start = lines.index("| op | amount | scores | per image | source |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    expected = [[r["op"], r["amount"], r["scores"], r["per image"], r["source"]] for r in ops.op_table()]
    assert rows == expected
