"""Matrix-free linear solvers over name→tensor mappings (MATH.md, "Implicit differentiation").

Both solve ``(I + H/λ) x = b`` given only ``u ↦ H u``; the Implicit estimator uses them
with H the inner Hessian at the final fast weights.

- :func:`conjugate_gradient`: for symmetric positive definite operators
  (``H ⪰ −λI``). Raises :class:`NegativeCurvatureError` when it meets a direction
  of non-positive curvature.
- :func:`neumann_series`: ``x = Σ_n (−H/λ)^n b``, which converges when ``‖H‖ < λ``.
  For a symmetric H the ratio ``‖(H/λ)^{n+1} b‖ / ‖(H/λ)^n b‖`` never decreases, so
  one ratio above 1 proves divergence.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .errors import NegativeCurvatureError
from .numerics import real_view
from .update_rule import Params

__all__ = ["SolveInfo", "NegativeCurvatureError", "conjugate_gradient", "neumann_series", "norm"]

Operator = Callable[[Params], Params]


@dataclass
class SolveInfo:
    """How a solve went; with ``tasks`` (T independent systems), each field is a list with one
    entry per task.

    Attributes:
        iterations: solver iterations.
        products: Hessian-vector products used (CG spends one more, on the final residual); one
            product acts on every task at once, so with tasks it is one number, the most any
            task needed.
        residual: the final relative residual ``‖(I + H/λ) x − b‖ / ‖b‖``.
        converged: whether ``residual ≤ tol``.
        diverged: whether the Neumann series was detected diverging (always False for CG).
    """

    iterations: Any
    products: int
    residual: Any
    converged: Any
    diverged: Any = False


def conjugate_gradient(hvp: Operator, b: Params, *, reg: float, max_iter: int,
                       tol: float, tasks: Optional[int] = None) -> tuple[Params, SolveInfo]:
    """Solve ``(I + H/λ) x = b`` by conjugate gradients, starting from x = 0.

    Args:
        hvp: ``u ↦ H u``.
        b: the right-hand side.
        reg: λ > 0.
        max_iter: at most this many iterations (one product each).
        tol: stop once the relative residual ``‖r‖/‖b‖ ≤ tol``.
        tasks: ``b`` holds T independent systems along a first dimension of T (H acts on each
            alone: a block over tasks); each is solved as it would be on its own — its own
            step lengths, stopping test and residual — and a task that has stopped is left as it
            is while the others go on. ``None``: one system.

    The reported residual is recomputed from x at the end (one more product), not
    taken from the recursion, whose value drifts from the true one at tight tolerances.

    Raises:
        NegativeCurvatureError: if ``pᵀ(I + H/λ)p ≤ 0`` for a search direction p.
    """
    rows = _Rows(tasks)

    def apply(u: Params) -> Params:
        hu = hvp(u)
        return {n: u[n] + hu[n] / reg for n in u}

    b_norm = rows.dot(b, b).sqrt()
    x = {n: torch.zeros_like(t) for n, t in b.items()}
    active = b_norm > 0
    iterations = torch.zeros_like(b_norm, dtype=torch.long)
    products = 0
    if bool(active.any()):
        r, p = dict(b), dict(b)
        rr = rows.dot(r, r)
        for k in range(1, max_iter + 1):
            ap = apply(p)
            products += 1
            curvature = rows.dot(p, ap)
            bad = active & ~(curvature > 0)  # also catches NaN
            if bool(bad.any()):
                which = "" if tasks is None else f" (task {int(bad.nonzero()[0, 0])})"
                value = float(curvature[bad][0])
                raise NegativeCurvatureError(
                    f"Implicit: conjugate gradients met pᵀ(I + H/λ)p = {value:.3g} ≤ 0 at iteration "
                    f"{int(iterations[bad][0]) + 1}{which}, so I + H/λ is not positive definite: the inner "
                    f"Hessian at the final fast weights has an eigenvalue below −reg = {-reg}. Increase "
                    "reg, take more inner steps so that the inner problem is near a minimum, or use "
                    "another estimator."
                )
            step = torch.where(active, rr / curvature, torch.zeros_like(rr))
            x = {n: x[n] + rows.scale(step, p[n]) for n in x}
            r = {n: r[n] - rows.scale(step, ap[n]) for n in r}
            iterations = torch.where(active, k, iterations)
            rr_next = rows.dot(r, r)
            active = active & ~(rr_next.sqrt() <= tol * b_norm)
            if not bool(active.any()):
                break
            beta = torch.where(active, rr_next / rr, torch.zeros_like(rr))
            p = {n: rows.pick(active, r[n] + rows.scale(beta, p[n]), p[n]) for n in p}
            rr = torch.where(active, rr_next, rr)
        ax = apply(x)
        products += 1
    else:
        ax = b
    difference = {n: ax[n] - b[n] for n in b}
    residual = rows.dot(difference, difference).sqrt() / torch.where(b_norm > 0, b_norm, 1.0)
    return x, SolveInfo(iterations=rows.out(iterations), products=products, residual=rows.out(residual),
                        converged=rows.out(residual <= tol), diverged=rows.out(torch.zeros_like(active)))


def neumann_series(hvp: Operator, b: Params, *, reg: float, max_iter: int,
                   tol: float, tasks: Optional[int] = None) -> tuple[Params, SolveInfo]:
    """Solve ``(I + H/λ) x = b`` by the truncated series ``x = Σ_{n≤N} (−H/λ)^n b``.

    The residual of a partial sum is exactly its next term:
    ``(I + M) Σ_{n≤N} (−M)^n b − b = −(−M)^{N+1} b``, so each product gives the residual
    of the current sum for free. Stops when it is at most ``tol·‖b‖``, after ``max_iter``
    products, or when the terms grow (divergence: ``‖H‖/λ ≥ 1`` along b). On divergence
    the partial sum with the smallest residual is returned, with ``diverged=True``.
    ``tasks``: T independent systems, each summed and stopped as on its own
    (:func:`conjugate_gradient`).
    """
    rows = _Rows(tasks)
    b_norm = rows.dot(b, b).sqrt()
    x = dict(b)
    active = b_norm > 0
    iterations = torch.zeros_like(b_norm, dtype=torch.long)
    residual = torch.zeros_like(b_norm)
    converged, diverged = ~active, torch.zeros_like(active)
    term, term_norm = dict(b), b_norm
    products = 0
    for k in range(1, max_iter + 1):
        if not bool(active.any()):
            break
        h_term = hvp(term)
        products += 1
        next_term = {n: -h_term[n] / reg for n in term}
        next_norm = rows.dot(next_term, next_term).sqrt()
        # Terms grow from here on: the sum before the last term had the smallest residual.
        grow = active & (next_norm > term_norm)
        x = {n: rows.pick(grow, x[n] - term[n], x[n]) for n in x}
        residual = torch.where(grow, term_norm / b_norm, residual)
        diverged = diverged | grow
        active = active & ~grow
        met = next_norm <= tol * b_norm
        done = active & (met | (k == max_iter))
        residual = torch.where(done, next_norm / b_norm, residual)
        converged = converged | (done & met)
        iterations = torch.where(grow | done, k, iterations)
        active = active & ~done
        x = {n: rows.pick(active, x[n] + next_term[n], x[n]) for n in x}
        term = {n: rows.pick(active, next_term[n], term[n]) for n in term}
        term_norm = torch.where(active, next_norm, term_norm)
    return x, SolveInfo(iterations=rows.out(iterations), products=products, residual=rows.out(residual),
                        converged=rows.out(converged), diverged=rows.out(diverged))


class _Rows:
    """Per-system scalars of one system (``tasks=None``) or T stacked ones: inner products
    accumulated in float64, one per system, and per-system scalars applied to the tensors."""

    def __init__(self, tasks: Optional[int]) -> None:
        self.tasks = tasks

    def dot(self, a: Params, b: Params) -> torch.Tensor:
        count = 1 if self.tasks is None else self.tasks
        return functools.reduce(operator.add, [(real_view(a[n]).double() * real_view(b[n]).double()).reshape(count, -1).sum(1)
                                                   for n in a])

    def _column(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return s.reshape(()) if self.tasks is None else s.reshape(-1, *[1] * (t.dim() - 1))

    def scale(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return t * self._column(s, t).to(t.dtype)

    def pick(self, mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(self._column(mask, a), a, b)

    def out(self, values: torch.Tensor) -> Any:
        """Python numbers: one for one system, a list for T."""
        return values.item() if self.tasks is None else values.tolist()


def norm(a: Params) -> float:
    """The Euclidean norm of a name→tensor mapping, accumulated in float64."""
    return math.sqrt(float(_Rows(None).dot(a, a)))


def task_norms(a: Params, tasks: int) -> list[float]:
    """:func:`norm` of each of ``tasks`` rows stacked along the first dimension (a block over
    tasks: each task's own)."""
    return [float(x) for x in _Rows(tasks).dot(a, a).sqrt().tolist()]
