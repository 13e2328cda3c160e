"""The FastAPI application: ``create_app(settings)`` wires sessions, the job queue and the model catalog."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from api import errors
from api.catalog import ModelCatalog
from api.config import Settings, get_settings
from api.db import make_session_factory
from api.keys import store_bootstrap_key
from api.limits import BodyLimit
from api.queue import JobQueue
from api.ratelimit import RateLimits
from api.recovery import recover
from api.routes import health, v1
from api.timing import ServerTiming
from api.warmup import warm_up

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"  # the web dashboard (docs/dashboard.md)
DESCRIPTION = (
    "Fine-tune language models under a FLOPs budget (GreenTrainer). Every `/v1` route needs "
    "`Authorization: Bearer <api key>`; objects belong to the key's tenant."
)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for ``settings`` (default: the GT_* environment). The schema must be migrated already.
    GT_BOOTSTRAP_API_KEY, when set, is stored here (once: every API process runs this), so that from then on
    it is a stored key that ``greentrainer keys revoke`` revokes."""
    settings = settings or get_settings()
    settings.ensure_dirs()
    session_factory = make_session_factory(settings)
    if settings.bootstrap_api_key is not None:
        with session_factory() as session:
            store_bootstrap_key(session, settings.bootstrap_api_key.get_secret_value())
    queue = JobQueue(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # The database is the truth: jobs queued there but lost by the broker are sent again
        # (api/recovery.py).
        try:
            recover(session_factory, settings, queue)
        except Exception:  # the API serves even when the broker is down; workers retry
            log.exception("recovery at start failed")
        yield
        queue.close()
        session_factory.kw["bind"].dispose()

    app = FastAPI(title="GreenTrainer", version="1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.session_factory = session_factory
    app.state.queue = queue
    app.state.rate_limits = RateLimits(settings)
    app.state.catalog = ModelCatalog(settings.models_dir)
    errors.install(app)
    app.add_middleware(ServerTiming)
    # Added last, so outermost: bodies are bounded, and an upload's key checked, before anything reads them.
    app.add_middleware(
        BodyLimit, max_body_bytes=settings.max_body_bytes, max_upload_bytes=settings.max_upload_bytes
    )
    app.include_router(health.router)
    app.include_router(v1)
    # The dashboard: its page at `/`, its files under /static; neither shadows /v1, /docs or /health.
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_api_route("/", dashboard_page, include_in_schema=False)
    warm_up(app.state.catalog, queue)
    return app


def dashboard_page() -> FileResponse:
    """The web dashboard's page (api/static/index.html)."""
    return FileResponse(STATIC_DIR / "index.html")
