"""Preparing a serving process: fill what requests would import and cache, then freeze the heap out of the
garbage collector.

torch and transformers leave a few hundred thousand long-lived objects; every full collection walks all of
them (100-150 ms here, more on a busy machine), and the objects each request allocates trigger one every few
hundred requests: a p99 spike. ``gc.freeze()`` moves everything alive at start-up to a generation the
collector skips. It only helps if start-up has already done what the first requests would: transformers
imports lazily, and a model's first tokenizer and first build (its modeling code, torch's tracing stack,
sympy, scipy) add some 180k long-lived objects that a freeze taken before them leaves in the collector's way.

The GIL's switch interval is also shortened: request threads mostly wait on the database, and a thread whose
round trip has returned waits for the GIL until the thread holding it blocks or is made to yield after the
switch interval (5 ms by default), a wait a job creation pays once per round trip (about ten) under load.
"""

from __future__ import annotations

import gc
import logging
import sys

from api.catalog import ModelCatalog
from api.queue import JobQueue

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.001  # sys.getswitchinterval() is 0.005 by default


def warm_up(catalog: ModelCatalog, queue: JobQueue) -> None:
    """Load every model's tokenizer and description (both cached, as the first upload, estimate or
    ``GET /v1/models`` would), load the broker's client, collect once, freeze the survivors; shorten the GIL's
    switch interval."""
    import greencore.data
    import greencore.methods
    import greencore.models
    import greencore.profile  # noqa: F401

    for model_id in catalog.ids():
        try:
            catalog.tokenizer(model_id)
            catalog.describe(model_id)
        except Exception as exc:  # a broken folder is reported by the requests that name it
            log.warning("warm-up skipped model %s: %s", model_id, exc)
    queue.load_client()
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
