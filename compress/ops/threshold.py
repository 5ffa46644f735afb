"""``threshold``: AS-ViT's adaptive pruning; keep the tokens whose score exceeds a threshold."""
from __future__ import annotations

from paretoken.compress.ops.base import Amount, Grid, OpSpec, no_flops, register

THRESHOLD = Amount("threshold", False, lambda v: v > 0.0, "threshold > 0",
                   "score relative to uniform (score * patch tokens) above which a token is kept")


def threshold_prune(x, size, score, prefix: int, threshold: float):
    """AS-ViT: keep patch tokens whose score relative to uniform exceeds ``threshold``; returns (x, size).

    The relative score is score / mean(score over the image's valid patch
    tokens); each image keeps its own count, at least its best token.
    """
    import torch

    from paretoken.compress.tokens import NEG, compact, patch_counts, patch_score, rank_desc

    s = patch_score(score, size, prefix)
    n = patch_counts(size, prefix)
    finite = torch.where(s > NEG, s, torch.zeros_like(s))
    rel = s * n[:, None] / finite.sum(dim=1, keepdim=True).clamp(min=torch.finfo(s.dtype).tiny)
    keep = (rel > threshold) | (rank_desc(s) == 0)
    keep[:, :prefix] = True
    return compact(x, size, keep & (size > 0))


def reduce(x, size, info, prefix: int, threshold: float):
    return threshold_prune(x, size, info["score"], prefix, threshold=threshold)


SPEC = register(OpSpec(
    name="threshold", summary="keep the patch tokens whose score relative to uniform exceeds a threshold",
    source="AS-ViT (Liu et al., 2022)", amounts=((THRESHOLD,),), scores=("head_weighted", "cls_attn"),
    reduce=reduce, per_image=True, grids={"threshold": Grid(0.1, 1.2, 0.05)}, flops=no_flops))
