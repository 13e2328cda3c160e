"""Tiny configs of the architectures the project must handle, built offline from configs."""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)

VOCAB = 96
COMMON = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

# name -> (model_type, auto class, config overrides)
TINY: dict[str, tuple[str, type, dict]] = {
    "gpt2": ("gpt2", AutoModelForCausalLM, {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 128}),
    "opt": (
        "opt",
        AutoModelForCausalLM,
        {
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "num_attention_heads": 4,
            "ffn_dim": 64,
            "word_embed_proj_dim": 32,
            "max_position_embeddings": 128,
        },
    ),
    "bloom": ("bloom", AutoModelForCausalLM, {"n_layer": 2, "hidden_size": 32, "n_head": 4}),
    "llama": (
        "llama",
        AutoModelForCausalLM,
        {
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
        },
    ),
    "mistral": (
        "mistral",
        AutoModelForCausalLM,
        {
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            "head_dim": 8,
        },
    ),
    "qwen2": (
        "qwen2",
        AutoModelForCausalLM,
        {
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
        },
    ),
    "gpt_neox": (
        "gpt_neox",
        AutoModelForCausalLM,
        {
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "use_parallel_residual": True,
        },
    ),
    "phi": (
        "phi",
        AutoModelForCausalLM,
        {
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
        },
    ),
    "t5": (
        "t5",
        AutoModelForSeq2SeqLM,
        {
            "num_layers": 2,
            "num_decoder_layers": 2,
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 48,
            "num_heads": 4,
            "decoder_start_token_id": 0,
        },
    ),
    "bert": (
        "bert",
        AutoModelForSequenceClassification,
        {
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "num_labels": 3,
        },
    ),
}


def tiny_config(name: str, **overrides):
    model_type, _, kwargs = TINY[name]
    return AutoConfig.for_model(model_type, **{**COMMON, **kwargs, **overrides})


def tiny_model(name: str, seed: int = 0, device: str | None = None, **overrides) -> torch.nn.Module:
    """A randomly initialised tiny model of architecture ``name`` (on CPU, or meta with device='meta')."""
    _, auto, _ = TINY[name]
    config = tiny_config(name, **overrides)
    torch.manual_seed(seed)
    if device == "meta":
        with torch.device("meta"):
            return auto.from_config(config)
    return auto.from_config(config)


def batch_for(model: torch.nn.Module, batch_size: int, seq_len: int, seed: int = 0) -> dict:
    """A real training batch (labels included) for ``model``: causal LM, seq2seq or classification."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.is_encoder_decoder:
        batch["labels"] = torch.randint(3, VOCAB, (batch_size, seq_len), generator=g)
    elif model.config.architectures and "SequenceClassification" in model.config.architectures[0]:
        batch["labels"] = torch.randint(0, model.config.num_labels, (batch_size,), generator=g)
    elif type(model).__name__.endswith("ForSequenceClassification"):
        batch["labels"] = torch.randint(0, model.config.num_labels, (batch_size,), generator=g)
    else:
        batch["labels"] = ids
    return batch
