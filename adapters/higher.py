"""``higher`` users switch to metagrad by changing one import.

Before::

    import higher
    with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(K):
            diffopt.step(loss_fn(fmodel(x_s), y_s))
        loss_fn(fmodel(x_q), y_q).backward()

After::

    from metagrad.adapters import higher
    with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                              estimator=mg.Binomial(order=3)) as (fmodel, diffopt):
        ...  # the same loop

``fmodel(x)``, ``fmodel(x, params=...)``, ``fmodel.fast_params``,
``fmodel.parameters()`` and ``diffopt.step(loss)`` behave as in higher. Underneath,
one :class:`metagrad.MetaGradient` block runs the loop, so ``estimator=`` takes any
metagrad estimator (default: Full, the same unroll higher does).

**Two ways to step, and their memory.**

- ``diffopt.step(loss)`` (higher's way): the loss already holds that step's forward
  graph. Full differentiates through it as higher does (K step graphs with their
  double-backward graphs). The estimators that need the step Hessians later
  (Checkpointed, Truncated, Binomial) keep each step's gradient graph, so memory
  grows like an unroll of forward-and-gradient graphs; their products run one step
  at a time (a kept graph cannot be vmapped). FirstOrder keeps nothing.
- ``diffopt.step(closure=lambda fmodel: loss_fn(fmodel(x_s), y_s))`` (metagrad's way):
  nothing but the iterates is stored and each step's graph is rebuilt on demand, as
  in ``MetaGradient``, so Checkpointed and Binomial get their low memory here too.
  Implicit needs this form.

**The optimizer.** ``torch.optim.SGD`` (with or without momentum, Nesterov,
dampening, weight decay) becomes the native :class:`metagrad.optim.SGD` or
:class:`metagrad.optim.Momentum`, whose arithmetic is higher's. Every other optimizer
type higher knows (``torch.optim.Adam``, RMSprop, ..., and those added with
``higher.register_optim``) runs through higher's own differentiable implementation,
wrapped by :class:`HigherUpdateRule`, so the numbers are higher's. Per-group learning
rates become per-parameter step sizes. ``torch.optim.AdamW``, which higher cannot
differentiate, becomes the native :class:`metagrad.optim.AdamW` (torch.optim's arithmetic).
Two torch.optim settings higher's arithmetic
does not read, ``maximize=True`` (every optimizer) and Adam's
``decoupled_weight_decay=True``, are refused with a ``ValueError`` that says what to do:
higher descends and adds the weight decay to the gradient regardless, a different rule
than the one asked for. higher's Adam adds ε to √v before the bias correction rescales
it, where ``torch.optim.Adam`` adds it after, so its iterates differ from torch.optim's
by an ε-sized amount (about 3e-6 after three steps of a small float64 MLP); the adapter
keeps higher's numbers.

**Differences from higher.**

- Buffers follow metagrad's policy: never written. A BatchNorm in training mode
  normalizes with batch statistics and its running statistics stay as they are
  (higher copies the buffers into the patched module and updates the copies, which
  are then discarded).
- ``copy_initial_weights=True`` (higher's default) runs on a copy of the model, so, as
  in higher, no gradient reaches the model's parameters. MAML wants ``False``.
- ``track_higher_grads=False`` ("test mode") adapts first-order and hands out
  detached fast weights: no gradient reaches the model, as in higher.
- ``diffopt.step(params=...)`` is not supported and raises a clear error.
  ``fmodel.parameters(time=t)`` rebuilds past fast weights from the stored iterates
  (Full and the estimators that store every iterate; Truncated and FirstOrder keep too
  few and say so). ``diffopt.step(..., override=...)`` stays
  in force for later steps, as in higher, and may change hyperparameters that keep the
  rule's kind (such as ``lr``). ``grad_callback`` is applied to the gradients before the
  update, also when a step is rebuilt, so it must be differentiable (and
  ``torch.func.vmap``-compatible for Binomial).

higher is imported lazily, only for optimizers without a native rule.
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Optional, Union

import torch

from metagrad import Estimator, FirstOrder, FunctionalModel, MetaGradient
from metagrad.attention import math_attention
from metagrad.estimators import resolve
from metagrad.functional import Layout
from metagrad.optim import SGD, AdamW, Momentum, Params, State

__all__ = ["innerloop_ctx", "update_rule", "HigherUpdateRule"]


def update_rule(opt: torch.optim.Optimizer, model: torch.nn.Module,
                override: Optional[Mapping[str, Sequence[Any]]] = None) -> Any:
    """A metagrad update rule doing what ``opt`` does, for ``MetaGradient(inner_opt=...)``.

    Args:
        opt: a ``torch.optim`` optimizer over (some of) ``model``'s parameters, of a type
            higher supports.
        model: the module whose parameters ``opt`` holds (for their names).
        override: as higher's: hyperparameter name → one value, or one per group.

    Returns:
        :class:`metagrad.optim.SGD` / :class:`~metagrad.optim.Momentum` for
        ``torch.optim.SGD``, :class:`~metagrad.optim.AdamW` for ``torch.optim.AdamW`` (which
        higher has no version of); otherwise a :class:`HigherUpdateRule`.
    """
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"opt: expected a torch.optim.Optimizer, got {type(opt).__name__}.")
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for group in opt.param_groups for p in group["params"]):
        raise ValueError("opt: holds parameters that are not the model's; build the inner "
                         "optimizer over model.parameters().")
    groups = [dict(group) for group in opt.param_groups]
    for key, values in (override or {}).items():
        if len(values) not in (1, len(groups)):
            raise ValueError(
                f"override[{key!r}]: expected 1 value or one per parameter group "
                f"({len(groups)}), got {len(values)}."
            )
        for index, group in enumerate(groups):
            group[key] = values[0] if len(values) == 1 else values[index]
    _refuse_what_higher_ignores(opt, groups)
    if type(opt) is torch.optim.SGD and not opt.state:
        return _native_sgd(groups, model)
    if type(opt) is torch.optim.AdamW and not opt.state:  # higher has none: torch.optim's own arithmetic
        return _native_adamw(groups, model)
    return HigherUpdateRule(opt, model, override)


#: torch.optim settings that change the arithmetic of a step and that higher's differentiable
#: optimizers (and the native SGD rule, whose arithmetic is higher's) do not read: a group that
#: sets one would run another rule than ``opt``'s, silently. Setting → why, and what to do.
_IGNORED_BY_HIGHER = {
    "maximize": ("ascends the loss, but higher's differentiable optimizers ignore the flag and would "
                 "descend it. Pass maximize=False and negate the inner loss instead "
                 "(diffopt.step(-objective))."),
    "decoupled_weight_decay": ("decays the weights as AdamW does, but higher's differentiable Adam "
                               "adds weight_decay·φ to the gradient instead. Pass "
                               "decoupled_weight_decay=False for that rule, or use "
                               "mg.MetaGradient(model, inner_opt=mg.optim.AdamW(...)) for AdamW's."),
}


def _refuse_what_higher_ignores(opt: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
    """Raise for a setting of ``opt`` (after ``override``) that the step would not apply."""
    for key, why in _IGNORED_BY_HIGHER.items():
        if key == "decoupled_weight_decay" and type(opt) is torch.optim.AdamW:
            continue  # the native AdamW decays so (torch.optim.AdamW sets the flag in its groups)
        if any(group.get(key) for group in groups):
            raise ValueError(f"opt: {type(opt).__name__}({key}=True) {why} Refused rather than run "
                             "another rule than the optimizer's.")


def _native_sgd(groups: list[dict[str, Any]], model: torch.nn.Module) -> Union[SGD, Momentum]:
    """``torch.optim.SGD``'s groups as one native rule (per-parameter step sizes)."""
    shared = ("momentum", "dampening", "nesterov", "weight_decay")
    settings = {key: groups[0].get(key, 0) for key in shared}
    for group in groups[1:]:
        if any(group.get(key, 0) != settings[key] for key in shared):
            raise ValueError(
                "opt: parameter groups of torch.optim.SGD differ in momentum, dampening, nesterov "
                "or weight_decay; metagrad's native rule supports per-group lr only."
            )
    lr = _step_sizes(groups, model)
    if settings["momentum"] == 0:
        if settings["weight_decay"]:
            return Momentum(lr, 0.0, weight_decay=settings["weight_decay"])
        return SGD(lr)
    return Momentum(lr, settings["momentum"], dampening=settings["dampening"],
                    nesterov=settings["nesterov"], weight_decay=settings["weight_decay"])


def _native_adamw(groups: list[dict[str, Any]], model: torch.nn.Module) -> AdamW:
    """``torch.optim.AdamW``'s groups as the native :class:`metagrad.optim.AdamW`, which
    computes what torch.optim computes (higher has no differentiable AdamW)."""
    shared = ("betas", "eps", "weight_decay", "amsgrad")
    settings = {key: groups[0].get(key) for key in shared}
    if any(group.get(key) != settings[key] for group in groups[1:] for key in shared):
        raise ValueError("opt: parameter groups of torch.optim.AdamW differ in betas, eps, weight_decay or "
                         "amsgrad; metagrad's native rule supports per-group lr only.")
    if settings["amsgrad"]:
        raise ValueError("opt: AdamW(amsgrad=True) has no differentiable version (neither higher nor "
                         "metagrad.optim computes AMSGrad); pass amsgrad=False.")
    return AdamW(_step_sizes(groups, model), betas=tuple(settings["betas"]), eps=settings["eps"],
                 weight_decay=settings["weight_decay"])


def _step_sizes(groups: list[dict[str, Any]], model: torch.nn.Module) -> dict[str, Any]:
    """Each trainable parameter's step size, from its group. A parameter the optimizer does not
    hold (ANIL: an optimizer over the head alone) gets zero and keeps its value at every step,
    as in higher, where it stays a fast weight the optimizer skips."""
    names = {id(p): n for n, p in model.named_parameters()}
    lr: dict[str, Any] = {n: 0.0 for n, p in model.named_parameters() if p.requires_grad}
    lr.update({names[id(p)]: _constant(group["lr"]) for group in groups for p in group["params"]
               if p.requires_grad})
    return lr


def _constant(lr: Any) -> Any:
    """A group's step size: a float, or a tensor (one that requires grad is a meta-parameter,
    learned with every estimator)."""
    return lr


class HigherUpdateRule:
    """higher's differentiable version of a ``torch.optim`` optimizer, as a metagrad rule.

    The state is higher's per-group, per-parameter state dicts. Each :meth:`step`
    hands higher fresh containers and clones, so the stored states are never mutated. States
    with a Python step count cannot be batched by ``vmap``; Binomial then computes
    their products one step at a time.
    """

    def __init__(self, opt: torch.optim.Optimizer, model: torch.nn.Module,
                 override: Optional[Mapping[str, Sequence[Any]]] = None) -> None:
        import higher.optim  # lazily: the core never imports higher

        mapping = higher.optim._opt_mapping
        if type(opt) not in mapping:
            raise ValueError(
                f"opt: higher has no differentiable version of {type(opt).__name__}; supported: "
                f"{sorted(t.__name__ for t in mapping)}, or add one with higher.register_optim."
            )
        named = list(model.named_parameters())
        self._names = [n for n, _ in named]
        self._differentiable = mapping[type(opt)](
            opt, [p for _, p in named], override=dict(override) if override else None,
            track_higher_grads=True)
        self._kind = type(opt).__name__

    def __repr__(self) -> str:
        return f"HigherUpdateRule({self._kind})"

    def init(self, params: Mapping[str, torch.Tensor]) -> State:
        return {"groups": [{index: dict(entry) for index, entry in group.items()}
                           for group in self._differentiable.state]}

    def step(self, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor],
             state: State) -> tuple[Params, State]:
        optimizer = self._differentiable
        # higher updates some entries in place (torch's tensor step counts: step += 1): it
        # gets clones, so the states the trajectory stores are never modified.
        optimizer.state = [defaultdict(dict, {index: {key: _clone(value) for key, value in entry.items()}
                                              for index, entry in group.items()})
                           for group in state["groups"]]
        grouped = []
        for group, indices in zip(optimizer.param_groups, optimizer._group_to_param_list):
            names = [self._names[i] for i in indices]
            group["params"] = [params.get(n) for n in names]
            grouped.append([grads.get(n) for n in names])
        optimizer._update(grouped)
        new_params = dict(params)
        for group, indices in zip(optimizer.param_groups, optimizer._group_to_param_list):
            for tensor, i in zip(group["params"], indices):
                if self._names[i] in params:
                    new_params[self._names[i]] = tensor
        new_state = {"groups": [{index: dict(entry) for index, entry in group.items()}
                                for group in optimizer.state]}
        return new_params, new_state


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


class _GradientCallbackRule:
    """``rule`` applied to ``callback(grads)``: higher's ``grad_callback``, which receives
    and returns the gradients as a list in ``model.parameters()`` order (``None`` for a
    frozen parameter). The callback is rebuilt with the step, so it must be
    differentiable, and vmap-compatible for Binomial."""

    def __init__(self, rule: Any, callback: Callable, names: Sequence[str]) -> None:
        self.rule, self.callback, self.names = rule, callback, list(names)

    def __repr__(self) -> str:
        return f"{self.rule!r} with grad_callback {getattr(self.callback, '__name__', self.callback)!r}"

    def init(self, params: Mapping[str, torch.Tensor]) -> State:
        return self.rule.init(params)

    def step(self, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor],
             state: State) -> tuple[Params, State]:
        transformed = list(self.callback([grads.get(n) for n in self.names]))
        new_grads = {n: g for n, g in zip(self.names, transformed) if n in params}
        return self.rule.step(params, new_grads, state)


class _PatchedModule:
    """higher's ``fmodel``: the module called at the current fast weights."""

    def __init__(self, loop: "_InnerLoop") -> None:
        self._loop = loop

    def __call__(self, *args: Any, params: Optional[Sequence[torch.Tensor]] = None,
                 **kwargs: Any) -> Any:
        weights = self._loop.weights() if params is None else self._loop.named(params)
        # the buffer policy and tied weights, as in MetaGradient's own fmodel; attention's math
        # kernel, since a loss built here may be given to diffopt.step(loss), whose graph the
        # estimator differentiates twice (the fused kernels' backward has no derivative)
        with math_attention():
            return FunctionalModel(self._loop.module, weights, layout=self._loop.layout)(*args, **kwargs)

    @property
    def fast_params(self) -> list[torch.Tensor]:
        """The current fast weights, in ``model.parameters()`` order (frozen ones included:
        a parameter that does not require grad is not a fast weight and stays the module's)."""
        weights = self._loop.weights()
        frozen = dict(self._loop.module.named_parameters())
        return [weights[n] if n in weights else frozen[n] for n in self._loop.names]

    def parameters(self, recurse: bool = True, time: Optional[int] = None) -> Iterator[torch.Tensor]:
        """The fast weights after ``time`` steps (``None`` or ``-1``: the current ones; negative
        values count back from the current step, as in higher). Past fast weights are
        rebuilt from the stored iterates and attached to θ through the estimator, so an
        estimator that keeps fewer steps (Truncated, FirstOrder) refuses old ones."""
        if time is None or time == -1:
            return iter(self.fast_params)
        steps = self._loop.meta.steps
        index = time + steps + 1 if time < 0 else time
        if not 0 <= index <= steps:
            raise IndexError(f"fmodel.parameters(time={time}): {steps} steps taken, so time must be "
                             f"in [{-steps - 1}, {steps}].")
        weights = self._loop.meta.weights_at(index)
        names = self._loop.names
        frozen = dict(self._loop.module.named_parameters())
        return iter([weights[n] if n in weights else frozen[n] for n in names])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop.module, name)


class _DifferentiableOptimizer:
    """higher's ``diffopt``: ``step(loss)`` or ``step(closure=...)``."""

    def __init__(self, loop: "_InnerLoop") -> None:
        self._loop = loop

    def step(self, loss: Optional[torch.Tensor] = None, params: Optional[Sequence[torch.Tensor]] = None,
             override: Optional[Mapping[str, Any]] = None, grad_callback: Optional[Callable] = None,
             *, closure: Optional[Callable[[FunctionalModel], torch.Tensor]] = None,
             **kwargs: Any) -> list[torch.Tensor]:
        """One inner step; returns the new fast weights (``model.parameters()`` order).

        Args:
            loss: the inner loss, built from ``fmodel`` at the current fast weights.
            closure: instead of ``loss``: ``closure(fmodel) -> loss``, rebuilt on demand.
        """
        if params is not None:
            raise NotImplementedError(
                "diffopt.step(params=...) is not supported by metagrad's higher adapter: the fast "
                "weights are the ones fmodel holds, which the estimator differentiates through."
            )
        if kwargs:
            raise TypeError(f"diffopt.step: unexpected arguments {sorted(kwargs)}.")
        if (loss is None) == (closure is None):
            raise TypeError("diffopt.step: pass exactly one of loss and closure=.")
        self._loop.step(loss, closure, override, grad_callback)
        return self._loop.fmodel.fast_params


class _InnerLoop:
    """One MetaGradient block, seen through higher's objects."""

    def __init__(self, model: torch.nn.Module, meta: MetaGradient, detach: bool,
                 opt: torch.optim.Optimizer, override: Optional[Mapping[str, Sequence[Any]]],
                 owner: Optional[torch.nn.Module] = None) -> None:
        self.module = model
        #: The module whose parameters ``opt`` holds: ``model`` itself, or the one it is a copy
        #: of (``copy_initial_weights=True``), with the same parameter names.
        self.owner = model if owner is None else owner
        self.meta = meta
        self.detach = detach
        self.opt = opt
        self.override = dict(override or {})
        self.rule: Optional[Any] = None  # the rule after a per-step override, if any
        self._wrapped: dict[tuple[int, int], "_GradientCallbackRule"] = {}
        self.names = [n for n, _ in model.named_parameters()]
        self.layout = Layout.of(model)  # found once, not at every fmodel call
        self.fmodel = _PatchedModule(self)
        self.diffopt = _DifferentiableOptimizer(self)
        self._cache: Optional[tuple[int, Params]] = None

    def weights(self) -> Params:
        """The fast weights user code sees now: the same tensors until the next step, so
        that a loss built from them can be stepped on."""
        if self._cache is None or self._cache[0] != self.meta.steps:
            fast = self.meta.fast_weights()
            if self.detach:  # test mode: the gradient stops at the fast weights, as in higher
                fast = {n: t.detach().requires_grad_() for n, t in fast.items()}
            self._cache = (self.meta.steps, fast)
        return self._cache[1]

    def named(self, params: Sequence[torch.Tensor]) -> Params:
        params = list(params)
        if len(params) != len(self.names):
            raise ValueError(
                f"params: expected {len(self.names)} tensors in model.parameters() order, "
                f"got {len(params)}."
            )
        return dict(zip(self.names, params))

    def step(self, loss: Optional[torch.Tensor], closure: Optional[Callable],
             override: Optional[Mapping[str, Sequence[Any]]], grad_callback: Optional[Callable]) -> None:
        if override:  # as in higher, a step's override stays in force for later steps
            self.override.update(override)
            rule = update_rule(self.opt, self.owner, self.override)
            if type(rule) is not type(self.meta.inner_opt):
                raise ValueError(
                    f"override: {sorted(override)} turns the inner rule {self.meta.inner_opt!r} into "
                    f"{rule!r}, whose state differs; override hyperparameters that keep its kind "
                    "(for example lr), or pass the override to innerloop_ctx."
                )
            self.rule = rule
        rule = self.rule
        if grad_callback is not None:
            base = rule if rule is not None else self.meta.inner_opt
            key = (id(base), id(grad_callback))  # the same callback each step: one rule, batched
            if key not in self._wrapped:
                self._wrapped[key] = _GradientCallbackRule(base, grad_callback, self.names)
            rule = self._wrapped[key]
        if closure is not None:
            self.meta.step(closure, rule=rule)
        else:
            assert loss is not None  # diffopt.step checked that one of the two is given
            self.meta.step_from_loss(loss, self.weights(), rule=rule)


@contextlib.contextmanager
def innerloop_ctx(model: torch.nn.Module, opt: torch.optim.Optimizer,
                  device: Optional[torch.device] = None, copy_initial_weights: bool = True,
                  override: Optional[Mapping[str, Sequence[Any]]] = None,
                  track_higher_grads: bool = True, *,
                  estimator: Union[Estimator, str, None] = None
                  ) -> Iterator[tuple[_PatchedModule, _DifferentiableOptimizer]]:
    """A drop-in for ``higher.innerloop_ctx`` that takes ``estimator=``.

    Args:
        model, opt, device, copy_initial_weights, override, track_higher_grads: as in
            higher (see the module docstring for the differences).
        estimator: any metagrad estimator or its name; default Full.

    Yields:
        ``(fmodel, diffopt)`` as higher does.
    """
    if device is not None and any(p.device != torch.device(device) for p in model.parameters()):
        raise NotImplementedError(
            f"device={device}: move the model with model.to({str(device)!r}) instead; the adapter "
            "does not cast fast weights."
        )
    if not track_higher_grads:
        if estimator is not None:
            raise ValueError(
                f"estimator: track_higher_grads=False computes no meta-gradient, so estimator="
                f"{estimator!r} has no effect; drop one of the two."
            )
        estimator = FirstOrder()
    estimator = resolve(estimator)
    target = copy.deepcopy(model) if copy_initial_weights else model
    rule = update_rule(opt, model, override)  # a copy has the same parameter names
    with MetaGradient(target, inner_opt=rule, estimator=estimator) as meta:
        loop = _InnerLoop(target, meta, detach=not track_higher_grads, opt=opt, override=override, owner=model)
        yield loop.fmodel, loop.diffopt
