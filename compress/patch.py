"""Apply a Plan to a timm VisionTransformer by swapping forward methods.

The thin layer around the op registry (:mod:`~paretoken.compress.ops`) and
:mod:`~paretoken.compress.scores` (ToMe's patch/timm.py pattern): the model's,
its blocks' and their attentions' classes are swapped for subclasses whose
forward threads the token state (sizes, padding) through the blocks. Weights
are untouched; attention stays on ``scaled_dot_product_attention`` with the
sizes as an additive float mask.

Learned stages (:mod:`~paretoken.compress.learn`) add modules to their block:
``token_predictor`` for ``score: predictor`` stages (weights travel in the
checkpoint as ``blocks.<i>.token_predictor.*``) and, while fine-tuning,
``token_threshold`` for ``threshold`` stages. In training mode those stages
mask instead of dropping (see :mod:`~paretoken.compress.learn`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from paretoken.compress import learn, scores, tokens
from paretoken.compress.ops import SCORE_NEEDS, get_op
from paretoken.compress.plan import Plan, Stage
from paretoken.errors import ParetokenError


class TokenState:
    """Per-forward token bookkeeping shared by a patched model's blocks.

    size: (B, N) patches per token (times the keep factor of learned stages in
    training), 0 for padding. counts: one (B,) tensor per block, the valid
    tokens (prefix included) each image has after the block. slots: per block,
    the token slots the batch held after it (valid and padding, summed over the
    sub-batches of :func:`forward_grouped`). soft: True once a
    learned stage has masked tokens in this forward (attention then weights keys
    by size, differentiably). kept: per learned stage of this forward,
    (stage, kept, before): the (B,) fractions of the input patch tokens alive
    after it (with gradients) and before it. uniform: True while every image has all its tokens valid
    and the same count (no per-image stage, no learned mask yet in this forward), known from the plan,
    not the data: stages then run their op's uniform reduce. unit: True while, besides, every size is
    1 (no merge or fuse yet), so attention runs unmasked.
    """

    def __init__(self, prefix: int) -> None:
        self.prefix = prefix
        self.size: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.counts: list[torch.Tensor] = []
        self.slots: list[int] = []
        self.soft = False
        self.patches = 0
        self.kept: list[tuple[Stage, torch.Tensor, torch.Tensor]] = []
        self.uniform = self.unit = True

    def start(self, x: torch.Tensor) -> None:
        self.size = torch.ones(x.shape[:2], device=x.device)
        self.bias = None
        self.counts = []
        self.slots = []
        self.soft = False
        self.patches = x.shape[1] - self.prefix
        self.kept = []
        self.uniform = self.unit = True

    def update(self, size: torch.Tensor, dtype: torch.dtype) -> None:
        self.size = size
        if self.unit:  # every size 1, known without looking
            self.bias = None
        elif self.uniform:  # known to hold merged tokens: a mask, without asking the device whether it is needed
            self.bias = size.detach().log().to(dtype)[:, None, None, :]
        else:
            self.bias = tokens.attention_bias(size.detach(), dtype)

    def record(self, x: torch.Tensor) -> None:
        """Record the tokens and slots a block leaves, from its output ``x`` (B, N, C)."""
        self.counts.append((self.size > 0).sum(dim=1))
        self.slots.append(x.shape[0] * x.shape[1])

    def mask(self, stage: Stage, keep: torch.Tensor, dtype: torch.dtype) -> None:
        """Multiply the sizes by a learned stage's keep factor (B, N) and record the kept fractions."""
        before = learn.effective_tokens(self.size, self.prefix).detach() / self.patches
        self.soft, self.uniform, self.unit = True, False, False
        self.update(self.size * keep, dtype)
        self.kept.append((stage, learn.effective_tokens(self.size, self.prefix) / self.patches, before))


def _needs(stage: Stage | None) -> frozenset[str]:
    """Which attention by-products a stage needs: its score's and its op's (:mod:`~paretoken.compress.ops`)."""
    if stage is None:
        return frozenset()
    return SCORE_NEEDS[stage.score] | get_op(stage.op).needs


class PlanAttention(Attention):
    """timm Attention that adds the token-size bias and keeps what the block's stage scores with."""

    _pt_state: TokenState
    _pt_needs: frozenset[str] = frozenset()
    _pt_info: dict[str, Any]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                queries: int | None = None) -> torch.Tensor:
        """x (B, N, C) -> (B, Q, C): every token is a key and value; the first ``queries`` tokens
        (all when None) are the queries, and only their outputs are computed."""
        B, N, _ = x.shape
        Q = N if queries is None else queries
        bias = self._pt_state.bias
        gate = self.gate(x[:, :Q]).sigmoid() if self.gate is not None else None
        # with ``queries``, a plain Linear qkv is applied by its weight (its forward hooks are not called:
        # fvcore's tracing hooks are on every module); another module (an adapter) runs whole, q sliced
        if queries is None or type(self.qkv) is not torch.nn.Linear:
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q = q[:, :, :Q]
        else:  # the query rows of the qkv projection for the query tokens only
            weight, bias_qkv, dim = self.qkv.weight, self.qkv.bias, self.attn_dim
            q = F.linear(x[:, :Q], weight[:dim], None if bias_qkv is None else bias_qkv[:dim])
            q = q.reshape(B, Q, self.num_heads, self.head_dim).transpose(1, 2)
            kv = F.linear(x, weight[dim:], None if bias_qkv is None else bias_qkv[dim:])
            k, v = kv.reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        size = self._pt_state.size
        if self._pt_state.soft:
            out = learn.masked_attention(q, k, v, self.scale, size, self.attn_drop)
            info = self._by_products(q, k, out, None, bias, size)
        elif "full" in self._pt_needs and queries is None:  # the stage reads the whole matrix
            out, info = self._attend_in_chunks(q, k, v, bias, size)
        else:
            if self.fused_attn:
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0)
            else:
                attn = (q * self.scale) @ k.transpose(-2, -1)
                if bias is not None:
                    attn = attn + bias
                out = self.attn_drop(attn.softmax(dim=-1)) @ v
            info = self._by_products(q, k, out, None, bias, size)
        self._pt_info = info
        out = self.norm(out.transpose(1, 2).reshape(B, Q, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def _by_products(self, q: torch.Tensor, k: torch.Tensor, out: torch.Tensor, probs: torch.Tensor | None,
                     bias: torch.Tensor | None, size: torch.Tensor) -> dict[str, Any]:
        """What the block's stage scores with (``info``), from q, k (B, H, N, D), the head outputs
        ``out`` (B, H, N, Dv) and, when computed, the attention probabilities ``probs`` (B, H, N, N)."""
        need, info = self._pt_needs, {}
        if "cls" in need:
            cls_attn = probs[:, :, 0] if probs is not None else scores.class_attention(q, k, self.scale, bias)
            if "head" in need:
                info["score"] = scores.head_weighted_score(cls_attn, scores.head_importance(out, size))
            else:
                info["score"] = scores.cls_attn_score(cls_attn)
        if "keys" in need:
            info["keys"] = scores.key_metric(k)
        if "full" in need:
            if probs is None:
                probs = scores.attention_probs(q, k, self.scale, bias)
            info["score"] = scores.propagated_importance(probs, info["score"])
        return info

    def _attend_in_chunks(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                          size: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Attention computed from its probabilities, which a ``full`` stage reads too, a few images at
        a time on CPU (:func:`~paretoken.compress.scores.cache_chunks`): the head outputs (B, H, N, Dv)
        and the stage's ``info``."""
        outs, infos = [], []
        for rows in scores.cache_chunks(q):
            part = None if bias is None else bias[rows]
            probs = scores.attention_probs(q[rows], k[rows], self.scale, part)
            outs.append(self.attn_drop(probs).to(v.dtype) @ v[rows])
            infos.append(self._by_products(q[rows], k[rows], outs[-1], probs, part, size[rows]))
        return torch.cat(outs), {key: torch.cat([info[key] for info in infos]) for key in infos[0]}


def reduce_tokens(stage: Stage, x: torch.Tensor, state: TokenState, info: dict[str, Any], **overrides: float):
    """Apply one stage to the token state with its op's reduce function (its uniform one while the batch
    is uniform); returns (x, size) and updates ``state``'s flags. ``overrides`` replace amount fields of
    the stage (a learned threshold)."""
    spec = get_op(stage.op)
    settings = {**stage.settings, **overrides}
    if state.uniform and spec.reduce_uniform is not None:
        x, size = spec.reduce_uniform(x, state.size, info, state.prefix, **settings)
    else:
        x, size = spec.reduce(x, state.size, info, state.prefix, **settings)
    state.uniform = state.uniform and not spec.per_image
    state.unit = state.unit and state.uniform and not spec.sums_sizes
    return x, size


class PlanBlock(Block):
    """timm Block that reduces tokens between attention and MLP when it has a stage, or, as the
    last block of a ``prefix_only_last`` plan, computes only the prefix tokens."""

    _pt_state: TokenState
    _pt_stage: Stage | None = None
    _pt_prefix_only: bool = False

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = self.feed_forward(self.attend(x))
        self._pt_state.record(x)
        return x

    @property
    def reduces(self) -> bool:
        """Whether the block applies a stage (a ``prefix_only_last`` plan's last block skips its own)."""
        return self._pt_stage is not None and not self._pt_prefix_only

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The block's first half: :meth:`attention` and its residual, then the block's stage."""
        x = self.attention(x)
        return self.reduce(x) if self.reduces else x

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention and its residual (last in a ``prefix_only_last`` plan, the prefix tokens' only); what
        the stage scores with is left in ``attn._pt_info``."""
        state = self._pt_state
        if self._pt_prefix_only:
            prefix = state.prefix
            x = x[:, :prefix] + self.drop_path1(self.ls1(self.attn(self.norm1(x), queries=prefix)))
            state.size, state.bias = state.size[:, :prefix], None  # prefix tokens stand for one patch each
            return x
        return x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The block's stage on the tokens ``x`` (B, N, C) that :meth:`attention` left."""
        return self._reduce(self._pt_stage, x, self._pt_state)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's second half: the MLP and its residual."""
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _reduce(self, stage: Stage, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        info, prefix = self.attn._pt_info, state.prefix
        learned_threshold = getattr(self, "token_threshold", None)
        if self.training and stage.score == "predictor":
            log_probs = self.token_predictor(x[:, prefix:], state.size[:, prefix:].clamp(max=1.0))
            state.mask(stage, learn.gumbel_keep(log_probs, prefix), x.dtype)
            return x
        if self.training and learned_threshold is not None:
            keep = learn.soft_threshold_keep(info["score"], state.size, prefix, learned_threshold.value,
                                             learned_threshold.temperature)
            state.mask(stage, keep, x.dtype)
            return x
        if stage.score == "predictor":
            info = {**info, "score": learn.predictor_score(self.token_predictor, x, state.size, prefix)}
        learned = {"threshold": learned_threshold.current()} if learned_threshold is not None else {}
        x, size = reduce_tokens(stage, x, state, info, **learned)
        state.update(size, x.dtype)
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
        if self.training or not self._pt_plan.per_image:
            for blk in self.blocks:
                x = blk(x)
            return self.norm(x)
        from paretoken.compress.grouping import forward_grouped

        return forward_grouped(self, x)


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"Plan{cls.__name__}", (PlanModel, cls), {})
    return _PATCHED_CLASSES[cls]


def check_model(model: torch.nn.Module) -> None:
    """One-line error unless ``model`` is a class-token timm VisionTransformer of standard blocks."""
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


def _attach_predictor(model: torch.nn.Module, layer: int, init: bool) -> None:
    """Give block ``layer`` its ``token_predictor``: kept if present, else loaded from the weights
    the checkpoint carried (``model._pt_predictor_state``), else fresh when ``init``."""
    block = model.blocks[layer]
    if isinstance(getattr(block, "token_predictor", None), learn.TokenPredictor):
        return
    weight = next(model.parameters())
    prefix = f"blocks.{layer}.token_predictor."
    saved = {k[len(prefix):]: v for k, v in getattr(model, "_pt_predictor_state", {}).items() if k.startswith(prefix)}
    if saved:
        try:
            with torch.device("meta"):  # no initialisation to overwrite, no draw from the global RNG
                predictor = learn.TokenPredictor(model.embed_dim)
            predictor = predictor.to_empty(device=weight.device)
            predictor.load_state_dict(saved)  # a copy: training it leaves the checkpoint's weights as they are
        except RuntimeError as err:
            reason = " ".join(str(err).split())[:160]
            raise ParetokenError(f"stage at layer {layer}: the checkpoint's {prefix}* weights do not fit this "
                                 f"model ({reason}); valid: predictors trained on this model") from None
    elif not init:
        raise ParetokenError(f"stage at layer {layer}: score 'predictor' needs trained predictor weights "
                             f"({prefix}* in the checkpoint); train them with `paretoken finetune --plan PLAN`, "
                             "or use a training-free score: cls_attn, head_weighted")
    else:
        predictor = learn.TokenPredictor(model.embed_dim)
    block.token_predictor = predictor.to(device=weight.device, dtype=weight.dtype)


def apply(model: torch.nn.Module, plan: Plan, init_predictors: bool = False) -> torch.nn.Module:
    """Patch ``model`` in place to run ``plan``; returns it. Applying again replaces the plan.

    An empty plan leaves the logits bit-for-bit unchanged. ``score: predictor`` stages need
    predictor weights from the checkpoint (or from an earlier apply); ``init_predictors``
    creates untrained ones instead, for fine-tuning.
    """
    if not isinstance(plan, Plan):
        raise ParetokenError(f"plan: expected a paretoken Plan, got {type(plan).__name__}")
    check_model(model)
    plan.check_depth(len(model.blocks))
    last = len(model.blocks) - 1
    running = plan.stages_run(len(model.blocks))
    for stage in running:
        if stage.score == "predictor":
            _attach_predictor(model, stage.layer, init_predictors)
    state = TokenState(prefix=model.num_prefix_tokens)
    if not isinstance(model, PlanModel):
        model.__class__ = _patched_class(type(model))
    model._pt_state, model._pt_plan = state, plan
    by_layer = {s.layer: s for s in running}
    for i, blk in enumerate(model.blocks):
        blk.__class__, blk.attn.__class__ = PlanBlock, PlanAttention
        blk._pt_state = blk.attn._pt_state = state
        blk._pt_prefix_only = plan.prefix_only_last and i == last
        blk._pt_stage = by_layer.get(i)
        blk.attn._pt_needs = _needs(blk._pt_stage)
        blk.attn._pt_info = {}
        if hasattr(blk, "token_threshold"):
            del blk.token_threshold
        if hasattr(blk, "token_predictor") and (blk._pt_stage is None or blk._pt_stage.score != "predictor"):
            del blk.token_predictor
    return model


def _require_plan(model: torch.nn.Module) -> Plan:
    plan = applied_plan(model)
    if plan is None:
        raise ParetokenError("model: no plan applied; call paretoken.apply(model, plan) first")
    return plan


def learn_thresholds(model: torch.nn.Module, temperature: float = 0.1) -> dict[int, learn.LearnableThreshold]:
    """Make every ``threshold`` stage the applied plan runs learnable; returns {layer: module}.

    Each block gets a ``token_threshold`` initialised from its stage. Training mode then uses the
    differentiable mask, eval mode the hard rule with the learned value; applying a plan again
    removes them (write the learned values into the plan with :func:`learned_plan` first).
    """
    plan = _require_plan(model)
    device = next(model.parameters()).device
    learned = {}
    for stage in plan.stages_run(len(model.blocks)):
        if stage.op == "threshold":
            module = learn.LearnableThreshold(stage.threshold, temperature).to(device)
            model.blocks[stage.layer].token_threshold = learned[stage.layer] = module
    return learned


def learned_plan(model: torch.nn.Module) -> Plan:
    """The applied plan with each learnable threshold replaced by its current value."""
    plan = _require_plan(model)
    stages = []
    for stage in plan.stages:
        module = getattr(model.blocks[stage.layer], "token_threshold", None)
        if module is not None:
            stage = dataclasses.replace(stage, threshold=float(f"{module.current():.6g}"))
        stages.append(stage)
    return dataclasses.replace(plan, stages=tuple(stages))


def token_counts(model: torch.nn.Module) -> torch.Tensor:
    """(B, depth) valid tokens (prefix included) per image after each block of the last forward."""
    if not isinstance(model, PlanModel) or not model._pt_state.counts:
        raise ParetokenError("model: no token counts; apply a plan and run a forward pass first")
    return torch.stack(model._pt_state.counts, dim=1)


def token_slots(model: torch.nn.Module) -> list[int]:
    """Per block, the token slots (valid and padding) the last forward's batch held after it."""
    token_counts(model)  # the same error without a forward
    return list(model._pt_state.slots)


def applied_plan(model: torch.nn.Module) -> Plan | None:
    """The plan applied to ``model``, or None."""
    return model._pt_plan if isinstance(model, PlanModel) else None
