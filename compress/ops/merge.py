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
    a0, b0 = first_patches(prefix)
    metric = F.normalize(metric.float(), dim=-1)
    scores = metric[:, a0::2] @ metric[:, b0::2].transpose(1, 2)  # (B, NA, NB): patch tokens only
    src = torch.zeros_like(size, dtype=torch.bool)
    dst = torch.zeros_like(size, dtype=torch.long)
    if scores.shape[2]:  # some B token to merge into
        scores = scores.masked_fill(~(size[:, a0::2] > 0)[:, :, None], NEG).masked_fill(
            ~(size[:, b0::2] > 0)[:, None, :], NEG)
        node_max, node_idx = scores.max(dim=-1)
        src[:, a0::2] = (rank_desc(node_max) < removed[:, None]) & (node_max > NEG)
        dst[:, a0::2] = b0 + 2 * node_idx
    x, size = merge_into(x, size, src, dst, fuse)
    # ToMe's output order: prefix, unmerged A tokens, then B tokens (it sets the next block's split).
    pos = torch.arange(x.shape[1], device=x.device)
    order = torch.argsort(torch.where(pos < prefix, 0, 1 + pos % 2), stable=True)
    return compact(x[:, order], size[:, order], size[:, order] > 0)


def first_patches(prefix: int) -> tuple[int, int]:
    """The positions of the first patch token of set A (even positions) and of set B (odd) after
    ``prefix`` prefix tokens."""
    return prefix + prefix % 2, prefix + 1 - prefix % 2


def bipartite_merge_uniform(x, size, metric, prefix: int, keep: float | None = None, r: int | None = None,
                            fuse: str = "average"):
    """:func:`bipartite_merge` on a uniform batch, in the manner of ToMe's own code: the same
    similarities and one sort of the A tokens' best matches; then the output (prefix, unmerged A
    tokens, B tokens) in one selection of rows, and the merge computed on the r sources and the rows
    they merge into only. The same tokens in the same order (to rounding: a B token nothing merges
    into is copied, not multiplied and divided by its size)."""
    import torch
    import torch.nn.functional as F

    from paretoken.compress.tokens import gather_tokens, keep_count, merge_sources, prefix_first

    batch, n_in, _ = x.shape
    n = n_in - prefix
    removed = n - keep_count(n, keep, r) if keep is not None else int(r)
    a0, b0 = first_patches(prefix)
    na, nb = (n_in - a0 + 1) // 2, (n_in - b0 + 1) // 2
    r = min(removed, na) if nb else 0
    metric = F.normalize(metric.float(), dim=-1)
    scores = metric[:, a0::2] @ metric[:, b0::2].transpose(1, 2)  # (B, na, nb): patch tokens only
    b_pos = torch.arange(b0, n_in, 2, device=x.device).expand(batch, -1)
    if r == 0:  # nothing merges; the order is still prefix, A, B
        index = prefix_first(prefix, torch.arange(a0, n_in, 2, device=x.device).expand(batch, -1), b_pos)
        return gather_tokens(x, index), size.gather(1, index)
    # each A token's best similarity to a B token, then the best B token of the r sources only:
    # on CPU a max with indices over the last dim takes 10x as long as without
    ranked = torch.argsort(scores.amax(dim=-1), dim=1, descending=True, stable=True)
    src, unmerged = ranked[:, :r], ranked[:, r:].sort(dim=1).values
    dst = gather_tokens(scores, src).argmax(dim=-1)
    # the output, prefix, unmerged A tokens and B tokens, in one selection of rows; the sources then
    # merge into the B tokens' rows
    index = prefix_first(prefix, a0 + 2 * unmerged, b_pos)
    src = a0 + 2 * src
    return merge_sources(gather_tokens(x, index), size.gather(1, index), gather_tokens(x, src), size.gather(1, src),
                         prefix + na - r + dst, fuse)


def flops(n, m, dims, prefix: int, **amounts):
    """The similarities of set A's patch tokens (even positions) to set B's (odd) on the D-wide keys."""
    a0, b0 = first_patches(prefix)
    return (n - a0 + 1) // 2 * ((n - b0 + 1) // 2) * dims.head_dim


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
