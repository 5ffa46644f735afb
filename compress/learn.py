"""Learned token reduction: DynamicViT predictors and AS-ViT thresholds in their training form.

At inference both are ordinary hard stages (``prune``/``prune_fuse`` with ``score: predictor``
keep the top-k tokens by predicted keep probability; ``threshold`` drops tokens below a
threshold). During training no token is removed: each stage multiplies the tokens' sizes by a
keep factor, and attention weights every key by its size (``softmax(a) * size``, renormalised),
so a dropped token stops being seen while gradients still reach the decision:

- predictor stages sample a hard keep/drop per token with straight-through Gumbel-softmax
  (DynamicViT);
- threshold stages use the differentiable mask ``sigmoid((relative score - threshold) / tau)``
  with a learnable threshold (AS-ViT).

Budget losses keep the token counts near their targets. Shapes: x (B, N, C), size (B, N) as in
:mod:`paretoken.compress.tokens` (0 = padding); the first ``prefix`` tokens are always kept.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TokenPredictor(nn.Module):
    """DynamicViT's predictor: per-token keep/drop log-probabilities from local and global features.

    LayerNorm + Linear + GELU embed each token; half of the channels stay local, the other half
    is averaged over the image's live tokens (weighted by their keep factor); an MLP maps the
    concatenation to 2 log-probabilities (keep, drop).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.head = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """(B, N, 2) log-probabilities (keep, drop) for tokens x (B, N, C) with keep factors alive (B, N)."""
        h = self.embed(x)
        local, rest = h.chunk(2, dim=-1)
        w = alive.to(h.dtype)[..., None]
        glob = (rest * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp(min=1e-6)
        return self.head(torch.cat([local, glob.expand_as(rest)], dim=-1))


def predictor_score(predictor: TokenPredictor, x: torch.Tensor, size: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, N) keep probability of each patch token (prefix tokens get 1); the score top-k prunes with."""
    alive = size.clamp(max=1.0)
    keep = predictor(x[:, prefix:], alive[:, prefix:])[..., 0].exp()
    return torch.cat([keep.new_ones(keep.shape[0], prefix), keep], dim=1)


def effective_tokens(size: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B,) patch tokens alive, counting each token's keep factor (a merged token counts once)."""
    return size[:, prefix:].clamp(max=1.0).sum(dim=1)


def relative_score(score: torch.Tensor, size: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, N) patch scores relative to uniform: score * alive tokens / total patch score.

    Equals :func:`~paretoken.compress.ops.threshold.threshold_prune`'s relative score when every
    token is fully alive.
    """
    patch = score.float() * (size > 0)
    patch[:, :prefix] = 0.0
    n = effective_tokens(size, prefix)
    return patch * n[:, None] / patch.sum(dim=1, keepdim=True).clamp(min=torch.finfo(patch.dtype).tiny)


def soft_threshold_keep(score: torch.Tensor, size: torch.Tensor, prefix: int, threshold: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """(B, N) differentiable keep factor sigmoid((relative score - threshold) / temperature); prefix 1."""
    keep = torch.sigmoid((relative_score(score, size, prefix) - threshold) / temperature)
    is_prefix = torch.arange(keep.shape[1], device=keep.device) < prefix
    return torch.where(is_prefix[None], torch.ones_like(keep), keep)


def gumbel_keep(log_probs: torch.Tensor, prefix: int, tau: float = 1.0) -> torch.Tensor:
    """(B, N) hard 0/1 keep decisions with straight-through gradients, from patch log-probs (B, N - prefix, 2)."""
    keep = F.gumbel_softmax(log_probs, tau=tau, hard=True)[..., 0]
    return torch.cat([keep.new_ones(keep.shape[0], prefix), keep], dim=1)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, size: torch.Tensor,
                     dropout: nn.Module | None = None) -> torch.Tensor:
    """Attention whose weights are ``softmax(q k^T scale) * size``, renormalised over keys.

    Equal to adding ``log(size)`` to the logits, but differentiable in ``size`` where it is 0.
    q, k, v (B, H, N, D); size (B, N); returns (B, H, N, D).
    """
    attn = ((q * scale) @ k.transpose(-2, -1)).float()
    attn = (attn - attn.amax(dim=-1, keepdim=True)).exp() * size[:, None, None, :].float()
    attn = attn / attn.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(attn.dtype).tiny)
    if dropout is not None:
        attn = dropout(attn)
    return attn.to(v.dtype) @ v


class LearnableThreshold(nn.Module):
    """One stage's AS-ViT threshold, kept positive by learning its logarithm."""

    def __init__(self, threshold: float, temperature: float = 0.1) -> None:
        super().__init__()
        self.log_threshold = nn.Parameter(torch.tensor(math.log(threshold)))
        self.temperature = temperature

    @property
    def value(self) -> torch.Tensor:
        """The threshold as a 0-dim tensor that gradients flow through."""
        return self.log_threshold.exp()

    def current(self) -> float:
        """The threshold now, as a number (for the hard rule and the plan)."""
        return float(self.log_threshold.detach().exp())


def ratio_loss(kept: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
    """DynamicViT's ratio loss: mean over images of (kept fraction - target)^2; kept (B,)."""
    return ((kept - target) ** 2).mean()


def budget_loss(kept: torch.Tensor, budget: float) -> torch.Tensor:
    """AS-ViT-style budget loss: (batch-mean kept fraction - budget)^2; images may differ, the budget holds on average."""
    return (kept.mean() - budget) ** 2


__all__ = ["LearnableThreshold", "TokenPredictor", "budget_loss", "effective_tokens", "gumbel_keep",
           "masked_attention", "predictor_score", "ratio_loss", "relative_score", "soft_threshold_keep"]
