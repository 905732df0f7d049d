"""One inner step: what it is made of, recorded once (:class:`StepRecord`), and the pieces
every form of it uses — the checked loss, its gradient, the update with its state.

An inner step is ``Φ(φ, s; η) = rule(φ, ∇_φ ℓ(φ), s; η)``. The inner loop takes it
(:meth:`metagrad.trajectory.Trajectory.advance`); a product rebuilds it from its record and
pulls a vector back through it. The step's body is written once, :func:`step_body`, and every
product is a transformation of it:

- eager (:meth:`metagrad.products.Products.vjp`): the body with autograd's gradient
  (:func:`autograd_gradient`), differentiated again by ``torch.autograd.grad`` — a double
  backward, which on the sinusoid MLP took 0.57× the time of ``torch.func.vjp`` eagerly;
- functional (:func:`step_vjp`): ``torch.func.vjp`` of the body with ``torch.func``'s
  gradient — one product of the functional face (:mod:`metagrad.pure`);
- vmapped (:mod:`metagrad.batched`): ``torch.func.vmap`` of :func:`step_vjp` over stored
  iterates (Binomial's rows);
- compiled (:mod:`metagrad.compiled`): ``torch.compile`` of :func:`step_vjp`, or of its vmap.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Container, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch
from torch.utils import _pytree as pytree

from .errors import sparse_gradient
from .discovery import MetaGrads, add_meta, graph_inputs
from .frozen import Frozen, reads_changed, replaying_reads
from .generators import RandomState
from .update_rule import Params, State, UpdateRule, checked_step

__all__ = ["StepRecord", "step_body", "eta_grads_of", "step_vjp", "functional_gradient", "autograd_gradient", "Gradient", "with_eta", "held", "proximal", "kept_gradient", "rule_with", "rule_tensors", "rule_slots", "step_size_vjp", "RuleFreezer", "KeptStep", "checked_loss", "loss_grads", "detached", "nbytes", "stacked", "same_shapes",
           "zero_if_none", "autocast_dtype", "hyperparameters", "clone_constant"]


@dataclass
class StepRecord:
    """What rebuilds inner step k: the iterate it starts from, the state, and either the
    closure, frozen at the step (the step graph is rebuilt on demand), or the step's kept
    graph."""

    params: Params
    state: State
    closure: Optional[Frozen]
    #: The update rule this step used (the trajectory's, unless a step was given its own).
    rule: UpdateRule
    #: The step's loss, detached, as recorded (for the replay check).
    loss: torch.Tensor
    #: The names of the fast weights the step's loss depends on; the others were left as
    #: they were (the update rule skips a parameter without a gradient).
    used: tuple[str, ...] = ()
    #: The generator states the closure started from, if it drew random numbers.
    rng: Optional[RandomState] = None
    #: The generator states the update rule started from, if it drew random numbers (SGLD's noise).
    rule_rng: Optional[RandomState] = None
    #: What the update rule read that its frozen copy does not hold (a global its step reads), with
    #: the values then (:func:`metagrad.reads.rule_reads`).
    rule_reads: Sequence[tuple[str, Any, tuple[Any, ...], Any]] = ()
    #: What the forward of the model's own classes read (``self.temp``), with the values then
    #: (:func:`metagrad.reads.model_reads`): set back for a rebuild of the closure.
    model_reads: Sequence[tuple[str, Any, tuple[Any, ...], Any]] = ()
    #: The loss came through a node that cannot be differentiated twice: which one, or ``None``.
    once: Optional[str] = None
    #: ``training`` of every submodule when the step was taken (dropout, BatchNorm's mode).
    modes: tuple[bool, ...] = ()
    #: The autocast dtype the step ran under on the model's device type, or ``None``.
    autocast: Optional[torch.dtype] = None
    #: For a step taken from a given loss (:meth:`~metagrad.trajectory.Trajectory.advance_from_loss`): the
    #: tensors the loss was built from and its gradient, built with ``create_graph=True``.
    graph: Optional[tuple[Params, Params]] = None
    #: The fingerprint of the loss's gradient in each meta-parameter known at the step
    #: (:class:`~metagrad.replay.EtaProbes`, ``[n, 3]``), for the replay check; ``None`` where
    #: none was taken (no meta-parameters, or the gradient came from a compiled call).
    eta_grad: Optional[torch.Tensor] = None
    #: Rebuilt alone and eagerly (its closure made a leaf its loss reaches, which ``torch.func``
    #: cannot: :attr:`metagrad.discovery.Seen.made`), never with others under ``vmap`` or compiled.
    alone: bool = False

    def frozen(self) -> Frozen:
        """The frozen closure of a step taken from a closure (rebuilt on demand)."""
        if self.closure is None:
            raise RuntimeError("a step taken from a loss tensor has no closure to rebuild it from.")
        return self.closure

    def batch_key(self) -> Optional[tuple[Any, ...]]:
        """Steps with equal keys can be rebuilt in one vmapped or compiled call; ``None``: only
        alone, eagerly (a step whose closure read values that changed since: its rebuild sets
        them back, :meth:`Frozen.replaying <metagrad.frozen.Frozen.replaying>`; one whose call
        wrote a list or dict it captures, :attr:`Frozen.live <metagrad.frozen.Frozen.live>`)."""
        if (self.graph is not None or self.rng is not None or self.rule_rng is not None or self.closure is None
                or self.alone or self.closure.live or self.closure.read_changed() or reads_changed(self.rule_reads)
                or reads_changed(self.model_reads)):
            return None
        return (self.closure.key, id(self.rule), self.used, self.modes, self.autocast)

    @contextlib.contextmanager
    def rule_as_taken(self) -> Iterator[None]:
        """Run the update rule, in a rebuild, as the step ran it: from the generator states it
        drew from (:attr:`rule_rng`) and with what it read set back (:attr:`rule_reads`)."""
        with self.rule_rng.replay() if self.rule_rng is not None else contextlib.nullcontext(), \
                replaying_reads(self.rule_reads):
            yield


#: ``gradient(loss_of, w) -> (∇loss_of(w), loss_of(w))``: how a step body takes its inner gradient
#: (the loss ``None`` where the gradient was kept from the inner loop, :func:`kept_gradient`).
Gradient = Callable[[Callable[[Params], torch.Tensor], Params], tuple[Params, Optional[torch.Tensor]]]
#: ``loss_at(φ, η) -> scalar``: a step's inner loss at fast weights φ and explicit η.
LossAt = Callable[[Params, Sequence[torch.Tensor]], torch.Tensor]
#: A step body: ``(φ, η, carried state leaves) -> ((Φ(φ), the new state), (loss, ∇loss))``.
Body = Callable[[Params, Sequence[torch.Tensor], Sequence[torch.Tensor]],
                tuple[tuple[Params, State], tuple[Optional[torch.Tensor], Params]]]


def functional_gradient(loss_of: Callable[[Params], torch.Tensor], w: Params
                        ) -> tuple[Params, Optional[torch.Tensor]]:
    """The gradient under ``torch.func`` transforms (:func:`step_vjp`, vmapped, compiled)."""
    grads, loss = torch.func.grad_and_value(loss_of)(w)
    return {n: dense(g) for n, g in grads.items()}, loss


def dense(grad: torch.Tensor) -> torch.Tensor:
    """An inner gradient as the dense tensor every update rule and product takes: a sparse one
    (``nn.Embedding(sparse=True)``) holds the same numbers, and the fast weights it moves are
    dense anyway."""
    return grad.to_dense() if grad.layout != torch.strided else grad


def autograd_gradient(step: int, used: Optional[Sequence[str]] = None, *, create_graph: bool = True,
                      also: Sequence[torch.Tensor] = (), also_out: Optional[list[Optional[torch.Tensor]]] = None
                      ) -> Gradient:
    """The gradient by ``torch.autograd.grad`` with its graph (``create_graph``), for the
    eager product, which differentiates the body again with autograd (:func:`loss_grads`:
    ``w`` must be leaves that require grad; ``also``, ``also_out``: the loss's gradient in
    more tensors, taken in the same backward)."""
    def gradient(loss_of: Callable[[Params], torch.Tensor], w: Params) -> tuple[Params, Optional[torch.Tensor]]:
        loss = loss_of(w)
        return loss_grads(loss, w, create_graph=create_graph, step=step, used=used, also=also,
                          also_out=also_out), loss
    return gradient


#: Where a body built with ``eta_grads=True`` returns ``∂ℓ/∂η_k`` among its gradients (:func:`eta_grads_of`).
_ETA_KEY = "\0∂ℓ/∂η[{}]"


def eta_grads_of(grads: Params, count: int) -> tuple[Params, list[torch.Tensor]]:
    """A body's gradients (built with ``eta_grads=True``, :func:`step_body`) split into the fast
    weights' and the ``count`` explicit η's."""
    keys = [_ETA_KEY.format(k) for k in range(count)]
    return {n: g for n, g in grads.items() if n not in keys}, [grads[key] for key in keys]


def step_body(loss_at: LossAt, rule: UpdateRule, used: Sequence[str], *, state: State,
              carried: Sequence[int] = (), gradient: Gradient = functional_gradient,
              rule_eta: Optional[Mapping[int, int]] = None, eta_grads: bool = False,
              around_rule: Optional[Callable[[], ContextManager[Any]]] = None) -> Body:
    """The one body of an inner step, ``Φ(φ, s; η) = rule(φ, ∇_φ ℓ(φ; η), s)``.

    ``body(φ, η, s)`` takes the fast weights, the explicit η ``loss_at`` reads, and the
    state leaves listed in ``carried`` (indices into ``state``'s flattened leaves, the others
    constants); it returns ``((Φ(φ), the new state), (ℓ(φ), ∇ℓ(φ)))``, the gradient only
    for the fast weights in ``used`` (the rule leaves the others as they are). The new state
    may have more leaves than ``state`` (a rule whose state starts empty).
    ``gradient`` takes the inner gradient: ``torch.func``'s (the default) under a transform,
    :func:`autograd_gradient` eagerly. ``rule_eta`` maps the id of a tensor the rule holds (a
    step size) to its index in η: the body's rule holds ``η[k]`` there (:func:`rule_with`).
    ``eta_grads``: the gradient is taken in the explicit η too, in the same call, and returned
    with the fast weights' (:func:`eta_grads_of` splits them; the replay check's
    :class:`~metagrad.replay.EtaProbes`). ``around_rule``: the context the rule runs in, as the
    step ran it (:meth:`StepRecord.rule_as_taken`; eager bodies only: :meth:`StepRecord.batch_key`)."""
    leaves, spec = pytree.tree_flatten(state)

    def body(q: Params, eta: Sequence[torch.Tensor], s: Sequence[torch.Tensor]
             ) -> tuple[tuple[Params, State], tuple[Optional[torch.Tensor], Params]]:
        if eta_grads:
            keys = [_ETA_KEY.format(k) for k in range(len(eta))]
            both, loss = gradient(lambda w: loss_at({**q, **{n: w[n] for n in used}}, [w[key] for key in keys]),
                                  {**{n: q[n] for n in used}, **dict(zip(keys, eta))})
            grads = {n: both[n] for n in used if n in both}
        else:
            grads, loss = gradient(lambda w: loss_at({**q, **w}, eta), {n: q[n] for n in used})
        full = list(leaves)
        for i, t in zip(carried, s):
            full[i] = t
        step_rule = rule if not rule_eta else rule_with(rule, {i: eta[k] for i, k in rule_eta.items()})
        given = pytree.tree_unflatten(full, spec)
        with around_rule() if around_rule is not None else contextlib.nullcontext():
            new_q, new_s = checked_step(step_rule, q, given, lambda: step_rule.step(q, grads, given))
        return (dict(new_q), new_s), (loss, both if eta_grads else grads)

    return body


def kept_gradient(grads: Params) -> Gradient:
    """The gradient the inner loop kept with its graph (a step taken from a given loss), for
    the eager product; no loss is known."""
    def gradient(loss_of: Callable[[Params], torch.Tensor], w: Params) -> tuple[Params, Optional[torch.Tensor]]:
        return grads, None
    return gradient


def proximal(gradient: Gradient, theta: Params, reg: float) -> Gradient:
    """``gradient`` plus the proximal term's, ``λ(φ − θ)``, for every fast weight (Implicit's inner
    problem ``L_tr(φ) + (λ/2)‖φ − θ‖²``, as the inner loop adds it)."""
    def with_term(loss_of: Callable[[Params], torch.Tensor], w: Params) -> tuple[Params, Optional[torch.Tensor]]:
        grads, loss = gradient(loss_of, w)
        return {n: grads[n] + reg * (w[n] - theta[n]) if n in grads else reg * (w[n] - theta[n])
                for n in w}, loss
    return with_term


def held(gradient: Gradient) -> Gradient:
    """``gradient`` held constant (detached): the step with ``J`` taken as the identity in the
    gradient, whose η part is then only the rule's (MATH.md's table, FirstOrder)."""
    def constant(loss_of: Callable[[Params], torch.Tensor], w: Params) -> tuple[Params, Optional[torch.Tensor]]:
        grads, loss = gradient(loss_of, w)
        return {n: g.detach() for n, g in grads.items()}, loss
    return constant


def rule_tensors(rule: Any) -> list[torch.Tensor]:
    """The tensors among a rule's hyperparameters (a step size, per-parameter step sizes)."""
    return [leaf for leaf in pytree.tree_leaves(dict(getattr(rule, "__dict__", {})))
            if isinstance(leaf, torch.Tensor)]


def rule_slots(rule: Any, eta: Sequence[torch.Tensor]) -> dict[int, int]:
    """Which of ``eta`` the rule holds among its hyperparameters (its learned step sizes):
    the tensor's id → its index in ``eta`` (a step body's ``rule_eta``)."""
    held_by_rule = {id(t) for t in rule_tensors(rule)}
    return {id(t): k for k, t in enumerate(eta) if id(t) in held_by_rule}


def step_size_vjp(new_params: Params, meta: Sequence[torch.Tensor], u: Params, new_state: Optional[State] = None,
                  state_adjoint: Optional[Sequence[Optional[torch.Tensor]]] = None) -> list[Optional[torch.Tensor]]:
    """``uᵀ ∂(new_params)/∂η`` for an update computed with its gradient held constant, by autograd
    (the graph kept: a step size's own history may be shared), plus ``s̄ᵀ ∂(new_state)/∂η`` with
    ``state_adjoint`` (one entry per leaf, ``None`` for zero); ``[]`` where nothing depends on η."""
    state = [(leaf, adjoint) for leaf, adjoint in zip(pytree.tree_leaves(new_state), state_adjoint or ())
             if adjoint is not None and isinstance(leaf, torch.Tensor) and leaf.requires_grad]
    names = [n for n in new_params if new_params[n].requires_grad]
    if not names and not state:
        return []
    outputs = [new_params[n] for n in names] + [leaf for leaf, _ in state]
    cotangents = [u[n] for n in names] + [adjoint for _, adjoint in state]
    with torch.enable_grad():
        return list(torch.autograd.grad(outputs, list(meta), cotangents, allow_unused=True, retain_graph=True))


def rule_with(rule: Any, replace: Mapping[int, torch.Tensor]) -> Any:
    """A shallow copy of ``rule`` whose hyperparameter tensors with an id in ``replace`` are
    swapped for the tensor given there (``rule`` itself where none is)."""
    attributes = getattr(rule, "__dict__", None)
    if not attributes or not any(id(t) in replace for t in rule_tensors(rule)):
        return rule
    out = copy.copy(rule)
    for name, value in attributes.items():
        setattr(out, name, pytree.tree_map(
            lambda leaf: replace.get(id(leaf), leaf) if isinstance(leaf, torch.Tensor) else leaf, value))
    return out


def with_eta(loss: Callable[[Params, Params, list[torch.Tensor]], torch.Tensor], captured: Sequence[torch.Tensor],
             fixed: Params, slots: Mapping[int, int], names: Mapping[str, int]) -> LossAt:
    """A closure's loss as a step body's ``loss_at(φ, η)``: ``loss(φ, module tensors, captured
    tensors)`` with the explicit η put where the closure holds them — the captured tensor at
    position p is ``η[slots[p]]``, the module parameter ``name`` (not adapted) is
    ``η[names[name]]``."""
    def loss_at(q: Params, eta: Sequence[torch.Tensor]) -> torch.Tensor:
        tensors = list(captured)
        for position, k in slots.items():
            tensors[position] = eta[k]
        module = dict(fixed)
        for name, k in names.items():
            module[name] = eta[k]
        return loss(q, module, tensors)
    return loss_at


def step_vjp(body: Body, q: Params, eta: Sequence[torch.Tensor], s: Sequence[torch.Tensor],
             u: Params, s_adjoint: Sequence[torch.Tensor], carried: Sequence[int] = (),
             returned: Optional[Sequence[int]] = None) -> tuple[Any, ...]:
    """The step's VJP by ``torch.func.vjp`` of :func:`step_body`: ``(J_mᵀu + the state's part,
    B_mᵀu per explicit η, the adjoint of the carried state, Φ(φ), ℓ(φ), ∇ℓ(φ))``. ``u`` and
    ``s_adjoint`` are the cotangents of Φ(φ) and of the new state's leaves at ``returned``
    (default: the body's ``carried``, where the state keeps its structure; a rule whose state
    starts empty returns leaves its input did not have)."""
    outputs = carried if returned is None else returned

    def selected(q: Params, eta: Sequence[torch.Tensor], s: Sequence[torch.Tensor]) -> Any:
        (new_q, new_s), aux = body(q, eta, s)
        new_leaves = pytree.tree_leaves(new_s)
        return (new_q, [new_leaves[i] for i in outputs]), aux

    out: Any = torch.func.vjp(selected, q, list(eta), list(s), has_aux=True)
    (new, _), pullback, (loss, grads) = out[0], out[1], out[2]
    pulled_q, pulled_eta, pulled_s = pullback(({n: u[n] for n in new}, list(s_adjoint)))
    return pulled_q, pulled_eta, pulled_s, new, loss, grads


def pull_back(vjp: Callable[..., tuple[Params, MetaGrads, Any]], first: int, last: int, u: Params,
              adjoint: Any) -> tuple[Params, MetaGrads, Any]:
    """``u`` pulled back through steps ``last − 1`` down to ``first`` by one ``vjp(m, u, adjoint)``
    each, and the sum of their η products (a trajectory's ``sweep``, step by step)."""
    meta: MetaGrads = []
    for m in reversed(range(first, last)):
        u, grads, adjoint = vjp(m, u, adjoint)
        meta = add_meta(meta, grads)
    return u, meta, adjoint


class RuleFreezer:
    """Freezes an update rule per step, as closures are frozen (:mod:`metagrad.frozen`)."""

    def __init__(self) -> None:
        #: The rule as the last step used it, its frozen copy, and its hyperparameters then.
        self._now: Optional[tuple[Any, Any, tuple[Any, ...]]] = None

    def __call__(self, rule: UpdateRule) -> UpdateRule:
        """``rule`` as it is now, for this step and for every rebuild of it: the last step's
        frozen copy while the hyperparameters are unchanged, else a new shallow copy whose
        tensors that do not require grad are cloned. A schedule that sets ``rule.lr`` between
        steps (or changes an lr tensor in place) then rebuilds each step with the step size it
        was taken with, as closures are frozen with the values they capture. A tensor that
        requires grad (a learned step size, η) is kept as it is."""
        values = hyperparameters(rule)
        last = self._now
        if last is not None and last[0] is rule and last[2] == values:
            return last[1]
        frozen = rule
        if values:
            # A shallow copy: attributes are the same objects (compiled calls, keyed on them,
            # are found again), except a value holding a constant tensor, which is cloned.
            frozen = copy.copy(rule)
            for attribute, value in vars(rule).items():
                if any(isinstance(leaf, torch.Tensor) and not leaf.requires_grad
                       for leaf in pytree.tree_leaves(value)):
                    setattr(frozen, attribute, pytree.tree_map(clone_constant, value))
        self._now = (rule, frozen, values)
        return frozen


def hyperparameters(rule: Any) -> tuple[Any, ...]:
    """What a rule's step depends on besides its inputs, comparable between two steps: its
    attributes, with each tensor as (identity, version) and containers unpacked; ``()`` for a
    rule without attributes (nothing to freeze)."""
    attributes = getattr(rule, "__dict__", None)
    if not attributes:
        return ()
    if all(type(value) in _NUMBERS for value in attributes.values()):  # floats only: by value
        return tuple(attributes.items())
    leaves, spec = pytree.tree_flatten(dict(attributes))
    return (spec, tuple((id(leaf), leaf._version) if isinstance(leaf, torch.Tensor) else
                        leaf if isinstance(leaf, (int, float, str, bool, type(None))) else id(leaf)
                        for leaf in leaves))


#: Hyperparameter types compared by value as they are (:func:`hyperparameters`).
_NUMBERS = (float, int, bool, str, type(None))


def clone_constant(value: Any) -> Any:
    """A tensor that does not require grad, cloned (a later in-place change leaves it as it
    was); anything else as it is."""
    if isinstance(value, torch.Tensor) and not value.requires_grad:
        return value.clone()
    return value


def checked_loss(loss: Any, step: int) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        what = ("; return the loss alone (meta.step(lambda f: loss_fn(f(x), y))), and compute what else "
                "you need from meta.fmodel after the step" if isinstance(loss, (tuple, list, dict)) else
                "; return the tensor itself: a Python number (.item(), float(...)) carries no gradient"
                if isinstance(loss, (int, float)) else
                "; it returned nothing: a closure written with def needs `return loss`" if loss is None else "")
        raise TypeError(
            f"closure: must return a scalar loss tensor, got {type(loss).__name__} at step {step}{what}."
        )
    if loss.dim() != 0:
        raise ValueError(
            f"closure: must return a scalar (0-dim) loss, got shape {tuple(loss.shape)} at step "
            f"{step}; reduce it with .mean() or .sum()."
        )
    if not loss.is_floating_point():
        raise TypeError(f"closure: the loss must be floating point, got dtype {loss.dtype}.")
    if loss.is_inference():
        raise ValueError(
            f"closure: the loss at step {step} was computed under torch.inference_mode(), in which "
            "autograd records nothing, so no inner step can be differentiated. Take the inner steps "
            "and the query outside torch.inference_mode().")
    return loss


def loss_grads(loss: torch.Tensor, params: Params, *, create_graph: bool, step: int,
               used: Optional[Sequence[str]] = None, theta: Optional[Container[int]] = None,
               also: Sequence[torch.Tensor] = (), also_out: Optional[list[Optional[torch.Tensor]]] = None,
               retain_graph: Optional[bool] = None, source: str = "closure") -> Params:
    """``∇L_tr(φ)`` by autograd, for the fast weights the loss depends on (``used``, if
    known: the names that had a gradient when the step was taken; a rebuilt step that no
    longer reaches one of them gets a zero gradient there, which the replay check sees).
    Parameters the loss does not use get no entry: the update rule leaves them as they are.

    A loss that uses none of the fast weights but depends on something else (a parameter
    that ``adapt=`` leaves out, a meta-parameter) takes a step that moves nothing, as a plain
    unroll does. A loss that depends on nothing, or that reaches θ's own Parameters (``theta``,
    by id) instead of the fast weights, is refused: it was built from the original module.

    ``also``: more tensors to differentiate by in the same backward (the meta-parameters, for
    the replay check's :class:`~metagrad.replay.EtaProbes`); their gradients (``None`` for
    none) are appended to ``also_out``. ``retain_graph``: as ``torch.autograd.grad``'s (the
    path to an η may run through a graph of the user's, ``w = hypernet(z)`` read by a helper,
    which a later backward still needs). ``source``: ``"loss"`` for a loss the caller built
    (``meta.step_from_loss``, the adapters' ``step(loss)``), which the refusal then names."""
    wrong = ValueError(
        f"closure: the loss at step {step} does not depend on the fast weights. Compute it "
        "from the model the closure receives as its argument (meta.step(lambda f: loss(f(x), y))), "
        "not from the original module, and not from meta.fmodel (inside a step it is not the "
        "model the step differentiates)." if source != "loss" else
        f"loss: the loss given at step {step} does not depend on the fast weights. Build it from the "
        "fast weights the block hands out (meta.fast_weights(), or the functional model an adapter "
        "gives), not from the original module."
    )
    if not loss.requires_grad:
        raise wrong
    names = list(params) if used is None else list(used)
    extra = [i for i, t in enumerate(also) if t.requires_grad]
    if not names and not extra:
        if also_out is not None:
            also_out.extend([None] * len(also))
        return {}
    try:
        grads = torch.autograd.grad(loss, [params[n] for n in names] + [also[i] for i in extra],
                                    create_graph=create_graph, allow_unused=True, retain_graph=retain_graph)
    except RuntimeError as error:
        if (sparse := sparse_gradient(error)) is not None:
            raise sparse from error
        raise
    if also_out is not None:
        found = dict(zip(extra, grads[len(names):]))
        also_out.extend(found.get(i) for i in range(len(also)))
    grads = tuple(None if g is None else dense(g) for g in grads[:len(names)])
    if used is not None:
        return {n: zero_if_none(g, params[n]) for n, g in zip(names, grads)}
    if all(g is None for g in grads) and theta and any(
            id(leaf) in theta for leaf in graph_inputs([loss], set(), {})[0]):
        raise wrong
    return {n: g for n, g in zip(names, grads) if g is not None}


def detached(params: Params, state: State) -> tuple[Params, State]:
    """An update's fast weights and state without the graph to the rule's step sizes."""
    return ({n: t.detach() for n, t in params.items()},
            pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, state))


def nbytes(params: Params, state: State) -> int:
    """The bytes of an iterate's tensors and its optimizer state's."""
    total = sum(t.nbytes for t in params.values())
    if state:
        total += sum(t.nbytes for t in pytree.tree_leaves(state) if isinstance(t, torch.Tensor))
    return total


def zero_if_none(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


def stacked(states: list[State]) -> Optional[State]:
    """The optimizer states of several steps stacked along a new first dimension, or
    ``None`` where they cannot be (different structures, leaves that are not tensors, such
    as a Python step count, or a leaf whose shape changes from step to step)."""
    flat = [pytree.tree_flatten(state) for state in states]
    spec = flat[0][1]
    if any(other != spec for _, other in flat[1:]):
        return None
    columns = list(zip(*(leaves for leaves, _ in flat)))
    if not all(isinstance(leaf, torch.Tensor) for column in columns for leaf in column):
        return None
    if not same_shapes(columns):
        return None
    return pytree.tree_unflatten([torch.stack(column) for column in columns], spec)


def same_shapes(columns: Sequence[Sequence[Any]]) -> bool:
    """Whether each column's tensors (one leaf of a state, over steps) have one shape and dtype,
    so that they can be stacked (a rule may grow a leaf step by step: a history)."""
    return all(len({(t.shape, t.dtype) for t in column if isinstance(t, torch.Tensor)}) <= 1
               for column in columns)


class KeptStep:
    """One step's body built once with its graph kept (:meth:`~metagrad.products.Products.fixed_point`):
    each call is one VJP of it by autograd, ``u ↦ (J ᵀu, B ᵀu)`` with ``J = ∂Φ/∂φ`` and
    ``B = ∂Φ/∂η``, as many times as a solver asks."""

    def __init__(self, params: Params, new_params: Params, meta: list[torch.Tensor]) -> None:
        self._params, self._meta = params, meta
        self._names = [n for n in new_params if new_params[n].requires_grad]
        self._outputs = [new_params[n] for n in self._names]
        #: ``φ − Φ(φ)``, detached: how far φ is from being the step's fixed point.
        self.moved = {n: params[n].detach() - new_params[n].detach() for n in new_params}

    @classmethod
    def at(cls, loss_at: LossAt, rule: UpdateRule, params: Params, meta: list[torch.Tensor], *, step: int,
           used: Optional[Sequence[str]], theta: Params, reg: float) -> "KeptStep":
        """The body of step ``step`` at ``params`` (φ_K) with ``rule``, the proximal term's
        gradient ``reg·(φ − θ)`` in its gradient (Implicit's inner problem), built once with its
        graph kept; ``meta``: η, leaves that require grad, which ``loss_at`` reads. Both faces
        build Implicit's fixed-point step here."""
        with torch.enable_grad():
            leaves = {n: t.detach().requires_grad_() for n, t in params.items()}
            body = step_body(loss_at, rule, list(leaves), state=rule.init(leaves),
                             gradient=proximal(autograd_gradient(step, used), theta, reg))
            (new_params, _), _ = body(leaves, meta, [])
        return cls(leaves, new_params, meta)

    def __call__(self, u: Params, *, eta: bool = False) -> tuple[Params, list[Optional[torch.Tensor]]]:
        """``(Jᵀu, Bᵀu)``; ``Bᵀu`` (one entry per η, ``None`` for zero) only with ``eta``."""
        params = self._params
        meta = self._meta if eta else []
        if not self._outputs:
            return {n: torch.zeros_like(t) for n, t in params.items()}, [None] * len(meta)
        with torch.enable_grad():
            out = torch.autograd.grad(self._outputs, list(params.values()) + meta,
                                      [u[n] for n in self._names], retain_graph=True, allow_unused=True)
        return ({n: zero_if_none(g, params[n]) for n, g in zip(params, out)}, list(out[len(params):]))


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast computes in on ``device_type`` now, or ``None`` when it is off."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)
