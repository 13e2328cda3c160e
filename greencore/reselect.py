"""How often GreenTrainer selects, and what a selection may spend: the budget of a selection interval.

A selection (the importance passes, then the knapsack) serves the epochs until the next one: its interval,
``reselect_every`` epochs (fewer at the end of the run). The interval pays for it: its importance passes and
its training steps together stay within ``rho`` times full fine-tuning of its steps, so every interval keeps
the budget, and the whole run with them. With one epoch per interval, the default wherever epochs are long
enough, that is the paper's budget of an epoch. Where an epoch is a few batches, the passes (about two steps
of the tensors measured) would eat its budget or more; selecting every few epochs spreads one pass over their
steps (:func:`auto_every`), and ``importance_rows`` measures on part of a batch for fewer FLOPs.

How the run's budget is shared among its intervals (``budget_schedule``, :func:`interval_budgets`):
``even``, the default, gives each interval ``rho``; ``front`` gives early epochs more and late ones less, the
run as a whole within ``rho``: more of the network trains while the loss falls fastest, and the deep tensors
reached early keep their updates (bench/gap.py measures it; docs/training.md).

Which tensors are measured (:meth:`IntervalCosts.candidates`): those that could train within the budget on
their own (``reachable_tensors``), as the paper's selection has it; where measuring all of them leaves no
budget to train any, the largest set of the cheapest to train of which each still fits after paying for
measuring the set. So the run can train something exactly when the cheapest tensor fits beside its own
measurement, and ``rho_min`` (:meth:`IntervalCosts.rho_min`) is that exact threshold: every budget at or above
it trains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from greencore.importance import importance_flops
from greencore.profile import TensorProfile
from greencore.select import BudgetTooSmall, budget_flops, reachable_tensors

if TYPE_CHECKING:
    from greencore.methods import RunCosting

# Automatic reselect_every tries every interval length up to this, and one selection for the whole run.
AUTO_EVERY_MAX = 8
# budget_schedule "front": the first epoch's weight in the run's budget is 1 + this, the last's 1 - this.
FRONT_SLOPE = Fraction(1, 5)


@dataclass(frozen=True)
class EpochCosts:
    """What one epoch brings to the interval it is in."""

    steps: TensorProfile  # all its training steps, combined
    after_first: (
        TensorProfile | None
    )  # its steps less the first, where the importance pass computes the first
    full: int  # FLOPs of full fine-tuning of its steps
    importance: TensorProfile  # its importance batches (or the parts of them measured), combined


@dataclass(frozen=True)
class IntervalCosts:
    """One selection interval: the training steps its loops run, full fine-tuning of all its steps, and the
    selecting epoch's importance batches."""

    loop: TensorProfile
    full: int
    importance: TensorProfile

    @classmethod
    def of(cls, first: EpochCosts, later: Sequence[tuple[TensorProfile, int]] = ()) -> IntervalCosts:
        """The interval that selects at ``first`` and trains its choice through the ``later`` epochs (each its
        combined steps and full FLOPs)."""
        head = first.after_first or first.steps
        loop = TensorProfile.combine([(head, 1), *((p, 1) for p, _ in later)]) if later else head
        return cls(loop, first.full + sum(f for _, f in later), first.importance)

    def allowed(self, rho: float) -> int:
        """FLOPs the interval may spend at ``rho``: importance passes and training steps together."""
        return min(math.floor(Fraction(rho) * self.full), math.floor(rho * self.full))

    def selection_budget(self, rho: float, spent: int) -> tuple[float, int]:
        """``(rho, reserved_flops)`` for ``select_tensors(loop, ...)`` after ``spent`` FLOPs of importance:
        the interval's budget as a share of the loop's full FLOPs. Where it exceeds the loop's full FLOPs (the
        first step paid by the importance pass, rho near 1), the excess pays part of the reserve."""
        allowed = self.allowed(rho)
        if allowed < self.loop.full.total:
            return rho * (self.full / self.loop.full.total), spent
        return 1.0, max(0, spent - (allowed - self.loop.full.total))

    def _room(self, rho: float, spent: int) -> int:
        """The FLOPs the loop's steps may spend after ``spent`` FLOPs of importance (as select_tensors
        counts)."""
        target, reserved = self.selection_budget(rho, spent)
        return budget_flops(self.loop, target) - reserved

    def _singles(self) -> list[int]:
        return [self.loop.step_flops_bits(1 << i).total for i in range(len(self.loop.names))]

    def candidates(self, rho: float) -> tuple[tuple[str, ...], int]:
        """The tensors whose importance the selection measures at ``rho`` (model order), and the FLOPs that
        costs (``importance_flops`` of one pass); no tensor when nothing can train (see the module)."""
        singles = self._singles()
        target, _ = self.selection_budget(rho, 0)
        try:
            reach = reachable_tensors(self.loop, target)
        except BudgetTooSmall:
            reach = ()
        spent = importance_flops(self.importance, reach, 1).total
        if reach and min(singles) <= self._room(rho, spent):
            return reach, spent
        order = sorted(range(len(singles)), key=lambda i: (singles[i], i))
        best: tuple[tuple[str, ...], int] = ((), 0)
        for j in range(1, len(order) + 1):
            names = [self.loop.names[i] for i in sorted(order[:j])]
            cost = importance_flops(self.importance, names, 1).total
            if singles[order[j - 1]] > self._room(rho, cost):
                break
            best = (tuple(names), cost)
        return best

    def rho_min(self) -> float:
        """The smallest rho at which the interval trains a tensor: the cheapest to train, beside the
        importance pass that measures it alone; above 1 when no budget can."""
        singles = self._singles()
        i = min(range(len(singles)), key=lambda k: (singles[k], k))
        need = singles[i] + importance_flops(self.importance, [self.loop.names[i]], 1).total
        rho = need / self.full
        for tries in range(64):  # the first float at which the selection's own rounding finds room
            if rho > 1 or self.candidates(rho)[0]:
                return rho
            rho = math.nextafter(rho, math.inf) if tries < 8 else rho * (1 + 1e-12)
        return rho


def selects(epoch: int, every: int) -> bool:
    """Whether epoch ``epoch`` (1-based) selects when selections are ``every`` epochs apart."""
    return (epoch - 1) % every == 0


def intervals(n_epochs: int, every: int) -> list[range]:
    """The epochs (1-based) each selection serves."""
    return [range(s, min(s + every, n_epochs + 1)) for s in range(1, n_epochs + 1, every)]


def interval_costs(epochs: Sequence[EpochCosts], every: int) -> list[IntervalCosts]:
    """The run's selection intervals, from its epochs' costs."""
    return [
        IntervalCosts.of(epochs[r.start - 1], [(e.steps, e.full) for e in epochs[r.start : r.stop - 1]])
        for r in intervals(len(epochs), every)
    ]


def epoch_weights(n_epochs: int, slope: Fraction) -> list[Fraction]:
    """Each epoch's weight in a front-loaded budget: ``1 + slope`` for the first falling linearly to ``1 -
    slope`` for the last (their mean is 1); 1 for a single epoch."""
    if n_epochs == 1:
        return [Fraction(1)]
    return [1 + slope - 2 * slope * Fraction(i, n_epochs - 1) for i in range(n_epochs)]


def interval_budgets(epochs: Sequence[EpochCosts], every: int, rho: float, schedule: str) -> list[float]:
    """The rho each selection interval spends within, under ``budget_schedule`` ``schedule``.

    ``even``: every interval ``rho``. ``front``: epoch e's share of the run's budget is weighted by
    :func:`epoch_weights` (slope ``FRONT_SLOPE``), an interval's rho is its epochs' weighted full FLOPs over
    their full FLOPs, scaled so that the intervals together spend exactly ``rho`` of the run's full FLOPs
    (rounded down). Where an interval would then fall below its own rho_min or rise above 1, the slope is
    flattened (in eighths of ``FRONT_SLOPE``) until every interval trains; at slope 0 every interval gets
    ``rho``, so the run's rho_min is the even schedule's."""
    spans = intervals(len(epochs), every)
    if schedule == "even" or len(spans) == 1:
        return [rho] * len(spans)
    costs = interval_costs(epochs, every)
    floors = [c.rho_min() for c in costs]
    total = sum(e.full for e in epochs)
    for step in range(8, 0, -1):
        weights = epoch_weights(len(epochs), FRONT_SLOPE * Fraction(step, 8))
        weighted = sum(w * e.full for w, e in zip(weights, epochs, strict=True))
        scale = Fraction(rho) * total / weighted
        budgets = []
        for span in spans:
            exact = scale * sum(weights[e - 1] * epochs[e - 1].full for e in span)
            exact /= sum(epochs[e - 1].full for e in span)
            below = float(exact)
            if Fraction(below) > exact:  # never above the exact share: the run keeps rho
                below = math.nextafter(below, 0.0)
            budgets.append(below)
        if all(floor <= b <= 1.0 for floor, b in zip(floors, budgets, strict=True)):
            return budgets
    return [rho] * len(spans)


def run_rho_min(epochs: Sequence[EpochCosts], every: int) -> float:
    """The smallest rho at which every selection interval of the run trains a tensor."""
    return max(c.rho_min() for c in interval_costs(epochs, every))


def auto_lengths(n_epochs: int) -> list[int]:
    """The selection intervals an automatic ``reselect_every`` chooses from: 1 to ``AUTO_EVERY_MAX`` epochs,
    and the whole run."""
    return sorted({*range(1, min(n_epochs, AUTO_EVERY_MAX) + 1), n_epochs})


def auto_every(epochs: Sequence[EpochCosts], rho: float) -> int:
    """``reselect_every`` left to the run, at the budget ``rho``: 1 wherever a selection every epoch trains
    within it (each epoch then keeps rho, as in the paper); else the fewest epochs per selection that train
    within it (a selection pays over the epochs it serves); where none does, the length with the lowest
    rho_min (which a refusal names)."""
    best = (math.inf, 1)
    for every in auto_lengths(len(epochs)):
        found = run_rho_min(epochs, every)
        if found <= rho:
            return every
        best = min(best, (found, every))
    return best[1]


def auto_rho_min(epochs: Sequence[EpochCosts]) -> float:
    """The run's rho_min with ``reselect_every`` automatic: the lowest over the lengths it chooses from."""
    return min(run_rho_min(epochs, every) for every in auto_lengths(len(epochs)))


def run_epochs(run: RunCosting) -> list[EpochCosts]:
    """The epochs' costs of a planned run (``greencore.estimate``), for the base model a green run trains."""
    after = run.after_first or [None] * len(run.epochs)
    return [
        EpochCosts(p, a, p.full.total, imp)
        for p, a, imp in zip(run.epochs, after, run.importance, strict=True)
    ]


def settled_rho_min(run: RunCosting) -> float:
    """The run's rho_min at its ``reselect_every`` (automatic where left to the run)."""
    epochs = run_epochs(run)
    every = run.hp.reselect_every
    return run_rho_min(epochs, every) if every else auto_rho_min(epochs)


MORE_EXAMPLES = (2, 3, 4, 6, 8, 12, 16, 24, 32)  # multiples of the dataset tried for a refusal's advice


def fit_advice(run: RunCosting, rho: float) -> list[str]:
    """What would let a green run refused at ``rho`` train, each with the rho_min it would have: a longer
    selection interval, more epochs (where the interval is automatic), fewer importance rows, a smaller batch,
    more examples like these (the dataset repeated). Each is the run planned again with that one change, so
    its rho_min is exact; none where the forward pass and the cheapest tensor alone exceed ``rho``."""
    hp = run.hp
    if rho < max(p.rho_min for p in run.epochs):  # no setting of the importance passes goes below this
        return []
    epochs = run_epochs(run)
    every = hp.reselect_every or auto_every(epochs, rho)
    tips = []
    for k in range(every + 1, len(epochs) + 1):
        if (found := run_rho_min(epochs, k)) <= rho:
            tips.append(f"reselect_every={k} (rho_min {found:.4f})")
            break
    if run.replan is None:
        return tips
    replan = run.replan

    def rho_min_with(repeat: int = 1, **changes: Any) -> float:
        return settled_rho_min(replan(replace(hp, **changes), repeat))

    if hp.reselect_every is None:  # automatic: more epochs let one selection serve more steps
        for more in range(len(epochs) + 1, min(4 * len(epochs), 1000) + 1):
            if (found := rho_min_with(n_epochs=more)) <= rho:
                tips.append(f"n_epochs={more} (rho_min {found:.4f})")
                break
    rows = min(hp.importance_rows or hp.batch_size, hp.batch_size)
    for fewer in _halvings(rows):
        if (found := rho_min_with(importance_rows=fewer)) <= rho:
            tips.append(f"importance_rows={fewer} of each batch of {hp.batch_size} (rho_min {found:.4f})")
            break
    for smaller in _halvings(hp.batch_size):
        if (found := rho_min_with(batch_size=smaller)) <= rho:
            tips.append(f"batch_size={smaller} (rho_min {found:.4f})")
            break
    for times in MORE_EXAMPLES:
        if (found := rho_min_with(times)) <= rho:
            tips.append(f"{times * run.examples} examples like these (rho_min {found:.4f})")
            break
    return tips


def _halvings(n: int) -> list[int]:
    """n // 2, n // 4, ..., 1: the smaller values a refusal tries."""
    out = []
    while n > 1:
        n //= 2
        out.append(n)
    return out
