"""torchopt users keep their optimizers and their loops, and gain ``estimator=``.

Installed as ``metagrad.adapters.torchopt``. torchopt is imported on first use: importing
``metagrad``, ``metagrad.adapters`` or this module does not import it.

**Functional style: a torchopt optimizer as the inner update rule.** A
``GradientTransformation`` (``torchopt.sgd``, ``torchopt.adam``, ``torchopt.chain(...)``)
is an inner rule as it is: the core recognizes a gradient transformation by its ``init``
and ``update`` and wraps it in :class:`metagrad.optim.TransformationRule`, without this
module. :func:`as_update_rule` does the same after checking that it is torchopt's::

    with mg.MetaGradient(net, inner_opt=torchopt.adam(lr=0.01),
                         estimator=mg.Checkpointed()) as meta:
        for _ in range(K):
            meta.step(lambda fmodel: F.cross_entropy(fmodel(x_s), y_s))
        F.cross_entropy(meta.fmodel(x_q), y_q).backward()

Each step is torchopt's own arithmetic, ``u, s ← tx.update(g, s, params=φ, inplace=False)``
then ``φ ← φ + u``, without in-place writes.

**Object style: ``MetaSGD`` / ``MetaAdam`` stepped in place.** The loop stays as it is; the
optimizer's constructor is the one line that changes::

    inner_opt = torchopt.MetaSGD(net, lr=0.1)                                    # before
    inner_opt = metagrad.adapters.torchopt.MetaSGD(net, lr=0.1, estimator=mg.Binomial(3))  # after

    net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(inner_opt, by="reference")
    for x_s, y_s, x_q, y_q in tasks:
        for _ in range(K):
            inner_opt.step(F.cross_entropy(net(x_s), y_s))   # the module now holds φ_k
        F.cross_entropy(net(x_q), y_q).backward()            # meta-gradient into each p.grad
        torchopt.recover_state_dict(net, net_state)          # the inner loop ends here
        torchopt.recover_state_dict(inner_opt, opt_state)
    meta_opt.step()

:class:`MetaSGD`, :class:`MetaAdam`, torchopt's other object-style optimizers (``MetaAdamW``,
``MetaRMSProp``, ``MetaAdaGrad``, ``MetaAdaDelta`` and their other spellings; not
``MetaAdaMax`` and ``MetaRAdam``, whose state holds a Python int step count) and :class:`MetaOptimizer` (any ``GradientTransformation``, as
``torchopt.MetaOptimizer(net, impl)``) take torchopt's arguments, positional ones included,
plus ``estimator=`` (default Full: torchopt's own unroll) and ``check_finite=``. They subclass torchopt's classes, so
``torchopt.extract_state_dict`` and ``recover_state_dict`` accept them. Each inner loop is
one :class:`metagrad.MetaGradient` block. It opens at the first ``step`` taken while the
module holds ordinary parameters θ, and ends when the module holds θ again (restored by
``recover_state_dict(net, ...)``, noticed at the next ``step``), at
``recover_state_dict(inner_opt, ...)``, or at :meth:`close`. ``with MetaSGD(...) as inner_opt:``
closes at the end of the ``with``. A query loss may be backpropagated after its loop ended.

**Memory.**

- Functional style with closures: that of the core. Full keeps K step graphs.
  Checkpointed keeps K iterates and one step graph at a time. Truncated(T) keeps T
  iterates, Binomial keeps K iterates and one level's graphs, and FirstOrder keeps none.
  Every stored iterate carries the optimizer's state with it, so Adam's two moments
  triple the stored floats.
- Object style: each ``step(loss)`` receives a loss whose forward graph is already built,
  and no closure exists to rebuild it. Full keeps K step graphs, as torchopt does.
  Checkpointed and Binomial keep every step's forward and gradient graph, so memory grows
  like Full's. Binomial then computes its products one step at a time, since a kept graph
  cannot be vmapped. Truncated(T) keeps the last T steps' graphs. FirstOrder keeps none.
  For the low-memory estimators, use the functional style with closures. Implicit needs
  closures too, so the object style rejects it.

**Optimizer state and the estimators** (MATH.md, "Optimizers other than plain gradient
descent"). Full is exact for every torchopt optimizer, and Checkpointed for every one whose
state is all in its state tree. A rule that keeps Python state of its own, such as
``torchopt.sgd(momentum, dampening>0)`` (a first-call flag in a Python closure), is rebuilt
with that state as it is at backward time, not as it was at the step: the replay check
(:mod:`metagrad.replay`) sees the rebuilt step differ and raises ``ReplayError`` for the
rebuilding estimators; use Full, or ``mg.optim.Momentum(dampening=...)``. Truncated and
Binomial hold the state (momentum, Adam's moments and count) constant. That is exact for
``torchopt.sgd`` without momentum and an approximation otherwise. torchopt 0.7.3's states
are NamedTuples and lists whose leaves are all tensors, its step counts included (0-dim
int64), so Binomial stacks them for ``torch.func.vmap``. :func:`as_update_rule` refuses
any state with a leaf that is not a tensor. Two torchopt limits under vmap:

- ``torchopt.clip_grad_norm`` calls ``float()`` on the norm, so Binomial cannot rebuild
  steps through it. Use Checkpointed. torchopt also treats the norm as a constant.
- ``torchopt.adam`` runs its second moment through ``addcmul_``, which has no batching
  rule. It is correct under vmap, and torch warns about a slow fallback.

**Buffers.** The core's policy (:mod:`metagrad.functional`): buffers are never written.
While a ``MetaSGD``/``MetaAdam`` is attached to a module (from construction to
:meth:`close`, or until it is garbage-collected), every normalization layer in training
mode normalizes with the batch statistics and leaves its running statistics and
``num_batches_tracked`` as they are. A layer in eval mode uses its running statistics.
torchopt's own loop updates the running statistics at every forward. The gradients
are the same, since a layer in training mode normalizes with batch statistics in both.

**Differences from torchopt.**

- Buffers are never written (above).
- Each inner loop starts from a fresh optimizer state. ``load_state_dict`` (so
  ``recover_state_dict(inner_opt, ...)``) accepts only the state saved before a loop's
  first step, and ``state_dict()`` during a loop raises. torchopt keeps the state of an
  unrecovered optimizer and carries it into the next loop.
- The optimizer's initial state is a constant, even with ``moment_requires_grad=True``. A
  learning-rate tensor that requires grad (``torchopt.sgd(lr=tensor)``) is a meta-parameter:
  every estimator gives it the gradient MATH.md's table defines, in both styles.
- ``torchopt.stop_gradient(net)`` / ``stop_gradient(inner_opt)`` would cut the
  estimator's graph. The next ``step`` raises, and so does ``state_dict()``. Pass
  ``estimator=mg.Truncated(T)`` or ``mg.FirstOrder()`` instead.
- Parameters with ``requires_grad=False`` are left in the module untouched; torchopt
  cannot step a module that has them. A weight tied between submodules stays one fast
  weight; torchopt unties it after the first step, and each copy then follows only its
  own part of the gradient. ``add_param_group`` is not supported: one module per
  optimizer.
- With ``eps_root=0`` (torchopt's default), ``torchopt.adam`` takes the square root of the
  second moment, and that square root has an infinite derivative at 0. Take an inner
  gradient entry that is zero and still depends on θ: the bias of a Linear layer followed
  by BatchNorm, whose gradient cancels to 0 or to about 1e-16 depending on rounding. It
  backpropagates 0·∞ = NaN, and the NaN spreads to the whole meta-gradient, in torchopt's
  own loop and through this adapter alike. Pass ``eps_root`` > 0, as torchopt advises for
  meta-gradients, or use :class:`metagrad.optim.Adam`, whose square root has a zero
  derivative at 0.

**Precision.** The arithmetic is torchopt's own. With Full, both styles give torchopt's
unroll exactly: the measured difference is 0 in float64 for sgd, momentum, adam and a
chain. torchopt's Adam is less precise than ``torch.optim.Adam`` and
:class:`metagrad.optim.Adam`, even in float64. It computes ``1 − β^t`` as
``1 - pow(β, count)`` with an int64 count, which torch evaluates in float32, and
``1 − β2^t ≈ 1e-3`` then keeps only about 5 significant digits. Measured: each step
differs by about 7e-6 relative, and a 4-step meta-gradient by about 3e-6.
"""

from __future__ import annotations

import functools
import sys
import weakref
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch.nn.modules.batchnorm import _NormBase

from metagrad import Estimator, MetaGradient
from metagrad.attention import math_attention
from metagrad.estimators import resolve
from metagrad.fmodel import RUNNING_STATS
from metagrad.optim import Params, TransformationRule

#: torchopt's other object-style optimizers, each ``MetaOptimizer(module, alias(...))`` with the
#: alias's arguments in the same order (torchopt 0.7): class name → functional alias.
_ALIASED = {"MetaAdamW": "adamw", "MetaRMSProp": "rmsprop", "MetaRMSprop": "rmsprop",
            "MetaAdaGrad": "adagrad", "MetaAdagrad": "adagrad", "MetaAdaDelta": "adadelta",
            "MetaAdadelta": "adadelta"}
#: torchopt's object-style optimizers whose state holds a Python int (the step count), which a
#: stored, stacked per-step state cannot (metagrad.optim.TransformationRule refuses it).
_UNSUPPORTED = {"MetaAdaMax": "adamax", "MetaAdamax": "adamax", "MetaRAdam": "radam"}

__all__ = ["as_update_rule", "TorchoptUpdateRule", "MetaOptimizer", "MetaSGD", "MetaAdam", *_ALIASED]

#: The object-style classes subclass torchopt's, so they are built on first access
#: (PEP 562 ``__getattr__`` below) and importing this module does not import torchopt.
_OBJECT_STYLE = ("MetaOptimizer", "MetaSGD", "MetaAdam", *_ALIASED)


def _import_torchopt() -> Any:
    try:
        import torchopt
    except ImportError as error:
        raise ImportError(
            "metagrad.adapters.torchopt needs torchopt; install it with "
            "pip install 'metagrad[torchopt]' (torchopt==0.7.3)."
        ) from error
    return torchopt


# ----------------------------------------------------------------- functional style
def as_update_rule(tx: Any) -> TransformationRule:
    """A torchopt ``GradientTransformation`` as a metagrad update rule.

    ``mg.MetaGradient(inner_opt=tx)`` does this itself; this function also checks that ``tx``
    is torchopt's, with a hint where it is not.

    Args:
        tx: ``torchopt.sgd(...)``, ``torchopt.adam(...)``, ``torchopt.chain(...)`` or any
            other ``GradientTransformation``.

    Returns:
        A :class:`metagrad.optim.TransformationRule` for ``mg.MetaGradient(inner_opt=...)``,
        whose state is torchopt's own.
    """
    if isinstance(tx, TransformationRule):
        return tx
    torchopt = _import_torchopt()
    if not isinstance(tx, torchopt.base.GradientTransformation):
        hint = ""
        if isinstance(tx, torchopt.MetaOptimizer):
            hint = (" It is an object-style optimizer: pass its functional form (torchopt.sgd, "
                    "torchopt.adam, ...), or use metagrad.adapters.torchopt.MetaSGD/MetaAdam.")
        elif isinstance(tx, type) or callable(tx) and not hasattr(tx, "update"):
            hint = " Call it first, e.g. torchopt.sgd(lr=0.1)."
        raise TypeError(
            f"inner_opt: expected a torchopt GradientTransformation such as torchopt.sgd(lr=0.1), "
            f"got {type(tx).__module__}.{type(tx).__qualname__}.{hint}"
        )
    return TransformationRule(tx)


#: The rule :func:`as_update_rule` returns: the core's rule for any gradient transformation
#: (``φ, s ↦ φ + u, s'`` with ``u, s' = tx.update(∇L_tr(φ), s, params=φ, inplace=False)``),
#: under the name this module gave it first.
TorchoptUpdateRule = TransformationRule


# --------------------------------------------------------------------- object style
def __getattr__(name: str) -> Any:
    if name in _OBJECT_STYLE:
        return _object_style_classes()[name]
    if name in _UNSUPPORTED:
        raise AttributeError(
            f"{name}: torchopt.{_UNSUPPORTED[name]} keeps its step count as a Python int in the optimizer "
            "state, which metagrad cannot store and stack step by step, so there is no metagrad "
            f"version of torchopt.{name}. Use MetaAdam or MetaAdamW, or MetaOptimizer(module, impl) with "
            "a transformation whose state holds tensors only.")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_OBJECT_STYLE})


@functools.lru_cache(maxsize=None)
def _object_style_classes() -> dict[str, type]:
    """The public classes: this module's logic on top of ``torchopt.MetaOptimizer``."""
    torchopt = _import_torchopt()

    def build(name: str, logic: type, base: type) -> type:
        return type(name, (logic, base), {"__module__": __name__, "__qualname__": name,
                                          "__doc__": logic.__doc__})

    meta_optimizer = build("MetaOptimizer", _MetaOptimizer, torchopt.MetaOptimizer)
    return {"MetaOptimizer": meta_optimizer,
            "MetaSGD": build("MetaSGD", _MetaSGD, meta_optimizer),
            "MetaAdam": build("MetaAdam", _MetaAdam, meta_optimizer),
            **{name: build(name, _aliased(name, alias), meta_optimizer) for name, alias in _ALIASED.items()}}


class _MetaOptimizer:
    """``torchopt.MetaOptimizer(module, impl)`` whose meta-gradient comes from ``estimator``.

    ``step(loss)`` takes one inner step from a loss built with ``module(...)`` at the
    current fast weights, and puts the new fast weights into the module in place of its
    parameters, as torchopt does, so that the next ``module(x)`` uses them. A loss built
    from the module after K steps backpropagates the estimator's meta-gradient into each
    original parameter's ``.grad``. See the module docstring for when an inner loop
    begins and ends, memory, buffers, and the differences from torchopt.

    Args:
        module: the network; its trainable parameters are θ.
        impl: a torchopt ``GradientTransformation``.
        estimator: a metagrad estimator or its name; default Full (torchopt's unroll).
        check_finite: raise at the first inner loss that is NaN or infinite.
    """

    def __init__(self, module: torch.nn.Module, impl: Any,
                 estimator: Union[Estimator, str, None] = None, *, check_finite: bool = True) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}.")
        self.impl = impl
        self.rule = as_update_rule(impl)
        self.estimator = resolve(estimator)
        if self.estimator.needs_closure:
            name = type(self.estimator).__name__
            raise ValueError(
                f"estimator: {name} needs each inner step as a closure, which step(loss) does not "
                f"give. Use mg.MetaGradient(net, inner_opt=tx, estimator=mg.{name}()) "
                "with meta.step(closure)."
            )
        self.module = module
        self.check_finite = check_finite
        self._meta: Optional[MetaGradient] = None  # the inner loop in progress
        self._last_meta: Optional[MetaGradient] = None
        self._theta: Params = {}  # the module's parameters when the loop began
        self._slots: dict[str, list[tuple[dict, str]]] = {}  # where each one sits in the module
        self._installed: Params = {}  # the fast weights the module holds now
        # The hooks live as long as this optimizer: close() removes them, and so does garbage
        # collection (the finalizer holds no reference to self).
        self._detach_hooks = weakref.finalize(self, _remove_hooks,
                                              _batch_statistics_hooks(module) + _attention_hooks(module))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.module).__name__}, estimator={self.estimator!r})"

    # ------------------------------------------------------------------ torchopt API
    def step(self, loss: torch.Tensor) -> None:  # type: ignore[override]
        """One inner step from ``loss``, built with ``module(...)`` at the current fast weights."""
        self._check_attached()
        self._end_if_restored()
        try:
            if self._meta is None:
                self._begin()
            else:
                self._check_module_holds_fast_weights()
            assert self._meta is not None
            self._meta.step_from_loss(loss, self._installed)
            self._install(self._meta.fast_weights())
        except BaseException:
            self._end(sys.exc_info())
            raise

    def state_dict(self) -> tuple[Any, ...]:
        """``(UninitializedState(),)`` between inner loops, as torchopt's before a first step.

        During an inner loop the optimizer state belongs to the estimator's stored
        trajectory and is not handed out.
        """
        self._end_if_restored()
        if self._meta is not None:
            raise RuntimeError(
                f"{type(self).__name__}.state_dict(): an inner loop is in progress, and its optimizer "
                "state belongs to the estimator (torchopt.stop_gradient(inner_opt) is not supported: "
                "pass estimator=mg.Truncated(T) or mg.FirstOrder() instead). Save the state before the "
                "first step, as torchopt.extract_state_dict(inner_opt) usually is."
            )
        return (_import_torchopt().base.UninitializedState(),)

    def load_state_dict(self, state_dict: Sequence[Any]) -> None:
        """Accept the state saved before an inner loop's first step: this ends the loop in
        progress, and the next ``step`` begins a new one from a fresh optimizer state."""
        uninitialized = _import_torchopt().base.UninitializedState
        states = list(state_dict)
        if len(states) != 1 or not isinstance(states[0], uninitialized):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: expected the state saved before the inner "
                f"loop's first step, (UninitializedState(),), got {state_dict!r}. Each metagrad inner "
                "loop starts from a fresh optimizer state."
            )
        self._end()

    def add_param_group(self, module: torch.nn.Module) -> None:
        raise NotImplementedError(
            f"{type(self).__name__}.add_param_group: one module per optimizer; wrap the modules "
            "in one nn.Module (e.g. nn.ModuleList) and pass that."
        )

    # ------------------------------------------------------------------- metagrad API
    @property
    def info(self) -> dict[str, Any]:
        """The estimator's report for the latest inner loop (``MetaGradient.info``), filled
        by the backward that ran through it."""
        meta = self._meta or self._last_meta
        return {} if meta is None else meta.info

    def close(self) -> None:
        """End the inner loop in progress and detach from the module (its normalization
        layers update their running statistics again). ``step`` then raises."""
        self._end()
        self._detach_hooks()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self._end((exc_type, exc, tb))
        self._detach_hooks()
        return False

    # ------------------------------------------------------------------------ inner
    def _begin(self) -> None:
        named = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        held = [n for n, p in named.items() if not isinstance(p, torch.nn.Parameter)]
        if held:
            raise RuntimeError(
                f"{type(self).__name__}.step: the module holds fast weights {held[:3]} of an inner "
                "loop that has ended, not its parameters. Restore them first, e.g. "
                "torchopt.recover_state_dict(net, net_state)."
            )
        slots = _parameter_slots(self.module, named)
        meta = MetaGradient(self.module, inner_opt=self.rule, estimator=self.estimator,
                            check_finite=self.check_finite)
        meta.__enter__()
        self._meta, self._theta, self._slots = meta, named, slots
        self._installed = meta.fast_weights()  # at step 0: the parameters themselves

    def _end(self, exc_info: Any = (None, None, None)) -> None:
        """End the inner loop in progress. On an error the module gets θ back, since its fast
        weights belong to a trajectory that the block releases."""
        meta, self._meta = self._meta, None
        if meta is None:
            return
        self._last_meta = meta
        if exc_info[0] is not None:
            self._install(self._theta)
        meta.__exit__(*exc_info)
        self._theta, self._slots, self._installed = {}, {}, {}

    def _end_if_restored(self) -> None:
        """The user put θ back into the module (``recover_state_dict(net, ...)``): the inner
        loop is over."""
        if self._meta is not None and all(self._held(n) is p for n, p in self._theta.items()):
            self._end()

    def _check_module_holds_fast_weights(self) -> None:
        assert self._meta is not None
        for name, fast in self._installed.items():
            held = self._held(name)
            if held is not fast:
                raise RuntimeError(
                    f"{type(self).__name__}.step: the module's {name!r} was replaced during the inner "
                    "loop by a tensor this optimizer did not put there. Restore all parameters "
                    "(torchopt.recover_state_dict(net, net_state)) to begin a new inner loop."
                )
            if self._meta.steps > 0 and held.grad_fn is None:
                raise RuntimeError(
                    f"{type(self).__name__}.step: the fast weight {name!r} was detached in place "
                    "(torchopt.stop_gradient?), which cuts the estimator's graph. Choose how much "
                    "of the loop to differentiate with estimator=, e.g. mg.Truncated(T) or "
                    "mg.FirstOrder(), instead."
                )

    def _held(self, name: str) -> torch.Tensor:
        container, key = self._slots[name][0]
        return container[key]

    def _install(self, tensors: Params) -> None:
        for name, tensor in tensors.items():
            for container, key in self._slots[name]:
                container[key] = tensor
        self._installed = dict(tensors)

    def _check_attached(self) -> None:
        if not self._detach_hooks.alive:
            raise RuntimeError(f"{type(self).__name__}.step: this optimizer was closed.")


class _MetaSGD(_MetaOptimizer):
    """``torchopt.MetaSGD`` whose meta-gradient comes from ``estimator``.

    Args:
        module, lr, momentum, weight_decay, dampening, nesterov, moment_requires_grad,
        maximize: as ``torchopt.MetaSGD`` (``torchopt.sgd``).
        estimator: a metagrad estimator or its name; default Full (torchopt's unroll).
        check_finite: raise at the first inner loss that is NaN or infinite.
    """

    def __init__(self, module: torch.nn.Module, lr: Union[float, Callable[[Any], Any]],
                 momentum: float = 0.0, weight_decay: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, moment_requires_grad: bool = True, maximize: bool = False,
                 *, estimator: Union[Estimator, str, None] = None, check_finite: bool = True) -> None:
        impl = _import_torchopt().sgd(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      dampening=dampening, nesterov=nesterov,
                                      moment_requires_grad=moment_requires_grad, maximize=maximize)
        super().__init__(module, impl, estimator, check_finite=check_finite)


class _MetaAdam(_MetaOptimizer):
    """``torchopt.MetaAdam`` whose meta-gradient comes from ``estimator``.

    Args:
        module, lr, betas, eps, weight_decay, eps_root, moment_requires_grad, maximize,
        use_accelerated_op: as ``torchopt.MetaAdam`` (``torchopt.adam``).
        estimator: a metagrad estimator or its name; default Full (torchopt's unroll).
        check_finite: raise at the first inner loss that is NaN or infinite.
    """

    def __init__(self, module: torch.nn.Module, lr: Union[float, Callable[[Any], Any]] = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, eps_root: float = 0.0,
                 moment_requires_grad: bool = True, maximize: bool = False,
                 use_accelerated_op: bool = False, estimator: Union[Estimator, str, None] = None,
                 check_finite: bool = True) -> None:
        impl = _import_torchopt().adam(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                       eps_root=eps_root, moment_requires_grad=moment_requires_grad,
                                       maximize=maximize, use_accelerated_op=use_accelerated_op)
        super().__init__(module, impl, estimator, check_finite=check_finite)


def _aliased(name: str, alias: str) -> type:
    """The logic of ``torchopt.<name>``: ``MetaOptimizer(module, torchopt.<alias>(*args, **kwargs))``."""
    class Aliased(_MetaOptimizer):
        def __init__(self, module: torch.nn.Module, *args: Any, estimator: Union[Estimator, str, None] = None,
                     check_finite: bool = True, **kwargs: Any) -> None:
            impl = getattr(_import_torchopt(), alias)(*args, **kwargs)
            super().__init__(module, impl, estimator, check_finite=check_finite)

    Aliased.__doc__ = (f"``torchopt.{name}`` whose meta-gradient comes from ``estimator``.\n\n"
                       f"    Args: torchopt's (``torchopt.{alias}``'s, after ``module``), positional ones "
                       "included, plus ``estimator`` (a metagrad estimator or its name; default Full, "
                       "torchopt's unroll) and ``check_finite`` (raise at the first inner loss that is NaN "
                       "or infinite).")
    return Aliased


def _parameter_slots(module: torch.nn.Module, theta: Params) -> dict[str, list[tuple[dict, str]]]:
    """Every ``(submodule._parameters, key)`` holding each parameter; a tied weight has several."""
    slots: dict[int, list[tuple[dict, str]]] = {id(p): [] for p in theta.values()}
    for sub in module.modules():
        for key, tensor in sub._parameters.items():
            if tensor is not None and id(tensor) in slots:
                slots[id(tensor)].append((sub._parameters, key))
    return {n: slots[id(p)] for n, p in theta.items()}


# ---------------------------------------------------------------------- buffer policy
def _batch_statistics_hooks(module: torch.nn.Module) -> list[Any]:
    """Hooks making each normalization layer of ``module`` follow the core's buffer policy:
    in training mode its running statistics are hidden (``None``) for the duration of its
    forward, so it normalizes with batch statistics and writes nothing."""
    handles = []
    for layer in module.modules():
        if isinstance(layer, _NormBase):
            hidden: dict[str, torch.Tensor] = {}
            handles.append(layer.register_forward_pre_hook(functools.partial(_hide_stats, hidden=hidden)))
            handles.append(layer.register_forward_hook(functools.partial(_show_stats, hidden=hidden),
                                                       always_call=True))
    return handles


def _hide_stats(layer: _NormBase, args: Any, *, hidden: dict[str, torch.Tensor]) -> None:
    if layer.training and layer.track_running_stats:
        for stat in RUNNING_STATS:
            # Already hidden (another optimizer's hook on the same layer): leave it to that one.
            if layer._buffers.get(stat) is not None:
                hidden[stat] = layer._buffers[stat]
                layer._buffers[stat] = None


def _show_stats(layer: _NormBase, args: Any, output: Any, *, hidden: dict[str, torch.Tensor]) -> None:
    for stat, tensor in hidden.items():
        layer._buffers[stat] = tensor
    hidden.clear()


# ---------------------------------------------------------------------- attention
def _attention_hooks(module: torch.nn.Module) -> list[Any]:
    """Hooks running ``module``'s forward with attention's math kernel
    (:class:`metagrad.attention.math_attention`): the inner losses of this style are built by
    calling the module itself, and a step's graph must be differentiated twice, which the
    fused kernels' is not. The switches are put back after each forward, also one that raises."""
    entered: list[Any] = []

    def enter(layer: torch.nn.Module, args: Any) -> None:
        context = math_attention()
        context.__enter__()
        entered.append(context)

    def leave(layer: torch.nn.Module, args: Any, output: Any) -> None:
        if entered:
            entered.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]


def _remove_hooks(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
