"""``merge``: ToMe's bipartite soft matching; merged tokens are size-weighted averages (or ToFu's MLERP)."""
from __future__ import annotations

from paretoken.compress.ops.base import FUSE, KEEP, R, Grid, OpSpec, register


def bipartite_merge(x, size, metric, prefix: int, keep: float | None = None, r: int | None = None,
                    fuse: str = "average"):
    """ToMe bipartite soft matching; returns (x, size). ``fuse``: how a merged token is made
    (:func:`~paretoken.compress.tokens.merge_into`; ToMe's size-weighted average by default).

    Tokens alternate into sets A (even positions) and B (odd positions); each
    A token is matched to its most similar B token (cosine of ``metric``
    (B, N, D), head-averaged keys); the r best-matched A tokens merge into
    their match. Prefix tokens and padding never merge. r is capped per image
    at the number of A patch tokens (ToMe's ceiling of half the tokens).
    """
    import torch
    import torch.nn.functional as F

    from paretoken.compress.tokens import NEG, compact, count_to_keep, merge_into, patch_counts, rank_desc

    n = patch_counts(size, prefix)
    removed = n - count_to_keep(n, keep, r) if keep is not None else torch.full_like(n, int(r))
    metric = F.normalize(metric.float(), dim=-1)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(1, 2)
    pos = torch.arange(x.shape[1], device=x.device)
    a_ok = (pos[::2] >= prefix)[None] & (size[:, ::2] > 0)
    b_ok = (pos[1::2] >= prefix)[None] & (size[:, 1::2] > 0)
    scores = scores.masked_fill(~a_ok[:, :, None], NEG).masked_fill(~b_ok[:, None, :], NEG)
    node_max, node_idx = scores.max(dim=-1)
    rank = rank_desc(node_max)
    src_a = (rank < removed[:, None]) & (node_max > NEG)
    src = torch.zeros_like(size, dtype=torch.bool)
    src[:, ::2] = src_a
    dst = torch.zeros_like(size, dtype=torch.long)
    dst[:, ::2] = 2 * node_idx + 1
    x, size = merge_into(x, size, src, dst, fuse)
    # ToMe's output order: prefix, unmerged A tokens, then B tokens (it sets the next block's split).
    order = torch.argsort(torch.where(pos < prefix, 0, 1 + pos % 2), stable=True)
    return compact(x[:, order], size[:, order], size[:, order] > 0)


def flops(n, dims, prefix: int, **amounts):
    """The similarities of set A (ceil(n / 2) tokens) to set B (floor(n / 2)) on the D-wide keys."""
    return (n + 1) // 2 * (n // 2) * dims.head_dim


def reduce(x, size, info, prefix: int, keep: float | None = None, r: int | None = None, fuse: str = "average"):
    return bipartite_merge(x, size, info["keys"], prefix, keep=keep, r=r, fuse=fuse)


SPEC = register(OpSpec(
    name="merge", summary="merge the most similar token pairs of a bipartite split (size-weighted)",
    source="ToMe (Bolya et al., ICLR 2023); fuse: ToFu (Kim et al., WACV 2024)", amounts=((KEEP, R),),
    scores=("keys",), reduce=reduce, options=(FUSE,), needs=frozenset({"keys"}), grids={"r": Grid(1, 20, 1)}, flops=flops))
