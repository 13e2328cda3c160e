"""Hugging Face model folders and JSONL datasets for the training tests, all built offline in a temp
folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import AutoModel

from greencore.demo import DEMO_SENTENCES, build_tokenizer, make_demo_model
from tests.tiny_models import TINY, tiny_config

WORDS = sorted({w.strip(".,?:;").lower() for s in DEMO_SENTENCES for w in s.split()})


def model_folder(kind: str, folder: Path) -> Path:
    """Write a tiny model of ``kind`` with a byte-level BPE tokenizer into ``folder``.

    ``llama``: the demo causal LM (chat template). ``gpt2``: a causal LM whose tokenizer has no chat template
    (the plain one is used). ``t5``: an encoder-decoder. ``bert``: a bare encoder (BertModel, no head).
    """
    if kind == "llama":
        return make_demo_model(folder)
    tokenizer = build_tokenizer(add_eos=kind == "t5", chat_template=None)
    ids = {"vocab_size": len(tokenizer), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    config = tiny_config(kind, **ids)
    torch.manual_seed(0)
    model = AutoModel.from_config(config) if kind == "bert" else TINY[kind][1].from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dataset(fmt: str, n: int, seed: int = 0, long_every: int = 0) -> list[dict]:
    """``n`` rows of format ``fmt`` (messages, prompt_completion, text_label) with varied lengths.

    Completions follow from prompts (reversed word order), labels from the text (its first word's length mod
    3), so there is something to learn. Every ``long_every``-th row is long (to exercise truncation).
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = 3 + rng.randrange(8) + (40 if long_every and i % long_every == 0 else 0)
        prompt = _sentence(rng, words)
        completion = " ".join(reversed(prompt.split()[:6]))
        if fmt == "prompt_completion":
            rows.append({"prompt": prompt + " ->", "completion": " " + completion})
        elif fmt == "messages":
            chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            if i % 3 == 0:
                chat = [{"role": "system", "content": "reverse the words"}] + chat
            rows.append({"messages": chat})
        else:
            rows.append({"text": prompt, "label": ["short", "medium", "long"][len(prompt.split()[0]) % 3]})
    return rows
