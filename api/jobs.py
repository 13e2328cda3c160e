"""Creating and cancelling jobs: the API's side of a job's life (the worker's side is worker/runner.py)."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from api.catalog import ModelCatalog
from api.config import Settings
from api.datasets import dataset_slot
from api.errors import InsufficientMemory, InvalidRequest
from api.estimates import estimate
from api.ids import new_id
from api.limits import check_active_jobs
from api.queries import model_folder, owned_file
from api.queue import JobQueue
from api.schemas.jobs import JobCreate
from api.states import JobState, add_event, admit, transition
from api.tables import Job, Tenant, utcnow
from api.throughput import calibration_for

log = logging.getLogger(__name__)


def create_job(
    session: Session,
    settings: Settings,
    catalog: ModelCatalog,
    queue: JobQueue,
    tenant: Tenant,
    body: JobCreate,
) -> Job:
    """Validate a job (ids, dataset, budget), commit it as ``queued``, then enqueue it.

    Raises InvalidRequest / DatasetInvalid / BudgetTooSmallError / InsufficientMemory (nothing is stored
    then).
    """
    train = owned_file(session, tenant.id, body.training_file, param="training_file")
    valid = None
    if body.validation_file is not None:
        valid = owned_file(session, tenant.id, body.validation_file, param="validation_file")
        if valid.format != train.format:
            raise InvalidRequest(
                f"validation_file is {valid.format} but training_file is {train.format}: use one format",
                param="validation_file",
            )
    hp = body.hp
    folder = model_folder(session, catalog, settings.artifacts_dir, tenant.id, body.model)
    with dataset_slot(settings):  # the dataset's tokenization, if not cached, waits its turn with uploads'
        calibration = calibration_for(session, settings.energy, body.model, body.method_type)
        cost = estimate(settings, folder, body.model, train, body.method_type, hp, body.seed, calibration)
    device_bytes, peak = settings.device_memory_bytes, cost.peak_memory_bytes.method
    if device_bytes is not None and peak > device_bytes:
        raise InsufficientMemory(
            f"the job needs {peak} bytes ({peak / 2**30:.2f} GiB) of memory at its peak "
            f"({cost.memory.basis}), and the device has {device_bytes} bytes "
            f"({device_bytes / 2**30:.2f} GiB, GT_DEVICE_MEMORY_BYTES): "
            "use a smaller batch_size or max_seq_len, a smaller rho, or lora",
            param="method",
            peak_memory_bytes=peak,
            device_memory_bytes=device_bytes,
        )
    # The job records the rate it trains at, and the multiplier of the automatic rate that gives it.
    hp.learning_rate = cost.learning_rate.learning_rate
    hp.learning_rate_multiplier = cost.learning_rate.multiplier
    job = Job(
        id=new_id("ftjob"),
        tenant_id=tenant.id,
        model=body.model,
        training_file=train.id,
        validation_file=valid.id if valid else None,
        method=body.method_type,
        hyperparameters=hp.model_dump(),
        rho=cost.rho,
        rho_min=cost.rho_min,
        estimate=cost.model_dump(mode="json"),
        seed=body.seed,
        suffix=body.suffix,
        user_metadata=body.metadata,
        status=JobState.validating,
        attempts=0,
        created_at=utcnow(),
        epochs_done=0,
        flops_total=0,
        flops_full=0,
        energy_j=0.0,
        gco2e=0.0,
        trained_tokens=0,
    )
    notes = []
    budget = None
    if hp.max_flops is not None:
        budget = f"max_flops={hp.max_flops:.4g} for the whole run"
    elif hp.max_energy_kwh is not None:
        budget = f"max_energy_kwh={hp.max_energy_kwh:.4g} for the whole run on {settings.device_name}"
    if budget is not None and cost.rho is not None:
        notes.append(
            (
                "info",
                f"{budget} is rho={cost.rho:.4f} of full fine-tuning",
                {"rho": cost.rho, "max_flops": hp.max_flops, "max_energy_kwh": hp.max_energy_kwh},
            )
        )
    check_active_jobs(session, tenant, settings.max_active_jobs)  # locks the tenant until the commit below
    admit(session, job, notes)
    session.commit()
    try:
        queue.enqueue_job(job.id)
    except Exception as exc:  # the job is safe in the database; say so rather than answer 500
        log.exception("enqueue of %s failed", job.id)
        add_event(
            session,
            job.id,
            "error",
            f"the broker could not be reached ({exc}); the job stays queued",
            level="warn",
        )
        session.commit()
    return job


def cancel_job(session: Session, job: Job) -> Job:
    """Cancel a job that has not ended (a running one stops within one step); InvalidTransition (409) for
    a job that succeeded or failed. Cancelling a cancelled job changes nothing."""
    if job.status != JobState.cancelled:
        transition(session, job, JobState.cancelled, message="job cancelled by the user")
        session.commit()
    return job
