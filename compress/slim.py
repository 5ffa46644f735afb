"""Patch Slimming's top-down pyramid, chosen on calibration images.

The last layer's token count is chosen first; each earlier layer then gets the
smallest count, never below the counts already chosen for later layers, that
keeps the whole plan within ``tolerance`` of the uncompressed model (mean KL
of the class distributions, nats). Counts are absolute patch-token counts;
the plan stores them as per-stage ``r``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from paretoken.compress.patch import apply
from paretoken.compress.plan import Plan, Stage
from paretoken.errors import ParetokenError


def pyramid_plan(counts: dict[int, int], patches: int, score: str = "cls_attn") -> Plan:
    """A slim plan keeping ``counts[layer]`` patch tokens after each listed layer (non-increasing).

    A layer that keeps every token it gets has no stage: it would only pay for its scores.
    """
    stages, current = [], patches
    for layer in sorted(counts):
        if counts[layer] < current:
            stages.append(Stage(layer, "slim", r=current - counts[layer], score=score))
        current = counts[layer]
    return Plan(tuple(stages))


def smallest_passing(lo: int, hi: int, passes: Callable[[int], bool]) -> int:
    """The smallest c in [lo, hi] with passes(c), assuming passes is monotone and passes(hi)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


@torch.inference_mode()
def fit_slim(model: torch.nn.Module, images: torch.Tensor, layers: Sequence[int], tolerance: float = 0.05,
             score: str = "cls_attn", batch_size: int = 256, log: Callable[[str], None] | None = None) -> Plan:
    """Choose a slim pyramid top-down for ``model`` on calibration ``images`` (B, C, H, W).

    ``layers``: the blocks that may get a slim stage. ``log`` receives a line per layer chosen.
    Returns the plan; the model is left with an empty plan applied.
    """
    if not layers:
        raise ParetokenError("layers: no layers given; valid: block indices, e.g. 1-11")
    if tolerance <= 0:
        raise ParetokenError(f"tolerance: {tolerance} is out of range; valid: > 0 (nats of KL)")
    apply(model, Plan())
    Plan((Stage(max(layers), "slim", keep=1.0),)).check_depth(len(model.blocks))
    patches = model.patch_embed.num_patches

    def log_probs() -> torch.Tensor:
        return torch.cat([model(images[i:i + batch_size]).float().log_softmax(-1)
                          for i in range(0, len(images), batch_size)])

    base = log_probs()

    def kl_of(counts: dict[int, int]) -> float:
        apply(model, pyramid_plan(counts, patches, score))
        return F.kl_div(log_probs(), base, log_target=True, reduction="batchmean").item()

    counts: dict[int, int] = {}
    floor = 1
    for layer in sorted(set(layers), reverse=True):
        counts[layer] = smallest_passing(floor, patches, lambda c: kl_of(counts | {layer: c}) <= tolerance)
        floor = counts[layer]
        if log is not None:
            log(f"layer {layer}: {counts[layer]} of {patches} patch tokens (KL {kl_of(counts):.4f} nats)")
    apply(model, Plan())
    return pyramid_plan(counts, patches, score)
