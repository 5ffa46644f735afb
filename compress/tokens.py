"""The token state of a batch, and the primitives every op's reduce function builds on.

Every function takes and returns (parts of) the token state of a batch:

  x:    (B, N, C) token features; the first ``prefix`` tokens (class, and
        distillation token where present) are never dropped or merged.
  size: (B, N) float, how many input patches each token stands for; 0 marks a
        padding slot. Per-image ops leave images with different token counts;
        they are batched by padding at the end of the sequence, and
        ``attention_bias`` turns ``size`` into the additive attention mask
        (log size: ToMe's proportional attention; log 0 = -inf: padding).

Valid tokens always come first and keep their relative order, so an image's
tokens are the same whether it runs in a batch or alone. The ops themselves live
in :mod:`paretoken.compress.ops`, one module each.

A batch is *uniform* when every image has all its N tokens valid (no padding): the
state of a plan without per-image stages. There, counts are Python ints that follow
from shapes (:func:`keep_count`), and ops' uniform reduce functions select tokens with
one sort and gathers (:func:`best_first`, :func:`take`), never synchronising with
the device.
"""
from __future__ import annotations

import math

import torch

NEG = float("-inf")


@torch.compiler.disable  # reads the sizes on the host: under torch.compile it runs eagerly, without a graph break
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


def keep_count(n: int, keep: float | None = None, r: int | None = None) -> int:
    """:func:`count_to_keep` for a uniform batch: patch tokens to keep out of ``n`` (a Python int)."""
    k = math.floor(n * keep + 0.5) if keep is not None else n - int(r)
    return min(max(k, 1), n)


def _flat_rows(index: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B * K,) rows of a (B * tokens, C) flattened batch for the positions ``index`` (B, K)."""
    return (index + torch.arange(index.shape[0], device=index.device)[:, None] * tokens).reshape(-1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, K, C): the tokens of ``x`` (B, N, C) at positions ``index`` (B, K), as
    ``x.gather(1, index[..., None].expand(-1, -1, C))`` but by one selection of rows of the flattened
    batch (on CPU, gather with an index expanded over C is about 15x slower)."""
    batch, n, dim = x.shape
    return x.reshape(batch * n, dim).index_select(0, _flat_rows(index, n)).reshape(*index.shape, dim)


def add_tokens_(x: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Add the tokens ``src`` (B, R, C) to ``x`` (B, M, C) at positions ``index`` (B, R) and return the
    sum: ``x.scatter_add(1, index expanded over C, src)`` by one ``index_add_`` over rows (faster on
    CPU), in place when ``x`` is contiguous. Callers pass a tensor they have just made."""
    batch, m, dim = x.shape
    x = x.contiguous()
    x.view(batch * m, dim).index_add_(0, _flat_rows(index, m), src.reshape(-1, dim))
    return x


def best_first(score: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, N - prefix) positions of a uniform batch's patch tokens, best ``score`` (B, N) first (ties by
    position, as :func:`rank_desc`)."""
    return torch.argsort(score[:, prefix:].float(), dim=1, descending=True, stable=True) + prefix


def prefix_first(prefix: int, *positions: torch.Tensor) -> torch.Tensor:
    """(B, prefix + K1 + K2 ...): the prefix tokens' positions, then the positions ``positions`` (B, Ki),
    in that order: the index of a reduce's output tokens, selected with :func:`gather_tokens` in one pass."""
    first = positions[0]
    return torch.cat([torch.arange(prefix, device=first.device).expand(first.shape[0], -1), *positions], dim=1)


def take(x: torch.Tensor, size: torch.Tensor, prefix: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix and the patch tokens at positions ``index`` (B, K) of a uniform batch, in position order:
    x (B, prefix + K, C), size (B, prefix + K)."""
    index = prefix_first(prefix, index.sort(dim=1).values)
    return gather_tokens(x, index), size.gather(1, index)


def merge_sources(x: torch.Tensor, size: torch.Tensor, src_x: torch.Tensor, src_size: torch.Tensor,
                  dst: torch.Tensor, fuse: str = "average") -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the tokens ``src_x`` (B, R, C) of sizes ``src_size`` (B, R) into the tokens ``dst`` (B, R)
    index of ``x`` (B, M, C), ``size`` (B, M): :func:`merge_into`'s ``fuse`` modes, computed on the
    sources and the tokens they merge into only; every other token is left as it is. ``x`` is changed
    in place: callers pass a tensor they have just made. Returns x, size (B, M, ...)."""
    if fuse == "drop":
        return x, size
    batch, m, dim = x.shape
    merged_size = size.scatter_add(1, dst, src_size)
    rows = _flat_rows(dst, m)
    total = merged_size.gather(1, dst).reshape(-1, 1)
    total = torch.where(total > 0, total, 1)  # a slot of size 0 that only size-0 sources reach stays as it is
    flat = x.view(batch * m, dim)
    own = flat.index_select(0, rows)
    src_x = src_x.reshape(-1, dim)
    # each merged token's own share first (rows repeat, with the same value), then its sources' shares
    flat.index_copy_(0, rows, own * (size.gather(1, dst).reshape(-1, 1) / total).to(x.dtype))
    flat.index_add_(0, rows, src_x * (src_size.reshape(-1, 1) / total).to(x.dtype))
    if fuse == "mlerp":  # rescaled to the largest norm among the tokens merged (ToFu's MLERP)
        largest = torch.zeros(batch * m, device=x.device).scatter_reduce_(
            0, rows, torch.maximum(own.float().norm(dim=-1), src_x.float().norm(dim=-1)), "amax")
        out = flat.index_select(0, rows)
        scale = largest.index_select(0, rows) / out.float().norm(dim=-1).clamp(min=torch.finfo(torch.float32).tiny)
        flat.index_copy_(0, rows, out * scale[:, None].to(x.dtype))
    return x, merged_size


def positions_first(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where ``keep`` (B, N) is True, each image's positions in order and padded at the end to the most
    any image has: (B, M) positions (past an image's count, positions where ``keep`` is False) and the
    (B,) counts."""
    counts = keep.sum(dim=1)
    return torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :int(counts.max())], counts


def compact(x: torch.Tensor, size: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the tokens where ``keep`` (B, N) is True, in order, padded at the end.

    Returns x (B, M, C) and size (B, M) with M = max kept count; padding slots
    get size 0 and zero features. Tokens with size 0 are never kept.
    """
    order, counts = positions_first(keep & (size > 0))
    valid = torch.arange(order.shape[1], device=x.device)[None] < counts[:, None]
    x = gather_tokens(x, order).masked_fill(~valid[..., None], 0)
    return x, size.gather(1, order) * valid


def rank_desc(score: torch.Tensor) -> torch.Tensor:
    """(B, N) rank of each entry in descending order of ``score`` (0 = best; ties by position)."""
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    return torch.argsort(order, dim=1)


def patch_score(score: torch.Tensor, size: torch.Tensor, prefix: int) -> torch.Tensor:
    """Scores with prefix and padding slots set to -inf, so they are never chosen."""
    score = score.float().clone()
    score[:, :prefix] = NEG
    return score.masked_fill(size <= 0, NEG)


def topk_mask(score: torch.Tensor, size: torch.Tensor, prefix: int, k: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: the prefix plus, per image, the ``k`` (B,) best-scoring patch tokens."""
    rank = rank_desc(patch_score(score, size, prefix))
    keep = rank < k[:, None]
    keep[:, :prefix] = True
    return keep & (size > 0)


def merge_into(x, size, src: torch.Tensor, dst: torch.Tensor, fuse: str = "average"):
    """Merge each token where ``src`` (B, N) is True into token ``dst`` (B, N) index.

    ``fuse``: ``average``, the size-weighted average (ToMe); ``mlerp``, that average rescaled to the
    largest norm among the tokens merged (ToFu's norm-preserving MLERP); ``drop``, the token merged
    into keeps its features and size and the others are dropped (ToFu's pruning). Returns x, size of
    the same shape with the merged tokens' size set to 0 (callers :func:`compact` them away).
    """
    if fuse == "drop":
        return x, size * ~src
    w = size * src
    dst = torch.where(src, dst, torch.arange(x.shape[1], device=x.device)[None])
    xs = x * (size - w)[..., None].to(x.dtype)
    xs = add_tokens_(xs, dst, x * w[..., None].to(x.dtype))
    size = (size - w).scatter_add(1, dst, w)
    # merged-away rows (size 0) are 0 / 1, not 0 / 0: a clamp to float32's tiny is 0 in half precision
    out = xs / torch.where(size > 0, size, 1).to(x.dtype)[..., None]
    if fuse == "mlerp":
        norms = x.float().norm(dim=-1)
        largest = norms.scatter_reduce(1, dst, norms, reduce="amax", include_self=True)
        received = torch.zeros_like(dst).scatter_add(1, dst, src.long()) > 0  # tokens something merged into
        scale = largest / out.float().norm(dim=-1).clamp(min=torch.finfo(torch.float32).tiny)
        out = torch.where(received[..., None], out * scale[..., None].to(x.dtype), out)
    return out, size


def padding_groups(counts: torch.Tensor, tolerance: float) -> list[torch.Tensor]:
    """Split a batch by its token counts (B,) into groups (index tensors into the batch) in which
    padding, the slots a shorter image leaves empty beside the group's widest, is at most
    ``tolerance`` of the group's slots. Images are taken widest first; each group is the longest run
    of them, from the widest not yet taken, within the tolerance."""
    order = torch.argsort(counts, descending=True, stable=True)
    ordered = counts[order].tolist()
    groups, start, empty = [], 0, 0
    for end, count in enumerate(ordered):
        gap = ordered[start] - count
        if end > start and (empty + gap) > tolerance * ordered[start] * (end - start + 1):
            groups.append(order[start:end])
            start, empty, gap = end, 0, 0
        empty += gap
    groups.append(order[start:])
    return groups
