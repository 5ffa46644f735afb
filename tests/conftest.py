"""Shared pytest set-up: GPU tests are skipped where no CUDA device is present."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (figures on GPU go into bench/results)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
