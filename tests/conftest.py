"""Fixtures shared by the suite's tiers."""

from __future__ import annotations

import pytest
import torch

from greencore.demo import build_tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for the module: tiny models on a shared 2-core machine train faster without
    oversubscription, and stay deterministic."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The demo tokenizer, with its chat template."""
    return build_tokenizer()


@pytest.fixture(scope="module")
def plain_tokenizer():
    """The demo tokenizer without a chat template (chats are encoded as plain text)."""
    return build_tokenizer(chat_template=None)
