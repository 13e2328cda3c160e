"""Base models available for fine-tuning."""

from __future__ import annotations

import logging

from fastapi import APIRouter

from api.deps import CatalogDep, CurrentTenant
from api.schemas.models import ModelPublic, ModelsPublic

router = APIRouter(
    prefix="/models", tags=["models"]
)  # mounted under /v1 by api.routes (auth, id checks, errors)
log = logging.getLogger(__name__)


@router.get("", response_model=ModelsPublic)
def list_models(catalog: CatalogDep, _tenant: CurrentTenant) -> ModelsPublic:
    """Every folder under GT_MODELS_DIR that holds a loadable Hugging Face config."""
    from greencore.models import ModelFolderError

    data = []
    for model_id in catalog.ids():
        try:
            info = catalog.describe(model_id)
        except (ModelFolderError, ValueError, OSError) as exc:
            log.warning("model folder %s is not usable: %s", model_id, exc)
            continue
        data.append(ModelPublic(**info.__dict__))
    return ModelsPublic(data=data)
