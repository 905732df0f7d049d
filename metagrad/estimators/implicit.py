"""Implicit (iMAML): implicit differentiation of a proximal inner problem (MATH.md, "Implicit
differentiation").

The inner problem is ``φ* = argmin_φ L_tr(φ) + (λ/2)‖φ − θ‖²``. At its minimum
``dφ*/dθ = (I + H*/λ)⁻¹`` with ``H* = ∇²L_tr(φ*)``, so the meta-gradient is the solution x of

    (I + H*/λ) x = ∇L_val(φ*)

taken at the final fast weights φ_K in place of φ*.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from ..linalg import conjugate_gradient, neumann_series, norm, task_norms
from ..update_rule import Params
from ..optim import SGD
from ..discovery import MetaGrads
from ..errors import warn
from .base import Estimator, TrajectoryView, check_count

__all__ = ["Implicit"]

SOLVERS = {"cg": conjugate_gradient, "neumann": neumann_series}


class Implicit(Estimator):
    """The iMAML meta-gradient, by a matrix-free linear solve at the final fast weights.

    **The proximal term is added for you.** With this estimator every inner step
    descends ``L_tr(φ) + (λ/2)‖φ − θ‖²``: the closure returns ``L_tr`` only, and
    ``meta.step`` returns ``L_tr`` without the proximal term.

    Backward solves ``(I + H/λ) x = ∇L_val(φ_K)``, with H the Hessian of the last inner
    step's loss (without the proximal term) at φ_K, as fixed-point differentiation through
    the step's VJP (MATH.md): the step is the proximal SGD step with α = 1/λ, for which
    ``I − ∂Φ/∂φ = I + H/λ`` and ``∂Φ/∂θ = I``, built once at φ_K
    (:meth:`~metagrad.estimators.base.TrajectoryView.fixed_point`, the step's one body) and pulled back
    through once per solver iteration; η's gradient is ``(∂Φ/∂η)ᵀ x``. No iterate is stored,
    and one graph is built, at φ_K, so memory does not grow with K. The estimate is only as
    good as φ_K is a minimizer of the proximal problem: take enough inner steps for
    the inner loop to converge.

    After backward, ``meta.info`` holds ``solver``, ``iterations``, ``residual`` (the
    final relative residual ``‖(I + H/λ)x − b‖/‖b‖``), ``converged``,
    ``hessian_vector_products`` and ``stationarity``: ``‖r‖ / (‖∇L_tr(φ_K)‖ + λ‖φ_K − θ‖)``
    with ``r = ∇L_tr(φ_K) + λ(φ_K − θ)``, 0 at the proximal problem's stationary point, where
    the formula is the derivative, and near 1 far from it (one small step). A solve that misses ``tol`` issues a
    :class:`MetaGradientWarning` giving the residual; a Neumann series detected
    diverging (``‖H‖/λ ≥ 1``) warns and returns its best partial sum; conjugate
    gradients that meet negative curvature raise
    :class:`~metagrad.linalg.NegativeCurvatureError`.

    Meta-parameters η of the inner loss (MATH.md's table): ``−(1/λ)(∂_η ∇_φ L_tr(φ_K, η))ᵀ x``
    with x the same solution, one more product through the same graph, besides η's direct
    gradient from the query. A step size does not move the fixed point φ*, so it gets no
    gradient through the inner loop: a :class:`MetaGradientWarning` says so.

    Args:
        reg: λ > 0, the strength of the proximal term.
        solver: ``"cg"`` (conjugate gradients, needs ``H ⪰ −λI``) or ``"neumann"``
            (``Σ_n (−H/λ)^n b``, needs ``‖H‖ < λ``).
        max_iter: at most this many solver iterations (>= 1).
        tol: the relative residual to reach (> 0).
    """

    def __init__(self, reg: float = 1.0, solver: str = "cg", max_iter: int = 50,
                 tol: float = 1e-6) -> None:
        if isinstance(reg, bool) or not isinstance(reg, (int, float)):
            raise TypeError(f"Implicit(reg): expected a finite float > 0, got {type(reg).__name__} {reg!r}.")
        if not math.isfinite(reg) or reg <= 0:
            raise ValueError(f"Implicit(reg): expected a finite float > 0, got {reg!r}.")
        if solver not in SOLVERS:
            raise ValueError(f"Implicit(solver): unknown solver {solver!r}; accepted: {sorted(SOLVERS)}.")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)):
            raise TypeError(f"Implicit(tol): expected a float > 0, got {type(tol).__name__} {tol!r}.")
        if not tol > 0:
            raise ValueError(f"Implicit(tol): expected a float > 0, got {tol!r}.")
        self.reg = float(reg)
        self.solver = solver
        self.max_iter = check_count(max_iter, "Implicit(max_iter)", minimum=1)
        self.tol = float(tol)

    #: The fixed-point step is rebuilt at φ_K from the last step's closure.
    needs_closure = True

    @property
    def proximal(self) -> Optional[float]:
        return self.reg

    def why_not_pure(self, traced: bool = True) -> Optional[str]:
        if not traced:  # called directly: the pure inner loop adds the proximal term
            return None
        return (
            f"{self!r} is not supported by meta_grad under torch.func.vmap, torch.func.grad or "
            "torch.compile: its solver (conjugate gradients or a Neumann series) stops on a residual "
            "read back as a Python float, which they cannot trace. Call meta_grad directly (a "
            "meta-batch by tasks=T), or use mg.Checkpointed() or mg.Full()."
        )

    def keep(self) -> Optional[int]:
        return 0

    def _stationarity(self, moved: Params, trajectory: TrajectoryView) -> Any:
        """How far φ_K is from the proximal problem's stationary point, where the formula holds:
        ``‖r‖ / (‖∇L_tr(φ_K)‖ + λ‖φ_K − θ‖)`` with ``r = ∇L_tr(φ_K) + λ(φ_K − θ)``, the gradient of
        the proximal problem (0 at its stationary point, near 1 where either part is far larger
        than the other is undone). The fixed-point step with α = 1/λ moves φ_K by ``r/λ``; one number,
        or one per task."""
        theta, phi = trajectory.theta, trajectory.iterate(trajectory.length)
        pull = {n: self.reg * (phi[n] - theta[n]) for n in moved}
        residual = {n: self.reg * moved[n] for n in moved}
        gradient = {n: residual[n] - pull[n] for n in moved}
        tasks = trajectory.tasks
        size = (lambda a: task_norms(a, tasks)) if tasks is not None else (lambda a: [norm(a)])
        out = [r / (g + p) if g + p > 0 else 0.0 for r, g, p in zip(size(residual), size(gradient), size(pull))]
        return out if tasks is not None else out[0]

    def backward(self, trajectory: TrajectoryView, steps: int, v: Params
                 ) -> tuple[Params, MetaGrads, dict[str, Any]]:
        # Fixed-point differentiation through the step's VJP (MATH.md): the proximal SGD step
        # Φ(φ) = φ − α(∇L_tr(φ) + λ(φ − θ)) with α = 1/λ has I − ∂Φ/∂φ = I + H*/λ and
        # ∂Φ/∂θ = I, so θ̄ = x solves (I + H*/λ) x = v, and η̄ = (∂Φ/∂η)ᵀ x.
        step = trajectory.fixed_point(steps, SGD(lr=1.0 / self.reg))  # the one graph, at φ_K

        def hessian(u: Params) -> Params:  # H*u = −λ Jᵀu for this step
            return {n: -self.reg * t for n, t in step(u)[0].items()}

        # Over tasks, each task's system on its own (its own stop), as T separate blocks solve them.
        x, solve = SOLVERS[self.solver](hessian, v, reg=self.reg, max_iter=self.max_iter, tol=self.tol,
                                        tasks=trajectory.tasks)
        meta: MetaGrads = step(x, eta=True)[1] if steps > 0 and trajectory.meta else []
        step_sizes = [trajectory.meta_names[i] for i in sorted(trajectory.rule_meta)]
        if step_sizes:
            warn(
                f"Implicit: the step sizes {step_sizes} do not move the fixed point of the proximal "
                "inner problem, so implicit differentiation gives them no gradient through the inner "
                "loop (MATH.md). Use Checkpointed() or Truncated(T) to learn step sizes."
            )
        info = {"steps": steps, "solver": self.solver, "reg": self.reg,
                "iterations": solve.iterations, "residual": solve.residual,
                "converged": solve.converged, "hessian_vector_products": solve.products,
                "stationarity": self._stationarity(step.moved, trajectory)}
        # One entry per task over tasks (meta.info lists them); the warnings name the tasks.
        each = [(k, *e) for k, e in enumerate(zip(*(v if isinstance(v, list) else [v] for v in (
            solve.iterations, solve.residual, solve.converged, solve.diverged))))]
        diverged = [e for e in each if e[4]]
        short = [e for e in each if not e[3] and not e[4]]
        bad = diverged or short  # one warning: divergence first, the tasks that stopped short named in it
        if bad:
            which = "" if trajectory.tasks is None else f" (tasks {[e[0] for e in bad]})"
            iterations, residual = max(e[1] for e in bad), max(e[2] for e in bad)
            also = (f" Tasks {[e[0] for e in short]} stopped above tol={self.tol:g}, at relative residual up to "
                    f"{max(e[2] for e in short):.3g}." if diverged and short else "")
            warn(
                f"Implicit: the Neumann series is diverging{which} (its terms grew after {iterations} "
                f"products): ‖H‖/λ is too large for reg={self.reg}. The best partial sum, with "
                f"relative residual {residual:.3g}, is used. Increase reg above ‖H‖, or use "
                f"solver='cg'.{also}" if diverged else
                f"Implicit: the {self.solver} solve stopped{which} at relative residual "
                f"{residual:.3g} after {iterations} iterations, above tol={self.tol:g}. "
                "Raise max_iter, loosen tol, or increase reg."
            )
        return x, meta, info
