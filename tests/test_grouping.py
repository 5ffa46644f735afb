"""Per-image plans in sub-batches of close token counts (compress/grouping.py): the split against a
brute-force check, padding within the tolerance on the default model, the same logits as one batch."""
from __future__ import annotations

import random

import pytest
import torch

import paretoken
from paretoken.compress import grouping, token_counts, token_slots
from paretoken.compress.tokens import padding_groups
from paretoken.evaluators.evaluate import EvalConfig, evaluate, prepare


def _padding(counts: list[int]) -> float:
    return sum(max(counts) - c for c in counts) / (max(counts) * len(counts))


@pytest.mark.parametrize("seed", range(20))
def test_padding_groups_split_widest_first_into_the_longest_runs_within_the_tolerance(seed):
    rng = random.Random(seed)
    counts = [rng.choice([rng.randint(1, 200), rng.randint(90, 110)]) for _ in range(rng.randint(1, 60))]
    tolerance = rng.choice([0.0, 0.05, 0.1, 0.3])
    groups = [g.tolist() for g in padding_groups(torch.tensor(counts), tolerance)]
    assert sorted(i for g in groups for i in g) == list(range(len(counts)))  # a partition of the batch
    ordered = [counts[i] for g in groups for i in g]
    assert ordered == sorted(counts, reverse=True)  # runs of the widest-first order
    for k, group in enumerate(groups):
        members = [counts[i] for i in group]
        assert _padding(members) <= tolerance + 1e-12
        if k + 1 < len(groups):  # the next image would have taken it over the tolerance
            assert _padding(members + [counts[groups[k + 1][0]]]) > tolerance


@pytest.fixture(scope="module")
def bench():
    return prepare(EvalConfig(images=200, batch_size=100, speed=False))


@pytest.mark.parametrize("name", ["asvit", "jmp"])
def test_per_image_presets_pad_at_most_the_tolerance_and_predict_as_one_padded_batch(bench, name, monkeypatch):
    model, images, tolerance = bench.model, bench.images[:100], grouping.PADDING_TOLERANCE
    paretoken.apply(model, paretoken.preset(name))
    with torch.no_grad():
        grouped = model(images)
        counts, slots = token_counts(model), token_slots(model)
        monkeypatch.setattr(grouping, "PADDING_TOLERANCE", 1.0)  # one padded batch, as before the split
        padded = model(images)
        padded_slots = sum(token_slots(model))
    assert torch.equal(token_counts(model), counts)
    torch.testing.assert_close(grouped, padded, atol=1e-5, rtol=1e-5)
    padding = 1 - int(counts.sum()) / sum(slots)
    assert padding <= tolerance < 1 - int(counts.sum()) / padded_slots  # one padded batch: 42 % for asvit
    monkeypatch.undo()
    metrics = evaluate(paretoken.preset(name), EvalConfig(images=200, batch_size=100, speed=False))
    assert metrics["padding_pct"] <= 100 * tolerance
