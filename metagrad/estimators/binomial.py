"""Binomial(L): BinomGBML / BinomMAML, the binomial expansion of (1) truncated at order L.

MATH.md (2)::

    ĝ_L = v + Σ_{l=1}^{L} Σ_{k_1<…<k_l} (−α)^l H_{k_1} H_{k_2} ⋯ H_{k_l} v  =  v + Σ_{j≤L} T_j

This module is the estimator and its interface: its arguments, their checks, and which
piece runs. The series itself (the level and tight groupings, the blocked expansion, η's
terms) is :mod:`metagrad.estimators.binomial_series`; its control (``order="auto"``, the
divergence guard and fallback, the choice of blocks, the ``max_memory`` planning) is
:mod:`metagrad.estimators.binomial_control`, whose names used elsewhere
(:data:`WARN_ESTIMATE`, :func:`plan_budget`, the budget's constants,
:class:`SeriesDivergenceError`) are importable from here too.

The report (``meta.info``) holds ``order``, ``level_norms`` ``[‖T_1‖, …]``,
``error_estimate`` ``‖T_L‖/‖ĝ_L‖`` (the size of the last level kept, relative to
the estimate: a heuristic for the truncation error), ``diverged`` (the level norms grew:
at the last order of a fixed order, in any block; two consecutive orders for ``"auto"``),
``converged``, ``warned`` (this result's accuracy warning was issued: a fixed order's rule
in :mod:`~metagrad.estimators.binomial_control`, or an ``"auto"`` fallback) and ``fallback``
(the estimator that produced the result, or ``None``). In a block over tasks (``tasks=T``) each
task is judged on its own rows, as a block of its own would be: ``order="auto"`` chooses each
task's order, and a monitored fixed order lists each task's level norms, error estimate and
warning under those keys.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch

from ..memory import format_bytes, parse_bytes
from ..snapshots import Schedule
from ..discovery import MetaGrads, add_meta
from ..update_rule import Params
from .base import Estimator, TrajectoryView, beyond_steps, check_count
from .binomial_control import (CHECK_QUEUE, CHECK_ROWS, FALLBACKS, GRAPH_FACTOR, ITERATE_FACTOR,
                               VECTORS, WARN_ESTIMATE, SeriesDivergenceError, auto_blocks, auto_blocks_tasks,
                               auto_order, auto_order_tasks, fall_back, fell_back, fixed_order_info,
                               fixed_order_info_tasks, plan_budget, task_rows,
                               warn_fallback)
from .binomial_series import expand

# Besides the estimator and its error, the names of its control that code imports from here:
# the warning threshold, the fallbacks order="auto" accepts, and the memory budget's planner
# and measured constants.
__all__ = ["Binomial", "SeriesDivergenceError", "WARN_ESTIMATE", "FALLBACKS", "plan_budget",
           "GRAPH_FACTOR", "ITERATE_FACTOR", "VECTORS", "CHECK_QUEUE", "CHECK_ROWS"]


class Binomial(Estimator):
    """The paper's binomial meta-gradient estimator, at a fixed or automatic order,
    optionally expanded within blocks of steps.

    Every step's Hessian enters already at order 1, unlike truncation. The error
    is small when ``K·α·ℓ`` is small (ℓ the largest |eigenvalue| of the inner
    Hessians) and the series diverges once ``K·α·ℓ`` is well above 1: see MATH.md,
    "Where it works, and where it breaks". ``Binomial(0)`` is FirstOrder and
    ``Binomial(K)`` is Truncated(K). An ``order`` larger than K is clamped to K with a
    :class:`MetaGradientWarning`. "Exact" here and below means equal to Full with plain
    gradient descent (any per-parameter step sizes); with an update rule that has state
    (momentum, Adam, AdamW, RMSprop, Adagrad) each step's Jacobian holds the state constant
    (MATH.md, "Optimizers other than plain gradient descent"), an approximation even at
    ``Binomial(K)``: Checkpointed is the exact estimator there.

    The inner loop stores iterates only. Backward runs one batched ``torch.func.vmap``
    call of products ``(J_kᵀ − I) u`` per level over the stored iterates, building the
    step graphs it needs and freeing them. See :mod:`metagrad.estimators.binomial_series`
    for the two groupings and :mod:`metagrad.estimators.binomial_control` for the error
    control.

    **Blocks** (MATH.md, "Beyond the paper: the blocked binomial estimator"). With
    ``block=S`` the K steps are split into blocks of S steps, laid from the last step
    backwards (the first block, the earliest steps, takes the remainder). Each block's
    product is expanded to the order, and the blocks are chained exactly, from the last
    to the first: the vector one block returns is the one the next expands against.
    What decides the accuracy is then ``S·α·ℓ``; the depth is ``⌈K/S⌉·L`` levels.
    ``block=K`` is the plain estimator; ``block=1``, or ``order ≥ block``, is exact.
    ``block="auto"`` (with ``order="auto"``) starts from blocks of K steps and halves the
    block size whenever a block's series diverges or misses ``rtol`` by ``max_order``,
    so every block meets ``rtol`` (blocks of one step are exact).

    **Snapshots.** With an integer ``block=S`` and ``snapshots=True`` the inner loop stores
    only every S-th iterate, ``φ_0, φ_S, φ_2S, …`` (with its optimizer state:
    :mod:`metagrad.snapshots`, a fixed stride), and backward recomputes a block's iterates
    forward from the snapshot before it just before the block's levels run, freeing them when
    the next block no longer needs them. The blocks are laid from the last step, which the
    inner loop does not know yet, so a block straddles at most two segments between
    snapshots, and each segment is recomputed once (K recomputed steps, one forward and
    gradient each). Memory: about ``(K/S + 2S)`` iterates instead of K; the result is the
    same computation, to rounding. Needs an integer ``order`` and ``block``.

    **Memory.** Backward holds the stored iterates, one buffer of S vectors (S the steps of the
    longest block, K without blocks) that each level overwrites in place, a few more vectors,
    and the products of one chunk: each adds about ``GRAPH_FACTOR·b + ITERATE_FACTOR·d``
    (:data:`GRAPH_FACTOR`, :data:`ITERATE_FACTOR`), with ``b`` the bytes its step graph saves
    and ``d`` one iterate's. So ``chunk_size=1`` holds about 2K iterates and one product's
    graph: measured (``python -m benchmarks.budget``, tensor memory, 8-256-256-1 MLP, float32,
    K=200) 411 iterates at its peak. With snapshots one call per level returns the block's rows
    at once: about 3S vectors.

    **Memory budget.** With ``max_memory=B`` each backward first measures one rebuilt step
    graph (:meth:`~metagrad.estimators.base.TrajectoryView.graph_bytes`) and takes the largest chunk
    size that keeps the planned peak (the stored iterates, the level vectors and the chunk's
    products, :func:`plan_budget`) within B. Where no chunk size does, backward is refused
    before any product with a :class:`ValueError` that names the smallest budget that works
    (the stored iterates alone may exceed B: they are known only once the inner loop ran). B
    counts what metagrad holds above the model, the data and the query. Measured on a 2-core
    x86_64 CPU (AMD EPYC), torch 2.13.0, one thread, the 8-256-256-1 MLP at K=200: for
    ``"150MiB"`` the tensor peak was 140 MiB and the process's peak growth 1.1× the budget
    (with ``MALLOC_MMAP_THRESHOLD_=131072``; 1.4× with glibc's default caching). GPU allocators
    have not been measured. ``meta.info`` reports ``chunk_size``, ``step_graph_bytes`` and
    ``planned_peak_bytes``.

    Args:
        order: L, the truncation order (an integer >= 0), or ``"auto"``.
        chunk_size: at most this many step graphs exist at once. ``None`` batches a
            whole level in one call (most memory); ``1`` builds one at a time, each
            product a plain double backward (no vmap).
        max_memory: a memory budget, in bytes or as a string such as ``"2GiB"`` or
            ``"500MB"``, in place of ``chunk_size``: the chunk size is chosen from the stored
            iterates and a measured step graph, or the budget refused (see "Memory budget").
        block: S, the steps per block (an integer >= 1), ``"auto"`` (needs
            ``order="auto"``), or ``None`` (default: one block, the paper's estimator).
        monitor: record the level norms and, for a fixed order, warn when they grow at the
            last order or the error estimate is at least :data:`WARN_ESTIMATE` (in any
            block); with ``False`` a fixed order uses the tight grouping, with the fewest
            products, and never warns.
            ``order="auto"`` always monitors.
        rtol: for ``order="auto"``: stop once ``‖T_j‖ ≤ rtol·‖ĝ_j‖`` (in each block).
        max_order: for ``order="auto"``: at most this many levels (per block).
        fallback: for ``order="auto"`` with ``block=None``, when the series diverges or
            misses ``rtol``: ``"blocked"`` (the default: ``order="auto", block="auto"``),
            ``"checkpointed"`` (exact, sequential), ``"truncated"`` or ``None`` (raise).
        snapshots: store only each S-th iterate and recompute a block's when it runs (see
            "Snapshots" above); needs an integer ``order`` and an integer ``block``.
    """

    def __init__(self, order: Union[int, str] = 2, chunk_size: Optional[int] = None, *,
                 max_memory: Union[int, str, None] = None,
                 block: Union[int, str, None] = None, monitor: bool = True, rtol: float = 1e-3,
                 max_order: int = 8, fallback: Optional[str] = "blocked",
                 snapshots: bool = False) -> None:
        if isinstance(order, str) and order != "auto":
            raise TypeError(f"Binomial(order): expected an integer >= 0 or 'auto', got str {order!r}.")
        if order != "auto":
            check_count(order, "Binomial(order)", minimum=0)
        self.order = order
        self.chunk_size = check_count(chunk_size, "Binomial(chunk_size)", minimum=1, allow_none=True)
        if max_memory is not None and chunk_size is not None:
            raise ValueError(
                f"Binomial(max_memory): give a memory budget or a chunk size, not both; got "
                f"max_memory={max_memory!r} and chunk_size={chunk_size!r}."
            )
        self.max_memory = None if max_memory is None else parse_bytes(max_memory, "Binomial(max_memory)")
        if block == "auto" and order != "auto":
            raise ValueError("Binomial(block): block='auto' chooses blocks for an error target, so it "
                             f"needs order='auto'; got order={order!r}. Pass an integer block instead.")
        if block != "auto":
            check_count(block, "Binomial(block)", minimum=1, allow_none=True)
        self.block = block
        self.monitor = bool(monitor) or order == "auto"
        if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not (0 < rtol < math.inf):
            raise ValueError(f"Binomial(rtol): expected a finite float > 0, got {rtol!r}.")
        self.rtol = float(rtol)
        self.max_order = check_count(max_order, "Binomial(max_order)", minimum=1)
        if fallback not in FALLBACKS:
            raise ValueError(
                f"Binomial(fallback): expected one of {FALLBACKS}, got {fallback!r}."
            )
        self.fallback = fallback
        if not isinstance(snapshots, bool):
            raise TypeError(f"Binomial(snapshots): expected True or False, got "
                            f"{type(snapshots).__name__} {snapshots!r}.")
        if snapshots and (isinstance(block, str) or block is None or order == "auto"):
            raise ValueError(
                "Binomial(snapshots): snapshots are laid at the stride of the blocks, so they need an "
                f"integer order and an integer block; got order={order!r}, block={block!r}. Pass "
                "e.g. Binomial(order=2, block=20, snapshots=True)."
            )
        self.snapshots = snapshots

    def why_not_pure(self, traced: bool = True) -> Optional[str]:
        if not traced:  # called directly: level norms and graph sizes are read back as Python numbers
            return super().why_not_pure(traced)
        if self.max_memory is not None:
            return ("Binomial(max_memory=...) is not supported by meta_grad under torch.func.vmap, "
                    "torch.func.grad or torch.compile: it measures a step's graph (the bytes its saved "
                    "tensors take) to choose its chunk size, which they cannot trace. Call meta_grad "
                    "directly (a meta-batch by tasks=T), or pass chunk_size=... instead.")
        if self.order == "auto":
            return ("Binomial(order='auto') is not supported by meta_grad under torch.func.vmap, "
                    "torch.func.grad or torch.compile: it chooses its order (and its blocks) from "
                    "level norms read back as Python floats, which they cannot trace. Call meta_grad "
                    "directly (a meta-batch by tasks=T, compiled by compile=True), or use a fixed "
                    "order with monitor=False, e.g. mg.Binomial(order=2, monitor=False).")
        if self.monitor:
            return (f"{self!r} monitors its level norms (monitor=True, the default), "
                    "which reads them back as Python floats (.item()): that fails under "
                    "torch.func.vmap and breaks torch.compile's graph. Pass monitor=False, e.g. "
                    f"mg.Binomial(order={self.order}, monitor=False).")
        return super().why_not_pure(traced)

    def snapshot_schedule(self) -> Optional[Schedule]:
        # (snapshots need an integer block: __init__)
        return Schedule(stride=self.block) if self.snapshots and isinstance(self.block, int) else None

    def length_warning(self, steps: int) -> Optional[str]:
        return None if isinstance(self.order, str) else beyond_steps(self.order, steps, "Binomial", "order")

    def __repr__(self) -> str:
        block = "" if self.block is None else f", block={self.block!r}"
        chunk = (f"chunk_size={self.chunk_size}" if self.max_memory is None
                 else f"max_memory={format_bytes(self.max_memory)!r}")
        if self.order == "auto":
            return (f"Binomial(order='auto'{block}, {chunk}, rtol={self.rtol}, "
                    f"max_order={self.max_order}, fallback={self.fallback!r})")
        monitor = "" if self.monitor else ", monitor=False"
        snapshots = ", snapshots=True" if self.snapshots else ""
        return f"Binomial(order={self.order}{block}, {chunk}{monitor}{snapshots})"

    def backward(self, trajectory: TrajectoryView, steps: int, v: Params
                 ) -> tuple[Params, MetaGrads, dict[str, Any]]:
        chunk, budget = self.chunk_size, {}
        if self.max_memory is not None and steps > 0:
            rows = steps if not isinstance(self.block, int) else min(self.block, steps)
            budget = plan_budget(trajectory, steps, v, self.max_memory, rows, self.snapshots)
            chunk = budget["chunk_size"]
        if self.order == "auto" and trajectory.tasks is not None:
            g, meta, info = self._each_task(trajectory, trajectory.tasks, steps, v, chunk)
        else:
            g, meta, info = self._backward(trajectory, steps, v, chunk)
        return g, meta, {**info, **budget}

    def _each_task(self, trajectory: TrajectoryView, tasks: int, steps: int, v: Params,
                   chunk: Optional[int]) -> tuple[Params, MetaGrads, dict[str, Any]]:
        """``order="auto"`` in a block over ``tasks``: each task chooses its own order (and its
        blocks, its fallback) from its own level norms, as a block of its own would. The block's
        step acts on each task's rows alone (its Hessian is block-diagonal over the tasks), so
        the series of ``v`` with every other task's rows zero is task t's; its rows of the
        result are task t's meta-gradient, and its η products task t's part of η's.

        Without blocks, one pass takes the levels for every task at once, each task stopping on
        its own rows, with η's terms each task's own at its order (and one more pass where a task
        failed: :func:`~metagrad.estimators.binomial_control.auto_order_tasks`); with blocks,
        every task's blocks at once, each its own
        (:func:`~metagrad.estimators.binomial_control.auto_blocks_tasks`). The tasks whose series
        failed fall back each on its own rows, the blocked fallback of them all at once.
        ``meta.info`` lists each task's report under every key but ``steps``;
        ``hessian_vector_products`` counts every product taken."""
        joint: list[Optional[tuple[Params, dict[str, Any], Optional[str]]]] = [None] * tasks
        products = 0
        meta: MetaGrads = []
        if steps > 0 and (self.block is None or (isinstance(self.block, int) and self.block >= steps)):
            found_all, meta, products = auto_order_tasks(trajectory, steps, v, self.rtol, self.max_order,
                                                         chunk, tasks)
            joint = list(found_all)
        elif steps > 0:  # blocks: every task's at once, each its own
            shrink = self.block == "auto"
            g_all, infos, failures, meta, products = auto_blocks_tasks(
                trajectory, steps, v, self.rtol, self.max_order, chunk, list(range(tasks)),
                size=self.block if isinstance(self.block, int) else None, shrink=shrink)
            joint = [({n: x[t] for n, x in g_all.items()}, infos[t],
                      _block_failure(failures[t], infos[t]["diverged"]) if t in failures else None)
                     for t in range(tasks)]
        failed = {t: str(found[2]) for t, found in enumerate(joint) if found is not None and found[2] is not None}
        # The blocked fallback of every failed task at once: its estimate and each task's report.
        substitute: str = ""
        fallen: Params = {}
        fallen_infos: dict[int, dict[str, Any]] = {}
        if failed and self.fallback == "blocked":
            substitute = repr(Binomial("auto", chunk, block="auto", rtol=self.rtol, max_order=self.max_order))
            for t, reason in failed.items():
                warn_fallback(f"for task {t} of the block, {reason}", substitute)
            fallen, fallen_infos, _, more, used = auto_blocks_tasks(trajectory, steps, v, self.rtol,
                                                                    self.max_order, chunk, list(failed))
            meta, products = add_meta(meta, more), products + used
        rows: dict[str, list[torch.Tensor]] = {n: [] for n in v}
        reports = []
        for t in range(tasks):
            found = joint[t]
            if found is not None and (found[2] is None or t in fallen_infos):  # its rows are found
                if found[2] is None:  # converged in the joint pass
                    estimate, report = found[0], found[1]
                else:  # fell back to the blocked expansion, with the other failed tasks
                    estimate = {n: x[t] for n, x in fallen.items()}
                    report = fell_back(found[1], substitute, fallen_infos[t], steps)
                for n in rows:
                    rows[n].append(estimate[n])
                reports.append(report)
                continue
            alone = task_rows(v, [t])  # v with every other task's rows zero
            if found is not None:  # failed in the joint pass: its fallback, on its rows alone
                g, more, info = self._fall_back(trajectory, steps, alone, chunk, found[1], str(found[2]), t)
            else:
                g, more, info = self._backward(trajectory, steps, alone, chunk, task=t)
            for n in rows:
                rows[n].append(g[n][t])
            meta = add_meta(meta, more)
            reports.append(info)
        info = {key: [report.get(key) for report in reports]
                for key in dict.fromkeys(k for report in reports for k in report) if key != "steps"}
        info.update(steps=steps, tasks=tasks, hessian_vector_products=products + sum(
            report.get("hessian_vector_products", 0) for report in reports))
        return {n: torch.stack(r) for n, r in rows.items()}, meta, info

    def _backward(self, trajectory: TrajectoryView, steps: int, v: Params,
                  chunk: Optional[int], task: Optional[int] = None) -> tuple[Params, MetaGrads, dict[str, Any]]:
        if self.order == "auto":
            if self.block == "auto":
                g, info, _, meta = auto_blocks(trajectory, steps, v, steps, self.rtol, self.max_order,
                                               chunk, shrink=True)
                return g, meta, info
            return self._auto(trajectory, steps, v, chunk, task)
        fixed, block = self.order, self.block
        assert isinstance(fixed, int) and not isinstance(block, str)  # block="auto" needs order="auto"
        order = min(fixed, steps)
        tasks = trajectory.tasks if self.monitor else None  # over tasks, each is judged on its own
        u, meta, products, spans, block_norms = expand(
            trajectory, steps, v, order, block, chunk,
            grouping_levels=bool(self.monitor or trajectory.meta),  # η needs the adjoint at every step
            piecewise=not self.snapshots, measured=bool(self.monitor), tasks=tasks)
        if tasks is not None:
            return u, meta, fixed_order_info_tasks(steps, order, block, u, products, spans, block_norms, tasks)
        return u, meta, fixed_order_info(steps, order, block, u, products, spans, block_norms, self.monitor)

    def _auto(self, trajectory: TrajectoryView, steps: int, v: Params, chunk: Optional[int],
              task: Optional[int] = None) -> tuple[Params, MetaGrads, dict[str, Any]]:
        if isinstance(self.block, int) and self.block < steps:  # fixed blocks: every one must converge
            g, info, failed, meta = auto_blocks(trajectory, steps, v, self.block, self.rtol,
                                                self.max_order, chunk, shrink=False)
            if failed is None:
                return g, meta, info
            reason = _block_failure(failed, info["diverged"])
        else:
            g, meta, info, failure = auto_order(trajectory, steps, v, self.rtol, self.max_order, chunk)
            if failure is None:
                return g, meta, info
            reason = failure
        return self._fall_back(trajectory, steps, v, chunk, info, reason, task)

    def _fall_back(self, trajectory: TrajectoryView, steps: int, v: Params, chunk: Optional[int],
                   info: dict[str, Any], reason: str, task: Optional[int] = None
                   ) -> tuple[Params, MetaGrads, dict[str, Any]]:
        """The fallback of ``order="auto"`` where it failed for ``reason`` (the warning names
        the task of a block over tasks; there, :meth:`_each_task` runs the blocked fallback of
        every failed task at once, and this one the others)."""
        if task is not None:
            reason = f"for task {task} of the block, {reason}"
        blocked = (Binomial("auto", chunk, block="auto", rtol=self.rtol, max_order=self.max_order)
                   if self.fallback == "blocked" else None)
        return fall_back(trajectory, steps, v, info, reason, self.fallback, self.max_order, blocked)


def _block_failure(span: tuple[int, int], diverged: bool) -> str:
    """Why ``order="auto"`` with fixed blocks failed in the block ``span``."""
    return f"in the block of steps {span[0]}…{span[1] - 1}, the series " + ("diverges" if diverged else "misses rtol")

