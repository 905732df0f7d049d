"""The functional face: a meta-gradient as a pure function (:func:`meta_grad`).

The same estimators as :class:`~metagrad.MetaGradient`, on a trajectory built from a pure
loss function. :class:`~metagrad.FunctionalModel` (the module at fast weights) lives in
:mod:`metagrad.fmodel` and is also importable from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .estimators.base import check_count
from .fmodel import FunctionalModel, Layout
from .update_rule import as_update_rule
from .pure import PureTrajectory, check_estimator, unroll

__all__ = ["FunctionalModel", "Layout", "meta_grad"]


def meta_grad(loss_fn: Callable[[dict[str, torch.Tensor], Any], torch.Tensor],
              params: Mapping[str, torch.Tensor], support: Any, query: Any, *,
              inner_opt: Any, steps: int, estimator: Any = None) -> dict[str, torch.Tensor]:
    """The meta-gradient ``∇_θ loss_fn(φ_K(θ), query)`` of K inner steps, as a pure function.

    The functional face of the estimators: the same estimator code as
    :class:`~metagrad.MetaGradient`, run on a :class:`~metagrad.pure.PureTrajectory`
    (the step ``Φ(φ) = inner_opt.step(φ, torch.func.grad(loss_fn)(φ, support), s)[0]``,
    its products by ``torch.func.vjp`` and ``torch.func.vmap``). It reads no Python-side
    state, so it runs under ``torch.func.vmap`` (a meta-batch of tasks at once) and
    ``torch.compile``::

        g = mg.functional.meta_grad(loss_fn, params, support, query,
                                    inner_opt=mg.optim.SGD(lr=0.01), steps=5,
                                    estimator=mg.Checkpointed())
        grads = torch.func.vmap(functools.partial(mg.functional.meta_grad, loss_fn,
                                                  inner_opt=..., steps=5, estimator=...),
                                in_dims=(None, 0, 0))(params, supports, queries)

    Every inner step takes its loss on ``support``; every parameter in ``params`` is a
    fast weight (one the loss does not use gets a zero gradient, which moves it only under
    weight decay). A step size that is a tensor is a constant: only θ's meta-gradient is
    returned. ``mg.Full()`` is ``torch.func.grad`` of ``θ ↦ loss_fn(unroll(θ), query)``,
    autograd through the unroll.

    Supported: Full, Checkpointed, FirstOrder, Truncated(T), and Binomial with a fixed order
    and ``monitor=False`` (any ``chunk_size`` or ``block``). Refused with a ``ValueError``
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
        loss_fn: ``loss_fn(params, batch) -> scalar``, e.g. built on
            ``torch.func.functional_call(model, params, (x,))``.
        params: θ, name→tensor.
        support: the batch of the inner loss (any pytree ``loss_fn`` accepts).
        query: the batch of the outer loss.
        inner_opt: the update rule, e.g. ``mg.optim.SGD(lr=0.01)``, or a gradient
            transformation (``torchopt.sgd(lr=0.01)``; :class:`~metagrad.optim.TransformationRule`).
        steps: K >= 0.
        estimator: an estimator instance or name; ``None`` is ``mg.Full()``.

    Returns:
        The meta-gradient, name→tensor, with the layout of ``params``.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a function loss_fn(params, batch) -> scalar, got "
                        f"{type(loss_fn).__name__}.")
    _check_params(params)
    inner_opt = as_update_rule(inner_opt, model=False)
    check_count(steps, "steps", minimum=0)
    estimator = check_estimator(estimator)
    theta = dict(params)
    if estimator.differentiable:  # Full: autograd through the unroll
        def outer(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return loss_fn(unroll(loss_fn, p, support, inner_opt, steps)[0][-1], query)

        return dict(torch.func.grad(outer)(theta))
    with torch.no_grad():
        trajectory = PureTrajectory(loss_fn, theta, support, inner_opt, steps)
        v = torch.func.grad(lambda phi: loss_fn(phi, query))(trajectory.current)
        g, _, _ = estimator.backward(trajectory, steps, dict(v))  # type: ignore[arg-type]
    return {n: g[n] for n in theta}


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
