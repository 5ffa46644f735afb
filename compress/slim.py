"""Patch Slimming's top-down pyramid, chosen on calibration images.

The last layer's token count is chosen first; each earlier layer then gets the
smallest count, never below the counts already chosen for later layers, that
keeps the whole plan within ``tolerance`` of the uncompressed model (mean KL
of the class distributions, nats). Counts are absolute patch-token counts;
the plan stores them as per-stage ``r``.
"""
from __future__ import annotations

import math
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


def check_layers(layers: Sequence[int], depth: int) -> None:
    """One-line error unless ``layers`` are distinct blocks of a ``depth``-block model (at least one)."""
    if not layers:
        raise ParetokenError("layers: no layers given; valid: block indices, e.g. 1-11")
    if len(set(layers)) != len(layers):
        raise ParetokenError(f"layers: {','.join(map(str, layers))} names a block twice; valid: distinct block indices")
    if not all(isinstance(layer, int) and 0 <= layer < depth for layer in layers):
        raise ParetokenError(f"layers: {','.join(map(str, layers))} is out of range; valid: block indices in "
                             f"0..{depth - 1} for this {depth}-block model")


@torch.inference_mode()
def fit_slim(model: torch.nn.Module, images: torch.Tensor, layers: Sequence[int], tolerance: float = 0.05,
             score: str = "cls_attn", batch_size: int = 256, log: Callable[[str], None] | None = None,
             cost: Callable[[torch.nn.Module], float] | None = None) -> Plan:
    """Choose a slim pyramid top-down for ``model`` on calibration ``images`` (B, C, H, W).

    ``layers``: the blocks that may get a slim stage. ``log`` receives a line per layer chosen.
    ``cost``: the cost of the model with a plan applied (e.g. GFLOPs per image); with it, a stage
    that costs more in scores than it saves (one that drops a token or two) is dropped afterwards
    when the plan stays within ``tolerance`` without it.
    Returns the plan; the model is left with an empty plan applied.
    """
    check_layers(layers, len(model.blocks))
    if not 0 < tolerance < math.inf:
        raise ParetokenError(f"tolerance: {tolerance} is out of range; valid: a finite number > 0 (nats of KL)")
    apply(model, Plan())
    patches = model.patch_embed.num_patches

    def log_probs() -> torch.Tensor:
        return torch.cat([model(images[i:i + batch_size]).float().log_softmax(-1)
                          for i in range(0, len(images), batch_size)])

    base = log_probs()

    measured: dict[tuple[tuple[int, int], ...], float] = {}

    def kl_of(counts: dict[int, int]) -> float:  # once per pyramid: the log line and the clean-up ask again
        key = tuple(sorted(counts.items()))
        if key not in measured:
            apply(model, pyramid_plan(counts, patches, score))
            measured[key] = F.kl_div(log_probs(), base, log_target=True, reduction="batchmean").item()
        return measured[key]

    counts: dict[int, int] = {}
    floor = 1
    for layer in sorted(set(layers), reverse=True):
        counts[layer] = smallest_passing(floor, patches, lambda c: kl_of(counts | {layer: c}) <= tolerance)
        floor = counts[layer]
        if log is not None:
            log(f"layer {layer}: {counts[layer]} of {patches} patch tokens (KL {kl_of(counts):.4f} nats)")
    if cost is not None:
        counts = _drop_costly_stages(counts, patches, lambda c: cost(apply(model, pyramid_plan(c, patches, score))),
                                     lambda c: kl_of(c) <= tolerance, log)
    apply(model, Plan())
    return pyramid_plan(counts, patches, score)


def _drop_costly_stages(counts: dict[int, int], patches: int, cost: Callable[[dict[int, int]], float],
                        passes: Callable[[dict[int, int]], bool],
                        log: Callable[[str], None] | None = None) -> dict[int, int]:
    """``counts`` without the stages, first to last, whose removal costs less and still ``passes``.
    Removing layer l's stage keeps its input count until the next stage (l and the following layers
    with l's count get the count above l)."""
    current, changed = cost(counts), True
    while changed:  # until no single stage can go: a removal can make an earlier one worth removing
        changed = False
        for layer in sorted(counts):
            above = min([patches] + [counts[earlier] for earlier in counts if earlier < layer])
            if counts[layer] == above:
                continue
            without = counts | {later: above for later in counts if later >= layer and counts[later] == counts[layer]}
            lower = cost(without)
            if lower < current and passes(without):
                if log is not None:
                    dropped = above - counts[layer]
                    log(f"layer {layer}: no stage after all: dropping {dropped} token{'s' * (dropped != 1)} cost "
                        f"{current:.4g}, keeping {'it' if dropped == 1 else 'them'} {lower:.4g}")
                counts, current, changed = without, lower, True
    return counts
