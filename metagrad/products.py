"""The step's products: a vector pulled back through one inner step rebuilt from its record.

Estimators compose one primitive, :meth:`Products.vjp` (``J_mᵀ u`` and ``B_mᵀ u`` of step m, MATH.md
(3)), by a double backward through the step's graph rebuilt at φ_m and freed on return;
:mod:`metagrad.batched` computes many at once under ``torch.func.vmap``. Every rebuilt step is
checked against the stored next iterate (MATH.md, "Replaying a step"): the checks are queued
and run together (:meth:`Products.verify`).

How a product is formed, measured (``python -m benchmarks.products``; a 2-core x86_64
CPU, 1 torch thread, torch 2.13.0, float32; time per product, B products per call):

============  ====  ===============  ===============  =====================
config        B     vmap(vjp∘grad)   vmap(jvp∘grad)   loop of double backward
============  ====  ===============  ===============  =====================
sinusoid MLP  20    0.13 ms          fails            0.62 ms
28×28 CNN4    20    12.8 ms          13.4 ms          13.1 ms
84×84 CNN4    4     1031 ms          979 ms           447 ms
============  ====  ===============  ===============  =====================

Reverse-over-reverse (``vjp`` of ``grad``, a double backward) is kept on every device:
forward-over-reverse (``jvp`` of ``grad``) was within 5% of it on the CPU where it ran,
used 1.2–1.4× its memory, and fails under ``vmap`` on ``F.mse_loss`` in this torch
("ZeroTensors are immutable"). Batching with ``vmap`` pays on the CPU for small models (4.8×
faster than a loop on the MLP), breaks even at 28×28 and loses on large ones (2.3× slower
at 84×84, with 2.5× the memory): there, ``Binomial(chunk_size=1)`` computes one plain double
backward at a time.

A product needs the gradient's graph at φ_m. The inner loop's own gradient has none (that
is what keeps its memory at iterates only), so each product rebuilds it: there is no
gradient to reuse in an exact product.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ContextManager, Optional

import torch
from torch.utils import _pytree as pytree

from .discovery import MetaGrads, add_meta, reaches
from .attention import math_attention
from .memory import saved_bytes
from .numerics import inexact
from .frozen import replaying_reads
from .generators import RandomState
from .update_rule import Params, UpdateRule
from .replay import ReplayError, check_norms, check_reads, refuse_twice, step_norms
from .step import (KeptStep, StepRecord, autocast_dtype, autograd_gradient, kept_gradient, loss_grads, rule_slots, step_body,
                   same_shapes, step_size_vjp, zero_if_none)
from .tape import NestedBlockError, differentiated_twice

__all__ = ["Products"]

#: Rebuilt steps whose replay checks are queued before they run together (:meth:`Products.verify`).
_CHECK_BATCH = 16


class Products:
    """The products of one trajectory's steps (see the module docstring)."""

    def __init__(self, trajectory: Any) -> None:
        # trajectory: the metagrad.trajectory.Trajectory these products belong to (its tape,
        # η, module and replay tolerance); typed loosely, as it is the layer above.
        self.trajectory = trajectory
        #: Rebuilt steps whose replay checks are queued: (step, rebuilt Φ_m(φ_m), loss, its
        #: ∂ℓ/∂η for the fingerprint or ``None``: :class:`~metagrad.replay.EtaProbes`).
        self.pending: list[tuple[int, Params, torch.Tensor, Optional[list[Optional[torch.Tensor]]]]] = []
        #: Runs of rebuilt steps whose norms a compiled sweep computed (:meth:`check_norms`):
        #: (steps, their :func:`~metagrad.replay.step_norms`, their losses, their ∂ℓ/∂η fingerprints).
        self.measured: list[tuple[list[int], torch.Tensor, torch.Tensor, list[Optional[torch.Tensor]]]] = []
        #: A product through a kept graph is being computed (see :meth:`vjp`).
        self.pulling = False

    def rebuild(self, m: int, step: StepRecord, params: Params, *, create_graph: bool = True
                 ) -> tuple[torch.Tensor, Params, Optional[list[Optional[torch.Tensor]]]]:
        """Step m's loss and gradient at ``params`` (leaves that require grad), with the
        gradient's graph (``create_graph=True``; without it, for a step recomputed forward),
        from the frozen closure and, if the step drew random numbers, the generator states it
        drew them from; and the loss's ``∂ℓ/∂η`` where the step kept its fingerprint
        (:meth:`eta_inputs`), else ``None``."""
        loss = self.rebuilt_loss(m, step, params, create_graph=create_graph)
        eta, out = self.eta_inputs(step)
        grads = loss_grads(loss, params, create_graph=create_graph, step=m, used=step.used, also=eta, also_out=out,
                           retain_graph=True if eta else None)
        return loss, grads, out

    def eta_inputs(self, step: StepRecord, meta: Optional[list[torch.Tensor]] = None
                   ) -> tuple[list[torch.Tensor], Optional[list[Optional[torch.Tensor]]]]:
        """The η whose ``∂ℓ/∂η`` a rebuild of ``step`` takes for the replay check (those known when
        the step was taken, from ``meta`` where given: :meth:`partial_eta`'s), and the list it
        fills; none where the step kept no fingerprint."""
        self.trajectory.etas.flush()
        if step.eta_grad is None or self.trajectory.replay_rtol is None:
            return [], None
        return self.trajectory.eta.read(meta)[:len(step.eta_grad)], []

    def as_taken(self, rng: Optional[RandomState], modes: tuple[bool, ...],
                 autocast: Optional[torch.dtype] = None) -> ContextManager[None]:
        """Run a rebuild as its step ran: the random generators from the states the step drew
        from, every submodule in the mode (train or eval) it was in, and autocast as it was
        (mixed precision set around the inner loop). All are put back. A rebuild is
        differentiated twice, so attention runs its math kernel (:func:`~metagrad.attention.math_attention`)."""
        tr = self.trajectory
        now = tuple(sub.training for sub in tr.submodules)
        if rng is None and (not modes or modes == now) and autocast == autocast_dtype(tr.device.type):
            return math_attention()  # as it is now (the common case: no other work per rebuild)
        return self._as_taken(rng, modes, autocast, now)

    @contextlib.contextmanager
    def _as_taken(self, rng: Optional[RandomState], modes: tuple[bool, ...],
                  autocast: Optional[torch.dtype], now: tuple[bool, ...]) -> Iterator[None]:
        tr = self.trajectory
        changed = bool(modes) and modes != now
        if changed:
            for sub, mode in zip(tr.submodules, modes):
                sub.training = mode
        device_type = tr.device.type
        precision = (contextlib.nullcontext() if autocast == autocast_dtype(device_type) else
                     torch.autocast(device_type, dtype=autocast, enabled=autocast is not None))
        try:
            with rng.replay() if rng is not None else contextlib.nullcontext(), precision, math_attention():
                yield
        finally:
            if changed:
                for sub, mode in zip(tr.submodules, now):
                    sub.training = mode

    def check(self, m: int, rebuilt: Params, loss: torch.Tensor,
              eta: Optional[list[Optional[torch.Tensor]]] = None) -> None:
        """Queue the replay check of step m (the rebuilt ``Φ_m(φ_m)`` against the stored
        ``φ_{m+1}``, and the fingerprint of ``eta``, its ``∂ℓ/∂η``, against the recorded one);
        :meth:`verify` runs the queue, and so does every 16th entry. Checking
        steps together costs a few batched calls instead of a few calls per tensor per step."""
        if self.trajectory.replay_rtol is None:
            return
        self.pending.append((m, {n: t.detach() for n, t in rebuilt.items()}, loss.detach(), eta))
        self._queued()

    def check_norms(self, steps: list[int], norms: torch.Tensor, losses: torch.Tensor,
                    eta: Optional[tuple[list[int], list[torch.Tensor]]] = None) -> None:
        """Queue the replay check of ``steps`` from the norms their rebuild computed already
        (:func:`metagrad.replay.step_norms`, ``[3, len(steps)]``: a compiled sweep or product returns
        them instead of the rebuilt iterates), their rebuilt losses and ``eta``, their ∂ℓ/∂η
        (explicit η indices, each one's gradients stacked over the steps: :meth:`row_fingerprints`)."""
        if self.trajectory.replay_rtol is None:
            return
        found = self.row_fingerprints(steps, *eta) if eta is not None else None
        self.measured.append((list(steps), norms.detach(), losses.detach(),
                              [None] * len(steps) if found is None else list(found.unbind(0))))
        self._queued()

    def row_fingerprints(self, steps: Sequence[int], explicit: Sequence[int], grads: Sequence[torch.Tensor]
                         ) -> Optional[torch.Tensor]:
        """The fingerprints (``[rows, n, 3]``) of rebuilt steps' ``∂ℓ/∂η`` given for the explicit η
        (indices into η, each one's gradients stacked over the rows; zero for the others: the rule's
        step sizes), where one of ``steps`` kept a fingerprint to compare them with; else ``None``."""
        tr = self.trajectory
        tr.etas.flush()
        kept = [tr._step(m).eta_grad for m in steps]
        if not any(k is not None for k in kept):
            return None
        count = max(len(k) for k in kept if k is not None)
        found: list[Optional[torch.Tensor]] = [None] * count
        for k, i in enumerate(explicit):
            if i < count:
                found[i] = grads[k]
        return tr.etas.probes.fingerprint(found, tr.meta[:count], rows=len(steps))

    def _queued(self) -> None:
        if len(self.pending) + sum(len(run[0]) for run in self.measured) >= _CHECK_BATCH:
            self.verify()

    def verify(self) -> None:
        """Run the queued replay checks; raise :class:`~metagrad.ReplayError` on a mismatch.

        Callers of :meth:`vjp` call it before they hand out a result (the context manager does,
        after every estimator's backward)."""
        tr = self.trajectory
        pending, self.pending = self.pending, []
        measured, self.measured = self.measured, []
        if not (pending or measured) or tr.replay_rtol is None:
            return
        steps: list[int] = []
        norms: list[torch.Tensor] = []
        losses: list[torch.Tensor] = []
        etas: list[Optional[torch.Tensor]] = []
        if pending:
            names = list(tr.theta)
            steps = [m for m, _, _, _ in pending]
            nexts = [tr.iterate(m + 1) for m in steps]
            starts = [tr._step(m).params for m in steps]
            with torch.no_grad():
                norms.append(step_norms([[r[n] for _, r, _, _ in pending] for n in names],
                                        [[t[n] for t in nexts] for n in names], [[t[n] for t in starts] for n in names]))
            losses.append(torch.stack([loss for _, _, loss, _ in pending]))
            etas += tr.etas.fingerprints([eta for _, _, _, eta in pending])
        for run, run_norms, run_losses, run_etas in measured:
            steps += run
            norms.append(run_norms)
            losses.append(run_losses.reshape(-1))
            etas += run_etas
        records = [tr._step(m) for m in steps]
        recorded = torch.stack([step.loss for step in records])
        scale = tr.eta_scale()
        check_norms(steps, torch.cat(norms, 1), tr.replay_rtol, dtype=next(iter(tr.theta.values())).dtype,
                    losses=(torch.cat(losses), recorded), closures=[step.closure for step in records],
                    meta=tr.meta_names, eta=(etas, [step.eta_grad for step in records], scale))

    def vjp(self, m: int, u: Params, state_adjoint: Optional[list[Optional[torch.Tensor]]] = None,
            *, second_order: bool = True
            ) -> tuple[Params, MetaGrads, Optional[list[Optional[torch.Tensor]]]]:
        """The primitive every estimator composes: pull ``u`` back through step m, with respect
        to the step's input φ_m and to the meta-parameters η (:attr:`meta`).

        Returns ``(J_mᵀ u, B_mᵀ u, state adjoint)`` with ``J_m = ∂φ_{m+1}/∂φ_m`` and ``B_m =
        ∂φ_{m+1}/∂η`` (MATH.md (3)), by a double backward through the step's graph, rebuilt
        at φ_m (or kept, for a step taken from a given loss); ``B_mᵀ u`` lists one entry per η,
        ``None`` for zero.

        - Without ``state_adjoint`` the optimizer state is held constant. With it: the
          vector-Jacobian product of the whole step ``(φ_m, s_m) ↦ (φ_{m+1}, s_{m+1})``
          applied to ``(u, state_adjoint)``, and the adjoint of s_m is returned third.
          ``state_adjoint`` lists one adjoint per leaf of the flattened state
          (``torch.utils._pytree``), ``None`` or missing for zero; ``[]`` starts from zero.
        - ``second_order=False``: the step with its gradient held constant (MATH.md's table,
          the earlier steps of Truncated, FirstOrder): ``(u, the step-size part of B_mᵀ u,
          None)``, from the update's graph to the rule's η that the inner loop kept; no
          graph is rebuilt.

        A rebuilt step passes the replay check (:meth:`_check`).
        """
        tr = self.trajectory
        meta = tr.meta
        if not second_order:
            return dict(u), self.step_size_part(m, u), None
        step = tr._step(m)
        carry = state_adjoint is not None
        if tr.compiler is not None and step.batch_key() is not None and not step.once and keeps_shapes(tr, m, step.state):
            out = tr.compiler.product(tr, [m], [step], u, step.state, state_adjoint, batched=False)
            if out is not None:
                pulled, pulled_eta, adjoint, norms, loss, grads, explicit, eta_grads = out
                self.check_norms([m], norms, loss.reshape(1), (explicit, [g.unsqueeze(0) for g in eta_grads]))
                meta_grads: MetaGrads = [None] * len(meta)
                for k, i in enumerate(explicit):
                    meta_grads[i] = pulled_eta[k]
                if tr.rule_meta:  # a step size's part, from the gradient the compiled call took
                    meta_grads = add_meta(meta_grads, self.step_size_part(m, u, grads, state_adjoint))
                return pulled, meta_grads, adjoint
        leaves, spec = pytree.tree_flatten(step.state)
        carried = [i for i, t in enumerate(leaves)
                   if carry and inexact(t)]
        with torch.enable_grad():
            replace, meta = self.partial_eta(step)
            eta, eta_out = self.eta_inputs(step, meta)
            if step.graph is not None:  # taken from a given loss: its gradient's graph was kept
                if step.once:  # (a closure's step is refused where it is rebuilt: rebuilt_loss)
                    refuse_twice(m, step.once, "loss")
                params, kept = step.graph
                gradient = kept_gradient(kept)
            else:
                params = {n: t.detach().requires_grad_() for n, t in step.params.items()}
                gradient = autograd_gradient(m, step.used, also=eta, also_out=eta_out)
            moving = [leaves[i].detach().requires_grad_() for i in carried]
            # The step's body (metagrad.step.step_body), differentiated again by autograd: the
            # closure reads η where it holds them, so autograd follows η wherever they are.
            body = step_body(lambda q, eta: self.rebuilt_loss(m, step, q, replace=replace), step.rule,
                             step.used, state=step.state, carried=carried, gradient=gradient, around_rule=step.rule_as_taken)
            (new_params, new_state), (loss, _) = body(params, meta, moving)
            if loss is not None:
                self.check(m, new_params, loss, eta_out)
            elif step.graph is not None:  # the kept gradient, but the update is run again: checked too
                self.check(m, new_params, step.loss)
            outputs = [new_params[n] for n in params]
            cotangents = [u[n] for n in params]
            for leaf, adjoint in zip(pytree.tree_leaves(new_state), state_adjoint or []):  # (by the new state's leaves)
                if adjoint is not None and isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                    outputs.append(leaf)
                    cotangents.append(adjoint)
            inputs = list(params.values()) + moving + meta
            # η may be reached through graphs of the user's (w = hypernet(z)): keep them. A
            # kept graph's fast weights are themselves computed from θ and η (the estimator's
            # node of an earlier step): with `pulling` set, that node passes nothing back, so
            # B_m holds φ_m fixed as it must.
            self.pulling = step.graph is not None
            try:
                out = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True,
                                          retain_graph=step.graph is not None or bool(meta))
            finally:
                self.pulling = False
        pulled = {n: zero_if_none(g, params[n]) for n, g in zip(params, out)}
        meta_grads = list(out[len(out) - len(meta):]) if meta else []
        if not carry:
            return pulled, meta_grads, None
        adjoint_out: list[Optional[torch.Tensor]] = [None] * len(leaves)
        for i, g in zip(carried, out[len(params):len(params) + len(carried)]):
            adjoint_out[i] = g
        return pulled, meta_grads, adjoint_out

    def partial_eta(self, step: StepRecord) -> tuple[dict[int, torch.Tensor], list[torch.Tensor]]:
        """For a product by autograd: η as the tensors to differentiate by, with each captured η
        that has a history of its own (a computed tensor: ``w = hypernet(z)``, an outer block's
        fast weights) replaced by a leaf alias in the rebuild, ``(slot → alias, η list)``.
        ``B_m = ∂φ_{m+1}/∂η`` is a partial derivative: autograd must not follow one η into
        the history of another (an outer block's fast weights depend on its own η, which may
        be η here too), which would count that path twice and run the outer block's backward
        inside this product."""
        meta = list(self.trajectory.meta)
        replace: dict[int, torch.Tensor] = {}
        if step.closure is None or not meta:
            return replace, meta
        index = {id(t): i for i, t in enumerate(meta)}
        for slot, tensor in step.closure.tensors:
            i = index.get(id(tensor))
            if i is not None and tensor.grad_fn is not None:
                meta[i] = replace[slot] = tensor.detach().requires_grad_()
        return replace, meta

    def step_size_part(self, m: int, u: Params, grads: Optional[Params] = None,
                       state_adjoint: Optional[list[Optional[torch.Tensor]]] = None) -> MetaGrads:
        """``B_mᵀu`` of the update rule's own η (learned step sizes) with the gradient held
        constant: the update ``rule(φ_m, g_m, s_m)`` differentiated in η by autograd, and its new
        state with ``state_adjoint`` (s_{m+1}'s, as :meth:`vjp` takes it; a rule may compute its
        state from its η, a learned momentum ``b ← μ b + g``). It is the whole of ``B_mᵀu`` for
        those η where the step Jacobian is the identity (MATH.md's table: FirstOrder, Truncated's
        earlier steps), their part of it where a product ran under ``torch.func`` (vmapped or
        compiled: the rule's η are constants there). ``g_m`` is that product's gradient
        (``grads``); else, for a step whose iterate is not stored, the update the inner loop
        kept; else recomputed at φ_m (a forward and backward, no second derivative) and checked
        like every rebuilt step. No estimator that stores the iterates keeps an update graph per step."""
        tr, meta = self.trajectory, self.trajectory.meta
        if not tr.rule_meta:
            return [None] * len(meta)
        carried = any(a is not None for a in state_adjoint or [])
        new, new_state = (None, None) if carried else (tr.tape.first_order.get(m), None)
        if new is None:
            step = tr._step(m)
            if tr.eta.rule_holds_eta(step.rule, ()) is False:
                return [None] * len(meta)
            loss, eta = None, None
            if grads is None and step.graph is not None:
                grads = step.graph[1]
            elif grads is None:
                with torch.enable_grad():
                    params = {n: t.detach().requires_grad_() for n, t in step.params.items()}
                    loss, grads, eta = self.rebuild(m, step, params, create_graph=False)
            with torch.enable_grad():
                new, new_state = tr.update(step.rule, step.params, {n: g.detach() for n, g in grads.items()},
                                           step.state, True, step.rule_as_taken)
            if loss is not None or step.graph is not None:  # (a kept gradient: the update is run again)
                self.check(m, new, step.loss if loss is None else loss, eta)
        return step_size_vjp(new, meta, u, new_state if carried else None, state_adjoint) or [None] * len(meta)

    def explicit(self, m: int, step: StepRecord) -> Optional[dict[int, tuple[str, Any]]]:
        """Where each η sits for a rebuild of step m under ``torch.func`` (:meth:`MetaParameters.explicit
        <metagrad.discovery.MetaParameters.explicit>`), or ``None`` where only autograd follows them: also for
        a step size the loss reads, and where the loss with each placed η swapped for a copy still reaches one."""
        tr = self.trajectory
        where = tr.eta.explicit(step.closure)
        seen = None if not where or step.closure is None else tr.eta.closures.get(step.closure.key)
        twice = bool(where) and any(where[i][0] != "rule" for i in rule_slots(step.rule, tr.meta).values())
        sole = True if not where else False if twice else None if seen is None else seen.sole  # (once per closure)
        if sole is None:
            copies = {i: tr.meta[i].detach().requires_grad_() for i, (kind, _) in where.items() if kind != "rule"}
            with torch.enable_grad():
                loss = self.rebuilt_loss(m, step, dict(step.params), create_graph=False,
                                         replace={where[i][1]: c for i, c in copies.items() if where[i][0] == "slot"},
                                         fixed={where[i][1]: c for i, c in copies.items() if where[i][0] == "param"})
            sole = not reaches(loss, list(tr.meta))  # (the rule's η: no input of the loss)
            if seen is not None:
                seen.sole = sole
        return where if sole else None

    def rebuilt_loss(self, m: int, step: StepRecord, params: Params, *, create_graph: bool = True,
                     replace: Optional[dict[int, torch.Tensor]] = None, fixed: Optional[Params] = None) -> torch.Tensor:
        """Step m's loss at ``params``, from the frozen closure run as the step ran
        (:meth:`as_taken`), the captured tensors at slots ``replace`` swapped (:meth:`partial_eta`)
        and the module's parameters not adapted named in ``fixed``; an error the closure raises
        now is a :class:`~metagrad.ReplayError`."""
        tr = self.trajectory
        assert step.closure is not None
        if step.once and create_graph:
            refuse_twice(m, step.once)
        try:
            with self.as_taken(step.rng, step.modes, step.autocast), differentiated_twice(create_graph), \
                    step.frozen().replaying(), replaying_reads(step.model_reads):
                return step.frozen().call(replace or {}, tr.model_at(params, fixed or None))
        except NestedBlockError:
            raise
        except Exception as error:
            self.verify()  # a mismatch found earlier says more
            raise ReplayError(
                f"closure: rebuilt during backward at inner step {m}, it raised {type(error).__name__}: "
                f"{error}. It ran at that step in the inner loop, so it reads something that has "
                "changed since (an iterator read with next() inside the closure is exhausted, an "
                "object's state moved on). Compute each step's data outside the closure and capture "
                "it, or use estimator=mg.Full(), which without compile=True does not rebuild steps."
            ) from error

    def graph_bytes(self, m: int) -> int:
        """The bytes one rebuilt graph of step m holds: the tensors its forward pass and its
        gradient (built with ``create_graph=True``) save for backward, each storage counted
        once, the iterate itself not counted. This is what each further product in a batched
        call adds (:meth:`batched_vjp`), and what ``Binomial(max_memory=...)`` divides its
        budget by. The graph is built here and freed on return.
        """
        tr = self.trajectory
        step = tr._step(m)
        if step.graph is not None:
            params, grads = step.graph
            return sum(g.untyped_storage().nbytes() for g in grads.values())
        params = {n: t.detach().requires_grad_() for n, t in step.params.items()}

        def build() -> None:
            with self.as_taken(step.rng, step.modes, step.autocast), differentiated_twice(True), \
                    step.frozen().replaying():
                loss = step.frozen()(tr.model_at(params))
                grads = loss_grads(loss, params, create_graph=True, step=m, used=step.used)
                tr.update(step.rule, params, grads, step.state, None, step.rule_as_taken)

        return saved_bytes(build, params.values())

    def fixed_point(self, k: int, rule: UpdateRule) -> KeptStep:
        """The step's body at the final fast weights φ_K = φ*, with ``rule`` in place of the
        inner loop's and the proximal term of the trajectory in its loss, its graph kept for
        repeated VJPs (MATH.md, "The same thing through the step's VJP"): Implicit's
        ``(I − ∂Φ/∂φ)ᵀ λ = v`` is solved on these products. The loss is the last step's closure
        rebuilt at φ_K; the proximal term's gradient covers every fast weight (one the loss does
        not use is then pulled to θ by it alone, a fixed point whatever θ).
        """
        tr = self.trajectory
        last = tr.tape.last
        closure = None if last is None else last.closure
        if closure is None and tr.length > 0:
            raise RuntimeError(
                "the last inner step was taken from a loss tensor, so its graph cannot be "
                "rebuilt at the final fast weights; take inner steps with a closure "
                "(diffopt.step(closure=...)) to use this estimator."
            )
        if k != tr.length or last is None or closure is None:
            raise RuntimeError(
                f"the fixed point is the final fast weights φ_K (K={tr.length}), but the "
                f"query was built after {k} steps. Build the query loss from meta.fmodel after "
                "the last inner step."
            )
        step = last
        if step.once:
            refuse_twice(k - 1, step.once)
        # Rebuilt at φ_K, where no stored next iterate checks it: a value the closure reads that
        # changed since its step would define another inner problem (for θ and for η alike).
        check_reads([k - 1], [closure], "It is rebuilt at the final fast weights φ_K, where no stored "
                    "iterate checks it, and the values it reads define the inner problem the fixed point solves.",
                    captured=True)
        replace, meta = self.partial_eta(step)
        kept = KeptStep.at(lambda q, eta: self.rebuilt_loss(k - 1, step, q, replace=replace), rule, tr.iterate(k),
                           meta, step=k - 1, used=step.used, theta=tr.theta, reg=tr.proximal or 0.0)
        closure.taken()  # (what the rebuild itself wrote is no change)
        return kept


def keeps_shapes(trajectory: Any, m: int, state: Any) -> bool:
    """Whether step m returned an optimizer state whose leaves have the shapes of those of
    ``state``, the one it was given, where the one it returned is stored: a compiled product is
    traced for fixed shapes, so the steps of a rule whose state grows (a history) are taken eagerly."""
    after = trajectory.tape.state if m + 1 == trajectory.length else \
        getattr(trajectory.tape.steps.get(m + 1), "state", None)
    before, returned = pytree.tree_leaves(state), pytree.tree_leaves(after)
    return len(before) != len(returned) or same_shapes(list(zip(before, returned)))
