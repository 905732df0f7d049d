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

import math
from collections.abc import Callable
from dataclasses import dataclass
import torch

from .errors import NegativeCurvatureError
from .update_rule import Params

__all__ = ["SolveInfo", "NegativeCurvatureError", "conjugate_gradient", "neumann_series", "norm"]

Operator = Callable[[Params], Params]


@dataclass
class SolveInfo:
    """How a solve went.

    Attributes:
        iterations: solver iterations.
        products: Hessian-vector products used (CG spends one more, on the final residual).
        residual: the final relative residual ``‖(I + H/λ) x − b‖ / ‖b‖``.
        converged: whether ``residual ≤ tol``.
        diverged: whether the Neumann series was detected diverging (always False for CG).
    """

    iterations: int
    products: int
    residual: float
    converged: bool
    diverged: bool = False


def conjugate_gradient(hvp: Operator, b: Params, *, reg: float, max_iter: int,
                       tol: float) -> tuple[Params, SolveInfo]:
    """Solve ``(I + H/λ) x = b`` by conjugate gradients, starting from x = 0.

    Args:
        hvp: ``u ↦ H u``.
        b: the right-hand side.
        reg: λ > 0.
        max_iter: at most this many iterations (one product each).
        tol: stop once the relative residual ``‖r‖/‖b‖ ≤ tol``.

    The reported residual is recomputed from x at the end (one more product), not
    taken from the recursion, whose value drifts from the true one at tight tolerances.

    Raises:
        NegativeCurvatureError: if ``pᵀ(I + H/λ)p ≤ 0`` for a search direction p.
    """
    def apply(u: Params) -> Params:
        hu = hvp(u)
        return {n: u[n] + hu[n] / reg for n in u}

    b_norm = norm(b)
    x = {n: torch.zeros_like(t) for n, t in b.items()}
    if b_norm == 0.0:
        return x, SolveInfo(iterations=0, products=0, residual=0.0, converged=True)
    r = dict(b)
    p = dict(b)
    rr = _dot(r, r)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        ap = apply(p)
        curvature = _dot(p, ap)
        if not curvature > 0.0:  # also catches NaN
            raise NegativeCurvatureError(
                f"Implicit: conjugate gradients met pᵀ(I + H/λ)p = {curvature:.3g} ≤ 0 at iteration "
                f"{iterations}, so I + H/λ is not positive definite: the inner Hessian at the final "
                f"fast weights has an eigenvalue below −reg = {-reg}. Increase reg, take more inner "
                "steps so that the inner problem is near a minimum, or use another estimator."
            )
        step = rr / curvature
        x = {n: x[n] + step * p[n] for n in x}
        r = {n: r[n] - step * ap[n] for n in r}
        rr_next = _dot(r, r)
        if math.sqrt(rr_next) <= tol * b_norm:
            break
        p = {n: r[n] + (rr_next / rr) * p[n] for n in p}
        rr = rr_next
    ax = apply(x)
    residual = norm({n: ax[n] - b[n] for n in b}) / b_norm
    return x, SolveInfo(iterations=iterations, products=iterations + 1, residual=residual,
                        converged=residual <= tol)


def neumann_series(hvp: Operator, b: Params, *, reg: float, max_iter: int,
                   tol: float) -> tuple[Params, SolveInfo]:
    """Solve ``(I + H/λ) x = b`` by the truncated series ``x = Σ_{n≤N} (−H/λ)^n b``.

    The residual of a partial sum is exactly its next term:
    ``(I + M) Σ_{n≤N} (−M)^n b − b = −(−M)^{N+1} b``, so each product gives the residual
    of the current sum for free. Stops when it is at most ``tol·‖b‖``, after ``max_iter``
    products, or when the terms grow (divergence: ``‖H‖/λ ≥ 1`` along b). On divergence
    the partial sum with the smallest residual is returned, with ``diverged=True``.
    """
    b_norm = norm(b)
    x = dict(b)
    if b_norm == 0.0:
        return x, SolveInfo(iterations=0, products=0, residual=0.0, converged=True)
    term, term_norm = dict(b), b_norm
    iterations = 0
    for iterations in range(1, max_iter + 1):
        h_term = hvp(term)
        next_term = {n: -h_term[n] / reg for n in term}
        next_norm = norm(next_term)
        if next_norm > term_norm:
            # Terms grow from here on; the sum before the last term had the smallest residual.
            x = {n: x[n] - term[n] for n in x}
            return x, SolveInfo(iterations=iterations, products=iterations,
                                residual=term_norm / b_norm, converged=False, diverged=True)
        if next_norm <= tol * b_norm or iterations == max_iter:
            return x, SolveInfo(iterations=iterations, products=iterations,
                                residual=next_norm / b_norm, converged=next_norm <= tol * b_norm)
        x = {n: x[n] + next_term[n] for n in x}
        term, term_norm = next_term, next_norm
    raise AssertionError("unreachable")  # pragma: no cover


def _dot(a: Params, b: Params) -> float:
    """``⟨a, b⟩`` over name→tensor mappings, accumulated in float64."""
    return float(sum((a[n].double() * b[n].double()).sum() for n in a))


def norm(a: Params) -> float:
    """The Euclidean norm of a name→tensor mapping, accumulated in float64."""
    return math.sqrt(_dot(a, a))
