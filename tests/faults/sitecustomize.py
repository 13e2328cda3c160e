"""Fault injection for tests that run real worker processes; Python imports this module at start-up when
``tests/faults`` is on PYTHONPATH (only those tests put it there).

``GT_TEST_HANG_AFTER_STEPS=N``: the training step after the first N of this process hangs forever, its
thread blocked as in a deadlocked kernel or collective, while the process's other threads (the heartbeat)
go on. A training step is counted by its learning-rate scheduler step (the importance pass's tentative
optimizer steps have no scheduler); a scheduler's own first step, made when it is built, is not counted.
"""

import os

if os.environ.get("GT_TEST_HANG_AFTER_STEPS"):
    import threading

    from torch.optim.lr_scheduler import LRScheduler

    _after = int(os.environ["GT_TEST_HANG_AFTER_STEPS"])
    _step = LRScheduler.step
    _taken = 0

    def _hanging_step(self: LRScheduler, *args: object, **kwargs: object) -> object:
        global _taken
        if getattr(self, "_step_count", 0) > 0:  # not the step made while it is built
            if _taken >= _after:
                threading.Event().wait()  # never set
            _taken += 1
        return _step(self, *args, **kwargs)

    LRScheduler.step = _hanging_step
