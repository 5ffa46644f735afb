"""FLOPs evaluator: fvcore counts with the scaled_dot_product_attention handle."""
from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis
from timm.models.vision_transformer import VisionTransformer

from paretoken.evaluators.flops import count_flops, flops_by_module, sdpa_flop_jit
import paretoken
from reference import DEIT_S_GFLOPS, prefix_only_last_saving


def _small_vit() -> VisionTransformer:
    """A 2-block ViT on 32x32 images: 16 patch tokens + class token, fast to trace."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def _images(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _unfused(model: torch.nn.Module) -> torch.nn.Module:
    """Switch every timm attention module to its explicit q @ k^T / attn @ v path."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


def test_deit_small_is_4_608_gflops():
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    gflops = count_flops(model, _images(1, 224))
    assert gflops == pytest.approx(DEIT_S_GFLOPS, rel=1e-12) and round(gflops, 3) == 4.608


@pytest.mark.parametrize("fused", [True, False])
def test_prefix_only_last_block_saves_what_a_hand_count_says(fused):
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    model = model if fused else _unfused(model)
    paretoken.apply(model, paretoken.Plan(prefix_only_last=True))
    gflops = count_flops(model, _images(1, 224))
    expected = DEIT_S_GFLOPS - prefix_only_last_saving(tokens=197, prefix=1, dim=384, mlp_hidden=1536)
    assert gflops == pytest.approx(expected, rel=1e-12) and round(gflops, 3) == 4.289


def test_sdpa_handle_equals_explicit_attention():
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    images = _images(1, 224)
    assert all(block.attn.fused_attn for block in model.blocks)
    fused = count_flops(model, images)
    explicit = count_flops(_unfused(model), images)
    assert fused == pytest.approx(explicit, rel=1e-6)


class _MaskedSDPA(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_sdpa_handle_with_mask_and_distinct_sizes():
    b, h, n_q, n_k, d, d_v = 2, 3, 5, 7, 8, 4
    q, k, v = torch.randn(b, h, n_q, d), torch.randn(b, h, n_k, d), torch.randn(b, h, n_k, d_v)
    mask = torch.zeros(b, 1, n_q, n_k)
    analysis = FlopCountAnalysis(_MaskedSDPA(), (q, k, v, mask)).set_op_handle(
        "aten::scaled_dot_product_attention", sdpa_flop_jit)
    assert analysis.total() == b * h * (n_q * n_k * d + n_q * n_k * d_v)


def test_per_image_equals_batch_for_plain_model():
    model, images = _small_vit(), _images(3, 32)
    assert count_flops(model, images, per_image=True) == pytest.approx(count_flops(model, images), rel=1e-12)
    assert count_flops(model, images, per_image=True, max_images=1) == pytest.approx(
        count_flops(model, images), rel=1e-12)


def test_per_image_figure_constant_as_batch_grows():
    model = _small_vit()
    one = count_flops(model, _images(1, 32))
    assert one > 0
    for batch in (2, 5):
        assert count_flops(model, _images(batch, 32)) == pytest.approx(one, rel=1e-12)


def test_by_module_sums_to_total_and_names_blocks():
    model, images = _small_vit(), _images(2, 32)
    parts = flops_by_module(model, images)
    assert [name for name in parts if name.startswith("blocks.")] == ["blocks.0", "blocks.1"]
    assert parts["blocks.0"] == pytest.approx(parts["blocks.1"], rel=1e-12)
    assert sum(parts.values()) == pytest.approx(count_flops(model, images), rel=1e-9)


def test_quiet_and_restores_training_mode(caplog):
    model = _small_vit().train()
    with caplog.at_level(logging.WARNING):
        count_flops(model, _images(1, 32))
    assert not [r for r in caplog.records if r.name.startswith("fvcore")]
    assert model.training
