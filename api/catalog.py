"""The base models under GT_MODELS_DIR: one Hugging Face folder each, its folder name the model id.

Ids are looked up among the folder's entries, never joined into a path as given, so ``../x`` or ``a/b`` can
only be unknown. Facts about a model (parameters, tensors, tokenizer) are cached by the config's mtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from api.errors import InvalidRequest


@dataclass(frozen=True)
class ModelInfo:
    id: str
    architecture: str
    model_type: str
    parameters: int
    tensors: int
    is_encoder_decoder: bool
    tensor_names: tuple[
        str, ...
    ]  # in model order, a tied weight once (as epochs' selected_tensors name them)


class ModelCatalog:
    """The models of one folder."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir

    def ids(self) -> list[str]:
        """Model ids: sub-folders holding a config.json, sorted."""
        if not self.models_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.models_dir.iterdir()
            if not p.name.startswith(".") and (p / "config.json").is_file()
        )

    def path(self, model_id: str) -> Path:
        """The folder of ``model_id``; InvalidRequest (400) naming the available ones when unknown."""
        available = self.ids()
        if model_id not in available:
            names = ", ".join(available) or "none"
            raise InvalidRequest(
                f"model {model_id!r} not found: available models are {names} (see GET /v1/models)",
                param="model",
            )
        return self.models_dir / model_id

    def describe(self, model_id: str) -> ModelInfo:
        """Architecture, parameters and tensors of a model (built on the meta device, no weights read)."""
        return describe_folder(self.path(model_id))

    def tokenizer(self, model_id: str) -> Any:
        """The model's tokenizer (cached)."""
        path = self.path(model_id)
        return tokenizer_at(str(path), _mtime(path))


def describe_folder(path: Path) -> ModelInfo:
    """What :meth:`ModelCatalog.describe` says, of any Hugging Face folder (a fine-tuned model's checkpoint);
    its id is the folder's name (callers name fine-tuned models themselves)."""
    return _describe(str(path), _mtime(path))


def _mtime(path: Path) -> int:
    return (path / "config.json").stat().st_mtime_ns


@lru_cache(maxsize=64)
def _describe(path: str, _mtime_ns: int) -> ModelInfo:
    from greencore.models import load_config, meta_model

    config = load_config(path)
    model = meta_model(path)  # under greencore.models.TRACE_LOCK
    named = list(model.named_parameters())  # a tied weight once
    params = [p for _, p in named]
    return ModelInfo(
        id=Path(path).name,
        architecture=(config.architectures or [type(model).__name__])[0],
        model_type=config.model_type,
        parameters=sum(p.numel() for p in params),
        tensors=len(params),
        is_encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
        tensor_names=tuple(name for name, _ in named),
    )


@lru_cache(maxsize=16)
def tokenizer_at(path: str, _mtime_ns: int) -> Any:
    """The tokenizer of a model folder (cached by the config's mtime)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)
