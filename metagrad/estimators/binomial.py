"""Binomial(L): BinomGBML / BinomMAML, the binomial expansion of (1) truncated at order L.

MATH.md (2)::

    ĝ_L = v + Σ_{l=1}^{L} Σ_{k_1<…<k_l} (−α)^l H_{k_1} H_{k_2} ⋯ H_{k_l} v  =  v + Σ_{j≤L} T_j

computed in L levels, each one batched call of Hessian-vector products over the
stored iterates (MATH.md, "Computing (2) in L parallel levels"), in one of its two
groupings:

- the level grouping (``monitor=True``, the default): level j computes
  ``a^{(j)}_k = B_k Σ_{k'>k} a^{(j−1)}_{k'}`` for k = 0 … K−j, with ``B_k = J_kᵀ − I``
  (``−αH_k`` for SGD) and ``a^{(0)} = v``. Its sum is ``T_j``, the order-j part of (2),
  so the level norms ``‖T_j‖`` come for free: they are the error signal (MATH.md,
  "Where it works, and where it breaks"). ``Σ_j (K−j+1)`` products.
- the tight grouping (``monitor=False``): at level t the window of iterates
  ``φ_{L−1−t} … φ_{K−1−t}``, ``L(K−L+1)`` products, the fewest; it records no norm.

Error control. With ``ρ_j = ‖T_j‖/‖T_{j−1}‖`` (``T_0 = v``):

- ``order="auto"`` adds levels until ``‖T_j‖ ≤ rtol·‖ĝ_j‖`` (converged), until
  ``min(max_order, K)`` levels (at K the result is exact), or until the terms grow
  at two consecutive levels (``ρ_{j−1} ≥ 1`` and ``ρ_j ≥ 1``: diverging). Diverging,
  or stopping at ``max_order`` above ``rtol``, issues a warning and runs the
  fallback: ``"blocked"`` (the default: ``Binomial(order="auto", block="auto")``, which
  halves the blocks until every block meets ``rtol``; blocks of one step are exact),
  ``"checkpointed"`` (exact, sequential), ``"truncated"`` (``Truncated(max_order)``) or
  ``None`` (raise :class:`SeriesDivergenceError`). ``MetaGradient(estimator="binomial")``
  is ``Binomial(order="auto")`` with this default fallback.
- A fixed ``order=L`` computes (2) exactly as asked and, when monitored, warns if
  ``ρ_L ≥ 1`` (the series was cut where its terms were not shrinking) or if the error
  estimate ``‖T_L‖/‖ĝ_L‖`` is at least :data:`WARN_ESTIMATE` (the last level kept is still
  large). With blocks, both are checked block by block, the estimate relative to the vector
  the block expanded against. The threshold is measured (``benchmarks/binomial_sweep.py``,
  docs/binomial_sweep.md): of 4476 fixed-order results (L = 1…4) on sinusoid MLPs and a
  5-way 1-shot CNN4, float64, all 2688 that were more than 30% off the exact meta-gradient
  warn (the growth rule alone: 77%), and 9 of the 1257 less than 5% off (0.7%).

Schedule. The levels batch the products of many steps in one call, so a level costs
one round of products however many steps it spans, on hardware with room for them side by
side. Reusing each rebuilt step graph for all L orders instead (one graph per step, the L
vectors in one batched double backward, the K steps one after another) was measured on
a 2-core x86_64 CPU (AMD EPYC), torch 2.13.0, in float64, K = 20, L = 3: 1.0 s against the levels' 1.4 s at 28×28 (CNN4),
26 ms against 10 ms on the 1-40-40-1 MLP, and slower than Checkpointed's 0.49 s in both. It
gives up the batching across steps that the estimator exists for, so it is not used.

The report (``meta.info``) holds ``order``, ``level_norms`` ``[‖T_1‖, …]``,
``error_estimate`` ``‖T_L‖/‖ĝ_L‖`` (the size of the last level kept, relative to
the estimate: a heuristic for the truncation error), ``diverged`` (the level norms grew:
at the last order of a fixed order, in any block; two consecutive orders for ``"auto"``),
``converged``, ``warned`` (this result's accuracy warning was issued: a fixed order's rule
above, or an ``"auto"`` fallback) and ``fallback`` (the estimator that produced the result,
or ``None``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Optional, Union

import torch

from ..linalg import norm
from ..memory import parse_bytes
from ..update_rule import Params
from ..snapshots import Schedule
from ..trajectory import MetaGrads, Trajectory, add_meta
from .base import Estimator, check_count, clamp_to_steps, warn
from .checkpointed import Checkpointed
from .truncated import Truncated

__all__ = ["Binomial", "SeriesDivergenceError"]

FALLBACKS = ("blocked", "checkpointed", "truncated", None)

#: A monitored fixed order warns when its error estimate ``‖T_L‖/‖ĝ_L‖`` (per block: relative
#: to the vector the block expanded against) is at least this. Measured, not derived
#: (docs/binomial_sweep.md): the largest threshold that caught every sweep result more than
#: 30% off was 0.47, rounded down.
WARN_ESTIMATE = 0.4


class SeriesDivergenceError(ArithmeticError):
    """The binomial series diverged (or missed ``rtol``) and ``fallback=None`` was asked for."""


class Binomial(Estimator):
    """The paper's binomial meta-gradient estimator, at a fixed or automatic order,
    optionally expanded within blocks of steps.

    Every step's Hessian enters already at order 1, unlike truncation. The error
    is small when ``K·α·ℓ`` is small (ℓ the largest |eigenvalue| of the inner
    Hessians) and the series diverges once ``K·α·ℓ`` is well above 1: see MATH.md,
    "Where it works, and where it breaks". ``Binomial(0)`` is FirstOrder and
    ``Binomial(K)`` is exact. An ``order`` larger than K is clamped to K with a
    :class:`MetaGradientWarning` (the result is then exact).

    The inner loop stores iterates only. Backward runs one batched ``torch.func.vmap``
    call of products ``(J_kᵀ − I) u`` per level over the stored iterates, building the
    step graphs it needs and freeing them. See the module docstring for the two
    groupings and the error control.

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
    graph (:meth:`~metagrad.trajectory.Trajectory.graph_bytes`) and takes the largest chunk
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

    def why_not_pure(self) -> Optional[str]:
        if self.order == "auto":
            return ("Binomial(order='auto') is not supported by meta_grad: it chooses its "
                    "order (and its blocks) from level norms read back as Python floats, which "
                    "torch.func.vmap and torch.compile cannot trace. Use a fixed order with "
                    "monitor=False, e.g. mg.Binomial(order=2, monitor=False).")
        if self.max_memory is not None:
            return ("Binomial(max_memory=...) is not supported by meta_grad: it measures a "
                    "rebuilt step graph to choose its chunk size. Pass chunk_size=... instead.")
        if self.monitor:
            return (f"{self!r} monitors its level norms (monitor=True, the default), "
                    "which reads them back as Python floats (.item()): that fails under "
                    "torch.func.vmap and breaks torch.compile's graph. Pass monitor=False, e.g. "
                    f"mg.Binomial(order={self.order}, monitor=False).")
        return super().why_not_pure()

    def snapshot_schedule(self) -> Optional[Schedule]:
        return Schedule(stride=self.block) if self.snapshots else None  # type: ignore[arg-type]

    def __repr__(self) -> str:
        block = "" if self.block is None else f", block={self.block!r}"
        chunk = (f"chunk_size={self.chunk_size}" if self.max_memory is None
                 else f"max_memory={_format_bytes(self.max_memory)!r}")
        if self.order == "auto":
            return (f"Binomial(order='auto'{block}, {chunk}, rtol={self.rtol}, "
                    f"max_order={self.max_order}, fallback={self.fallback!r})")
        monitor = "" if self.monitor else ", monitor=False"
        snapshots = ", snapshots=True" if self.snapshots else ""
        return f"Binomial(order={self.order}{block}, {chunk}{monitor}{snapshots})"

    def backward(self, trajectory: Trajectory, steps: int, v: Params
                 ) -> tuple[Params, MetaGrads, dict[str, Any]]:
        chunk, budget = self.chunk_size, {}
        if self.max_memory is not None and steps > 0:
            rows = steps if not isinstance(self.block, int) else min(self.block, steps)
            budget = plan_budget(trajectory, steps, v, self.max_memory, rows, self.snapshots)
            chunk = budget["chunk_size"]
        g, meta, info = self._backward(trajectory, steps, v, chunk)
        return g, meta, {**info, **budget}

    def _backward(self, trajectory: Trajectory, steps: int, v: Params,
                  chunk: Optional[int]) -> tuple[Params, MetaGrads, dict[str, Any]]:
        if self.order == "auto":
            if self.block == "auto":
                g, info, _, meta = _auto_blocks(trajectory, steps, v, steps, self.rtol, self.max_order,
                                                chunk, shrink=True)
                return g, meta, info
            return self._auto(trajectory, steps, v, chunk)
        order = clamp_to_steps(self.order, steps, "Binomial", "order")  # type: ignore[arg-type]
        spans = _spans(steps, self.block)  # type: ignore[arg-type]
        u, products, block_norms, meta = dict(v), 0, [], []
        for span in spans:
            kept = min(order, span[1] - span[0])
            trajectory.restore(*span)  # with snapshots: recompute the block's iterates, once
            if self.monitor or trajectory.meta:  # η needs the adjoint at every step: levels
                u_next, norms, used, _, more = _levels(trajectory, span, u, kept, chunk,
                                                       piecewise=not self.snapshots)
                block_norms.append((norms, u, kept, span))
                meta = add_meta(meta, more)
            else:
                u_next, used = _tight(trajectory, span, u, kept, chunk, piecewise=not self.snapshots)
            u, products = u_next, products + used
        info: dict[str, Any] = {"steps": steps, "order": order, "depth": sum(
            min(order, b - a) for a, b in spans), "hessian_vector_products": products}
        if self.block is not None:
            info.update(blocks=[span for span in reversed(spans)],
                        orders=[min(order, b - a) for a, b in reversed(spans)])
        if not self.monitor:
            return u, meta, info
        if self.block is None:
            norms = block_norms[0][0]
            info.update(_report(steps, order, norms, u, products))
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
            estimate = info["error_estimate"] if self.block is None else _estimate(norms, b - a, kept, start)
            info["diverged"] = info["diverged"] or ratio >= 1
            if info["warned"] or (ratio < 1 and estimate < WARN_ESTIMATE):
                continue
            info["warned"] = True
            if self.block is None:
                where, size, relative = "", "K·α·‖H‖", "the estimate"
            else:
                where, size = f" in the block of steps {a}…{b - 1}", "S·α·‖H‖ (S the steps of a block)"
                relative = "the vector the block expanded against"
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
        return u, meta, info

    def _auto(self, trajectory: Trajectory, steps: int, v: Params,
              chunk: Optional[int]) -> tuple[Params, MetaGrads, dict[str, Any]]:
        limit = min(self.max_order, steps)
        if self.block is not None and self.block < steps:  # fixed blocks: every one must converge
            g, info, failed, meta = _auto_blocks(trajectory, steps, v, self.block, self.rtol,  # type: ignore[arg-type]
                                                 self.max_order, chunk, shrink=False)
            if failed is None:
                return g, meta, info
            reason = (f"in the block of steps {failed[0]}…{failed[1] - 1}, the series "
                      + ("diverges" if info["diverged"] else "misses rtol"))
            return self._fall_back(trajectory, steps, v, info, reason, chunk)
        g, norms, products, stop, meta = _levels(trajectory, (0, steps), v, limit, chunk, rtol=self.rtol)
        order = len(norms)
        info = _report(steps, order, norms, g, products)
        if stop == "converged" or order == steps:
            info["converged"] = True
            return g, meta, info
        info["diverged"] = stop == "diverged"
        reason = ("the level norms grew at two consecutive orders: the binomial series is "
                  "diverging, because K·α·‖H‖ is too large" if stop == "diverged" else
                  f"max_order={self.max_order} levels left an error estimate of "
                  f"{info['error_estimate']:.3g}, above rtol={self.rtol:g}")
        return self._fall_back(trajectory, steps, v, info, reason, chunk)

    def _fall_back(self, trajectory: Trajectory, steps: int, v: Params, info: dict[str, Any],
                   reason: str, chunk: Optional[int]) -> tuple[Params, MetaGrads, dict[str, Any]]:
        advice = "Take fewer inner steps or a smaller step size, or choose another estimator."
        if self.fallback is None:
            raise SeriesDivergenceError(f"Binomial(order='auto'): {reason}. {advice}")
        if self.fallback == "blocked":
            substitute: Estimator = Binomial("auto", chunk, block="auto", rtol=self.rtol,
                                             max_order=self.max_order)
        elif self.fallback == "checkpointed":
            substitute = Checkpointed()
        else:
            substitute = Truncated(min(self.max_order, steps))
        warn(f"Binomial(order='auto'): {reason}. Falling back to {substitute!r}.")
        g, meta, extra = substitute.backward(trajectory, steps, v)
        info["fallback"], info["warned"] = repr(substitute), True
        info["hessian_vector_products"] += extra.get("hessian_vector_products", 0)
        info["depth"] += extra.get("depth", steps)
        for key in ("blocks", "orders", "error_estimate"):
            if key in extra:
                info[key] = extra[key]
        return g, meta, info


#: What one product in a chunk adds to the peak of backward, in units of its step graph's saved
#: bytes (``b``, :meth:`~metagrad.trajectory.Trajectory.graph_bytes`) and of one stored iterate
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
#: (:meth:`~metagrad.trajectory.Trajectory.verify`), each holding about ``CHECK_ROWS`` vectors.
CHECK_QUEUE, CHECK_ROWS = 16, 8


def plan_budget(trajectory: Trajectory, steps: int, v: Params, budget: int, rows: int,
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
            f"Binomial(max_memory): got {_format_bytes(budget)} ({budget} bytes), below what this "
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


def _format_bytes(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"


def _auto_blocks(trajectory: Trajectory, steps: int, v: Params, size: int, rtol: float,
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
    u, last, meta = dict(v), steps, []
    spans, orders, all_norms = [], [], []
    products, depth, estimate, attempts = 0, 0, 0.0, 0
    failed: Optional[Span] = None
    diverged = False
    while last > 0:
        span = (max(0, last - size), last)
        length = span[1] - span[0]
        u_next, norms, used, stop, more = _levels(trajectory, span, u, min(max_order, length),
                                                  chunk_size, rtol=rtol)
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


Span = tuple[int, int]  # the steps [first, last) of a block


def _levels(trajectory: Trajectory, span: Span, v: Params, order: int, chunk_size: Optional[int],
            *, rtol: Optional[float] = None, piecewise: bool = True
            ) -> tuple[Params, list[float], int, str, MetaGrads]:
    """The level grouping over the steps of ``span``: their expansion applied to ``v``, the
    level norms ``[‖T_1‖, …]``, the number of products, why it stopped, and the η-gradient.

    With ``rtol``, stops early once ``‖T_j‖ ≤ rtol·‖ĝ_j‖`` ("converged") or after two
    consecutive levels whose norms grew ("diverged"); otherwise after ``order`` levels
    ("limit").

    Memory: one buffer of ``S`` vectors (S the steps of the span), overwritten level by level.
    Row k of level j is first the product ``a^{(j)}_k = (J_kᵀ − I) S^{(j−1)}_{k+1}``, whose input
    is row k+1 of the level before (read before row k is written, the chunks running forwards),
    then, after the level, the suffix sum ``S^{(j)}_k = Σ_{k' ≥ k} a^{(j)}_{k'}`` in place, so
    ``T_j`` is row 0 (see :func:`_products` for ``piecewise``).

    η (MATH.md, "Computing it"): level j's products are taken at the vectors
    ``S^{(j−1)}_{k+1}``, the order-(j−1) part of the adjoint after step k, so the same call
    gives ``Σ_k B_kᵀ S^{(j−1)}_{k+1}``: the mixed part at order j and the step-size part at
    order j−1. The step-size part at the last order L, ``Σ_k B_kᵀ S^{(L)}_{k+1}`` with the
    gradients held constant, is one more call without second derivatives.
    """
    first, last = span
    g = dict(v)
    norms: list[float] = []
    products = 0
    meta: MetaGrads = []
    stop = "limit"
    rows = 0
    buffer: Params = {}
    for level in range(1, order + 1):
        rows = last - first - level + 1  # a^{(j)}_k vanishes for the last j−1 steps
        if level == 1:  # level 1 multiplies v at every step
            inputs = {n: t.unsqueeze(0).expand(rows, *t.shape) for n, t in v.items()}
            buffer = {n: t.new_empty((rows, *t.shape)) for n, t in v.items()}
        else:  # row k multiplies S^{(j−1)}_{k+1}: the next row of the level before
            inputs = {n: t[1:rows + 1] for n, t in buffer.items()}
        for a, b, pulled, more in _products(trajectory, first, inputs, chunk_size, piecewise):
            meta = add_meta(meta, more)
            for n, t in buffer.items():  # (J_kᵀ − I) u = −α H_k u for SGD
                t[a:b].copy_(pulled[n].sub_(inputs[n][a:b]))
            del pulled
        products += rows
        _suffix_sum_(buffer, rows, rows if chunk_size is None else chunk_size)
        level_sum = {n: t[0] for n, t in buffer.items()}  # T_j
        g = {n: g[n] + level_sum[n] for n in g}
        norms.append(norm(level_sum))
        if rtol is not None:
            if norms[-1] <= rtol * norm(g):
                stop = "converged"
            elif level >= 2 and _ratio(norms, v, level) >= 1 and _ratio(norms, v, level - 1) >= 1:
                stop = "diverged"
        if stop != "limit" or level == order:
            break
    if trajectory.meta and order > 0:  # the step-size part at the last order kept
        for i in range(rows - 1):
            _, more, _ = trajectory.vjp(first + i, {n: t[i + 1] for n, t in buffer.items()},
                                        second_order=False)
            meta = add_meta(meta, more)
    elif trajectory.meta:  # order 0: FirstOrder's step-size part
        for m in range(first, last):
            _, more, _ = trajectory.vjp(m, v, second_order=False)
            meta = add_meta(meta, more)
    return g, norms, products, stop if order > 0 else "limit", meta


def _tight(trajectory: Trajectory, span: Span, v: Params, order: int,
           chunk_size: Optional[int], *, piecewise: bool = True) -> tuple[Params, int]:
    """The tight grouping over ``span``: its expansion in ``L(S−L+1)`` products, no norms.

    At level t the window of iterates φ_{L−1−t} … φ_{S−1−t} of the block; row i holds the
    partial sums over subsets of {window[i], …, last−1} of size ≤ t+1, and becomes
    ``rows[last] + Σ_{i' ≥ i} (P_{i'} − rows[i'])`` with ``P_i`` its product. One buffer of
    ``S−L+1`` vectors, overwritten in place: the chunks run backwards, carrying the sum of
    the differences after them, so a row is written only after its product was taken."""
    if order == 0:
        return dict(v), 0
    first, last = span
    width = last - first - order + 1
    inputs = {n: t.unsqueeze(0).expand(width, *t.shape) for n, t in v.items()}
    buffer = {n: t.new_empty((width, *t.shape)) for n, t in v.items()}
    for level in range(order):
        start = first + order - 1 - level
        tail = {n: t[-1].clone() for n, t in inputs.items()}
        carry: Optional[Params] = None
        for a, b, pulled, _ in _products(trajectory, start, inputs, chunk_size, piecewise,  # no η here
                                         backwards=True):
            sums = {}
            for n, t in buffer.items():
                summed = _suffix_sum(pulled[n].sub_(inputs[n][a:b]))
                if carry is not None:
                    summed += carry[n]
                sums[n] = summed[0].clone()
                t[a:b].copy_(summed.add_(tail[n]))
            carry = sums
            del pulled
        inputs = buffer
    return {n: t[0].clone() for n, t in buffer.items()}, order * width


def _products(trajectory: Trajectory, first: int, vectors: Params, chunk_size: Optional[int],
              piecewise: bool, *, backwards: bool = False
              ) -> Iterator[tuple[int, int, Params, MetaGrads]]:
    """``(a, b, J_mᵀ u_i, Σ B_mᵀ u_i)`` for the rows ``a … b−1`` of ``vectors`` (row i at step
    ``first + i``), chunk by chunk (the last chunk first with ``backwards``).

    ``piecewise``: one :meth:`~metagrad.trajectory.Trajectory.batched_vjp` call per chunk, so
    only a chunk's products and results exist at once, and the queued replay checks of a chunk
    run before the next one (:meth:`~metagrad.trajectory.Trajectory.verify`). Otherwise (the
    iterates are recomputed from snapshots: one call restores them once) one call for all the
    rows, which chunks them itself and returns all the rows at once."""
    rows = next(iter(vectors.values())).shape[0]
    if not piecewise or chunk_size is None or chunk_size >= rows:
        bounds = [(0, rows)]
    else:
        bounds = [(a, min(a + chunk_size, rows)) for a in range(0, rows, chunk_size)]
    for a, b in reversed(bounds) if backwards else bounds:
        pulled, meta = trajectory.batched_vjp(list(range(first + a, first + b)),
                                              {n: t[a:b] for n, t in vectors.items()}, chunk_size)
        if piecewise:
            trajectory.verify()
        yield a, b, pulled, meta


def _spans(steps: int, block: Optional[int]) -> list[Span]:
    """Blocks of ``block`` steps laid from the last step backwards; the first block (the
    earliest steps) takes the remainder. Returned in backward order, last block first."""
    size = steps if block is None else block
    spans = []
    last = steps
    while last > 0:
        spans.append((max(0, last - size), last))
        last -= size
    return spans


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



def _suffix_sum(x: torch.Tensor) -> torch.Tensor:
    """``out[i] = Σ_{i' ≥ i} x[i']`` along the first dimension."""
    return x.flip(0).cumsum(0).flip(0)


def _suffix_sum_(buffer: Params, rows: int, piece: int) -> None:
    """``buffer[i] ← Σ_{i ≤ i' < rows} buffer[i']`` in place, in pieces of ``piece`` rows from the
    last (at most about ``2·piece`` vectors of scratch at once)."""
    carry: Optional[Params] = None
    for b in range(rows, 0, -piece):
        a = max(0, b - piece)
        for n, t in buffer.items():
            summed = _suffix_sum(t[a:b])
            if carry is not None:
                summed += carry[n]
            t[a:b].copy_(summed)
        carry = {n: t[a] for n, t in buffer.items()}
