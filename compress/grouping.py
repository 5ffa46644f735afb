"""Per-image plans at inference in sub-batches of images with close token counts.

A plan whose token count differs per image runs a batch padded to its widest image (see
:mod:`~paretoken.compress.tokens`); where counts spread, most slots are padding (asvit kept 43.5 %
padding in a batch of 100 on the default model). Splitting the batch by count after the stages
keeps each sub-batch within :data:`PADDING_TOLERANCE` of padding, at the price of more, smaller
forwards; the whole batch regroups at each stage, so the sub-batches stay few. Each image's tokens are exactly those it has in one padded batch or alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from paretoken.compress import tokens
from paretoken.compress.patch import PlanModel, TokenState

#: The share of a sub-batch's token slots that may be padding before :func:`forward_grouped` splits it.
PADDING_TOLERANCE = 0.1


@torch.compiler.disable(recursive=False)  # host bookkeeping; under torch.compile each block's halves compile
def forward_grouped(model: "PlanModel", x: torch.Tensor) -> torch.Tensor:
    """The blocks and final norm of a per-image plan at inference, in sub-batches of images whose token
    counts are close: after each stage (before its block's MLP), a sub-batch whose padding exceeds
    :data:`PADDING_TOLERANCE` of its slots is split by count (:func:`~paretoken.compress.tokens.padding_groups`)
    and each part trimmed to its widest image. A stage reduces the whole batch at once, padded to its
    widest sub-batch. Each image's tokens are the same as in one batch
    (valid tokens first, in order); returns (B, N, C) in the batch's order, padded to the widest."""
    state, batch = model._pt_state, x.shape[0]
    groups = [(torch.arange(batch, device=x.device), x, state.size, state.bias, [])]
    slots = []
    for blk in model.blocks:
        attended = []
        for index, xs, size, bias, counts in groups:
            state.size, state.bias = size, bias
            xs = blk.attention(xs)
            attended.append((index, xs, state.size, state.bias, counts, blk.attn._pt_info))
        if blk.reduces:  # the stage reduces the whole batch at once; the MLP runs on its trimmed parts
            index, xs, _, _, counts, blk.attn._pt_info = _joined(attended, state)
            xs = _reduced(blk, xs)
            attended = _split((index, xs, state.size, state.bias, counts), state)
        else:
            attended = [group[:5] for group in attended]
        groups, slots = [], slots + [0]
        for index, xs, size, bias, counts in attended:
            xs = blk.feed_forward(xs)
            counts.append((size > 0).sum(dim=1))
            groups.append((index, xs, size, bias, counts))
            slots[-1] += xs.shape[0] * xs.shape[1]
    out = x.new_zeros(batch, max(xs.shape[1] for _, xs, *_ in groups), x.shape[2])
    size = state.size.new_zeros(batch, out.shape[1])
    counts = [torch.zeros(batch, dtype=torch.long, device=x.device) for _ in model.blocks]
    for index, xs, group_size, _, group_counts in groups:
        out[index, :xs.shape[1]] = model.norm(xs)
        size[index, :xs.shape[1]] = group_size
        for block_counts, group_count in zip(counts, group_counts):
            block_counts[index] = group_count
    state.size, state.counts, state.slots = size, counts, slots
    state.bias = tokens.attention_bias(size, x.dtype)
    return out


@torch.compiler.disable
def _joined(groups: list, state: TokenState) -> tuple:
    """The sub-batches ``groups`` (index, x, size, bias, counts, info) as one, padded to the widest, with
    ``state`` set to it: regrouping the whole batch at every stage keeps the sub-batches few (splitting
    each sub-batch again multiplied them: asvit ran its last blocks in about 60 of them at batch 100),
    and the stage's reduce runs once. ``info``'s tensors are per token, (b, n, ...); padding gets 0."""
    if len(groups) == 1:
        state.size, state.bias = groups[0][2], groups[0][3]
        return groups[0]
    width = max(xs.shape[1] for _, xs, *_ in groups)

    def padded(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([F.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1])) for t in parts])

    index = torch.cat([g[0] for g in groups])
    xs = padded([g[1] for g in groups])
    state.update(padded([g[2] for g in groups]), xs.dtype)
    counts = [torch.cat(block_counts) for block_counts in zip(*(g[4] for g in groups))]
    info = {key: padded([g[5][key] for g in groups]) for key in groups[0][5]}
    return index, xs, state.size, state.bias, counts, info


@torch.compiler.disable
def _reduced(blk, x: torch.Tensor) -> torch.Tensor:
    """``blk``'s stage on the joined batch ``x``, eagerly under torch.compile: a per-image op's reduce
    brings counts to the host to trim the batch, so compiled it and what is around it were a string of
    small graphs between breaks that cost compile time and bought no speed (docs/benchmarks.md)."""
    return blk.reduce(x)


@torch.compiler.disable
def _split(group, state: TokenState) -> list:
    """``group`` (index, x, size, bias, counts), or its parts where its padding is over the tolerance."""
    index, xs, size, _, counts = group
    valid = (size > 0).sum(dim=1)
    if int((xs.shape[1] - valid).sum()) <= PADDING_TOLERANCE * xs.shape[0] * xs.shape[1]:
        return [group]
    parts = []
    for part in tokens.padding_groups(valid, PADDING_TOLERANCE):
        width = int(valid[part].max())
        state.update(size[:, :width][part], xs.dtype)
        parts.append((index[part], xs[:, :width][part], state.size, state.bias, [c[part] for c in counts]))
    return parts
