"""Loading base models from Hugging Face folders (no hub downloads), on real weights or on the meta device."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig

# Building a model on the meta device and tracing one (profile_model) swap parameters and enter dispatch
# modes, which threads must not do at once: meta_model and greencore.estimate take this lock.
TRACE_LOCK = threading.RLock()


class ModelFolderError(ValueError):
    """The folder is not a loadable Hugging Face model."""


def load_config(model_dir: str | Path) -> PretrainedConfig:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ModelFolderError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelFolderError(f"cannot read the config in {path}: {exc}") from exc


def model_class(config: PretrainedConfig) -> type:
    """The model class the folder declares (``architectures`` in its config), else the generic LM head."""
    for name in config.architectures or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


def meta_model(model_dir: str | Path) -> torch.nn.Module:
    """The folder's model on the meta device: shapes only, instant, for profiling."""
    config = load_config(model_dir)
    cls = model_class(config)
    with TRACE_LOCK, torch.device("meta"):
        return cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
