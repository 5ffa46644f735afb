"""``prune``: keep the top patch tokens by score and drop the rest (DynamicViT's inference form)."""
from __future__ import annotations

from paretoken.compress.ops.base import KEEP, KEEP_GRID, R, OpSpec, no_flops, register


def prune(x, size, score, prefix: int, keep: float | None = None, r: int | None = None):
    """Top-k pruning: keep the best patch tokens of each image by ``score`` (B, N); returns (x, size)."""
    from paretoken.compress.tokens import compact, count_to_keep, patch_counts, topk_mask

    k = count_to_keep(patch_counts(size, prefix), keep, r)
    return compact(x, size, topk_mask(score, size, prefix, k))


def reduce(x, size, info, prefix: int, keep: float | None = None, r: int | None = None):
    return prune(x, size, info["score"], prefix, keep=keep, r=r)


def reduce_uniform(x, size, info, prefix: int, keep: float | None = None, r: int | None = None):
    """:func:`prune` on a uniform batch: one sort of the scores, one gather."""
    from paretoken.compress.tokens import best_first, keep_count, take

    k = keep_count(x.shape[1] - prefix, keep, r)
    return take(x, size, prefix, best_first(info["score"], prefix)[:, :k])


SPEC = register(OpSpec(
    name="prune", summary="keep the top patch tokens by score, drop the rest",
    source="DynamicViT (Rao et al., NeurIPS 2021)", amounts=((KEEP, R),),
    scores=("cls_attn", "head_weighted", "predictor"), reduce=reduce, grids={"keep": KEEP_GRID}, flops=no_flops,
    reduce_uniform=reduce_uniform))
