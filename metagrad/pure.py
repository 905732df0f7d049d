"""A trajectory computed purely with ``torch.func``, for :func:`metagrad.functional.meta_grad`.

:class:`PureTrajectory` offers the primitive every estimator composes (:meth:`vjp`,
:meth:`batched_vjp`, :meth:`iterate`, ``length``, ``theta``, ``meta``), like
:class:`~metagrad.trajectory.Trajectory`, but for an inner loop given as a pure function:

    Φ(φ, s; η) = rule(η).step(φ, torch.func.grad(loss_at)(φ, η), s)

The inner loop runs without an autograd graph and records into the tape the context manager
records into (:class:`metagrad.tape.Tape`): the iterates φ_0 … φ_K and the optimizer states
s_0 … s_K, or with snapshots those of the schedule, the others recomputed by the same body
when a product needs them (:meth:`PureTrajectory.restore`). A product is ``torch.func.vjp`` of the step's one body
(:func:`metagrad.step.step_vjp`) at a stored φ_m, and many products are ``torch.func.vmap``
over the stored iterates stacked along a new first dimension. Nothing is replayed from a
closure, so there is nothing to check (:meth:`verify` does nothing), and no Python-side state
is read: the estimators that only compose these products run under ``torch.func.vmap`` and
``torch.compile``.

Meta-parameters η are explicit inputs of the loss (``loss_at(φ, η)``) and, where the update
rule holds one of them by identity (a learned step size), of the rule: ``B_mᵀu`` is part of
every product, as MATH.md's table defines it for each estimator.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch.utils import _pytree as pytree

from .estimators import Estimator, resolve
from .discovery import add_meta
from .errors import ReplayError
from .memory import saved_bytes
from .numerics import inexact, tolerance
from .replay import check_norms, refuse_twice, step_norms
from .snapshots import Schedule
from .tape import OnTape, Tape
from .step import (Body, Gradient, KeptStep, StepRecord, autograd_gradient, functional_gradient, held, hyperparameters,
                   proximal, pull_back, rule_slots, same_shapes, step_body, step_vjp, zero_if_none)
from .update_rule import Params, State, UpdateRule, at_vjp_level
from .pure_compiled import RUNS, Pieces

__all__ = ["PureTrajectory", "check_estimator", "unroll"]

LossAt = Callable[[Params, Sequence[torch.Tensor]], torch.Tensor]


def unroll(loss_at: LossAt, params: Params, rule: UpdateRule, steps: int,
           eta: Sequence[torch.Tensor] = (), rule_eta: Optional[dict[int, int]] = None
           ) -> tuple[list[Params], list[State]]:
    """The iterates φ_0 … φ_K and states s_0 … s_K of K steps of ``rule`` on ``loss_at(φ, η)``,
    each the step's body (:func:`metagrad.step.step_body`; ``rule_eta``: the η the rule holds).

    Differentiable when called under a ``torch.func`` transform of ``params`` and ``eta``
    (Full's branch).
    """
    phi, state = dict(params), rule.init(params)
    iterates, states = [phi], [state]
    for _ in range(steps):
        body = step_body(loss_at, rule, list(phi), state=state, rule_eta=rule_eta)
        (phi, state), _ = body(phi, eta, [])
        iterates.append(phi)
        states.append(state)
    return iterates, states


class PureTrajectory(OnTape):
    """The stored inner loop of a pure loss, with the products estimators use.

    Args:
        loss_at: ``loss_at(φ, η) -> scalar``, the inner loss at fast weights φ and the
            meta-parameters η (a list of tensors, empty for none).
        theta: the initialization θ, name→tensor.
        rule: the inner update rule (``rule.init`` / ``rule.step``).
        steps: K, the number of inner steps (taken here, without an autograd graph).
        meta: η, the tensors ``loss_at`` receives; those the rule holds too (a step size,
            by identity) are its step sizes.
        meta_names: a description of each η.
        tasks: T of a meta-batch, or ``None`` (one task).
        proximal: λ of Implicit's proximal term, or ``None``. (Every iterate is stored, whatever
            the estimator's ``keep``: the functional face's tape keeps them all.)
        once: what in the loss's graph cannot be differentiated twice (:attr:`once`), or ``None``.
    """

    #: The lengths of the runs of steps a compiled sweep may take, longest first
    #: (:attr:`~metagrad.tape.OnTape.runs`); the inner loop takes runs of :data:`RUNS`.
    run_lengths = RUNS

    def __init__(self, loss_at: LossAt, theta: Params, rule: UpdateRule, steps: int,
                 meta: Sequence[torch.Tensor] = (), meta_names: Sequence[str] = (),
                 snapshots: Optional[Schedule] = None, pieces: Optional[Pieces] = None,
                 tasks: Optional[int] = None, proximal: Optional[float] = None, once: Optional[str] = None) -> None:
        self.loss_at = loss_at
        #: A node of the loss's graph whose backward cannot be differentiated again, or whose
        #: derivative in torch is wrong (:func:`metagrad.discovery.once_differentiable`), described:
        #: every product that takes second derivatives refuses it (:meth:`_twice`); ``None``: none.
        self.once = once
        #: T of a meta-batch (the iterates hold T tasks' fast weights stacked; the loss is the
        #: sum of theirs), or ``None``: an estimator that chooses from norms chooses per task.
        self.tasks = tasks
        #: λ of a proximal term ``(λ/2)‖φ − θ‖²`` every step's gradient gets (Implicit's inner
        #: problem), or ``None``; θ is φ_0 (each task's own row of it).
        self.proximal = proximal
        self.rule = rule
        self.theta = dict(theta)
        self.meta = list(meta)
        self.meta_names = list(meta_names)
        #: Which η the rule holds (its step sizes), and where: id of the tensor → index in η.
        self.rule_eta = rule_slots(rule, self.meta)
        self.rule_meta = set(self.rule_eta.values())
        #: The tape both faces record into (metagrad.tape): every iterate, or with ``snapshots``
        #: those of the schedule, the others recomputed by the body when a product needs them.
        self.tape = Tape(self.theta, rule.init(self.theta), keep=None, snapshots=snapshots)
        #: Each step's state s_k flattened (its leaves and structure) as the run that took it had
        #: it, for the compiled sweeps; without snapshots only (they drop the states between).
        self._flat: Optional[dict[int, tuple[list[Any], Any]]] = {} if snapshots is None else None
        #: The compiled pieces (``meta_grad(compile=...)``), or ``None``: every step eagerly.
        self.pieces = pieces
        with torch.no_grad():
            while self.length < steps:
                self._advance(steps - self.length)

    def _advance(self, left: int) -> None:
        """Take the next inner steps: a compiled run, the longest of :attr:`runs` within the
        ``left`` steps, where the pieces are compiled and the state keeps its structure; else
        one step by the body."""
        current, state = self.tape.current, self.tape.state
        leaves, spec = pytree.tree_flatten(state)
        flat = (leaves, spec)  # the state the next record starts from
        out: Any = None
        if (self.pieces is not None and all(isinstance(t, torch.Tensor) for t in leaves)
                and self.pieces.keeps_structure(state)):
            out = self.pieces.run(current, leaves, spec, self.meta, next(run for run in RUNS if run <= left))
        if out is None:
            (new, new_state), (loss, _) = self._body(state)(current, self.meta, [])
            if self.pieces is not None:
                self.pieces.note_structure(state, new_state)
            out = [new], [pytree.tree_leaves(new_state)], [loss]
            spec = pytree.tree_structure(new_state)
        for new, new_leaves, loss in zip(*out):
            if self._flat is not None:
                self._flat[self.length] = flat
            record = StepRecord(params=self.tape.current, state=self.tape.state, closure=None, rule=self.rule,
                                loss=torch.zeros(()) if loss is None else loss)
            self.tape.append(record, dict(new), pytree.tree_unflatten(new_leaves, spec))
            flat = (list(new_leaves), spec)

    def _step(self, m: int) -> StepRecord:
        if m in self.tape.absent:
            self.restore(m, m)
        return self.tape.steps[m]

    def iterate(self, k: int) -> Params:
        """The fast weights φ_k after k steps."""
        return self.tape.current if k == self.length else self._step(k).params

    def state(self, k: int) -> State:
        """The update rule's state s_k before step k."""
        return self.tape.state if k == self.length else self._step(k).state

    def graph_bytes(self, m: int) -> int:
        """The bytes one graph of step m holds, as
        :meth:`metagrad.products.Products.graph_bytes` measures the context manager's: the
        tensors the step's body saves for backward with its gradient's graph (autograd's
        ``create_graph=True``, the form whose graph a product differentiates again), each
        storage counted once, the iterate itself not counted; built here and freed on return
        (``Binomial(max_memory=...)`` divides its budget by it). Called directly only (it
        counts storages as Python ints)."""
        params = {n: t.detach().requires_grad_() for n, t in self.iterate(m).items()}
        body = self._body(self.state(m), gradient=autograd_gradient(m))
        return saved_bytes(lambda: body(params, self.meta, []), params.values())

    def verify(self) -> None:
        """Nothing to check: no step is replayed, the step function is pure."""

    def check_rule(self) -> None:
        """Raise :class:`~metagrad.ReplayError` unless the update rule, run again from φ_0 (up to
        the first iterate stored after it), gives the steps the inner loop took. Every product
        calls the rule's step again; a rule whose step depends on Python state it does not
        return (torchopt's ``sgd(dampening>0)`` skips the dampening at its first call by a flag,
        a counter of calls) then gives other steps, and the meta-gradient would be another.
        Called directly only (it compares numbers), before the backward."""
        if self.length == 0:
            return
        end = 1 if self.tape.schedule is None else next((k for k in self.tape.stored if k > 0), self.length)
        params, state = self.iterate(0), self.state(0)
        attributes = hyperparameters(self.rule)  # (a rule that updates its own attributes: a counter)
        for k in range(end):  # (the first at a torch.func.vjp level: a rule written under torch.no_grad() is refused)
            body = self._body(state)
            params, state = at_vjp_level(lambda p: body(p, self.meta, [])[0], params) if k == 0 else \
                body(params, self.meta, [])[0]
        if hyperparameters(self.rule) != attributes:
            raise ReplayError(
                f"inner_opt: the update rule {self.rule!r} changes its own attributes when it takes a step "
                "(a counter, a schedule kept on the object), so the steps mg.functional.meta_grad runs "
                "again for the products are not the steps the inner loop took. Keep that state in the "
                "optimizer state the rule returns, or use estimator=mg.Full() without compile=, which "
                "differentiates the unroll that calls each step once.")
        stored, start = self.iterate(end), self.iterate(0)
        names = list(stored)
        norms = step_norms([[params[n]] for n in names], [[stored[n]] for n in names], [[start[n]] for n in names])
        first = next(iter(stored.values()))
        rtol = tolerance(first.dtype, first.device)
        if check_norms([0], norms, rtol, dtype=first.dtype, raising=False):  # (the replay check's own test)
            mismatch, length = float(norms[0, 0]), float(norms[1, 0])
            raise ReplayError(
                f"inner_opt: the update rule {self.rule!r}, run again from φ_0 for the meta-gradient's "
                f"products, gave other steps than the inner loop took: ‖Φ(φ_0) − φ_{end}‖ = {mismatch:.3g} "
                f"against {length:.3g} (tolerance {rtol:g} of it). Its step depends on Python state that "
                "changes from call to call (such as torchopt.sgd(dampening>0)'s first-call flag, or a "
                "counter), which mg.functional.meta_grad cannot replay. Use a rule whose state is all in "
                "the state it returns (dampening=0, or mg.optim.Momentum with dampening), or "
                "estimator=mg.Full() without compile=, which differentiates the unroll that calls each "
                "step once.")

    def restore(self, first: int, last: int) -> None:
        """Make the iterates φ_first … φ_last available (:meth:`metagrad.tape.Tape.restore`):
        with snapshots, recompute their segments by the step's body; otherwise nothing."""
        def advance(m: int, step: StepRecord, params: Params, state: State) -> tuple[Params, State]:
            return self._body(state)(params, self.meta, [])[0]

        def recompute(start: int, end: int) -> None:
            self.tape.recompute(start, end, advance)

        self.tape.restore(first, last, recompute, self.verify)

    def _twice(self, m: int) -> None:
        """Refuse a product through step ``m`` that takes second derivatives where the loss's
        graph cannot be differentiated twice (:attr:`once`), as the context manager refuses its steps."""
        if self.once is not None:
            refuse_twice(m, self.once, "loss_fn")

    def _body(self, state: State, carried: Sequence[int] = (), gradient: Gradient = functional_gradient,
              rule: Optional[UpdateRule] = None) -> Body:
        if self.proximal is not None:  # the proximal term's gradient λ(φ − θ), for every fast weight
            gradient = proximal(gradient, self.theta, self.proximal)
        return step_body(self.loss_at, self.rule if rule is None else rule, list(self.theta), state=state,
                         carried=carried, gradient=gradient, rule_eta=None if rule is not None else self.rule_eta)

    def fixed_point(self, k: int, rule: UpdateRule) -> KeptStep:
        """The step's body at the final fast weights φ_K, with ``rule`` in place of the inner
        loop's and the proximal term in its gradient, its autograd graph kept for repeated VJPs
        (as :meth:`metagrad.products.Products.fixed_point` builds it for the context manager):
        Implicit's ``(I − ∂Φ/∂φ)ᵀ λ = v`` is solved on its products. Called directly only (its
        graph is autograd's, and the solver reads residuals back as Python floats)."""
        if k != self.length:
            raise RuntimeError(f"the fixed point is the final fast weights φ_K (K={self.length}), not φ_{k}.")
        self._twice(k - 1)
        meta = [t.detach().requires_grad_() for t in self.meta]  # leaves: B's products by autograd
        return KeptStep.at(self.loss_at, rule, self.current, meta, step=k - 1, used=None, theta=self.theta,
                           reg=self.proximal or 0.0)

    def vjp(self, m: int, u: Params, state_adjoint: Optional[list[Optional[torch.Tensor]]] = None,
            *, second_order: bool = True
            ) -> tuple[Params, list[Optional[torch.Tensor]], Optional[list[Optional[torch.Tensor]]]]:
        """``(J_mᵀ u, B_mᵀ u, state adjoint)`` as :meth:`metagrad.trajectory.Trajectory.vjp`
        defines them, by :func:`metagrad.step.step_vjp` of the step at φ_m.

        Without ``state_adjoint`` the optimizer state is held constant; with it (``[]`` is
        zero) the product is through the whole step ``(φ_m, s_m) ↦ (φ_{m+1}, s_{m+1})``, its
        floating-point state leaves as inputs, and the adjoint of s_m (one entry per leaf of
        the flattened state, ``None`` for a leaf that is not a floating-point tensor) is
        returned third. ``second_order=False``: ``u`` itself, and the step sizes' part of
        ``B_mᵀ u`` with the gradient held constant (:func:`metagrad.step.held`).
        """
        if not second_order:
            if not self.rule_meta:
                return dict(u), [], None
            body = self._body(self.state(m), gradient=held(functional_gradient))
            return dict(u), list(step_vjp(body, self.iterate(m), self.meta, [], u, [])[1]), None
        self._twice(m)
        compiled = self._compiled_sweep(m, m + 1, u, state_adjoint)
        if compiled is not None:
            return compiled
        leaves = pytree.tree_leaves(self.state(m))
        carried = [] if state_adjoint is None else [i for i, t in enumerate(leaves) if inexact(t)]
        adjoint = list(state_adjoint or [])
        # s_{m+1}'s float leaves take the adjoint (its shapes; a state that starts empty has more)
        after = [] if state_adjoint is None else pytree.tree_leaves(self.state(m + 1))
        returned = [i for i, t in enumerate(after) if inexact(t)]
        s_adjoint = [zero_if_none(adjoint[i] if i < len(adjoint) else None, after[i]) for i in returned]
        pulled, pulled_eta, pulled_state, *_ = step_vjp(self._body(self.state(m), carried), self.iterate(m),
                                                        self.meta, [leaves[i] for i in carried], u, s_adjoint,
                                                        carried, returned)
        if state_adjoint is None:
            return dict(pulled), list(pulled_eta), None
        adjoint_out: list[Optional[torch.Tensor]] = [None] * len(leaves)
        for i, g in zip(carried, pulled_state):
            adjoint_out[i] = g
        return dict(pulled), list(pulled_eta), adjoint_out

    def sweep(self, first: int, last: int, u: Params, state_adjoint: Optional[list[Optional[torch.Tensor]]] = None
              ) -> tuple[Params, list[Optional[torch.Tensor]], Optional[list[Optional[torch.Tensor]]]]:
        """``u`` pulled back through steps ``last − 1`` down to ``first``, as
        :meth:`metagrad.trajectory.Trajectory.sweep` defines it: :meth:`vjp` step by step, or
        one compiled call for the run (``meta_grad(compile=...)``)."""
        compiled = self._compiled_sweep(first, last, u, state_adjoint)
        if compiled is not None:
            return compiled
        return pull_back(self.vjp, first, last, u, state_adjoint)

    def _compiled_sweep(self, first: int, last: int, u: Params, state_adjoint: Optional[list[Optional[torch.Tensor]]]
                        ) -> Optional[tuple[Params, list[Optional[torch.Tensor]], Optional[list[Optional[torch.Tensor]]]]]:
        """:meth:`sweep` by one call of the compiled pieces, or ``None`` where there are none or
        the steps' states are not tensors of one structure."""
        if self.pieces is None:
            return None
        self._twice(last - 1)
        self.restore(first, last)  # with snapshots: their segments, recomputed once
        known = self._flat or {}
        flat = [known[m] if m in known else pytree.tree_flatten(self.state(m)) for m in range(first, last)]
        states, spec = [leaves for leaves, _ in flat], flat[0][1]
        if (any(other != spec for _, other in flat[1:])
                or not all(isinstance(t, torch.Tensor) for row in states for t in row)):
            return None
        carried = [] if state_adjoint is None else [i for i, t in enumerate(states[0]) if inexact(t)]
        adjoint = list(state_adjoint or [])
        if state_adjoint is not None and pytree.tree_structure(self.state(last)) != spec:
            return None  # (a state that starts empty: its first step, by vjp)
        after = pytree.tree_leaves(self.state(last)) if carried else []  # (s_last: its adjoint's shapes)
        s_adjoint = [zero_if_none(adjoint[i] if i < len(adjoint) else None, after[i]) for i in carried]
        out = self.pieces.sweep([self.iterate(m) for m in range(first, last)], states, spec, self.meta, u,
                                carried, s_adjoint)
        if out is None:
            return None
        pulled, pulled_eta, pulled_state = out
        if state_adjoint is None:
            return pulled, list(pulled_eta), None
        adjoint_out: list[Optional[torch.Tensor]] = [None] * len(states[0])
        for i, g in zip(carried, pulled_state):
            adjoint_out[i] = g
        return pulled, list(pulled_eta), adjoint_out

    def batched_vjp(self, steps: Sequence[int], vectors: Params,
                    chunk_size: Optional[int] = None) -> tuple[Params, list[Optional[torch.Tensor]]]:
        """``J_mᵀ u_i`` for each ``m = steps[i]`` and row ``u_i`` of ``vectors`` (the state held
        constant), in one ``torch.func.vmap`` of :func:`metagrad.step.step_vjp` over the stored
        iterates and states stacked along a new first dimension (``chunk_size`` rows at a time,
        ``None``: all); and ``Σ_i B_mᵀ u_i``, one entry per η. ``chunk_size=1`` (or a single
        step) computes one :meth:`vjp` at a time without ``vmap``, as
        :meth:`metagrad.trajectory.Trajectory.batched_vjp` does."""
        steps = list(steps)
        self._twice(max(steps, default=0))
        if chunk_size != 1 and len(steps) > 1:
            self.restore(min(steps), max(steps) + 1)  # with snapshots: their segments, recomputed once
        if chunk_size == 1 or len(steps) == 1 or not same_shapes(
                list(zip(*(pytree.tree_leaves(self.state(m)) for m in steps)))):
            # one product at a time, without vmap (also where a state leaf changes shape step by step)
            rows: list[Params] = []
            meta: list[Optional[torch.Tensor]] = []
            for i, m in enumerate(steps):
                pulled, more, _ = self.vjp(m, {n: t[i] for n, t in vectors.items()})
                rows.append(pulled)
                meta = add_meta(meta, more)
            return {n: torch.stack([r[n] for r in rows]) for n in vectors}, meta
        phis = {n: torch.stack([self.iterate(m)[n] for m in steps]) for n in self.theta}
        states = pytree.tree_map(lambda *ts: torch.stack(ts) if isinstance(ts[0], torch.Tensor) else ts[0],
                                 *[self.state(m) for m in steps])

        def row(phi: Params, state: State, u: Params, eta: list[torch.Tensor]) -> tuple[Params, list[torch.Tensor]]:
            pulled, pulled_eta, *_ = step_vjp(self._body(state), phi, eta, [], u, [])
            return dict(pulled), list(pulled_eta)

        state_dims = pytree.tree_map(lambda t: 0 if isinstance(t, torch.Tensor) else None, states)
        if self.pieces is not None:
            compiled = self.pieces.rows(phis, states, state_dims, dict(vectors), self.meta, chunk_size)
            if compiled is not None:
                return {n: compiled[0][n] for n in vectors}, list(compiled[1])
        pulled, pulled_eta = torch.func.vmap(row, in_dims=(0, state_dims, 0, None), chunk_size=chunk_size)(
            phis, states, dict(vectors), self.meta)
        return {n: pulled[n] for n in vectors}, [g.sum(0) for g in pulled_eta]


def check_estimator(estimator: Any, traced: bool = True) -> Estimator:
    """Resolve ``estimator`` and refuse those a pure function cannot run, with the reason the
    estimator gives (:meth:`~metagrad.Estimator.why_not_pure`; ``traced``: the call runs under
    ``torch.func.vmap``, ``torch.func.grad`` or ``torch.compile``; see
    :func:`metagrad.functional.meta_grad`)."""
    estimator = resolve(estimator)
    if "traced" in inspect.signature(estimator.why_not_pure).parameters:
        reason = estimator.why_not_pure(traced=traced)
    else:  # an override written without ``traced``: its reasons hold for every call
        reason = estimator.why_not_pure()
    if reason is not None:
        raise ValueError(f"estimator: {reason}")
    return estimator
