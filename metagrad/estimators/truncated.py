"""Truncated(T): only the last T step Jacobians (MATH.md table, "Truncated(T)")."""

from __future__ import annotations

from typing import Any, Optional

from ..update_rule import Params
from ..discovery import MetaGrads, add_meta
from .base import Estimator, TrajectoryView, beyond_steps, check_count, sweep_back

__all__ = ["Truncated"]


class Truncated(Estimator):
    """Backpropagate through the last ``steps`` inner steps; earlier ones count as I.

    Computes ``(I − αH_{K−T}) ⋯ (I − αH_{K−1}) v`` with one rebuilt step graph at a
    time, and stores only the last T iterates. ``Truncated(0)`` is FirstOrder and
    ``Truncated(K)`` is exact with plain gradient descent (any per-parameter step sizes). A
    ``steps`` larger than K is clamped to K with a :class:`MetaGradientWarning`. With an
    update rule that has state (momentum, Adam, AdamW, RMSprop, Adagrad) each step's Jacobian
    holds the state constant (MATH.md, "Optimizers other than plain gradient descent"), an
    approximation even at ``Truncated(K)``: Checkpointed is the exact estimator there.

    Meta-parameters η (MATH.md's table): (3) over the last T steps, plus the step-size
    part of every earlier step's ``B_k`` with ``a_{K−T}`` (the earlier inner gradients are
    constants, so a learned step size still gets their contribution).

    Args:
        steps: T, the number of final inner steps to differentiate through (>= 0).
    """

    def __init__(self, steps: int = 2) -> None:
        self.steps = check_count(steps, "Truncated(steps)", minimum=0)

    def keep(self) -> Optional[int]:
        return self.steps

    def length_warning(self, steps: int) -> Optional[str]:
        return beyond_steps(self.steps, steps, "Truncated", "steps")

    def backward(self, trajectory: TrajectoryView, steps: int, v: Params
                 ) -> tuple[Params, MetaGrads, dict[str, Any]]:
        kept = min(self.steps, steps)
        u, meta, _ = sweep_back(trajectory, steps - kept, steps, dict(v))  # the optimizer state held constant
        for m in range(steps - kept):  # earlier steps: their gradients are constants
            _, grads, _ = trajectory.vjp(m, u, second_order=False)
            meta = add_meta(meta, grads)
        return u, meta, {"steps": steps, "truncated_to": kept, "hessian_vector_products": kept}
