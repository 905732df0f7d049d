"""The binomial series itself: MATH.md (2), computed in levels, within blocks chained exactly.

MATH.md (2)::

    ĝ_L = v + Σ_{l=1}^{L} Σ_{k_1<…<k_l} (−α)^l H_{k_1} H_{k_2} ⋯ H_{k_l} v  =  v + Σ_{j≤L} T_j

computed in L levels, each one batched call of Hessian-vector products over the
stored iterates (MATH.md, "Computing (2) in L parallel levels"), in one of its two
groupings:

- the level grouping (:func:`levels`; ``monitor=True``, the default, and wherever η is
  asked for): level j computes ``a^{(j)}_k = B_k Σ_{k'>k} a^{(j−1)}_{k'}`` for k = 0 … K−j,
  with ``B_k = J_kᵀ − I`` (``−αH_k`` for SGD) and ``a^{(0)} = v``. Its sum is ``T_j``, the
  order-j part of (2), so the level norms ``‖T_j‖`` come for free: they are the error signal
  (MATH.md, "Where it works, and where it breaks"). ``Σ_j (K−j+1)`` products. It also gives
  η's terms (MATH.md, "Computing it").
- the tight grouping (:func:`tight`; ``monitor=False``): at level t the window of iterates
  ``φ_{L−1−t} … φ_{K−1−t}``, ``L(K−L+1)`` products, the fewest; it records no norm.

Blocks (MATH.md, "Beyond the paper: the blocked binomial estimator", :func:`expand`): the
steps are split into blocks laid from the last step backwards (:func:`spans`), each block's
product is expanded to the order, and the blocks are chained exactly, the vector one block
returns being the one the next expands against.

This module computes; it decides nothing. When to stop adding levels, which blocks to use,
what to warn about and how large a chunk may be are the estimator's control
(:mod:`metagrad.estimators.binomial_control`), which passes its stopping rule in as a
:data:`Guard`.

Schedule. The levels batch the products of many steps in one call, so a level costs
one round of products however many steps it spans, on hardware with room for them side by
side. Reusing each rebuilt step graph for all L orders instead (one graph per step, the L
vectors in one batched double backward, the K steps one after another) was measured on
a 2-core x86_64 CPU (AMD EPYC), torch 2.13.0, in float64, K = 20, L = 3: 1.0 s against the levels' 1.4 s at 28×28 (CNN4),
26 ms against 10 ms on the 1-40-40-1 MLP, and slower than Checkpointed's 0.49 s in both. It
gives up the batching across steps that the estimator exists for, so it is not used.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch

from ..linalg import norm, task_norms
from ..discovery import MetaGrads, add_meta
from .base import TrajectoryView
from ..update_rule import Params

__all__ = ["Span", "Guard", "BlockNorms", "spans", "expand", "levels", "tight"]

Span = tuple[int, int]  # the steps [first, last) of a block

#: A stopping rule for :func:`levels`, called after each level with the level norms so far
#: ``[‖T_1‖, …]``, the estimate so far, the vector expanded against and the level itself
#: ``T_j``; it returns ``"converged"`` or ``"diverged"`` to stop there, ``"limit"`` to go on.
Guard = Callable[[list[float], Params, Params, Params], str]

#: One block's levels as :func:`expand` keeps them: its level norms (each a list of each
#: task's where ``tasks`` was given), the vector it expanded against, its order and its span.
BlockNorms = tuple[list[Any], Params, int, Span]


def spans(steps: int, block: Optional[int]) -> list[Span]:
    """Blocks of ``block`` steps laid from the last step backwards; the first block (the
    earliest steps) takes the remainder. Returned in backward order, last block first."""
    size = steps if block is None else block
    found = []
    last = steps
    while last > 0:
        found.append((max(0, last - size), last))
        last -= size
    return found


def expand(trajectory: TrajectoryView, steps: int, v: Params, order: int, block: Optional[int],
           chunk_size: Optional[int], *, grouping_levels: bool, piecewise: bool, measured: bool = True,
           tasks: Optional[int] = None) -> tuple[Params, MetaGrads, int, list[Span], list[BlockNorms]]:
    """(2) at a fixed ``order`` within blocks of ``block`` steps (``None``: one block), chained
    exactly from the last block to the first: the estimate, the η-gradient, the number of
    products, the blocks (last first) and, with the level grouping, each block's levels
    (last first).

    Each block's iterates are restored just before its levels run (with snapshots: recomputed
    once). ``grouping_levels`` picks the level grouping (norms and η) over the tight one;
    ``piecewise`` is False when the iterates are recomputed from snapshots (see
    :func:`_products`); ``tasks``: measure each task's level norms (:func:`levels`)."""
    blocks = spans(steps, block)
    u, products, block_norms = dict(v), 0, []
    meta: MetaGrads = []
    for span in blocks:
        kept = min(order, span[1] - span[0])
        trajectory.restore(*span)  # with snapshots: recompute the block's iterates, once
        if grouping_levels:
            u_next, norms, used, _, more = levels(trajectory, span, u, kept, chunk_size,
                                                  piecewise=piecewise, measured=measured, tasks=tasks)
            block_norms.append((norms, u, kept, span))
            meta = add_meta(meta, more)
        else:
            u_next, used = tight(trajectory, span, u, kept, chunk_size, piecewise=piecewise)
        u, products = u_next, products + used
    return u, meta, products, blocks, block_norms


def levels(trajectory: TrajectoryView, span: Span, v: Params, order: int, chunk_size: Optional[int],
           *, guard: Optional[Guard] = None, piecewise: bool = True, measured: bool = True,
           tasks: Optional[int] = None, retire: Optional[Callable[[int], list[int]]] = None
           ) -> tuple[Params, list[Any], int, str, MetaGrads]:
    """The level grouping over the steps of ``span``: their expansion applied to ``v``, the
    level norms ``[‖T_1‖, …]`` (read back as Python floats: none unless ``measured`` or a
    ``guard`` needs them, so that it runs under ``torch.func.vmap``; with ``tasks``, and no
    guard, each level's entry is the list of each task's norm, its rows of ``T_j``), the
    number of products, why it stopped, and the η-gradient.

    With a ``guard``, stops early where it says ``"converged"`` or ``"diverged"``; otherwise
    after ``order`` levels ("limit").

    ``retire(j)``, in a block over tasks, names the tasks whose expansion ends at level j while
    others go on: their step-size part at order j is taken then, and their rows are zero from
    level j+1, so that their later products add nothing to the estimate or to η's terms.

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
    norms: list[Any] = []
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
        if guard is None and measured and tasks is not None:
            norms.append(task_norms(level_sum, tasks))
        elif measured or guard is not None:
            norms.append(norm(level_sum))
        if guard is not None:
            stop = guard(norms, g, v, level_sum)
        if stop != "limit" or level == order:
            break
        retired = [] if retire is None else retire(level)
        if retired:
            if trajectory.meta:  # their step-size part at order j, from their rows alone
                only = {n: torch.zeros_like(t[:rows]) for n, t in buffer.items()}
                for n, t in buffer.items():
                    only[n][:, retired] = t[:rows, retired]
                meta = add_meta(meta, _step_size_part(trajectory, first, rows, only))
            for t in buffer.values():
                t[:, retired] = 0
    if trajectory.meta and order > 0:  # the step-size part at the last order kept
        meta = add_meta(meta, _step_size_part(trajectory, first, rows, buffer))
    elif trajectory.meta:  # order 0: FirstOrder's step-size part
        for m in range(first, last):
            _, more, _ = trajectory.vjp(m, v, second_order=False)
            meta = add_meta(meta, more)
    return g, norms, products, stop if order > 0 else "limit", meta


def _step_size_part(trajectory: TrajectoryView, first: int, rows: int, buffer: Params) -> MetaGrads:
    """``Σ_k B_kᵀ S_{k+1}`` with the gradients held constant, ``S_{k+1}`` row k+1 of ``buffer``
    for the ``rows`` rows of the last level (see :func:`levels`)."""
    meta: MetaGrads = []
    for i in range(rows - 1):
        _, more, _ = trajectory.vjp(first + i, {n: t[i + 1] for n, t in buffer.items()}, second_order=False)
        meta = add_meta(meta, more)
    return meta


def tight(trajectory: TrajectoryView, span: Span, v: Params, order: int,
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


def _products(trajectory: TrajectoryView, first: int, vectors: Params, chunk_size: Optional[int],
              piecewise: bool, *, backwards: bool = False
              ) -> Iterator[tuple[int, int, Params, MetaGrads]]:
    """``(a, b, J_mᵀ u_i, Σ B_mᵀ u_i)`` for the rows ``a … b−1`` of ``vectors`` (row i at step
    ``first + i``), chunk by chunk (the last chunk first with ``backwards``).

    ``piecewise``: one :meth:`~metagrad.estimators.base.TrajectoryView.batched_vjp` call per chunk, so
    only a chunk's products and results exist at once, and the queued replay checks of a chunk
    run before the next one (:meth:`~metagrad.estimators.base.TrajectoryView.verify`). Otherwise (the
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
