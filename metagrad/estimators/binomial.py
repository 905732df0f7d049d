"""Binomial(L): BinomGBML / BinomMAML, the binomial expansion of (1) truncated at order L.

MATH.md (2)::

    ĝ_L = v + Σ_{l=1}^{L} Σ_{k_1<…<k_l} (−α)^l H_{k_1} H_{k_2} ⋯ H_{k_l} v

computed in L levels, each one batched call of K−L+1 Hessian-vector products
(MATH.md, "Computing (2) in L parallel levels", the tight grouping).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..optim import Params
from ..trajectory import Trajectory
from .base import Estimator, check_count, clamp_to_steps

__all__ = ["Binomial"]


class Binomial(Estimator):
    """The paper's binomial meta-gradient estimator, at truncation order ``order``.

    Every step's Hessian enters already at order 1, unlike truncation. The error
    is small when ``K·α·ℓ`` is small (ℓ the largest |eigenvalue| of the inner
    Hessians) and the series diverges once ``K·α·ℓ`` is well above 1: see MATH.md,
    "Where it works, and where it breaks". ``Binomial(0)`` is FirstOrder and
    ``Binomial(K)`` is exact. An ``order`` larger than K is clamped to K with a
    :class:`MetaGradientWarning` (the result is then exact).

    The inner loop stores iterates only. Backward runs ``order`` levels; each level
    is ``K − order + 1`` products ``(J_kᵀ − I) u`` computed with ``torch.func.vmap``
    over stored iterates, building the step graphs it needs and freeing them.

    Args:
        order: L, the truncation order (an integer >= 0).
        chunk_size: at most this many step graphs exist at once. ``None`` batches a
            whole level in one call (fastest, most memory); ``1`` builds one at a time.
    """

    def __init__(self, order: int = 2, chunk_size: Optional[int] = None) -> None:
        self.order = check_count(order, "Binomial(order)", minimum=0)
        self.chunk_size = check_count(chunk_size, "Binomial(chunk_size)", minimum=1, allow_none=True)

    def backward(self, trajectory: Trajectory, steps: int, v: Params) -> tuple[Params, dict[str, Any]]:
        order = clamp_to_steps(self.order, steps, "Binomial", "order")
        info: dict[str, Any] = {"steps": steps, "order": order, "depth": order,
                                "hessian_vector_products": order * (steps - order + 1) if order else 0}
        if order == 0:
            return dict(v), info
        # The tight grouping: at level t the window of iterates φ_{L−1−t} … φ_{K−1−t};
        # row i holds the partial sums over subsets of {window[i], …, K−1} of size ≤ t+1.
        width = steps - order + 1
        rows = {n: t.unsqueeze(0).expand(width, *t.shape) for n, t in v.items()}
        for level in range(order):
            first = order - 1 - level
            window = list(range(first, first + width))
            products = trajectory.batched_vjp(window, rows, self.chunk_size)
            rows = {
                n: rows[n][-1] + _suffix_sum(products[n] - rows[n])  # (J_kᵀ − I) u = −α H_k u
                for n in rows
            }
        return {n: t[0] for n, t in rows.items()}, info


def _suffix_sum(x: torch.Tensor) -> torch.Tensor:
    """``out[i] = Σ_{i' ≥ i} x[i']`` along the first dimension."""
    return x.flip(0).cumsum(0).flip(0)
