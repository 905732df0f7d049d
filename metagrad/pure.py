"""A trajectory computed purely with ``torch.func``, for :func:`metagrad.functional.meta_grad`.

:class:`PureTrajectory` offers the primitive every estimator composes (:meth:`vjp`,
:meth:`batched_vjp`, :meth:`iterate`, ``length``, ``theta``, ``meta``), like
:class:`~metagrad.trajectory.Trajectory`, but for an inner loop given as a pure function:

    Φ(φ, s) = rule.step(φ, torch.func.grad(loss_fn)(φ, support), s)

The inner loop runs without an autograd graph and stores the iterates φ_0 … φ_K and the
optimizer states s_0 … s_K. A product is ``torch.func.vjp`` of Φ at a stored φ_m, and many
products are ``torch.func.vmap`` over the stored iterates stacked along a new first
dimension. Nothing is replayed from a closure, so there is nothing to check
(:meth:`verify` does nothing), and no Python-side state is read: the estimators that only
compose these products run under ``torch.func.vmap`` and ``torch.compile``.

There are no meta-parameters η here (``meta`` is empty): a step size that is a tensor is a
constant of Φ, and only θ's meta-gradient is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch.utils import _pytree as pytree

from .estimators import Estimator, resolve
from .step import step_body, step_vjp
from .update_rule import Params, State, UpdateRule

__all__ = ["PureTrajectory", "check_estimator", "unroll"]

LossFn = Callable[[Params, Any], torch.Tensor]


def _is_float_tensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def unroll(loss_fn: LossFn, params: Params, support: Any, rule: UpdateRule, steps: int
           ) -> tuple[list[Params], list[State]]:
    """The iterates φ_0 … φ_K and states s_0 … s_K of K steps of ``rule`` on ``loss_fn``, each
    the step's body (:func:`metagrad.step.step_body`).

    Differentiable when called under a ``torch.func`` transform of ``params`` (Full's branch).
    """
    phi, state = dict(params), rule.init(params)
    iterates, states = [phi], [state]
    for _ in range(steps):
        (phi, state), _ = step_body(_loss_at(loss_fn, support), rule, list(phi), state=state)(phi, [], [])
        iterates.append(phi)
        states.append(state)
    return iterates, states


def _loss_at(loss_fn: LossFn, support: Any) -> Callable[[Params, Sequence[torch.Tensor]], torch.Tensor]:
    """A pure loss as a step body's ``loss_at`` (no explicit η)."""
    return lambda q, eta: loss_fn(q, support)


class PureTrajectory:
    """The stored inner loop of a pure ``loss_fn``, with the products estimators use.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        theta: the initialization θ, name→tensor.
        support: the batch every inner step's loss is taken on.
        rule: the inner update rule (``rule.init`` / ``rule.step``).
        steps: K, the number of inner steps (taken here, without an autograd graph).
    """

    def __init__(self, loss_fn: LossFn, theta: Params, support: Any, rule: UpdateRule,
                 steps: int) -> None:
        self.loss_fn = loss_fn
        self.support = support
        self.rule = rule
        self.theta = dict(theta)
        #: No meta-parameters η: only θ's meta-gradient is computed.
        self.meta: list[torch.Tensor] = []
        self.meta_names: list[str] = []
        self.rule_meta: set[int] = set()
        with torch.no_grad():
            self._iterates, self._states = unroll(loss_fn, self.theta, support, rule, steps)
        self._length = steps

    @property
    def length(self) -> int:
        """The number of inner steps taken, K."""
        return self._length

    @property
    def current(self) -> Params:
        """The final fast weights φ_K."""
        return self._iterates[-1]

    def iterate(self, k: int) -> Params:
        """The fast weights φ_k after k steps."""
        return self._iterates[k]

    def state(self, k: int) -> State:
        """The update rule's state s_k before step k."""
        return self._states[k]

    def verify(self) -> None:
        """Nothing to check: no step is replayed, the step function is pure."""

    def restore(self, first: int, last: int) -> None:
        """Nothing to recompute: every iterate is stored (see :meth:`metagrad.trajectory.Trajectory.restore`)."""

    def vjp(self, m: int, u: Params, state_adjoint: Optional[list[Optional[torch.Tensor]]] = None,
            *, second_order: bool = True
            ) -> tuple[Params, list[Optional[torch.Tensor]], Optional[list[Optional[torch.Tensor]]]]:
        """``(J_mᵀ u, B_mᵀ u, state adjoint)`` as :meth:`metagrad.trajectory.Trajectory.vjp`
        defines them, by :func:`metagrad.step.step_vjp` of the step at φ_m.

        Without ``state_adjoint`` the optimizer state is held constant; with it (``[]`` is
        zero) the product is through the whole step ``(φ_m, s_m) ↦ (φ_{m+1}, s_{m+1})``, its
        floating-point state leaves as inputs, and the adjoint of s_m (one entry per leaf of
        the flattened state, ``None`` for a leaf that is not a floating-point tensor) is
        returned third. ``second_order=False`` returns ``u`` itself (no η here).
        """
        if not second_order:
            return dict(u), [], None
        leaves = pytree.tree_leaves(self._states[m])
        carried = [] if state_adjoint is None else [i for i, t in enumerate(leaves) if _is_float_tensor(t)]
        adjoint = list(state_adjoint or [])
        s_adjoint = [adjoint[i] if i < len(adjoint) and adjoint[i] is not None else torch.zeros_like(leaves[i])
                     for i in carried]
        body = step_body(_loss_at(self.loss_fn, self.support), self.rule, list(self.theta),
                         state=self._states[m], carried=carried)
        pulled, _, pulled_state, *_ = step_vjp(body, self._iterates[m], [], [leaves[i] for i in carried],
                                              u, s_adjoint, carried)
        if state_adjoint is None:
            return dict(pulled), [], None
        adjoint_out: list[Optional[torch.Tensor]] = [None] * len(leaves)
        for i, g in zip(carried, pulled_state):
            adjoint_out[i] = g
        return dict(pulled), [], adjoint_out

    def batched_vjp(self, steps: Sequence[int], vectors: Params,
                    chunk_size: Optional[int] = None) -> tuple[Params, list[Optional[torch.Tensor]]]:
        """``J_mᵀ u_i`` for each ``m = steps[i]`` and row ``u_i`` of ``vectors`` (the state held
        constant), in one ``torch.func.vmap`` of :func:`metagrad.step.step_vjp` over the stored
        iterates and states stacked along a new first dimension (``chunk_size`` rows at a time,
        ``None``: all); and the η sum, empty here. ``chunk_size=1`` (or a single step) computes
        one :meth:`vjp` at a time without ``vmap``, as
        :meth:`metagrad.trajectory.Trajectory.batched_vjp` does."""
        steps = list(steps)
        if chunk_size == 1 or len(steps) == 1:  # one product at a time, without vmap
            rows = [self.vjp(m, {n: t[i] for n, t in vectors.items()})[0] for i, m in enumerate(steps)]
            return {n: torch.stack([r[n] for r in rows]) for n in vectors}, []
        phis = {n: torch.stack([self._iterates[m][n] for m in steps]) for n in self.theta}
        states = pytree.tree_map(lambda *ts: torch.stack(ts) if isinstance(ts[0], torch.Tensor) else ts[0],
                                 *[self._states[m] for m in steps])
        loss_at, rule, names = _loss_at(self.loss_fn, self.support), self.rule, list(self.theta)

        def row(phi: Params, state: State, u: Params) -> Params:
            return dict(step_vjp(step_body(loss_at, rule, names, state=state), phi, [], [], u, [])[0])

        state_dims = pytree.tree_map(lambda t: 0 if isinstance(t, torch.Tensor) else None, states)
        pulled = torch.func.vmap(row, in_dims=(0, state_dims, 0), chunk_size=chunk_size)(
            phis, states, dict(vectors))
        return {n: pulled[n] for n in vectors}, []


def check_estimator(estimator: Any) -> Estimator:
    """Resolve ``estimator`` and refuse those a pure function cannot run, with the reason the
    estimator gives (:meth:`~metagrad.Estimator.why_not_pure`; see
    :func:`metagrad.functional.meta_grad`)."""
    estimator = resolve(estimator)
    reason = estimator.why_not_pure()
    if reason is not None:
        raise ValueError(f"estimator: {reason}")
    return estimator
