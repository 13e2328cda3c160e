"""What a job would cost before it runs."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CatalogDep, CurrentTenant, SessionDep, SettingsDep
from api.estimates import estimate
from api.queries import model_folder, owned_file
from api.schemas.estimates import EstimateCreate, EstimatePublic

router = APIRouter(prefix="/estimates", tags=["estimates"])  # mounted under /v1 by api.routes


@router.post("", response_model=EstimatePublic)
def create_estimate(
    body: EstimateCreate,
    catalog: CatalogDep,
    session: SessionDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
) -> EstimatePublic:
    """FLOPs, time, energy and carbon of full fine-tuning and of the chosen method and budget on this dataset,
    and ``rho_min``. A budget below ``rho_min`` answers 400 naming it, as job creation would."""
    train = owned_file(session, tenant.id, body.training_file, param="training_file")
    folder = model_folder(session, catalog, settings.artifacts_dir, tenant.id, body.model)
    return estimate(settings, folder, body.model, train, body.method_type, body.hp, body.seed)
