"""Which parameters an inner loop adapts: ``MetaGradient(adapt=...)``.

``adapt`` names the fast weights: parameter names, Parameter objects or submodules of the
model. The others that require grad stay fixed during the inner loop and are meta-parameters.
Where none of the adapted parameters requires grad, θ is fixed: the inner loop adapts them
from their values and only meta-parameters are learned.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["checked_adapt", "check_adapted_require_grad", "check_at_entry"]


class _Adapted(frozenset):
    """The names ``adapt=`` selects. ``listed``: those named directly (a name or a Parameter),
    which must require grad at block entry; a submodule's parameters that do not are left out."""

    listed: frozenset[str] = frozenset()


def _name_hint(entry: str, model: torch.nn.Module, valid: list[str]) -> str:
    """What a name given to ``adapt=`` that is no parameter's name may have meant: a submodule
    (every parameter it holds), a further name of a tied weight, or a name relative to a
    submodule (its own ``named_parameters()``)."""
    try:
        module = model.get_submodule(entry) if entry else None
    except AttributeError:
        module = None
    if module is not None:
        held = [f"{entry}.{name}" for name, _ in module.named_parameters()]
        attribute = f"adapt=model.{entry}" if all(part.isidentifier() for part in entry.split(".")) else "the module"
        return f" {entry!r} is a submodule: pass {attribute}, or its parameters' names {held}."
    every = dict(model.named_parameters(remove_duplicate=False))
    if entry in every:  # a further name of a Parameter held in several places (tied weights)
        first = next(name for name, p in model.named_parameters() if p is every[entry])
        return (f" {entry!r} is the same Parameter as {first!r} (tied weights: named_parameters() names it once, "
                f"by its first name): pass {first!r}, which adapts it wherever it is used.")
    ends = [name for name in valid if name.endswith("." + entry)]
    if ends:
        return (f" Names that end in {entry!r}: {ends} (a submodule's named_parameters() names them relative to "
                "it): pass the submodule itself, or the names as the model gives them.")
    return ""


def checked_adapt(adapt: Any, model: torch.nn.Module) -> Optional[frozenset[str]]:
    """``adapt=`` as a set of parameter names, or ``None`` for every parameter.

    ``adapt`` is one entry or a list of entries, each a name (``model.named_parameters()``), a
    Parameter of the model, or a submodule of the model (``model.head``: every parameter it
    holds, by its name in the model)."""
    if adapt is None:
        return None
    if not isinstance(model, torch.nn.Module):
        return None  # the model's own check raises
    if isinstance(adapt, (str, torch.Tensor, torch.nn.Module)):
        adapt = [adapt]
    owner = type(model).__name__
    child = next(iter(dict(model.named_children())), "head")
    accepted = (f"parameter names or Parameter objects of {owner}, or submodules of it (e.g. "
                f"{f'model.{child}' if child.isidentifier() else f'model[{child}]'})")
    try:
        entries = list(adapt)
    except TypeError:
        raise TypeError(f"adapt: expected {accepted}, one or a list of them; got "
                        f"{_described(adapt)}.") from None
    named = list(model.named_parameters())
    valid = [n for n, _ in named]
    by_identity = {id(p): n for n, p in named}
    submodules = {id(m): n for n, m in model.named_modules()}
    names, listed = [], []
    for entry in entries:
        if isinstance(entry, str):
            if entry not in valid:
                raise ValueError(f"adapt: {entry!r} is not a parameter of {owner}; "
                                 f"valid names: {valid}.{_name_hint(entry, model, valid)}")
            names.append(entry)
            listed.append(entry)
        elif isinstance(entry, torch.Tensor):
            if id(entry) not in by_identity:
                raise ValueError(f"adapt: a tensor of shape {tuple(entry.shape)} is not one of "
                                 f"{owner}'s parameters; valid names: {valid}.")
            names.append(by_identity[id(entry)])
            listed.append(by_identity[id(entry)])
        elif isinstance(entry, torch.nn.Module):
            if id(entry) not in submodules:
                raise ValueError(
                    f"adapt: the {type(entry).__name__} module given is not a submodule of {owner} "
                    f"(not in model.modules()); pass one of its submodules, or parameter names "
                    f"from {valid}."
                )
            inside = [by_identity[id(p)] for p in entry.parameters()]
            if not inside:
                raise ValueError(
                    f"adapt: submodule {submodules[id(entry)]!r} ({type(entry).__name__}) has no "
                    f"parameters, so it adapts nothing; valid names: {valid}."
                )
            names.extend(inside)
        else:
            raise TypeError(f"adapt: expected {accepted}; got {_described(entry)}.")
    if not names:
        raise ValueError(f"adapt: empty; name at least one parameter to adapt, from {valid}, or "
                         "pass adapt=None to adapt every parameter that requires grad.")
    adapted = _Adapted(names)
    adapted.listed = frozenset(listed)
    return adapted


def _described(value: Any) -> str:
    """``value`` in an error message: its type, and a short form of it."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) \
            and isinstance(value[1], torch.Tensor):
        return (f"the pair ({value[0]!r}, tensor) that named_parameters() yields; pass the "
                "Parameter, its name in the model, or the submodule itself")
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def check_at_entry(adapt: Optional[frozenset[str]], model: torch.nn.Module) -> None:
    """At block entry: the model's parameters exist (a lazy module has run once), and
    :func:`check_adapted_require_grad`."""
    lazy = [n for n, p in model.named_parameters() if isinstance(p, torch.nn.parameter.UninitializedParameter)]
    if lazy:
        raise ValueError(
            f"model: parameters {lazy} are not initialized yet (a lazy module, such as nn.LazyLinear, makes "
            "them at its first forward). Run the model once on a batch before the block (model(x)), so "
            "that the inner loop has weights to adapt.")
    check_adapted_require_grad(adapt, model)


def check_adapted_require_grad(adapt: Optional[frozenset[str]], model: torch.nn.Module) -> None:
    """At block entry: every parameter ``adapt=`` names directly must require grad (it may
    have been frozen since the block was built), unless none of the adapted parameters does:
    then θ is fixed (the inner loop adapts them from their values, and only meta-parameters
    are learned)."""
    listed: frozenset[str] = getattr(adapt, "listed", frozenset())
    frozen = [n for n, p in model.named_parameters() if n in listed and not p.requires_grad]
    if not frozen:
        return
    trainable = [n for n, p in model.named_parameters() if n in adapt and p.requires_grad]  # type: ignore[operator]
    if not trainable:
        return  # θ fixed
    raise ValueError(
        f"adapt: {', '.join(map(repr, frozen))} {'does' if len(frozen) == 1 else 'do'} not require "
        f"grad (requires_grad=False), so the inner loop cannot adapt "
        f"{'it' if len(frozen) == 1 else 'them'}. Set requires_grad=True before the block "
        f"(model.get_parameter(name).requires_grad_()), or leave "
        f"{'it' if len(frozen) == 1 else 'them'} out of adapt; the others adapted: {trainable}."
    )
