"""Many step products at once: :meth:`Products.vjp <metagrad.products.Products.vjp>` for many
steps in ``torch.func.vmap`` calls over the stored iterates (Binomial's levels).

Consecutive steps whose frozen closures differ at most in the tensors they capture, with the
same rule, go into one call; the tensors that differ become batched inputs. η that the closure
captures, and module parameters not adapted, are explicit inputs of the call; a step size's part
comes from the update the inner loop kept.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch.utils import _pytree as pytree

from .discovery import MetaGrads, add_meta
from .errors import SparseGradientError, UpdateRuleError, sparse_gradient, warn
from .numerics import tolerance
from .update_rule import Params, State
from .replay import ReplayError, check_norms, refuse_twice, step_norms
from .step import StepRecord, eta_grads_of, stacked, step_body, step_size_vjp, step_vjp, with_eta, zero_if_none

__all__ = ["AGREES", "Batched"]

#: For each module (held weakly), the kinds of step (:meth:`Batched.agrees`) whose vmapped products
#: were compared with one computed alone: whether they agreed. Process-wide, so that only a kind's
#: first vmapped call on a module pays.
AGREES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[Any, bool]]" = weakref.WeakKeyDictionary()


class Batched:
    """The vmapped products of one trajectory's steps."""

    def __init__(self, trajectory: Any, products: Any) -> None:
        # trajectory: the metagrad.trajectory.Trajectory (the layer above); products: its
        # metagrad.products.Products, whose single products and checks these batch.
        self.trajectory = trajectory
        self.products = products

    def batched_vjp(self, steps: Sequence[int], vectors: Params,
                    chunk_size: Optional[int] = None) -> tuple[Params, MetaGrads]:
        """:meth:`vjp` for many steps at once: ``J_mᵀ u_i`` for each ``m = steps[i]`` and row
        ``u_i`` of ``vectors``, and ``Σ_i B_mᵀ u_i`` (one entry per η, ``None`` for zero).

        ``vectors`` maps each name to a tensor with a leading dimension of
        ``len(steps)``; the result has the same layout. Steps are batched with
        ``torch.func.vmap`` in chunks of at most ``chunk_size`` (``None``: all at once).
        Consecutive steps whose frozen closures differ at most in the tensors they capture
        (equal :attr:`~metagrad.frozen.Frozen.key`), with the same rule, go into one call; the
        tensors that differ become batched inputs. A step that drew random numbers, or was
        taken from a given loss, is computed alone, and so is a chunk of one step, as a plain
        double backward (:meth:`vjp`): on a 2-core x86_64 CPU (AMD EPYC), torch 2.13.0, at
        84×84, a vmapped call of one product took 2.3× the time and 1.4× the memory of one.
        Every rebuilt step passes the replay check. Meta-parameters η that the closure captures,
        or module parameters not adapted, are explicit inputs of the vmapped call, and a step
        size's part comes from the update the inner loop kept; an η found elsewhere (behind an
        object the closure calls) can only be followed by autograd, and then every product is
        computed alone.
        """
        tr = self.trajectory
        rows = len(steps)
        if rows:  # the iterates of these steps, and the next one for the replay check
            tr.restore(min(steps), max(steps) + 1)
        size = rows if chunk_size is None else chunk_size
        pieces: list[Params] = []
        meta_sum: MetaGrads = [None] * len(tr.meta)
        start = 0
        while start < rows:
            first_step = tr._step(steps[start])
            key = (first_step.batch_key() if not tr.meta or self.products.explicit(steps[start], first_step)
                   else None)
            if key is not None and AGREES.get(tr.module, {}).get(_kind(first_step, key)) is False:
                key = None  # (a kind whose vmapped products were found wrong: alone, :meth:`agrees`)
            stop = start + 1
            while (key is not None and stop < rows and stop - start < size
                   and tr._step(steps[stop]).batch_key() == key):
                stop += 1
            chunk = [tr._step(m) for m in steps[start:stop]]
            u = {n: t[start:stop] for n, t in vectors.items()}
            states = stacked([s.state for s in chunk]) if stop - start > 1 else None
            if states is not None:
                try:
                    pulled, meta_grads = self.vmapped_vjp(list(steps[start:stop]), chunk, states, u)
                    pieces.append(pulled)
                    meta_sum = add_meta(meta_sum, meta_grads)
                except _Unbatchable as error:  # (this kind alone from now on)
                    assert key is not None  # (steps batched together share one)
                    AGREES.setdefault(tr.module, {})[_kind(first_step, key)] = False
                    what, fix = error.args
                    warn(f"closure: {what}, which torch.func.vmap cannot batch, so Binomial rebuilds these "
                         f"steps one at a time, as autograd takes them (exact, slower). {fix}")
                    states = None
            if states is None:  # one step, or states that cannot be batched: one product per step
                for i, m in enumerate(steps[start:stop]):
                    pulled, meta_grads, _ = self.products.vjp(m, {n: t[i] for n, t in u.items()})
                    pieces.append({n: t.unsqueeze(0) for n, t in pulled.items()})
                    meta_sum = add_meta(meta_sum, meta_grads)
            start = stop
        return {n: torch.cat([p[n] for p in pieces]) for n in vectors}, meta_sum

    def vmapped_vjp(self, steps: list[int], chunk: list[StepRecord], states: State, u: Params
                     ) -> tuple[Params, MetaGrads]:
        tr = self.trajectory
        first = chunk[0]
        if first.once:
            refuse_twice(steps[0], first.once)
        out = None if tr.compiler is None else tr.compiler.product(tr, steps, chunk, u, states, None,
                                                                        batched=True)
        norms: Optional[torch.Tensor] = None  # the replay norms, where the compiled call computed them
        if out is None:
            pulled, pulled_eta, rebuilt, losses, grads, explicit, eta_grads = self.rows(steps, chunk, states, u)
        else:
            pulled, pulled_eta, _, norms, losses, grads, explicit, eta_grads = out
        fingerprint = None if tr.replay_rtol is None else self.products.row_fingerprints(steps, explicit, eta_grads)
        meta: MetaGrads = [None] * len(tr.meta)
        for k, i in enumerate(explicit):
            meta[i] = pulled_eta[k].sum(0)
        failed: list[int] = []
        if tr.replay_rtol is not None:
            recorded = torch.stack([s.loss for s in chunk])
            if norms is None:
                names = list(tr.theta)
                nexts = [tr.iterate(m + 1) for m in steps]
                with torch.no_grad():
                    norms = step_norms([rebuilt[n].unbind(0) for n in names], [[nxt[n] for nxt in nexts] for n in names],
                                       [[s.params[n] for s in chunk] for n in names])
            failed = check_norms(steps, norms, tr.replay_rtol, dtype=next(iter(tr.theta.values())).dtype,
                                 losses=(losses, recorded), raising=False,
                                 closures=[s.closure for s in chunk], meta=tr.meta_names,
                                 eta=None if fingerprint is None else
                                 (list(fingerprint.unbind(0)), [s.eta_grad for s in chunk], tr.eta_scale()))
        if not failed and not self.agrees(steps[0], chunk[0], {n: t[0] for n, t in u.items()},
                                          {n: t[0] for n, t in pulled.items()}, [e[0] for e in pulled_eta], explicit):
            failed = list(range(len(steps)))  # (this kind of step is computed alone from now on)
        if failed:
            # A batched kernel rounds differently from the one the step was taken with,
            # and an ill-conditioned step (BatchNorm over a few examples in float32) can
            # magnify that past the tolerance. Those rows are rebuilt alone, as the step
            # was taken, and checked again there: a real mismatch raises then.
            pulled = {n: t.clone() for n, t in pulled.items()}
            for row_index in failed:
                for k, i in enumerate(explicit):
                    total = meta[i]
                    meta[i] = None if total is None else total - pulled_eta[k][row_index]
                alone, more, _ = self.products.vjp(steps[row_index], {n: t[row_index] for n, t in u.items()})
                for n in pulled:
                    pulled[n][row_index] = alone[n]
                meta = add_meta(meta, more)
        if tr.rule_meta:  # B_mᵀu of a step size: the update with the rows' gradients held constant
            kept = [i for i in range(len(steps)) if i not in failed]  # (the others were computed alone)
            meta = add_meta(meta, self.step_size_rows(first.rule, [chunk[i] for i in kept], states, kept,
                                                      {n: t[kept] for n, t in u.items()},
                                                      {n: g[kept] for n, g in grads.items()}))
        return pulled, meta

    def agrees(self, m: int, step: StepRecord, u: Params, pulled: Params, pulled_eta: list[torch.Tensor],
               explicit: list[int]) -> bool:
        """Whether the vmapped product of step ``m`` (its row ``pulled``, and its ``pulled_eta`` of
        the ``explicit`` η) agrees with the product computed alone, by autograd: looked at once
        per module and kind of step (:data:`AGREES`: the closure's key, the rule's type, the weights
        used, the modes), at its first vmapped call. torch.func takes some second derivatives otherwise
        than autograd: through a TorchScript function (``torch.jit.script``), whose autodiff graph
        it differentiates wrongly, in torch 2.13. A kind that disagrees is computed alone from
        then on (:meth:`batched_vjp`), with a warning."""
        key = step.batch_key()
        known = AGREES.setdefault(self.trajectory.module, {})
        kind = None if key is None else _kind(step, key)
        if kind is None or kind in known:
            return known.get(kind, True)
        alone, more, _ = self.products.vjp(m, u)
        # Compared where a second derivative enters: u − Jᵀu (J = I − αH for SGD) and η's part.
        batched = [u[n] - pulled[n] for n in u] + [pulled_eta[k] for k in range(len(explicit))]
        single = [u[n] - alone[n] for n in u] + [zero_if_none(more[i] if i < len(more) else None, pulled_eta[k])
                                                  for k, i in enumerate(explicit)]
        first = next(iter(u.values()))
        eps = torch.finfo(first.dtype).eps
        norm = lambda ts: float(torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in ts])))  # noqa: E731
        off = norm([a - b for a, b in zip(batched, single)])
        allowed = tolerance(first.dtype, first.device) * norm(single) + 100 * eps * (norm(list(u.values())) + norm(single))
        if not (math.isfinite(off) and math.isfinite(allowed)):
            return True  # (a product that is not finite tells nothing: looked at again at the next call)
        known[kind] = agrees = off <= allowed
        if not agrees:
            warn(f"closure: the products of inner step {m} computed together under torch.func.vmap (Binomial's "
                 f"rows) differ from the same product computed alone by autograd ({off:.3g} against "
                 f"{norm(single):.3g}): torch.func takes a second derivative in its loss otherwise than autograd, "
                 "as it does through a TorchScript function (torch.jit.script), wrongly. Steps of this closure "
                 "are rebuilt one at a time from now on, as Binomial(chunk_size=1) does; define such a function "
                 "without torch.jit.script to batch them.")
        return agrees

    def step_size_rows(self, rule: Any, chunk: list[StepRecord], states: State, rows: list[int],
                       u: Params, grads: Params) -> MetaGrads:
        """``Σ_i B_{m_i}ᵀu_i`` of the rule's own η (step sizes) over the ``rows`` of a chunk, with
        each row's gradient held constant (:meth:`~metagrad.products.Products.step_size_part`
        for many steps): the update under ``torch.func.vmap`` over the rows, differentiated in η
        by one autograd call."""
        tr = self.trajectory
        if not chunk or tr.eta.rule_holds_eta(rule, ()) is False:
            return []
        params = {n: torch.stack([s.params[n] for s in chunk]) for n in tr.theta}
        index = torch.tensor(rows, device=next(iter(params.values())).device)
        state_rows = pytree.tree_map(lambda t: t.index_select(0, index) if isinstance(t, torch.Tensor) else t,
                                     states)
        with torch.enable_grad():
            new = torch.func.vmap(lambda p, g, s: rule.step(p, g, s)[0])(params, grads, state_rows)
        return step_size_vjp(new, tr.meta, u)

    def rows(self, steps: list[int], chunk: list[StepRecord], states: State, u: Params
             ) -> tuple[Params, list[torch.Tensor], Params, torch.Tensor, Params, list[int], list[torch.Tensor]]:
        """The rows of :meth:`vmapped_vjp` by one eager ``torch.func.vmap`` of the step's VJP
        (:func:`metagrad.step.step_vjp`): ``J_mᵀu_i``, ``B_mᵀu_i`` per explicit η (per row),
        the rebuilt ``Φ_m(φ_m)``, losses and gradients (only where the rule holds η: each row's
        gradient is an iterate's size), the indices of those η in ``meta``, and each one's
        ``∂ℓ/∂η`` per row (for the replay check's fingerprints)."""
        tr = self.trajectory
        first = chunk[0]
        template, rule, used = first.closure, first.rule, first.used
        assert template is not None
        where = self.products.explicit(steps[0], first) or {}
        # η as explicit, unbatched inputs of the vmapped step (the rule's own come after).
        explicit = [i for i, (kind, _) in where.items() if kind != "rule"]
        eta = [tr.meta[i] for i in explicit]
        slots = [slot for slot, _ in template.tensors]
        position = {slot: j for j, slot in enumerate(slots)}
        eta_slots = {position[where[i][1]]: k for k, i in enumerate(explicit) if where[i][0] == "slot"}
        eta_params = {where[i][1]: k for k, i in enumerate(explicit) if where[i][0] == "param"}
        # The captured tensors that differ between the chunk's steps are batched inputs.
        varying = [j for j, (_, tensor) in enumerate(template.tensors)
                   if any(s.frozen().tensors[j][1] is not tensor for s in chunk[1:])]
        captured = [torch.stack([s.frozen().tensors[j][1] for s in chunk]) if j in varying
                    else t for j, (_, t) in enumerate(template.tensors)]
        params = {n: torch.stack([s.params[n] for s in chunk]) for n in tr.theta}
        model_at = tr.model_at

        def loss(q: Params, module: Params, tensors: list[torch.Tensor]) -> torch.Tensor:
            return template.with_tensors(dict(zip(slots, tensors)))(model_at(q, module))

        step_sizes = bool(tr.rule_meta)  # the rows' gradients are kept only for the rule's η

        def row(p: Params, state: State, vector: Params, tensors: list[torch.Tensor],
                eta: list[torch.Tensor]) -> tuple[Any, ...]:
            body = step_body(with_eta(loss, tensors, {}, eta_slots, eta_params), rule, used, state=state,
                             eta_grads=bool(eta))  # ∂ℓ/∂η: the replay check's (EtaProbes)
            pulled_p, pulled_eta, _, new, loss_value, grads = step_vjp(body, p, eta, [], vector, [])
            grads, eta_grads = eta_grads_of(grads, len(eta))
            return pulled_p, pulled_eta, new, loss_value, grads if step_sizes else {}, eta_grads

        try:
            # no_grad: the rule's own η (a step size that requires grad) must not record an
            # autograd graph through the batch; its part comes from the kept update below.
            with self.products.as_taken(None, first.modes, first.autocast), torch.no_grad():
                pulled, pulled_eta, rebuilt, losses, grads, eta_grads = torch.func.vmap(
                    row, in_dims=(0, 0, 0, [0 if j in varying else None for j in range(len(slots))], None))(
                        params, states, u, captured, eta)
        except UpdateRuleError:  # (the rule's own fault, said where it is found)
            raise
        except Exception as error:
            if (unbatchable := _unbatchable(error)) is not None:
                raise unbatchable from error
            if not isinstance(error, (RuntimeError, ValueError)):  # e.g. an exhausted iterator
                self.products.verify()
                raise ReplayError(
                    f"closure: rebuilt during backward at inner steps {steps[0]}…{steps[-1]}, it raised "
                    f"{type(error).__name__}: {error}. It ran at those steps in the inner loop, so it "
                    "reads something that has changed since (an iterator read with next() inside the "
                    "closure). Compute each step's data outside the closure and capture it, or use "
                    "estimator=mg.Full(), which without compile=True does not rebuild steps."
                ) from error
            raise RuntimeError(
                "closure or update rule: rebuilding inner steps under torch.func.vmap failed. "
                "Closures and update rules used with Binomial must be vmap-compatible: no .item() or "
                "data-dependent control flow, no in-place writes to captured tensors, no .backward() (meta.step "
                "takes the inner gradient itself: return the loss), no op torch "
                "cannot vmap there (an op without a batching rule; LayerNorm's double backward under "
                "bfloat16 autocast), no module backward hook (register_full_backward_hook) and no "
                "saved-tensor hooks (torch.autograd.graph.save_on_cpu) around it. Use "
                "Binomial(chunk_size=1), which rebuilds one step at a time without vmap, or "
                f"estimator=Checkpointed(). ({error})"
            ) from error
        return pulled, pulled_eta, rebuilt, losses, grads, explicit, list(eta_grads)


class _Unbatchable(RuntimeError):
    """A kind of step whose products ``torch.func.vmap`` cannot take, which autograd takes alone."""


def _unbatchable(error: Exception) -> Optional[_Unbatchable]:
    """``error``, raised by vmapped rows, as a kind of step that autograd takes alone (its args: why,
    and how to batch them, for :meth:`Batched.batched_vjp`'s warning), or ``None``."""
    if isinstance(error, SparseGradientError) or sparse_gradient(error) is not None:
        return _Unbatchable("its inner gradient is sparse (nn.Embedding(sparse=True))",
                            "To batch them, build the embedding with sparse=False (the same gradient, dense).")
    if isinstance(error, RuntimeError) and "setup_context" in str(error):  # (torch.func: the new style only)
        return _Unbatchable("it calls a torch.autograd.Function written without setup_context (its forward "
                            "takes ctx)", "To batch them, give the Function a setup_context staticmethod "
                            "and generate_vmap_rule = True.")
    return None


def _kind(step: StepRecord, key: tuple[Any, ...]) -> tuple[Any, ...]:
    """A kind of step for :data:`AGREES`: its batch key with the rule's type for the rule itself."""
    return (key[0], type(step.rule), *key[2:])
