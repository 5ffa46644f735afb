"""Learned stages: the training-time masks against independent formulations, gradients reaching
thresholds and predictors, and predictor weights round-tripping through a checkpoint."""
from __future__ import annotations

import pytest
import safetensors.torch
import timm
import torch

import paretoken
from paretoken.compress import learn, learn_thresholds, learned_plan
from paretoken.compress.ops.threshold import threshold_prune
from paretoken.errors import ParetokenError
from paretoken.evaluators.models import build_default_architecture, create_model


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_patch16_224", img_size=64, num_classes=10).eval()


def test_masked_attention_equals_log_size_bias_and_dropping_zero_size_keys():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 4, dtype=torch.float64) for _ in range(3))
    size = torch.rand(2, 7, dtype=torch.float64) * 2 + 0.1
    reference = torch.softmax(q @ k.transpose(-2, -1) * 0.5 + size.log()[:, None, None, :], dim=-1) @ v
    torch.testing.assert_close(learn.masked_attention(q, k, v, 0.5, size), reference)

    size[0, [2, 5]] = 0.0  # image 0 drops two keys: the same as attending over the other five only
    out = learn.masked_attention(q, k, v, 0.5, size)
    rest = [0, 1, 3, 4, 6]
    sub = torch.softmax(q[:1] @ k[:1, :, rest].transpose(-2, -1) * 0.5 + size[:1, rest].log()[:, None, None], -1)
    torch.testing.assert_close(out[:1], sub @ v[:1, :, rest])


def test_soft_threshold_mask_tends_to_the_hard_rule():
    torch.manual_seed(1)
    score, size = torch.rand(4, 11), torch.ones(4, 11)
    size[2, 8:] = 0.0  # padding
    soft = learn.soft_threshold_keep(score, size, prefix=1, threshold=torch.tensor(0.9), temperature=1e-4)
    x = torch.arange(11.0)[None, :, None].expand(4, 11, 1)
    for b in range(4):
        n = int((size[b, 1:] > 0).sum())
        patch = score[b, 1:1 + n]
        hard = patch * n / patch.sum() > 0.9  # written out per image
        assert torch.equal(soft[b, 1:1 + n] > 0.5, hard)
        assert soft[b, 0] == 1.0 and (soft[b, 1 + n:] < 1e-6).all()
        kept, _ = threshold_prune(x[b:b + 1], size[b:b + 1], score[b:b + 1], 1, threshold=0.9)
        expected = [0] + [1 + i for i in range(n) if hard[i]]
        assert kept[0, :len(expected), 0].tolist() == expected


def test_training_mask_that_keeps_everything_leaves_the_logits_unchanged():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
    plan = paretoken.Plan((paretoken.Stage(2, "threshold", threshold=1e-3),))
    paretoken.apply(model, plan)
    learn_thresholds(model, temperature=1e-5)
    model.train()
    with torch.no_grad():
        soft = model(x)
    assert model._pt_state.soft
    torch.testing.assert_close(soft, reference, atol=1e-4, rtol=1e-4)


def test_prefix_only_last_block_in_training_leaves_logits_and_gradients_unchanged():
    """Training (soft masks, masked attention with the prefix as the only queries) gives the same
    logits and parameter gradients as the full last block; the moot threshold in it learns nothing."""
    x = torch.randn(3, 3, 64, 64)
    stages = (paretoken.Stage(2, "threshold", threshold=0.9), paretoken.Stage(11, "threshold", threshold=0.9))
    runs = []
    for prefix_only in (False, True):
        model = _model()
        paretoken.apply(model, paretoken.Plan(stages, prefix_only_last=prefix_only))
        thresholds = learn_thresholds(model, temperature=0.05)
        model.train()
        logits = model(x)
        logits.square().sum().backward()
        assert model._pt_state.soft
        runs.append((logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, thresholds))
    (full, full_grads, full_thresholds), (short, short_grads, short_thresholds) = runs
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)
    assert set(full_thresholds) == {2, 11} and set(short_thresholds) == {2}
    assert "blocks.11.token_threshold.log_threshold" not in full_grads  # moot in the full block too
    assert set(short_grads) <= set(full_grads)
    for name, grad in full_grads.items():  # the last block's query rows and patch-token MLP get zero gradient
        torch.testing.assert_close(short_grads.get(name, torch.zeros_like(grad)), grad, atol=1e-5, rtol=1e-4)


def test_count_stages_after_a_soft_threshold_take_their_share_of_the_tokens_left():
    """In training a threshold stage only scales sizes; a later keep-ratio stage must count the
    tokens that stage leaves (their keep factors), not every slot, as it does at inference."""
    model = _model()
    plan = paretoken.Plan((paretoken.Stage(1, "threshold", threshold=1.2), paretoken.Stage(4, "prune", keep=0.5)))
    paretoken.apply(model, plan)
    learn_thresholds(model, temperature=1e-3)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))
    state = model._pt_state
    [(_, after, _)] = state.kept
    left = (after * state.patches).round()  # (B,) tokens the threshold leaves, as at inference
    assert (left < state.patches).all()
    kept = state.counts[4] - state.prefix
    torch.testing.assert_close(kept, torch.floor(left * 0.5 + 0.5).long())


def test_threshold_gradient_and_learned_value_used_at_inference():
    model = _model()
    plan = paretoken.Plan((paretoken.Stage(1, "threshold", threshold=0.8), paretoken.Stage(4, "threshold", threshold=1.0)))
    paretoken.apply(model, plan)
    modules = learn_thresholds(model)
    model.train()
    model(torch.randn(4, 3, 64, 64))
    kept = torch.stack([after for _, after, _ in model._pt_state.kept]).mean()
    kept.backward()
    for module in modules.values():  # raising a threshold keeps fewer tokens: d kept / d threshold < 0
        assert module.log_threshold.grad is not None and module.log_threshold.grad < 0

    with torch.no_grad():
        modules[4].log_threshold.fill_(torch.log(torch.tensor(1.7)))
    model.eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        learned = model(x)
    rebuilt = paretoken.apply(_model(), learned_plan(model))
    assert learned_plan(model).stages[1].threshold == pytest.approx(1.7)
    with torch.no_grad():  # a tiny learned threshold keeps its significant digits (not rounded to 0.0)
        modules[1].log_threshold.fill_(torch.log(torch.tensor(3.2e-7)))
    assert learned_plan(model).stages[0].threshold == pytest.approx(3.2e-7, rel=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), learned)


def test_predictor_stages_train_with_gumbel_and_prune_by_keep_probability():
    model = _model()
    plan = paretoken.Plan((paretoken.Stage(3, "prune", keep=0.5, score="predictor"),))
    with pytest.raises(ParetokenError, match="token_predictor"):
        paretoken.apply(model, plan)
    paretoken.apply(model, plan, init_predictors=True)
    model.train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    predictor = model.blocks[3].token_predictor
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in predictor.parameters())
    (_, kept, before), = model._pt_state.kept
    assert torch.equal(before, torch.ones(2)) and (kept < 1).all()  # hard decisions: some tokens dropped

    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
    assert paretoken.token_counts(model)[:, 3].tolist() == [1 + 8, 1 + 8]  # 16 patches * 0.5 + class token

    # the same forward written out: keep the 8 patch tokens the predictor rates most likely to keep
    blocks = model.blocks
    with torch.no_grad():
        h = model._pos_embed(model.patch_embed(x))
        for i, blk in enumerate(blocks):
            h = h + blk.ls1(blk.attn(blk.norm1(h)))
            if i == 3:
                keep_prob = predictor(h[:, 1:], torch.ones(2, 16))[..., 0].exp()
                top = keep_prob.topk(8, dim=1).indices.sort(dim=1).values + 1
                h = torch.cat([h[:, :1], h.gather(1, top[..., None].expand(-1, -1, h.shape[-1]))], dim=1)
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        reference = model.forward_head(model.norm(h))
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


def test_predictors_take_the_model_dtype():
    model = _model().to(torch.bfloat16)
    paretoken.apply(model, paretoken.Plan((paretoken.Stage(3, "prune", keep=0.5, score="predictor"),)),
                    init_predictors=True)
    assert {p.dtype for p in model.blocks[3].token_predictor.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_predictor_weights_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_default_architecture()
    plan = paretoken.Plan((paretoken.Stage(2, "prune_fuse", keep=0.6, score="predictor"),
                           paretoken.Stage(6, "prune", keep=0.6, score="predictor")))
    paretoken.apply(model, plan, init_predictors=True).eval()
    path = tmp_path / "with_predictors.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
        rebuilt = create_model("default", checkpoint=path)
        rng = torch.random.get_rng_state()
        paretoken.apply(rebuilt, plan)
        torch.testing.assert_close(rebuilt(x), expected)
    # attaching saved predictors draws nothing from the global RNG, and copies the checkpoint's weights
    assert torch.equal(torch.random.get_rng_state(), rng)
    weight = rebuilt.blocks[2].token_predictor.embed[1].weight
    assert weight.data_ptr() != rebuilt._pt_predictor_state["blocks.2.token_predictor.embed.1.weight"].data_ptr()
    # the same checkpoint also loads for a plan without predictors, which drops them
    plain = paretoken.apply(create_model("default", checkpoint=path), paretoken.Plan())
    assert not any("token_predictor" in k for k in plain.state_dict())
