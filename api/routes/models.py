"""Base models available for fine-tuning."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter
from sqlalchemy import select

from api.catalog import describe_folder
from api.deps import CatalogDep, CurrentTenant, SessionDep, SettingsDep
from api.errors import InvalidRequest, NotFound
from api.queries import model_folder
from api.schemas.jobs import fine_tuned_model_id
from api.schemas.models import ModelPublic, ModelsPublic
from api.states import JobState
from api.tables import Checkpoint, Job

router = APIRouter(
    prefix="/models", tags=["models"]
)  # mounted under /v1 by api.routes (auth, id checks, errors)
log = logging.getLogger(__name__)


@router.get("", response_model=ModelsPublic)
def list_models(
    catalog: CatalogDep, session: SessionDep, settings: SettingsDep, tenant: CurrentTenant
) -> ModelsPublic:
    """Every folder under GT_MODELS_DIR that holds a loadable Hugging Face config, then the tenant's
    fine-tuned models (its succeeded jobs' ``fine_tuned_model``), newest first: each can be a job's
    ``model``."""
    from greencore.models import ModelFolderError

    data = []
    for model_id in catalog.ids():
        try:
            data.append(_public(model_id, catalog.path(model_id), "system"))
        except (ModelFolderError, ValueError, OSError) as exc:
            log.warning("model folder %s is not usable: %s", model_id, exc)
    finals = session.execute(
        select(Job, Checkpoint.path)
        .join(Checkpoint, (Checkpoint.job_id == Job.id) & (Checkpoint.name == "final"))
        .where(Job.tenant_id == tenant.id, Job.status == str(JobState.succeeded))
        .order_by(Job.id.desc())
    )
    for job, path in finals:
        try:
            data.append(_public(fine_tuned_model_id(job), settings.artifacts_dir / path, tenant.name))
        except (ModelFolderError, ValueError, OSError) as exc:
            log.warning("fine-tuned model of job %s is not usable: %s", job.id, exc)
    return ModelsPublic(data=data)


@router.get("/{model}", response_model=ModelPublic)
def get_model(
    model: str, catalog: CatalogDep, session: SessionDep, settings: SettingsDep, tenant: CurrentTenant
) -> ModelPublic:
    """One model: a base model, one of the tenant's fine-tuned models, or a checkpoint's
    ``fine_tuned_model_checkpoint``; 404 for any other id (another tenant's too)."""
    try:
        folder = model_folder(session, catalog, settings.artifacts_dir, tenant.id, model)
    except InvalidRequest as exc:
        raise NotFound(f"model {model[:200]!r} not found") from exc
    return _public(model, folder, tenant.name if model.startswith("ft:") else "system")


def _public(model_id: str, folder: Path, owned_by: str) -> ModelPublic:
    """The model in ``folder`` under the id ``model_id``; ``created``: when its config was written."""
    info = describe_folder(folder)
    created = int((folder / "config.json").stat().st_mtime)
    return ModelPublic(**{**info.__dict__, "id": model_id, "created": created, "owned_by": owned_by})
