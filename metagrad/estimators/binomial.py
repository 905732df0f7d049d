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
  fallback: ``"checkpointed"`` (exact), ``"truncated"`` (``Truncated(max_order)``) or
  ``None`` (raise :class:`SeriesDivergenceError`).
- A fixed ``order=L`` computes (2) exactly as asked and, when monitored, warns if
  ``ρ_L ≥ 1``: the series was cut where its terms were not shrinking.

The report (``meta.info``) holds ``order``, ``level_norms`` ``[‖T_1‖, …]``,
``error_estimate`` ``‖T_L‖/‖ĝ_L‖`` (the size of the last level kept, relative to
the estimate: a heuristic for the truncation error), ``diverged``, ``converged``
and ``fallback`` (the estimator that produced the result, or ``None``).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch

from ..optim import Params
from ..trajectory import Trajectory
from .base import Estimator, check_count, clamp_to_steps, warn
from .checkpointed import Checkpointed
from .truncated import Truncated

__all__ = ["Binomial", "SeriesDivergenceError"]

FALLBACKS = ("checkpointed", "truncated", None)


class SeriesDivergenceError(ArithmeticError):
    """The binomial series diverged (or missed ``rtol``) and ``fallback=None`` was asked for."""


class Binomial(Estimator):
    """The paper's binomial meta-gradient estimator, at a fixed or automatic order.

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

    Args:
        order: L, the truncation order (an integer >= 0), or ``"auto"``.
        chunk_size: at most this many step graphs exist at once. ``None`` batches a
            whole level in one call (fastest, most memory); ``1`` builds one at a time.
        monitor: record the level norms and warn when they grow (a fixed order); with
            ``False`` a fixed order uses the tight grouping, with the fewest products.
            ``order="auto"`` always monitors.
        rtol: for ``order="auto"``: stop once ``‖T_j‖ ≤ rtol·‖ĝ_j‖``.
        max_order: for ``order="auto"``: at most this many levels.
        fallback: for ``order="auto"``: ``"checkpointed"``, ``"truncated"`` or ``None``.
    """

    def __init__(self, order: Union[int, str] = 2, chunk_size: Optional[int] = None, *,
                 monitor: bool = True, rtol: float = 1e-3, max_order: int = 8,
                 fallback: Optional[str] = "checkpointed") -> None:
        if isinstance(order, str) and order != "auto":
            raise TypeError(f"Binomial(order): expected an integer >= 0 or 'auto', got str {order!r}.")
        if order != "auto":
            check_count(order, "Binomial(order)", minimum=0)
        self.order = order
        self.chunk_size = check_count(chunk_size, "Binomial(chunk_size)", minimum=1, allow_none=True)
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

    def __repr__(self) -> str:
        if self.order == "auto":
            return (f"Binomial(order='auto', chunk_size={self.chunk_size}, rtol={self.rtol}, "
                    f"max_order={self.max_order}, fallback={self.fallback!r})")
        monitor = "" if self.monitor else ", monitor=False"
        return f"Binomial(order={self.order}, chunk_size={self.chunk_size}{monitor})"

    def backward(self, trajectory: Trajectory, steps: int, v: Params) -> tuple[Params, dict[str, Any]]:
        if self.order == "auto":
            return self._auto(trajectory, steps, v)
        order = clamp_to_steps(self.order, steps, "Binomial", "order")  # type: ignore[arg-type]
        if not self.monitor:
            g, products = _tight(trajectory, steps, v, order, self.chunk_size)
            return g, {"steps": steps, "order": order, "depth": order,
                       "hessian_vector_products": products}
        g, norms, products = _levels(trajectory, steps, v, order, self.chunk_size)
        info = _report(steps, order, norms, g, products)
        if 0 < order < steps and len(norms) >= 1 and _ratio(norms, v, order) >= 1:
            info["diverged"] = True
            warn(
                f"The binomial series is not converging at order {order}: its level norms grow "
                f"(‖T_{order}‖/‖T_{order - 1}‖ = {_ratio(norms, v, order):.3g}), because K·α·‖H‖ "
                "is too large. Take fewer inner steps, a smaller step size, or use Checkpointed "
                "or Binomial(order='auto'). Pass monitor=False to silence this warning."
            )
        return g, info

    def _auto(self, trajectory: Trajectory, steps: int, v: Params) -> tuple[Params, dict[str, Any]]:
        limit = min(self.max_order, steps)
        g, norms, products, stop = _levels(trajectory, steps, v, limit, self.chunk_size,
                                           rtol=self.rtol, with_stop=True)
        order = len(norms)
        info = _report(steps, order, norms, g, products)
        if stop == "converged" or order == steps:
            info["converged"] = True
            return g, info
        reason = ("the level norms grew at two consecutive orders: the binomial series is "
                  "diverging, because K·α·‖H‖ is too large" if stop == "diverged" else
                  f"max_order={self.max_order} levels left an error estimate of "
                  f"{info['error_estimate']:.3g}, above rtol={self.rtol:g}")
        info["diverged"] = stop == "diverged"
        advice = "Take fewer inner steps or a smaller step size, or choose another estimator."
        if self.fallback is None:
            raise SeriesDivergenceError(f"Binomial(order='auto'): {reason}. {advice}")
        substitute = Checkpointed() if self.fallback == "checkpointed" else Truncated(limit)
        warn(f"Binomial(order='auto'): {reason}. Falling back to {substitute!r}. {advice}")
        g, extra = substitute.backward(trajectory, steps, v)
        info["fallback"] = repr(substitute)
        info["hessian_vector_products"] = products + extra.get("hessian_vector_products", 0)
        return g, info


def _levels(trajectory: Trajectory, steps: int, v: Params, order: int, chunk_size: Optional[int],
            *, rtol: Optional[float] = None, with_stop: bool = False) -> Any:
    """The level grouping: ĝ and ``[‖T_1‖, …]``, up to ``order`` levels.

    With ``rtol``, stops early once ``‖T_j‖ ≤ rtol·‖ĝ_j‖`` ("converged") or after two
    consecutive levels whose norms grew ("diverged").
    """
    g = dict(v)
    norms: list[float] = []
    products = 0
    stop = "limit"
    # suffix[k] = Σ_{k' ≥ k} a^{(j−1)}_{k'}; level 1 multiplies v at every step.
    suffix = {n: t.unsqueeze(0).expand(steps, *t.shape) for n, t in v.items()}
    for level in range(1, order + 1):
        rows = steps - level + 1  # a^{(j)}_k vanishes for k > K−j
        vectors = {n: t[:rows] for n, t in suffix.items()}
        pulled = trajectory.batched_vjp(list(range(rows)), vectors, chunk_size)
        terms = {n: pulled[n] - vectors[n] for n in v}  # (J_kᵀ − I) u = −α H_k u for SGD
        products += rows
        level_sum = {n: t.sum(0) for n, t in terms.items()}  # T_j
        g = {n: g[n] + level_sum[n] for n in g}
        norms.append(_norm(level_sum))
        if rtol is not None:
            if norms[-1] <= rtol * _norm(g):
                stop = "converged"
                break
            if level >= 2 and _ratio(norms, v, level) >= 1 and _ratio(norms, v, level - 1) >= 1:
                stop = "diverged"
                break
        # The next level multiplies, at step k, the sum of this level's terms after k.
        suffix = {n: _suffix_sum(t)[1:] for n, t in terms.items()}
    if with_stop:
        return g, norms, products, stop
    return g, norms, products


def _tight(trajectory: Trajectory, steps: int, v: Params, order: int,
           chunk_size: Optional[int]) -> tuple[Params, int]:
    """The tight grouping: ĝ_L in ``L(K−L+1)`` products, no level norms."""
    if order == 0:
        return dict(v), 0
    # At level t the window of iterates φ_{L−1−t} … φ_{K−1−t}; row i holds the partial
    # sums over subsets of {window[i], …, K−1} of size ≤ t+1.
    width = steps - order + 1
    rows = {n: t.unsqueeze(0).expand(width, *t.shape) for n, t in v.items()}
    for level in range(order):
        first = order - 1 - level
        products = trajectory.batched_vjp(list(range(first, first + width)), rows, chunk_size)
        rows = {n: rows[n][-1] + _suffix_sum(products[n] - rows[n]) for n in rows}
    return {n: t[0] for n, t in rows.items()}, order * width


def _report(steps: int, order: int, norms: list[float], g: Params, products: int) -> dict[str, Any]:
    size = _norm(g)
    estimate = norms[-1] / size if norms and size > 0 else 0.0
    return {"steps": steps, "order": order, "depth": order, "level_norms": norms,
            "error_estimate": 0.0 if order == steps else estimate, "diverged": False,
            "converged": False, "fallback": None, "hessian_vector_products": products}


def _ratio(norms: list[float], v: Params, level: int) -> float:
    """``ρ_j = ‖T_j‖/‖T_{j−1}‖`` with ``T_0 = v``."""
    previous = norms[level - 2] if level >= 2 else _norm(v)
    if norms[level - 1] == 0:
        return 0.0
    return norms[level - 1] / previous if previous > 0 else math.inf


def _norm(x: Params) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in x.values()))


def _suffix_sum(x: torch.Tensor) -> torch.Tensor:
    """``out[i] = Σ_{i' ≥ i} x[i']`` along the first dimension."""
    return x.flip(0).cumsum(0).flip(0)
