"""Shared pytest set-up: GPU tests are skipped where no CUDA device is present; a random default checkpoint."""
from __future__ import annotations

import pytest
import safetensors.torch
import torch

from paretoken.evaluators.models import build_default_architecture


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> str:
    """Path of a randomly initialised default-model checkpoint (.safetensors); modules may override it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "weights.safetensors"
    safetensors.torch.save_file(build_default_architecture().state_dict(), str(path))
    return str(path)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (figures on GPU go into bench/results)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
