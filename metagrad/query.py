"""Where a query meets the inner loop: the autograd nodes between θ, η and the fast weights φ_K.

``meta.fmodel`` holds φ_K behind one of two nodes. :class:`ThroughInnerLoop` ((θ, η) ↦ φ_K)
runs the estimator in its backward; :class:`Watched` (φ_K ↦ φ_K) passes gradients through to
a differentiable inner loop's own graph (Full, and exact estimators in nested blocks), after
the same checks. :class:`Snapshot` is what either needs: the trajectory, the steps the query
was built after, and the checks and bookkeeping around a backward. Where θ is fixed and no
meta-parameter was found, :class:`NothingToLearn` stands in their place and its backward
raises.
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Collection, Sequence
from typing import Any, Optional

import torch

from .discovery import graph_inputs, register_block_outputs
from .errors import warn
from .estimators import Estimator
from .trajectory import Trajectory

__all__ = ["Snapshot", "ThroughInnerLoop", "Watched", "NothingToLearn", "learnable", "nothing_to_learn", "attached", "on_theta_grad"]

#: The latest autograd graph tasks whose backward went through some block's inner loop (any
#: block's: two blocks open on one model each see the other's query reach θ).
_THROUGH_A_BLOCK: collections.deque[int] = collections.deque(maxlen=64)


class Snapshot:
    """What the backward of a query built after ``steps`` inner steps needs."""

    def __init__(self, owner: Any, trajectory: Trajectory, steps: int) -> None:
        # owner: the MetaGradient block (held weakly; ``meta.info`` is written to it).
        self._owner = weakref.ref(owner)
        self.trajectory = trajectory
        self.lifetime = trajectory.lifetime
        self.steps = steps
        #: The estimator the block runs (with ``compile=``, :meth:`~metagrad.Estimator.under_compile`).
        self.estimator: Estimator = owner._running
        self.named = repr(owner.estimator)
        #: T of a block over tasks (θ's gradient is the sum of the tasks'), or ``None``.
        self.tasks: Optional[int] = owner.tasks
        self.names: tuple[str, ...] = owner._names
        self.params: tuple[torch.nn.Parameter, ...] = owner._params
        self.versions: tuple[int, ...] = owner._versions
        #: The meta-parameters η found in the first ``steps`` inner steps.
        self.meta = list(trajectory.meta)
        self.meta_names = list(trajectory.meta_names)

    def run(self, v: dict[str, Optional[torch.Tensor]]
            ) -> tuple[dict[str, Optional[torch.Tensor]], list[Optional[torch.Tensor]]]:
        """The estimator's backward, between the checks and the bookkeeping: the gradients
        for θ (by name) and for η (one per :attr:`meta`, ``None`` for zero).

        ``v[n]`` is ``None`` where the query does not use fast weight n; it counts as zero,
        and θ_n's gradient stays ``None`` if no inner step used n either (no path reaches it,
        as plain autograd would find)."""
        self.begin()
        dense = {n: torch.zeros_like(p) if (g := v[n]) is None else g for n, p in zip(self.names, self.params)}
        if self.trajectory.compiler is not None:
            # Laid out plainly (a dimension of size 1 may come with any stride out of the query's
            # backward): the compiled sweeps then meet one layout and compile once.
            dense = {n: t.clone(memory_format=torch.contiguous_format) for n, t in dense.items()}
        recomputed = self.trajectory.recomputed_steps
        stored = self.trajectory.stored_iterates
        with torch.enable_grad():
            grads, meta, info = self.estimator.backward(self.trajectory, self.steps, dense)
        self.trajectory.forget()  # runs the replay checks still queued (metagrad.replay)
        storage: dict[str, Any] = dict(self.trajectory.storage())
        storage.update(stored_iterates=stored, recomputed_steps=storage["recomputed_steps"] - recomputed)
        if self.trajectory.compiler is not None:  # what ran compiled, in this block so far
            storage["compiled"] = {**self.trajectory.compiler.counts, "estimator": repr(self.estimator)}
        self.end({**info, **storage, "meta_parameters": self.meta_names})
        if self.tasks is not None:  # φ_0 = θ for every task: θ's gradient is their sum
            grads = {n: g.sum(0) for n, g in grads.items()}
        # No path from the query reaches θ_n when the query does not use φ_K[n] and the
        # estimate for it is structurally zero (an inner-only parameter that nothing couples
        # to the rest); plain autograd then leaves .grad as it was, and so does this.
        theta = {n: None if v[n] is None and not bool(grads[n].any()) else grads[n] for n in self.names}
        meta = list(meta)[:len(self.meta)] + [None] * (len(self.meta) - len(meta))
        return theta, meta

    def begin(self) -> None:
        """Raise if the trajectory was released or θ changed in place since the block began."""
        self.lifetime.check()
        self.lifetime.tasks.add(torch._C._current_graph_task_id())
        _THROUGH_A_BLOCK.append(torch._C._current_graph_task_id())
        changed = [n for n, p, version in zip(self.names, self.params, self.versions)
                   if p._version != version]
        if changed:
            raise RuntimeError(
                f"model: parameters {changed} were modified in place after this inner loop "
                "started (for example by outer.step()), so the stored trajectory no longer "
                "starts from them. Call .backward() on the query loss before updating the model."
            )

    def end(self, info: dict[str, Any], final: bool = True) -> None:
        """Report ``info`` as ``meta.info``; release the trajectory if the block has ended,
        unless another backward will come (``final=False``)."""
        owner = self._owner()
        if owner is not None:
            owner.info = {"estimator": self.named, **info}
        if not final:
            return
        self.lifetime.backward_calls += 1
        if self.lifetime.block_ended:  # (its end said nothing on K where no backward had run)
            said = warn_at_end(self.estimator, self.trajectory) if self.lifetime.backward_calls == 1 else None
            self.trajectory.release()
            if said is not None:
                raise said


class ThroughInnerLoop(torch.autograd.Function):
    """(θ, η) ↦ φ_K. Forward returns the stored fast weights; backward runs the estimator.

    The estimator's result carries no graph, so this backward cannot be differentiated again:
    a backward with ``create_graph=True`` through it raises rather than lose the second
    derivative. A block nested in an outer block's step that is differentiated twice does not
    use this node (:func:`metagrad.context._nesting`)."""

    @staticmethod
    def forward(ctx: Any, snapshot: Snapshot, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # inputs: θ, then the meta-parameters η, whose gradients backward returns too.
        ctx.snapshot = snapshot
        ctx.set_materialize_grads(False)  # a fast weight the query does not use: None
        final = snapshot.trajectory.iterate(snapshot.steps)
        return tuple(final[n].detach() for n in snapshot.names)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        snapshot: Snapshot = ctx.snapshot
        if snapshot.trajectory.pulling:  # reached from inside a product: φ_m is held fixed there
            return (None,) * (1 + len(snapshot.names) + len(snapshot.meta))
        if torch.is_grad_enabled():  # create_graph=True: the caller will differentiate the result
            raise RuntimeError(
                f"MetaGradient: a backward with create_graph=True reached a block whose estimator "
                f"{snapshot.estimator!r}{_ran_as(snapshot)} computes the meta-gradient outside autograd, so the result "
                "could not be differentiated again and the second derivative through the block "
                "would be lost. Use estimator=mg.Full() for that block, or open it inside another "
                "MetaGradient block's inner step (nested blocks), where Full and Checkpointed are "
                "differentiable."
            )
        with torch.no_grad():
            grads, meta = snapshot.run({n: _dense(g) for n, g in zip(snapshot.names, grad_outputs)})
        # An η the estimator gives nothing through the inner loop (FirstOrder keeps no second
        # derivative: an η of the inner loss, MATH.md's table) gets zeros where the backward is
        # a torch.autograd.grad that returns its gradient: torch would otherwise raise that it
        # "appears to not have been used in the graph". A .backward() leaves its .grad as it is.
        meta = [torch.zeros_like(eta) if g is None and _captured(eta) else g
                for g, eta in zip(meta, snapshot.meta)]
        return (None, *(grads[n] for n in snapshot.names), *meta)


def _dense(grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A fast weight's gradient as the dense vector every product takes (a sparse one comes from
    ``nn.Embedding(sparse=True)``)."""
    return grad.to_dense() if grad is not None and grad.is_sparse else grad


class Watched(torch.autograd.Function):
    """φ_K ↦ φ_K for a differentiable inner loop (Full): gradients pass through unchanged,
    after the block's checks; autograd then carries them through the unrolled steps."""

    @staticmethod
    def forward(ctx: Any, snapshot: Snapshot, *final: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.snapshot = snapshot
        ctx.set_materialize_grads(False)  # None passes through, as plain autograd leaves it
        return tuple(t.view_as(t) for t in final)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        snapshot: Snapshot = ctx.snapshot
        snapshot.begin()
        # MATH.md's table: Full's backward through the K step graphs makes K products. A
        # backward with create_graph=True (grad mode on here: an outer block's step through a
        # nested block) is followed by one through its graph, which comes here again: the
        # trajectory is released after that one.
        snapshot.end({"steps": snapshot.steps, "hessian_vector_products": snapshot.steps,
                      **snapshot.trajectory.storage()}, final=not torch.is_grad_enabled())
        return (None, *(_dense(g) for g in grad_outputs))


class NothingToLearn(torch.autograd.Function):
    """φ ↦ φ for a block with θ fixed (no adapted parameter requires grad) and no
    meta-parameter found: nothing reaches anything to learn, and a backward through the fast
    weights raises ``ValueError(message)``, which says what would work. Its first input is an
    empty leaf that requires grad (:meth:`of` makes it), so that the outputs require grad and
    the backward comes here."""

    @staticmethod
    def forward(ctx: Any, message: str, anchor: torch.Tensor, *weights: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        ctx.message = message
        return tuple(t.detach().view_as(t) for t in weights)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        raise ValueError(ctx.message)

    @staticmethod
    def of(message: str, weights: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``weights`` behind the node, which raises ``message`` in backward."""
        anchor = torch.empty(0, requires_grad=True)
        return NothingToLearn.apply(message, anchor, *weights)  # type: ignore[no-any-return]


def _captured(eta: torch.Tensor) -> bool:
    """Whether the backward running now returns a gradient for ``eta``, or for a leaf behind
    it (``w = hypernet(z)``: hypernet's parameters), instead of accumulating it into ``.grad``:
    ``torch.autograd.grad(query_loss, [eta])``. Torch refuses to say whether it will execute a
    leaf's accumulation node while ``autograd.grad`` captures that leaf; it answers ``False``
    for a leaf the backward does not reach at all (zeros are not used there)."""
    leaves = [eta] if eta.is_leaf else graph_inputs([eta], set(), {})[0]
    for leaf in leaves:
        try:
            node = torch.autograd.graph.get_gradient_edge(leaf).node
            if not torch._C._will_engine_execute_node(node):
                return True
        except RuntimeError:  # "... we are currently running autograd.grad()"
            return True
    return False


def learnable(trajectory: Any, differentiable: bool) -> bool:
    """With θ fixed: whether the inner steps taken so far depend on a meta-parameter η.
    The η found by discovery; a differentiable inner loop (Full) finds none and keeps the
    ``.grad`` of what its steps reach instead, and failing that its graph is searched for a
    leaf that requires grad other than its starting point."""
    if trajectory.meta or trajectory.meta_saved_grads:
        return True
    if not differentiable or trajectory.length == 0:
        return False
    start = {id(t) for t in trajectory.theta.values()}
    return bool(graph_inputs(list(trajectory.current.values()), start, {})[0])


def nothing_to_learn(model: torch.nn.Module, adapt: Optional[Collection[str]], k: int) -> str:
    """The error a backward through fast weights with nothing to learn raises."""
    among = "" if adapt is None else f" among adapt={sorted(adapt)}"
    steps = ("no inner step was taken" if k == 0 else
             f"the {k} inner step{'' if k == 1 else 's'} taken depend{'s' if k == 1 else ''} on no "
             "meta-parameter (a tensor that requires grad used by the inner loss, or a step "
             "size that requires grad in inner_opt)")
    return (
        f"model: {type(model).__name__} has no parameters that require grad{among}, and "
        f"{steps}, so a backward through meta.fmodel has nothing to meta-learn. Make the model's "
        "parameters require grad (model.requires_grad_()) to learn θ, or use in the closure a "
        "tensor that requires grad (torch.tensor(..., requires_grad=True)), or pass one as "
        "inner_opt's step size (mg.optim.SGD(lr=lr_tensor)), to learn it."
    )


def _ran_as(snapshot: Snapshot) -> str:
    """For an error: the estimator the block was given, where another ran in its place."""
    named = snapshot.named
    if named == repr(snapshot.estimator):
        return ""
    return (f" (running for {named} under compile=, its exact compiled path; compile=False runs "
            f"{named} itself)")


def attached(block: Any, trajectory: Trajectory, k: int, *, watched: bool) -> dict[str, torch.Tensor]:
    """φ_k of ``block`` (a :class:`~metagrad.MetaGradient`), name→tensor, attached to θ and η:
    behind :class:`ThroughInnerLoop` (whose backward runs the estimator), or for a
    differentiable inner loop the unrolled iterate itself (behind :class:`Watched`'s checks if
    ``watched``). With θ fixed and no η found, behind :class:`NothingToLearn`, whose backward
    raises. In a block over T tasks φ_0 is θ expanded to a leading dimension of T."""
    names, params = block._names, block._params
    if block.tasks is not None:
        params = tuple(p.expand(block.tasks, *p.shape) for p in params)
    if k > 0:
        trajectory.iterate(k)  # raises clearly if the estimator no longer stores step k
    if block._theta_fixed and not learnable(trajectory, block._differentiable):
        weights = params if k == 0 else [trajectory.iterate(k)[n].detach() for n in names]
        outputs = NothingToLearn.of(nothing_to_learn(block.model, block.adapt, k), weights)
        return dict(zip(names, outputs))
    if k == 0:
        return dict(zip(names, params))
    if block._differentiable:
        final = trajectory.iterate(k)
        if not watched:
            return dict(final)
        # The unrolled iterates themselves, behind a node that only checks: backward
        # is autograd's own pass through the query and the K step graphs.
        outputs = Watched.apply(Snapshot(block, trajectory, k), *(final[n] for n in names))
        register_block_outputs(outputs)
        return dict(zip(names, outputs))
    snapshot = Snapshot(block, trajectory, k)
    outputs = ThroughInnerLoop.apply(snapshot, *block._params, *snapshot.meta)
    register_block_outputs(outputs)
    return dict(zip(names, outputs))


def on_theta_grad(trajectory: Optional[Trajectory], warned: bool,
                  written: Optional[Sequence[tuple[str, torch.Tensor, int]]] = None) -> bool:
    """A backward inside a block wrote θ's ``.grad``: warn, once (returns whether it has), if it
    did not go through the inner loop although steps were taken (a query built from the model
    itself gives the plain ∇L(θ)), and no earlier backward of the block did (after the query's,
    a penalty on θ back-propagated on its own is a term of the user's, not a mistaken query).

    ``written``, given when the parameter whose ``.grad`` was written had been changed in place
    since the block began (``(name, parameter, version at entry)`` of each of θ): raise. That
    gradient was taken at parameters the block's inner loop does not start from; with no step
    taken, it is an inner loop that updates the model itself (``torch.optim``'s ``step()``), whose
    gradient is the plain one at the updated parameters and no meta-gradient."""
    if written is not None:
        changed = [n for n, p, version in written if p._version != version]
        inner = (" No inner step was taken with meta.step: an inner loop that updates the model "
                 "itself (an optimizer's opt.step() on model.parameters(), or a write under "
                 "torch.no_grad()) changes θ and gives the plain gradient at the changed parameters, "
                 "not a meta-gradient. Take each inner step with meta.step(closure, *batch), which "
                 "adapts fast weights and leaves the parameters as they are."
                 if trajectory is None or trajectory.length == 0 else "")
        raise RuntimeError(
            f"model: parameters {changed} were modified in place inside the block, before a backward "
            f"that reached them.{inner} Update the model (outer_opt.step()) only after the query's "
            "backward."
        )
    if warned or trajectory is None or trajectory.length == 0 or trajectory.lifetime.tasks:
        return warned  # (this backward, or an earlier one, went through the block's node)
    if torch._C._current_graph_task_id() in _THROUGH_A_BLOCK:
        return warned  # (through another block's: one open on the same model, its query's backward)
    warn(f"MetaGradient: a backward inside the block reached the model's parameters but not "
         f"through the inner loop ({trajectory.length} steps taken): its loss was built from the "
         "model itself, so it gives the plain gradient at θ, not a meta-gradient. Build the query "
         "loss from meta.fmodel (meta.fmodel(x)), the model at the fast weights.")
    return True


def warn_at_end(estimator: Estimator, trajectory: Trajectory) -> Optional[Exception]:
    """Say what ``estimator`` says about the block's K steps (:meth:`~metagrad.Estimator.length_warning`)
    once the block has ended without an error and a backward went through it (at its end, or at
    the first backward after it): only then is K known (MAML++'s per-step losses are
    back-propagated after each of the first k < K steps). Returns the
    warning where the warnings filter turned it into an error (the block then ends as one that
    raised), else ``None``."""
    if trajectory.lifetime.backward_calls > 0 and (said := estimator.length_warning(trajectory.length)):
        try:
            warn(said)
        except Exception as error:  # (warnings.simplefilter("error"))
            return error
    return None
