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


def bipartite_merge_uniform(x, size, metric, prefix: int, keep: float | None = None, r: int | None = None,
                            fuse: str = "average"):
    """:func:`bipartite_merge` on a uniform batch, in the manner of ToMe's own code: the same
    similarities, one sort of the A tokens' best matches, and the merge computed on the r sources
    and the B tokens only; the same tokens, in the same order."""
    import torch
    import torch.nn.functional as F

    from paretoken.compress.tokens import gather_tokens, keep_count, merge_sources

    n = x.shape[1] - prefix
    removed = n - keep_count(n, keep, r) if keep is not None else int(r)
    metric = F.normalize(metric.float(), dim=-1)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
    a0, b0 = (prefix + 1) // 2, prefix // 2  # the first A (even) and B (odd) patch token, in each set
    xa, sa, xb, sb = x[:, 2 * a0::2], size[:, 2 * a0::2], x[:, 2 * b0 + 1::2], size[:, 2 * b0 + 1::2]
    r = min(removed, xa.shape[1]) if xb.shape[1] else 0
    if r == 0:  # nothing merges; the order is still prefix, A, B
        return torch.cat([x[:, :prefix], xa, xb], dim=1), torch.cat([size[:, :prefix], sa, sb], dim=1)
    # each A patch token's best similarity to a B patch token, then the best B token of the r sources only:
    # on CPU a max with indices over the last dim takes 10x as long as without
    ranked = torch.argsort(scores[:, a0:, b0:].amax(dim=-1), dim=1, descending=True, stable=True)
    src, unmerged = ranked[:, :r], ranked[:, r:].sort(dim=1).values
    dst = gather_tokens(scores, a0 + src)[..., b0:].argmax(dim=-1)  # rows of scores itself: no copy of a slice
    # A's tokens taken from x itself (A is a strided view: selecting from it would copy it first)
    xb, sb = merge_sources(xb, sb, gather_tokens(x, 2 * a0 + 2 * src), sa.gather(1, src), dst, fuse)
    x = torch.cat([x[:, :prefix], gather_tokens(x, 2 * a0 + 2 * unmerged), xb], dim=1)
    return x, torch.cat([size[:, :prefix], sa.gather(1, unmerged), sb], dim=1)


def flops(n, m, dims, prefix: int, **amounts):
    """The similarities of set A (ceil(n / 2) tokens) to set B (floor(n / 2)) on the D-wide keys."""
    return (n + 1) // 2 * (n // 2) * dims.head_dim


def reduce(x, size, info, prefix: int, keep: float | None = None, r: int | None = None, fuse: str = "average"):
    return bipartite_merge(x, size, info["keys"], prefix, keep=keep, r=r, fuse=fuse)


def reduce_uniform(x, size, info, prefix: int, keep: float | None = None, r: int | None = None,
                   fuse: str = "average"):
    return bipartite_merge_uniform(x, size, info["keys"], prefix, keep=keep, r=r, fuse=fuse)


SPEC = register(OpSpec(
    name="merge", summary="merge the most similar token pairs of a bipartite split (size-weighted)",
    source="ToMe (Bolya et al., ICLR 2023); fuse: ToFu (Kim et al., WACV 2024)", amounts=((KEEP, R),),
    scores=("keys",), reduce=reduce, options=(FUSE,), needs=frozenset({"keys"}), grids={"r": Grid(1, 20, 1)}, flops=flops,
    reduce_uniform=reduce_uniform, sums_sizes=True))
