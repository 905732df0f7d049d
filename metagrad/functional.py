"""The functional face: a meta-gradient as a pure function (:func:`meta_grad`).

The same estimators as :class:`~metagrad.MetaGradient`, on a trajectory built from a pure
loss function. :class:`~metagrad.FunctionalModel` (the module at fast weights) lives in
:mod:`metagrad.fmodel` and is also importable from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch.utils import _pytree as pytree

from .attention import math_attention
from .compile_options import compile_settings, on_device
from .errors import misfit_signature, sparse_gradient, warn
from .generators import RandomState, generators_reached
from .estimators.base import TrajectoryView, check_count
from .fmodel import FunctionalModel, Layout, refuse_cached, unstacked
from .update_rule import as_update_rule
from .pure import PureTrajectory, check_estimator, unroll
from .pure_compiled import Pieces
from .replay import refuse_twice
from .step import dense, rule_slots
from .loss_checks import check_reads, look_at
from .numerics import inexact

__all__ = ["FunctionalModel", "Layout", "meta_grad"]


def meta_grad(loss_fn: Callable[..., torch.Tensor], params: Mapping[str, torch.Tensor], support: Any, query: Any, *,
              inner_opt: Any, steps: int, estimator: Any = None, meta: Any = None, tasks: Optional[int] = None,
              compile: Any = False, info: Optional[dict[str, Any]] = None) -> Any:
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
    pure step when a product needs them). ``Binomial(order="auto")`` and a monitored fixed order
    read their level norms back as Python floats, and ``Implicit`` its solver's residuals: they
    run where ``meta_grad`` is called directly (with ``tasks=T`` each task chooses its own order
    and fallback, or solves its own system, as ``MetaGradient(tasks=T)`` does; Binomial with
    ``compile=True`` too) and are refused with a ``ValueError`` naming ``estimator`` under
    ``torch.func.vmap``, ``torch.func.grad`` or ``torch.compile``. ``Implicit`` adds its proximal
    term ``(λ/2)‖φ − θ‖²`` to every inner step's gradient and solves on the step's products at
    φ_K by autograd; with ``compile=True`` it is refused (the compiled pieces take no proximal
    term). ``Binomial(max_memory=...)`` measures one step's graph of the pure body
    (:meth:`PureTrajectory.graph_bytes <metagrad.pure.PureTrajectory.graph_bytes>`) to choose its
    chunk size: it too runs where ``meta_grad`` is called directly.

    Binomial's levels are themselves ``torch.func.vmap`` calls over the stored iterates, so
    ``vmap`` of ``meta_grad`` nests two ``vmap`` levels around a second derivative of
    ``loss_fn``. In torch 2.13 ``F.mse_loss`` fails there ("The size of tensor a (16) must
    match the size of tensor b (8)"): write the loss as ``((pred - y) ** 2).mean()``, or pass
    ``chunk_size=1`` (one product at a time, no inner ``vmap``).

    **A meta-batch** (``tasks=T``): ``support`` and ``query`` hold T tasks' batches, every tensor
    with a leading dimension of T (other leaves go to every task as they are); each task takes
    its own inner steps from θ, and the result is the **mean over the tasks** of their
    meta-gradients (θ's, and η's), what ``torch.func.vmap`` of ``meta_grad`` over the tasks gives,
    averaged. As ``MetaGradient(tasks=T)`` does, the inner loop differentiates the sum of the
    tasks' losses at their stacked fast weights, so every estimator's products act task by task.

    **Compiled** (``compile=True``, a ``torch.compile`` mode such as ``"reduce-overhead"``, or a
    dict of its arguments, as ``MetaGradient(compile=...)`` takes): the inner loop and the
    backward stay Python loops over compiled pieces, each compiled once (a run of inner steps,
    a sweep of step products back through a run, Binomial's rows, the query's gradient;
    :mod:`metagrad.pure_compiled`), so compiling takes about as long at K = 50 as at K = 5, and
    a new call with the same shapes compiles nothing. Call it outside ``torch.compile`` and
    ``torch.func.vmap`` (give a meta-batch by ``tasks``); ``mg.Full()`` runs as Checkpointed
    there (:meth:`~metagrad.Estimator.under_compile`: the same meta-gradient). Without
    ``compile``, ``meta_grad`` is the pure function above, for ``torch.compile`` and ``vmap``
    of your own::

        g = mg.functional.meta_grad(loss_fn, params, (x_s, y_s), (x_q, y_q), tasks=4, compile=True,
                                    inner_opt=mg.optim.SGD(lr=0.01), steps=50, estimator=mg.Checkpointed())

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
        tasks: T, the tasks of a meta-batch in ``support`` and ``query`` (see above), or ``None``
            for one task.
        compile: compile the inner loop's and the backward's pieces (see above); ``False``: no.
        info: a dict to fill with the estimator's report, what ``MetaGradient``'s ``meta.info``
            holds (Binomial's order and level norms, Implicit's iterations and residual; with
            ``tasks``, each task's where it differs), or ``None``. It is emptied first.

    Returns:
        The meta-gradient, name→tensor, with the layout of ``params`` (with ``tasks``, the mean
        over the tasks); with ``meta``, the pair ``(that, the gradient of η with the structure
        of meta)``.
    """
    try:
        with math_attention():  # every graph here is differentiated twice (metagrad.attention.math_attention)
            return _meta_grad(loss_fn, params, support, query, inner_opt=inner_opt, steps=steps, estimator=estimator,
                              meta=meta, tasks=tasks, compile=compile, info=info)
    except RuntimeError as error:
        if (sparse := sparse_gradient(error)) is not None:
            raise sparse from error
        if "mutate a captured Tensor" in str(error):
            raise ValueError(
                "loss_fn: meta_grad takes its gradients under torch.func transforms, where the loss cannot "
                f"write in place to a tensor made outside it ({error}). A BatchNorm in training mode writes its "
                "running statistics so: build it with track_running_stats=False (each batch normalized by its "
                "own statistics, as in MAML), or put the model in eval mode; a MetaGradient block runs such a "
                "model as it is and never writes its buffers.") from error
        if "saved tensor hooks" in str(error):
            raise ValueError(
                f"loss_fn: meta_grad takes its gradients under torch.func transforms, which do not run saved-tensor "
                f"hooks ({error}): activation checkpointing in the model (torch.utils.checkpoint) and "
                "torch.autograd.graph.save_on_cpu install them. Write the inner loop in a MetaGradient block, "
                "which runs a checkpointed model as it is, or call the model without checkpointing.") from error
        if "setup_context" in str(error):
            raise ValueError(
                "loss_fn: meta_grad takes its gradients under torch.func transforms, which run a "
                "torch.autograd.Function only if it has a setup_context staticmethod (its forward does not "
                f"take ctx; {error}). Give the Function one (and generate_vmap_rule = True for vmap), or "
                "write the inner loop in a MetaGradient block, which runs it as it is.") from error
        if "functorch transform" not in str(error):
            raise
        raise ValueError(
            "loss_fn: meta_grad takes its gradients under torch.func transforms, where a tensor cannot be "
            f"made to require grad ({error}). Take a derivative inside loss_fn by torch.func.grad, "
            "torch.func.grad(lambda z: f(z).sum())(x) for the input gradient, not by requires_grad_ and "
            "torch.autograd.grad; or write the inner loop in a MetaGradient block, which runs either.") from error


def _meta_grad(loss_fn: Callable[..., torch.Tensor], params: Mapping[str, torch.Tensor], support: Any, query: Any, *,
               inner_opt: Any, steps: int, estimator: Any, meta: Any, tasks: Optional[int], compile: Any,
               info: Optional[dict[str, Any]]) -> Any:
    if info is not None and not isinstance(info, dict):
        raise TypeError(f"info: expected a dict to fill with the estimator's report, or None; got "
                        f"{type(info).__name__}.")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a function loss_fn(params, batch) -> scalar, got "
                        f"{type(loss_fn).__name__}.")
    refuse_cached("meta_grad: called while")
    if not torch.compiler.is_compiling():  # (TorchDynamo does not trace inspect.signature)
        _check_arity(loss_fn, meta is not None)
    _check_params(params)
    inner_opt = as_update_rule(inner_opt, model=False)
    check_count(steps, "steps", minimum=0)
    traced = torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None
    estimator = check_estimator(estimator, traced)
    tasks = check_count(tasks, "tasks", minimum=1, allow_none=True)
    if tasks is not None:
        _check_tasks(support, "support", tasks)
        _check_tasks(query, "query", tasks)
    settings = compile_settings(compile)
    if settings is not None:
        if traced:
            raise ValueError(
                f"compile: meta_grad(compile={compile!r}) calls functions it compiles itself, which cannot run "
                "inside torch.compile or a torch.func transform (vmap, grad). Call it outside them, with "
                "tasks=T for a meta-batch; or pass compile=False and compile or vmap meta_grad yourself.")
        if estimator.proximal is not None:
            raise ValueError(
                f"compile: {estimator!r} adds a proximal term to every inner step, which meta_grad's "
                "compiled pieces do not; pass compile=False (its backward is a solve on autograd "
                "products at φ_K, which compiling would not speed up), or use MetaGradient(compile=True).")
        estimator = estimator.under_compile()
    if (said := estimator.length_warning(steps)) is not None:
        warn(said)
    eta, spec, names = _meta_leaves(meta)
    theta = dict(params)
    if settings is not None:  # (the pieces' guards check requires_grad: batches come in detached)
        support, query = pytree.tree_map(_detached, support), pytree.tree_map(_detached, query)
    loss_of = TaskLoss(loss_fn, spec, meta is not None, tasks)
    inner, outer = loss_of(support), loss_of(query)
    scale = 1.0 if tasks is None else 1.0 / tasks  # the mean over the tasks (their losses are summed)

    def start(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """φ_0: a copy of θ, stacked for each task: a rule that writes in place (refused at its
        step) leaves the caller's θ as it was, and the compiled pieces' inputs keep the layout
        of the iterates after it."""
        if settings is not None:  # (detached: the pieces' guards check requires_grad)
            p = {n: t.detach() for n, t in p.items()}
        if tasks is None:
            return {n: t.clone() for n, t in p.items()}
        return {n: t.expand(tasks, *t.shape).contiguous() for n, t in p.items()}

    once: Optional[str] = None
    random = False
    if not traced:
        check_reads((outer, inner), lambda: start(theta), eta, inner_opt, names, loss_of)
    if not torch.compiler.is_compiling():  # (under vmap or grad: what a direct call found, if one did)
        once, random = look_at(inner, lambda: start(theta), eta, loss_of, compute=not traced)
    again = not estimator.differentiable and (  # (the products run the loss and the rule again)
        estimator.keep() != 0 or estimator.proximal is not None or bool(rule_slots(inner_opt, eta)))
    if random and again:
        raise ValueError(
            f"loss_fn: it draws random numbers (dropout, noise, a generator of its own), and {estimator!r} "
            "runs it again at the "
            "stored fast weights, where it would draw others than the inner steps did: the meta-gradient "
            "would not be the one of the steps taken. Use estimator=mg.Full() (one pass: what it draws is "
            "what it differentiates), draw the randomness outside and pass it in the batch (a dropout mask, "
            "the noise), put the model in eval mode, or write the inner loop in a MetaGradient block, which "
            "replays the states of torch's default generators for every rebuilt step.")
    if estimator.differentiable:  # Full: autograd through the unroll
        if once is not None and steps > 0:
            refuse_twice(0, once, "loss_fn")
        rule_eta = rule_slots(inner_opt, eta)

        def objective(p: dict[str, torch.Tensor], e: list[torch.Tensor]) -> torch.Tensor:
            return outer(unroll(inner, start(p), inner_opt, steps, e, rule_eta)[0][-1], e) * scale

        g, g_eta = torch.func.grad(objective, argnums=(0, 1))(theta, eta)
        _report(info, estimator, {"steps": steps})
        return _result(dict(g), list(g_eta), meta, spec)
    phi = start(theta)
    pieces = None
    if settings is not None:  # (η as given: the rule holds its step sizes by identity)
        pieces = Pieces(loss_of, loss_of.identity, support, inner_opt, rule_slots(inner_opt, eta), phi, eta,
                        on_device(settings, next(iter(phi.values())).device))
    # A rule that draws random numbers (SGLD's noise) would draw others where the products run it
    # again: seen from the generators across the inner loop, whose loss draws none (refused above).
    drawn = None if traced or not again else RandomState.capture(
        next(iter(phi.values())).device, generators_reached([("inner_opt", inner_opt)], frozenset(("step",))))
    with torch.no_grad():
        trajectory = PureTrajectory(inner, phi, inner_opt, steps, eta, names,
                                    snapshots=estimator.snapshot_schedule(), pieces=pieces, tasks=tasks,
                                    proximal=estimator.proximal, once=once)
        if drawn is not None and drawn.changed():
            raise ValueError(
                f"inner_opt: its step draws random numbers (a noisy update such as SGLD's), and {estimator!r} "
                "runs the update rule again for its products, where it would draw others than the inner "
                "steps did: the meta-gradient (a learned noise scale's above all) would not be the one of the "
                "steps taken. Use estimator=mg.Full() (one pass), draw the noise outside and pass it in the "
                "batch, or write the inner loop in a MetaGradient block, which replays the update rule's "
                "draws for every rebuilt step.")
        if not traced and estimator.keep() != 0 and not getattr(inner_opt, "pure_step", False):
            trajectory.check_rule()  # the products run the rule again (PureTrajectory.check_rule)
        found = None if pieces is None else pieces.query(loss_of, loss_of.identity, trajectory.current, eta, query)
        v, direct = found if found is not None else torch.func.grad(outer, argnums=(0, 1))(trajectory.current, eta)
        view: TrajectoryView = trajectory  # (the interface every estimator reads: checked here by type)
        g, g_eta, report = estimator.backward(view, steps, {n: dense(t) for n, t in v.items()})
    _report(info, estimator, report)
    total = [d if i >= len(g_eta) or g_eta[i] is None else d + g_eta[i] for i, d in enumerate(direct)]
    if tasks is not None:  # each task's gradient of θ is its row; η's are summed already
        g = {n: g[n].sum(0) for n in theta}
    return _result({n: g[n] * scale for n in theta}, [t * scale for t in total], meta, spec)


class TaskLoss:
    """``loss_fn`` on a batch, as the trajectory calls it: ``TaskLoss(...)(batch)`` is
    ``loss_at(φ, η)``. With ``tasks``, the sum of the tasks' losses, each task's at its own fast
    weights (the rows of φ) and batch (``torch.func.vmap``). ``identity``: equal for two that
    compute the same loss (the loss function's code, or the object), for the compiled pieces'
    cache (the function itself is an argument of every compiled call, and its guards check it)."""

    def __init__(self, loss_fn: Callable[..., torch.Tensor], spec: Any, with_meta: bool,
                 tasks: Optional[int]) -> None:
        self.loss_fn, self.spec, self.with_meta, self.tasks = loss_fn, spec, with_meta, tasks
        self.identity = (type(loss_fn), getattr(loss_fn, "__code__", None) or id(loss_fn), str(spec), with_meta, tasks)

    def __call__(self, batch: Any) -> Callable[[dict[str, torch.Tensor], Sequence[torch.Tensor]], torch.Tensor]:
        def one(phi: dict[str, torch.Tensor], batch: Any, e: Sequence[torch.Tensor]) -> torch.Tensor:
            if not self.with_meta:
                value = self.loss_fn(phi, batch)
            else:
                value = self.loss_fn(phi, batch, pytree.tree_unflatten(list(e), self.spec))
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                got = (f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__)
                raise ValueError(f"loss_fn: must return a scalar (0-dim) tensor loss, got {got}; reduce it "
                                 "with .mean() or .sum().")
            return value

        if self.tasks is None:
            return lambda phi, e: one(phi, batch, e)
        dims = pytree.tree_map(lambda t: 0 if isinstance(t, torch.Tensor) else None, batch)
        return lambda phi, e: torch.func.vmap(lambda p, b: one(p, b, e), in_dims=(0, dims))(phi, batch).sum()


def _report(info: Optional[dict[str, Any]], estimator: Any, report: dict[str, Any]) -> None:
    """Fill ``info`` (``meta_grad``'s) with the estimator's report, as ``meta.info`` holds it."""
    if info is not None:
        info.clear()
        info.update({"estimator": repr(estimator), **report})


def _check_arity(loss_fn: Callable[..., torch.Tensor], with_meta: bool) -> None:
    """``loss_fn`` takes the arguments it will be called with: ``(params, batch)``, or
    ``(params, batch, meta)`` with ``meta`` (where its signature can be read)."""
    count = 3 if with_meta else 2
    signature = misfit_signature(loss_fn, count)
    if signature is not None:
        called = "loss_fn(params, batch, meta)" if with_meta else "loss_fn(params, batch)"
        if not with_meta and _takes(signature, 3):
            advice = "Pass meta= for a third argument, or drop it."
        elif with_meta and _takes(signature, 2):
            advice = "Add a third argument for the meta-parameters (the structure of meta)."
        elif not _takes(signature, count, partial=True):  # it takes fewer
            advice = (f"It takes the fast weights by name (params), one batch (the support's, then the "
                      f"query's){', and the meta-parameters' if with_meta else ''}: def {called}.")
        else:
            advice = f"Give the arguments after the first {count} default values, or drop them."
        raise TypeError(
            f"loss_fn: it is called as {called}, {'since meta= is given' if with_meta else 'without meta='}, "
            f"but its signature is {loss_fn.__name__ if hasattr(loss_fn, '__name__') else type(loss_fn).__name__}"
            f"{signature}. {advice}")


def _takes(signature: Any, count: int, partial: bool = False) -> bool:
    """Whether ``signature`` binds ``count`` positional arguments (``partial``: with more still
    to give)."""
    try:
        (signature.bind_partial if partial else signature.bind)(*range(count))
        return True
    except TypeError:
        return False


def _detached(leaf: Any) -> Any:
    return leaf.detach() if isinstance(leaf, torch.Tensor) else leaf


def _check_tasks(batch: Any, argument: str, tasks: int) -> None:
    """Every tensor of a meta-batch's ``support`` or ``query`` has a leading dimension of T."""
    found = unstacked(batch, tasks)
    if found is not None:
        path = pytree.tree_flatten_with_path(batch)[0][found[0]][0]
        raise ValueError(
            f"{argument}: with tasks={tasks} every tensor holds one batch per task along its first "
            f"dimension, but {argument}{pytree.keystr(path)} has shape {tuple(found[1].shape)}. Stack the "
            f"tasks' batches (torch.stack of {tasks} tensors), or pass tasks=None for one task.")


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
        if not inexact(leaf):
            got = type(leaf).__name__ if not isinstance(leaf, torch.Tensor) else f"a tensor of dtype {leaf.dtype}"
            raise TypeError(f"meta: {name} is {got}; every leaf of meta must be a floating-point or complex tensor "
                            "(it is differentiated).")
    return [leaf for _, leaf in flat], spec, names


def _result(g: dict[str, torch.Tensor], g_eta: list[torch.Tensor], meta: Any, spec: Any) -> Any:
    g = {n: dense(t) for n, t in g.items()}  # (a sparse gradient: nn.Embedding(sparse=True))
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
        if not inexact(value):
            raise TypeError(f"params[{name!r}]: expected a floating-point or complex tensor (it is "
                            f"differentiated), got dtype {value.dtype}. params are the weights the inner loop "
                            "adapts, not a state_dict's buffers (a BatchNorm's num_batches_tracked): "
                            "{n: p.detach() for n, p in model.named_parameters()}.")
