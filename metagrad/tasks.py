"""A step's closure with its batch: one task, or T tasks at once (``MetaGradient(tasks=T)``).

``meta.step(closure, *batch)`` calls ``closure(fmodel, *batch)``. In a block over T tasks the
fast weights have a leading dimension of T, every tensor of ``batch`` too, and the step's
closure is called for each task on its own slices, under ``torch.func.vmap``:
``ℓ_t = closure(f_t, *batch_t)``. The inner loss the step differentiates is their sum
``Σ_t ℓ_t(φ_t)``: task t's loss depends on its own weights only, so the gradient of the sum
is each task's own gradient, stacked, and each task takes its own step — the update rules of
:mod:`metagrad.optim` act element by element. Every estimator's product of the stacked step is
block-diagonal, task by task, and a meta-parameter η shared by the tasks gets the sum of the
tasks' gradients: the block gives what T separate one-task blocks give, summed over tasks.

Both forms are a :class:`~metagrad.frozen.Frozen` closure (:meth:`Frozen.around
<metagrad.frozen.Frozen.around>`): the closure's captured values and the batch are frozen at
the step, batched and substituted like any captured tensor (Binomial's vmapped rows, compiled
products), and keyed by the closure's code and the batch's shapes, so a new lambda and a new
mini-batch per step find what the last step found.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch.utils import _pytree as pytree

from .errors import SparseGradientError, misfit_signature, warn
from .fmodel import FunctionalModel, unstacked
from .frozen import Frozen, freeze

__all__ = ["take_step", "with_batch", "check_batch", "advance_tasks", "check_rule", "no_loss_steps"]


def with_batch(closure: Callable[..., Any], batch: Sequence[Any], tasks: Optional[int]
               ) -> tuple[Callable[..., Any], Frozen]:
    """``closure`` with ``batch``: the step's function as given (for the step itself, and for
    torch.compile to trace) and the same frozen at the step (:meth:`Frozen.around
    <metagrad.frozen.Frozen.around>`). With ``tasks`` unset both call ``closure(fmodel,
    *batch)``; over ``tasks`` the first returns the T losses ``closure(f_t, *batch_t)``
    (:meth:`Trajectory.advance <metagrad.trajectory.Trajectory.advance>`'s ``parts``) and the
    frozen one, which rebuilds the step, their sum."""
    names = [f"batch[{i}]" for i in range(len(batch))]
    if tasks is None:
        return functools.partial(_call, closure, list(batch)), freeze(closure).around(_call, list(batch), names, "batch")
    return (functools.partial(_task_losses, closure, list(batch)),
            freeze(closure).around(_each_task, list(batch), names, ("tasks", tasks)))


def check_batch(batch: Sequence[Any], tasks: int) -> None:
    """Every tensor of a step's batch must have a first dimension of ``tasks``."""
    found = unstacked(list(batch), tasks)
    if found is not None:
        raise ValueError(
            f"batch: in a block over tasks={tasks} every tensor passed to meta.step after the "
            f"closure has a first dimension of {tasks}, one slice per task; tensor {found[0]} has shape "
            f"{tuple(found[1].shape)}. Stack the tasks' batches (torch.stack), or capture a tensor "
            "every task shares in the closure instead of passing it.")


def _call(function: Callable[..., Any], batch: list[Any], fmodel: FunctionalModel) -> Any:
    return function(fmodel, *batch)


def _each_task(function: Callable[..., Any], batch: list[Any], fmodel: FunctionalModel) -> torch.Tensor:
    return _task_losses(function, batch, fmodel).sum()


def _task_losses(function: Callable[..., Any], batch: list[Any], fmodel: FunctionalModel) -> torch.Tensor:
    """``[closure(f_t, *batch_t) for each task t]`` (:meth:`FunctionalModel.each_task
    <metagrad.fmodel.FunctionalModel.each_task>`), each a scalar."""
    def one(model: FunctionalModel, *task_batch: Any) -> torch.Tensor:
        loss = function(model, *task_batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            got = type(loss).__name__ if not isinstance(loss, torch.Tensor) else f"a tensor of shape {tuple(loss.shape)}"
            raise ValueError(f"closure: in a block over tasks, the closure returns each task's scalar inner "
                             f"loss; it returned {got} for one task.")
        return loss

    return fmodel.each_task(one, batch)


def _first_task(function: Callable[..., Any], batch: list[Any], fmodel: FunctionalModel) -> Any:
    """``closure(f, *batch_0)``: the first task's loss alone, its slices taken inside (so that a
    batch tensor that requires grad is reached through them), for
    :func:`metagrad.trajectory._first_task_seen`."""
    return function(fmodel, *[b[0] if isinstance(b, torch.Tensor) else b for b in batch])


def take_step(trajectory: Any, closure: Callable[..., Any], batch: Sequence[Any], rule: Any,
              tasks: Optional[int], parameters: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """``meta.step(closure, *batch, rule=rule)``: one inner step, of one task or of ``tasks``
    (:func:`advance_tasks`); a closure whose signature cannot take ``(fmodel, *batch)`` is
    named with what it is called with, and one that backpropagates its own loss (a
    ``torch.optim`` closure's ``loss.backward()``: into the model's ``parameters``, whose
    ``.grad`` it would add the inner gradients to) is refused."""
    marks = _grad_marks(parameters)
    try:
        if tasks is None:
            live, frozen = with_batch(closure, batch, None) if batch else (closure, None)
            loss = trajectory.advance(live, rule, frozen=frozen)
        else:
            loss = advance_tasks(trajectory, closure, batch, rule, tasks)
    except TypeError as error:
        _refuse_misfit(closure, len(batch), tasks, error)
        raise
    except RuntimeError as error:
        if "backward through the graph a second time" not in str(error):
            raise
        raise ValueError(_BACKWARD_INSIDE + f" (torch: {str(error).split('.')[0]}.)") from error
    if _grad_marks(parameters) != marks:
        raise ValueError(_BACKWARD_INSIDE + " The model's .grad changed during the step (a backward, or "
                         "zero_grad(), inside the closure): the inner gradients would have been added to the "
                         "meta-gradient, or the meta-gradient accumulated so far lost.")
    return loss


#: Why a closure may not backpropagate its own loss.
_BACKWARD_INSIDE = ("closure: it backpropagated during the inner step (loss.backward() inside the closure, as a "
                    "torch.optim closure does). meta.step takes the inner gradient itself, and differentiates "
                    "it: return the loss without calling .backward() on it.")


def _grad_marks(parameters: Sequence[torch.Tensor]) -> list[Optional[tuple[int, int]]]:
    """Each tensor's ``.grad`` as an (identity, version) pair (``None`` without one): a backward
    that reaches it replaces or adds to it, and changes the pair."""
    return [None if (g := p.grad) is None else (id(g), g._version) for p in parameters]


def _refuse_misfit(closure: Callable[..., Any], count: int, tasks: Optional[int], error: TypeError) -> None:
    """Raise where ``closure``'s signature cannot take ``(fmodel, *batch)`` with ``count`` batch
    values (the ``TypeError`` of its call, ``error``, then came from that); return where it can
    or cannot be read (the error came from inside it)."""
    signature = misfit_signature(closure, 1 + count)
    if signature is None:
        return
    try:
        signature.bind_partial(None, *range(count))
        advice = ("Pass its batch after the closure, meta.step(closure, x_s, y_s)"
                  + (f", each tensor with a first dimension of {tasks} (one slice per task)." if tasks else "."))
    except TypeError:  # it takes fewer
        advice = ("Take them as arguments after fmodel, meta.step(lambda f, x, y: loss(f(x), y), x_s, y_s)"
                  + (", each task gets its own slices," if tasks else ",") + " or capture them and pass none.")
    given = ("no batch values (none passed after the closure)" if count == 0 else
             f"the {count} batch value(s) passed after the closure" + (" (each task's slices)" if tasks else ""))
    name = getattr(closure, "__qualname__", type(closure).__name__)
    raise TypeError(f"closure: meta.step calls closure(fmodel, *batch), here with {given}, but its signature "
                    f"is {name}{signature}. {advice}") from error


def advance_tasks(trajectory: Any, closure: Callable[..., Any], batch: Sequence[Any], rule: Any,
                  tasks: int) -> torch.Tensor:
    """One inner step of a block over ``tasks``: ``closure(f_t, *batch_t)`` for each task
    (:func:`with_batch`), the update rule checked to act on each task alone
    (:func:`check_rule`), and a closure that cannot run under ``torch.func.vmap`` named with
    what to do. Returns the T losses, detached."""
    check_batch(batch, tasks)
    check_rule(trajectory.rule if rule is None else rule, trajectory.current, trajectory.tape.state, tasks)
    live, frozen = with_batch(closure, batch, tasks)
    if not batch:
        _warn_whole(closure, frozen, tasks)
    try:
        return trajectory.advance(live, rule, frozen=frozen, parts=True,
                                  probe=functools.partial(_first_task, closure, list(batch)))
    except RuntimeError as error:
        if isinstance(error, SparseGradientError) or not any(
                word in str(error) for word in ("vmap", "Batching rule", "functorch transform", "doesn't have storage")):
            raise  # (not one of vmap's: an op it has no rule for, requires_grad_ inside it, .numpy() on a slice)
        said = str(error).strip()
        said += "" if said.endswith(".") else "."
        raise ValueError(
            f"closure: a block over tasks={tasks} calls the closure once per task under "
            f"torch.func.vmap, and it cannot run there: {said} Rewrite that part with tensor "
            "operations (no .item() or .numpy(), no Python branch on a tensor's value, no op without a batching "
            "rule; a derivative inside the closure by torch.func.grad, not requires_grad_ and "
            "torch.autograd.grad), or run each task in its own block (MetaGradient without tasks=).") from error


def _warn_whole(closure: Callable[..., Any], frozen: Frozen, tasks: int) -> None:
    """Warn, once per closure code, where a step over ``tasks`` is given no batch and the
    closure captures tensors whose first dimension is ``tasks``: each task is given them whole
    (only what is passed after the closure is sliced), which is what the one-task loop's
    closure written for stacked data does (``lambda f: loss(f(x_s), y_s)``: every task takes
    the same step, on every task's data)."""
    function = closure.func if isinstance(closure, functools.partial) else closure
    key = (id(getattr(function, "__code__", type(function))), tasks)
    if key in _LOOKED_AT:
        return
    if len(_LOOKED_AT) >= 1024:
        _LOOKED_AT.clear()
    _LOOKED_AT.add(key)
    whole = [f"{frozen.names[slot]} {tuple(t.shape)}" for slot, t in frozen.tensors
             if t.dim() > 0 and t.shape[0] == tasks and not t.requires_grad]
    if whole:
        warn(f"meta.step: a block over tasks={tasks} was given no batch after the closure, and the closure "
             f"captures {', '.join(whole)}, with a first dimension of {tasks}: every task is given all of it "
             "(only the tensors passed after the closure are sliced, one slice per task): each task's step is "
             "taken on every task's data. Pass the tasks' data after the closure: "
             "meta.step(lambda f, x, y: loss(f(x), y), x_s, y_s).")


#: The closures (by their code's id, and the number of tasks) :func:`_warn_whole` looked at.
_LOOKED_AT: set[tuple[int, int]] = set()


def no_loss_steps(tasks: int) -> str:
    """Why a block over tasks takes no step from a given loss (``meta.step_from_loss``)."""
    return (f"step_from_loss: a block over tasks={tasks} takes each task's step from "
            "meta.step(closure, *batch), which differentiates the sum of the tasks' own losses; a "
            "loss built outside it (a mean over tasks, say) would scale each task's step. Use "
            "meta.step, or a block per task.")


#: The module whose update rules act element by element (so task by task on stacked weights).
_ELEMENTWISE = "metagrad.optim"


def check_rule(rule: Any, params: dict[str, torch.Tensor], state: Any, tasks: int) -> None:
    """Refuse an update rule that does not act on each task's weights alone: on a probe
    gradient that differs between tasks, its step on the stacked weights must equal its step
    task by task (``torch.func.vmap``). The rules of :mod:`metagrad.optim` are elementwise and
    not probed; another rule is probed once per object."""
    if type(rule).__module__ == _ELEMENTWISE or _probed(rule):
        return
    with torch.no_grad():
        params = {n: t.detach().clone() for n, t in params.items()}  # (a rule may write them in place)
        grads = {n: torch.linspace(-1.0, 1.0, t.numel() // tasks, dtype=t.dtype, device=t.device)
                 .reshape(t.shape[1:]) * torch.arange(1, tasks + 1, dtype=t.dtype, device=t.device)
                 .reshape(-1, *[1] * (t.dim() - 1)) for n, t in params.items()}
        # On copies of the state: a rule that updates its state in place leaves the block's as it was.
        leaves, spec = pytree.tree_flatten(state)
        leaves = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        dims = [0 if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == tasks else None for x in leaves]
        stacked = rule.step(params, grads, pytree.tree_unflatten([x.clone() if isinstance(x, torch.Tensor) else x
                                                                  for x in leaves], spec))[0]
        try:
            each = torch.func.vmap(lambda p, g, s: rule.step(p, g, pytree.tree_unflatten(s, spec))[0],
                                   in_dims=(0, 0, dims))(params, grads, leaves)
        except Exception as error:
            if "random operation" in str(error):  # (vmap's randomness="error")
                raise ValueError(
                    f"inner_opt: {type(rule).__name__}'s step draws random numbers (a noisy update such as "
                    f"SGLD's), so a block over tasks={tasks} cannot check that it acts on each task's weights "
                    "alone (torch.func.vmap refuses random operations). Run each task in its own block "
                    "(MetaGradient without tasks=), where the rule's draws are replayed for every rebuilt step.") from error
            raise ValueError(
                f"inner_opt: a block over tasks={tasks} needs an update rule that acts on each task's "
                f"weights alone; {type(rule).__name__} could not be checked task by task under "
                f"torch.func.vmap ({error}). Use a rule of mg.optim, or run each task in its own block.") from error
    for name in stacked:
        if not torch.allclose(stacked[name], each[name], rtol=1e-5, atol=1e-6):
            raise ValueError(
                f"inner_opt: a block over tasks={tasks} needs an update rule that acts on each task's "
                f"weights alone; {type(rule).__name__}'s step on all tasks' weights at once differs from "
                f"its step on each task's (fast weight {name!r}): it mixes the tasks (a norm or mean over "
                "a whole tensor). Use a rule of mg.optim, or run each task in its own block.")
    try:
        _PROBED[rule] = True
    except TypeError:  # not weakly referable: probed again at its next step
        pass


#: The rules probed so far (held weakly).
_PROBED: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def _probed(rule: Any) -> bool:
    try:
        return rule in _PROBED
    except TypeError:
        return False
