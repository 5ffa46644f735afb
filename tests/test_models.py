"""paretoken.evaluators.models: the default ViT, checkpoint files and the local HF cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import load_file, save_file
from timm.data import resolve_data_config

from paretoken.errors import ParetokenError
from paretoken.evaluators.models import (
    DEFAULT_MODEL,
    DEFAULT_WEIGHTS,
    build_default_architecture,
    create_model,
)
from reference import DEFAULT_GFLOPS

TINY = "deit_tiny_patch16_224"


def _tiny_state(num_classes: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = timm.create_model(TINY, pretrained=False, num_classes=num_classes)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _assert_same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_default_architecture_and_data_config() -> None:
    model = build_default_architecture()
    assert len(model.blocks) == 12
    assert model.patch_embed.num_patches == 196
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    cfg = resolve_data_config(model=model)
    assert cfg["input_size"] == (1, 28, 28)
    assert cfg["mean"] == (0.2860,) and cfg["std"] == (0.3530,)
    assert model.pretrained_cfg["architecture"] == "paretoken_default"


def test_default_model_loads_packaged_weights() -> None:
    assert DEFAULT_WEIGHTS.is_file(), f"train it: python -m paretoken.evaluators.train_default ({DEFAULT_WEIGHTS})"
    assert DEFAULT_WEIGHTS.stat().st_size <= 5 * 2**20
    model = create_model(DEFAULT_MODEL)
    assert not model.training
    _assert_same(model, load_file(str(DEFAULT_WEIGHTS)))


def test_default_model_with_own_checkpoint(tmp_path) -> None:
    torch.manual_seed(1)
    state = build_default_architecture().state_dict()
    save_file(state, str(tmp_path / "mine.safetensors"))
    _assert_same(create_model("default", checkpoint=str(tmp_path / "mine.safetensors")), state)


def test_safetensors_checkpoint_infers_num_classes(tmp_path) -> None:
    state = _tiny_state(num_classes=7)
    path = tmp_path / "tiny.safetensors"
    save_file(state, str(path))
    model = create_model(TINY, checkpoint=str(path))
    assert not model.training
    assert model.num_classes == 7
    _assert_same(model, state)


def test_pth_plain_checkpoint(tmp_path) -> None:
    state = _tiny_state(seed=2)
    path = tmp_path / "tiny.pth"
    torch.save(state, path)
    _assert_same(create_model(TINY, checkpoint=str(path)), state)


def test_pth_wrapped_checkpoint_with_module_prefix(tmp_path) -> None:
    state = _tiny_state(seed=3)
    path = tmp_path / "tiny.pt"
    torch.save({"epoch": 9, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    _assert_same(create_model(TINY, checkpoint=str(path)), state)


def test_training_script_checkpoints(tmp_path) -> None:
    """What timm's train.py (CheckpointSaver) and DeiT's main.py save: weights beside the optimizer
    state and an argparse.Namespace of arguments, EMA weights preferred as timm does; a
    torch.compile prefix stripped."""
    import argparse

    state, ema = _tiny_state(seed=4), _tiny_state(seed=5)
    args = argparse.Namespace(model=TINY, lr=5e-4)
    timm_file = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "arch": TINY, "state_dict": state, "state_dict_ema": ema, "args": args}, timm_file)
    _assert_same(create_model(TINY, checkpoint=str(timm_file)), ema)
    deit_file = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "model_ema": ema, "optimizer": {"state": {}}, "epoch": 3, "args": args}, deit_file)
    _assert_same(create_model(TINY, checkpoint=str(deit_file)), ema)
    compiled = tmp_path / "compiled.pth"
    torch.save({f"_orig_mod.{k}": v for k, v in state.items()}, compiled)
    _assert_same(create_model(TINY, checkpoint=str(compiled)), state)


def test_official_deit3_checkpoint_layer_scale_names(tmp_path) -> None:
    """Official DeiT-III files name LayerScale blocks.N.gamma_1 / gamma_2 (timm: blocks.N.ls1.gamma)."""
    name = "deit3_small_patch16_224"
    torch.manual_seed(0)
    state = timm.create_model(name, pretrained=False, num_classes=10, depth=2).state_dict()
    official = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in state.items()}
    assert "blocks.0.gamma_1" in official
    path = tmp_path / "deit_3_small_224_1k.pth"
    torch.save({"model": official}, path)
    model = timm.create_model(name, pretrained=False, num_classes=10, depth=2)
    from paretoken.evaluators.models import _converted, _load_into, read_state_dict

    _assert_same(_load_into(model, _converted(model, read_state_dict(path), path), path), state)


def test_checkpoint_for_another_image_size_is_refused_not_resampled(tmp_path):
    """timm's filter would resample a 384-pixel position embedding to 224 without a word."""
    torch.manual_seed(0)
    path = tmp_path / "t384.pth"
    torch.save(timm.create_model("vit_tiny_patch16_384", pretrained=False, depth=1).state_dict(), path)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    from paretoken.evaluators.models import _converted, read_state_dict

    with pytest.raises(ParetokenError) as excinfo:
        _converted(model, read_state_dict(path), path)
    assert "key 'pos_embed' has shape (1, 577, 192), expected (1, 197, 192)" in _one_line_error(excinfo)


def test_hf_snapshot_directory_and_suffixless_blob(tmp_path) -> None:
    """A Hugging Face snapshot directory, and the suffix-less blob its model.safetensors links to."""
    state = _tiny_state(seed=6)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    save_file(state, str(snapshot / "model.safetensors"))
    _assert_same(create_model(TINY, checkpoint=str(snapshot)), state)
    blob = tmp_path / "2e06c1f0"
    (snapshot / "model.safetensors").rename(blob)
    _assert_same(create_model(TINY, checkpoint=str(blob)), state)
    with pytest.raises(ParetokenError) as excinfo:
        create_model(TINY, checkpoint=str(snapshot))
    assert "is a directory without model.safetensors or pytorch_model.bin" in _one_line_error(excinfo)


def test_wrong_shape_names_key_and_shapes(tmp_path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file(_tiny_state(), str(path))
    with pytest.raises(ParetokenError) as excinfo:
        create_model("default", checkpoint=str(path))
    message = _one_line_error(excinfo)
    assert str(path) in message and "'cls_token'" in message
    assert "(1, 1, 192)" in message and "(1, 1, 64)" in message


def test_missing_key_is_named(tmp_path) -> None:
    state = build_default_architecture().state_dict()
    del state["blocks.5.mlp.fc1.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ParetokenError) as excinfo:
        create_model("default", checkpoint=str(path))
    message = _one_line_error(excinfo)
    assert str(path) in message and "'blocks.5.mlp.fc1.weight'" in message and "(256, 64)" in message


def test_missing_and_unreadable_checkpoint(tmp_path) -> None:
    with pytest.raises(ParetokenError) as excinfo:
        create_model(TINY, checkpoint=str(tmp_path / "nope.safetensors"))
    assert str(tmp_path / "nope.safetensors") in _one_line_error(excinfo)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint\n" * 10)
    with pytest.raises(ParetokenError) as excinfo:
        create_model(TINY, checkpoint=str(garbage))
    assert str(garbage) in _one_line_error(excinfo)


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(ParetokenError) as excinfo:
        create_model("deit_tiny_patch16_244")
    message = _one_line_error(excinfo)
    assert "'deit_tiny_patch16_244'" in message and "deit_tiny_patch16_224" in message


def _use_hf_cache(monkeypatch: pytest.MonkeyPatch, cache) -> None:
    """Point huggingface_hub at `cache` the way a user would (HF_HUB_CACHE), for this test only.

    huggingface_hub reads the variables once at import, so the module constants are set too.
    """
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", hf_constants.HF_HUB_OFFLINE)


def test_pretrained_from_local_hf_cache(tmp_path, monkeypatch) -> None:
    hub_id = timm.models.get_pretrained_cfg(TINY).hf_hub_id  # e.g. timm/deit_tiny_patch16_224.fb_in1k
    owner, name = hub_id.split("/")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / f"models--{owner}--{name}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    state = _tiny_state(seed=4)
    save_file(state, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text('{"architecture": "%s", "num_classes": 1000}' % TINY)
    _use_hf_cache(monkeypatch, tmp_path / "hub")

    model = create_model(TINY, pretrained=True)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    _assert_same(model, state)


def test_pretrained_missing_from_hf_cache(tmp_path, monkeypatch) -> None:
    _use_hf_cache(monkeypatch, tmp_path / "empty")
    with pytest.raises(ParetokenError) as excinfo:
        create_model(TINY, pretrained=True)
    message = _one_line_error(excinfo)
    assert "local Hugging Face cache" in message and str(tmp_path / "empty") in message and "--checkpoint" in message


def test_training_script_writes_weights_and_card_that_load(tmp_path):
    out = tmp_path / "tiny.safetensors"
    proc = subprocess.run([sys.executable, "-m", "paretoken.evaluators.train_default", "--epochs", "1",
                           "--train-images", "256", "--batch-size", "64", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["epochs_completed"] == 1 and len(card["history"]) == 1
    assert 0.0 <= card["test_top1"] <= 100.0 and card["gflops"] == round(DEFAULT_GFLOPS, 4)  # the card rounds to 4 places
    model = create_model("default", checkpoint=out)
    assert sum(p.numel() for p in model.parameters()) == card["params"]
