"""What an update rule is, and what ``inner_opt`` may be.

An update rule is a pair of pure functions over name→tensor mappings, in the
shape of optax's ``GradientTransformation``::

    state = rule.init(params)
    params, state = rule.step(params, grads, state)

``grads`` may lack a parameter's name, or map it to ``None``: the inner loss does not
depend on that parameter, and ``step`` leaves it, and its state, as they are (as
``torch.optim``, higher and torchopt skip a parameter whose ``.grad`` is ``None``, so weight
decay and momentum do not move it).

``step`` must be differentiable in ``params`` and ``grads`` with ordinary torch
operations and must not modify its inputs in place: the Full estimator
differentiates through it with autograd, and Checkpointed, Truncated and
Binomial rebuild it under ``torch.autograd`` and ``torch.func`` transforms at
stored iterates (MATH.md, "Optimizers other than plain gradient descent").

This module holds that interface (:class:`UpdateRule`, with the ``Params`` and ``State``
mappings it passes) and turns an ``inner_opt`` argument into a rule: an update rule is taken
as it is; a gradient transformation (``init(params) -> state`` and ``update(updates, state,
params=...) -> (updates, state)``, as ``torchopt.sgd(...)`` returns) is wrapped in
:class:`TransformationRule` (:func:`as_update_rule`); anything else, a ``torch.optim``
optimizer above all, is refused with the metagrad rule to use instead
(:func:`check_update_rule`). The rules themselves (``SGD``, ``Momentum``, ``Adam``, ...) are in
:mod:`metagrad.optim`, which imports this module and re-exports its public names.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch.utils import _pytree as pytree

from .errors import UpdateRuleError

Params = dict[str, torch.Tensor]
State = dict[str, Any]

__all__ = ["UpdateRule", "TransformationRule", "RULES", "as_update_rule", "check_update_rule",
           "is_transformation", "step_in_layout", "checked_step"]


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


class TransformationRule:
    """A gradient transformation as an update rule: ``φ, s ↦ φ + u, s'`` with
    ``u, s' = tx.update(∇L_tr(φ), s, params=φ)``.

    A gradient transformation is a pair of functions over trees of tensors,
    ``init(params) -> state`` and ``update(updates, state, params=...) -> (updates, state)``:
    optax's shape, as ``torchopt.sgd(...)``, ``torchopt.adam(...)`` and
    ``torchopt.chain(...)`` return it. ``MetaGradient(inner_opt=tx)`` wraps one in this rule
    itself (:func:`as_update_rule`).

    The step is the transformation's own arithmetic. ``update`` is called with
    ``inplace=False`` where it takes that argument (torchopt's does, and writes in place
    otherwise), so that the step is differentiable and leaves the stored states as they are.
    The state is ``tx.init(θ)`` with its tensors detached: metagrad differentiates with respect
    to θ and η only, so the initial state is a constant. Every leaf of the state must be a
    tensor, so that Binomial can stack the states of several steps for ``torch.func.vmap``.

    Args:
        tx: the gradient transformation.
    """

    def __init__(self, tx: Any) -> None:
        if not is_transformation(tx):
            raise TypeError(
                f"tx: expected a gradient transformation, an object with init() and update() such "
                f"as torchopt.sgd(lr=0.1), got {_qualified(tx)}.{_hint(tx)}"
            )
        self.tx = tx
        #: ``{"inplace": False}`` where ``tx.update`` takes ``inplace``, else nothing.
        self.update_options = {"inplace": False} if _takes(tx.update, "inplace") else {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.tx).__name__})"

    def init(self, params: Mapping[str, torch.Tensor]) -> State:
        state = self.tx.init(dict(params))
        leaves, _ = pytree.tree_flatten(state)
        bad = [type(leaf).__name__ for leaf in leaves if not isinstance(leaf, torch.Tensor)]
        if bad:
            raise TypeError(
                f"inner_opt: the state {type(state).__name__} of {self!r} has leaves of type {bad}; "
                "metagrad needs tensor leaves to store and stack the state of each step."
            )
        return pytree.tree_map(torch.Tensor.detach, state)

    def step(self, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor],
             state: State) -> tuple[Params, State]:
        # A parameter without a gradient (None) is skipped, as torchopt skips it; torchopt then
        # drops its entry of a momentum trace to None, which is put back, so that the state
        # keeps one structure from step to step.
        full = {n: grads.get(n) for n in params}
        updates, new_state = self.tx.update(full, state, params=dict(params), **self.update_options)
        new_params = {n: p if updates[n] is None else p + updates[n] for n, p in params.items()}
        if any(g is None for g in full.values()):
            old, _ = pytree.tree_flatten(state)
            new, spec = pytree.tree_flatten(new_state)
            if len(old) == len(new):
                new_state = pytree.tree_unflatten(
                    [o if n is None and o is not None else n for o, n in zip(old, new)], spec)
        return new_params, new_state


def is_transformation(value: Any) -> bool:
    """Whether ``value`` is a gradient transformation (:class:`TransformationRule`): an object,
    not a class, with callable ``init`` and ``update`` and no ``step`` (an object with
    ``step`` is an update rule)."""
    return (not isinstance(value, type) and callable(getattr(value, "init", None))
            and callable(getattr(value, "update", None)) and not callable(getattr(value, "step", None)))


def _takes(function: Callable[..., Any], keyword: str) -> bool:
    """Whether ``function`` accepts the keyword argument ``keyword``."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # no signature to read: pass nothing extra
        return False
    return any((p.name == keyword and p.kind is not p.POSITIONAL_ONLY) or p.kind is p.VAR_KEYWORD
               for p in parameters)


#: The update rules :mod:`metagrad.optim` defines, named in errors that suggest one.
RULES = ("SGD", "Momentum", "Adam", "AdamW", "RMSprop", "Adagrad")

#: The module that defines them (it imports this one).
_RULES_MODULE = f"{__package__}.optim"


def as_update_rule(inner_opt: Any, argument: str = "inner_opt", *, model: bool = True) -> UpdateRule:
    """``inner_opt`` as an update rule: a gradient transformation (:func:`is_transformation`,
    e.g. ``torchopt.adam(lr=0.01)``) wrapped in a :class:`TransformationRule`, an update rule
    as it is.

    Args:
        inner_opt: an update rule (``init()`` and ``step()``) or a gradient transformation.
        argument: the argument's name in errors.
        model: as :func:`check_update_rule`.

    Returns:
        The update rule.

    Raises:
        TypeError: naming ``argument``, as :func:`check_update_rule` does, for anything else.
    """
    if is_transformation(inner_opt):
        return TransformationRule(inner_opt)
    check_update_rule(inner_opt, argument, model=model)
    return inner_opt


def check_update_rule(rule: Any, argument: str = "inner_opt", *, model: bool = True) -> None:
    """Raise a ``TypeError`` naming ``argument`` unless ``rule`` is an update rule: an object
    with ``init()`` and ``step()``. A ``torch.optim`` optimizer, or a class, is refused with
    the metagrad rule to use instead (one of :data:`RULES`). ``model``: the caller has a
    model, so wrapping the optimizer with ``metagrad.adapters.higher.update_rule`` is offered
    too."""
    if isinstance(rule, torch.optim.Optimizer) or (
            isinstance(rule, type) and issubclass(rule, torch.optim.Optimizer)):
        what = "class" if isinstance(rule, type) else "optimizer"
        name = rule.__name__ if isinstance(rule, type) else type(rule).__name__
        wrap = (f", or wrap {'an instance' if what == 'class' else 'it'} with "
                "metagrad.adapters.higher.update_rule(optimizer, model)" if model else "")
        raise TypeError(
            f"{argument}: got the torch.optim {what} {name}, which updates in place and cannot "
            f"be differentiated. Use {_twin(rule)}{wrap}."
        )
    if isinstance(rule, type):
        example = (f"mg.optim.{rule.__name__}(lr=0.01)" if _is_metagrad_rule(rule)
                   else f"{rule.__name__}(...)")
        raise TypeError(f"{argument}: got the class {rule.__name__}; pass an instance, e.g. {example}.")
    if is_transformation(rule):
        raise TypeError(
            f"{argument}: got {_qualified(rule)}, a gradient transformation (init() and update()), "
            f"where an update rule with init() and step() is needed. Wrap it once, outside the "
            f"loop: mg.optim.TransformationRule(tx) (inner_opt= wraps one itself)."
        )
    if not (callable(getattr(rule, "init", None)) and callable(getattr(rule, "step", None))):
        raise TypeError(
            f"{argument}: expected an update rule with init() and step(), such as "
            f"mg.optim.SGD(lr=0.01), got {type(rule).__name__}. metagrad's rules: "
            f"{', '.join('mg.optim.' + r for r in RULES)}.{_hint(rule)}"
        )


def _qualified(value: Any) -> str:
    """The type of ``value`` as module.name, for errors."""
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _hint(value: Any) -> str:
    """What a value that is neither an update rule nor a gradient transformation probably is,
    and what to pass instead (empty when nothing is known)."""
    if inspect.isroutine(value):
        return " If it builds one, call it first, e.g. torchopt.sgd(lr=0.1)."
    if callable(getattr(value, "step", None)) and not callable(getattr(value, "init", None)):
        return (" It has step() but no init(): an optimizer object that updates a model in place. "
                "Pass a pure rule or its functional form (torchopt.sgd, torchopt.adam, ...), or, for "
                "torchopt's object style, use metagrad.adapters.torchopt.MetaSGD/MetaAdam.")
    return ""


#: For each of metagrad's rules, the torch.optim settings it takes and its defaults for them
#: (:func:`_twin` writes out the ones an optimizer sets otherwise).
_SETTINGS: dict[str, dict[str, Any]] = {
    "SGD": {},
    "Momentum": {"momentum": None, "dampening": 0, "nesterov": False, "weight_decay": 0},
    "Adam": {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0},
    "AdamW": {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
    "RMSprop": {"alpha": 0.99, "eps": 1e-8, "weight_decay": 0, "momentum": 0, "centered": False},
    "Adagrad": {"lr_decay": 0, "weight_decay": 0, "initial_accumulator_value": 0, "eps": 1e-10},
}


def _twin(optimizer: Any) -> str:
    """The metagrad rule that computes what a torch.optim optimizer (or class) computes, as
    code to write, with every setting the optimizer has that differs from the rule's default;
    where there is none, the list of metagrad's rules. Parameter groups that differ are said."""
    name = optimizer.__name__ if isinstance(optimizer, type) else type(optimizer).__name__
    groups: list[dict[str, Any]] = [] if isinstance(optimizer, type) else list(optimizer.param_groups)
    settings = groups[0] if groups else {}
    lr = settings.get("lr", 0.01)
    lr = lr if isinstance(lr, (int, float)) and not isinstance(lr, bool) else 0.01
    # metagrad's rules descend: for an optimizer set to ascend, the loss is negated instead
    ascend = " on the negated loss (metagrad's rules have no maximize=True)" if settings.get("maximize") else ""
    rule = name
    if name == "SGD" and (settings.get("momentum") or settings.get("weight_decay")):
        rule = "Momentum"  # (SGD with weight decay alone: Momentum with momentum=0)
    if name == "Adam" and settings.get("decoupled_weight_decay"):
        rule = "AdamW"
    if rule not in _SETTINGS or settings.get("amsgrad"):
        missing = f"{name}(amsgrad=True)" if settings.get("amsgrad") else name
        return (f"one of metagrad's rules ({', '.join('mg.optim.' + r for r in RULES)}; none computes "
                f"{missing}), e.g. mg.optim.SGD(lr={lr!r})")
    given = [f"{key}={settings.get(key, default)!r}" for key, default in _SETTINGS[rule].items()
             if key in settings and (default is None or settings[key] != default)]
    if rule == "Momentum" and not settings.get("momentum"):
        given = ["momentum=0", *[g for g in given if not g.startswith("momentum=")]]
    differ = sorted({key for group in groups[1:] for key, value in group.items()
                     if key != "params" and value != settings.get(key)})
    split = (f" (its {len(groups)} parameter groups differ in {', '.join(differ)}: give lr per parameter, "
             "as a dict by parameter name)" if differ else "")
    return f"mg.optim.{rule}({', '.join([f'lr={lr!r}', *given])}){ascend}{split}"


def _is_metagrad_rule(cls: type) -> bool:
    """Whether the class ``cls`` is one of metagrad's rules (:data:`RULES`, as defined in
    :mod:`metagrad.optim`), not another class of the same name."""
    return cls.__name__ in RULES and cls.__module__ == _RULES_MODULE


def step_in_layout(rule: UpdateRule, inner: UpdateRule, params: Params, grads: Params,
                   state: State, *, copy: bool = False, differentiated: bool = False) -> tuple[Params, State]:
    """``rule.step(params, grads, state)``, where ``state`` is the optimizer state of the block's
    rule ``inner``. A rule given for one step (``meta.step(..., rule=...)``) whose own state has
    another layout than ``inner``'s (Adam's for a block of SGD) fails inside its step with a
    ``KeyError`` or the like: that is raised as a ``ValueError`` that says why and what to do.
    A rule that writes the fast weights or the state it was given in place (``p.sub_(lr * g)``,
    as a torch.optim optimizer does) would change the stored iterates it was given: that raises a
    ``ValueError`` too. ``copy``: the rule gets copies of ``params`` (φ_0, whose storage is θ's:
    such a rule then leaves the model's parameters as they were). ``differentiated``: compiled
    products will differentiate the step in φ, where the traced step is not checked: the first
    step (``copy``) of a rule not of :mod:`metagrad.optim` is taken by :func:`at_vjp_level`."""
    if copy:
        params = {n: t.clone() for n, t in params.items()}
    if differentiated and copy and not _is_metagrad_rule(type(rule)):
        return at_vjp_level(lambda p: checked_step(rule, p, state, lambda: _step(rule, inner, p, grads, state)), params)
    return checked_step(rule, params, state, lambda: _step(rule, inner, params, grads, state))


def at_vjp_level(step: Callable[[Params], tuple[Params, State]], params: Params) -> tuple[Params, State]:
    """``step(params)``, with ``params`` taken at a ``torch.func.vjp`` level (its primal results,
    which keep the autograd graph to tensors that require grad outside, a rule's step size): there
    they require grad, so :func:`checked_step` refuses a rule whose new fast weights do not depend
    on them (written under ``torch.no_grad()``) in a step that is otherwise taken detached (whose
    products a compiled call will take, where the traced step is not checked)."""
    kept: dict[str, Any] = {}

    def taken(p: Params) -> tuple[Params, list[torch.Tensor]]:
        new_params, new_state = step(p)
        leaves, kept["spec"] = pytree.tree_flatten(new_state)
        kept["leaves"] = leaves
        return dict(new_params), [t for t in leaves if isinstance(t, torch.Tensor)]  # (the state: any dtype)

    try:
        vjp: Any = torch.func.vjp  # (typed without has_aux's third result)
        new_params, _, tensors = vjp(taken, params, has_aux=True)
    except RuntimeError:  # (a write in place into them, .numpy() on them: the step as it is says what it does)
        return step(params)
    given = iter(tensors)
    leaves = [next(given) if isinstance(t, torch.Tensor) else t for t in kept["leaves"]]
    return new_params, pytree.tree_unflatten(leaves, kept["spec"])


def checked_step(rule: UpdateRule, params: Params, state: State,
                 step: Callable[[], tuple[Params, State]]) -> tuple[Params, State]:
    """``step()``, the step of ``rule`` on ``params`` and ``state``, raising
    :class:`~metagrad.UpdateRuleError` (a ``ValueError``) if it wrote them in place
    (``p.sub_(lr * g)``, ``buf.mul_(momentum)``, as torch.optim optimizers do: the iterates and
    states it was given are kept for the backward, and φ_0 is θ), if it returned other fast
    weights than it was given (every one, unchanged where it has no gradient, in its shape and
    dtype), or if, with grad enabled, a fast weight that required grad comes back without (a
    step written under ``torch.no_grad()``). The writes are read from the tensors' version
    counters; not while torch.compile traces (a compiled call's inputs are checked where it is
    called); under ``torch.func`` transforms, on the tensors they wrap."""
    if torch.compiler.is_compiling():
        return step()
    given = [t for t in (*params.values(), *pytree.tree_leaves(state)) if isinstance(t, torch.Tensor)]
    if torch._C._functorch.peek_interpreter_stack() is not None:  # (inside a torch.func transform)
        given = [_underlying(t) for t in given]
    versions = [t._version for t in given]
    new_params, new_state = step()
    if any(t._version != version for t, version in zip(given, versions)):
        raise UpdateRuleError(
            f"inner_opt: the update rule {rule!r} wrote the fast weights or the optimizer state it was given in "
            "place (p.sub_(lr * g), buf.mul_(momentum), as torch.optim optimizers do), which would change the "
            "iterates and states metagrad keeps for the backward. Return new tensors instead "
            "(p - lr * g, momentum * buf + g); the rules of mg.optim do.")
    if not isinstance(new_params, Mapping) or set(new_params) != set(params):
        got = sorted(new_params) if isinstance(new_params, Mapping) else type(new_params).__name__
        raise UpdateRuleError(
            f"inner_opt: the update rule {rule!r} returned fast weights {got} for the fast weights "
            f"{sorted(params)} it was given; step(params, grads, state) returns a name→tensor dict with every "
            "name it was given (a parameter without a gradient as it is), and the new state.")
    _refuse_cut(rule, _cut(params, new_params))
    if any(t.shape != params[n].shape or t.dtype != params[n].dtype for n, t in new_params.items()):
        changed = [f"{n}: {tuple(t.shape)} {t.dtype} for {tuple(params[n].shape)} {params[n].dtype}"
                   for n, t in new_params.items() if t.shape != params[n].shape or t.dtype != params[n].dtype]
        raise UpdateRuleError(f"inner_opt: the update rule {rule!r} returned fast weights of another shape or dtype than "
                         f"it was given ({'; '.join(changed)}); return each in its own shape and dtype.")
    return new_params, new_state


def _refuse_cut(rule: UpdateRule, cut: list[str]) -> None:
    """Raise a ``ValueError`` naming the fast weights ``cut`` that ``rule`` returned without
    their dependence on the fast weights it was given (every meta-gradient through them zero)."""
    if cut:
        raise UpdateRuleError(
            f"inner_opt: the update rule {rule!r} returned fast weights {cut} that do not depend on the fast "
            "weights it was given (computed under torch.no_grad(), or from .detach() or .data), so every "
            "meta-gradient through its step would be zero. A meta-gradient differentiates the step: compute "
            "the new fast weights with autograd on (p - lr * g, not under torch.no_grad()), as the rules of "
            "mg.optim do.")


def _cut(params: Params, new_params: Params) -> list[str]:
    """The fast weights that require grad in ``params`` and not in ``new_params``, with grad
    enabled (none without)."""
    if not torch.is_grad_enabled():
        return []
    return [n for n, t in new_params.items() if n in params and params[n].requires_grad and not t.requires_grad]

def _underlying(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a ``torch.func`` transform wraps (under ``vmap`` a batched tensor's own version
    counter does not move when it is written in place; the one it wraps does)."""
    functorch = torch._C._functorch
    while functorch.is_batchedtensor(tensor) or functorch.is_gradtrackingtensor(tensor):
        tensor = functorch.get_unwrapped(tensor)
    return tensor


def _step(rule: UpdateRule, inner: UpdateRule, params: Params, grads: Params, state: State) -> tuple[Params, State]:
    try:
        return rule.step(params, grads, state)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as error:
        if rule is inner:
            raise
        try:
            same = pytree.tree_structure(rule.init(params)) == pytree.tree_structure(inner.init(params))
        except Exception:  # its init fails too: the step's own error says more
            same = True
        if same:
            raise
        raise ValueError(
            f"rule: {rule!r} cannot step from the optimizer state of inner_opt={inner!r} "
            f"({type(error).__name__}: {error}). A rule given for one step (meta.step(..., rule=...)) "
            "receives the block's optimizer state, so it must keep inner_opt's state layout: "
            "inner_opt's kind with other hyperparameters (another step size), or a rule that calls "
            "inner_opt's step. Take this step with inner_opt, or open the block with this rule as "
            "inner_opt.") from error
