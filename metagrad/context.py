"""``MetaGradient``: one context manager around the user's inner loop.

Closures and replay: an estimator that rebuilds steps calls a copy of the closure
frozen at its step, with the values it captured then (a loop's ``xb, yb``), and with
the random generator states it started from if it drew random numbers (dropout). What
cannot be frozen (an iterator read inside the closure, data modified in place, state
read through an object) is caught by the replay check.

Parameters the inner loss does not use are left as they are by the update rule (no
weight decay, no momentum), and a parameter neither the inner loop nor the query uses
keeps ``.grad`` as it was (``None``), as with plain autograd.

Meta-parameters other than θ (MATH.md, "Meta-parameters other than θ"): η is every
tensor that requires grad, other than the fast weights, that an inner step depends on:
a tensor the closure captures (``log_wd``, per-example weights, ``w = hypernet(z)``, whose
gradient then reaches ``hypernet``), a parameter not adapted (``adapt=``), a parameter
of a module the closure calls, a step size that requires grad inside the update rule.
Every estimator fills their ``.grad`` with what MATH.md's table defines, with no
declaration; ``meta.info["meta_parameters"]`` lists what was found (Full's autograd
finds them itself and lists none). They are found from the graph of each closure's
first step (see :meth:`metagrad.discovery.MetaParameters.discover` for the rule), and a
step size where a step first updates a fast weight.

Nested blocks: a block opened inside another block's inner loss, in a step the outer
estimator differentiates twice, runs as a differentiable unroll if its estimator is exact
(Full, Checkpointed), which gives the same meta-gradient and one that can be differentiated
again; an approximate estimator raises there (README, "Nested blocks").
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, Literal, Optional, Union

import torch

from .compiled import Compiler
from .compile_options import compile_settings, on_device
from .estimators import Estimator, resolve
from .errors import NestedBlockError, warn
from .fmodel import FunctionalModel
from .update_rule import Params, UpdateRule, as_update_rule, check_update_rule
from .numerics import relative_tolerance
from .adapted import check_at_entry, checked_adapt
from .estimators.base import check_count
from .tasks import no_loss_steps, take_step
from .query import attached, warn_at_end, on_theta_grad
from .trajectory import Closure, Trajectory, second_order

__all__ = ["MetaGradient"]


class MetaGradient:
    """Differentiate a query loss through the user's inner loop.

    Example::

        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.01),
                             estimator=mg.Binomial(order=3)) as meta:
            for _ in range(5):
                meta.step(lambda fmodel: F.mse_loss(fmodel(x_s), y_s))
            F.mse_loss(meta.fmodel(x_q), y_q).backward()

    θ is the model's parameters that require grad (those ``adapt=`` selects). ``meta.fmodel`` is the model at
    the current fast weights φ_K; they reach θ through one custom autograd node
    whose backward runs ``estimator`` (for Full, through the unrolled inner steps
    themselves, see :class:`~metagrad.Full`). So any loss built from ``meta.fmodel`` can be
    scaled, combined and backpropagated, and the meta-gradient is *accumulated*
    into each parameter's ``.grad`` as by any ``.backward()``. The model's
    parameters are never modified. The model's buffers are never written either:
    see :mod:`metagrad.functional` for the BatchNorm policy.

    With zero inner steps, ``meta.fmodel`` is the model at θ itself, and backward
    gives the ordinary gradient ``∇L_val(θ)`` for every estimator.

    θ fixed: where no adapted parameter requires grad (a model re-initialized every outer
    step and frozen, as in dataset distillation), the inner loop adapts them from their
    values, they get no gradient, and only the meta-parameters η are learned (below). A
    backward through ``meta.fmodel`` with no η found either has nothing to learn and raises
    a ``ValueError`` saying what would work.

    ``torch.autograd.grad(query_loss, [η...])`` returns η's meta-gradient alone and leaves
    every ``.grad`` as it was; an η the estimator gives nothing through the inner loop
    (FirstOrder: an η of the inner loss) gets zeros there, after the estimator's warning.

    If the block raises (or a warning at its end is turned into an error), every parameter's
    ``.grad`` is restored to its value at entry, and the stored trajectory is released.

    A loss built inside the block may be backpropagated after it ends; the trajectory is kept
    until that first backward and released after it, or at the block's end after one inside it.

    Args:
        model: any ``nn.Module``. All its parameters and buffers must be on one device.
        inner_opt: the differentiable update rule of the inner loop, e.g.
            ``mg.optim.SGD(lr=0.01)``, or a gradient transformation such as torchopt's
            (``torchopt.sgd(...)``, ``torchopt.adam(...)``, ``torchopt.chain(...)``), which is
            wrapped in :class:`~metagrad.optim.TransformationRule`.
        estimator: an :class:`~metagrad.Estimator`, or one of the names ``"full"``,
            ``"checkpointed"``, ``"first_order"``, ``"truncated"`` (``Truncated(steps=2)``),
            ``"binomial"`` (``Binomial(order="auto")``) and ``"implicit"`` (``Implicit(reg=1.0)``).
            Default: ``Full()``.
        check_finite: raise ``FloatingPointError`` at the first inner step whose loss is
            NaN or infinite (default). With ``False``, non-finite values propagate.
        adapt: the parameters the inner loop adapts, as names (``model.named_parameters()``),
            Parameter objects or submodules (``adapt=model.head``: all of its parameters), or a
            list mixing them; default: every parameter that requires grad. A listed parameter
            that does not require grad at block entry is an error, unless none of the adapted
            parameters requires grad (θ fixed; with ``adapt=None``, every parameter). The others
            that require grad stay fixed during the inner loop and are meta-parameters: they
            get their meta-gradient through it (ANIL adapts the head only; its body learns
            through the inner loop).
        check_replay: the replay check of every step an estimator rebuilds during backward
            (Checkpointed, Truncated, Binomial; :mod:`metagrad.replay`). ``True`` (default):
            the rebuilt ``Φ_m(φ_m)`` must equal the stored ``φ_{m+1}``, and the rebuilt loss
            the recorded one, to a relative tolerance of 1e-7 (float64) or 1e-3 (float32;
            3e-2 on a CUDA device with TF32 allowed), else :class:`~metagrad.ReplayError` is
            raised. A float sets that tolerance. ``False`` skips the comparison: then nothing
            verifies that a rebuilt step is the step taken (a closure that reads an iterator
            or data changed in place would give a wrong meta-gradient silently). Closures
            are frozen and random generator states replayed either way.
        compile: compute the inner steps' gradients and the estimator's step products by
            ``torch.compile``'d calls (:mod:`metagrad.compiled`): the same estimator, the same
            meta-gradient to rounding, and the replay check still covers every rebuilt step. The
            first call for each closure and shape compiles (seconds to a minute; compiled
            functions are reused by later blocks, tasks of the same shapes compile nothing).
            What cannot be compiled runs eagerly with one warning saying why. Full runs its
            exact compiled path (:meth:`Full.under_compile <metagrad.Full.under_compile>`: the
            iterates stored, the backward by compiled sweeps, as Checkpointed; its closures are
            then replayed and checked, and its meta-gradient cannot be differentiated again).
            ``meta.info["compiled"]`` counts the inner steps, step products and sweeps that
            ran compiled (each closure's first step in a block runs eagerly: it finds η), and
            names the estimator that ran (``"estimator"``).
            ``True`` uses torch.compile's defaults (on the CPU with inductor's C++ wrapper,
            :func:`metagrad.compile_options.on_device`; ``{"options": {}}``: without it); a mode string (``"reduce-overhead"``: CUDA
            graphs on a GPU, ``"max-autotune"``, …) or a dict with some of ``mode``,
            ``options`` and ``backend`` is passed on to every ``torch.compile`` call (compiled
            functions are cached per setting); ``False`` compiles nothing.
        tasks: ``None`` (default): one task per block. An integer T: the block holds T sets of
            fast weights, each starting at θ, with a leading dimension of T; ``meta.step(closure,
            *batch)`` takes each task's step on its slice of every batch tensor (whose first
            dimension must be T) by calling ``closure(f_t, *batch_t)`` under ``torch.func.vmap``
            and returns the T losses; ``meta.fmodel(x)`` maps over the first dimension of its
            tensor arguments. θ's and every η's gradient is the sum over the tasks of each
            task's own: what T separate blocks give, summed (:mod:`metagrad.tasks`). Every
            estimator; those that choose from norms (``Binomial(order="auto")``'s order,
            Implicit's solver stop) choose per task, and ``meta.info`` lists each task's.

    Closures and replay, parameters the inner loss does not use, meta-parameters η and nested
    blocks: see the module docstring.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        inner_opt: UpdateRule,
        estimator: Union[Estimator, str, None] = None,
        *,
        check_finite: bool = True,
        check_replay: Union[bool, float] = True,
        adapt: Optional[Any] = None,
        compile: Union[bool, str, Mapping[str, Any]] = False,
        tasks: Optional[int] = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}.")
        inner_opt = as_update_rule(inner_opt)  # a gradient transformation (torchopt.adam(...)) too
        relative_tolerance(check_replay, torch.float32, torch.device("cpu"))  # validates it
        self.model = model
        self.inner_opt = inner_opt
        self.estimator = resolve(estimator)
        self.check_finite = check_finite
        self.check_replay = check_replay
        self.adapt = checked_adapt(adapt, model)
        self._compile_settings = compile_settings(compile)  # validates it
        self.compile = compile
        self.tasks = check_count(tasks, "tasks", minimum=1, allow_none=True)
        why = None if tasks is None else self.estimator.why_not_tasks()
        if why is not None:
            raise ValueError(f"estimator: {why}")
        self.info: dict[str, Any] = {}
        self._active = False
        self._trajectory: Optional[Trajectory] = None
        self._names: tuple[str, ...] = ()
        self._params: tuple[torch.nn.Parameter, ...] = ()
        self._versions: tuple[int, ...] = ()
        self._saved_grads: list[Optional[torch.Tensor]] = []
        self._fmodel: Optional[tuple[int, bool, FunctionalModel]] = None
        self._differentiable = self.estimator.differentiable
        #: The estimator the open block runs: :attr:`estimator`, or with ``compile=`` its
        #: :meth:`~metagrad.Estimator.under_compile`.
        self._running: Estimator = self.estimator
        self._hooks: list[Any] = []
        self._warned = False

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "MetaGradient":
        if self._active:
            raise RuntimeError("MetaGradient: this block is already open; it is not re-entrant.")
        check_at_entry(self.adapt, self.model)
        every = list(self.model.named_parameters())
        adapted = [(n, p) for n, p in every if self.adapt is None or n in self.adapt]
        named = [(n, p) for n, p in adapted if p.requires_grad]
        # θ fixed: no adapted parameter requires grad (a model re-initialized every outer step,
        # as in dataset distillation). The fast weights then start from the parameters' values,
        # θ gets no gradient, and the meta-parameters η get theirs; with none of those either,
        # the query's backward raises (:class:`~metagrad.query.NothingToLearn`).
        self._theta_fixed = not named
        if not named:
            named = adapted
        if not named:
            raise ValueError(
                f"model: {type(self.model).__name__} has no parameters, so the inner loop has "
                "nothing to adapt. Pass a model with parameters (its initialization θ, or fixed "
                "weights that the inner loop adapts while meta-parameters are learned)."
            )
        devices = {p.device for _, p in every} | {t.device for t in self.model.buffers()}
        if len(devices) > 1:
            raise ValueError(
                f"model: parameters and buffers are on several devices {sorted(map(str, devices))}; "
                "metagrad needs them on one device. Move the model with model.to(device)."
            )
        nested = _nesting(self.estimator)
        # With compile=, the estimator that runs: Full's exact compiled path is Checkpointed's.
        running = self.estimator if nested or self._compile_settings is None else self.estimator.under_compile()
        self._running = running
        self._names = tuple(n for n, _ in named)
        self._params = tuple(p for _, p in named)
        self._versions = tuple(p._version for p in self._params)
        # A differentiable inner loop (Full, or an exact estimator in a nested block) unrolls
        # from the parameters themselves; otherwise θ is detached aliases of them (no copy).
        self._differentiable = running.differentiable or nested
        if not self._differentiable:  # detached aliases of the parameters
            theta = {n: p.detach() for n, p in named}
        elif self._theta_fixed:  # an unroll needs leaves that require grad to start from
            theta = {n: p.detach().requires_grad_() for n, p in named}
        else:
            theta = dict(named)
        if self.tasks is not None:  # φ_0 = θ for every task
            theta = {n: t.expand(self.tasks, *t.shape) for n, t in theta.items()}
            if not self._differentiable:
                # Stored as a plain copy (not the view, whose stride 0 an update of it may keep
                # in a dimension of size 1): every iterate has one layout, so each compiled
                # step and product meets one and compiles once.
                theta = {n: t.clone(memory_format=torch.contiguous_format) for n, t in theta.items()}
        first = self._params[0]
        compiler = None
        if nested:  # autograd through the unroll: nothing to compile, nothing to rebuild
            pass
        elif self._compile_settings is not None and running.differentiable:
            warn(f"compile=True: {running!r} builds the inner loop's graph with "
                 "create_graph=True and differentiates it again, which the backward of a compiled "
                 "function cannot be in this torch; it runs eagerly. estimator=mg.Checkpointed() "
                 "gives the same exact meta-gradient with compiled steps.")
        elif self._compile_settings is not None:
            compiler = Compiler(warn, on_device(self._compile_settings, first.device))
        self._trajectory = Trajectory(self.model, theta, self.inner_opt,
                                      differentiable=self._differentiable,
                                      keep=None if nested else running.keep(),
                                      proximal=running.proximal,
                                      snapshots=None if nested else running.snapshot_schedule(),
                                      check_finite=self.check_finite,
                                      replay_rtol=relative_tolerance(self.check_replay, first.dtype,
                                                                     first.device),
                                      compiler=compiler, tasks=self.tasks)
        # Every parameter's .grad, adapted or a meta-parameter, as it was at entry.
        self._every = tuple(p for _, p in every)
        self._saved_grads = [None if p.grad is None else p.grad.clone() for p in self._every]
        self._fmodel = None
        self.info = {}
        self._hooks = [p.register_post_accumulate_grad_hook(partial(self._reached, v))
                       for p, v in zip(self._params, self._versions) if p.requires_grad]
        self._warned = False
        self._active = True
        return self

    def _reached(self, version: int, param: torch.Tensor) -> None:
        """A backward inside the block wrote θ's ``.grad`` (:func:`~metagrad.query.on_theta_grad`)."""
        written = list(zip(self._names, self._params, self._versions)) if param._version != version else None
        self._warned = on_theta_grad(self._trajectory, self._warned, written)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Literal[False]:
        trajectory = self._trajectory
        said = None if trajectory is None or exc_type is not None else warn_at_end(self._running, trajectory)
        failed = exc_type is not None or said is not None
        self._active = False
        self._fmodel = None
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._trajectory = [], None
        if trajectory is not None:
            trajectory.lifetime.block_ended = True
            if failed or trajectory.lifetime.backward_calls > 0:
                trajectory.release()
        if failed:
            for param, saved in zip(self._every, self._saved_grads):
                param.grad = saved
            if trajectory is not None:  # the other meta-parameters, as found
                for tensor, saved in trajectory.meta_saved_grads:
                    tensor.grad = saved
        self._saved_grads = []
        if said is not None:
            raise said
        return False

    # --------------------------------------------------------------- inner loop
    def step(self, closure: Closure, *batch: Any, rule: Optional[UpdateRule] = None) -> torch.Tensor:
        """Take one inner step and return its loss, detached.

        Args:
            closure: called as ``closure(fmodel, *batch)`` with the model at the current fast
                weights; returns the scalar inner loss. Estimators that rebuild step
                graphs (Checkpointed, Truncated, Binomial) call a copy of it frozen at this
                step (the values it captures now, the random generator states it starts
                from) again during backward, and check the rebuilt step against the step
                taken (:mod:`metagrad.replay`): what it reads some other way (an iterator,
                an object's attributes, data changed in place later) raises
                :class:`~metagrad.ReplayError`. For Binomial it is also called under
                ``torch.func.vmap``.
            batch: tensors (or other values) passed to the closure after ``fmodel``, frozen
                with it. In a block over ``tasks=T`` every tensor has a first dimension of T:
                each task's step calls ``closure(f_t, *batch_t)`` (``torch.func.vmap``), and the
                step returns the T losses.
            rule: an update rule used in place of ``inner_opt`` for this step only (and
                for every rebuild of it), e.g. ``inner_opt`` with another step size, or one
                that transforms the gradients first. It receives the block's optimizer state,
                so it must keep ``inner_opt``'s state layout.
        """
        if not callable(closure):
            raise TypeError(
                f"closure: expected a callable fmodel -> loss, got {type(closure).__name__}."
            )
        if rule is not None:
            check_update_rule(rule, "rule")
        loss = take_step(self._open_trajectory(), closure, batch, rule, self.tasks, self._every)
        self._fmodel = None
        return loss

    @property
    def steps(self) -> int:
        """The number of inner steps taken so far."""
        return self._open_trajectory().length

    @property
    def fmodel(self) -> FunctionalModel:
        """The model at the current fast weights, attached to θ through the estimator.
        ``meta.fmodel.state_dict()`` and ``meta.fmodel.to_module()`` give the adapted model
        out, detached (:class:`~metagrad.fmodel.FunctionalModel`)."""
        trajectory = self._open_trajectory()
        k = trajectory.length
        grad = torch.is_grad_enabled()
        # One per step; one first made under torch.no_grad() (evaluation) holds weights without
        # the node to θ and η, and is made again for a query built with grad enabled.
        if self._fmodel is None or self._fmodel[0] != k or (grad and not self._fmodel[1]):
            params = attached(self, trajectory, k, watched=True)
            self._fmodel = (k, grad, FunctionalModel(self.model, params, guard=self._check_open,
                                                     layout=trajectory.layout, tasks=self.tasks))
        return self._fmodel[2]

    # ------------------------------------------- for code that builds inner losses itself
    # The adapters (metagrad.adapters) are built on these: their users hand over a loss tensor
    # (diffopt.step(loss), inner_opt.step(loss)) built from weights the adapter gave out.

    def fast_weights(self) -> Params:
        """The current fast weights φ_k, name→tensor, for code that builds an inner or query
        loss from them itself (with :func:`torch.func.functional_call`, say) instead of
        through :attr:`fmodel`; pass the loss to :meth:`step_from_loss`.

        For a differentiable inner loop (Full) they are the unrolled iterate itself, whose
        graph reaches θ and η by plain autograd; otherwise :attr:`fmodel`'s weights, attached
        to θ through the estimator's node. A backward through them counts as going through
        the inner loop: it is not warned about as a query built from the model itself is.
        """
        trajectory = self._open_trajectory()
        # With Full a loss built from these reaches θ by plain autograd through the unrolled
        # steps, without the node that tells a backward through the inner loop from one that
        # is not: no warning for it.
        self._warned = True
        if self._differentiable:
            return dict(trajectory.current)
        return dict(self.fmodel.params)

    def weights_at(self, k: int) -> Params:
        """The fast weights φ_k after ``k`` of the :attr:`steps` taken so far
        (``0 <= k <= meta.steps``), attached to θ as :meth:`fast_weights` are.

        Raises:
            IndexError: ``k`` is outside ``[0, meta.steps]``.
            RuntimeError: the estimator no longer stores step ``k`` (Truncated and FirstOrder
                keep only the last steps).
        """
        trajectory = self._open_trajectory()
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k: expected an integer in [0, {trajectory.length}], "
                            f"got {type(k).__name__} {k!r}.")
        if not 0 <= k <= trajectory.length:
            raise IndexError(f"k: expected an integer in [0, {trajectory.length}] (the inner steps "
                             f"taken so far), got {k}.")
        if k == trajectory.length:
            return self.fast_weights()
        return attached(self, trajectory, k, watched=False)

    def step_from_loss(self, loss: torch.Tensor, params: Params, *,
                       rule: Optional[UpdateRule] = None) -> torch.Tensor:
        """Take one inner step from ``loss`` and return it, detached: :meth:`step` for a loss
        already built, from ``params``, the current :meth:`fast_weights`.

        No closure is known, so the step cannot be rebuilt later: where the estimator needs
        its products (Checkpointed, Truncated, Binomial), the gradient is taken with
        ``create_graph=True`` and kept, so memory grows like an unroll of forward and
        gradient graphs, and Binomial computes its products one step at a time. Implicit
        needs a closure at the last step (:meth:`step`).

        Args:
            loss: the scalar inner loss, built from ``params``.
            params: the tensors :meth:`fast_weights` returned since the last step, name→tensor
                (one entry per adapted parameter).
            rule: as in :meth:`step`.
        """
        trajectory = self._open_trajectory()
        if self.tasks is not None:
            raise ValueError(no_loss_steps(self.tasks))
        if not isinstance(params, Mapping):
            raise TypeError(f"params: expected the name→tensor mapping meta.fast_weights() "
                            f"returned, got {type(params).__name__}.")
        if set(params) != set(self._names):
            raise ValueError(
                f"params: expected the mapping meta.fast_weights() returned, with the names "
                f"{list(self._names)}, got {sorted(params)}. Build the loss from meta.fast_weights()."
            )
        if rule is not None:
            check_update_rule(rule, "rule")
        loss = trajectory.advance_from_loss(loss, dict(params), rule)
        self._fmodel = None
        return loss

    def _open_trajectory(self) -> Trajectory:
        self._check_open()
        assert self._trajectory is not None
        return self._trajectory

    def _check_open(self) -> None:
        if not self._active:
            raise RuntimeError(
                "meta.fmodel/meta.step: this MetaGradient block has ended (or was never "
                "entered). Use them inside `with mg.MetaGradient(...) as meta:`; to use the adapted "
                "model after the block, take meta.fmodel.to_module() (a copy of the module at the fast "
                "weights, detached) or meta.fmodel.state_dict() inside it."
            )

    def __repr__(self) -> str:
        return (f"MetaGradient({type(self.model).__name__}, inner_opt={self.inner_opt!r}, "
                f"estimator={self.estimator!r})")


def _nesting(estimator: Estimator) -> bool:
    """Whether a block opened now is nested in an outer block's inner step whose graph will be
    differentiated twice (:func:`~metagrad.trajectory.second_order`): then its meta-gradient
    must itself be differentiable, and it is computed by autograd through the unrolled inner
    loop, which for an exact estimator (Full, Checkpointed) is the same number. Raise for an
    approximate estimator (its estimate has no derivative that the outer step could take),
    and inside a ``torch.func`` transform (an outer Binomial rebuilding steps under vmap)."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise NestedBlockError(
            "MetaGradient: a block was opened inside a torch.func transform (vmap, grad), for "
            "example in the inner loss of an outer block whose Binomial estimator rebuilds steps "
            "under torch.func.vmap. Nested blocks work with an outer mg.Full(), mg.Checkpointed(), "
            "mg.Truncated(T), mg.FirstOrder() or mg.Binomial(order, chunk_size=1) (one step at a "
            "time, no vmap)."
        )
    if not second_order():
        return False
    if not estimator.exact:
        raise NestedBlockError(
            f"estimator: {estimator!r} for a block nested inside an outer block's inner step, "
            "which the outer estimator differentiates twice (its second derivatives run through "
            f"this block's meta-gradient); {type(estimator).__name__}'s estimate cannot be "
            "differentiated again. Use estimator=mg.Full() or mg.Checkpointed() for the inner "
            "block (exact, and differentiable then), or mg.FirstOrder() for the outer block, "
            "which differentiates its steps only once."
        )
    return True


