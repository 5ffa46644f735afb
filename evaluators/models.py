"""Models: the embedded default Fashion-MNIST ViT, or any timm model with local weights.

Weights only ever come from a local file (safetensors or torch .pth/.pt) or the
local Hugging Face cache; the network is never used.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from pathlib import Path

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer

from paretoken.errors import ParetokenError
from paretoken.evaluators.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD

DEFAULT_MODEL = "default"
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "default_fmnist.safetensors"
_SNAPSHOT_FILES = ("model.safetensors", "pytorch_model.bin")
_PREDICTOR_KEY = re.compile(r"blocks\.\d+\.token_predictor\.")


class ConvStemPatchEmbed(PatchEmbed):
    """timm's PatchEmbed with a small convolutional stem as its projection: a 3x3 conv to
    ``stem_channels`` channels, GELU, then a 3x3 stride-2 conv to ``embed_dim`` (28x28 in, a
    14x14 token grid out, each token seeing 7x7 pixels). Early convolutions make a ViT learn
    much faster from few images (Xiao et al., 2021); the transformer blocks are unchanged.
    """

    def __init__(self, *args, stem_channels: int = 32, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        in_chans, embed_dim = self.proj.in_channels, self.proj.out_channels
        self.proj = torch.nn.Sequential(
            torch.nn.Conv2d(in_chans, stem_channels, 3, stride=1, padding=1),
            torch.nn.GELU(),
            torch.nn.Conv2d(stem_channels, embed_dim, 3, stride=2, padding=1),
        )


def build_default_architecture() -> VisionTransformer:
    """The default ViT, randomly initialised: 28x28x1 input, a convolutional stem that
    halves the resolution (14x14 = 196 patch tokens + class token, as 2x2 patches would),
    width 64, 12 blocks, 2 heads of 32 channels, 10 classes.

    Its pretrained_cfg makes `timm.data.resolve_data_config(model=model)` give
    input_size (1, 28, 28) and the Fashion-MNIST mean/std.
    """
    model = VisionTransformer(
        img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=64,
        depth=12, num_heads=2, mlp_ratio=4.0, global_pool="token", embed_layer=ConvStemPatchEmbed,
    )
    model.pretrained_cfg = {
        "architecture": "paretoken_default",
        "input_size": (1, 28, 28),
        "mean": FASHION_MNIST_MEAN,
        "std": FASHION_MNIST_STD,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "num_classes": 10,
        "first_conv": "patch_embed.proj.0",
        "classifier": "head",
    }
    model.default_cfg = model.pretrained_cfg
    return model


def create_model(name: str = DEFAULT_MODEL, checkpoint: str | Path | None = None, pretrained: bool = False) -> torch.nn.Module:
    """Build model `name` with local weights, in eval mode.

    name: "default" (the embedded Fashion-MNIST ViT) or a timm model name.
    checkpoint: a .safetensors or .pth/.pt state dict (plain or timm-wrapped); for
        "default" it replaces the packaged weights.
    pretrained: with no checkpoint, load timm's pretrained weights from the local
        Hugging Face cache only (HF_HUB_OFFLINE=1).
    """
    if name == DEFAULT_MODEL:
        model = build_default_architecture()
        load_checkpoint(model, checkpoint if checkpoint is not None else DEFAULT_WEIGHTS)
        return model.eval()
    _check_timm_name(name)
    import timm

    if checkpoint is not None:
        state = read_state_dict(checkpoint)
        model = timm.create_model(name, pretrained=False, num_classes=_num_classes(state))
        _load_into(model, _converted(model, state, checkpoint), checkpoint)
        return model.eval()
    if pretrained:
        return _create_from_hf_cache(name).eval()
    return timm.create_model(name, pretrained=False).eval()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint into a flat {name: tensor} dict, as timm's ``load_state_dict`` does.

    ``path``: a safetensors file (recognised by its header, so a Hugging Face cache blob works),
    a torch file holding a state dict plain or wrapped as timm's and DeiT's training scripts save
    them (EMA weights first: 'state_dict_ema', 'model_ema', 'state_dict', 'model'; their
    ``argparse.Namespace`` of arguments is allowed), or a directory holding ``model.safetensors``
    or ``pytorch_model.bin`` (a Hugging Face snapshot). DDP and ``torch.compile`` prefixes are stripped.
    """
    from timm.models import clean_state_dict, load_state_dict

    path = _weights_file(Path(path))
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            state = clean_state_dict(load_file(str(path), device="cpu"))
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = load_state_dict(str(path), use_ema=True, device="cpu", weights_only=True)
    except Exception as exc:  # any reader failure is a bad file from the user's point of view
        reason = _first_sentence(str(exc)) or type(exc).__name__
        raise ParetokenError(
            f"checkpoint: cannot read {path} ({reason}); pass a .safetensors file or a torch state dict (.pth/.pt)"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ParetokenError(
            f"checkpoint: {path} holds no state dict of tensors (type {type(state).__name__}); "
            "save model.state_dict() or a dict with a 'state_dict' / 'model' entry"
        )
    return state


def _weights_file(path: Path) -> Path:
    """``path``, or the weights file inside a directory (a Hugging Face snapshot); one-line error if none."""
    if path.is_dir():
        for name in _SNAPSHOT_FILES:
            if (path / name).is_file():
                return path / name
        raise ParetokenError(f"checkpoint: {path} is a directory without {' or '.join(_SNAPSHOT_FILES)}; "
                             "pass --checkpoint FILE (.safetensors, .pth or .pt)")
    if not path.is_file():
        raise ParetokenError(f"checkpoint: {path} does not exist; pass --checkpoint FILE (.safetensors, .pth or .pt)")
    return path


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts as a safetensors file does: an 8-byte header length, then a JSON object."""
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{"


def _first_sentence(text: str, limit: int = 200) -> str:
    """``text`` on one line without terminal control sequences, cut at ``limit`` characters."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())
    return text[:limit]


def load_checkpoint(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load checkpoint file `path` into `model` strictly (all keys, same shapes)."""
    return _load_into(model, read_state_dict(path), path)


def _load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> torch.nn.Module:
    """Strict load with a one-line error naming the first offending key.

    Learned predictor weights (``blocks.<i>.token_predictor.*``, written by ``paretoken finetune``)
    are set aside on ``model._pt_predictor_state`` for :func:`paretoken.apply` to attach.
    """
    predictors = {k: state.pop(k) for k in list(state) if _PREDICTOR_KEY.match(k)}
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise ParetokenError(
                f"checkpoint: {path} lacks key {key!r} (expected shape {tuple(tensor.shape)}); "
                f"pass a checkpoint for {_arch(model)}"
            )
        if state[key].shape != tensor.shape:
            raise ParetokenError(
                f"checkpoint: {path} key {key!r} has shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)}; "
                f"pass a checkpoint for {_arch(model)}"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ParetokenError(
            f"checkpoint: {path} has unexpected key {extra[0]!r} ({len(extra)} extra keys); pass a checkpoint for {_arch(model)}"
        )
    model.load_state_dict(state, strict=True)
    model._pt_predictor_state = predictors
    return model


def _converted(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """``state`` (read from ``path``) in the key names of ``model``, by timm's own conversion for a
    VisionTransformer (DeiT-III ``gamma_1``/``gamma_2`` to LayerScale, OpenCLIP and DINOv2 layouts);
    other models' states as they are. A checkpoint for another image or patch size is refused:
    timm would resample its position or patch embedding without a word, making another model."""
    if not isinstance(model, VisionTransformer):
        return state
    from timm.models.vision_transformer import checkpoint_filter_fn

    converted = checkpoint_filter_fn(state, model, adapt_layer_scale=True)
    for key in ("pos_embed", "patch_embed.proj.weight"):  # timm would resample them: another model
        if key in state and key in converted and converted[key].shape != state[key].shape:
            raise ParetokenError(f"checkpoint: {path} key {key!r} has shape {tuple(state[key].shape)}, expected "
                                 f"{tuple(converted[key].shape)} (another image or patch size); "
                                 f"pass a checkpoint for {_arch(model)}")
    return converted


def _arch(model: torch.nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _check_timm_name(name: str) -> None:
    import timm

    if timm.is_model(name):  # also accepts a pretrained tag: deit_small_patch16_224.fb_in1k
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.5)
    suggestion = f"close matches: {', '.join(close)}" if close else "e.g. deit_small_patch16_224, vit_base_patch16_224"
    raise ParetokenError(
        f"model: {name!r} is not 'default' nor a timm model name ({suggestion}; list them with timm.list_models('*vit*'))"
    )


def _num_classes(state: dict[str, torch.Tensor]) -> int | None:
    """Classes of the checkpoint's head (None: keep the model's default)."""
    for key in ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight"):
        if key in state and state[key].ndim == 2:
            return int(state[key].shape[0])
    return None


def _create_from_hf_cache(name: str) -> torch.nn.Module:
    """timm pretrained weights from the local Hugging Face cache, never the network."""
    import timm
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True  # huggingface_hub reads the variable once, at import
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split()).split('. ')[0][:120]}"
        raise ParetokenError(
            f"model: pretrained weights for {name!r} are not in the local Hugging Face cache "
            f"{constants.HF_HUB_CACHE} ({reason}); pass --checkpoint FILE"
        ) from None
