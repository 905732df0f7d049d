"""The user's module evaluated at fast weights (``meta.fmodel``), and the buffer policy.

Buffer policy (MATH.md, "Numerics that bite"): metagrad never writes to a buffer.
Every inner step, every rebuilt step graph and the query see the buffers as they
are. A normalization layer (BatchNorm, InstanceNorm) in training mode normalizes
with the statistics of the batch it is given and leaves its running statistics
untouched; in eval mode it uses the stored running statistics. This is what
MAML does, and it is the only policy under which a step graph rebuilt later, or
rebuilt inside ``torch.func.vmap``, computes the same function as the step the
inner loop took.
"""

from __future__ import annotations

import copy
import functools
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional, cast

import torch
from dataclasses import dataclass, field

from torch.func import functional_call
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import is_parametrized
from torch.utils import _pytree as pytree
from torch.nn.modules.batchnorm import _NormBase

from .attention import math_attention

__all__ = ["FastWeights", "FunctionalModel", "Layout", "RUNNING_STATS", "refuse_cached"]

RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


class FastWeights(dict[str, torch.Tensor]):
    """A name→tensor dict that refuses changes: :attr:`FunctionalModel.params`. The fast weights
    are what the inner steps made; a changed copy (``dict(f.params)``) changes nothing else."""

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("the fast weights (f.params) are read-only: the inner steps set them. To evaluate the "
                        "model at other weights, build a dict, w = dict(f.params), and call "
                        "torch.func.functional_call(model, w, args)")

    __setitem__ = __delitem__ = pop = popitem = clear = setdefault = __ior__ = _refuse

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Only what each name holds already (``torch.func.functional_call`` writes the weights it
        swapped in back into the dict it was given); anything else is refused."""
        if any(name not in self or dict.__getitem__(self, name) is not value
               for name, value in dict(*args, **kwargs).items()):
            self._refuse()


class FunctionalModel:
    """A module called at given fast weights, without touching the module.

    ``fmodel(*args, **kwargs)`` runs ``module.forward`` with its trainable
    parameters replaced by :attr:`params` (``torch.func.functional_call``).
    Parameters that do not require grad, and buffers, are taken from the module
    (see the module docstring for the buffer policy).

    A parameter held by several submodules (tied weights) is replaced in every one of
    them by the fast weight of the name ``named_parameters()`` gives it. A submodule
    registered under several names (an attribute that is also an entry of a
    ``Sequential``, one layer used twice) is swapped once, so after every call the
    module holds its own Parameters again.

    ``layout`` is :meth:`Layout.of` the module, for callers that evaluate the same
    module many times (each call otherwise walks the module tree to find it).

    ``tasks=T`` (a block over T tasks, ``MetaGradient(tasks=T)``): every fast weight has a
    leading dimension of T, and a call maps over the leading dimension of its tensor
    arguments, which must be T: task t's inputs through task t's weights
    (``torch.func.vmap``), non-tensor arguments passed to every task as they are.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        params: Mapping[str, torch.Tensor],
        *,
        guard: Optional[Callable[[], None]] = None,
        layout: Optional["Layout"] = None,
        fixed: Optional[Mapping[str, torch.Tensor]] = None,
        tasks: Optional[int] = None,
    ) -> None:
        self._tasks = tasks
        self._module = module
        self._params = dict(params)
        # Tensors used in place of parameters that are not fast weights (a rebuilt step's
        # meta-parameters under torch.func); not part of `params`.
        self._fixed = dict(fixed) if fixed else {}
        self._guard = guard
        self._layout = Layout.of(module) if layout is None else layout

    @property
    def tasks(self) -> Optional[int]:
        """T, the tasks whose weights :attr:`params` stacks, or ``None`` for one task."""
        return self._tasks

    def task(self, index: int) -> "FunctionalModel":
        """In a block over tasks, the model at task ``index``'s fast weights (one task's model:
        its ``state_dict()`` and ``to_module()`` give that task's adapted model)."""
        if self._tasks is None:
            raise ValueError("task: this model holds one task's fast weights (tasks unset); use it as it is.")
        if isinstance(index, bool) or not isinstance(index, int) or not -self._tasks <= index < self._tasks:
            raise IndexError(f"index: expected an integer in [0, {self._tasks}) (tasks={self._tasks}), got {index!r}.")
        return self.with_params({n: t[index] for n, t in self.params.items()})

    def with_params(self, params: Mapping[str, torch.Tensor], tasks: Optional[int] = None) -> "FunctionalModel":
        """The same module (layout, fixed tensors, guard) at other fast weights: one task's
        weights inside a map over tasks (``tasks=None``)."""
        return FunctionalModel(self._module, params, guard=self._guard, layout=self._layout,
                               fixed=self._fixed, tasks=tasks)

    @property
    def module(self) -> torch.nn.Module:
        """The wrapped module (never modified)."""
        return self._module

    def buffer_versions(self) -> dict[str, tuple[int, int]]:
        """``name → (id, version counter)`` of each of the module's buffers now: a call that
        wrote to one in place (a forward hook's update) changes its entry."""
        return {f"{prefix}{key}": (id(buffer), buffer._version) for prefix, sub in self._layout.modules
                for key, buffer in sub._buffers.items() if buffer is not None}

    @property
    def params(self) -> Mapping[str, torch.Tensor]:
        """The fast weights, as a read-only name→tensor dict (:class:`FastWeights`: it can be
        handed to ``torch.func.functional_call(model, f.params, args)``)."""
        if self._guard is not None:
            self._guard()
        return FastWeights(self._params)

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Iterate over ``(name, fast weight)`` pairs, like ``nn.Module.named_parameters``."""
        return iter(self.params.items())

    def parameters(self) -> Iterator[torch.Tensor]:
        """Iterate over the fast weights, like ``nn.Module.parameters``."""
        return iter(self.params.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The module's ``state_dict()`` at the fast weights: the same keys (tied weights under
        each of their names), each fast weight and every other parameter and buffer detached
        (buffers as the module holds them: metagrad never writes one). For
        ``other.load_state_dict(meta.fmodel.state_dict())``, or saving the adapted model. In a
        block over tasks, of one task: ``meta.fmodel.task(t).state_dict()``."""
        self._one_task("state_dict")
        params = self.params
        first = dict(self._layout.aliases)
        out = {}
        for key, value in self._module.state_dict(keep_vars=True).items():
            name = key if key in params else first.get(key, key)
            out[key] = (params[name] if name in params else value).detach()
        return out

    def to_module(self) -> torch.nn.Module:
        """A deep copy of the module whose parameters hold the fast weights (detached): a real
        ``nn.Module`` at the adapted weights for evaluation code that expects one. The copy's
        parameters are new ``nn.Parameter`` objects with the module's ``requires_grad`` flags
        and no ``.grad``; nothing of it reaches θ or the inner loop. In a block over tasks, of
        one task: ``meta.fmodel.task(t).to_module()``."""
        self._one_task("to_module")
        state = self.state_dict()
        copy_ = copy.deepcopy(self._module)
        for param in copy_.parameters():
            param.grad = None
        copy_.load_state_dict(state)
        return copy_

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._guard is not None:
            self._guard()
        if self._layout.parametrized:
            refuse_cached(f"model: its submodules {list(self._layout.parametrized)} have parametrized tensors "
                          "(torch.nn.utils.parametrize), and")
        if self._tasks is not None:
            return self._over_tasks(args, kwargs)
        params = {**self._fixed, **self._params} if self._fixed else self._params
        tensors = {**_frozen_buffers(self._layout.norms), **params}
        for alias, name in self._layout.aliases:
            if name in params:
                tensors[alias] = params[name]
        if self._layout.checkpoints:
            # Activation checkpointing recomputes part of the forward pass during backward,
            # after functional_call has put the module's own parameters back: the recomputation
            # would see θ instead of the fast weights. A copy of the module that holds the fast
            # weights for good is what its recomputation sees instead.
            return _unwritten(lambda: _holding(self._module, tensors)(*args, **kwargs), self._params)
        return _unwritten(lambda: _call_at(self._module, self._layout.slots, tensors, args, kwargs), self._params)

    def _one_task(self, what: str) -> None:
        if self._tasks is not None:
            raise ValueError(f"{what}: meta.fmodel holds the fast weights of tasks={self._tasks}; the module "
                             f"holds one set. Take one task's: meta.fmodel.task(t).{what}().")

    def _over_tasks(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """The call mapped over tasks: tensor arguments split along their first dimension."""
        tasks = self._tasks
        assert tasks is not None  # (called over tasks only)
        found = unstacked((args, dict(kwargs)), tasks)
        if found is not None:
            raise ValueError(
                f"meta.fmodel: a block over tasks={tasks} maps over the first dimension of every "
                f"tensor argument, which must be {tasks}; got a tensor of shape "
                f"{tuple(found[1].shape)}. Stack the tasks' inputs along a first dimension "
                "(torch.stack), or pass a tensor shared by every task as a non-tensor value.")
        return self.each_task(lambda model, *a, **k: model(*a, **k), args, kwargs)

    def each_task(self, function: Callable[..., Any], args: Any, kwargs: Optional[Mapping[str, Any]] = None) -> Any:
        """``function(model_t, *args_t, **kwargs_t)`` for each task t, stacked, by
        ``torch.func.vmap`` over the first dimension of the fast weights (T stacked sets) and of
        the tensors among ``args`` and ``kwargs`` (other values go to every task as they are);
        ``model_t`` is this module at task t's weights (random draws differ between tasks)."""
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
        where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

        def one(params: Mapping[str, torch.Tensor], tensors: list[torch.Tensor]) -> Any:
            full = list(leaves)
            for i, tensor in zip(where, tensors):
                full[i] = tensor
            call_args, call_kwargs = pytree.tree_unflatten(full, spec)
            return function(self.with_params(params), *call_args, **call_kwargs)

        with math_attention():  # (the fused attention kernels have no batching rule: metagrad.attention)
            return torch.func.vmap(one, randomness="different")(self._params, [leaves[i] for i in where])

    def __repr__(self) -> str:
        if self._tasks is not None:
            return (f"FunctionalModel({type(self._module).__name__}, {len(self._params)} fast weights, "
                    f"tasks={self._tasks})")
        return f"FunctionalModel({type(self._module).__name__}, {len(self._params)} fast weights)"


@dataclass(frozen=True)
class Layout:
    """What evaluating a module at fast weights needs to know about its structure."""

    #: Normalization layers that track running statistics, with their buffers' prefix.
    norms: list[tuple[str, _NormBase]]
    #: ``(alias, name)`` for each further slot (submodule, attribute) holding a parameter that
    #: ``name``, its first name, already holds: tied weights. Further names of one slot (a
    #: submodule registered under several names) are not aliases.
    aliases: list[tuple[str, str]]
    #: Some submodule's ``forward`` uses activation checkpointing (``torch.utils.checkpoint``):
    #: the module is evaluated as a copy that holds the fast weights (:func:`_holding`).
    checkpoints: bool = False
    #: Every dotted name of a parameter or buffer (each name of a submodule registered under
    #: several) → ``(submodule, key)``, the slot it names (:func:`_call_at`).
    slots: Mapping[str, tuple[torch.nn.Module, str]] = field(default_factory=dict)
    #: ``(prefix, submodule)`` for each submodule once, the prefix its dotted names start with
    #: (``"body.0."``; ``""`` for the module itself).
    modules: list[tuple[str, torch.nn.Module]] = field(default_factory=list)
    #: The submodules with a parametrized tensor (``torch.nn.utils.parametrize``), by name.
    parametrized: tuple[str, ...] = ()

    @classmethod
    def of(cls, module: torch.nn.Module) -> "Layout":
        modules = [(f"{prefix}." if prefix else "", sub) for prefix, sub in module.named_modules()]
        norms = [(prefix, sub) for prefix, sub in modules if isinstance(sub, _NormBase) and sub.track_running_stats]
        # A name is an alias only where it reaches a slot (submodule object, attribute name)
        # that no earlier name reaches. A submodule registered under several names (``self.body``
        # also in ``self.seq``, one layer twice in a Sequential) gives one slot several names;
        # handing functional_call more than one of them swaps the slot twice, and the second swap
        # saves the first one's fast weight as the "original" it restores: the module would keep
        # a fast weight in place of its Parameter. Weights tied between two submodules (or two
        # attributes) are different slots holding one Parameter, and each slot needs its name.
        first: dict[int, str] = {}
        slots: set[tuple[int, str]] = set()
        aliases = []
        named: dict[str, tuple[torch.nn.Module, str]] = {}
        for prefix, sub in module.named_modules(remove_duplicate=False):
            for key in [*sub._parameters, *sub._buffers]:
                named[f"{prefix}.{key}" if prefix else key] = (sub, key)
            for key, param in sub._parameters.items():
                if param is None or (id(sub), key) in slots:
                    continue
                slots.add((id(sub), key))
                name = f"{prefix}.{key}" if prefix else key
                if id(param) in first:
                    aliases.append((name, first[id(param)]))
                else:
                    first[id(param)] = name
        checkpoints = any(_calls_checkpoint(type(sub).forward) for _, sub in modules)
        parametrized = tuple(prefix.rstrip(".") or "(the model)" for prefix, sub in modules if is_parametrized(sub))
        return cls(norms, aliases, checkpoints, named, modules, parametrized)


def refuse_cached(what: str) -> None:
    """Raise if ``torch.nn.utils.parametrize.cached()`` is active: a parametrized tensor is then
    computed once and reused while the cache lives, so a call at other fast weights would see
    the first ones (``what`` begins the message)."""
    if getattr(parametrize, "_cache_enabled", 0):
        raise ValueError(
            f"{what} torch.nn.utils.parametrize.cached() is active: each parametrized tensor is computed "
            "once and then reused while the cache lives, so the inner steps and the query would not see the fast weights change, and the "
            "meta-gradient would be wrong with no error. Run the inner loop outside `with "
            "parametrize.cached():` (the parametrization is then computed from the fast weights at "
            "every call).")


def unstacked(tree: Any, tasks: int) -> Optional[tuple[int, torch.Tensor]]:
    """The first tensor among ``tree``'s leaves that is not one slice per task (no first
    dimension of ``tasks``), with its index among the leaves; ``None`` if there is none."""
    for i, leaf in enumerate(pytree.tree_leaves(tree)):
        if isinstance(leaf, torch.Tensor) and (leaf.dim() == 0 or leaf.shape[0] != tasks):
            return i, leaf
    return None


def _call_at(module: torch.nn.Module, slots: Mapping[str, tuple[torch.nn.Module, str]],
             tensors: Mapping[str, Optional[torch.Tensor]], args: tuple[Any, ...],
             kwargs: Mapping[str, Any]) -> Any:
    """``module(*args, **kwargs)`` with the parameters and buffers ``tensors`` names put in
    their slots for the call and the module's own put back after it, as
    ``torch.func.functional_call(module, tensors, args, kwargs, tie_weights=False)`` does
    (tied names are in ``tensors`` already). The slots are looked up in ``slots``
    (:attr:`Layout.slots`) instead of by walking the dotted names, which on a small network
    costs as much as its forward pass; a name with no slot there (the module changed since),
    and code being compiled, go through ``functional_call`` itself."""
    found = [] if torch.compiler.is_compiling() else [_store(slots.get(name)) for name in tensors]
    stores = [store for store in found if store is not None]
    if not stores or len(stores) < len(tensors):
        # (a None: a running statistic the call must not update, as functional_call takes it)
        return functional_call(module, cast(dict[str, torch.Tensor], dict(tensors)), args, dict(kwargs),
                               tie_weights=False)
    saved: list[tuple[dict[str, Any], str, Any]] = []
    try:
        for (store, key), tensor in zip(stores, tensors.values()):
            saved.append((store, key, store[key]))
            store[key] = tensor
        return module(*args, **kwargs)
    finally:
        for store, key, original in reversed(saved):
            store[key] = original


def _unwritten(call: Callable[[], Any], params: Mapping[str, torch.Tensor]) -> Any:
    """``call()``, the module's forward at the fast weights ``params``, raising a ``ValueError``
    if it wrote any of them in place (``nn.Embedding(max_norm=...)`` renormalizes the rows it
    looks up; a forward that clips its weight under ``torch.no_grad()``): the stored iterates
    share their storage, and autograd does not see the write (nor these counters one through
    ``.data``). Read from the version counters, eagerly (not while torch.compile traces, nor
    inside torch.func transforms)."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return call()
    versions = [t._version for t in params.values()]
    try:
        out = call()
    except RuntimeError as error:
        if "modified inplace" in str(error) or any(t._version != v for t, v in zip(params.values(), versions)):
            _refuse_written(params, versions, error)
        raise
    if any(t._version != v for t, v in zip(params.values(), versions)):
        _refuse_written(params, versions, None)
    return out


def _refuse_written(params: Mapping[str, torch.Tensor], versions: list[int], error: Optional[BaseException]) -> None:
    written = [n for (n, t), v in zip(params.items(), versions) if t._version != v]
    raise ValueError(
        f"model: its forward wrote the fast weights {written or '(some of them)'} in place "
        "(nn.Embedding(max_norm=...) renormalizes the rows it looks up in place; so does a forward that clips its "
        "weight under torch.no_grad()), which autograd does not see and which would change the iterates kept for "
        "the backward. Compute it out of place (an embedding "
        "without max_norm, its rows scaled by (max_norm / norm).clamp(max=1); w.clamp(...) on the weight it "
        "uses), as a function of the fast weights.") from error


def _store(slot: Optional[tuple[torch.nn.Module, str]]) -> Optional[tuple[dict[str, Any], str]]:
    """The dictionary (``_parameters`` or ``_buffers``) that holds a slot's tensor now, and its key."""
    if slot is None:
        return None
    sub, key = slot
    for store in (sub._parameters, sub._buffers):
        if key in store:
            return store, key
    return None


@functools.lru_cache(maxsize=256)
def _calls_checkpoint(function: Any) -> bool:
    """Whether ``function``'s code (or a function or lambda defined inside it) names
    ``checkpoint`` or ``checkpoint_sequential`` (``torch.utils.checkpoint``)."""
    code = getattr(function, "__code__", None)
    stack = [] if code is None else [code]
    while stack:
        code = stack.pop()
        if {"checkpoint", "checkpoint_sequential"} & set(code.co_names):
            return True
        stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return False


def _holding(module: torch.nn.Module, tensors: Mapping[str, Optional[torch.Tensor]]) -> torch.nn.Module:
    """A shallow copy of ``module``'s tree whose parameters and buffers are ``tensors`` (by
    name, aliases included) where given. Submodules are copied once each (a submodule under
    several names stays one object); everything else (hooks, flags, other attributes) is
    shared with the module, which is left untouched."""
    copies: dict[int, torch.nn.Module] = {}

    def copy_of(sub: torch.nn.Module, prefix: str) -> torch.nn.Module:
        if id(sub) in copies:
            return copies[id(sub)]
        new = copy.copy(sub)
        copies[id(sub)] = new
        new.__dict__["_parameters"] = {key: tensors.get(prefix + key, value) for key, value in sub._parameters.items()}
        new.__dict__["_buffers"] = {key: tensors.get(prefix + key, value) for key, value in sub._buffers.items()}
        new.__dict__["_modules"] = {key: None if child is None else copy_of(child, f"{prefix}{key}.")
                                    for key, child in sub._modules.items()}
        return new

    return copy_of(module, "")


def _frozen_buffers(norms: list[tuple[str, _NormBase]]) -> dict[str, Optional[torch.Tensor]]:
    """Replacement buffers that implement the buffer policy.

    For a normalization layer in training mode that tracks running statistics,
    the statistics are replaced by ``None``: it then normalizes with batch
    statistics and updates nothing. Every other buffer is left as it is.
    """
    return {prefix + stat: None for prefix, sub in norms if sub.training for stat in RUNNING_STATS}
