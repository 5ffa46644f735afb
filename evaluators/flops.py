"""FLOPs per image, measured with fvcore.

Convention (fvcore's): one multiply-add counts as one FLOP, and ops with no
multiply-add (softmax, gather, topk, argsort, scatter_reduce, elementwise
arithmetic, ...) count zero. Uncompressed DeiT-S at 224 pixels is 4.608 GFLOPs.

fvcore has no handle for ``aten::scaled_dot_product_attention`` (timm's fused
attention path); :func:`sdpa_flop_jit` counts its two matmuls exactly as the
explicit ``q @ k.transpose(-2, -1)`` and ``attn @ v`` path is counted.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

with warnings.catch_warnings():  # fvcore's import calls torch.jit.script, which torch >= 2.10 deprecates
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

__all__ = ["count_flops", "flops_by_module", "sdpa_flop_jit"]

_GIGA = 1e9


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``.

    Inputs are the traced ``query`` (..., Nq, d), ``key`` (..., Nk, d),
    ``value`` (..., Nk, dv), then optional ``attn_mask``, ``dropout_p``,
    ``is_causal``, ``scale`` (and ``enable_gqa``), which add no matmul FLOPs.
    Leading dims are those of the query (B, H for multi-head attention).

    Returns the multiply-adds of q @ k^T and attn @ v:
    ``B * H * (Nq * Nk * d + Nq * Nk * dv)``.
    """
    q_shape, k_shape, v_shape = (get_shape(value) for value in inputs[:3])
    *lead, n_q, d = q_shape
    n_k, d_v = k_shape[-2], v_shape[-1]
    return math.prod(lead) * n_q * n_k * (d + d_v)


def fvcore_analysis(model: torch.nn.Module, images: torch.Tensor) -> FlopCountAnalysis:
    """fvcore analysis of one forward on ``images`` (B, C, H, W), warnings silenced."""
    return (
        FlopCountAnalysis(model, images)
        .set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
        .unsupported_ops_warnings(False)
        .uncalled_modules_warnings(False)
        .tracer_warnings("none")
    )


def _units(model: torch.nn.Module) -> list[str]:
    """Names of the top-level children, with ModuleList/Sequential ones
    (``blocks``) expanded into their items (``blocks.0``, ``blocks.1``, ...)."""
    names = []
    for name, child in model.named_children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            names.extend(f"{name}.{sub}" for sub, _ in child.named_children())
        else:
            names.append(name)
    return names


def _per_image(model: torch.nn.Module, images: torch.Tensor, per_image: bool,
               max_images: int) -> list[tuple[FlopCountAnalysis, int]]:
    """Analyses to average, each with the number of images it traced.

    ``per_image=False``: one analysis of the whole batch. ``per_image=True``:
    one analysis per image (batch 1) for the first ``max_images`` images.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (B, C, H, W) batch, got shape {tuple(images.shape)}")
    if per_image:
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        return [(fvcore_analysis(model, image[None]), 1) for image in images[:max_images]]
    return [(fvcore_analysis(model, images), images.shape[0])]


@contextmanager
def inference(model: torch.nn.Module) -> Iterator[None]:
    """``torch.no_grad()`` with ``model.eval()``; restores the training mode on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def count_flops(model: torch.nn.Module, images: torch.Tensor, per_image: bool = False,
                max_images: int = 32) -> float:
    """GFLOPs per image (1e9 multiply-adds) of one forward of ``model``.

    ``images``: (B, C, H, W) on the model's device. With ``per_image=False``
    the whole batch is traced once and the count divided by B. With
    ``per_image=True`` (plans whose token count differs per image) each of the
    first ``max_images`` images is traced alone (batch 1) and the mean is
    returned, so padding used for batching is never counted as work.
    """
    with inference(model):
        runs = _per_image(model, images, per_image, max_images)
        return sum(a.total() / n for a, n in runs) / len(runs) / _GIGA


def flops_by_module(model: torch.nn.Module, images: torch.Tensor, per_image: bool = False,
                    max_images: int = 32) -> dict[str, float]:
    """GFLOPs per image for each top-level unit of ``model``, in definition order.

    Units are the model's direct children, with ``ModuleList``/``Sequential``
    children expanded (timm ViT: ``patch_embed``, ``blocks.0`` ... ``blocks.11``,
    ``norm``, ``head``, ...). Work done directly in the model's own forward,
    outside any child, is not attributed to a unit. ``images``, ``per_image``
    and ``max_images`` are as in :func:`count_flops`.
    """
    names = _units(model)
    totals = dict.fromkeys(names, 0.0)
    with inference(model):
        runs = _per_image(model, images, per_image, max_images)
        for analysis, n in runs:
            counts = analysis.by_module()
            for name in names:
                totals[name] += counts[name] / n
    return {name: total / len(runs) / _GIGA for name, total in totals.items()}
