"""Which tensors to train: the largest summed importance whose training step fits a FLOPs budget.

In: a :class:`~greencore.profile.TensorProfile` (the exact cost of one step for any mask), an importance per
tensor (loss reduction, from :func:`greencore.importance.tensor_importance`) and ``rho``, the share of a full
training step allowed. Out: a :class:`Selection`, whose step costs at most ``rho * profile.full.total`` FLOPs
(``reserved_flops`` included) and whose importance is the largest any mask reaches under the profile's exact
cost model.

The cost of a mask is ``fwd + c(union of T_k over the mask) + sum of w_k over the mask``: ``T_k`` is the set
of shared terms tensor k pays for (activation gradients, a weight gradient several tensors need), ``w_k`` its
own weight gradient. Fix ``d``, the mask's tensor whose shared terms cost most (``A_d = c(T_d)``); every other
tensor ``k`` with ``T_k`` inside ``T_d`` then adds only ``w_k``: a 0/1 knapsack. Sweeping ``d`` in increasing
``A`` keeps one knapsack table growing; the few tensors not covered by ``d`` (its parallel siblings: q/k/v of
one layer, the other branch of a parallel block, an encoder-decoder's cross-attention k/v beside the decoder)
pay their extra terms exactly: as knapsack items when no other sibling shares them, else enumerated subset by
subset. Tensors with no positive importance are never trained (they cannot raise the objective and never lower
the cost), which keeps those sets small.

The knapsack runs over FLOPs in units of the greatest common divisor of the costs (exact: a transformer's
gradients share a large power of two); only when that grid would exceed ``MAX_BUCKETS`` are costs
rounded *up* to a coarser grid (never over budget, possibly below the optimum; ``Selection.exact`` says
which). Every answer is checked against ``profile.step_flops`` before it is returned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from greencore.flops import StepFlops
from greencore.profile import TensorProfile

MAX_BUCKETS = 1 << 18  # knapsack table length: 2 MiB per table; covers 7B shapes exactly up to rho 1
MAX_ENUM = 12  # uncovered siblings enumerated exactly per deepest tensor (2**12 subsets)


class BudgetTooSmall(ValueError):
    """``rho`` cannot pay for one step that trains any tensor: ``rho < rho_min`` (the message names both).
    ``message`` replaces the default message (a budget given as FLOPs or energy says so)."""

    def __init__(
        self,
        rho: float,
        rho_min: float,
        detail: str = "",
        message: str | None = None,
        advice: Sequence[str] = (),
    ) -> None:
        self.rho = rho
        self.rho_min = rho_min
        self.detail = detail
        self.advice = list(advice)  # changes that would make it fit, each with its rho_min
        if message is None:
            message = f"rho {rho:.3f} is below rho_min {rho_min:.3f} for this model and batch shape"
            message = f"{message}: {detail}" if detail else message
        if self.advice:
            message = f"{message}; it would fit at rho={rho:g} with {'; or '.join(self.advice)}"
        super().__init__(message)


@dataclass(frozen=True)
class Selection:
    """The tensors to train and what one step with them costs.

    ``mask`` is aligned with ``profile.names``; ``names`` lists the selected ones. ``flops`` is the step's
    cost (FLOPs) from ``profile.step_flops(mask)``; ``objective`` the summed importance of the selected
    tensors. ``rho_achieved = (flops.total + reserved_flops) / profile.full.total`` <= the ``rho`` asked.
    ``exact`` is True when the search proved optimality (no rounded costs, no sibling set too large).
    """

    mask: tuple[bool, ...]
    flops: StepFlops
    objective: float
    names: tuple[str, ...]
    rho_achieved: float
    reserved_flops: int = 0
    exact: bool = True


@dataclass
class _Problem:
    """The tensors worth considering (positive, finite importance; each fits the budget on its own)."""

    budget: int  # FLOPs for shared terms and weight gradients: rho * full - fwd - reserved
    items: list[int]  # profile indices, in sweep order: increasing A, then model order
    value: dict[int, float]
    weight: dict[int, int]  # own weight-gradient FLOPs w_k
    shared: dict[int, int]  # T_k: bit set over shared terms
    reach: dict[int, int]  # A_k = c(T_k)
    term_costs: list[int]  # FLOPs of each shared term


def budget_flops(profile: TensorProfile, rho: float) -> int:
    """The FLOPs a step may spend at ``rho``: the floor of ``rho * full``, exact (Fraction) and never above
    the float product a caller may compare with."""
    full = profile.full.total
    return min(math.floor(Fraction(rho) * full), math.floor(rho * full))


def _check(profile: TensorProfile, rho: float, reserved_flops: int) -> int:
    """Validate the request; returns the FLOPs one step may spend (``reserved_flops`` already taken off)."""
    if not (0.0 < rho <= 1.0):
        raise ValueError(f"rho must be in (0, 1], got {rho!r}")
    if reserved_flops < 0:
        raise ValueError(f"reserved_flops must be >= 0, got {reserved_flops}")
    full = profile.full.total
    detail = (
        f"the forward pass alone costs {profile.fwd:.3e} FLOPs ({profile.fwd / full:.3f} of a full step of "
        f"{full:.3e}) and the cheapest tensor to train brings a step to {profile.rho_min:.3f}"
    )
    if rho < profile.rho_min:
        raise BudgetTooSmall(rho, profile.rho_min, detail)
    if reserved_flops:
        cheapest = min(
            (profile.step_flops_bits(1 << i).total for i in range(len(profile.names))), default=full
        )
        if cheapest + reserved_flops > budget_flops(profile, rho):
            rho_min = (cheapest + reserved_flops) / full
            detail += f"; {reserved_flops:.3e} FLOPs per step are reserved (importance evaluation)"
            raise BudgetTooSmall(rho, rho_min, detail)
    return budget_flops(profile, rho) - reserved_flops


def _clean(importance: Mapping[str, float], names: tuple[str, ...]) -> dict[int, float]:
    """Finite, positive importances by profile index; anything else (absent, <= 0, NaN, inf) is not
    trained."""
    values = {}
    for i, name in enumerate(names):
        v = importance.get(name)
        if v is not None and math.isfinite(v) and v > 0.0:
            values[i] = float(v)
    return values


def _problem(profile: TensorProfile, importance: Mapping[str, float], step_budget: int) -> _Problem:
    n = len(profile.names)
    weight = [0] * n
    shared_terms = list(profile.act_terms)
    for bits, flops in profile.weight_terms:
        if bits and bits & (bits - 1) == 0:  # one tensor's own weight gradient
            weight[bits.bit_length() - 1] += flops
        elif bits:  # a weight gradient needed by any of several tensors: a shared term
            shared_terms.append((bits, flops))
    costs = np.array([c for _, c in shared_terms], dtype=np.int64)
    # Membership matrix tensors x terms, from the terms' upstream bit sets.
    nbytes = max(1, (n + 7) // 8)
    raw = b"".join(u.to_bytes(nbytes, "little") for u, _ in shared_terms)
    member = (
        np.unpackbits(
            np.frombuffer(raw, dtype=np.uint8).reshape(len(shared_terms), nbytes), axis=1, bitorder="little"
        )[:, :n].T
        if shared_terms
        else np.zeros((n, 0), np.uint8)
    )
    reach_all = np.zeros(n, np.int64)
    for start in range(
        0, n, 256
    ):  # in row blocks: the int64 copy of the whole matrix would be n*terms*8 bytes
        reach_all[start : start + 256] = member[start : start + 256].astype(np.int64) @ costs
    packed = np.packbits(member, axis=1, bitorder="little")
    budget = step_budget - profile.fwd
    values = _clean(importance, profile.names)
    keep = [i for i in values if int(reach_all[i]) + weight[i] <= budget]
    keep.sort(key=lambda i: (int(reach_all[i]), i))
    return _Problem(
        budget=budget,
        items=keep,
        value={i: values[i] for i in keep},
        weight={i: weight[i] for i in keep},
        shared={i: int.from_bytes(packed[i].tobytes(), "little") for i in keep},
        reach={i: int(reach_all[i]) for i in keep},
        term_costs=[int(c) for _, c in shared_terms],
    )


def _bit_cost(bits: int, term_costs: list[int]) -> int:
    total = 0
    while bits:
        low = bits & -bits
        total += term_costs[low.bit_length() - 1]
        bits ^= low
    return total


class _Knapsack:
    """0/1 knapsack tables over FLOPs in units of ``unit``, the greatest common divisor of the costs items can
    be charged (``table[c]``: best importance with cost <= c units). Should that grid exceed MAX_BUCKETS, item
    costs are rounded up to whole units of a coarser one, so a table entry never under-counts FLOPs."""

    def __init__(self, weights: list[int], capacity: int) -> None:
        positive = [w for w in weights if w > 0]
        unit = math.gcd(*positive) if positive else max(capacity, 1)
        self.exact = capacity // unit < MAX_BUCKETS
        if not self.exact:
            unit = -(-capacity // (MAX_BUCKETS - 1))  # rounding costs up on a coarser grid
        self.unit = unit
        self.size = capacity // unit + 1

    def units(self, flops: int) -> int:
        return -(-flops // self.unit)

    def add(self, table: np.ndarray, flops: int, value: float, record: bool = False):
        """``table`` with one more item offered; returns (new table, where the item was taken).

        Where taken is None when the item costs nothing (taken everywhere)."""
        u = self.units(flops)
        if u == 0:
            return table + value, None
        if u >= self.size:
            return table, np.zeros(0, np.uint8)
        new = table.copy()
        candidate = table[:-u] + value
        np.maximum(new[u:], candidate, out=new[u:])
        # Where taken, one bit per slot from slot u on (kept for every item of the sweep: packed).
        return new, (np.packbits(candidate > table[u:], bitorder="little") if record else None)

    @staticmethod
    def taken(took: np.ndarray, u: int, slot: int) -> bool:
        """Whether an item of ``u`` units recorded by :meth:`add` was taken at table index ``slot``."""
        i = slot - u
        return i >= 0 and i < 8 * len(took) and bool(took[i >> 3] >> (i & 7) & 1)

    def slot(self, flops: np.ndarray) -> np.ndarray:
        """The table index of a FLOPs allowance (floored: never more than the allowance)."""
        return np.minimum(flops // self.unit, self.size - 1)


def _subset_table(members: list[int], prob: _Problem, uncovered: dict[int, int]):
    """Every subset of ``members`` (bit b = members[b]): its summed importance and FLOPs (own weight
    gradients plus the union of their uncovered shared terms, exact)."""
    terms = 0
    for k in members:
        terms |= uncovered[k]
    index = [j for j in range(terms.bit_length()) if terms >> j & 1]
    term_cost = np.array([prob.term_costs[j] for j in index], dtype=np.int64)
    count = 1 << len(members)
    union = np.zeros((count, len(index)), dtype=bool)
    flops = np.zeros(count, dtype=np.int64)
    value = np.zeros(count)
    for b, k in enumerate(members):
        row = np.array([uncovered[k] >> j & 1 for j in index], dtype=bool)
        h = 1 << b
        union[h : 2 * h] = union[:h] | row
        flops[h : 2 * h] = flops[:h] + prob.weight[k]
        value[h : 2 * h] = value[:h] + prob.value[k]
    if index:
        flops += union.astype(np.int64) @ term_cost
    return value, flops


def _split_siblings(siblings: list[int], uncovered: dict[int, int]) -> tuple[list[int], list[int]]:
    """Siblings whose extra terms overlap no other sibling's (their costs add up: plain knapsack items), and
    the rest (their union must be costed subset by subset). An encoder-decoder's cross-attention k/v weights
    are of the first kind: each pays only its own score or value input gradient."""
    groups: list[tuple[int, list[int]]] = []  # (union of extra terms, members)
    for k in siblings:
        terms, members = uncovered[k], [k]
        for group in [g for g in groups if g[0] & terms]:
            groups.remove(group)
            terms |= group[0]
            members += group[1]
        groups.append((terms, members))
    alone = [g[1][0] for g in groups if len(g[1]) == 1]
    return alone, [k for g in groups if len(g[1]) > 1 for k in g[1]]


@dataclass
class _Best:
    value: float
    deepest: int
    chain_len: int  # items in the shared table when this deepest tensor was examined
    table: np.ndarray  # that table
    extension: list[tuple[int, int]]  # (item, FLOPs charged) added to it for this deepest tensor only
    subset: list[int]  # uncovered siblings taken
    slot: int  # table index the best value was read at


def _join_positions(prob: _Problem) -> list[int]:
    """For each sweep position p, the first position from which every deepest tensor covers item p (its
    shared terms lie inside the deepest's), so that it may enter the shared table for good."""
    items = prob.items
    n = len(items)
    # cover[p]: the shared terms common to every tensor at positions >= p; it only grows with p.
    cover = [(1 << len(prob.term_costs)) - 1] * (n + 1)
    for p in range(n - 1, -1, -1):
        cover[p] = cover[p + 1] & prob.shared[items[p]]
    join = []
    for p, k in enumerate(items):
        lo, hi = p + 1, n
        while lo < hi:
            mid = (lo + hi) // 2
            if prob.shared[k] & ~cover[mid]:
                lo = mid + 1
            else:
                hi = mid
        join.append(lo)
    return join


def _search(prob: _Problem, knap: _Knapsack) -> tuple[list[int], bool]:
    """The best mask (profile indices) and whether the search was exact."""
    items = prob.items
    join = _join_positions(prob)
    exact = knap.exact
    joining: dict[int, list[int]] = {}
    for q, k in enumerate(items):
        joining.setdefault(join[q], []).append(k)
    table = np.zeros(knap.size)
    chain: list[tuple[int, np.ndarray | None]] = []  # (item, where taken), in the order added to the table
    pending: list[int] = []  # items seen but not covered by every deepest tensor still to come
    best: _Best | None = None
    for p, d in enumerate(items):
        allowance = prob.budget - prob.reach[d] - prob.weight[d]
        if allowance >= 0:
            t_d = prob.shared[d]
            uncovered = {k: prob.shared[k] & ~t_d for k in pending}
            alone, entangled = _split_siblings([k for k in pending if uncovered[k]], uncovered)
            entangled.sort(key=lambda k: -prob.value[k])
            enumerated, charged = entangled[:MAX_ENUM], entangled[MAX_ENUM:]
            # Covered pending items cost only their own weight gradient; a sibling sharing none of its extra
            # terms with another costs them exactly on top. Entangled siblings beyond the enumeration limit
            # are charged their extra terms each, as if unshared: an over-estimate, never over budget.
            extension = [(k, prob.weight[k]) for k in pending if not uncovered[k]]
            extension += [
                (k, prob.weight[k] + _bit_cost(uncovered[k], prob.term_costs)) for k in alone + charged
            ]
            exact = exact and not charged
            extended = table
            for k, flops in extension:
                extended, _ = knap.add(extended, flops, prob.value[k])
            sub_value, sub_flops = _subset_table(enumerated, prob, uncovered)
            left = allowance - sub_flops
            ok = left >= 0
            slots = knap.slot(np.where(ok, left, 0))
            totals = np.where(ok, sub_value + extended[slots], -np.inf)
            s = int(np.argmax(totals))
            total = prob.value[d] + float(totals[s])
            if best is None or total > best.value:
                subset = [k for b, k in enumerate(enumerated) if s >> b & 1]
                best = _Best(total, d, len(chain), table, extension, subset, int(slots[s]))
        pending.append(d)
        for k in joining.get(p + 1, ()):
            pending.remove(k)
            table, took = knap.add(table, prob.weight[k], prob.value[k], record=True)
            chain.append((k, took))
    if best is None:
        return [], exact

    # Walk back through the additions that produced the best value.
    steps = [(k, prob.weight[k], took) for k, took in chain[: best.chain_len]]
    ext = best.table
    for k, flops in best.extension:
        ext, took = knap.add(ext, flops, prob.value[k], record=True)
        steps.append((k, flops, took))
    chosen = [best.deepest, *best.subset]
    c = best.slot
    for k, flops, took in reversed(steps):
        u = knap.units(flops)
        if took is None:
            chosen.append(k)
        elif knap.taken(took, u, c):
            chosen.append(k)
            c -= u
    return chosen, exact


def _fill(profile: TensorProfile, prob: _Problem, chosen: set[int], limit: int) -> set[int]:
    """Make the mask fit (drop least important first, a guard that the search never needs) and then add any
    positive tensor whose exact extra cost still fits, most important first."""
    chosen = set(chosen)
    while chosen and profile.step_flops_bits(sum(1 << i for i in chosen)).total > limit:
        chosen.remove(min(chosen, key=lambda i: prob.value[i]))
    hit = 0
    for i in chosen:
        hit |= prob.shared[i]
    spent = profile.step_flops_bits(sum(1 << i for i in chosen)).total
    for k in sorted(set(prob.items) - chosen, key=lambda i: -prob.value[i]):
        extra = prob.weight[k] + _bit_cost(prob.shared[k] & ~hit, prob.term_costs)
        if spent + extra <= limit:
            chosen.add(k)
            hit |= prob.shared[k]
            spent += extra
    return chosen


def select_tensors(
    profile: TensorProfile,
    importance: Mapping[str, float],
    rho: float,
    *,
    reserved_flops: int = 0,
) -> Selection:
    """The mask that maximises summed importance with
    ``step_flops(mask).total + reserved_flops <= rho * full``.

    ``importance``: tensor name -> loss reduction (any sign). Only tensors with a finite, positive importance
    are trained; names the profile does not hold (parameters the loss does not use) are ignored. When no
    such tensor fits, the mask is empty. ``reserved_flops``: FLOPs per step the caller spends besides the
    step itself (its importance evaluation, amortised over the steps it serves), kept out of the budget.

    Raises ``ValueError`` for ``rho`` outside (0, 1] or negative ``reserved_flops``, and
    :class:`BudgetTooSmall` when ``rho < profile.rho_min``, or when the reserve leaves less than the cheapest
    one-tensor step (its ``rho_min`` is then that step plus the reserve, as a share of a full step).
    """
    step_budget = _check(profile, rho, reserved_flops)
    limit = step_budget  # the step's own FLOPs may not exceed this
    prob = _problem(profile, importance, step_budget)
    exact = True
    chosen: set[int] = set()
    if prob.items:
        widest = prob.budget - min(prob.reach[k] + prob.weight[k] for k in prob.items)
        # Shared terms join the grid too: a sibling's extra terms are charged as part of its weight.
        knap = _Knapsack([*prob.weight.values(), *prob.term_costs], widest)
        found, exact = _search(prob, knap)
        chosen = _fill(profile, prob, set(found), limit)
    mask = tuple(i in chosen for i in range(len(profile.names)))
    flops = profile.step_flops_bits(sum(1 << i for i in chosen))
    if flops.total > limit:  # _fill guarantees it; should that guard ever break, fail loudly, never overspend
        raise RuntimeError(f"selection costs {flops.total} FLOPs, over the budget of {limit}")
    return Selection(
        mask=mask,
        flops=flops,
        objective=math.fsum(prob.value[i] for i in sorted(chosen)),
        names=tuple(profile.names[i] for i in sorted(chosen)),
        rho_achieved=(flops.total + reserved_flops) / profile.full.total,
        reserved_flops=reserved_flops,
        exact=exact,
    )


def reachable_tensors(profile: TensorProfile, rho: float, *, reserved_flops: int = 0) -> tuple[str, ...]:
    """The tensors some mask within the budget can train: those whose one-tensor step fits on its own.

    These are the only candidates whose importance is worth measuring (``tensor_importance(names=...)``).
    Raises like :func:`select_tensors` for a bad ``rho``.
    """
    limit = _check(profile, rho, reserved_flops)
    return tuple(n for i, n in enumerate(profile.names) if profile.step_flops_bits(1 << i).total <= limit)


def selection_upper_bound(
    profile: TensorProfile,
    importance: Mapping[str, float],
    rho: float,
    *,
    reserved_flops: int = 0,
) -> float:
    """An upper bound on the summed importance of any mask within the budget.

    A mask whose costliest-to-reach tensor is ``d`` costs at least ``fwd + A_d + sum of own weight-gradient
    FLOPs``; over each ``d``, the fractional knapsack of the tensors reached no later than ``d`` under that
    relaxed cost bounds every such mask. Used to show how near the optimum a selection is where brute force
    cannot reach.
    """
    prob = _problem(profile, importance, _check(profile, rho, reserved_flops))
    if not prob.items:
        return 0.0
    items = prob.items
    value = np.array([prob.value[k] for k in items])
    weight = np.array([prob.weight[k] for k in items], dtype=np.float64)
    density = np.where(weight > 0, value / np.maximum(weight, 1.0), np.inf)
    order = np.argsort(-density, kind="stable")
    best = 0.0
    for p, d in enumerate(items):
        allowance = prob.budget - prob.reach[d] - prob.weight[d]
        if allowance < 0:
            continue
        before = order[order < p]
        w = weight[before]
        cum = np.cumsum(w)
        whole = cum <= allowance
        bound = prob.value[d] + float(value[before][whole].sum())
        rest = np.flatnonzero(~whole)
        if rest.size:
            j = rest[0]
            room = allowance - (cum[j] - w[j])
            bound += float(value[before][j]) * room / w[j]
        best = max(best, bound)
    return best
