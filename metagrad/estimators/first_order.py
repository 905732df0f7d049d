"""FirstOrder (FOMAML): the meta-gradient taken as ``v = ∇L_val(φ_K)`` (MATH.md table)."""

from __future__ import annotations

from typing import Any, Optional

from ..optim import Params
from ..trajectory import Trajectory
from .base import Estimator

__all__ = ["FirstOrder"]


class FirstOrder(Estimator):
    """First-order MAML: every step Jacobian taken as the identity.

    Stores no past iterate and computes no Hessian-vector product. Equals
    ``Binomial(order=0)`` and ``Truncated(steps=0)``.
    """

    def keep(self) -> Optional[int]:
        return 0

    def backward(self, trajectory: Trajectory, steps: int, v: Params) -> tuple[Params, dict[str, Any]]:
        return dict(v), {"steps": steps, "hessian_vector_products": 0}
