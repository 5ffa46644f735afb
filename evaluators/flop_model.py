"""GFLOPs of a patched model counted from its token counts, exact to fvcore's trace, for every image.

fvcore traces one forward per shape, so a plan whose token count differs per image could only be
traced on a few images alone (``--flops trace``). A transformer's FLOPs are a function of how many
tokens each block sees, though, and that function is calibrated here once per model with fvcore
itself (same conventions, same SDPA handle: :mod:`paretoken.evaluators.flops`):

- outside the blocks (patch embedding, head): a constant;
- per block, with n tokens in, q of them queries (n, or the prefix in a ``prefix_only_last`` last
  block) and m after the block's stage: ``norm1 * n + keys * n + queries * q + pairs * q * n + mlp * m``;
- per block with a stage: what attention computes for its score and needs (class attention, head
  importance, the full attention matrix: as :class:`~paretoken.compress.patch.PlanAttention` does),
  the predictor of a ``score: predictor`` stage on the n - prefix patch tokens, and what the op's
  reduce function computes (its declared :data:`~paretoken.compress.ops.Flops`);
- the final norm on the tokens left.

The coefficients come from fvcore traces of one block's parts at one and two tokens (the parts are
linear in the tokens and attention bilinear in queries and keys), and the calibration checks itself:
each block's count at the full token count must equal that block's share of a trace of the
uncompressed model, or the model is refused with a one-line error that names ``--flops trace``.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass

import torch
from timm.data import resolve_data_config
from torch import nn

from paretoken.compress import Plan, apply
from paretoken.compress.ops import SCORE_NEEDS, TokenDims, get_op
from paretoken.errors import ParetokenError
from paretoken.evaluators.flops import fvcore_analysis, inference

__all__ = ["BlockCost", "FlopModel", "countable", "counted_gflops", "flop_model", "plan_counts"]


def countable(plan: Plan) -> bool:
    """Whether every op of ``plan`` declares its :attr:`~paretoken.compress.ops.OpSpec.flops`."""
    return all(get_op(stage.op).flops is not None for stage in plan.stages)


@dataclass(frozen=True)
class BlockCost:
    """Multiply-adds of one block's parts: ``norm1`` per token in, ``keys`` per key token, ``queries``
    per query token, ``pairs`` per query-key pair, ``mlp`` per token after the stage (norm2 and MLP)."""

    norm1: int
    keys: int
    queries: int
    pairs: int
    mlp: int

    def at(self, n: torch.Tensor, q: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """(B,) multiply-adds with n tokens in, q queries and m tokens after the stage (each (B,))."""
        return (self.norm1 + self.keys) * n + self.queries * q + self.pairs * q * n + self.mlp * m


@dataclass(frozen=True)
class FlopModel:
    """One model's FLOPs as a function of its token counts (see the module docstring).

    fixed: multiply-adds outside the blocks and the final norm; final_norm: per token left;
    tokens: tokens into the first block (prefix included); prefix: class (and distillation) tokens;
    dims: the widths the ops' own work depends on; blocks: one :class:`BlockCost` per block;
    predictor: multiply-adds per patch token of a DynamicViT predictor on this width.
    """

    fixed: int
    final_norm: int
    tokens: int
    prefix: int
    dims: TokenDims
    blocks: tuple[BlockCost, ...]
    predictor: int

    def multiply_adds(self, plan: Plan, counts: torch.Tensor) -> torch.Tensor:
        """(B,) multiply-adds of each image's forward under ``plan``, from ``counts`` (B, depth): the
        tokens left after each block, as :func:`~paretoken.compress.patch.token_counts` gives them."""
        counts = counts.long()
        depth = len(self.blocks)
        if counts.ndim != 2 or counts.shape[1] != depth:
            raise ValueError(f"counts must be (B, {depth}), got shape {tuple(counts.shape)}")
        stages = {s.layer: s for s in plan.stages_run(depth)}
        total = torch.full_like(counts[:, 0], self.fixed) + self.final_norm * counts[:, -1]
        n = torch.full_like(counts[:, 0], self.tokens)
        for i, cost in enumerate(self.blocks):
            m = counts[:, i]
            q = m if plan.prefix_only_last and i == depth - 1 else n
            total += cost.at(n, q, m)
            if i in stages:
                total += self._stage(stages[i], n, m)
            n = m
        return total

    def gflops(self, plan: Plan, counts: torch.Tensor) -> float:
        """GFLOPs per image, the mean over the images of ``counts`` (B, depth)."""
        return self.multiply_adds(plan, counts).double().mean().item() / 1e9

    def _stage(self, stage, n: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """(B,) what a stage adds to its block with n (B,) tokens in and m (B,) after: PlanAttention's
        by-products, the predictor, the op's own work."""
        op = get_op(stage.op)
        if op.flops is None:
            raise ParetokenError(f"op {stage.op!r} declares no flops; valid: --flops trace for plans with it")
        need = SCORE_NEEDS[stage.score] | op.needs
        attn_dim = self.dims.heads * self.dims.head_dim
        extra = n * 0
        if "full" in need:  # the attention matrix is computed once and read: its class row, the propagation
            extra = extra + n * n * self.dims.heads
        elif "cls" in need:  # a score from class attention (one a stage does not use is no work: fvcore's
            extra = extra + n * attn_dim  # trace drops it, as would any compiler)
        if "head" in need:
            extra = extra + n * self.dims.heads
        if stage.score == "predictor":
            extra = extra + (n - self.prefix) * self.predictor
        return extra + op.flops(n, m, self.dims, self.prefix, **stage.settings)


class _Call(nn.Module):
    """``module(x, **kwargs)`` as a module, for fvcore to trace."""

    def __init__(self, module: nn.Module, **kwargs) -> None:
        super().__init__()
        self.module, self.kwargs = module, kwargs

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.module(*args, **self.kwargs)


def _traced(module: nn.Module, *inputs: torch.Tensor) -> int:
    with inference(module):
        return int(fvcore_analysis(module, inputs).total())


def _block_cost(block: nn.Module, dim: int) -> BlockCost:
    """Calibrate one (patched) block's coefficients with fvcore at one and two tokens."""
    like = next(block.parameters())
    one, two = (torch.zeros(1, n, dim, dtype=like.dtype, device=like.device) for n in (1, 2))
    norm1 = _traced(_Call(block.norm1), one)
    mlp = _traced(_Call(nn.Sequential(block.norm2, block.mlp)), one)
    a11 = _traced(_Call(block.attn), one)  # keys + queries + pairs
    a22 = _traced(_Call(block.attn), two)  # 2 keys + 2 queries + 4 pairs
    a12 = _traced(_Call(block.attn, queries=1), two)  # 2 keys + 1 query + 2 pairs
    pairs = (a22 - 2 * a11) // 2
    keys = a12 - a11 - pairs
    return BlockCost(norm1=norm1, keys=keys, queries=a11 - keys - pairs, pairs=pairs, mlp=mlp)


def _predictor_cost(dim: int, like: torch.Tensor) -> int:
    """Multiply-adds per token of a DynamicViT predictor on ``dim``-wide tokens (linear in tokens)."""
    from paretoken.compress.learn import TokenPredictor

    predictor = TokenPredictor(dim).to(device=like.device, dtype=like.dtype)
    return _traced(predictor, torch.zeros(1, 1, dim, dtype=like.dtype, device=like.device),
                   torch.ones(1, 1, device=like.device))


def _structure(block: nn.Module) -> tuple:
    """What a block's cost depends on: its modules' types and its parameters' shapes."""
    return (tuple(type(m).__name__ for m in block.modules()),
            tuple((name, tuple(p.shape)) for name, p in block.named_parameters()))


_MODELS: "weakref.WeakKeyDictionary[nn.Module, FlopModel]" = weakref.WeakKeyDictionary()


def flop_model(model: nn.Module) -> FlopModel:
    """The :class:`FlopModel` of a timm ViT (calibrated once per model object, on a copy: ``model``
    and its applied plan are untouched). One-line error when the counts do not reproduce fvcore."""
    if model in _MODELS:
        return _MODELS[model]
    work = apply(copy.deepcopy(model), Plan())
    like = next(work.parameters())
    channels, *size = resolve_data_config(model=work)["input_size"]
    size = getattr(work.patch_embed, "img_size", None) or size  # the model's own, where built for another size
    image = torch.zeros(1, channels, *size, dtype=like.dtype, device=like.device)
    with inference(work):
        analysis = fvcore_analysis(work, image)
        total, by_module = int(analysis.total()), analysis.by_module()
    dim, prefix = work.embed_dim, work.num_prefix_tokens
    tokens = work.patch_embed.num_patches + prefix
    costs: dict[tuple, BlockCost] = {}
    blocks = []
    for i, block in enumerate(work.blocks):
        key = _structure(block)
        if key not in costs:
            costs[key] = _block_cost(block, dim)
        full = torch.tensor([tokens])
        counted = int(costs[key].at(full, full, full))
        if counted != by_module[f"blocks.{i}"]:
            raise ParetokenError(f"model: block {i} of {type(model).__name__} counts {counted} multiply-adds from "
                                 f"its token count but fvcore traces {by_module[f'blocks.{i}']}; valid: --flops trace")
        blocks.append(costs[key])
    final_norm = _traced(_Call(work.norm), torch.zeros(1, 1, dim, dtype=like.dtype, device=like.device))
    attn = work.blocks[0].attn
    result = FlopModel(fixed=total - sum(int(by_module[f"blocks.{i}"]) for i in range(len(blocks))) - final_norm * tokens,
                       final_norm=final_norm, tokens=tokens, prefix=prefix,
                       dims=TokenDims(dim=dim, heads=attn.num_heads, head_dim=attn.head_dim),
                       blocks=tuple(blocks), predictor=_predictor_cost(dim, like))
    _MODELS[model] = result
    return result


def counted_gflops(model: nn.Module, images: torch.Tensor, batch_size: int = 100) -> float:
    """GFLOPs per image of ``model`` (a timm ViT, with or without a plan applied) on ``images``
    (n, C, H, W), the mean over every image, counted from their token counts. A plan with an op that
    declares no flops is traced instead (fvcore, each image alone)."""
    from paretoken.compress import applied_plan
    from paretoken.evaluators.flops import count_flops

    plan = applied_plan(model)
    if plan is None:
        counts = torch.full((len(images), len(model.blocks)), flop_model(model).tokens)
        return flop_model(model).gflops(Plan(), counts)
    if not countable(plan):
        return count_flops(model, images, per_image=plan.per_image, max_images=len(images))
    return flop_model(model).gflops(plan, plan_counts(model, images, batch_size))


def plan_counts(model: nn.Module, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """(n, depth) tokens left after each block for each of ``images`` (n, C, H, W) under ``model``'s plan."""
    from paretoken.compress import token_counts

    counts = []
    with inference(model):
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
            counts.append(token_counts(model))
    return torch.cat(counts)
