"""Compiled inner steps and step products: ``MetaGradient(..., compile=True)``.

On the small models meta-learning runs on, eager PyTorch spends most of an inner step in
per-op overhead. With ``compile=True`` the two pieces every estimator is made of run as
``torch.compile``'d calls (inductor), the estimators themselves unchanged:

- **The inner step's gradient** ``∇L_tr(φ)``, one compiled call per step. The user's closure
  is traced by TorchDynamo, which guards on what it reads (the closure's code, the values it
  captures, the module's attributes), so a step whose Python state changed is recompiled or
  run eagerly, never computed with stale values. The first step of each closure runs eagerly:
  it finds the meta-parameters η and whether the closure draws random numbers.
- **A sweep** (:meth:`~metagrad.trajectory.Trajectory.sweep`, Checkpointed's backward): a
  vector pulled back through a run of steps of one structure (``trajectory.SWEEP``, 4) in one compiled call,
  the run's step products traced as one graph (:func:`_segment`), each rebuilt step still
  checked against the stored iterate. Runs have one length (the steps left over are single
  products), so a larger K compiles nothing new.
- **The step product** (:meth:`~metagrad.trajectory.Trajectory.vjp`, and the vmapped rows of
  :meth:`~metagrad.trajectory.Trajectory.batched_vjp`): ``torch.func.vjp`` of the whole step
  ``Φ(φ, η) = rule.step(φ, ∇L_tr(φ, η), s)``, with the state's adjoint where it is carried,
  one compiled call per product (per chunk of rows under ``vmap``). The closure's loss is
  first traced to an aten graph (``make_fx``) with every tensor it captures, every parameter
  not adapted and every buffer as an input, so that η can be differentiated although the user
  captured it; Python values are constants of that graph, keyed (below). A tensor the loss
  reads that is neither an input nor named by the key (a captured object's attribute, a
  helper's global) would be a constant the key cannot follow: such a product runs eagerly.
  Every rebuilt step still passes the replay check against the stored iterate, so a graph
  whose constants went stale raises :class:`~metagrad.ReplayError` instead of giving a wrong
  product.

The compiled functions are kept in a process-wide cache keyed on what changes them: the
closure's code and the kinds of values it captures (:attr:`metagrad.frozen.Frozen.structure`:
its tensors, η among them, are inputs of every call, whatever their identity), the
numbers it reads through the objects it captures (``cfg.temp``), through the methods it calls
on them and as the globals of the functions it calls (:mod:`metagrad.reads`), and those the
modules' forwards read from their attributes (a LeakyReLU's slope), the update rule's type and
hyperparameters (its step size, a number or a tensor, is an input of every call:
:func:`~metagrad.compile_keys.step_sizes_as_tensors`, so that a step size changed between
blocks or by a schedule compiles nothing new; another ``momentum`` or a new ``cfg.temp``
compiles again; :func:`~metagrad.compile_keys.rule_structure`), the
module's structure (not its identity: :func:`~metagrad.compile_keys.module_structure`), the
fast weights' shapes and dtypes, the modules' train/eval modes and autocast. A new task with
the same shapes reuses them, and so does a larger K. ``meta.info["compiled"]`` counts what ran
compiled.

Cost, measured (docs/benchmarks.md, "Compiled"; a 2-core AMD EPYC, one thread, the sinusoid
MLP): a compiled inner gradient takes 70–90 µs a call, its kernels about half; compiled
Checkpointed takes 1.0–1.1× and 0.8–0.85× of eager Full at K = 5 and 20 with one task per block (the
step's Python bookkeeping is as large as the compiled call), and 0.36–0.45× and 0.29–0.31× over
a meta-batch of 4 in one block (``MetaGradient(tasks=4)``). A first compile takes 30–40 s.

What falls back to eager, with one :class:`~metagrad.MetaGradientWarning` per closure that says why:

- a closure TorchDynamo cannot trace in one graph (``print``, ``.item()`` in control flow,
  an unsupported op); steps that draw random numbers (their generator replay is eager), or
  whose loss reaches a leaf the closure makes (``x.clone().requires_grad_()``), silently;
- a product whose η is reached through an object rather than captured (only autograd can
  follow it), silently (it is not an error, only slower); a rule or closure that fails to
  trace, such as an update rule that changes its state in place (torchopt's ``adam``).

The Full estimator's inner loop would be built with ``create_graph=True`` and differentiated
again by the query's backward, which a compiled function's backward cannot be in this torch:
with ``compile=`` it runs as Checkpointed (:meth:`~metagrad.Estimator.under_compile`, the same
meta-gradient), and ``meta.info["compiled"]["estimator"]`` says so.
"""

from __future__ import annotations

import collections
import types
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from torch.utils import _pytree as pytree

from .fmodel import FunctionalModel, Layout, _frozen_buffers
from .numerics import inexact
from .replay import step_norms
from .compile_keys import module_reads_key, module_structure, rule_inputs, rule_structure, shapes, step_sizes_as_tensors
from .compile_options import settings_key
from .step import eta_grads_of, rule_tensors, rule_with, same_shapes, step_body, step_vjp, with_eta

__all__ = ["Compiler", "clear_cache"]

#: Compiled functions kept process-wide (least recently used dropped first).
_CACHE_SIZE = 64
_CACHE: "collections.OrderedDict[Any, Any]" = collections.OrderedDict()
#: Keys that could not be compiled, with why.
_REFUSED: dict[Any, str] = {}
#: Closures (by :attr:`~metagrad.frozen.Frozen.structure`) already warned about: one warning each.
_WARNED: set[Any] = set()
#: Update rule types whose step products did not compile with their step size as a tensor (a
#: rule that branches on it): their step size is a constant of the graph (:meth:`Compiler.rule`).
_CONSTANT_STEP_SIZES: set[type] = set()


def clear_cache() -> None:
    """Forget every compiled step and product (they are compiled again when next needed), and
    which closures were warned about."""
    _CACHE.clear()
    _REFUSED.clear()
    _CONSTANT_STEP_SIZES.clear()
    _WARNED.clear()


def _cached(key: Any, build: Callable[[], Any]) -> Any:
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = build()
    _CACHE[key] = value
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def _fresh(function: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``function`` with its own code object: TorchDynamo keeps its compiled graphs
    per code object, so each cache entry gets its own and none evicts another's."""
    copy = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    return copy


class Compiler:
    """The compiled pieces of one trajectory (see the module docstring).

    ``warn`` is called with a message the first time a piece falls back to eager.
    """

    def __init__(self, warn: Callable[[str], None], settings: Optional[Mapping[str, Any]] = None) -> None:
        self._warn = warn
        #: ``torch.compile``'s arguments besides ``fullgraph`` and ``dynamic`` (:func:`compile_settings`).
        self.settings = dict(settings or {})
        self._settings_key = settings_key(self.settings)
        #: Per closure key (inner gradients) or step batch key (products): the compiled
        #: function found in the process-wide cache, with what calling it needs; ``None``:
        #: eager. Looked up once per trajectory, so that a step pays for one call.
        self._inner: dict[Any, Any] = {}
        self._products: dict[Any, Any] = {}
        #: Per step batch key: what the step's compiled products share (:meth:`_step_parts`).
        self._parts: dict[Any, Any] = {}
        #: What ran compiled: inner steps, step products (rows of vmapped calls and steps of a
        #: sweep counted one each), and sweeps (calls that pulled a vector back through a run of
        #: steps, :meth:`sweep`); ``meta.info["compiled"]`` reports it.
        self.counts = {"inner_steps": 0, "products": 0, "sweeps": 0}
        #: The inner steps whose gradient came from a compiled call (for the replay error).
        self.inner_steps: set[int] = set()
        self._module: Optional[tuple[tuple[Any, ...], list[Any]]] = None
        #: Warnings :meth:`refuse` keeps until :meth:`settle`, per closure key.
        self._deferred: dict[Any, str] = {}
        #: Per update rule (by id): the rule, and the rule as compiled products take it (:meth:`rule`).
        self._rules: dict[int, tuple[Any, Any]] = {}

    def rule(self, rule: Any, device: torch.device) -> Any:
        """``rule`` as a compiled step product takes it: with its step size as tensors
        (:func:`~metagrad.compile_keys.step_sizes_as_tensors`), unless a product of its type
        failed to compile so; converted once per rule per block."""
        if type(rule) in _CONSTANT_STEP_SIZES:
            return rule
        found = self._rules.get(id(rule))
        if found is None or found[0] is not rule:
            found = self._rules[id(rule)] = (rule, step_sizes_as_tensors(rule, device))
        return found[1]

    def _product_failed(self, memo: Any, key: Any, closure_key: Any, error: BaseException, rule: Any) -> None:
        """After a compiled product (or sweep) ``memo`` failed: if the rule's step size was a
        tensor input, make it a constant for rules of its type from now on and let the next call
        compile again (this product runs eagerly, without a warning); otherwise run ``key``
        eagerly from now on (:meth:`refuse`)."""
        found = self._rules.get(id(rule))  # (the call that failed converted it, if it could)
        if type(rule) not in _CONSTANT_STEP_SIZES and found is not None and found[1] is not rule:
            _CONSTANT_STEP_SIZES.add(type(rule))
            self._products.pop(memo, None)
            return
        self._products[memo] = None
        self.refuse(key, closure_key, error, rule)

    def module_structure(self, module: torch.nn.Module) -> tuple[tuple[Any, ...], list[Any]]:
        """:func:`~metagrad.compile_keys.module_structure` of the block's module, found once per block."""
        if self._module is None:
            self._module = module_structure(module)
        return self._module

    def refuse(self, key: Any, closure_key: Any, error: BaseException, rule: Any = None, *,
               later: bool = False) -> None:
        """Run the piece ``key`` eagerly from now on, and warn once per closure why. ``rule``:
        the update rule, for a step product (the step is the closure's gradient and the rule).
        ``later``: the warning waits for :meth:`settle`, after the eager step ran (a closure that
        fails eagerly too gets that error alone, not a warning before it)."""
        _REFUSED[key] = f"{type(error).__name__}: {_first_line(error)}"
        if closure_key not in _WARNED:
            what = ("this closure's inner steps cannot be compiled in one graph, so they run eagerly"
                    if rule is None else
                    f"the step products of this closure with the update rule {rule!r} cannot be compiled "
                    "in one graph, so they run eagerly")
            cause = ("TorchDynamo compiled it for as many input shapes as torch._dynamo.config.recompile_limit "
                     "allows; raising that limit compiles more" if "RecompileLimit" in type(error).__name__ else
                     "Python side effects that torch.compile cannot trace (print, .item(), control flow on a tensor's "
                     "value), an unsupported op, or an update rule torch.compile cannot trace cause this")
            self._deferred[closure_key] = (
                f"compile=True: {what} ({_REFUSED[key]}). {cause}; the meta-gradient is the same.")
            if not later:
                self.settle()

    def settle(self) -> None:
        """Issue the warnings :meth:`refuse` kept for later."""
        while self._deferred:
            closure_key, message = self._deferred.popitem()
            if closure_key not in _WARNED:
                _WARNED.add(closure_key)
                self._warn(message)

    # ------------------------------------------------------------------ the inner step
    def inner_grad(self, trajectory: Any, closure: Callable[..., torch.Tensor],
                   key: Any, params: dict[str, torch.Tensor], used: tuple[str, ...]
                   ) -> Optional[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """``(L_tr(φ), ∇L_tr(φ))`` for the fast weights ``used``, by one compiled call, or
        ``None`` where the closure cannot be compiled (then it is computed eagerly). ``params``:
        the stored iterate φ, detached (the trajectory's, as it keeps them)."""
        if key not in self._inner:
            self._inner[key] = self._inner_function(trajectory, key, params, used)
        found = self._inner[key]
        if found is None:
            return None
        entry_key, compiled = found
        try:
            with torch.no_grad():
                grads, loss = compiled(closure, params, trajectory.module, trajectory.layout)
        except Exception as error:  # a graph break, an unsupported op: eager from now on
            self._inner[key] = None
            self.refuse(entry_key, key, error, later=True)  # warned once the eager step ran
            return None
        self.counts["inner_steps"] += 1
        self.inner_steps.add(trajectory.length)  # the step about to be taken
        return loss, dict(grads)

    def _inner_function(self, trajectory: Any, key: Any, params: dict[str, torch.Tensor],
                        used: tuple[str, ...]) -> Optional[tuple[Any, Callable[..., Any]]]:
        # The module is an argument of every call, which TorchDynamo guards, not a constant of
        # the function: a new model of the same structure per block finds it, and the entry
        # does not keep the old one alive.
        entry_key = ("inner", key, self.module_structure(trajectory.module)[0], used, shapes(params),
                     self._settings_key)
        if entry_key in _REFUSED:
            return None

        def build() -> Callable[..., Any]:
            def inner_grad(closure: Callable[..., torch.Tensor], params: dict[str, torch.Tensor],
                           module: torch.nn.Module, layout: Layout) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
                def loss_of(w: dict[str, torch.Tensor]) -> torch.Tensor:
                    return closure(FunctionalModel(module, {**params, **w}, layout=layout))
                # The gradient of the loss, or of the sum of a closure's independent losses
                # (Trajectory.advance's ``parts``), with the value(s) as returned.
                value, pull = torch.func.vjp(loss_of, {n: params[n] for n in used})[:2]
                return pull(torch.ones_like(value))[0], value

            return torch.compile(_fresh(inner_grad), fullgraph=True, dynamic=False, **self.settings)

        return entry_key, _cached(entry_key, build)

    # ----------------------------------------------------------------- step products
    def product(self, trajectory: Any, steps: list[int], chunk: list[Any],
                u: dict[str, torch.Tensor], state: Any, state_adjoint: Optional[list[Any]],
                batched: bool) -> Optional[tuple[Any, ...]]:
        """The compiled ``torch.func.vjp`` of the step at each of ``steps`` (one step, or a
        chunk of steps with equal :meth:`~metagrad.step.StepRecord.batch_key` under ``vmap``
        when ``batched``): ``(J_mᵀu, [B_mᵀu per explicit η], state adjoint, the replay norms of
        the rebuilt Φ_m(φ_m) against the stored φ_{m+1} (:func:`~metagrad.replay.step_norms`,
        ``[3, len(steps)]``, computed in the same call), L_m, ∇L_m, explicit η indices, ∂ℓ/∂η per explicit η)``, or
        ``None`` where it cannot be compiled.

        ``u``, the iterates and ``state`` (stacked) have a leading dimension of ``len(steps)``
        when ``batched``; the η products are then per row. ``state_adjoint`` (not batched)
        carries the optimizer state's adjoint through the step, as
        :meth:`~metagrad.trajectory.Trajectory.vjp` defines it."""
        first = chunk[0]
        template = first.closure
        if template is None:
            return None
        varying = self._prepare(steps, chunk)
        leaves, spec = pytree.tree_flatten(state)
        carry = state_adjoint is not None
        rows = len(steps) if batched else 0  # a function per count (one would hit the recompile limit)
        memo = (first.batch_key(), rows, varying, carry, str(spec), bool(trajectory.rule_meta))
        if memo not in self._products:
            self._products[memo] = self._product_function(trajectory, steps[0], first, leaves, spec, rows, varying,
                                                          carry)
        found = self._products[memo]
        if found is None:
            return None
        key, compiled, explicit, fixed, varied = found
        eta = [trajectory.meta[i].detach() for i in explicit]
        if batched:
            u = {n: t.contiguous() for n, t in u.items()}  # (one vector for every row, expanded: compiled as the others)
            nexts = [trajectory.iterate(m + 1) for m in steps]
            params = {n: torch.stack([s.params[n] for s in chunk]) for n in trajectory.theta}
            after = {n: torch.stack([nxt[n] for nxt in nexts]) for n in trajectory.theta}
            captured = [torch.stack([s.frozen().tensors[j][1] for s in chunk]) if j in varying
                        else t for j, (_, t) in enumerate(template.tensors)]
        else:
            params, after = first.params, trajectory.iterate(steps[0] + 1)
            captured = [t for _, t in template.tensors]
        moving = [leaves[i] for i in varied]
        adjoint = list(state_adjoint or [])
        moving_adjoint = [adjoint[i] if i < len(adjoint) and adjoint[i] is not None else torch.zeros_like(leaves[i])
                          for i in varied]
        try:
            with trajectory.products.as_taken(None, first.modes, first.autocast), torch.no_grad():
                pulled, pulled_eta, pulled_state, norms, value, grads, eta_grads = compiled(
                    params, moving, u, moving_adjoint, [t.detach() for t in captured], fixed, eta,
                    rule_inputs(self.rule(first.rule, trajectory.device)), leaves, after)
        except Exception as error:
            self._product_failed(memo, key, template.structure, error, first.rule)
            return None
        self.counts["products"] += len(steps)
        for step in chunk:
            step.frozen().compiled = "product"
        state_out: Optional[list[Any]] = None
        if carry:
            state_out = [None] * len(leaves)
            for i, g in zip(varied, pulled_state):
                state_out[i] = g
        return dict(pulled), list(pulled_eta), state_out, norms, value, dict(grads), explicit, list(eta_grads)

    def _prepare(self, steps: list[int], chunk: list[Any]) -> tuple[int, ...]:
        """Mark the steps whose gradient a compiled call took (a replay error names what ran
        compiled), and return the slots of the captured tensors that differ between the steps
        (they are stacked; the others are passed once)."""
        for m, step in zip(steps, chunk):
            if m in self.inner_steps and step.closure is not None and step.closure.compiled is None:
                step.closure.compiled = "inner"
        template = chunk[0].closure
        return tuple(j for j, (_, tensor) in enumerate(template.tensors)
                     if any(s.frozen().tensors[j][1] is not tensor for s in chunk[1:]))

    def sweep(self, trajectory: Any, steps: list[int], chunk: list[Any], u: dict[str, torch.Tensor],
              state_adjoint: Optional[list[Any]]) -> Optional[tuple[Any, ...]]:
        """``u`` pulled back through the consecutive ``steps`` (last first) by one compiled call
        (:func:`_segment` of the step's compiled VJP): ``(J_{first}ᵀ…J_{last}ᵀu, [Σ B_mᵀa_{m+1} per
        explicit η], state adjoint, explicit η indices)``, each rebuilt step queued for the replay
        check; or ``None`` where the steps cannot run so (then each is a product of its own).
        ``state_adjoint`` ``None``: the optimizer state is held constant (no adjoint returned).

        The steps must share one structure (:meth:`~metagrad.step.StepRecord.batch_key`: the
        closure's code and kinds of captures, the rule, the modes), replay no random numbers and
        hold no op that cannot be differentiated twice; a learned step size's part of B (taken
        from each step's gradient) keeps the step-by-step products."""
        first = chunk[0]
        key = first.batch_key()
        if (key is None or first.closure is None or trajectory.rule_meta
                or any(step.once or step.batch_key() != key for step in chunk)):
            return None
        template = first.closure
        varying = self._prepare(steps, chunk)
        leaves, spec = pytree.tree_flatten(first.state)
        rows = [pytree.tree_leaves(step.state) for step in chunk]
        if any(not isinstance(t, torch.Tensor) for row in rows for t in row) or not same_shapes(list(zip(*rows))):
            return None  # a Python value in the optimizer state (a step count), a leaf that grows
        carry = state_adjoint is not None
        memo = (key, "segment", len(steps), varying, str(spec), carry)
        if memo not in self._products:
            self._products[memo] = self._product_function(trajectory, steps[0], first, leaves, spec, False, varying,
                                                          carry, segment=len(steps))
        found = self._products[memo]
        if found is None:
            return None
        entry_key, compiled, explicit, fixed, varied = found
        eta = [trajectory.meta[i].detach() for i in explicit]
        after = trajectory.iterate(steps[-1] + 1)  # the stored iterate the last step must rebuild
        params = {n: torch.stack([s.params[n] for s in chunk] + [after[n]]) for n in trajectory.theta}
        captured = [torch.stack([s.frozen().tensors[j][1] for s in chunk]) if j in varying else t
                    for j, (_, t) in enumerate(template.tensors)]
        stacked_leaves = [torch.stack(column) for column in zip(*rows)] if leaves else []
        adjoint = list(state_adjoint or [])
        moving_adjoint = [adjoint[i] if i < len(adjoint) and adjoint[i] is not None else torch.zeros_like(leaves[i])
                          for i in varied]
        try:
            with trajectory.products.as_taken(None, first.modes, first.autocast), torch.no_grad():
                pulled, pulled_eta, pulled_state, norms, values, eta_grads = compiled(
                    params, stacked_leaves, u, moving_adjoint, [t.detach() for t in captured], fixed, eta,
                    rule_inputs(self.rule(first.rule, trajectory.device)))
        except Exception as error:
            self._product_failed(memo, entry_key, template.structure, error, first.rule)
            return None
        self.counts["products"] += len(steps)
        self.counts["sweeps"] += 1
        for step in chunk:
            step.frozen().compiled = "product"
        trajectory.products.check_norms(steps, norms, values, (explicit, list(eta_grads)))
        state_out: Optional[list[Any]] = None
        if carry:
            state_out = [None] * len(leaves)
            for i, g in zip(varied, pulled_state):
                state_out[i] = g
        return dict(pulled), list(pulled_eta), state_out, explicit

    def _step_parts(self, trajectory: Any, m: int, first: Any) -> Optional[tuple[Any, ...]]:
        """What every compiled product of steps like ``first`` shares, found once per block for
        each step structure (:meth:`~metagrad.step.StepRecord.batch_key`): ``(the cache key's
        part for the step, explicit η indices, the captured η's slots, the parameters not
        adapted that are η, the module tensors every call takes)``; ``None`` where an η is
        reached through an object (only autograd follows it; ``first`` is step m)."""
        batch_key = first.batch_key()
        memo = (batch_key, bool(trajectory.rule_meta))
        if batch_key is not None and memo in self._parts:
            return self._parts[memo]
        template = first.closure
        where = trajectory.products.explicit(m, first)
        if where is None:
            self._parts[memo] = None
            return None
        # η as explicit inputs: the captured ones, then the parameters not adapted.
        explicit = ([i for i, (kind, _) in where.items() if kind == "slot"]
                    + [i for i, (kind, _) in where.items() if kind == "param"])
        eta_slots = tuple(where[i][1] for i in explicit if where[i][0] == "slot")
        eta_params = tuple(where[i][1] for i in explicit if where[i][0] == "param")
        module = trajectory.module
        fixed_names = tuple(n for n, p in module.named_parameters() if n not in trajectory.theta)
        with trajectory.products.as_taken(None, first.modes, first.autocast):  # the step's train/eval modes
            replaced = set(_frozen_buffers(trajectory.layout.norms))
        buffer_names = tuple(n for n, _ in module.named_buffers() if n not in replaced)
        # The numbers the closure reads through the objects it captures (cfg.temp), and those
        # the modules' forwards read from their attributes, as they are now, when the graph is
        # traced: they are constants of it. The closure's key holds objects by identity only; its
        # tensors, η among them, are inputs of every call, so they count by kind
        # (Frozen.structure): an η computed anew for each block (a hypernetwork's output) finds
        # the compiled product of the last.
        key = ("product", template.structure, template.reads_key(), module_reads_key(module),
               rule_structure(self.rule(first.rule, trajectory.device)), first.used, first.modes, first.autocast,
               self.module_structure(module)[0], shapes(first.params), fixed_names, buffer_names, eta_slots,
               eta_params, bool(trajectory.rule_meta), self._settings_key)
        found = (key, explicit, eta_slots, eta_params, _module_tensors(module, fixed_names, buffer_names))
        self._parts[memo] = found  # (looked up again only under a batch key)
        return found

    def _product_function(self, trajectory: Any, m: int, first: Any, leaves: list[Any], spec: Any,
                          batched: int, varying: tuple[int, ...], carry: bool,
                          segment: int = 0) -> Optional[tuple[Any, ...]]:
        """The compiled product for steps like ``first`` from the process-wide cache (built
        there if missing): ``(cache key, function, explicit η indices, module tensors, the
        state leaves carried)``, or ``None`` where it cannot be compiled (``first`` is step m). ``batched``: the rows
        under ``vmap`` (0: one step); ``segment``: the steps it pulls a vector back through instead (:meth:`sweep`)."""
        template = first.closure
        assert template is not None
        parts = self._step_parts(trajectory, m, first)
        if parts is None:  # an η reached through an object: only autograd follows it
            return None
        if any(not isinstance(t, torch.Tensor) for t in leaves):
            return None  # a Python value in the optimizer state (a step count)
        step_key, explicit, eta_slots, eta_params, fixed = parts
        varied = tuple(i for i, t in enumerate(leaves) if carry and inexact(t))
        key = (step_key, varying if batched or segment else None, varied, str(spec), segment, batched)
        if key in _REFUSED:
            return None
        slots = [slot for slot, _ in template.tensors]
        module = trajectory.module
        used = first.used
        step_sizes = bool(trajectory.rule_meta)
        slot_position = {slot: j for j, slot in enumerate(slots)}
        eta_slot_index = {slot_position[slot]: k for k, slot in enumerate(eta_slots)}
        eta_param_index = {name: len(eta_slots) + k for k, name in enumerate(eta_params)}
        params0 = first.params

        def build() -> Any:
            # The closure's loss as an aten graph of (fast weights, module tensors, captured
            # tensors): traced once, at this step, as the step was taken.
            layout = trajectory.layout

            def loss(p: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor],
                     captured: list[torch.Tensor]) -> torch.Tensor:
                function = template.with_tensors(dict(zip(slots, captured)))
                return function(FunctionalModel(module, p, layout=layout, fixed=fixed))

            # The rule with copies of its tensors, which every call replaces by its inputs: the
            # entry holds none of the user's (a step size computed with a graph, say).
            taken = self.rule(first.rule, trajectory.device)
            rule = rule_with(taken, {id(t): t.detach().clone() for t in rule_tensors(taken)})
            rule_ids = [id(t) for t in rule_tensors(rule)]
            from torch.fx.experimental.proxy_tensor import make_fx
            with trajectory.products.as_taken(None, first.modes, first.autocast), torch.no_grad():
                graph = make_fx(loss)({n: t.detach() for n, t in params0.items()}, fixed,
                                      [t.detach() for _, t in template.tensors])
            _refuse_held_tensors(graph, self.module_structure(module)[1])

            def row(p: dict[str, torch.Tensor], moving: list[torch.Tensor], vector: dict[str, torch.Tensor],
                    moving_adjoint: list[torch.Tensor], captured: list[torch.Tensor],
                    fixed: dict[str, torch.Tensor], eta: list[torch.Tensor], rule_values: list[torch.Tensor],
                    state_leaves: list[Any]
                    ) -> tuple[Any, ...]:
                loss_at = with_eta(graph, captured, fixed, eta_slot_index, eta_param_index)
                body = step_body(loss_at, rule_with(rule, dict(zip(rule_ids, rule_values))), used,
                                 state=pytree.tree_unflatten(state_leaves, spec),
                                 carried=varied, eta_grads=bool(eta))  # ∂ℓ/∂η: the replay check's
                *out, grads = step_vjp(body, p, eta, moving, vector, moving_adjoint, varied)
                grads, eta_grads = eta_grads_of(grads, len(eta))
                return (*out, grads if step_sizes else {}, eta_grads)  # the gradients only for the rule's η

            if segment:
                function = _segment(row, segment, varying, varied)
            elif batched:
                dims_captured = [0 if j in varying else None for j in range(len(slots))]
                function = _checked(torch.func.vmap(row, in_dims=(0, 0, 0, 0, dims_captured, None, None, None, 0)),
                                    bool(batched))
            else:
                function = _checked(row, False)
            compiled = torch.compile(_fresh(function), fullgraph=True, dynamic=False, **self.settings)
            # The key names the captured objects by identity: the entry keeps them alive, so no
            # other object can take their identity while it is cached. Not the captured tensors
            # (inputs of every call, keyed by kind): an η with a graph would keep the graph.
            setattr(compiled, "_metagrad_objects", template.objects() + self.module_structure(module)[1])
            return compiled

        try:
            compiled = _cached(key, build)
        except Exception as error:  # the closure's loss could not be traced
            self.refuse(key, template.key, error, first.rule)
            return None
        return key, compiled, explicit, fixed, varied


def _refuse_held_tensors(graph: torch.fx.GraphModule, keyed: list[Any]) -> None:
    """Raise where the traced loss holds a tensor it did not take as an input and that the cache
    key does not name (``keyed``: the module's plain tensor attributes its forwards read, by
    identity): one it reads through an object or a global of a function it calls (``cfg.mask``,
    a helper's ``MASK``), not captured by the closure itself. The compiled product would keep
    that tensor as it was traced, for every later block with the same key, whatever the name
    holds by then; a replay check cannot see it where it only scales a term whose η is zero.
    (A tensor the loss creates from a literal, ``torch.tensor(2.0)``, is a constant too, copied
    fresh at every call.)"""
    known = {id(t) for t in keyed if isinstance(t, torch.Tensor)}
    for node in graph.graph.nodes:
        constant = getattr(graph, str(node.target), None) if node.op == "get_attr" else None
        if not isinstance(constant, torch.Tensor) or id(constant) in known:
            continue
        if all(user.target is torch.ops.aten.lift_fresh_copy.default for user in node.users):
            continue
        raise ValueError(
            "the closure reads a tensor that is not among its inputs (through an object's attribute or a "
            "global of a function it calls), which a compiled step product would keep as it was traced; "
            "capture the tensor in the closure itself (mask = self.mask; meta.step(lambda f: ... mask ...))")


def _segment(row: Callable[..., tuple[Any, ...]], length: int, varying: tuple[int, ...],
             varied: tuple[int, ...]) -> Callable[..., tuple[Any, ...]]:
    """A function that pulls a vector back through ``length`` consecutive steps with ``row`` (one
    step's VJP), the last step first, as one traced graph: its inputs are the steps' iterates
    (and the stored iterate after the last step: ``length + 1`` rows), state leaves and captured
    tensors (those at ``varying``) stacked along a new first dimension; it returns the vector
    pulled back, the η products summed, the carried state's adjoint, and for the replay check
    each step's :func:`~metagrad.replay.step_norms` (its rebuilt Φ(φ) against the stored next
    iterate, computed in the same call) and loss, and each explicit η's ∂ℓ/∂η (stacked, in step order)."""
    def segment(params: dict[str, torch.Tensor], leaves: list[torch.Tensor], vector: dict[str, torch.Tensor],
                moving_adjoint: list[torch.Tensor], captured: list[torch.Tensor], fixed: dict[str, torch.Tensor],
                eta: list[torch.Tensor], rule_values: list[torch.Tensor]) -> tuple[Any, ...]:
        news: list[dict[str, torch.Tensor]] = []
        values: list[torch.Tensor] = []
        eta_grads: list[list[torch.Tensor]] = []
        total: Optional[list[torch.Tensor]] = None
        for i in reversed(range(length)):
            state = [t[i] for t in leaves]
            vector, pulled_eta, moving_adjoint, new, value, _, step_eta = row(
                {n: t[i] for n, t in params.items()}, [state[j] for j in varied], vector, moving_adjoint,
                [t[i] if j in varying else t for j, t in enumerate(captured)], fixed, eta, rule_values, state)
            total = list(pulled_eta) if total is None else [a + b for a, b in zip(total, pulled_eta)]
            news.insert(0, new)
            values.insert(0, value)
            eta_grads.insert(0, step_eta)
        norms = step_norms([torch.stack([q[n] for q in news]) for n in params], [t[1:] for t in params.values()],
                           [t[:-1] for t in params.values()])
        return (vector, total or [], moving_adjoint, norms, torch.stack(values),
                [torch.stack(column) for column in zip(*eta_grads)])
    return segment


def _checked(product: Callable[..., tuple[Any, ...]], batched: bool) -> Callable[..., tuple[Any, ...]]:
    """``product`` (one step's VJP, or its rows under ``vmap``) with the replay check's norms of
    its rebuilt ``Φ_m(φ_m)`` against the stored next iterates ``after`` (an extra input) in place
    of the rebuilt iterates: the check reads a few numbers back instead of the iterates."""
    def checked(params: dict[str, torch.Tensor], *inputs: Any) -> tuple[Any, ...]:
        *rest, after = inputs
        pulled, pulled_eta, pulled_state, new, value, grads, eta_grads = product(params, *rest)
        if batched:
            norms = step_norms([new[n] for n in params], [after[n] for n in params], [params[n] for n in params])
        else:
            norms = step_norms([[new[n]] for n in params], [[after[n]] for n in params], [[params[n]] for n in params])
        return pulled, pulled_eta, pulled_state, norms, value, grads, eta_grads
    return checked


def _module_tensors(module: torch.nn.Module, fixed_names: tuple[str, ...], buffer_names: tuple[str, ...]
                    ) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    return {**{n: params[n].detach() for n in fixed_names}, **{n: buffers[n] for n in buffer_names}}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
