"""``prune_fuse``: keep the top patch tokens by score and fuse the rest into one token (EViT)."""
from __future__ import annotations

from paretoken.compress.ops.base import KEEP, KEEP_GRID, R, OpSpec, register


def prune_fuse(x, size, score, prefix: int, keep: float | None = None, r: int | None = None):
    """EViT: keep the top-k patch tokens by ``score`` (B, N), fuse the dropped ones into one extra token.

    The fused token is the ``score``-weighted average of the dropped tokens and
    stands for all their patches (its size is the sum of theirs). Returns (x, size).
    """
    import torch

    from paretoken.compress.tokens import compact, count_to_keep, patch_counts, topk_mask

    k = count_to_keep(patch_counts(size, prefix), keep, r)
    kept = topk_mask(score, size, prefix, k)
    dropped = (~kept) & (size > 0)
    w = score.float().clamp(min=0) * dropped
    w = w / w.sum(dim=1, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny)
    fused = torch.einsum("bn,bnc->bc", w.to(x.dtype), x)[:, None]
    fused_size = (size * dropped).sum(dim=1, keepdim=True)
    x = torch.cat([x, fused], dim=1)
    size = torch.cat([size, fused_size], dim=1)
    return compact(x, size, torch.cat([kept, fused_size > 0], dim=1))


def flops(n, m, dims, prefix: int, **amounts):
    """The fused token's weighted sum over every token: n * C."""
    return n * dims.dim


def reduce(x, size, info, prefix: int, keep: float | None = None, r: int | None = None):
    return prune_fuse(x, size, info["score"], prefix, keep=keep, r=r)


def reduce_uniform(x, size, info, prefix: int, keep: float | None = None, r: int | None = None):
    """:func:`prune_fuse` on a uniform batch: one sort, gathers, and the fused token's weighted sum
    over every token as there (the kept ones weighted 0)."""
    import torch

    from paretoken.compress.tokens import best_first, keep_count, take

    score = info["score"]
    k = keep_count(x.shape[1] - prefix, keep, r)
    ranked = best_first(score, prefix)
    kept_x, kept_size = take(x, size, prefix, ranked[:, :k])
    dropped = ranked[:, k:]
    w = score.float().gather(1, dropped).clamp(min=0)
    w = w / w.sum(dim=1, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny)
    w = torch.zeros_like(size, dtype=w.dtype).scatter(1, dropped, w)
    fused = torch.einsum("bn,bnc->bc", w.to(x.dtype), x)[:, None]
    if k == ranked.shape[1]:  # nothing dropped: no fused token
        return kept_x, kept_size
    fused_size = size.gather(1, dropped).sum(dim=1, keepdim=True)
    return torch.cat([kept_x, fused], dim=1), torch.cat([kept_size, fused_size], dim=1)


SPEC = register(OpSpec(
    name="prune_fuse", summary="keep the top patch tokens by score, fuse the rest into one token",
    source="EViT (Liang et al., ICLR 2022)", amounts=((KEEP, R),),
    scores=("cls_attn", "head_weighted", "predictor"), reduce=reduce, grids={"keep": KEEP_GRID}, flops=flops,
    reduce_uniform=reduce_uniform, sums_sizes=True))
