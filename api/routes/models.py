"""Base models available for fine-tuning."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from sqlalchemy import select

from api.catalog import describe_folder
from api.deps import CatalogDep, CurrentTenant, SessionDep, SettingsDep
from api.schemas.common import unix_s
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
            info = catalog.describe(model_id)
        except (ModelFolderError, ValueError, OSError) as exc:
            log.warning("model folder %s is not usable: %s", model_id, exc)
            continue
        data.append(
            ModelPublic(**{**info.__dict__, "created": catalog.created(model_id), "owned_by": "system"})
        )
    finals = session.execute(
        select(Job, Checkpoint.path)
        .join(Checkpoint, (Checkpoint.job_id == Job.id) & (Checkpoint.name == "final"))
        .where(Job.tenant_id == tenant.id, Job.status == str(JobState.succeeded))
        .order_by(Job.id.desc())
    )
    for job, path in finals:
        try:
            info = describe_folder(settings.artifacts_dir / path)
        except (ModelFolderError, ValueError, OSError) as exc:
            log.warning("fine-tuned model of job %s is not usable: %s", job.id, exc)
            continue
        fields = {**info.__dict__, "id": fine_tuned_model_id(job), "owned_by": tenant.name}
        data.append(ModelPublic(**fields, created=unix_s(job.finished_at) or 0))
    return ModelsPublic(data=data)
