"""Base models available for fine-tuning."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ModelPublic(BaseModel):
    """OpenAI's ``model`` (id, object, created, owned_by), and what the model is."""

    id: str = Field(description="a folder name under GT_MODELS_DIR, or a fine-tuned model ft:...")
    object: Literal["model"] = "model"
    created: int = Field(description="seconds since 1970: when the model's folder was written")
    owned_by: str = Field(description="system for base models, the tenant for fine-tuned ones")
    architecture: str = Field(description="the model class its config declares, e.g. LlamaForCausalLM")
    model_type: str
    parameters: int = Field(description="number of parameters (a tied weight once)")
    tensors: int = Field(description="number of parameter tensors (a tied weight once)")
    is_encoder_decoder: bool
    tensor_names: list[str] = Field(
        description=(
            "trainable tensors in model order (a tied weight once), as epochs' selected_tensors name them"
        )
    )


class ModelsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]
