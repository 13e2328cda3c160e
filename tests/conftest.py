"""Fixtures shared by the suite's tiers."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for the module: tiny models on a shared 2-core machine train faster without
    oversubscription, and stay deterministic."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
