"""Uniform reduce forms and torch.compile.

Every op's uniform reduce (a batch without padding) against its general reduce, which the reducer
tests hold to a slower reference: the same tokens in the same order. Static plans compile to one graph
(fullgraph, no graph break) with the logits of eager; per-image plans compile with dynamic shapes and
stop recompiling once their graphs exist; ``EvalConfig(compile=True)`` times compilation apart.
"""
from __future__ import annotations

import math

import pytest
import timm
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list  # a code object's compiled graphs
from torch._dynamo.utils import counters

import paretoken
from paretoken.compress import compiling, patch, token_counts
from paretoken.compress.ops import get_op, ops
from paretoken.evaluators.evaluate import EvalConfig, evaluate
from paretoken.evaluators.models import create_model

UNIFORM_CASES = [
    ("prune", {"keep": 0.7}), ("prune", {"r": 0}), ("slim", {"keep": 0.5}),
    ("prune_fuse", {"keep": 0.6}), ("prune_fuse", {"r": 0}),
    ("merge", {"r": 13}), ("merge", {"keep": 0.5}), ("merge", {"r": 0}), ("merge", {"r": 40, "fuse": "mlerp"}),
    ("merge", {"r": 5, "fuse": "drop"}),
    ("pitome", {"r": 10, "margin": 0.3}), ("pitome", {"keep": 0.8, "margin": 0.0, "fuse": "mlerp"}),
    ("pitome", {"r": 0, "margin": 0.1}),
    ("prune_merge", {"pruned": 6, "merged": 8}), ("prune_merge", {"pruned": 6, "merged": 0}),
    ("prune_merge", {"pruned": 2, "merged": 100, "fuse": "drop"}),
]


def test_every_static_op_has_a_uniform_reduce_and_no_per_image_op_has_one():
    for spec in ops():
        assert (spec.reduce_uniform is None) == spec.per_image, spec.name


@pytest.mark.parametrize("prefix", [1, 2])
@pytest.mark.parametrize("sizes", ["ones", "merged"])
@pytest.mark.parametrize("op,amounts", UNIFORM_CASES, ids=[f"{o}-{a}" for o, a in UNIFORM_CASES])
def test_uniform_reduce_gives_the_general_reduce_s_tokens(op, amounts, prefix, sizes):
    gen = torch.Generator().manual_seed(hash((op, str(amounts), prefix, sizes)) % 2**31)
    batch, n, dim = 4, 51, 16
    x = torch.randn(batch, n, dim, generator=gen)
    size = torch.ones(batch, n) if sizes == "ones" else torch.randint(1, 5, (batch, n), generator=gen).float()
    size[:, :prefix] = 1
    info = {"score": torch.rand(batch, n, generator=gen).softmax(1), "keys": torch.randn(batch, n, 8, generator=gen)}
    spec = get_op(op)
    want_x, want_size = spec.reduce(x, size, info, prefix, **amounts)
    got_x, got_size = spec.reduce_uniform(x, size, info, prefix, **amounts)
    assert got_x.shape == want_x.shape
    assert torch.equal(got_size, want_size)
    torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def default_model():
    return create_model("default").eval()


@pytest.fixture(scope="module")
def images(default_model):
    from paretoken.evaluators.data import load_split

    return load_split(None, default_model, "eval", n=300, seed=0)[0]


@pytest.mark.parametrize("name", ["tome-r13", "evit-0.7", "dynamicvit-0.7", "pitome-0.9", "tofu-r13",
                                  "diffrate-2.9"])
def test_uniform_forward_gives_the_general_forward_s_logits(name, default_model, images, monkeypatch):
    plan = paretoken.preset(name)
    with torch.inference_mode():
        uniform = paretoken.apply(default_model, plan)(images[:50])
        start = patch.TokenState.start

        def general_start(self, x):  # the same forward with every stage on its op's general reduce
            start(self, x)
            self.uniform = self.unit = False

        monkeypatch.setattr(patch.TokenState, "start", general_start)
        general = default_model(images[:50])
    torch.testing.assert_close(uniform, general, rtol=1e-4, atol=1e-4)
    assert torch.equal(uniform.argmax(1), general.argmax(1))


@pytest.mark.parametrize("name", ["tome-r13", "evit-0.7", "dynamicvit-0.7", "pitome-0.9", "tofu-r13",
                                  "diffrate-2.9", "slim"])
def test_static_plans_trace_to_one_graph(name, default_model, images):
    plan = paretoken.preset(name)
    paretoken.apply(default_model, plan)
    assert compiling.compiles_whole(plan, len(default_model.blocks))
    torch._dynamo.reset()
    counters.clear()
    compiled = compiling.compile_model(default_model, backend="eager")  # fullgraph: a graph break raises
    with torch.inference_mode():
        out = compiled(images[:20])
        counts = token_counts(default_model)
        ref = default_model(images[:20])
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(counts, token_counts(default_model))  # the compiled forward's counts reach the state


@pytest.mark.parametrize("name", ["asvit", "jmp"])
def test_per_image_plans_stop_recompiling_once_their_graphs_exist(name, default_model, images):
    plan = paretoken.preset(name)
    paretoken.apply(default_model, plan)
    assert not compiling.compiles_whole(plan, len(default_model.blocks))
    torch._dynamo.reset()
    counters.clear()
    compiled = compiling.compile_model(default_model, backend="eager")
    graphs, counts = [], []
    with torch.inference_mode():
        for start in range(0, 240, 60):
            batch = images[start:start + 60]
            out = compiled(batch)
            graphs.append(counters["stats"]["unique_graphs"])
            counts.append(token_counts(default_model).sum().item())
            torch.testing.assert_close(out, default_model(batch), rtol=1e-5, atol=1e-5)
    assert len(set(counts)) > 1  # the batches' token counts differ
    assert graphs[2:] == [graphs[1]] * 2, graphs  # no graph after the second batch
    # the MLP half is the same code in every block: its graphs (a batch, and a sub-batch of one image) are
    # shared, not one per block (the token bookkeeping runs outside it)
    assert len(_debug_get_cache_entry_list(patch.PlanBlock.feed_forward.__code__)) <= 2
    # the per-image op's reduce runs eagerly (its counts come to the host): no graph of it
    assert not _debug_get_cache_entry_list(get_op(plan.stages[0].op).reduce.__code__)
    # and so does the stage around it, once per batch (grouping._reduced): no graphs of small ops around a break
    assert not _debug_get_cache_entry_list(patch.PlanBlock._reduce.__code__)
    # the only graph breaks are at the functions kept eager on purpose, none inside a traced one (Tensor.item)
    assert all("torch.compiler.disable" in reason for reason in counters["graph_break"]), counters["graph_break"]


@pytest.fixture(scope="module")
def small_vit():
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=4, num_heads=2).eval()


@pytest.mark.parametrize("plan", [
    paretoken.Plan.from_dict({"stages": [{"layer": i, "op": "merge", "r": 6} for i in range(3)]}),
    paretoken.Plan.from_dict({"stages": [{"layer": 1, "op": "threshold", "threshold": 0.9},
                                         {"layer": 2, "op": "merge", "r": 4}]}),
], ids=["merge", "threshold-then-merge"])
def test_inductor_compiled_logits_equal_eager(plan, small_vit):
    paretoken.apply(small_vit, plan)
    torch._dynamo.reset()
    compiled = compiling.compile_model(small_vit)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), small_vit(x), rtol=1e-4, atol=1e-4)
        if plan.per_image:  # dynamic shapes: another batch size reuses the graphs
            torch.testing.assert_close(compiled(x[:7]), small_vit(x[:7]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("speed", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_evaluate_with_compile_times_compilation_apart(speed):
    config = EvalConfig(images=200, batch_size=100, speed=speed, latency_repeats=2, speedup_pairs=1)
    compiled = evaluate(paretoken.preset("tome-r16"), EvalConfig(**{**config.__dict__, "compile": True}))
    eager = evaluate(paretoken.preset("tome-r16"), config)
    assert compiled["compile_s"] > 0 and math.isnan(eager["compile_s"])
    assert compiled["gflops"] == eager["gflops"]
    assert abs(compiled["top1"] - eager["top1"]) <= 1.0  # one image of 200 may flip on a near tie
    if speed:
        assert compiled["speedup"] > 0 and compiled["img_per_s"] > 0 and compiled["latency_ms"] > 0
