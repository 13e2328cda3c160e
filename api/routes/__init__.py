"""HTTP routes, one module per resource; handlers stay thin and call the modules of api/.

Every resource router is mounted on ``v1``, which carries what every ``/v1`` route needs: the API key
(``current_tenant``: 401 without a valid one), the check that ids in the path can be ids (404 before any
query), and the documented error answers. A new route added to a resource module is authenticated without
saying so.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from api.deps import current_tenant, ids_in_path
from api.routes import estimates, files, jobs, models
from api.schemas.common import ERROR_RESPONSES

v1 = APIRouter(
    prefix="/v1", dependencies=[Depends(current_tenant), Depends(ids_in_path)], responses=ERROR_RESPONSES
)
for module in (files, models, estimates, jobs):
    v1.include_router(module.router)
