"""``pitome``: PiToMe's spectrum-preserving merge; the energy score protects distinct tokens.

A token's energy is the mean over the image's patch tokens of ELU(cosine - margin): tokens in large
clusters of similar tokens have high energy. The 2r highest-energy patch tokens are the merge
candidates, alternating by energy rank into sets A and B; every A token merges into its most
similar B token, and the low-energy (distinct) tokens are protected. PiToMe's code lowers the
margin over depth (0.75 - 0.75 * layer / depth); the presets write that schedule out.
"""
from __future__ import annotations

from paretoken.compress.ops.base import FUSE, KEEP, R, Amount, Grid, OpSpec, register

MARGIN = Amount("margin", False, lambda v: -1.0 <= v <= 1.0, "-1 <= margin <= 1",
                "cosine above which a token counts towards another's cluster in the energy score")


def elu_sum(sim, margin: float):
    """(B, N): the sum over the last dim of ELU(``sim`` - margin) for ``sim`` (B, N, M), as
    sum(max(s, m)) - M m + e^-m sum(exp(min(s, m))) - M: three passes over ``sim``, none of them
    expm1 (F.elu's, which PyTorch's CPU kernels do not vectorise: about 4x slower on n x n similarities)."""
    import math

    columns = sim.shape[-1]
    return (sim.clamp(min=margin).sum(dim=-1) + math.exp(-margin) * sim.clamp(max=margin).exp_().sum(dim=-1)
            - columns * (margin + 1))


def energy(metric, size, prefix: int, margin: float):
    """(B, N) PiToMe energy of each valid patch token (-inf for prefix and padding) and the (B, N, N)
    cosine similarities of ``metric`` (B, N, D)."""
    import torch
    import torch.nn.functional as F

    from paretoken.compress.tokens import NEG, patch_counts

    valid = size > 0
    valid[:, :prefix] = False
    unit = F.normalize(metric.float(), dim=-1)
    sim = unit @ unit.transpose(1, 2)
    # over the patch columns; a padding column, set at the margin, adds ELU(0) = 0
    columns = sim[:, :, prefix:].masked_fill(~valid[:, None, prefix:], margin)
    e = elu_sum(columns, margin) / patch_counts(size, prefix).clamp(min=1)[:, None]
    return torch.where(valid, e, torch.full_like(e, NEG)), sim


def energy_uniform(metric, prefix: int, margin: float):
    """:func:`energy` on a uniform batch: no padding to mask, the ELU over the patch columns only."""
    import torch.nn.functional as F

    from paretoken.compress.tokens import NEG

    unit = F.normalize(metric.float(), dim=-1)
    sim = unit @ unit.transpose(1, 2)
    e = elu_sum(sim[:, :, prefix:], margin) / (sim.shape[-1] - prefix)
    e[:, :prefix] = NEG
    return e, sim


def pitome_merge(x, size, metric, prefix: int, margin: float, keep: float | None = None, r: int | None = None,
                 fuse: str = "average"):
    """PiToMe on keys ``metric`` (B, N, D): r patch tokens per image merged (at most half of them);
    returns (x, size). ``fuse``: how a merged token is made (:func:`~paretoken.compress.tokens.merge_into`)."""
    import torch

    from paretoken.compress.tokens import NEG, compact, count_to_keep, merge_into, patch_counts, rank_desc

    n = patch_counts(size, prefix)
    removed = n - count_to_keep(n, keep, r) if keep is not None else torch.full_like(n, int(r))
    removed = removed.minimum(n // 2)
    e, sim = energy(metric, size, prefix, margin)
    rank = rank_desc(e)
    candidate = (rank < 2 * removed[:, None]) & (e > NEG)
    a, b = candidate & (rank % 2 == 0), candidate & (rank % 2 == 1)
    dst = sim.masked_fill(~b[:, None, :], NEG).argmax(dim=-1)
    x, size = merge_into(x, size, a, dst, fuse)
    return compact(x, size, size > 0)


def pitome_merge_uniform(x, size, metric, prefix: int, margin: float, keep: float | None = None,
                         r: int | None = None, fuse: str = "average"):
    """:func:`pitome_merge` on a uniform batch: the candidates by one sort of the energy, each A
    token's match among the B candidates only; the same tokens, in the same order."""
    import torch

    from paretoken.compress.tokens import gather_tokens, keep_count, merge_sources

    n_in = x.shape[1]
    n = n_in - prefix
    removed = min(n - keep_count(n, keep, r) if keep is not None else int(r), n // 2)
    e, sim = energy_uniform(metric, prefix, margin)
    if removed <= 0:
        return x, size
    ranked = torch.argsort(e, dim=1, descending=True, stable=True)
    a = ranked[:, 0:2 * removed:2]
    b = ranked[:, 1:2 * removed:2].sort(dim=1).values  # in position order: ties go to the first, as there
    rows = gather_tokens(sim, a)
    match = b.gather(1, rows.gather(2, b[:, None, :].expand(-1, removed, -1)).argmax(dim=-1))
    is_src = torch.zeros_like(size, dtype=torch.int8).scatter(1, a, torch.ones_like(a, dtype=torch.int8))
    kept = torch.argsort(is_src, dim=1, stable=True)[:, :n_in - removed]  # in position order
    into = match - is_src.cumsum(dim=1).gather(1, match)  # a match's place among the kept: less the sources before it
    return merge_sources(gather_tokens(x, kept), size.gather(1, kept), gather_tokens(x, a), size.gather(1, a), into,
                         fuse)


def flops(n, m, dims, prefix: int, **amounts):
    """The energy's similarities of every token to every token on the D-wide keys: n * n * D."""
    return n * n * dims.head_dim


def reduce(x, size, info, prefix: int, margin: float, keep: float | None = None, r: int | None = None,
           fuse: str = "average"):
    return pitome_merge(x, size, info["keys"], prefix, margin, keep=keep, r=r, fuse=fuse)


def reduce_uniform(x, size, info, prefix: int, margin: float, keep: float | None = None, r: int | None = None,
                   fuse: str = "average"):
    return pitome_merge_uniform(x, size, info["keys"], prefix, margin, keep=keep, r=r, fuse=fuse)


SPEC = register(OpSpec(
    name="pitome", summary="merge the highest-energy tokens (large clusters) in pairs; protect distinct ones",
    source="PiToMe (Tran et al., NeurIPS 2024)", amounts=((KEEP, R), (MARGIN,)), scores=("keys",), reduce=reduce,
    options=(FUSE,), needs=frozenset({"keys"}), grids={"r": Grid(1, 20, 1), "margin": Grid(0.0, 0.75, 0.05)},
    flops=flops, reduce_uniform=reduce_uniform, sums_sizes=True))
