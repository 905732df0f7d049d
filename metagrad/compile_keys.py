"""What the process-wide cache of compiled functions is keyed on (:mod:`metagrad.compiled`):
the parts of an update rule, a module and the fast weights that a compiled step or product
depends on, each by value, by kind or by identity as the compiled function uses it.

A tensor that is an input of every compiled call counts by its kind (shape, dtype, device):
a new one of the same kind (a step size computed anew for each block) finds the compiled
function of the last. A value a traced graph holds as a constant counts by value (a number)
or by identity (any other object), and the cache entry keeps such objects alive, so that no
other object can take their identity while it is cached.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .reads import SCALARS, global_names
from .frozen import _value_key as replay_value_key
from .step import rule_tensors

__all__ = ["rule_key", "rule_structure", "rule_inputs", "step_sizes_as_tensors", "module_structure",
           "module_reads_key", "shapes", "value_key"]


def value_key(value: Any) -> Any:
    """:func:`metagrad.frozen._value_key` (numbers by value, objects by identity), with tensors
    by identity and containers (a per-parameter step-size dict) entry by entry."""
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    if isinstance(value, dict):
        return ("dict", tuple((k, value_key(v)) for k, v in value.items()))
    if isinstance(value, (tuple, list)):
        return ("seq", tuple(value_key(v) for v in value))
    return replay_value_key(value)


def rule_key(rule: Any) -> Any:
    """Equal for two update rules that compute the same step: the type and the hyperparameters
    (numbers by value, tensors and other objects by identity)."""
    fields = getattr(rule, "__dict__", None)
    if fields is None:
        return ("object", id(rule))
    return (type(rule), tuple((name, value_key(value)) for name, value in sorted(fields.items())))


def rule_structure(rule: Any) -> Any:
    """What a compiled step product depends on in the update rule, whose tensors (step sizes)
    are inputs of every call (:func:`rule_inputs`): its type, and its hyperparameters flattened
    (their structure, numbers by value, other objects by identity, tensors by shape, dtype and
    device). Equal for a new rule per block with new step-size tensors (``SGD(lr=log_lr.exp())``),
    and two rules with equal structures list their tensors in the same order."""
    fields = getattr(rule, "__dict__", None)
    if fields is None:
        return ("object", id(rule))
    leaves, spec = pytree.tree_flatten(dict(fields))
    return (type(rule), str(spec), tuple(("tensor", t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor)
                                         else replay_value_key(t) for t in leaves))


def step_sizes_as_tensors(rule: Any, device: torch.device) -> Any:
    """``rule`` with its step size as tensors, where it is a number: a shallow copy whose ``lr``
    (a float, or a mapping of floats: per-parameter step sizes) is 0-dim float64 tensors on
    ``device``; ``rule`` itself otherwise. A compiled step product of the copy takes the step
    size as an input of every call (:func:`rule_inputs`) and keys it by kind
    (:func:`rule_structure`), so that a step size changed between blocks (an annealed or
    searched inner learning rate) or between steps (a schedule) compiles nothing new. The
    product is computed with the step size cast to the fast weights' dtype either way."""
    fields = getattr(rule, "__dict__", None)
    lr = None if fields is None else fields.get("lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        value: Any = torch.tensor(float(lr), dtype=torch.float64, device=device)
    elif isinstance(lr, Mapping) and lr and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in lr.values()):
        value = {name: torch.tensor(float(v), dtype=torch.float64, device=device) for name, v in lr.items()}
    else:
        return rule
    out = copy.copy(rule)
    out.lr = value
    return out


def rule_inputs(rule: Any) -> list[torch.Tensor]:
    """The rule's tensors as a compiled step product takes them, in :func:`rule_structure`'s order."""
    return [t.detach() for t in rule_tensors(rule)]


#: A module's hook registries (the last two since torch 2.0).
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks")


def module_structure(module: torch.nn.Module) -> tuple[tuple[Any, ...], list[Any]]:
    """What a traced step's graph holds of the module besides the tensors it takes as inputs
    (parameters and buffers) and the numbers :func:`module_reads_key` names: each submodule's
    name and type, its hooks, and every other value its ``forward`` reads from its own
    attributes (a plain tensor attribute, a function), by identity. Returns the key and the
    objects it names by identity, which a cache entry keeps alive so that no other object can
    take their identity: not the module, so that a new model of the same structure for every
    block (a fresh initialization) finds the compiled functions of the last, and the old one
    is freed."""
    out, held = [], []
    for prefix, sub in module.named_modules():
        hooks = [hook for name in _HOOKS for hook in getattr(sub, name, {}).values()]
        forward = getattr(type(sub).forward, "__code__", None)
        fields = vars(sub)
        read = [] if forward is None else [(name, fields[name]) for name in global_names(forward)
                                           if name in fields and not isinstance(fields[name], SCALARS)]
        held += hooks + [value for _, value in read]
        out.append((prefix, type(sub), tuple(id(hook) for hook in hooks),
                    tuple((name, id(value)) for name, value in read)))
    return tuple(out), held


def module_reads_key(module: torch.nn.Module) -> tuple[Any, ...]:
    """The numbers and strings each submodule's ``forward`` reads from its own attributes
    (``self.negative_slope``, ``self.temperature``, ``self.training``), by value: a traced graph
    holds them as constants."""
    out = []
    for prefix, sub in module.named_modules():
        forward = getattr(type(sub).forward, "__code__", None)
        if forward is None:
            continue
        fields = vars(sub)
        values = tuple((name, replay_value_key(fields[name])) for name in global_names(forward)
                       if name in fields and isinstance(fields[name], SCALARS))
        if values:
            out.append((prefix, values))
    return tuple(out)


def shapes(params: dict[str, torch.Tensor]) -> tuple[Any, ...]:
    return tuple((n, t.shape, t.dtype, t.device) for n, t in params.items())
