"""Token scores from one attention layer: pure functions on q, k and head outputs.

Shapes: q, k (B, H, N, D); head outputs (B, H, N, Dv); bias (B, 1, 1, N) or
None (see :func:`paretoken.compress.tokens.attention_bias`). Scores are
(B, N) with the class token at index 0.
"""
from __future__ import annotations

import torch


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """(B, H, Q, N) float32 attention probabilities of the queries ``q`` (B, H, Q, D) over the keys."""
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return logits.float().softmax(dim=-1)


def cache_chunks(q: torch.Tensor, budget: int = 4 << 20) -> list[slice]:
    """Slices of the batch of ``q`` (B, H, N, D) whose (H, N, N) float32 attention matrices take at most
    ``budget`` bytes together (at least one image each) on CPU, the whole batch elsewhere. An
    unfused attention all at once streams the B matrices through memory three times (logits,
    softmax, product with the values); in cache-sized chunks it runs about as fast as fused attention."""
    batch, heads, tokens = q.shape[:3]
    per_chunk = batch if q.device.type != "cpu" else max(1, budget // (4 * heads * tokens * tokens))
    return [slice(start, start + per_chunk) for start in range(0, batch, per_chunk)]


def class_attention(q, k, scale: float, bias) -> torch.Tensor:
    """(B, H, N): each head's attention from the class token (query 0) to every token."""
    return attention_probs(q[:, :, :1], k, scale, bias)[:, :, 0]


def head_importance(head_out: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """(B, H) weights summing to 1: the norm of each head's output over the image's valid tokens."""
    valid = (size > 0).to(head_out.dtype)[:, None, :, None]
    norms = (head_out * valid).float().pow(2).sum(dim=(-1, -2)).sqrt()
    return norms / norms.sum(dim=1, keepdim=True).clamp(min=torch.finfo(norms.dtype).tiny)


def cls_attn_score(cls_attn: torch.Tensor) -> torch.Tensor:
    """(B, N) EViT score: class attention averaged over heads."""
    return cls_attn.mean(dim=1)


def head_weighted_score(cls_attn: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, N) AS-ViT score: class attention with heads weighted by ``weights`` (B, H)."""
    return torch.einsum("bhn,bh->bn", cls_attn, weights)


def key_metric(k: torch.Tensor) -> torch.Tensor:
    """(B, N, D) ToMe's similarity metric: keys (B, H, N, D) averaged over heads.

    Summed head by head: k is a strided view of the qkv projection, over which a reduction across
    dim 1 is several times slower on CPU than H - 1 additions."""
    heads = k.unbind(dim=1)
    total = heads[0]
    for head in heads[1:]:
        total = total + head
    return total / len(heads)


def propagated_importance(probs: torch.Tensor, class_score: torch.Tensor) -> torch.Tensor:
    """(B, N) Patch Slimming importance: class importance (B, N) carried back one attention step of
    the probabilities ``probs`` (B, H, N, N) (:func:`attention_probs`).

    importance_j = sum_i class_score_i * mean_h A_h(i, j): a token matters as
    much as the attention it receives from the tokens the class token relies on.
    """
    weights = class_score.float()[:, None, None, :].expand(-1, probs.shape[1], -1, -1)  # fvcore counts all heads
    return (weights @ probs)[:, :, 0].mean(dim=1)
