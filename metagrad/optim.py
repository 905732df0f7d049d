"""metagrad's differentiable inner-loop update rules: :class:`SGD`, :class:`Momentum`,
:class:`Adam`, :class:`AdamW`, :class:`RMSprop` and :class:`Adagrad`, each computing what its
``torch.optim`` namesake computes, and the checks of their arguments.

Each implements :class:`UpdateRule` (``init(params) -> state`` and ``step(params, grads,
state) -> (params, state)``, pure and differentiable). That interface, the wrapper that makes a
gradient transformation (``torchopt.sgd(...)``) a rule (:class:`TransformationRule`) and the
check of an ``inner_opt`` argument (:func:`as_update_rule`, :func:`check_update_rule`) are in
:mod:`metagrad.update_rule`; their names are re-exported here, so that ``mg.optim.UpdateRule``,
``mg.optim.TransformationRule`` and the rest are where they always were.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Union

import torch

from .numerics import real_view
from .update_rule import (
    RULES,
    Params,
    State,
    TransformationRule,
    UpdateRule,
    as_update_rule,
    check_update_rule,
    is_transformation,
)

__all__ = ["UpdateRule", "SGD", "Momentum", "Adam", "AdamW", "RMSprop", "Adagrad",
           "TransformationRule", "RULES", "as_update_rule", "check_update_rule", "is_transformation"]

LearningRate = Union[float, torch.Tensor, Mapping[str, Union[float, torch.Tensor]]]


class SGD:
    """Plain gradient descent, ``φ ← φ − α ∇L_tr(φ)`` (MATH.md, "Setting").

    Args:
        lr: the step size α. A finite non-negative float, or a mapping from parameter
            name to a float or tensor (broadcastable to the parameter's shape) for
            per-parameter step sizes. Every trainable parameter must have an entry.
            A step-size tensor that requires grad is a meta-parameter (Meta-SGD, learned
            per-layer step sizes): every estimator gives it the gradient MATH.md's table
            defines ("Meta-parameters other than θ").

    The state is empty. With a per-parameter ``lr`` the step Jacobian is
    ``I − diag(α) H``, and every estimator stays exact in the sense of MATH.md.
    """

    #: The step depends on its arguments alone (no Python state kept between calls), so a step
    #: run again gives the same update: ``mg.functional.meta_grad`` need not check it.
    pure_step = True

    def __init__(self, lr: LearningRate, **torch_options: Any) -> None:
        if torch_options:
            given = ", ".join(f"{name}={value!r}" for name, value in torch_options.items())
            known = set(torch_options) <= {"momentum", "dampening", "nesterov", "weight_decay"}
            raise TypeError(
                f"SGD: got {given}; mg.optim.SGD takes only lr (plain gradient descent). "
                + ("torch.optim.SGD's momentum, dampening, nesterov and weight_decay are "
                   "mg.optim.Momentum's: mg.optim.Momentum(lr=..., momentum=0.9, weight_decay=...) "
                   "(momentum=0 for a plain step with weight decay)." if known else
                   "Pass the step size as SGD(lr=0.1), or a dict from parameter name to step size."))
        self.lr = _check_learning_rate(lr)

    def __repr__(self) -> str:
        return f"SGD(lr={_lr_repr(self.lr)})"

    def init(self, params: Mapping[str, torch.Tensor]) -> State:
        _check_learning_rate_fits(self.lr, params)
        return {}

    def step(
        self, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], state: State
    ) -> tuple[Params, State]:
        if isinstance(self.lr, float) and fusable():
            # One fused kernel (and one autograd node) for every parameter instead of two each.
            names = [name for name in params if grads.get(name) is not None]
            if not names:
                return dict(params), state
            moved = torch._foreach_add([params[n] for n in names], [grads[n] for n in names], alpha=-self.lr)
            return {**params, **dict(zip(names, moved))}, state
        new_params = {}
        for name, p in params.items():
            g = grads.get(name)
            new_params[name] = p if g is None else p - _lr_for(self.lr, name) * g
        return new_params, state


def fusable() -> bool:
    """Whether an update may use torch's fused ``_foreach`` kernels: not inside a
    ``torch.func`` transform (``vmap`` has no rule for them) and not while being compiled
    (the compiler fuses the plain form itself). Either form computes the same update."""
    return not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is None


def _check_learning_rate(lr: Any) -> LearningRate:
    """Validate ``lr``: a step size, or a mapping name → step size."""
    if isinstance(lr, Mapping):
        return {name: _check_step_size(value, f"lr[{name!r}]") for name, value in lr.items()}
    if isinstance(lr, (torch.nn.ParameterDict, torch.nn.ParameterList)):
        build = ("{n: lrs[n.replace('.', '_')] for n, _ in model.named_parameters()}" if isinstance(lr, torch.nn.ParameterDict)
                 else "dict(zip([n for n, _ in model.named_parameters()], lrs))")
        raise TypeError(
            f"lr: got an nn.{type(lr).__name__}. Per-parameter step sizes are a dict keyed like "
            f"model.named_parameters() ('0.weight', ...); pass {build}, whose tensors stay the module's "
            "and are learned as meta-parameters.")
    return _check_step_size(lr, "lr")


def _lr_repr(lr: LearningRate) -> str:
    return f"<{len(lr)} per-parameter step sizes>" if isinstance(lr, Mapping) else repr(lr)


def _lr_for(lr: LearningRate, name: str) -> Union[float, torch.Tensor]:
    return lr[name] if isinstance(lr, Mapping) else lr


def _check_learning_rate_fits(lr: LearningRate, params: Mapping[str, torch.Tensor]) -> None:
    """Per-parameter step sizes must name exactly the parameters, on their devices and shapes."""
    if isinstance(lr, torch.Tensor):
        for name, param in params.items():
            _check_step_size_fits(lr, param, "lr", name)
    if isinstance(lr, Mapping):
        missing = [name for name in params if name not in lr]
        unknown = [name for name in lr if name not in params]
        if missing or unknown:
            raise ValueError(
                f"lr: per-parameter step sizes must name exactly the trainable parameters; "
                f"missing {missing}, unknown {unknown}. Accepted names: {list(params)}."
            )
        for name, value in lr.items():
            if isinstance(value, torch.Tensor):
                _check_step_size_fits(value, params[name], f"lr[{name!r}]", name)


class Momentum:
    """Heavy-ball momentum, optionally Nesterov, as ``torch.optim.SGD(momentum=...)`` computes it.

    With ``g ← ∇L_tr(φ) + weight_decay·φ``::

        b ← g                              (first step)
        b ← μ b + (1 − dampening) g        (later steps)
        φ ← φ − α (g + μ b)   if nesterov, else   φ ← φ − α b

    The state is the step count and the buffer b. Full and Checkpointed differentiate
    through the buffer exactly; Truncated and Binomial hold it constant (MATH.md,
    "Optimizers other than plain gradient descent").

    Args:
        lr: α, as for :class:`SGD` (a float or per-parameter mapping).
        momentum: μ in [0, 1).
        dampening: in [0, 1]; 0 by default.
        nesterov: Nesterov momentum (requires ``dampening == 0``, as in torch).
        weight_decay: L2 coefficient added to the gradient, >= 0.
    """

    #: The step depends on its arguments alone (no Python state kept between calls), so a step
    #: run again gives the same update: ``mg.functional.meta_grad`` need not check it.
    pure_step = True

    def __init__(self, lr: LearningRate, momentum: float = 0.9, *, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0) -> None:
        self.lr = _check_learning_rate(lr)
        self.momentum = _check_unit(momentum, "momentum", upper_open=True)
        self.dampening = _check_unit(dampening, "dampening")
        self.weight_decay = _check_nonnegative(weight_decay, "weight_decay")
        if nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError(
                f"nesterov: Nesterov momentum needs momentum > 0 and dampening = 0, got "
                f"momentum={momentum!r}, dampening={dampening!r}."
            )
        self.nesterov = bool(nesterov)

    def __repr__(self) -> str:
        return (f"Momentum(lr={_lr_repr(self.lr)}, momentum={self.momentum}, dampening={self.dampening}, "
                f"nesterov={self.nesterov}, weight_decay={self.weight_decay})")

    def init(self, params: Mapping[str, torch.Tensor]) -> State:
        _check_learning_rate_fits(self.lr, params)
        return {"step": _step_counter(params),
                "momentum_buffer": {n: torch.zeros_like(p) for n, p in params.items()}}

    def step(
        self, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], state: State
    ) -> tuple[Params, State]:
        # The first step copies g into the buffer (torch's rule); later steps damp it.
        later = (state["step"] > 0).to(torch.float64)
        new_params, buffers = {}, dict(state["momentum_buffer"])
        for name, p in params.items():
            g = grads.get(name)
            if g is None:  # not in the loss: left as it is, with its buffer
                new_params[name] = p
                continue
            g = g + self.weight_decay * p if self.weight_decay else g
            b = self.momentum * state["momentum_buffer"][name] + (1 - self.dampening * later) * g
            direction = g + self.momentum * b if self.nesterov else b
            new_params[name] = p - _lr_for(self.lr, name) * direction
            buffers[name] = b
        return new_params, {"step": state["step"] + 1, "momentum_buffer": buffers}


class Adam:
    """Adam, as ``torch.optim.Adam`` computes it (not AMSGrad), differentiably.

    With ``g ← ∇L_tr(φ) + weight_decay·φ`` and t the step number from 1::

        m ← m + (1 − β1)(g − m)        v ← β2 v + (1 − β2) g²
        φ ← φ − α/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)

    ``√v`` is taken with a zero derivative where ``v = 0`` (a parameter with zero
    gradient), where the plain square root would make second derivatives NaN.

    Full and Checkpointed differentiate through m and v exactly; Truncated and
    Binomial hold them constant (MATH.md, "Optimizers other than plain gradient
    descent").

    Args:
        lr: α, as for :class:`SGD` (a float or per-parameter mapping).
        betas: (β1, β2), each in [0, 1).
        eps: ε > 0.
        weight_decay: L2 coefficient added to the gradient, >= 0.
    """

    #: The step depends on its arguments alone (no Python state kept between calls), so a step
    #: run again gives the same update: ``mg.functional.meta_grad`` need not check it.
    pure_step = True

    #: Weight decay enters the gradient, hence the moments (:class:`AdamW` decouples it).
    decoupled = False

    def __init__(self, lr: LearningRate = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self.lr = _check_learning_rate(lr)
        self.betas = _check_betas(betas)
        self.eps = _check_positive(eps, "eps")
        self.weight_decay = _check_nonnegative(weight_decay, "weight_decay")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(lr={_lr_repr(self.lr)}, betas={self.betas}, eps={self.eps}, "
                f"weight_decay={self.weight_decay})")

    def init(self, params: Mapping[str, torch.Tensor]) -> State:
        _check_learning_rate_fits(self.lr, params)
        return {"step": _step_counter(params),
                "exp_avg": {n: torch.zeros_like(p) for n, p in params.items()},
                "exp_avg_sq": {n: torch.zeros_like(p) for n, p in params.items()}}

    def step(
        self, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], state: State
    ) -> tuple[Params, State]:
        return _adam_step(self, params, grads, state, decoupled=self.decoupled)


class AdamW(Adam):
    """AdamW, as ``torch.optim.AdamW`` computes it (not AMSGrad), differentiably.

    Adam with decoupled weight decay λ: with g ← ∇L_tr(φ) and t the step number from 1::

        φ ← φ (1 − α λ)
        m ← m + (1 − β1)(g − m)        v ← β2 v + (1 − β2) g²
        φ ← φ − α/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)

    The decay does not enter m and v (it does in :class:`Adam`'s ``weight_decay``). ``√v``
    has a zero derivative at ``v = 0``, as in :class:`Adam`. Full and Checkpointed
    differentiate through m and v exactly; Truncated and Binomial hold them constant.

    Args:
        lr: α, as for :class:`SGD` (a float or per-parameter mapping).
        betas: (β1, β2), each in [0, 1).
        eps: ε > 0.
        weight_decay: λ >= 0; 1e-2 by default, as in torch.
    """

    #: The weight decay is decoupled from the moments (:func:`_adam_step`).
    decoupled = True

    def __init__(self, lr: LearningRate = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(lr, betas, eps, weight_decay)


def _adam_step(rule: Adam, params: Mapping[str, torch.Tensor],
               grads: Mapping[str, torch.Tensor], state: State, *, decoupled: bool
               ) -> tuple[Params, State]:
    """One step of :class:`Adam` (weight decay added to g) or :class:`AdamW` (``decoupled``:
    weight decay applied to φ before the update)."""
    beta1, beta2 = rule.betas
    t = state["step"] + 1
    bias_correction1 = 1 - torch.pow(torch.tensor(beta1, dtype=torch.float64, device=t.device), t)
    bias_correction2 = 1 - torch.pow(torch.tensor(beta2, dtype=torch.float64, device=t.device), t)
    new_params, exp_avg, exp_avg_sq = {}, dict(state["exp_avg"]), dict(state["exp_avg_sq"])
    for name, p in params.items():
        g = grads.get(name)
        if g is None:  # not in the loss: left as it is, with its moments
            new_params[name] = p
            continue
        parts = _Parts(p)  # a complex parameter's real and imaginary parts, each its own entry
        p, g, lr = real_view(p), real_view(g), parts.step_size(_lr_for(rule.lr, name))
        if decoupled and rule.weight_decay:
            p = p * (1 - lr * rule.weight_decay)
        elif rule.weight_decay:
            g = g + rule.weight_decay * p
        m = torch.lerp(real_view(state["exp_avg"][name]), g, 1 - beta1)
        v = beta2 * real_view(state["exp_avg_sq"][name]) + (1 - beta2) * g * g
        denom = _safe_sqrt(v) / torch.sqrt(bias_correction2) + rule.eps
        new_params[name] = parts.back(p - (lr / bias_correction1) * m / denom)
        exp_avg[name], exp_avg_sq[name] = parts.back(m), parts.back(v)
    return new_params, {"step": t, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


class RMSprop:
    """RMSprop, as ``torch.optim.RMSprop`` computes it, differentiably.

    With ``g ← ∇L_tr(φ) + weight_decay·φ``::

        v ← a v + (1 − a) g²
        m ← m + (1 − a)(g − m),  d ← √(v − m²) + ε   if centered, else   d ← √v + ε
        b ← μ b + g / d,  φ ← φ − α b                 if momentum μ > 0, else   φ ← φ − α g / d

    The square roots have a zero derivative at 0 (a parameter whose gradient has been
    zero), as in :class:`Adam`. The state is v, and m (``centered``) and b (``momentum``)
    where they are used. Full and Checkpointed differentiate through it exactly;
    Truncated and Binomial hold it constant.

    Args:
        lr: α, as for :class:`SGD` (a float or per-parameter mapping); 1e-2 by default.
        alpha: the smoothing constant a, in [0, 1].
        eps: ε > 0.
        weight_decay: L2 coefficient added to the gradient, >= 0.
        momentum: μ in [0, 1).
        centered: normalize by an estimate of the gradient's variance instead of its second
            moment.
    """

    #: The step depends on its arguments alone (no Python state kept between calls), so a step
    #: run again gives the same update: ``mg.functional.meta_grad`` need not check it.
    pure_step = True

    def __init__(self, lr: LearningRate = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False) -> None:
        self.lr = _check_learning_rate(lr)
        self.alpha = _check_unit(alpha, "alpha")
        self.eps = _check_positive(eps, "eps")
        self.weight_decay = _check_nonnegative(weight_decay, "weight_decay")
        self.momentum = _check_unit(momentum, "momentum", upper_open=True)
        if not isinstance(centered, bool):
            raise TypeError(f"centered: expected True or False, got {type(centered).__name__} {centered!r}.")
        self.centered = centered

    def __repr__(self) -> str:
        return (f"RMSprop(lr={_lr_repr(self.lr)}, alpha={self.alpha}, eps={self.eps}, "
                f"weight_decay={self.weight_decay}, momentum={self.momentum}, centered={self.centered})")

    def init(self, params: Mapping[str, torch.Tensor]) -> State:
        _check_learning_rate_fits(self.lr, params)
        state: State = {"square_avg": {n: torch.zeros_like(p) for n, p in params.items()}}
        if self.centered:
            state["grad_avg"] = {n: torch.zeros_like(p) for n, p in params.items()}
        if self.momentum:
            state["momentum_buffer"] = {n: torch.zeros_like(p) for n, p in params.items()}
        return state

    def step(
        self, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], state: State
    ) -> tuple[Params, State]:
        alpha = self.alpha
        new_params = {}
        new_state = {key: dict(value) for key, value in state.items()}
        for name, p in params.items():
            g = grads.get(name)
            if g is None:  # not in the loss: left as it is, with its averages
                new_params[name] = p
                continue
            parts = _Parts(p)  # a complex parameter's real and imaginary parts, each its own entry
            p, g, lr = real_view(p), real_view(g), parts.step_size(_lr_for(self.lr, name))
            g = g + self.weight_decay * p if self.weight_decay else g
            v = alpha * real_view(state["square_avg"][name]) + (1 - alpha) * g * g
            new_state["square_avg"][name] = parts.back(v)
            if self.centered:
                m = torch.lerp(real_view(state["grad_avg"][name]), g, 1 - alpha)
                new_state["grad_avg"][name] = parts.back(m)
                avg = _safe_sqrt(v - m * m) + self.eps
            else:
                avg = _safe_sqrt(v) + self.eps
            if self.momentum:
                b = self.momentum * real_view(state["momentum_buffer"][name]) + g / avg
                new_state["momentum_buffer"][name] = parts.back(b)
                new_params[name] = parts.back(p - lr * b)
            else:
                new_params[name] = parts.back(p - lr * (g / avg))
        return new_params, new_state


class Adagrad:
    """Adagrad, as ``torch.optim.Adagrad`` computes it, differentiably.

    With ``g ← ∇L_tr(φ) + weight_decay·φ`` and t the step number from 1::

        s ← s + g²
        φ ← φ − α / (1 + (t − 1)·lr_decay) · g / (√s + ε)

    s starts at ``initial_accumulator_value``. ``√s`` has a zero derivative at 0, as in
    :class:`Adam`. The state is the step count and s. Full and Checkpointed differentiate
    through s exactly; Truncated and Binomial hold it constant.

    Args:
        lr: α, as for :class:`SGD` (a float or per-parameter mapping); 1e-2 by default.
        lr_decay: >= 0.
        weight_decay: L2 coefficient added to the gradient, >= 0.
        initial_accumulator_value: s at the start, >= 0.
        eps: ε > 0; 1e-10 by default, as in torch.
    """

    #: The step depends on its arguments alone (no Python state kept between calls), so a step
    #: run again gives the same update: ``mg.functional.meta_grad`` need not check it.
    pure_step = True

    def __init__(self, lr: LearningRate = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10) -> None:
        self.lr = _check_learning_rate(lr)
        self.lr_decay = _check_nonnegative(lr_decay, "lr_decay")
        self.weight_decay = _check_nonnegative(weight_decay, "weight_decay")
        self.initial_accumulator_value = _check_nonnegative(initial_accumulator_value,
                                                            "initial_accumulator_value")
        self.eps = _check_positive(eps, "eps")

    def __repr__(self) -> str:
        return (f"Adagrad(lr={_lr_repr(self.lr)}, lr_decay={self.lr_decay}, "
                f"weight_decay={self.weight_decay}, "
                f"initial_accumulator_value={self.initial_accumulator_value}, eps={self.eps})")

    def init(self, params: Mapping[str, torch.Tensor]) -> State:
        _check_learning_rate_fits(self.lr, params)
        return {"step": _step_counter(params),
                "sum": {n: torch.full_like(p, self._initial(p)) for n, p in params.items()}}

    def _initial(self, param: torch.Tensor) -> Union[float, complex]:
        """s at the start: both parts of a complex parameter's start at the value (as in torch)."""
        value = self.initial_accumulator_value
        return complex(value, value) if param.is_complex() else value

    def step(
        self, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], state: State
    ) -> tuple[Params, State]:
        t = state["step"] + 1
        decay = 1 + (t.to(torch.float64) - 1) * self.lr_decay if self.lr_decay else None
        new_params, sums = {}, dict(state["sum"])
        for name, p in params.items():
            g = grads.get(name)
            if g is None:  # not in the loss: left as it is, with its sum
                new_params[name] = p
                continue
            parts = _Parts(p)  # a complex parameter's real and imaginary parts, each its own entry
            p, g, lr = real_view(p), real_view(g), parts.step_size(_lr_for(self.lr, name))
            g = g + self.weight_decay * p if self.weight_decay else g
            s = real_view(state["sum"][name]) + g * g
            lr = lr if decay is None else lr / decay
            new_params[name] = parts.back(p - lr * (g / (_safe_sqrt(s) + self.eps)))
            sums[name] = parts.back(s)
        return new_params, {"step": t, "sum": sums}


class _Parts:
    """A complex parameter seen as torch.optim's Adam, RMSprop and Adagrad see it: its real
    and imaginary parts as two real entries (:func:`~metagrad.numerics.real_view` of it, its
    gradient and its state), each with its own moments; back to complex tensors after the step.
    A real parameter passes through as it is."""

    def __init__(self, param: torch.Tensor) -> None:
        self.complex = param.is_complex()

    def back(self, t: torch.Tensor) -> torch.Tensor:
        return torch.view_as_complex(t) if self.complex else t

    def step_size(self, lr: Union[float, torch.Tensor]) -> Union[float, torch.Tensor]:
        """A per-entry step size, broadcast over the two parts."""
        return lr.unsqueeze(-1) if self.complex and isinstance(lr, torch.Tensor) and lr.dim() > 0 else lr


def _step_counter(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A step count as an integer tensor: state leaves are tensors, so steps can be stacked
    for ``vmap``, and an integer tensor is never differentiated."""
    device = next(iter(params.values())).device
    return torch.zeros((), dtype=torch.int64, device=device)


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``√x`` whose derivative is 0, not inf·0 = NaN, where ``x = 0``."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))),
                       torch.zeros_like(x))


def _not_a_tensor(value: Any, argument: str) -> str:
    """What to do instead, for a tensor given where a rule takes a float (only ``lr`` is learned
    as a tensor): a learned weight decay is a term of the inner loss."""
    if not isinstance(value, torch.Tensor):
        return ""
    if argument == "weight_decay":
        return (" A learned weight decay is a term of the inner loss (the L2 form of Momentum's and Adam's "
                "weight_decay), whose tensor is then a meta-parameter: "
                "meta.step(lambda f: loss(f(x), y) + wd / 2 * sum((p ** 2).sum() for p in f.params.values())).")
    return " Of a rule's settings only lr may be a tensor (a learned step size)."


def _check_unit(value: Any, argument: str, *, upper_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{argument}: expected a float, got {type(value).__name__} {value!r}.{_not_a_tensor(value, argument)}")
    if value < 0 or value > 1 or (upper_open and value == 1):
        interval = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{argument}: expected a float in {interval}, got {value!r}.")
    return float(value)


def _check_nonnegative(value: Any, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{argument}: expected a finite float >= 0, got {type(value).__name__} {value!r}."
                        f"{_not_a_tensor(value, argument)}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{argument}: expected a finite float >= 0, got {value!r}.")
    return float(value)


def _check_positive(value: Any, argument: str) -> float:
    value = _check_nonnegative(value, argument)
    if value == 0:
        raise ValueError(f"{argument}: expected a float > 0, got 0.")
    return value


def _check_betas(betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas: expected a pair (beta1, beta2), got {betas!r}.")
    return (_check_unit(betas[0], "betas[0]", upper_open=True),
            _check_unit(betas[1], "betas[1]", upper_open=True))


def _check_step_size(value: Any, argument: str) -> float | torch.Tensor:
    """Validate one step size; return it as a float or a detached-free tensor."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{argument}: expected a floating-point tensor, got dtype {value.dtype}.")
        if value.device.type != "meta":
            if not bool(torch.isfinite(value.detach()).all()):
                raise ValueError(f"{argument}: step sizes must be finite, got {value}.")
            if bool((value.detach() < 0).any()):
                raise ValueError(f"{argument}: step sizes must be >= 0, got {value}.")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        also = ", or a mapping parameter name → step size" if argument == "lr" else ""
        raise TypeError(
            f"{argument}: expected a finite float >= 0 or a tensor{also}, got {type(value).__name__} {value!r}."
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
        fits = torch.broadcast_shapes(value.shape, param.shape) == param.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"{argument}: shape {tuple(value.shape)} does not broadcast to parameter {name!r}'s "
            f"shape {tuple(param.shape)}; use a scalar, the parameter's shape, or a shape that "
            "broadcasts to it."
        )
