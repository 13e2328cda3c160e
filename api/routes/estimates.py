"""What a job would cost before it runs."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from sqlalchemy.orm import Session

from api.catalog import ModelCatalog
from api.config import Settings
from api.datasets import on_dataset_thread
from api.deps import CatalogDep, CurrentTenant, SessionDep, SettingsDep, run_and_close
from api.estimates import estimate
from api.queries import model_folder, owned_file
from api.schemas.estimates import EstimateCreate, EstimatePublic
from api.tables import File
from api.throughput import calibration_for
from greencore.throughput import Calibration

router = APIRouter(prefix="/estimates", tags=["estimates"])  # mounted under /v1 by api.routes


@router.post("", response_model=EstimatePublic)
async def create_estimate(
    body: EstimateCreate,
    catalog: CatalogDep,
    session: SessionDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
) -> EstimatePublic:
    """FLOPs, time, energy and carbon of full fine-tuning and of the chosen method and budget on this dataset,
    and ``rho_min``. A budget below ``rho_min`` answers 400 naming it, as job creation would."""
    train, folder, calibration = await run_and_close(
        session, _file_and_model, session, catalog, settings, tenant.id, body
    )
    # The estimate tokenizes the dataset (unless cached) with no database connection held, on one of the
    # threads uploads and job creation share (GT_DATASET_THREADS): one limit on the datasets held at once.
    return await on_dataset_thread(
        settings,
        estimate,
        settings,
        folder,
        body.model,
        train,
        body.method_type,
        body.hp,
        body.seed,
        calibration,
    )


def _file_and_model(
    session: Session, catalog: ModelCatalog, settings: Settings, tenant_id: str, body: EstimateCreate
) -> tuple[File, Path, Calibration]:
    """The tenant's training file, the folder of the model the estimate names, and the calibration of its
    time and energy (the device profile's latest epochs)."""
    train = owned_file(session, tenant_id, body.training_file, param="training_file")
    folder = model_folder(session, catalog, settings.artifacts_dir, tenant_id, body.model)
    return train, folder, calibration_for(session, settings.energy, body.model, body.method_type)
