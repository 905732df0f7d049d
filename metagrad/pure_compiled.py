"""The functional face's compiled pieces: ``mg.functional.meta_grad(..., compile=True)``.

``torch.compile`` of a whole ``meta_grad`` call traces the Python loop over the K inner steps
and unrolls it, so compiling takes longer the larger K is (minutes at K = 50 on a CPU). Here the
loop stays in Python and the pieces it calls are compiled, each once per structure:

- **a run of inner steps**: ``length`` steps of the step's one body
  (:func:`metagrad.step.step_body`) in one call, returning each step's iterate, state and loss
  (the inner loop takes K steps in runs of the lengths :data:`RUNS`, longest first);
- **a sweep**: a vector pulled back through ``length`` consecutive stored steps by the step's
  VJP (:func:`metagrad.step.step_vjp`), last step first, with the optimizer state's adjoint
  carried or the state held constant, and the η products summed (a backward asks for runs of
  the same lengths, as long as the iterates' size allows: :attr:`metagrad.tape.OnTape.runs`,
  :func:`metagrad.estimators.base.sweep_back`);
- **rows**: ``torch.func.vmap`` of the step's VJP over stored steps (Binomial's levels);
- **the query's gradient** in φ_K and η.

So a larger K compiles nothing new. Every piece takes every tensor as an input (the fast
weights, the optimizer state's leaves, the batch, η, the vectors): a new batch, new
parameters or a new call of ``meta_grad`` with the same shapes finds the compiled function.
They are kept in the process-wide cache of :mod:`metagrad.compiled`, keyed on the loss
function (by identity: the entry keeps it), the update rule's type and hyperparameters (its
step size, a number or a tensor, is an input of every piece, as in :mod:`metagrad.compiled`:
a call with another step size compiles nothing new), the meta-batch's size, and the shapes
and dtypes of every input. A piece that cannot be compiled
(TorchDynamo cannot trace the loss in one graph) runs eagerly, with one
:class:`~metagrad.MetaGradientWarning` that says why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch.utils import _pytree as pytree

from .compiled import _CONSTANT_STEP_SIZES, _REFUSED, _WARNED, _cached, _first_line, _fresh
from .compile_options import settings_key
from .compile_keys import rule_key, step_sizes_as_tensors
from .compile_keys import value_key as rule_key_value
from .errors import warn
from .step import rule_tensors, rule_with, same_shapes, step_body, step_vjp
from .update_rule import Params, UpdateRule

__all__ = ["Pieces", "RUNS"]

#: The lengths of the runs of steps one compiled call takes (the inner loop) or pulls a vector
#: back through (a sweep), longest first: K steps are taken as runs of the longest length that
#: fits, so at most these lengths compile, whatever K is.
RUNS = (8, 4, 1)

#: Whether an update rule keeps its state's structure through a step, by the rule and the
#: state's structure and shapes (:meth:`Pieces.keeps_structure`).
_KEEPS: dict[Any, bool] = {}

#: ``maker(batch) -> loss_at(φ, η)``: the inner or outer loss on a batch.
Maker = Callable[[Any], Callable[[Params, Sequence[torch.Tensor]], torch.Tensor]]


def _described(tree: Any) -> tuple[Any, ...]:
    """A pytree's structure, and the shape, strides, dtype and device of each tensor leaf (other
    leaves by value): what a compiled function's inputs must match."""
    leaves, spec = pytree.tree_flatten(tree)
    return (str(spec), tuple((t.shape, t.stride(), t.dtype, t.device) if isinstance(t, torch.Tensor)
                             else ("value", t) for t in leaves))


def _rule_identity(rule: Any, rule_eta: Mapping[int, int]) -> Any:
    """:func:`metagrad.compile_keys.rule_key` with the η the rule holds (its learned step sizes, inputs
    of every piece) by their place in η, and its other tensors (a constant step size, inputs too)
    by kind, instead of by identity: a new call's step sizes find the pieces compiled for the last."""
    fields = getattr(rule, "__dict__", None)
    if fields is None:
        return rule_key(rule)

    def key(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and id(value) in rule_eta:
            return ("eta", rule_eta[id(value)], value.shape, value.dtype)
        if isinstance(value, torch.Tensor):
            return ("tensor", value.shape, value.dtype, value.device)
        if isinstance(value, dict):
            return ("dict", tuple((k, key(v)) for k, v in value.items()))
        if isinstance(value, (tuple, list)):
            return ("seq", tuple(key(v) for v in value))
        return rule_key_value(value)

    return (type(rule), tuple((name, key(value)) for name, value in sorted(fields.items())))


def _rule_at(template: tuple[UpdateRule, list[int]], rule_values: list[torch.Tensor]) -> UpdateRule:
    """The rule of ``template`` with the tensors a piece was called with in place of its copies
    (:attr:`Pieces._template`)."""
    rule, ids = template
    return rule_with(rule, dict(zip(ids, rule_values)))


class Pieces:
    """The compiled pieces of one functional inner loop (see the module docstring).

    Args:
        maker: the inner loss on a batch; ``identity``: what makes two makers compute the same
            loss (the user's loss function, the meta-parameters' structure, the tasks).
        batch: the inner loop's batch (the support set).
        rule: the update rule; ``rule_eta``: the η it holds (id of the tensor → index in η).
        phi: φ_0 (every iterate is like it); ``eta``: η, as every piece receives it.
        settings: ``torch.compile``'s arguments (:func:`metagrad.compile_options.compile_settings`).
    """

    def __init__(self, maker: Maker, identity: tuple[Any, ...], batch: Any, rule: UpdateRule,
                 rule_eta: Mapping[int, int], phi: Params, eta: Sequence[torch.Tensor],
                 settings: Mapping[str, Any]) -> None:
        self.maker, self.batch = maker, batch
        self.names = list(phi)
        self.settings = dict(settings)
        # A float step size as tensors (metagrad.compile_keys.step_sizes_as_tensors), unless a
        # rule of this type failed to compile so: then a constant of the graphs.
        self._rule_type = type(rule)
        self._converted = False
        if self._rule_type not in _CONSTANT_STEP_SIZES:
            converted = step_sizes_as_tensors(rule, next(iter(phi.values())).device)
            self._converted, rule = converted is not rule, converted
        self._identity = (identity, _rule_identity(rule, rule_eta), tuple(self.names), settings_key(self.settings))
        # The rule the pieces hold, with a copy in place of each of its tensors: in a piece, an η
        # it holds (a learned step size) comes in with η and replaces its copy, and its other
        # tensors (a constant step size) come in as inputs of their own (:attr:`_rule_values`),
        # so no input is the rule's own tensor, and the next call's step sizes find the same
        # compiled function.
        tensors = rule_tensors(rule)
        copies = {id(t): t.detach().clone() for t in tensors}
        self.rule = rule_with(rule, copies)
        self.rule_eta = {id(copies[i]): k for i, k in rule_eta.items() if i in copies}
        self._rule_values = [t.detach() for t in tensors if id(t) not in rule_eta]
        #: The rule and the ids of the copies :attr:`_rule_values` replace (:func:`_rule_at`); a
        #: piece holds these, not the pieces (which hold the batch), in the process-wide cache.
        self._template = (self.rule, [id(copies[id(t)]) for t in tensors if id(t) not in rule_eta])
        # What every piece's inputs are like (the iterates are like φ_0, the optimizer state like
        # the rule's of φ_0): described once, not at every call.
        self._inputs = (_described(phi), _described(list(eta)), _described(batch))

    # ------------------------------------------------------------------------ pieces
    def keeps_structure(self, state: Any) -> Optional[bool]:
        """Whether a step of the rule from a state like ``state`` returns one of the same
        structure (a run of steps is compiled only then); ``None``: not known yet."""
        return _KEEPS.get((self._identity, _described(state)))

    def note_structure(self, state: Any, new_state: Any) -> None:
        """Note whether the rule kept the state's structure (:meth:`keeps_structure`), from a
        step taken eagerly."""
        _KEEPS[(self._identity, _described(state))] = (
            pytree.tree_structure(state) == pytree.tree_structure(new_state))

    def run(self, phi: Params, leaves: list[torch.Tensor], spec: Any, eta: Sequence[torch.Tensor],
            length: int) -> Optional[tuple[list[Params], list[list[torch.Tensor]], list[torch.Tensor]]]:
        """``length`` inner steps from ``(φ, the state's leaves)``: each step's iterate, state
        leaves and loss; ``None`` where the steps cannot run compiled."""
        names, rule_eta, template = self.names, self.rule_eta, self._template

        def steps(phi: Params, leaves: list[torch.Tensor], eta: list[torch.Tensor], batch: Any, maker: Maker,
                  rule_values: list[torch.Tensor]) -> Any:
            loss_at, rule = maker(batch), _rule_at(template, rule_values)
            iterates, states, losses = [], [], []
            for _ in range(length):
                body = step_body(loss_at, rule, names, state=pytree.tree_unflatten(leaves, spec), rule_eta=rule_eta)
                (phi, state), (loss, _) = body(phi, eta, [])
                leaves = pytree.tree_leaves(state)
                iterates.append(phi)
                states.append(leaves)
                losses.append(loss)
            return iterates, states, losses

        return self._call(("run", length, str(spec)), steps, phi, leaves, list(eta))

    def sweep(self, phis: list[Params], states: list[list[torch.Tensor]], spec: Any, eta: Sequence[torch.Tensor],
              u: Params, carried: Sequence[int], adjoint: list[torch.Tensor]
              ) -> Optional[tuple[Params, list[torch.Tensor], list[torch.Tensor]]]:
        """``u`` pulled back through the steps at ``phis`` (with their state leaves ``states``),
        the last first: ``(u, Σ B_mᵀ a_{m+1} per η, the adjoint of the state's leaves at
        carried)``; ``carried`` empty: the state held constant. ``None``: not compiled."""
        names, rule_eta, template, length = self.names, self.rule_eta, self._template, len(phis)
        carried = tuple(carried)

        def segment(stacked: Params, states: list[torch.Tensor], eta: list[torch.Tensor], u: Params,
                    adjoint: list[torch.Tensor], batch: Any, maker: Maker, rule_values: list[torch.Tensor]) -> Any:
            loss_at, rule = maker(batch), _rule_at(template, rule_values)
            total: Optional[list[torch.Tensor]] = None
            for i in reversed(range(length)):
                leaves = [t[i] for t in states]
                body = step_body(loss_at, rule, names, state=pytree.tree_unflatten(leaves, spec), carried=carried,
                                 rule_eta=rule_eta)
                u, pulled_eta, adjoint, *_ = step_vjp(body, {n: t[i] for n, t in stacked.items()}, eta,
                                                      [leaves[j] for j in carried], u, adjoint, carried)
                total = list(pulled_eta) if total is None else [a + b for a, b in zip(total, pulled_eta)]
            return dict(u), total or [], list(adjoint)

        # The steps' iterates and state leaves stacked, one input per tensor of a step: a compiled
        # call's guards and inputs cost per tensor, and a run has as many steps' worth.
        if not same_shapes(list(zip(*states))):
            return None  # a state leaf whose shape changes from step to step: the steps one by one
        stacked = {n: torch.stack([phi[n] for phi in phis]) for n in names}
        columns = [torch.stack(column) for column in zip(*states)] if states and states[0] else []
        return self._call(("sweep", length, carried, str(spec)), segment, stacked, columns, list(eta), u, adjoint)

    def rows(self, phis: Params, states: Any, state_dims: Any, vectors: Params, eta: Sequence[torch.Tensor],
             chunk_size: Optional[int]) -> Optional[tuple[Params, list[torch.Tensor]]]:
        """``J_mᵀ u_i`` for each row (the stacked iterates ``phis``, states and ``vectors``;
        the state held constant) by one vmapped call, and ``Σ_i B_mᵀ u_i`` per η."""
        names, rule_eta, template = self.names, self.rule_eta, self._template

        def rows(phis: Params, states: Any, vectors: Params, eta: list[torch.Tensor], batch: Any, maker: Maker,
                 rule_values: list[torch.Tensor]) -> Any:
            loss_at, rule = maker(batch), _rule_at(template, rule_values)

            def row(phi: Params, state: Any, u: Params) -> Any:
                body = step_body(loss_at, rule, names, state=state, rule_eta=rule_eta)
                pulled, pulled_eta, *_ = step_vjp(body, phi, eta, [], u, [])
                return dict(pulled), list(pulled_eta)

            pulled, pulled_eta = torch.func.vmap(row, in_dims=(0, state_dims, 0), chunk_size=chunk_size)(
                phis, states, vectors)
            return pulled, [g.sum(0) for g in pulled_eta]

        return self._call(("rows", chunk_size, str(state_dims)), rows, phis, states, vectors, list(eta))

    def query(self, outer: Maker, identity: tuple[Any, ...], phi: Params, eta: Sequence[torch.Tensor],
              batch: Any) -> Optional[tuple[Params, list[torch.Tensor]]]:
        """The gradient of the query's loss ``outer(batch)`` in φ_K and in η (its direct part)."""
        def gradient(phi: Params, eta: list[torch.Tensor], batch: Any, maker: Maker, _: list[torch.Tensor]) -> Any:
            g, g_eta = torch.func.grad(maker(batch), argnums=(0, 1))(phi, eta)
            return dict(g), list(g_eta)

        out = self._call(("query", identity), gradient, phi, list(eta), batch=batch, maker=outer)
        if out is None:
            return None
        # In the strides the sweeps return (a dimension of size 1 may come with any stride), so
        # that the first sweep's inputs are laid out as the others' and compile once.
        return {n: t.clone(memory_format=torch.contiguous_format) for n, t in out[0].items()}, out[1]

    # ----------------------------------------------------------------------- calling
    def _call(self, kind: tuple[Any, ...], function: Callable[..., Any], *args: Any, batch: Any = None,
              maker: Optional[Maker] = None) -> Any:
        """``function(*args, batch, maker)`` by the compiled function cached for this kind and
        these inputs' shapes (compiled on the first call), or ``None`` where it cannot be
        compiled (the caller runs the eager path); the first refusal of each loss warns. The
        inputs are like :attr:`_inputs` (a batch given here is described here). The loss
        (``maker``, the user's function inside) is an argument of every call, so TorchDynamo's
        guards check it, and a new lambda of the same code with the same kinds of captured values
        finds the compiled function (a captured tensor is an input of it)."""
        key = ("functional", kind, self._identity, self._inputs if batch is None else (self._inputs, _described(batch)))
        batch = self.batch if batch is None else batch
        maker = self.maker if maker is None else maker
        if key in _REFUSED or (self._converted and self._rule_type in _CONSTANT_STEP_SIZES):
            return None
        compiled = _cached(key, lambda: torch.compile(_fresh(function), fullgraph=True, dynamic=False,
                                                      **self.settings))
        try:
            with torch.no_grad():
                return compiled(*args, batch, maker, self._rule_values)
        except Exception as error:  # a graph break, an unsupported op: eager from now on
            if self._converted:  # perhaps the rule branches on its step size: a constant from the next call
                _CONSTANT_STEP_SIZES.add(self._rule_type)
                return None
            _REFUSED[key] = f"{type(error).__name__}: {_first_line(error)}"
            if self._identity not in _WARNED:
                _WARNED.add(self._identity)
                warn(f"meta_grad(compile=...): part of this inner loop cannot be compiled in one graph, so it "
                     f"runs eagerly ({_REFUSED[key]}). Python side effects torch.compile cannot trace "
                     "(print, .item(), control flow on a tensor's value) or an unsupported op cause this; "
                     "the meta-gradient is the same.")
            return None
