"""The functional face: a meta-gradient as a pure function (:func:`meta_grad`).

The same estimators as :class:`~metagrad.MetaGradient`, on a trajectory built from a pure
loss function. :class:`~metagrad.FunctionalModel` (the module at fast weights) lives in
:mod:`metagrad.fmodel` and is also importable from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .estimators.base import check_count
from .fmodel import FunctionalModel, Layout
from .update_rule import as_update_rule
from .pure import PureTrajectory, check_estimator, unroll
from .step import rule_slots

__all__ = ["FunctionalModel", "Layout", "meta_grad"]


def meta_grad(loss_fn: Callable[..., torch.Tensor], params: Mapping[str, torch.Tensor], support: Any, query: Any, *,
              inner_opt: Any, steps: int, estimator: Any = None, meta: Any = None) -> Any:
    """The meta-gradient ``∇_θ loss_fn(φ_K(θ), query)`` of K inner steps, as a pure function.

    The functional face of the estimators: the same estimator code as
    :class:`~metagrad.MetaGradient`, run on a :class:`~metagrad.pure.PureTrajectory`
    (the step's one body, :func:`metagrad.step.step_body`, with ``torch.func``'s gradient; its
    products by ``torch.func.vjp`` and ``torch.func.vmap``). It reads no Python-side state, so
    it runs under ``torch.func.vmap`` (a meta-batch of tasks at once) and ``torch.compile``::

        g = mg.functional.meta_grad(loss_fn, params, support, query,
                                    inner_opt=mg.optim.SGD(lr=0.01), steps=5,
                                    estimator=mg.Checkpointed())
        grads = torch.func.vmap(functools.partial(mg.functional.meta_grad, loss_fn,
                                                  inner_opt=..., steps=5, estimator=...),
                                in_dims=(None, 0, 0))(params, supports, queries)

    Every inner step takes its loss on ``support``; every parameter in ``params`` is a
    fast weight (one the loss does not use gets a zero gradient, which moves it only under
    weight decay). ``mg.Full()`` is ``torch.func.grad`` of ``θ ↦ loss_fn(unroll(θ), query)``,
    autograd through the unroll.

    **Meta-parameters η** (``meta``): any pytree of tensors (a dict, a list, a tensor).
    ``loss_fn`` is then called as ``loss_fn(params, batch, meta)``, for every inner step and for
    the query, and a tensor of ``meta`` that ``inner_opt`` holds (the same object: a step
    size, per-parameter step sizes) is learned as the rule's step size. The gradient of η is
    what MATH.md's table defines for the estimator, its direct part from the query included,
    as :class:`~metagrad.MetaGradient` gives it in ``.grad``::

        lrs = {n: torch.full_like(p, 0.01) for n, p in params.items()}          # Meta-SGD
        g, g_meta = mg.functional.meta_grad(loss_fn, params, support, query, steps=5,
                                            inner_opt=mg.optim.SGD(lr=lrs), meta={"lr": lrs, "wd": wd},
                                            estimator=mg.Checkpointed())

    Supported: Full, Checkpointed, FirstOrder, Truncated(T), and Binomial with a fixed order
    and ``monitor=False`` (any ``chunk_size`` or ``block``), with snapshots too
    (``Checkpointed(snapshots=...)``, ``Binomial(..., snapshots=True)``: the iterates of the
    schedule are stored on the same tape as the context manager's, the others recomputed by the
    pure step when a product needs them). Refused with a ``ValueError``
    naming ``estimator``: ``Binomial(order="auto")`` and a monitored fixed order (their level
    norms are read back as Python floats, which fails under vmap), ``Binomial(max_memory=...)``
    (it measures a rebuilt graph), and ``Implicit`` (a proximal inner loop, and a solver that
    stops on a residual read back as a Python float).

    Binomial's levels are themselves ``torch.func.vmap`` calls over the stored iterates, so
    ``vmap`` of ``meta_grad`` nests two ``vmap`` levels around a second derivative of
    ``loss_fn``. In torch 2.13 ``F.mse_loss`` fails there ("The size of tensor a (16) must
    match the size of tensor b (8)"): write the loss as ``((pred - y) ** 2).mean()``, or pass
    ``chunk_size=1`` (one product at a time, no inner ``vmap``).

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar`` (``loss_fn(params, batch, meta)`` with
            ``meta``), e.g. built on ``torch.func.functional_call(model, params, (x,))``.
        params: θ, name→tensor.
        support: the batch of the inner loss (any pytree ``loss_fn`` accepts).
        query: the batch of the outer loss.
        inner_opt: the update rule, e.g. ``mg.optim.SGD(lr=0.01)``, or a gradient
            transformation (``torchopt.sgd(lr=0.01)``; :class:`~metagrad.optim.TransformationRule`).
        steps: K >= 0.
        estimator: an estimator instance or name; ``None`` is ``mg.Full()``.
        meta: the meta-parameters η, a pytree of floating-point tensors, or ``None``.

    Returns:
        The meta-gradient, name→tensor, with the layout of ``params``; with ``meta``, the pair
        ``(that, the gradient of η with the structure of meta)``.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a function loss_fn(params, batch) -> scalar, got "
                        f"{type(loss_fn).__name__}.")
    _check_params(params)
    inner_opt = as_update_rule(inner_opt, model=False)
    check_count(steps, "steps", minimum=0)
    estimator = check_estimator(estimator)
    eta, spec, names = _meta_leaves(meta)
    theta = dict(params)

    def loss_of(batch: Any) -> Callable[[dict[str, torch.Tensor], Sequence[torch.Tensor]], torch.Tensor]:
        if meta is None:
            return lambda phi, e: loss_fn(phi, batch)
        return lambda phi, e: loss_fn(phi, batch, pytree.tree_unflatten(list(e), spec))

    inner, outer = loss_of(support), loss_of(query)
    if estimator.differentiable:  # Full: autograd through the unroll
        rule_eta = rule_slots(inner_opt, eta)

        def objective(p: dict[str, torch.Tensor], e: list[torch.Tensor]) -> torch.Tensor:
            return outer(unroll(inner, p, inner_opt, steps, e, rule_eta)[0][-1], e)

        g, g_eta = torch.func.grad(objective, argnums=(0, 1))(theta, eta)
        return _result(dict(g), list(g_eta), meta, spec)
    with torch.no_grad():
        trajectory = PureTrajectory(inner, theta, inner_opt, steps, eta, names,
                                    snapshots=estimator.snapshot_schedule())
        v, direct = torch.func.grad(outer, argnums=(0, 1))(trajectory.current, eta)
        g, g_eta, _ = estimator.backward(trajectory, steps, dict(v))
    total = [d if i >= len(g_eta) or g_eta[i] is None else d + g_eta[i] for i, d in enumerate(direct)]
    return _result({n: g[n] for n in theta}, total, meta, spec)


def _meta_leaves(meta: Any) -> tuple[list[torch.Tensor], Any, list[str]]:
    """``meta``'s tensors, its structure and a name for each (``meta`` of :func:`meta_grad`)."""
    if meta is None:
        return [], None, []
    flat, spec = pytree.tree_flatten_with_path(meta)
    if not flat:
        raise ValueError("meta: holds no tensor; pass the meta-parameters η as a tensor or a pytree of "
                         "tensors (a dict, a list), or meta=None.")
    names = [f"meta{pytree.keystr(path)}" for path, _ in flat]
    for name, (_, leaf) in zip(names, flat):
        if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
            got = type(leaf).__name__ if not isinstance(leaf, torch.Tensor) else f"a tensor of dtype {leaf.dtype}"
            raise TypeError(f"meta: {name} is {got}; every leaf of meta must be a floating-point tensor "
                            "(it is differentiated).")
    return [leaf for _, leaf in flat], spec, names


def _result(g: dict[str, torch.Tensor], g_eta: list[torch.Tensor], meta: Any, spec: Any) -> Any:
    if meta is None:
        return g
    return g, pytree.tree_unflatten(g_eta, spec)


def _check_params(params: Any) -> None:
    """``params`` of :func:`meta_grad`: a flat, non-empty mapping from names to floating-point
    tensors."""
    accepted = ("a flat mapping from parameter names to tensors, e.g. "
                "{n: p.detach() for n, p in model.named_parameters()}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected {accepted}; got {type(params).__name__}.")
    if not params:
        raise ValueError(f"params: empty; expected {accepted}.")
    for name, value in params.items():
        if not isinstance(name, str):
            raise TypeError(f"params: names must be strings, got the key {name!r} "
                            f"({type(name).__name__}); expected {accepted}.")
        if isinstance(value, Mapping):
            raise TypeError(
                f"params[{name!r}]: a nested mapping; params must be flat. Join the names with "
                f"dots instead, e.g. {{'{name}.{next(iter(value), 'weight')}': tensor}} for "
                f"{{'{name}': {{'{next(iter(value), 'weight')}': tensor}}}}."
            )
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"params[{name!r}]: expected a tensor, got {type(value).__name__}; "
                            f"params must be {accepted}.")
        if not value.is_floating_point():
            raise TypeError(f"params[{name!r}]: expected a floating-point tensor (it is "
                            f"differentiated), got dtype {value.dtype}.")
