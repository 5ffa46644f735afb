"""``joint``: JMP's joint merging and pruning; critical tokens by score mass, the rest merged or pruned."""
from __future__ import annotations

from paretoken.compress.ops.base import Amount, Grid, OpSpec, register

MASS = Amount("mass", False, lambda v: 0.0 < v <= 1.0, "0 < mass <= 1",
              "fraction of the score mass the critical tokens hold (the fewest patch tokens that do)")
SIM = Amount("sim", False, lambda v: -1.0 <= v <= 1.0, "-1 <= sim <= 1",
             "cosine at or above which a non-critical token merges into a critical one (pruned below)")


def critical_by_mass(score, size, prefix: int, mass: float):
    """(B, N) bool: per image, the fewest patch tokens holding ``mass`` of the patch score mass."""
    import torch

    from paretoken.compress.tokens import patch_score

    s = patch_score(score, size, prefix).clamp(min=0).nan_to_num(0.0)
    s = s / s.sum(dim=1, keepdim=True).clamp(min=torch.finfo(s.dtype).tiny)
    ordered, order = torch.sort(s, dim=1, descending=True, stable=True)
    before = torch.cumsum(ordered, dim=1) - ordered  # mass of the better tokens
    take_sorted = before < mass - 1e-6
    take_sorted[:, 0] = True
    critical = torch.zeros_like(take_sorted).scatter(1, order, take_sorted)
    critical[:, :prefix] = False
    return critical & (size > 0)


def joint_merge_prune(x, size, score, metric, prefix: int, mass: float, sim: float):
    """JMP: per image, keep critical tokens; merge or prune the rest. Returns (x, size).

    Critical tokens are the fewest patch tokens holding ``mass`` of the score
    (class attention) mass. Each other token merges (size-weighted) into its
    most similar critical token (cosine of ``metric`` (B, N, D)) when that
    similarity is >= ``sim``, and is pruned otherwise. Similarities are computed
    between those two sets only: (B, R, K), R and K the most other and critical
    tokens an image has. The result holds the prefix and the critical tokens in
    position order, padded at the end (size 0, zero features).
    """
    import torch
    import torch.nn.functional as F

    from paretoken.compress.tokens import gather_tokens, merge_sources, positions_first, prefix_first

    critical = critical_by_mass(score, size, prefix, mass)
    other = (size > 0) & ~critical
    other[:, :prefix] = False
    metric = F.normalize(metric.float(), dim=-1)
    # each image's critical and other tokens in position order: a tie of the max goes to the first critical one
    targets, k = positions_first(critical)
    sources, r = positions_first(other)
    # a padding slot repeats the image's first critical token instead of being masked over (B, R, K): it
    # is never a better match than that token, and where rounding makes it one, j goes back to it
    repeated = torch.arange(targets.shape[1], device=x.device) >= k[:, None]
    matched = torch.where(repeated, targets[:, :1], targets)
    s = gather_tokens(metric, sources) @ gather_tokens(metric, matched).transpose(1, 2)
    best, j = s.max(dim=-1)
    j = j.masked_fill(repeated.gather(1, j), 0)
    merge = (torch.arange(sources.shape[1], device=x.device) < r[:, None]) & (best >= sim) & (k > 0)[:, None]
    kept = prefix_first(prefix, targets)
    valid = F.pad(~repeated, (prefix, 0), value=True)  # the prefix and each image's critical tokens
    x, size = merge_sources(gather_tokens(x, kept), size.gather(1, kept) * valid, gather_tokens(x, sources),
                            size.gather(1, sources) * merge, prefix + j)
    return x.masked_fill_(~valid[..., None], 0), size  # padding slots: zero features, as compact leaves them


def flops(n, m, dims, prefix: int, **amounts):
    """Each other token's similarity to each critical token on the D-wide keys: (n - m) * (m - prefix) * D
    (the critical tokens are what the stage leaves besides the prefix; the other patch tokens, the rest)."""
    return (n - m) * (m - prefix) * dims.head_dim


def reduce(x, size, info, prefix: int, mass: float, sim: float):
    return joint_merge_prune(x, size, info["score"], info["keys"], prefix, mass=mass, sim=sim)


SPEC = register(OpSpec(
    name="joint", summary="keep the critical tokens; merge each other token into a similar one, or prune it",
    source="JMP (joint merging and pruning)", amounts=((MASS,), (SIM,)), scores=("cls_attn", "head_weighted"),
    reduce=reduce, per_image=True, needs=frozenset({"keys"}),
    grids={"mass": Grid(0.7, 1.0, 0.05), "sim": Grid(0.0, 1.0, 0.05)}, flops=flops, sums_sizes=True))
