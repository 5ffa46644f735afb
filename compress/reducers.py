"""Token reducers: pure functions on a batch of token sequences.

Every function takes and returns the token state of a batch:

  x:    (B, N, C) token features; the first ``prefix`` tokens (class, and
        distillation token where present) are never dropped or merged.
  size: (B, N) float, how many input patches each token stands for; 0 marks a
        padding slot. Per-image ops leave images with different token counts;
        they are batched by padding at the end of the sequence, and
        ``attention_bias`` turns ``size`` into the additive attention mask
        (log size: ToMe's proportional attention; log 0 = -inf: padding).

Valid tokens always come first and keep their relative order, so an image's
tokens are the same whether it runs in a batch or alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_NEG = float("-inf")


def attention_bias(size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive attention mask (B, 1, 1, N) = log(size), or None when every size is 1.

    None keeps an uncompressed model's attention bit-for-bit unchanged.
    """
    if bool((size == 1).all()):
        return None
    return size.log().to(dtype)[:, None, None, :]


def patch_counts(size: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B,) number of valid patch tokens (non-prefix, non-padding) per image. In training, a token
    a learned stage is dropping softly (keep factor 0 < size < 1, see :mod:`.learn`) counts as
    that fraction, so later stages take their share of the tokens that will be left at inference."""
    return size[:, prefix:].clamp(max=1.0).sum(dim=1).round().long()


def count_to_keep(n: torch.Tensor, keep: float | None = None, r: int | None = None) -> torch.Tensor:
    """(B,) patch tokens to keep out of ``n`` (B,): keep * n rounded to nearest, or n - r; at least 1.

    Rounding reproduces DynamicViT's counts (196 * 0.7**i -> 137, 96, 67).
    """
    if keep is not None:
        k = torch.floor(n.double() * keep + 0.5).long()
    else:
        k = n - int(r)
    return k.clamp(min=1).minimum(n)


def compact(x: torch.Tensor, size: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the tokens where ``keep`` (B, N) is True, in order, padded at the end.

    Returns x (B, M, C) and size (B, M) with M = max kept count; padding slots
    get size 0 and zero features. Tokens with size 0 are never kept.
    """
    keep = keep & (size > 0)
    counts = keep.sum(dim=1)
    m = int(counts.max())
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :m]
    valid = torch.arange(m, device=x.device)[None] < counts[:, None]
    x = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1])).masked_fill(~valid[..., None], 0)
    return x, size.gather(1, order) * valid


def _rank_desc(score: torch.Tensor) -> torch.Tensor:
    """(B, N) rank of each entry in descending order of ``score`` (0 = best; ties by position)."""
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    return torch.argsort(order, dim=1)


def _patch_score(score: torch.Tensor, size: torch.Tensor, prefix: int) -> torch.Tensor:
    """Scores with prefix and padding slots set to -inf, so they are never chosen."""
    score = score.float().clone()
    score[:, :prefix] = _NEG
    return score.masked_fill(size <= 0, _NEG)


def topk_mask(score: torch.Tensor, size: torch.Tensor, prefix: int, k: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: the prefix plus, per image, the ``k`` (B,) best-scoring patch tokens."""
    rank = _rank_desc(_patch_score(score, size, prefix))
    keep = rank < k[:, None]
    keep[:, :prefix] = True
    return keep & (size > 0)


def prune(x, size, score, prefix: int, keep: float | None = None, r: int | None = None):
    """Top-k pruning (DynamicViT inference form): keep the best patch tokens by ``score`` (B, N)."""
    k = count_to_keep(patch_counts(size, prefix), keep, r)
    return compact(x, size, topk_mask(score, size, prefix, k))


def prune_fuse(x, size, score, prefix: int, keep: float | None = None, r: int | None = None):
    """EViT: keep the top-k patch tokens, fuse the dropped ones into one extra token.

    The fused token is the ``score``-weighted average of the dropped tokens and
    stands for all their patches (its size is the sum of theirs).
    """
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


def _merge_into(x, size, src: torch.Tensor, dst: torch.Tensor):
    """Merge each token where ``src`` (B, N) is True into token ``dst`` (B, N) index.

    Size-weighted average. Returns x, size of the same shape with the merged
    tokens' size set to 0 (callers :func:`compact` them away).
    """
    w = size * src
    dst = torch.where(src, dst, torch.arange(x.shape[1], device=x.device)[None])
    xs = x * (size - w)[..., None].to(x.dtype)
    xs = xs.scatter_add(1, dst[..., None].expand_as(x), x * w[..., None].to(x.dtype))
    size = (size - w).scatter_add(1, dst, w)
    # merged-away rows (size 0) are 0 / 1, not 0 / 0: a clamp to float32's tiny is 0 in half precision
    return xs / torch.where(size > 0, size, 1).to(x.dtype)[..., None], size


def bipartite_merge(x, size, metric, prefix: int, keep: float | None = None, r: int | None = None):
    """ToMe bipartite soft matching with size-weighted averaging.

    Tokens alternate into sets A (even positions) and B (odd positions); each
    A token is matched to its most similar B token (cosine of ``metric``
    (B, N, D), head-averaged keys); the r best-matched A tokens merge into
    their match. Prefix tokens and padding never merge. r is capped per image
    at the number of A patch tokens (ToMe's ceiling of half the tokens).
    """
    n = patch_counts(size, prefix)
    removed = n - count_to_keep(n, keep, r) if keep is not None else torch.full_like(n, int(r))
    metric = F.normalize(metric.float(), dim=-1)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(1, 2)
    pos = torch.arange(x.shape[1], device=x.device)
    a_ok = (pos[::2] >= prefix)[None] & (size[:, ::2] > 0)
    b_ok = (pos[1::2] >= prefix)[None] & (size[:, 1::2] > 0)
    scores = scores.masked_fill(~a_ok[:, :, None], _NEG).masked_fill(~b_ok[:, None, :], _NEG)
    node_max, node_idx = scores.max(dim=-1)
    rank = _rank_desc(node_max)
    src_a = (rank < removed[:, None]) & (node_max > _NEG)
    src = torch.zeros_like(size, dtype=torch.bool)
    src[:, ::2] = src_a
    dst = torch.zeros_like(size, dtype=torch.long)
    dst[:, ::2] = 2 * node_idx + 1
    x, size = _merge_into(x, size, src, dst)
    # ToMe's output order: prefix, unmerged A tokens, then B tokens (it sets the next block's split).
    order = torch.argsort(torch.where(pos < prefix, 0, 1 + pos % 2), stable=True)
    return compact(x[:, order], size[:, order], size[:, order] > 0)


def critical_by_mass(score, size, prefix: int, mass: float) -> torch.Tensor:
    """(B, N) bool: per image, the fewest patch tokens holding ``mass`` of the patch score mass."""
    s = _patch_score(score, size, prefix).clamp(min=0).nan_to_num(0.0)
    s = s / s.sum(dim=1, keepdim=True).clamp(min=torch.finfo(s.dtype).tiny)
    ordered, order = torch.sort(s, dim=1, descending=True, stable=True)
    before = torch.cumsum(ordered, dim=1) - ordered  # mass of the better tokens
    take_sorted = before < mass - 1e-6
    take_sorted[:, 0] = True
    critical = torch.zeros_like(take_sorted).scatter(1, order, take_sorted)
    critical[:, :prefix] = False
    return critical & (size > 0)


def joint_merge_prune(x, size, score, metric, prefix: int, mass: float, sim: float):
    """JMP: per image, keep critical tokens; merge or prune the rest.

    Critical tokens are the fewest patch tokens holding ``mass`` of the score
    (class attention) mass. Each non-critical token merges (size-weighted)
    into its most similar critical token (cosine of ``metric`` (B, N, D)) when
    that similarity is >= ``sim``, and is pruned otherwise.
    """
    critical = critical_by_mass(score, size, prefix, mass)
    valid = size > 0
    other = valid & ~critical
    other[:, :prefix] = False
    metric = F.normalize(metric.float(), dim=-1)
    s = (metric @ metric.transpose(1, 2)).masked_fill(~critical[:, None, :], _NEG)
    best, match = s.max(dim=-1)
    merge = other & (best >= sim)
    drop = other & ~merge
    x, size = _merge_into(x, size * ~drop, merge, match)
    return compact(x, size, size > 0)


def threshold_prune(x, size, score, prefix: int, threshold: float):
    """AS-ViT: keep patch tokens whose score relative to uniform exceeds ``threshold``.

    The relative score is score / mean(score over the image's valid patch
    tokens); each image keeps its own count, at least its best token.
    """
    s = _patch_score(score, size, prefix)
    n = patch_counts(size, prefix)
    finite = torch.where(s > _NEG, s, torch.zeros_like(s))
    rel = s * n[:, None] / finite.sum(dim=1, keepdim=True).clamp(min=torch.finfo(s.dtype).tiny)
    keep = (rel > threshold) | (_rank_desc(s) == 0)
    keep[:, :prefix] = True
    return compact(x, size, keep & (size > 0))
