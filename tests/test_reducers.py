"""The ops' reducers on real timm ViTs against the slow reference in tests/reference.py."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import paretoken
from paretoken.compress.ops import get_op
from paretoken.compress.ops.merge import bipartite_merge
from reference import reference_forward

# (timm name, image size): small images keep the slow reference fast; the patch is the same.
MODELS = [
    ("deit_tiny_patch16_224", 96),
    ("deit_small_distilled_patch16_224", 96),  # two prefix tokens
    ("deit3_small_patch16_224", 96),  # LayerScale
    ("vit_small_patch16_224", 96),
]


def _model(name: str, img: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=img).eval()
    with torch.no_grad():  # peakier attention than the random init: clear score gaps, no near-ties
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(6.0)
    return model


@pytest.fixture(scope="module", params=MODELS, ids=[m[0] for m in MODELS])
def model_and_images(request):
    name, img = request.param
    torch.manual_seed(1)
    return _model(name, img), torch.randn(3, 3, img, img)


PLANS = {
    "prune": [dict(layer=1, op="prune", keep=0.6), dict(layer=3, op="prune", r=5, score="head_weighted")],
    "prune_fuse": [dict(layer=1, op="prune_fuse", keep=0.7), dict(layer=4, op="prune_fuse", keep=0.5)],
    "merge": [dict(layer=0, op="merge", r=6), dict(layer=2, op="merge", keep=0.8), dict(layer=5, op="merge", r=9)],
    "joint": [dict(layer=1, op="joint", mass=0.7, sim=0.3), dict(layer=4, op="joint", mass=0.8, sim=0.0,
                                                                  score="head_weighted")],
    "threshold": [dict(layer=1, op="threshold", threshold=0.8), dict(layer=4, op="threshold", threshold=1.0,
                                                                      score="cls_attn")],
    "slim": [dict(layer=1, op="slim", keep=0.8), dict(layer=2, op="slim", keep=0.8), dict(layer=6, op="slim", r=4)],
    "merge_fuse": [dict(layer=0, op="merge", r=6, fuse="drop"), dict(layer=3, op="merge", r=5, fuse="mlerp")],
    "pitome": [dict(layer=0, op="pitome", r=5, margin=0.75), dict(layer=2, op="pitome", keep=0.8, margin=0.3,
                                                                  fuse="mlerp"), dict(layer=5, op="pitome", r=40, margin=0.1)],
    "prune_merge": [dict(layer=1, op="prune_merge", pruned=3, merged=6),
                    dict(layer=4, op="prune_merge", pruned=0, merged=4, score="head_weighted", fuse="mlerp"),
                    dict(layer=6, op="prune_merge", pruned=30, merged=30)],
    "new_after_threshold": [dict(layer=1, op="threshold", threshold=0.8), dict(layer=2, op="pitome", r=4, margin=0.5),
                            dict(layer=4, op="prune_merge", pruned=2, merged=3),
                            dict(layer=6, op="merge", r=3, fuse="mlerp"), dict(layer=7, op="merge", r=2, fuse="drop")],
    "mixed": [dict(layer=1, op="threshold", threshold=0.7), dict(layer=3, op="merge", r=4),
              dict(layer=5, op="prune_fuse", keep=0.6), dict(layer=7, op="joint", mass=0.9, sim=0.2)],
}


def test_empty_plan_is_bit_exact(model_and_images):
    model, images = model_and_images
    model = copy.deepcopy(model)
    with torch.no_grad():
        before = model(images)
        paretoken.apply(model, paretoken.Plan())
        after = model(images)
    assert torch.equal(before, after)


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_matches_slow_reference(model_and_images, plan_name):
    model, images = model_and_images
    stages = PLANS[plan_name]
    patched = paretoken.apply(copy.deepcopy(model), paretoken.Plan.from_dict({"stages": stages}))
    with torch.no_grad():
        logits = patched(images)
    counts = paretoken.compress.token_counts(patched)
    for i, image in enumerate(images):
        ref_logits, ref_counts = reference_forward(model, image, stages)
        assert counts[i].tolist() == ref_counts
        torch.testing.assert_close(logits[i], ref_logits, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("plan_name", ["none", "merge", "mixed", "last_block"])
def test_prefix_only_last_block_matches_the_full_slow_reference(model_and_images, plan_name, fused):
    """The last block computing only the prefix tokens changes no logit: the reference runs every
    token through it (and a stage in it, which ``prefix_only_last`` skips as moot)."""
    model, images = model_and_images
    stages = {**PLANS, "none": [],
              "last_block": [dict(layer=2, op="merge", r=6), dict(layer=11, op="prune", keep=0.5)]}[plan_name]
    patched = paretoken.apply(copy.deepcopy(model), paretoken.Plan.from_dict({"stages": stages,
                                                                             "prefix_only_last": True}))
    for blk in patched.blocks:
        blk.attn.fused_attn = fused
    with torch.no_grad():
        logits = patched(images)
    counts = paretoken.compress.token_counts(patched)
    prefix = model.num_prefix_tokens
    for i, image in enumerate(images):
        ref_logits, ref_counts = reference_forward(model, image, stages)
        assert counts[i].tolist() == ref_counts[:-1] + [prefix]
        torch.testing.assert_close(logits[i], ref_logits, atol=2e-4, rtol=1e-4)


class _CountedLinear(torch.nn.Linear):
    calls = 0

    def forward(self, x):
        _CountedLinear.calls += 1
        return super().forward(x)


def test_prefix_only_last_block_with_a_qkv_projection_that_is_not_a_plain_linear():
    """A qkv that is not a plain Linear (an adapter, a quantised layer) is called, not sliced."""
    model = _model("deit_tiny_patch16_224", 96)
    torch.manual_seed(1)
    images = torch.randn(2, 3, 96, 96)
    last = model.blocks[-1].attn
    wrapped = _CountedLinear(last.qkv.in_features, last.qkv.out_features)
    wrapped.load_state_dict(last.qkv.state_dict())
    last.qkv = wrapped
    patched = paretoken.apply(copy.deepcopy(model), paretoken.Plan(prefix_only_last=True))
    _CountedLinear.calls = 0
    with torch.no_grad():
        logits = patched(images)
    assert _CountedLinear.calls == 1
    for i, image in enumerate(images):
        torch.testing.assert_close(logits[i], reference_forward(model, image, [])[0], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("plan_name", ["threshold", "joint", "mixed", "new_after_threshold"])
def test_batched_equals_one_at_a_time(model_and_images, plan_name):
    model, images = model_and_images
    patched = paretoken.apply(copy.deepcopy(model), paretoken.Plan.from_dict({"stages": PLANS[plan_name]}))
    with torch.no_grad():
        batched = patched(images)
        counts = paretoken.compress.token_counts(patched)
        for i in range(len(images)):
            alone = patched(images[i:i + 1])
            assert paretoken.compress.token_counts(patched)[0].tolist() == counts[i].tolist()
            torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-5)
            assert batched[i].argmax() == alone[0].argmax()


def test_slim_attention_in_cache_chunks_equals_one_image_at_a_time():
    """slim's attention runs a few images at a time on CPU (its probabilities stay in cache): on the
    default model a batch of 30 is 3 chunks, and gives the logits and tokens of each image alone."""
    from paretoken.compress.scores import cache_chunks
    from paretoken.evaluators.models import create_model

    model = paretoken.apply(create_model("default"), paretoken.preset("slim"))
    torch.manual_seed(2)
    images = torch.randn(30, 1, 28, 28)
    chunks = cache_chunks(torch.empty(30, 2, 197, 32))
    assert len(chunks) == 3 and [i for rows in chunks for i in range(30)[rows]] == list(range(30))
    with torch.no_grad():
        batched = model(images)
        alone = torch.cat([model(images[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert (batched.argmax(-1) == alone.argmax(-1)).all()


@pytest.mark.parametrize("plan_name", ["joint", "mixed"])
def test_half_precision_batched_equals_one_at_a_time(plan_name):
    """In float16, merged-away rows once divided 0 by 0 and the NaN reached other images' attention
    through the padding slots."""
    model = _model("deit_tiny_patch16_224", 96).half()
    torch.manual_seed(1)
    images = torch.randn(3, 3, 96, 96).half()
    patched = paretoken.apply(model, paretoken.Plan.from_dict({"stages": PLANS[plan_name]}))
    with torch.no_grad():
        batched = patched(images)
        assert len(set(paretoken.compress.token_counts(patched)[:, -1].tolist())) > 1  # padding was used
        alone = torch.cat([patched(images[i:i + 1]) for i in range(len(images))])
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched.float(), alone.float(), atol=1e-2, rtol=1e-2)


def test_per_image_counts_really_differ():
    """The batched tests above mean something only if images keep different counts."""
    model = _model("deit_tiny_patch16_224", 96)
    torch.manual_seed(3)
    patched = paretoken.apply(model, paretoken.Plan.from_dict({"stages": PLANS["threshold"]}))
    with torch.no_grad():
        patched(torch.randn(8, 3, 96, 96))
    assert len(set(paretoken.compress.token_counts(patched)[:, -1].tolist())) > 1


@pytest.mark.parametrize("op,amount", [("prune", dict(keep=0.05)), ("prune_fuse", dict(keep=0.05)),
                                       ("merge", dict(r=1000)), ("joint", dict(mass=0.05, sim=0.9)),
                                       ("threshold", dict(threshold=50.0)), ("slim", dict(r=1000)),
                                       ("pitome", dict(r=1000, margin=0.0)),
                                       ("prune_merge", dict(pruned=1000, merged=1000)),
                                       ("merge", dict(r=1000, fuse="mlerp")), ("merge", dict(r=1000, fuse="drop"))])
@pytest.mark.parametrize("prefix", [1, 2])
def test_prefix_tokens_survive(op, amount, prefix):
    """Prefix tokens are never dropped or merged, and stay first, however aggressive the op."""
    torch.manual_seed(0)
    B, N, C = 2, 20, 8
    x = torch.randn(B, N, C)
    x[:, :prefix] = 100.0 + torch.arange(prefix)[:, None].float()  # recognisable prefix tokens
    size = torch.ones(B, N)
    score = torch.rand(B, N)
    score[:, :prefix] = 0.0  # the prefix must survive even with the worst score
    keys = torch.randn(B, N, C)
    out, out_size = get_op(op).reduce(x, size, {"score": score, "keys": keys}, prefix, **amount)
    assert torch.equal(out[:, :prefix], x[:, :prefix])
    assert torch.equal(out_size[:, :prefix], torch.ones(B, prefix))
    assert out.shape[1] > prefix  # at least one patch token is kept
    assert torch.allclose(out_size.sum(1), size.sum(1)) or op in ("prune", "slim", "joint", "threshold",
                                                                  "prune_merge") or amount.get("fuse") == "drop"


def test_merge_conserves_patches_and_mean():
    """Merging moves mass, never loses it: sizes add up and the size-weighted mean is unchanged."""
    torch.manual_seed(0)
    x, size, keys = torch.randn(2, 31, 6), torch.ones(2, 31), torch.randn(2, 31, 6)
    out, out_size = bipartite_merge(x, size, keys, prefix=1, r=10)
    assert out.shape[1] == 21
    torch.testing.assert_close(out_size.sum(1), size.sum(1))
    torch.testing.assert_close((out * out_size[..., None]).sum(1), (x * size[..., None]).sum(1))


def test_token_counts_follow_the_plan():
    """Counts after each block, from the plan's arithmetic (not from running a reference)."""
    model = timm.create_model("deit_small_patch16_224").eval()
    images = torch.randn(2, 3, 224, 224)
    cases = {
        "tome-r13": [197 - 13 * (i + 1) for i in range(12)],
        "evit-0.7": [197] * 3 + [1 + 137 + 1] * 3 + [1 + 97 + 1] * 3 + [1 + 69 + 1] * 3,
        "dynamicvit-0.7": [197] * 3 + [1 + 137] * 3 + [1 + 96] * 3 + [1 + 67] * 3,
    }
    for name, expected in cases.items():
        paretoken.apply(model, paretoken.preset(name))
        with torch.no_grad():
            model(images)
        counts = paretoken.compress.token_counts(model)
        assert counts.tolist() == [expected, expected], name


def test_refuses_models_it_cannot_patch():
    model = timm.create_model("vit_small_patch16_224", global_pool="avg")
    with pytest.raises(paretoken.ParetokenError, match="global_pool='avg'"):
        paretoken.apply(model, paretoken.Plan())
    cnn = timm.create_model("resnet18")
    with pytest.raises(paretoken.ParetokenError, match="not a timm VisionTransformer"):
        paretoken.apply(cnn, paretoken.Plan())


def test_layer_out_of_range_for_the_model():
    model = timm.create_model("deit_tiny_patch16_224")
    plan = paretoken.Plan.from_dict({"stages": [{"layer": 12, "op": "prune", "keep": 0.5}]})
    with pytest.raises(paretoken.ParetokenError, match=r"layer 12 is out of range; valid: 0..11"):
        paretoken.apply(model, plan)


def test_row_selection_and_addition_equal_gather_and_scatter_add():
    """tokens.gather_tokens / add_tokens_ (rows of the flattened batch) against torch's gather and
    scatter_add with the index expanded over the channels, on a non-contiguous x, with gradients."""
    from paretoken.compress.tokens import add_tokens_, gather_tokens

    torch.manual_seed(3)
    x = torch.randn(4, 16, 10).transpose(1, 2).requires_grad_()  # (4, 10, 16), strided
    index = torch.randint(0, 10, (4, 7))
    expanded = index[..., None].expand(-1, -1, 16)
    assert torch.equal(gather_tokens(x, index), x.gather(1, expanded))
    src = torch.randn(4, 7, 16)
    ours, theirs = add_tokens_(x * 1.0, index, src), x.scatter_add(1, expanded, src)  # on a fresh tensor, in place
    torch.testing.assert_close(ours, theirs)
    (grad,) = torch.autograd.grad((ours * theirs.detach()).sum() + gather_tokens(x, index).sum(), x)
    (expected,) = torch.autograd.grad((theirs * theirs.detach()).sum() + x.gather(1, expanded).sum(), x)
    torch.testing.assert_close(grad, expected)
