"""FirstOrder (FOMAML): the meta-gradient taken as ``v = ∇L_val(φ_K)`` (MATH.md table)."""

from __future__ import annotations

from typing import Any, Optional

from ..update_rule import Params
from ..discovery import MetaGrads, add_meta
from ..errors import warn
from .base import Estimator, TrajectoryView

__all__ = ["FirstOrder"]


class FirstOrder(Estimator):
    """First-order MAML: every step Jacobian taken as the identity.

    Stores no past iterate and computes no Hessian-vector product. Equals
    ``Binomial(order=0)`` and ``Truncated(steps=0)``.

    Meta-parameters η (MATH.md's table): the step-size part ``−Σ_k (∂α/∂η)ᵀ(∇L_tr(φ_k)·v)``,
    from the updates the inner loop kept (first-order Meta-SGD still learns its step sizes).
    An η of the inner loss (a regularizer, per-example weights, a body not adapted) gets no
    gradient through the inner loop, only its direct gradient from the query: a
    :class:`MetaGradientWarning` names it.
    """

    def keep(self) -> Optional[int]:
        return 0

    def backward(self, trajectory: TrajectoryView, steps: int, v: Params
                 ) -> tuple[Params, MetaGrads, dict[str, Any]]:
        meta: MetaGrads = []
        for m in range(steps):
            _, grads, _ = trajectory.vjp(m, v, second_order=False)
            meta = add_meta(meta, grads)
        unreached = [name for i, name in enumerate(trajectory.meta_names) if i not in trajectory.rule_meta]
        if unreached and steps > 0:
            warn(
                f"FirstOrder: the meta-parameters {unreached} enter the inner loss, and FirstOrder keeps "
                "no second derivative, so they get no gradient through the inner loop (MATH.md), only "
                "their direct gradient from the query loss. Use Checkpointed() for their exact "
                "meta-gradient, or Truncated(T) / Binomial(order='auto') for a cheaper estimate."
            )
        return dict(v), meta, {"steps": steps, "hessian_vector_products": 0}
