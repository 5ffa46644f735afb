"""``prune_merge``: DiffRate's block; prune by score, then merge the least important kept tokens.

The ``pruned`` lowest-scoring patch tokens are dropped; of the rest, the ``merged`` lowest-scoring
merge each into its most similar (cosine of the block's token features) of the more important ones.
DiffRate learns the two counts per block (its published schedules are presets).
"""
from __future__ import annotations

from paretoken.compress.ops.base import FUSE, Amount, Grid, OpSpec, register

PRUNED = Amount("pruned", True, lambda v: v >= 0, "an integer >= 0", "patch tokens pruned by score")
MERGED = Amount("merged", True, lambda v: v >= 0, "an integer >= 0",
                "patch tokens then merged into the most similar of the kept ones")


def prune_merge(x, size, score, prefix: int, pruned: int, merged: int, fuse: str = "average"):
    """DiffRate inference: keep all but ``pruned`` patch tokens by ``score`` (B, N) (at least one),
    then merge the ``merged`` lowest-scoring kept ones (at most all but one) into their most similar
    kept token by cosine of ``x`` (B, N, C); returns (x, size).

    As in DiffRate, only the similarities of the tokens merging to those they may merge into are
    computed (m x (k - m) per image, not N x N)."""
    import torch
    import torch.nn.functional as F

    from paretoken.compress.tokens import (NEG, compact, count_to_keep, gather_tokens, merge_into, patch_counts,
                                           patch_score, rank_desc, topk_mask)

    n = patch_counts(size, prefix)
    k = count_to_keep(n, r=pruned)
    size = size * topk_mask(score, size, prefix, k)
    m = (k - 1).clamp(max=merged)
    order = torch.argsort(rank_desc(patch_score(score, size, prefix)), dim=1)  # kept patch tokens, best first
    targets, sources = int((k - m).max()), int(m.max())
    if sources == 0:
        return compact(x, size, size > 0)
    dst_slots = torch.arange(targets, device=x.device)[None]
    src_slots = (k - m)[:, None] + torch.arange(sources, device=x.device)[None]
    src_ok = src_slots < k[:, None]
    src_pos = order.gather(1, src_slots.clamp(max=x.shape[1] - 1))
    dst_pos = order.gather(1, dst_slots.expand(x.shape[0], -1))
    unit = F.normalize(x.float(), dim=-1)
    sim = gather_tokens(unit, src_pos) @ gather_tokens(unit, dst_pos).transpose(1, 2)
    sim = sim.masked_fill(~(dst_slots < (k - m)[:, None])[:, None, :], NEG)
    dst = dst_pos.gather(1, sim.argmax(dim=-1))
    src = torch.zeros_like(size, dtype=torch.bool).scatter(1, src_pos, src_ok)
    into = torch.zeros_like(order).scatter(1, src_pos, torch.where(src_ok, dst, src_pos))
    x, size = merge_into(x, size, src, into, fuse)
    return compact(x, size, size > 0)


def prune_merge_uniform(x, size, score, prefix: int, pruned: int, merged: int, fuse: str = "average"):
    """:func:`prune_merge` on a uniform batch: one sort of the scores, one of the targets' positions;
    the similarities and the merge computed on the kept tokens only; the same tokens, in the same
    order, and the same similarities."""
    import torch
    import torch.nn.functional as F

    from paretoken.compress.tokens import best_first, gather_tokens, keep_count, merge_sources, prefix_first, take

    k = keep_count(x.shape[1] - prefix, r=pruned)
    m = min(max(k - 1, 0), merged)
    ranked = best_first(score, prefix)
    if m == 0:
        return take(x, size, prefix, ranked[:, :k])
    dst_pos, src_pos = ranked[:, :k - m], ranked[:, k - m:k]  # best first
    x_dst, x_src = gather_tokens(x, dst_pos), gather_tokens(x, src_pos)
    sim = F.normalize(x_src.float(), dim=-1) @ F.normalize(x_dst.float(), dim=-1).transpose(1, 2)
    # the targets come out in position order: each column of sim's place there
    by_position = dst_pos.argsort(dim=1)
    place = torch.empty_like(by_position).scatter_(1, by_position, torch.arange(
        prefix, prefix + k - m, device=x.device).expand_as(by_position))
    targets = prefix_first(prefix, dst_pos.gather(1, by_position))
    return merge_sources(gather_tokens(x, targets), size.gather(1, targets), x_src, size.gather(1, src_pos),
                         place.gather(1, sim.argmax(dim=-1)), fuse)


def flops(n, m, dims, prefix: int, pruned: int, merged: int, **options):
    """The similarities of the m merging tokens to the k - m they may merge into, on the C-wide features."""
    from paretoken.compress.tokens import count_to_keep

    k = count_to_keep(n - prefix, r=pruned)
    m = (k - 1).clamp(max=merged)
    return m * (k - m) * dims.dim


def reduce(x, size, info, prefix: int, pruned: int, merged: int, fuse: str = "average"):
    return prune_merge(x, size, info["score"], prefix, pruned, merged, fuse=fuse)


def reduce_uniform(x, size, info, prefix: int, pruned: int, merged: int, fuse: str = "average"):
    return prune_merge_uniform(x, size, info["score"], prefix, pruned, merged, fuse=fuse)


SPEC = register(OpSpec(
    name="prune_merge", summary="prune the lowest-scoring tokens, then merge the next lowest into similar ones",
    source="DiffRate (Chen et al., ICCV 2023)", amounts=((PRUNED,), (MERGED,)), scores=("cls_attn", "head_weighted"),
    reduce=reduce, options=(FUSE,), grids={"pruned": Grid(0, 24, 2), "merged": Grid(0, 24, 2)}, flops=flops,
    reduce_uniform=reduce_uniform, sums_sizes=True))
