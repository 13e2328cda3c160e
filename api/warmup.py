"""Preparing a serving process: import what requests need, then freeze the heap out of the garbage collector.

torch and transformers leave a few hundred thousand long-lived objects; every full collection walks all of them
(150 ms here, more on a busy machine), and the objects each request allocates trigger one every few hundred
requests: a p99 spike. ``gc.freeze()`` moves everything alive at start-up to a generation the collector skips.
"""

from __future__ import annotations

import gc


def warm_up() -> None:
    """Import the modules requests use (profiling, tokenizers, datasets), collect once, freeze the survivors."""
    import transformers  # noqa: F401

    import greencore.data  # noqa: F401
    import greencore.methods  # noqa: F401
    import greencore.models  # noqa: F401
    import greencore.profile  # noqa: F401

    gc.collect()
    gc.freeze()
