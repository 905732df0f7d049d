"""Differentiable inner-loop update rules.

An update rule is a pair of pure functions over name→tensor mappings, in the
shape of optax's ``GradientTransformation``::

    state = rule.init(params)
    params, state = rule.step(params, grads, state)

``step`` must be differentiable in ``params`` and ``grads`` with ordinary torch
operations and must not modify its inputs in place: the Full estimator
differentiates through it with autograd, and Checkpointed, Truncated and
Binomial rebuild it under ``torch.autograd`` and ``torch.func`` transforms at
stored iterates (MATH.md, "Optimizers other than plain gradient descent").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol, Union, runtime_checkable

import torch

Params = dict[str, torch.Tensor]
State = dict[str, Any]

__all__ = ["UpdateRule", "SGD"]


@runtime_checkable
class UpdateRule(Protocol):
    """The interface every inner-loop update rule implements."""

    def init(self, params: Mapping[str, torch.Tensor]) -> State:
        """Return the rule's state for the first step (a possibly empty dict of tensors)."""
        ...

    def step(
        self, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], state: State
    ) -> tuple[Params, State]:
        """Return the updated parameters and state, without modifying the inputs."""
        ...


LearningRate = Union[float, Mapping[str, Union[float, torch.Tensor]]]


class SGD:
    """Plain gradient descent, ``φ ← φ − α ∇L_tr(φ)`` (MATH.md, "Setting").

    Args:
        lr: the step size α. A finite non-negative float, or a mapping from parameter
            name to a float or tensor (broadcastable to the parameter's shape) for
            per-parameter step sizes. Every trainable parameter must have an entry.
            Step-size tensors are constants: metagrad differentiates with respect to the
            initialization θ only, so they must not require grad.

    The state is empty. With a per-parameter ``lr`` the step Jacobian is
    ``I − diag(α) H``, and every estimator stays exact in the sense of MATH.md.
    """

    def __init__(self, lr: LearningRate) -> None:
        if isinstance(lr, Mapping):
            checked: dict[str, float | torch.Tensor] = {}
            for name, value in lr.items():
                checked[name] = _check_step_size(value, f"lr[{name!r}]")
            self.lr: LearningRate = checked
        else:
            self.lr = _check_step_size(lr, "lr")  # type: ignore[assignment]

    def __repr__(self) -> str:
        if isinstance(self.lr, Mapping):
            return f"SGD(lr=<{len(self.lr)} per-parameter step sizes>)"
        return f"SGD(lr={self.lr})"

    def init(self, params: Mapping[str, torch.Tensor]) -> State:
        if isinstance(self.lr, torch.Tensor):
            for name, param in params.items():
                _check_step_size_fits(self.lr, param, "lr", name)
        if isinstance(self.lr, Mapping):
            missing = [name for name in params if name not in self.lr]
            unknown = [name for name in self.lr if name not in params]
            if missing or unknown:
                raise ValueError(
                    f"lr: per-parameter step sizes must name exactly the trainable parameters; "
                    f"missing {missing}, unknown {unknown}. Accepted names: {list(params)}."
                )
            for name, value in self.lr.items():
                if isinstance(value, torch.Tensor):
                    _check_step_size_fits(value, params[name], f"lr[{name!r}]", name)
        return {}

    def step(
        self, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], state: State
    ) -> tuple[Params, State]:
        if isinstance(self.lr, Mapping):
            lr = self.lr
            return {name: p - lr[name] * grads[name] for name, p in params.items()}, state
        return {name: p - self.lr * grads[name] for name, p in params.items()}, state


def _check_step_size(value: Any, argument: str) -> float | torch.Tensor:
    """Validate one step size; return it as a float or a detached-free tensor."""
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise ValueError(
                f"{argument}: the step-size tensor requires grad, but metagrad differentiates with "
                "respect to the initialization only; pass lr.detach()."
            )
        if not value.is_floating_point():
            raise TypeError(f"{argument}: expected a floating-point tensor, got dtype {value.dtype}.")
        if value.device.type != "meta":
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{argument}: step sizes must be finite, got {value}.")
            if bool((value < 0).any()):
                raise ValueError(f"{argument}: step sizes must be >= 0, got {value}.")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{argument}: expected a finite float >= 0 or a tensor, got {type(value).__name__} {value!r}."
        )
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{argument}: expected a finite float >= 0, got {value!r}.")
    return float(value)


def _check_step_size_fits(value: torch.Tensor, param: torch.Tensor, argument: str, name: str) -> None:
    """A step-size tensor must sit on the parameter's device and broadcast to its shape."""
    if value.device != param.device:
        raise ValueError(
            f"{argument}: step size is on {value.device} but parameter {name!r} is on "
            f"{param.device}; move it with .to({str(param.device)!r})."
        )
    try:
        torch.broadcast_shapes(value.shape, param.shape)
    except RuntimeError:
        raise ValueError(
            f"{argument}: shape {tuple(value.shape)} does not broadcast to parameter {name!r}'s "
            f"shape {tuple(param.shape)}."
        ) from None
