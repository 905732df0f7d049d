"""What :func:`metagrad.functional.meta_grad` looks at in a loss function before its inner loop,
once per loss function (its code, or the object), at φ_0, called directly (not under a
transform, which cannot read values back).

- :func:`check_reads`: which of ``params`` and of the meta-parameters the loss reads (a loss that
  calls the module instead of reading ``params`` gives zero meta-gradients).
- :func:`look_at`: what on the support loss's graph cannot be differentiated twice, or is
  differentiated twice wrongly by torch or by ``torch.func``, and whether the loss draws random
  numbers (its products would draw others).
"""

from __future__ import annotations

import math
import types
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from .discovery import graph_inputs
from .errors import warn
from .numerics import inexact, tolerance
from .step import rule_slots, rule_tensors

__all__ = ["check_reads", "look_at"]


def check_reads(losses: Sequence[Callable[..., torch.Tensor]], phi: Callable[[], dict[str, torch.Tensor]],
                 eta: list[torch.Tensor], rule: Any, names: list[str], loss_of: Any) -> None:
    """Say which of ``params``, and which tensors of ``meta`` the update rule does not hold, the
    loss does not read, on the query batch or the support batch (``losses``, tried in turn, at
    φ_0 = ``phi()``, one gradient for both): their meta-gradient comes out zero.

    - No parameter read is a ``ValueError`` (a ``loss_fn`` that calls the module, ``model(x)``,
      instead of ``functional_call(model, params, (x,))``: every gradient would be zero), some a
      warning.
    - A tensor of ``meta`` read by neither: most often the loss or the rule reads a tensor computed
      from it outside, which ``meta_grad`` cannot see (it differentiates in the tensors of ``meta``
      themselves: ``SGD(lr=log_lr.exp())``, a captured ``wd = log_wd.exp()``). A ``ValueError``
      where the rule holds a floating-point tensor that is not in ``meta`` (a step size computed
      so), else a warning (a tensor of ``meta`` that nothing uses).

    Each once per loss function (its code, or the object: ``loss_of``, :class:`~metagrad.functional.TaskLoss`), with
    the parameters' names and the tensors of ``meta`` looked at."""
    start = phi()
    held = rule_slots(rule, eta)
    unheld = [k for k, t in enumerate(eta) if id(t) not in held]
    tried = _tried(loss_of)
    params_key, meta_key = ("params", tuple(start)), ("meta", tuple(unheld))
    check_params, check_meta = params_key not in tried, bool(unheld) and meta_key not in tried
    if not (check_params or check_meta):
        return
    unread = list(start) if check_params else []
    unread_eta = list(unheld) if check_meta else []
    for loss_at in losses:
        with torch.enable_grad():
            p = {n: t.detach().requires_grad_(n in unread) for n, t in start.items()}
            e = [t.detach().requires_grad_(k in unread_eta) for k, t in enumerate(eta)]
            loss = loss_at(p, e)
            wrt = [p[n] for n in unread] + [e[k] for k in unread_eta]
            read = torch.autograd.grad(loss, wrt, allow_unused=True) if loss.requires_grad else [None] * len(wrt)
        unread, unread_eta = ([n for n, g in zip(unread, read) if g is None],
                              [k for k, g in zip(unread_eta, read[len(unread):]) if g is None])
        if not unread and not unread_eta:
            break
    if check_params:
        if len(unread) == len(start):
            raise ValueError(
                f"loss_fn: its loss does not depend on params (no gradient reaches {unread} from the query or the "
                "support batch), so every meta-gradient would be zero. Build the loss from the params argument, "
                "torch.func.functional_call(model, params, (x,)), not from the module itself (model(x)).")
        tried.add(params_key)
        if unread:
            warn(f"params: {', '.join(unread)} read by loss_fn neither on the query nor on the support batch, so "
                 "their meta-gradient is zero. If loss_fn reads those weights from the module (functional_call with "
                 "some of params, the rest the module's own), pass it all of params; leave out of params what the "
                 "loss does not use.")
    if not check_meta:
        return
    ids = {id(t) for t in eta}
    said = ", ".join(names[k] for k in unread_eta)
    if unread_eta and any(inexact(t) and id(t) not in ids for t in rule_tensors(rule)):
        raise ValueError(
            f"meta: {said} is neither read by loss_fn (on the query or the support batch) nor held by inner_opt, "
            "while inner_opt holds a tensor that is not in meta. A step size computed from a tensor of meta outside "
            "meta_grad (SGD(lr=log_lr.exp()) with meta={'log_lr': log_lr}) is a constant to it: meta_grad learns "
            "a step size that inner_opt holds as the very tensor passed in meta, so the gradient of "
            f"{said} would be zero. Hold that tensor itself in a rule of your own that computes the step size in "
            "its step (self.log_lr.exp()), or pass the tensor inner_opt holds in meta; leave out of meta what the "
            "loss does not use. (MetaGradient finds step sizes computed from a meta-parameter by autograd.)")
    tried.add(meta_key)
    if unread_eta:
        warn(f"meta: {said} is neither read by loss_fn (on the query or the support batch) nor held by inner_opt, "
             "so its gradient is zero. If loss_fn reads a tensor computed from it outside (wd = log_wd.exp(), "
             "captured), read it from loss_fn's meta argument instead (meta['log_wd'].exp()): meta_grad "
             "differentiates in the tensors of meta themselves. Leave out of meta what the loss does not use.")


def look_at(inner: Callable[..., torch.Tensor], phi: Callable[[], dict[str, torch.Tensor]],
          eta: list[torch.Tensor], loss_of: Any, compute: bool = True) -> tuple[Optional[str], bool]:
    """What in the graph of the support loss at φ_0 cannot be differentiated twice, or has a
    wrong derivative in torch (:func:`metagrad.discovery.once_differentiable`), or a second
    derivative that torch.func takes otherwise than autograd (:func:`_unlike_autograd`),
    described, or ``None``: the products that take second derivatives refuse it
    (:meth:`metagrad.pure.PureTrajectory._twice`); and whether the loss draws random numbers (it
    changes torch's generators, or gives another value from the same states: a generator of its
    own, NumPy's). The comparison of second derivatives needs a loss that draws none.
    Looked at once per loss function (:func:`_tried`), the modules it reads and their mode; the
    caller's generators are left as they were. ``compute=False`` (under a transform, where nothing
    can be read back): what an earlier direct call found, or ``(None, False)``."""
    tried = _tried(loss_of)
    # (by what the loss function reads too: one code may close over another model)
    reads = ("once", _captured(loss_of.loss_fn))
    known = next((found for kind, found in tried if kind == reads), None)
    if known is None and not compute:
        return None, False
    if known is None:
        start = phi()
        devices = sorted({t.device.index or 0 for t in start.values() if t.device.type == "cuda"})
        with torch.enable_grad(), torch.random.fork_rng(devices=devices):
            before = _generator_states(devices)
            p = {n: t.detach().requires_grad_() for n, t in start.items()}
            loss = inner(p, [t.detach().requires_grad_() for t in eta])
            random = any(not torch.equal(a, b) for a, b in zip(before, _generator_states(devices)))
            if not random:  # a generator of its own, NumPy's, Python's: the loss again, from the same states
                # (torch's are as they were: nothing drew from them; grad mode on: a loss may take a derivative inside)
                again = inner({n: t.detach() for n, t in start.items()}, [t.detach() for t in eta]).detach()
                first = loss.detach()
                random = not bool((again - first).abs() <= 1e-2 * tolerance(first.dtype, first.device) * first.abs())
            once = graph_inputs([loss], set(), {})[1]
            if once is None and loss.requires_grad and not random:  # (a loss that draws: no one function to compare)
                once = _unlike_autograd(inner, start, eta, p, loss)
        known = (once, random)
        for entry in [e for e in tried if isinstance(e[0], tuple) and _dead(e[0][1])]:
            tried.discard(entry)  # (what a loss function read before, gone since)
        tried.add((reads, known))
    return known[0], known[1]


def _generator_states(devices: list[int]) -> list[torch.Tensor]:
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in devices)]


def _dead(captured: tuple[Any, ...]) -> bool:
    return any(isinstance(ref, weakref.ref) and ref() is None for ref in captured)


def _captured(function: Any) -> tuple[Any, ...]:
    """The modules and functions ``function`` closes over or names as globals (what decides
    which ops its loss runs; not its data; with each module its training mode): a Python function
    by its code, a module with no parameters or submodules (a loss module) by its type, others each by a weak reference (equal to another only while
    both are alive and of the same object: a new object at a freed one's address is another), or
    by identity where it cannot be referenced so."""
    values = []
    for cell in getattr(function, "__closure__", None) or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # (an empty cell)
            values.append(None)
    names = getattr(getattr(function, "__code__", None), "co_names", ())
    found = getattr(function, "__globals__", {})
    values += [found[n] for n in names if n in found]
    out: list[Any] = []
    for value in values:
        if isinstance(value, torch.Tensor) or not (isinstance(value, torch.nn.Module) or callable(value)):
            continue
        if isinstance(value, types.FunctionType):
            out.append(value.__code__)  # (a new lambda of the same code each call is the same function)
            continue
        if isinstance(value, torch.nn.Module) and not value._modules and not value._parameters:
            out.append((type(value), value.training))  # (a loss module made anew for each task)
            continue
        try:
            ref = weakref.ref(value)
            hash(ref)  # (the referent's hash, kept by the reference)
            out.append(ref)
        except TypeError:
            out.append(("id", id(value)))
        if isinstance(value, torch.nn.Module):
            out.append(value.training)  # (dropout draws in training mode only)
    return tuple(out)


def _unlike_autograd(inner: Callable[..., torch.Tensor], start: dict[str, torch.Tensor], eta: list[torch.Tensor],
                     p: dict[str, torch.Tensor], loss: torch.Tensor) -> Optional[str]:
    """A description if the support loss's Hessian-vector product at φ_0 (along a fixed direction) by
    ``torch.func``, as every product of ``meta_grad`` takes it, differs from autograd's (of ``loss``
    at the leaves ``p``), else ``None``. torch.func differentiates the autodiff graph of a
    TorchScript function (``torch.jit.script``) twice wrongly, in torch 2.13, and autograd rightly.
    Called for a loss that draws no random numbers (:func:`look_at`), so both evaluate one function."""
    names = [n for n in p]
    grads = torch.autograd.grad(loss, [p[n] for n in names], create_graph=True, allow_unused=True)
    used = [(n, g) for n, g in zip(names, grads) if g is not None and g.requires_grad]
    if not used:
        return None
    # Along a pseudo-random direction (the caller's random numbers untouched): ‖Hu‖ is then of the
    # size of H itself, and no symmetry of the loss (a shift of all logits) makes it vanish.
    draw = torch.Generator().manual_seed(0)
    along = {n: torch.randn(start[n].shape, generator=draw, dtype=start[n].dtype).to(start[n].device) for n, _ in used}
    by_autograd = torch.autograd.grad([g for _, g in used], [p[n] for n, _ in used], [along[n] for n, _ in used],
                                      allow_unused=True)
    fixed = [t.detach() for t in eta]
    base = {n: t.detach() for n, t in start.items()}  # (params may require grad: no graph to them here)
    gradient = torch.func.grad(lambda w: inner({**base, **w}, fixed))
    pull = torch.func.vjp(lambda w: {n: g for n, g in gradient(w).items() if n in along},
                          {n: base[n] for n in along})[1]
    by_func = pull(along)[0]
    off = sum(float((by_func[n].detach() - (torch.zeros_like(base[n]) if a is None else a.detach())).norm() ** 2)
              for (n, _), a in zip(used, by_autograd)) ** 0.5
    scale = sum(float(0 if a is None else a.detach().norm() ** 2) for a in by_autograd) ** 0.5
    first = next(iter(start.values()))
    if not (math.isfinite(off) and math.isfinite(scale)):
        return None  # (a product that is not finite tells nothing)
    if off <= tolerance(first.dtype, first.device) * scale + 100 * torch.finfo(first.dtype).eps * (scale + 1):
        return None
    return (f"an op whose second derivatives torch.func takes otherwise than autograd (the loss's Hessian-vector "
            f"product at params differs by {off:.3g} against {scale:.3g}), as a TorchScript function's "
            "(torch.jit.script) autodiff graph, which torch.func differentiates twice wrongly")


def _tried(loss_of: Any) -> set[tuple[Any, tuple[Any, ...]]]:
    """What :func:`check_reads` looked at for this loss function: by its code, or (a partial, a
    callable object: no code) by the object, held weakly, while it lives (an empty set, looked at
    again on every call, for one that cannot be held weakly)."""
    if not isinstance(loss_of.identity[1], int):
        return _TRIED.setdefault(loss_of.identity, set())
    try:
        return _TRIED_BY_OBJECT.setdefault(loss_of.loss_fn, set())
    except TypeError:
        return set()


#: What :func:`check_reads` looked at, per loss function: by its code (:attr:`~metagrad.functional.TaskLoss.identity`),
#: and (held weakly) the loss functions without one.
_TRIED: dict[Any, set[tuple[Any, tuple[Any, ...]]]] = {}
_TRIED_BY_OBJECT: "weakref.WeakKeyDictionary[Any, set[tuple[Any, tuple[Any, ...]]]]" = weakref.WeakKeyDictionary()
