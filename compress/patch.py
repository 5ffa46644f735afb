"""Apply a Plan to a timm VisionTransformer by swapping forward methods.

The thin layer around :mod:`~paretoken.compress.reducers` and
:mod:`~paretoken.compress.scores` (ToMe's patch/timm.py pattern): the model's,
its blocks' and their attentions' classes are swapped for subclasses whose
forward threads the token state (sizes, padding) through the blocks. Weights
are untouched; attention stays on ``scaled_dot_product_attention`` with the
sizes as an additive float mask.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from paretoken.compress import reducers, scores
from paretoken.compress.plan import Plan, Stage
from paretoken.errors import ParetokenError


class TokenState:
    """Per-forward token bookkeeping shared by a patched model's blocks.

    size: (B, N) patches per token, 0 for padding. counts: one (B,) tensor per
    block, the valid tokens (prefix included) each image has after the block.
    """

    def __init__(self, prefix: int) -> None:
        self.prefix = prefix
        self.size: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.counts: list[torch.Tensor] = []

    def start(self, x: torch.Tensor) -> None:
        self.size = torch.ones(x.shape[:2], device=x.device)
        self.bias = None
        self.counts = []

    def update(self, size: torch.Tensor, dtype: torch.dtype) -> None:
        self.size = size
        self.bias = reducers.attention_bias(size, dtype)


def _needs(stage: Stage | None) -> frozenset[str]:
    """Which attention by-products a stage's score needs."""
    if stage is None:
        return frozenset()
    need = {"cls"} if stage.score in ("cls_attn", "head_weighted") else set()
    if stage.score == "head_weighted":
        need.add("head")
    if stage.op in ("merge", "joint"):
        need.add("keys")
    if stage.op == "slim":
        need.add("full")
    return frozenset(need)


class PlanAttention(Attention):
    """timm Attention that adds the token-size bias and keeps what the block's stage scores with."""

    _pt_state: TokenState
    _pt_needs: frozenset[str] = frozenset()
    _pt_info: dict[str, Any]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        bias = self._pt_state.bias
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            out = self.attn_drop(attn.softmax(dim=-1)) @ v
        info: dict[str, Any] = {}
        need = self._pt_needs
        if need:
            cls_attn = scores.class_attention(q, k, self.scale, bias)
            if "head" in need:
                weights = scores.head_importance(out, self._pt_state.size)
                info["score"] = scores.head_weighted_score(cls_attn, weights)
            else:
                info["score"] = scores.cls_attn_score(cls_attn)
            if "keys" in need:
                info["keys"] = scores.key_metric(k)
            if "full" in need:
                info["score"] = scores.propagated_importance(q, k, self.scale, bias, info["score"])
        self._pt_info = info
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


def reduce_tokens(stage: Stage, x: torch.Tensor, size: torch.Tensor, info: dict[str, Any], prefix: int):
    """Apply one stage to the token state; returns (x, size)."""
    score, keys = info.get("score"), info.get("keys")
    if stage.op in ("prune", "slim"):
        return reducers.prune(x, size, score, prefix, keep=stage.keep, r=stage.r)
    if stage.op == "prune_fuse":
        return reducers.prune_fuse(x, size, score, prefix, keep=stage.keep, r=stage.r)
    if stage.op == "merge":
        return reducers.bipartite_merge(x, size, keys, prefix, keep=stage.keep, r=stage.r)
    if stage.op == "joint":
        return reducers.joint_merge_prune(x, size, score, keys, prefix, mass=stage.mass, sim=stage.sim)
    if stage.op == "threshold":
        return reducers.threshold_prune(x, size, score, prefix, threshold=stage.threshold)
    raise AssertionError(stage.op)  # Stage validation makes this unreachable


class PlanBlock(Block):
    """timm Block that reduces tokens between attention and MLP when it has a stage."""

    _pt_state: TokenState
    _pt_stage: Stage | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        state = self._pt_state
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        if self._pt_stage is not None:
            x, size = reduce_tokens(self._pt_stage, x, state.size, self.attn._pt_info, state.prefix)
            state.update(size, x.dtype)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        state.counts.append((state.size > 0).sum(dim=1))
        return x


class PlanModel:
    """Mixin for a timm VisionTransformer (or a subclass) with a plan applied."""

    _pt_state: TokenState
    _pt_plan: Plan

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        self._pt_state.start(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"Plan{cls.__name__}", (PlanModel, cls), {})
    return _PATCHED_CLASSES[cls]


def _check_model(model: torch.nn.Module) -> None:
    name = getattr(model, "default_cfg", {}).get("architecture") or type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise ParetokenError(f"model: {name} ({type(model).__name__}) is not a timm VisionTransformer; "
                             "valid: timm ViT/DeiT/DeiT-III models (e.g. deit_small_patch16_224)")
    if model.global_pool != "token":
        raise ParetokenError(f"model: {name} pools with global_pool={model.global_pool!r}; "
                             "valid: 'token' (class-token models such as DeiT and ViT)")
    for i, blk in enumerate(model.blocks):
        if type(blk) not in (Block, PlanBlock) or type(blk.attn) not in (Attention, PlanAttention):
            raise ParetokenError(f"model: {name} block {i} is {type(blk).__name__}/{type(blk.attn).__name__}; "
                                 "valid: timm's standard Block with Attention")


def apply(model: torch.nn.Module, plan: Plan) -> torch.nn.Module:
    """Patch ``model`` in place to run ``plan``; returns it. Applying again replaces the plan.

    An empty plan leaves the logits bit-for-bit unchanged.
    """
    if not isinstance(plan, Plan):
        raise ParetokenError(f"plan: expected a paretoken Plan, got {type(plan).__name__}")
    _check_model(model)
    plan.check_depth(len(model.blocks))
    for stage in plan.stages:
        if stage.score == "predictor":
            raise ParetokenError(f"stage at layer {stage.layer}: score 'predictor' needs predictors trained by "
                                 "`paretoken finetune`; valid training-free scores: cls_attn, head_weighted")
    state = TokenState(prefix=model.num_prefix_tokens)
    if not isinstance(model, PlanModel):
        model.__class__ = _patched_class(type(model))
    model._pt_state, model._pt_plan = state, plan
    by_layer = {s.layer: s for s in plan.stages}
    for i, blk in enumerate(model.blocks):
        blk.__class__, blk.attn.__class__ = PlanBlock, PlanAttention
        blk._pt_state = blk.attn._pt_state = state
        blk._pt_stage = by_layer.get(i)
        blk.attn._pt_needs = _needs(by_layer.get(i))
        blk.attn._pt_info = {}
    return model


def token_counts(model: torch.nn.Module) -> torch.Tensor:
    """(B, depth) valid tokens (prefix included) per image after each block of the last forward."""
    if not isinstance(model, PlanModel) or not model._pt_state.counts:
        raise ParetokenError("model: no token counts; apply a plan and run a forward pass first")
    return torch.stack(model._pt_state.counts, dim=1)


def applied_plan(model: torch.nn.Module) -> Plan | None:
    """The plan applied to ``model``, or None."""
    return model._pt_plan if isinstance(model, PlanModel) else None
