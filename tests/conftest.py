"""Fixtures shared by the suite's tiers."""

from __future__ import annotations

import pytest
import torch

from greencore.demo import build_tokenizer
from tests.model_folders import dataset, model_folder, write_jsonl


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


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny model folders (random weights, float32) of four architectures, by kind."""
    root = tmp_path_factory.mktemp("models")
    return {kind: model_folder(kind, root / kind) for kind in ("llama", "gpt2", "bert", "t5")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Training (64 examples, some long) and validation files of each dataset format, by format."""
    root = tmp_path_factory.mktemp("data")
    files = {}
    for fmt in ("messages", "prompt_completion", "text_label"):
        files[fmt] = write_jsonl(root / f"{fmt}.jsonl", dataset(fmt, 64, seed=0, long_every=16))
        files[fmt + "_valid"] = write_jsonl(root / f"{fmt}_valid.jsonl", dataset(fmt, 12, seed=1))
    return files
