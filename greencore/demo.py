"""A tiny model and tokenizer built offline, for the service's demo and for tests.

No hub download: the tokenizer is a byte-level BPE trained on a few sentences with the `tokenizers` library
and wrapped in a transformers fast tokenizer; the model is randomly initialised from a config.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

DEMO_SENTENCES = (
    "GreenTrainer fine-tunes a language model under a budget of floating point operations.",
    "It trains only the tensors that buy the most loss reduction for each FLOP they cost.",
    "The forward pass is always paid; the backward pass stops at the deepest trainable tensor.",
    "A user uploads a dataset of prompts and completions, picks a model and a share of the cost.",
    "Every epoch reports the tensors it trained, the FLOPs it spent, the time and the energy.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "What is the capital of France? Paris is the capital of France.",
    "Translate to French: good morning. Bonjour. Translate to French: thank you. Merci.",
    "system user assistant: answer briefly and politely, one sentence at a time.",
)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"

# A minimal chat template in Jinja, as Hugging Face tokenizers carry them: one "<|role|>" header per message.
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(
    corpus: Iterable[str] = DEMO_SENTENCES,
    vocab_size: int = 320,
    add_bos: bool = False,
    add_eos: bool = False,
    chat_template: str | None = DEMO_CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of at most ``vocab_size`` ids (256 bytes, 4 specials, merges) trained on
    ``corpus``.

    ``add_bos``/``add_eos``: whether encoding adds ``<s>``/``</s>`` around each text (as T5-like tokenizers
    add ``</s>``). Ids 0-3 are ``<pad>``, ``<s>``, ``</s>``, ``<unk>``.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    single = " ".join(([f"{BOS}:0"] if add_bos else []) + ["$A:0"] + ([f"{EOS}:0"] if add_eos else []))
    if add_bos or add_eos:
        special = [(t, tok.token_to_id(t)) for t, on in ((BOS, add_bos), (EOS, add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def make_demo_model(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny Llama-style causal LM (2 layers, hidden 64, ~0.1M parameters) and its tokenizer to
    ``folder``.

    Returns the folder, a Hugging Face model folder (config.json, model.safetensors, tokenizer files).
    """
    folder = Path(folder)
    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
