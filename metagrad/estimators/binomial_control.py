"""The binomial series' control: how many levels, which blocks, what to warn about, how much memory.

The series itself (:mod:`metagrad.estimators.binomial_series`) computes MATH.md (2) at the
order and in the blocks it is given. This module decides them and reads its level norms.

Error control. With ``ρ_j = ‖T_j‖/‖T_{j−1}‖`` (``T_0 = v``):

- ``order="auto"`` (:func:`auto_order`) adds levels until ``‖T_j‖ ≤ rtol·‖ĝ_j‖``
  (converged), until ``min(max_order, K)`` levels (at K the result is exact), or until the
  terms grow at two consecutive levels (``ρ_{j−1} ≥ 1`` and ``ρ_j ≥ 1``: diverging), the
  stopping rule :func:`guard`. Diverging, or stopping at ``max_order`` above ``rtol``,
  issues a warning and runs the fallback (:func:`fall_back`): ``"blocked"`` (the default:
  ``Binomial(order="auto", block="auto")``, which halves the blocks until every block meets
  ``rtol``, :func:`auto_blocks`; blocks of one step are exact), ``"checkpointed"`` (exact,
  sequential), ``"truncated"`` (``Truncated(max_order)``) or ``None`` (raise
  :class:`SeriesDivergenceError`). ``MetaGradient(estimator="binomial")`` is
  ``Binomial(order="auto")`` with this default fallback.
- A fixed ``order=L`` computes (2) exactly as asked and, when monitored, warns
  (:func:`fixed_order_info`) if ``ρ_L ≥ 1`` (the series was cut where its terms were not
  shrinking) or if the error estimate ``‖T_L‖/‖ĝ_L‖`` is at least :data:`WARN_ESTIMATE` (the
  last level kept is still large). With blocks, both are checked block by block, the estimate
  relative to the vector the block expanded against. The threshold is measured
  (``benchmarks/binomial_sweep.py``, docs/binomial_sweep.md): of 4476 fixed-order results
  (L = 1…4) on sinusoid MLPs and a 5-way 1-shot CNN4, float64, all 2688 that were more than
  30% off the exact meta-gradient warn (the growth rule alone: 77%), and 9 of the 1257 less
  than 5% off (0.7%).

Memory budget. :func:`plan_budget` chooses the chunk size for ``max_memory`` from the stored
iterates and a measured step graph, with the measured :data:`GRAPH_FACTOR` and
:data:`ITERATE_FACTOR`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..linalg import norm
from ..discovery import MetaGrads, add_meta
from ..memory import format_bytes
from ..update_rule import Params
from ..errors import SeriesDivergenceError, warn
from .base import Estimator, TrajectoryView
from .binomial_series import BlockNorms, Guard, Span, levels
from .checkpointed import Checkpointed
from .truncated import Truncated

__all__ = ["SeriesDivergenceError", "FALLBACKS", "WARN_ESTIMATE", "GRAPH_FACTOR", "ITERATE_FACTOR",
           "VECTORS", "CHECK_QUEUE", "CHECK_ROWS", "plan_budget", "guard",
           "auto_order", "auto_order_tasks", "auto_blocks", "auto_blocks_tasks", "fall_back", "fell_back",
           "fixed_order_info", "fixed_order_info_tasks", "task_rows", "warn_fallback"]

FALLBACKS = ("blocked", "checkpointed", "truncated", None)

#: A monitored fixed order warns when its error estimate ``‖T_L‖/‖ĝ_L‖`` (per block: relative
#: to the vector the block expanded against) is at least this. Measured, not derived
#: (docs/binomial_sweep.md): the largest threshold that caught every sweep result more than
#: 30% off was 0.47, rounded down.
WARN_ESTIMATE = 0.4


def guard(rtol: float) -> Guard:
    """The stopping rule of ``order="auto"``: ``"converged"`` once ``‖T_j‖ ≤ rtol·‖ĝ_j‖``,
    ``"diverged"`` once the level norms grew at two consecutive levels, else ``"limit"``."""
    def stop(norms: list[float], g: Params, v: Params, latest: Optional[Params] = None) -> str:
        level = len(norms)
        if norms[-1] <= rtol * norm(g):
            return "converged"
        if level >= 2 and _ratio(norms, v, level) >= 1 and _ratio(norms, v, level - 1) >= 1:
            return "diverged"
        return "limit"
    return stop


def auto_order(trajectory: TrajectoryView, steps: int, v: Params, rtol: float, max_order: int,
               chunk_size: Optional[int]) -> tuple[Params, MetaGrads, dict[str, Any], Optional[str]]:
    """order='auto' over all the steps: the estimate, the η-gradient, the report and, where
    the series diverged or missed ``rtol`` within ``min(max_order, K)`` levels, why (else
    ``None``)."""
    limit = min(max_order, steps)
    g, norms, products, stop, meta = levels(trajectory, (0, steps), v, limit, chunk_size,
                                            guard=guard(rtol))
    info, reason = _outcome(steps, norms, g, products, stop, rtol, max_order)
    return g, meta, info, reason


def auto_order_tasks(trajectory: TrajectoryView, steps: int, v: Params, rtol: float, max_order: int,
                     chunk_size: Optional[int], tasks: int
                     ) -> tuple[list[tuple[Params, dict[str, Any], Optional[str]]], MetaGrads, int]:
    """:func:`auto_order` for each of ``tasks`` tasks in one pass (:func:`_levels_each`).
    Returns, per task, its rows of the estimate, its report and why it failed (``None``: it did
    not), as :func:`auto_order` gives them for that task alone; the η-gradient of the tasks that
    did not fail, each at its own order; and the products taken."""
    found, meta, products = _levels_each(trajectory, (0, steps), v, min(max_order, steps), chunk_size,
                                         list(range(tasks)), rtol)
    out = []
    for t in range(tasks):
        g_t, norms, stop = found[t]
        info, reason = _outcome(steps, norms, g_t, 0, stop, rtol, max_order)
        out.append((g_t, info, reason))
    return out, meta, products


def auto_blocks_tasks(trajectory: TrajectoryView, steps: int, v: Params, rtol: float, max_order: int,
                      chunk_size: Optional[int], members: list[int], *, size: Optional[int] = None,
                      shrink: bool = True
                      ) -> tuple[Params, dict[int, dict[str, Any]], dict[int, Span], MetaGrads, int]:
    """:func:`auto_blocks` (blocks of ``size`` steps, ``None``: K, retried at half the size when
    ``shrink``) for the tasks ``members`` of a block over tasks at once, each following its own
    blocks as it would alone: in each round every task not done tries its next block, and the
    tasks trying the same span share one :func:`_levels_each` call. Without ``shrink`` a task
    whose block fails stops there. Returns the estimate (the members' rows; the others zero),
    each member's report (as :func:`auto_blocks` gives it, its products counted in the total),
    the failed block of each member that failed, the η-gradient of the others' blocks, and the
    products taken.

    η: a member that failed a block added the terms of the blocks it kept before; then the
    others run again without it (their blocks are their own: the same), for their η terms."""
    u = task_rows(v, members)
    last, sizes = dict.fromkeys(members, steps), dict.fromkeys(members, steps if size is None else size)
    kept: dict[int, list[tuple[Span, list[float]]]] = {t: [] for t in members}
    depth, attempts, estimate = dict.fromkeys(members, 0), dict.fromkeys(members, 0), dict.fromkeys(members, 0.0)
    failed: dict[int, Span] = {}
    diverged: dict[int, bool] = {}
    meta: MetaGrads = []
    products = 0
    while any(last[t] > 0 for t in members):
        tries: dict[Span, list[int]] = {}
        for t in members:
            if last[t] > 0:
                tries.setdefault((max(0, last[t] - sizes[t]), last[t]), []).append(t)
        for span, group in tries.items():
            length = span[1] - span[0]
            found, more, used = _levels_each(trajectory, span, task_rows(u, group), min(max_order, length),
                                             chunk_size, group, rtol)
            meta, products = add_meta(meta, more), products + used
            for t in group:
                g_t, norms, stop = found[t]
                depth[t], attempts[t] = depth[t] + len(norms), attempts[t] + 1
                if stop == "converged" or len(norms) == length:
                    estimate[t] += _estimate(norms, length, len(norms), {n: x[t] for n, x in u.items()})
                    kept[t].append((span, norms))
                    for n in u:
                        u[n][t] = g_t[n]
                    last[t] = span[0]
                elif shrink:
                    sizes[t] = max(1, length // 2)
                else:
                    failed[t], diverged[t], last[t] = span, stop == "diverged", 0
    if failed and trajectory.meta:
        rest = [t for t in members if t not in failed]
        meta = []
        if rest:
            _, _, _, meta, used = auto_blocks_tasks(trajectory, steps, v, rtol, max_order, chunk_size, rest,
                                                    size=size, shrink=shrink)
            products += used
    infos = {t: {"steps": steps, "blocks": [span for span, _ in reversed(kept[t])],
                 "orders": [len(norms) for _, norms in reversed(kept[t])],
                 "level_norms": [norms for _, norms in reversed(kept[t])], "depth": depth[t],
                 "attempts": attempts[t], "error_estimate": math.inf if t in failed else estimate[t],
                 "diverged": diverged.get(t, False), "converged": t not in failed,
                 "warned": False, "fallback": None, "hessian_vector_products": 0} for t in members}
    return u, infos, failed, meta, products


def _levels_each(trajectory: TrajectoryView, span: Span, v: Params, limit: int, chunk_size: Optional[int],
                 members: list[int], rtol: float
                 ) -> tuple[dict[int, tuple[Params, list[float], str]], MetaGrads, int]:
    """:func:`levels` over ``span`` for the tasks ``members`` of a block over tasks at once (the
    step's products act on each task's rows alone; ``v``'s other rows are zero), each task
    stopping where :func:`guard` says for its own rows (its level norms, its estimate, its
    vector), its estimate kept then and its rows zero from the next level on; the call ends when
    every member has stopped, by ``limit`` levels. Returns, per member, its rows of the
    estimate, its level norms and why it stopped; the η-gradient of the members that succeeded
    (converged, or expanded completely), each at its own order; and the products taken.

    η: each member's terms stop at its order with its rows (``levels(retire=...)``), so the
    call's η-gradient is the members' own where none failed. A member that failed added terms
    before it did: then the others run again without it (their rows, and so their stops, are
    their own: the same), for their η terms."""
    stop_rule = guard(rtol)
    length = span[1] - span[0]
    rows_v = {t: {n: x[t] for n, x in v.items()} for t in members}
    norms: dict[int, list[float]] = {t: [] for t in members}
    done: dict[int, tuple[Params, str]] = {}

    def each(_: list[float], g: Params, __: Params, level: Params) -> str:
        for t in members:
            if t in done:
                continue
            g_t, level_t = {n: x[t] for n, x in g.items()}, {n: x[t] for n, x in level.items()}
            norms[t].append(norm(level_t))
            stop = stop_rule(norms[t], g_t, rows_v[t], level_t)
            if stop != "limit" or len(norms[t]) == limit:
                done[t] = ({n: x.clone() for n, x in g_t.items()}, stop)
        return "converged" if len(done) == len(members) else "limit"

    def stopped_at(level: int) -> list[int]:
        return [t for t in members if t in done and len(norms[t]) == level]

    _, _, products, _, meta = levels(trajectory, span, v, limit, chunk_size, guard=each, retire=stopped_at)
    found = {t: (done[t][0], norms[t], done[t][1]) for t in members}  # (every member stops by the limit)
    kept = [t for t in members if done[t][1] == "converged" or len(norms[t]) == length]
    if trajectory.meta and len(kept) < len(members):
        meta = []
        if kept:
            _, meta, used = _levels_each(trajectory, span, task_rows(v, kept), limit, chunk_size, kept, rtol)
            products += used
    return found, meta, products


def task_rows(v: Params, tasks: list[int]) -> Params:
    """``v`` (rows stacked over the tasks of a block) with every row but those of ``tasks`` zero."""
    out = {n: torch.zeros_like(x) for n, x in v.items()}
    for n, x in v.items():
        out[n][tasks] = x[tasks]
    return out


def _outcome(steps: int, norms: list[float], g: Params, products: int, stop: str, rtol: float,
             max_order: int) -> tuple[dict[str, Any], Optional[str]]:
    """The report of ``order="auto"`` stopped for ``stop`` after ``len(norms)`` levels, and why
    it failed (``None``: converged, or exact at K levels)."""
    info = _report(steps, len(norms), norms, g, products)
    if stop == "converged" or len(norms) == steps:
        info["converged"] = True
        return info, None
    info["diverged"] = stop == "diverged"
    reason = ("the level norms grew at two consecutive orders: the binomial series is "
              "diverging, because K·α·‖H‖ is too large" if stop == "diverged" else
              f"max_order={max_order} levels left an error estimate of "
              f"{info['error_estimate']:.3g}, above rtol={rtol:g}")
    return info, reason


def auto_blocks(trajectory: TrajectoryView, steps: int, v: Params, size: int, rtol: float,
                max_order: int, chunk_size: Optional[int], *, shrink: bool
                ) -> tuple[Params, dict[str, Any], Optional[Span], MetaGrads]:
    """order='auto' in blocks of ``size`` steps, laid from the last step backwards; returns
    the estimate, the report, the failed block (or ``None``) and the η-gradient of the
    blocks kept.

    A block that diverges or misses rtol within ``max_order`` levels is retried at half
    the size when ``shrink`` (block='auto': a block of one step is exact at order 1, so
    every block ends up meeting rtol), and otherwise ends the loop: that block is returned
    as the failure. The levels of a rejected attempt count in ``depth`` and
    ``hessian_vector_products``.
    """
    u, last = dict(v), steps
    meta: MetaGrads = []
    spans, orders, all_norms = [], [], []
    products, depth, estimate, attempts = 0, 0, 0.0, 0
    failed: Optional[Span] = None
    diverged = False
    stop_rule = guard(rtol)
    while last > 0:
        span = (max(0, last - size), last)
        length = span[1] - span[0]
        u_next, norms, used, stop, more = levels(trajectory, span, u, min(max_order, length),
                                                 chunk_size, guard=stop_rule)
        products, depth, attempts = products + used, depth + len(norms), attempts + 1
        if stop == "converged" or len(norms) == length:
            estimate += _estimate(norms, length, len(norms), u)
            spans.append(span)
            orders.append(len(norms))
            all_norms.append(norms)
            u, last, meta = u_next, span[0], add_meta(meta, more)
        elif shrink:
            size = max(1, length // 2)
        else:
            failed, diverged = span, stop == "diverged"
            break
    info = {"steps": steps, "blocks": list(reversed(spans)), "orders": list(reversed(orders)),
            "level_norms": list(reversed(all_norms)), "depth": depth, "attempts": attempts,
            "error_estimate": math.inf if failed else estimate, "diverged": diverged,
            "converged": failed is None, "warned": False, "fallback": None,
            "hessian_vector_products": products}
    return u, info, failed, meta


def fall_back(trajectory: TrajectoryView, steps: int, v: Params, info: dict[str, Any], reason: str,
              fallback: Optional[str], max_order: int, blocked: Optional[Estimator]
              ) -> tuple[Params, MetaGrads, dict[str, Any]]:
    """Where order='auto' failed for ``reason``: raise :class:`SeriesDivergenceError`
    (``fallback=None``) or warn and run the fallback (``blocked``, the estimator
    ``"blocked"`` stands for, Checkpointed or ``Truncated(max_order)``), merging its report
    into ``info``."""
    advice = "Take fewer inner steps or a smaller step size, or choose another estimator."
    if fallback is None:
        raise SeriesDivergenceError(f"Binomial(order='auto'): {reason}. {advice}")
    if fallback == "blocked":
        assert blocked is not None
        substitute: Estimator = blocked
    elif fallback == "checkpointed":
        substitute = Checkpointed()
    else:
        substitute = Truncated(min(max_order, steps))
    warn_fallback(reason, repr(substitute))
    g, meta, extra = substitute.backward(trajectory, steps, v)
    return g, meta, fell_back(info, repr(substitute), extra, steps)


def warn_fallback(reason: str, substitute: str) -> None:
    """The warning that ``order="auto"`` failed for ``reason`` and falls back to ``substitute`` (its repr)."""
    warn(f"Binomial(order='auto'): {reason}. Falling back to {substitute}.")


def fell_back(info: dict[str, Any], substitute: str, extra: dict[str, Any], steps: int) -> dict[str, Any]:
    """``info`` (of ``order="auto"``, which failed) with the report ``extra`` of the fallback
    ``substitute`` (its repr) merged in."""
    info["fallback"], info["warned"] = substitute, True
    info["hessian_vector_products"] += extra.get("hessian_vector_products", 0)
    info["depth"] += extra.get("depth", steps)
    for key in ("blocks", "orders", "error_estimate"):
        if key in extra:
            info[key] = extra[key]
    return info


def fixed_order_info_tasks(steps: int, order: int, block: Optional[int], g: Params, products: int,
                           spans: list[Span], block_norms: list[BlockNorms], tasks: int) -> dict[str, Any]:
    """:func:`fixed_order_info` of a monitored block over ``tasks`` (each level's norms taken
    per task: ``expand(..., tasks=T)``): each task is judged on its own rows (its level norms,
    its estimate, the vector it expanded against) as its own block would be, and warns naming
    itself, so that one task's larger, converging levels do not hide another's. The keys the
    monitor sets list each task's value; the rest (order, blocks, products) are the block's."""
    reports = []
    for t in range(tasks):
        rows = [([level[t] for level in norms], {n: x[t] for n, x in start.items()}, kept, span)
                for norms, start, kept, span in block_norms]
        reports.append(fixed_order_info(steps, order, block, {n: x[t] for n, x in g.items()}, products,
                                        spans, rows, True, task=t))
    info = dict(reports[0])
    for key in MONITORED:
        info[key] = [report[key] for report in reports]
    info["tasks"] = tasks
    return info


#: The keys of a fixed order's report that its monitor sets (per task in a block over tasks).
MONITORED = ("level_norms", "error_estimate", "diverged", "converged", "warned", "fallback")


def fixed_order_info(steps: int, order: int, block: Optional[int], g: Params, products: int,
                     spans: list[Span], block_norms: list[BlockNorms], monitor: bool,
                     task: Optional[int] = None) -> dict[str, Any]:
    """The report of a fixed order's expansion (blocks and level norms last first, as
    :func:`~metagrad.estimators.binomial_series.expand` returns them); when ``monitor``, also
    its error estimate, with a warning where a block's level norms grew at its last order or
    its error estimate is at least :data:`WARN_ESTIMATE` (naming ``task``, one task of a block
    over tasks, when given)."""
    info: dict[str, Any] = {"steps": steps, "order": order, "depth": sum(
        min(order, b - a) for a, b in spans), "hessian_vector_products": products}
    if block is not None:
        info.update(blocks=[span for span in reversed(spans)],
                    orders=[min(order, b - a) for a, b in reversed(spans)])
    if not monitor:
        return info
    if block is None:
        norms = block_norms[0][0]
        info.update(_report(steps, order, norms, g, products))
    else:
        info.update(level_norms=[norms for norms, _, _, _ in reversed(block_norms)],
                    error_estimate=sum(_estimate(norms, b - a, kept, start)
                                       for norms, start, kept, (a, b) in block_norms),
                    diverged=False, converged=False, fallback=None)
    info["warned"] = False
    for norms, start, kept, (a, b) in block_norms:  # the last block first
        if not 0 < kept < b - a:
            continue  # expanded completely: exact
        ratio = _ratio(norms, start, kept)
        estimate = info["error_estimate"] if block is None else _estimate(norms, b - a, kept, start)
        info["diverged"] = info["diverged"] or ratio >= 1
        if info["warned"] or (ratio < 1 and estimate < WARN_ESTIMATE):
            continue
        info["warned"] = True
        if block is None:
            where, size, relative = "", "K·α·‖H‖", "the estimate"
        else:
            where, size = f" in the block of steps {a}…{b - 1}", "S·α·‖H‖ (S the steps of a block)"
            relative = "the vector the block expanded against"
        if task is not None:
            where += f" for task {task} of the block"
        reason = (f"its level norms grow (‖T_{kept}‖/‖T_{kept - 1}‖ = {ratio:.3g})" if ratio >= 1 else
                  f"its last level is still {estimate:.3g} of {relative} (error estimate ≥ "
                  f"WARN_ESTIMATE = {WARN_ESTIMATE:g})")
        warn(
            f"The binomial series is not converging at order {kept}{where}: {reason}. {size} "
            "is too large for this order, and the result may be far from the exact "
            "meta-gradient. Use Binomial(order='auto') (it falls back to smaller blocks), "
            "smaller blocks (block=S), or Checkpointed() for the exact meta-gradient; or take "
            "fewer inner steps or a smaller step size. Pass monitor=False to silence this warning."
        )
    return info


def _report(steps: int, order: int, norms: list[float], g: Params, products: int) -> dict[str, Any]:
    size = norm(g)
    estimate = norms[-1] / size if norms and size > 0 else 0.0
    return {"steps": steps, "order": order, "depth": order, "level_norms": norms,
            "error_estimate": 0.0 if order == steps else estimate, "diverged": False,
            "converged": False, "warned": False, "fallback": None, "hessian_vector_products": products}


def _estimate(norms: list[float], length: int, order: int, start: Params) -> float:
    """A block's error estimate ``‖T_L‖/‖u‖`` relative to the vector it expanded against
    (0 when the block was expanded completely). Blocks' estimates add."""
    if order >= length or not norms:
        return 0.0
    size = norm(start)
    return norms[-1] / size if size > 0 else 0.0


def _ratio(norms: list[float], v: Params, level: int) -> float:
    """``ρ_j = ‖T_j‖/‖T_{j−1}‖`` with ``T_0 = v``."""
    previous = norms[level - 2] if level >= 2 else norm(v)
    if norms[level - 1] == 0:
        return 0.0
    return norms[level - 1] / previous if previous > 0 else math.inf


#: What one product in a chunk adds to the peak of backward, in units of its step graph's saved
#: bytes (``b``, :meth:`~metagrad.estimators.base.TrajectoryView.graph_bytes`) and of one stored iterate
#: with its optimizer state (``d``): ``GRAPH_FACTOR·b + ITERATE_FACTOR·d``. Measured, not derived
#: (``python -m benchmarks.budget --fit``): tensor memory on a 2-core x86_64 CPU (AMD EPYC), torch
#: 2.13.0, float32, per product 2.5–3.4·b + 6·d (an 8-256-256-1 MLP, where d dominates; small CNNs
#: at 28×28 and 32×32 and a 64-512-1 MLP on 2000 examples, where b does). The ``d`` part is the
#: stacked iterate, its gradient, the next iterate, the product and the replay check's rows.
GRAPH_FACTOR = 3.5
ITERATE_FACTOR = 6.5

#: Vectors the size of the parameters that backward holds besides the level buffer (v, the
#: running estimate, a level's sum, the tight grouping's last row and carry), with a margin.
VECTORS = 4

#: With snapshots, the replay checks of up to this many products queue before they run
#: (:meth:`~metagrad.estimators.base.TrajectoryView.verify`), each holding about ``CHECK_ROWS`` vectors.
CHECK_QUEUE, CHECK_ROWS = 16, 8


def plan_budget(trajectory: TrajectoryView, steps: int, v: Params, budget: int, rows: int,
                snapshots: bool) -> dict[str, Any]:
    """The chunk size that keeps backward's peak within ``budget`` bytes, or a
    :class:`ValueError` that names the smallest budget that would work.

    The peak above the memory the model, the data and the query hold is planned as

        stored iterates + level vectors + c·(GRAPH_FACTOR·b + ITERATE_FACTOR·d)

    with the stored iterates (and optimizer states) as the inner loop left them, plus, with
    snapshots, a block's two recomputed segments; the level vectors ``rows`` (the steps of the
    longest block) plus :data:`VECTORS`, three times ``rows`` with snapshots (one call returns a
    level's rows at once); ``b`` the larger of the first and last step's graph bytes and ``d``
    the bytes of one stored iterate with its state. Returns ``chunk_size`` (at most ``rows``),
    ``step_graph_bytes`` and ``planned_peak_bytes`` (the sum above, for that chunk size)."""
    graph = max(trajectory.graph_bytes(m) for m in {0, steps - 1})  # one graph when K = 1
    vector = sum(t.numel() * t.element_size() for t in v.values())
    held = trajectory.iterate_bytes
    count = trajectory.stored_iterates
    iterate = held // count if count else vector
    vectors = (rows + VECTORS) * vector
    if snapshots:
        held += 2 * rows * iterate
        vectors += 2 * rows * vector + CHECK_QUEUE * CHECK_ROWS * vector
    fixed = held + vectors
    product = int(GRAPH_FACTOR * graph + ITERATE_FACTOR * iterate)
    chunk = min(rows, int((budget - fixed) // product))
    if chunk < 1:
        need = fixed + product
        raise ValueError(
            f"Binomial(max_memory): got {format_bytes(budget)} ({budget} bytes), below what this "
            f"backward needs at K={steps}: the stored iterates take {_mib(held)}, the level vectors "
            f"{_mib(vectors)} and one product at a time {_mib(product)} (from a step graph of "
            f"{_mib(graph)} measured and iterates of {_mib(iterate)}). The smallest budget that "
            f"works here is {need} bytes: pass max_memory='{math.ceil(need / 2**20)}MiB' or more; or "
            "store fewer iterates with Binomial(order, block=S, snapshots=True), or use "
            "Checkpointed(snapshots='sqrt')."
        )
    return {"chunk_size": chunk, "step_graph_bytes": graph, "planned_peak_bytes": fixed + chunk * product}


def _mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


