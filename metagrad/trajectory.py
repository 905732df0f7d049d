"""The stored inner trajectory, and the products estimators compute with it.

During the inner loop the trajectory keeps, for each step k, the iterate φ_k, the
update rule's state, the step's loss, and the closure that gave it, frozen with the values
it captured at the step and, if it drew random numbers, the generator states it started
from (:mod:`metagrad.replay`). It keeps no graph, except for the Full estimator, whose inner
loop is itself differentiable (MATH.md, "Dynamic graph management"). Every step rebuilt for
a product is checked against the stored next iterate (MATH.md, "Replaying a step").

With snapshots (:mod:`metagrad.snapshots`) the iterates are stored only at a thinned schedule;
:meth:`Trajectory.restore` recomputes the others forward from the snapshot before them when a
product needs them, and checks the recomputed steps the same way.

Estimators use two products, both with the step Jacobian ``J_m = ∂φ_{m+1}/∂φ_m``
(the optimizer state held constant, MATH.md "Optimizers other than plain gradient
descent"). For plain gradient descent ``J_mᵀ u = u − α H_m u``.

- :meth:`Trajectory.vjp` — one product, by a double backward through a step graph
  rebuilt at φ_m and freed on return. Sequential estimators use it.
- :meth:`Trajectory.batched_vjp` — many products in one ``torch.func.vmap`` call
  (``vjp`` of ``grad``), over stored iterates, at most ``chunk_size`` step graphs
  at a time. The binomial estimator's levels use it.

How a product is formed, measured (``python -m benchmarks.products``; a 2-core x86_64
CPU, 1 torch thread, torch 2.13.0, float32; time per product, B products per call):

============  ====  ===============  ===============  =====================
config        B     vmap(vjp∘grad)   vmap(jvp∘grad)   loop of double backward
============  ====  ===============  ===============  =====================
sinusoid MLP  20    0.13 ms          fails            0.62 ms
28×28 CNN4    20    12.8 ms          13.4 ms          13.1 ms
84×84 CNN4    4     1031 ms          979 ms           447 ms
============  ====  ===============  ===============  =====================

Reverse-over-reverse (``vjp`` of ``grad``, a double backward) is kept on every device:
forward-over-reverse (``jvp`` of ``grad``) was within 5% of it on the CPU where it ran,
used 1.2–1.4× its memory, and fails under ``vmap`` on ``F.mse_loss`` in this torch
("ZeroTensors are immutable"). It has not been measured on a GPU (``benchmarks/gpu.sh``
includes the comparison). Batching with ``vmap`` pays on the CPU for small models (4.8×
faster than a loop on the MLP), breaks even at 28×28 and loses on large ones (2.3× slower
at 84×84, with 2.5× the memory): there, ``Binomial(chunk_size=1)`` computes one plain double
backward at a time.

A product needs the gradient's graph at φ_m. The inner loop's own gradient has none (that
is what keeps its memory at iterates only), so each product rebuilds it: there is no
gradient to reuse in an exact product.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
from collections.abc import Callable, Iterator, Sequence
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.utils import _pytree as pytree

from .fmodel import FunctionalModel, Layout
from .optim import Params, State, UpdateRule
from .replay import Frozen, RandomState, ReplayError, check_losses, check_step, freeze, refuse_twice
from .snapshots import Schedule

if TYPE_CHECKING:  # pragma: no cover
    from .compiled import Compiler

__all__ = ["Trajectory", "Closure", "Lifetime", "NestedBlockError", "differentiated_twice", "second_order"]

Closure = Callable[[FunctionalModel], torch.Tensor]
#: One entry per meta-parameter η (:attr:`Trajectory.meta`): its gradient, or ``None`` for zero.
MetaGrads = list[Optional[torch.Tensor]]

#: Rebuilt steps whose replay checks are queued before they run together (:meth:`Trajectory.verify`).
_CHECK_BATCH = 16


_nesting = threading.local()


class NestedBlockError(ValueError):
    """A ``MetaGradient`` block nested in an outer block's inner step cannot give what the
    outer estimator needs there (its estimator, or a ``torch.func`` transform around it)."""


@contextlib.contextmanager
def differentiated_twice(active: bool = True) -> Iterator[None]:
    """Mark the code run inside as an inner step whose graph will be differentiated twice (a
    differentiable inner loop's step, a step rebuilt for a product): a ``MetaGradient`` block
    opened there (a nested block, MATH.md's meta-meta-gradient) must give a gradient that can
    itself be differentiated (:func:`second_order`). Per thread; ``active=False`` marks nothing."""
    if not active:
        yield
        return
    _nesting.depth = getattr(_nesting, "depth", 0) + 1
    try:
        yield
    finally:
        _nesting.depth -= 1


def second_order() -> bool:
    """Whether this thread is inside an inner step that will be differentiated twice
    (:func:`differentiated_twice`)."""
    return getattr(_nesting, "depth", 0) > 0


@dataclass
class Lifetime:
    """Where a trajectory is in its life, as its ``MetaGradient`` block and the
    backward passes of queries built from it see it."""

    released: bool = False
    #: The ``MetaGradient`` block has ended (a later backward releases the trajectory).
    block_ended: bool = False
    #: Backward passes that have reached the inner loop.
    backward_calls: int = 0
    #: The autograd graph tasks whose backward went through the block's node (the query's).
    tasks: set[int] = dataclasses.field(default_factory=set)

    def check(self) -> None:
        """Raise if the trajectory was released."""
        if self.released:
            raise RuntimeError(
                "the stored inner trajectory was released: its MetaGradient block raised an "
                "exception, or the block ended and a backward pass through it has already run. "
                "Call .backward() on the query loss inside the block."
            )


@dataclass
class _Seen:
    """What the first step of a closure (by :attr:`~metagrad.replay.Frozen.key`) showed; its
    later steps take their gradient by a compiled call (``compile=True``) unless ``once``
    or ``random``."""

    #: Its loss came through a node whose backward cannot be differentiated again (a
    #: ``torch.compile``'d function, an ``@once_differentiable`` autograd.Function): which one.
    once: Optional[str]
    #: The fast weights its loss uses.
    used: tuple[str, ...]
    #: A step of it drew random numbers (its replay must be eager).
    random: bool = False


@dataclass
class _Step:
    """What rebuilds inner step k: the iterate it starts from, the state, and either the
    closure, frozen at the step (the step graph is rebuilt on demand), or the step's kept
    graph."""

    params: Params
    state: State
    closure: Optional[Frozen]
    #: The update rule this step used (the trajectory's, unless a step was given its own).
    rule: UpdateRule
    #: The names of the fast weights the step's loss depends on; the others were left as
    #: they were (the update rule skips a parameter without a gradient).
    used: tuple[str, ...] = ()
    #: The step's loss, detached, as recorded (for the replay check).
    loss: Optional[torch.Tensor] = None
    #: The generator states the closure started from, if it drew random numbers.
    rng: Optional[RandomState] = None
    #: The loss came through a node that cannot be differentiated twice: which one, or ``None``.
    once: Optional[str] = None
    #: ``training`` of every submodule when the step was taken (dropout, BatchNorm's mode).
    modes: tuple[bool, ...] = ()
    #: The autocast dtype the step ran under on the model's device type, or ``None``.
    autocast: Optional[torch.dtype] = None
    #: For a step taken from a given loss (:meth:`Trajectory.advance_from_loss`): the
    #: tensors the loss was built from and its gradient, built with ``create_graph=True``.
    graph: Optional[tuple[Params, Params]] = None

    def batch_key(self) -> Optional[tuple[Any, ...]]:
        """Steps with equal keys can be rebuilt in one vmapped call; ``None``: only alone."""
        if self.graph is not None or self.rng is not None or self.closure is None:
            return None
        return (self.closure.key, id(self.rule), self.used, self.modes, self.autocast)


class Trajectory:
    """Iterates ``φ_0 … φ_K`` of one inner loop and the means to rebuild each step.

    Args:
        module: the user's module; evaluated functionally, never modified.
        theta: the initialization θ, name→tensor. For a differentiable trajectory these
            are leaf tensors that require grad; otherwise detached values.
        rule: the inner update rule.
        differentiable: build each step with ``create_graph=True`` (Full).
        keep: how many of the most recent steps to keep for rebuilding; ``None`` keeps
            all. The current iterate, and the last step's closure, are always kept.
        proximal: λ of a proximal term ``(λ/2)‖φ − θ‖²`` added to every inner step's loss
            (the Implicit estimator's inner problem), or ``None``.
        check_finite: raise if an inner loss is NaN or infinite.
        replay_rtol: the relative tolerance of the replay check (:func:`metagrad.replay.check_step`)
            every rebuilt step passes, or ``None`` for no check.
        compiler: computes inner gradients and step products by compiled calls where it can
            (:mod:`metagrad.compiled`), or ``None`` for eager.
        snapshots: store the iterates (with their optimizer states) only at the snapshots of
            this schedule (:mod:`metagrad.snapshots`), and recompute the others when a product
            needs them (:meth:`restore`); ``None`` stores every iterate. Every step's closure,
            generator states and loss are kept either way.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        theta: Params,
        rule: UpdateRule,
        *,
        differentiable: bool,
        keep: Optional[int],
        proximal: Optional[float] = None,
        check_finite: bool = True,
        replay_rtol: Optional[float] = None,
        compiler: Optional["Compiler"] = None,
        snapshots: Optional[Schedule] = None,
    ) -> None:
        if snapshots is not None and (differentiable or keep is not None):
            raise ValueError("snapshots: a differentiable trajectory, or one that keeps only its last "
                             f"steps (keep={keep!r}), stores no snapshots; got {snapshots!r}.")
        self.module = module
        self.theta = theta
        self.rule = rule
        self.differentiable = differentiable
        self.keep = keep
        self.proximal = proximal
        self.check_finite = check_finite
        self.replay_rtol = replay_rtol
        self.compiler = compiler
        self._steps: dict[int, _Step] = {}
        self._length = 0
        #: The last step taken, kept whatever ``keep`` is (Implicit's Hessian is its loss at φ_K).
        self._last: Optional[_Step] = None
        self._submodules = list(module.modules())
        self._current: Params = dict(theta)
        self._state: State = rule.init(theta)
        self.lifetime = Lifetime()
        self.layout = Layout.of(module)
        self._device = next(iter(theta.values())).device if theta else torch.device("cpu")
        #: The names of the fast weights that some inner step's loss depended on.
        self.used: set[str] = set()
        #: Per closure key: what its first step showed (:class:`_Seen`; the graph is looked at once).
        self._seen: dict[Any, _Seen] = {}
        #: The meta-parameters η: every tensor besides the fast weights that requires grad and
        #: that an inner step depends on (see :meth:`_discover`), with a description of each.
        self.meta: list[torch.Tensor] = []
        self.meta_names: list[str] = []
        #: Which η come from the update rule (step sizes): their part of B_k needs no second
        #: derivative (MATH.md, "Meta-parameters other than θ").
        self.rule_meta: set[int] = set()
        self._meta_index: dict[int, int] = {}
        #: Each η leaf with its ``.grad`` when it was found (restored if the block raises).
        self.meta_saved_grads: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = []
        self._saved_ids: set[int] = set()
        #: Per update rule (by id, the rule kept): whether its update reaches η of its own, and
        #: the fast weights it has updated so far (a step that updates another one looks again:
        #: its step size may be a tensor that requires grad where the others' are not).
        self._rules_seen: dict[int, tuple[Any, bool, frozenset[str]]] = {}
        #: The update rule as the last step used it, and its hyperparameters then (:func:`_frozen_rule`).
        self._rule_now: Optional[tuple[Any, Any, tuple[Any, ...]]] = None
        #: Per step: the update's graph to the rule's η, with the gradient held constant.
        self._first_order: dict[int, Params] = {}
        self._param_names = {id(p): n for n, p in module.named_parameters()}
        #: θ's own Parameters, by id (a loss that reaches them was built from the module itself).
        self._theta_ids = {id(p) for n, p in module.named_parameters() if n in theta}
        self._pending: list[tuple[int, Params, torch.Tensor]] = []
        #: A product through a kept graph is being computed (see :meth:`vjp`).
        self.pulling = False
        # Snapshots (metagrad.snapshots): the schedule, its stride now, the steps whose iterate
        # is stored (sorted), those that stay stored whatever the stride, the steps whose
        # iterate is neither stored nor recomputed now, and the recomputed segments (first
        # step → the steps filled in).
        self._schedule = snapshots
        self._stride = 1 if snapshots is None else snapshots.stride
        self._stored: list[int] = []
        self._pinned: set[int] = set()
        self._absent: set[int] = set()
        self._restored: dict[int, list[int]] = {}
        #: Inner steps recomputed forward from a snapshot so far (:meth:`restore`).
        self.recomputed_steps = 0
        #: The bytes of the iterates and optimizer states held now, and the most held at once.
        self.iterate_bytes = 0
        self.peak_iterate_bytes = 0
        self._held = 0
        #: The most iterates held at once (stored and recomputed).
        self.peak_iterates = 0

    # ----------------------------------------------------------------- inner loop
    @property
    def length(self) -> int:
        """The number of inner steps taken, K."""
        return self._length

    @property
    def stored(self) -> int:
        """How many steps are stored for rebuilding (at most ``keep``)."""
        return len(self._steps)

    @property
    def stored_iterates(self) -> int:
        """How many iterates φ_k (k < K) are held now: every stored step's, or, with snapshots,
        the snapshots' and those recomputed for backward (:meth:`restore`)."""
        return self._held

    @property
    def current(self) -> Params:
        """The current fast weights φ_K (graph-carrying for a differentiable trajectory)."""
        return self._current

    def advance(self, closure: Closure, rule: Optional[UpdateRule] = None) -> torch.Tensor:
        """Take one inner step with ``closure``'s loss; return the loss, detached.

        ``rule`` replaces the trajectory's update rule for this step only (for adapters
        whose users change hyperparameters or transform gradients per step); it must use
        the same state as the trajectory's rule.

        Unless the trajectory is differentiable (nothing is rebuilt then), the closure is
        frozen with the values it captures now, and the generator states it starts from are
        kept if it draws random numbers (:mod:`metagrad.replay`).
        """
        self.check_alive()
        frozen: Optional[Frozen] = None
        rng: Optional[RandomState] = None
        if self.differentiable:
            # At step 0, aliases of θ (a view node each, no copy): the step's gradient is then
            # the partial derivative in φ, also where the inner loss reaches θ another way (an
            # η computed from θ; in a nested block, an outer block's fast weights that depend
            # on θ), as every other estimator's detached iterates give it.
            params = self._current if self.length else {n: t.view_as(t) for n, t in self._current.items()}
        else:
            params = {n: t.detach().requires_grad_() for n, t in self._current.items()}
            frozen = freeze(closure)
            rng = RandomState.capture(self._device)
        grads = None
        seen = None if frozen is None else self._seen.get(frozen.key)
        if self.compiler is not None and seen is not None and not seen.once and not seen.random:
            out = self.compiler.inner_grad(self, closure, frozen.key, params, seen.used)  # type: ignore[union-attr]
            if out is not None and rng is not None and rng.changed():
                # It drew random numbers inside compiled code, which an eager replay cannot
                # reproduce: the step is taken again eagerly, from the same generator states.
                seen.random = True
                rng.restore()
                out = None
            if out is not None:
                loss, grads = out
        if grads is None:
            with torch.enable_grad(), differentiated_twice(self.differentiable):
                loss = closure(self.model_at(params))
        if rng is not None and not rng.changed():
            rng = None
        loss = self._take_step(loss, params, closure=frozen, keep_graph=False, rule=rule, rng=rng,
                               grads=grads)
        return loss

    def advance_from_loss(self, loss: torch.Tensor, params: Params,
                          rule: Optional[UpdateRule] = None) -> torch.Tensor:
        """Take one inner step from a loss the caller built from ``params``, the current
        fast weights as the caller holds them (for adapters whose users pass a loss).

        No closure is known, so the step's graph cannot be rebuilt later: where the
        estimator needs products at this step, the gradient is taken with
        ``create_graph=True`` and kept, so memory grows like an unroll of forward graphs.
        """
        self.check_alive()
        keep_graph = not self.differentiable and (self.keep is None or self.keep > 0)
        return self._take_step(loss, params, closure=None, keep_graph=keep_graph, rule=rule)

    def _take_step(self, loss: Any, params: Params, *, closure: Optional[Frozen],
                   keep_graph: bool, rule: Optional[UpdateRule],
                   rng: Optional[RandomState] = None, grads: Optional[Params] = None) -> torch.Tensor:
        k = self.length
        rule = self._frozen_rule(self.rule if rule is None else rule)
        with torch.enable_grad():
            loss = _checked_loss(loss, k)
            if self.check_finite and not math.isfinite(loss.item()):
                raise FloatingPointError(
                    f"closure: the inner loss at step {k} is {loss.item()}. metagrad stops here "
                    "rather than propagate non-finite fast weights; lower the step size or check "
                    "the data. Pass check_finite=False to MetaGradient to let it propagate."
                )
            if grads is None:  # (given: computed by a compiled call)
                grads = _grads(loss, params, create_graph=self.differentiable or keep_graph, step=k,
                               theta=self._theta_ids)
        graph = (params, grads) if keep_graph else None
        inputs = params  # the tensors the loss was built from (the step's fast weights)
        if not self.differentiable:
            params = {n: t.detach() for n, t in params.items()}
            grads = {n: g.detach() for n, g in grads.items()}
        used = tuple(grads)
        # Whether the rule holds η of its own, once known for every fast weight this step updates.
        seen_rule = self._rules_seen.get(id(rule))
        rule_meta = None if seen_rule is None or not seen_rule[2].issuperset(used) else seen_rule[1]
        new_params, new_state = self._update(rule, params, grads, self._state, rule_meta)
        self.used.update(used)
        modes = self._modes()
        autocast = _autocast_dtype(self._device.type)
        once: Optional[str] = None
        if self.differentiable:  # autograd differentiates this step's graph twice, now or later
            # The step's own graph, not behind the fast weights (their graph is the earlier steps').
            stop: dict[int, list[torch.Tensor]] = {id(t.grad_fn): [] for t in inputs.values()
                                                   if t.grad_fn is not None}
            found, once = _graph_inputs([loss], {id(t) for t in inputs.values()}, stop)
            if once is not None:
                refuse_twice(k, once)
            # η is autograd's to follow here; their .grad is restored if the block raises.
            self._remember_grads(found + [t for t in pytree.tree_leaves(getattr(rule, "__dict__", {}))
                                          if isinstance(t, torch.Tensor) and t.requires_grad])
        else:
            seen = None if closure is None else self._seen.get(closure.key)
            if seen is None:
                once = self._discover(loss, inputs, closure)
                if closure is not None:
                    seen = self._seen[closure.key] = _Seen(once=once, used=used)
            if seen is not None:
                once = seen.once
                seen.random = seen.random or rng is not None
            if rule_meta is None:  # a new rule, or fast weights it has not updated before
                found = any(t.requires_grad for t in new_params.values())
                if found:
                    self._add_meta(_graph_inputs(list(new_params.values()), set(), {})[0],
                                   rule=True, names=_step_size_names(rule))
                before = (False, frozenset()) if seen_rule is None else seen_rule[1:]
                rule_meta = found or before[0]
                # The rule is kept: its id stays its own.
                self._rules_seen[id(rule)] = (rule, rule_meta, before[1] | frozenset(used))
            if rule_meta:
                self._first_order[k] = new_params
                new_params, new_state = _detached(new_params, new_state)
        step = _Step(params=self._current,  # detached unless differentiable
                     state=self._state, closure=closure, rule=rule, used=used,
                     loss=loss.detach(), rng=rng, once=once, modes=modes,
                     autocast=autocast, graph=graph)
        if self.keep is None or self.keep > 0:
            self._steps[k] = step
            self._hold(step, +1)
            if self.keep is not None:
                dropped = self._steps.pop(k - self.keep, None)
                if dropped is not None:
                    self._hold(dropped, -1)
            self._last = step
            if self._schedule is not None:
                self._thin(k, step)
        else:  # nothing is stored: keep how the step ran, not its iterate
            self._last = dataclasses.replace(step, params={}, state={}, graph=None)
        self._length += 1
        self._current, self._state = new_params, new_state
        return loss.detach()

    def _frozen_rule(self, rule: UpdateRule) -> UpdateRule:
        """``rule`` as it is now, for this step and for every rebuild of it: the last step's
        frozen copy while the hyperparameters are unchanged, else a new shallow copy whose
        tensors that do not require grad are cloned. A schedule that sets ``rule.lr`` between
        steps (or changes an lr tensor in place) then rebuilds each step with the step size it
        was taken with, as closures are frozen with the values they capture. A tensor that
        requires grad (a learned step size, η) is kept as it is."""
        values = _hyperparameters(rule)
        last = self._rule_now
        if last is not None and last[0] is rule and last[2] == values:
            return last[1]
        frozen = rule
        if values:
            # A shallow copy: attributes are the same objects (compiled calls, keyed on them,
            # are found again), except a value holding a constant tensor, which is cloned.
            frozen = copy.copy(rule)
            for attribute, value in vars(rule).items():
                if any(isinstance(leaf, torch.Tensor) and not leaf.requires_grad
                       for leaf in pytree.tree_leaves(value)):
                    setattr(frozen, attribute, pytree.tree_map(_clone_constant, value))
        self._rule_now = (rule, frozen, values)
        return frozen

    def _update(self, rule: UpdateRule, params: Params, grads: Params, state: State,
                rule_meta: Optional[bool]) -> tuple[Params, State]:
        """One update of the rule, with the proximal term's gradient ``λ(φ − θ)`` added (the
        Implicit estimator's inner problem). It runs with grad enabled where the rule may hold
        η of its own (a step size that requires grad; ``rule_meta`` not known yet, or true):
        its inputs are detached, so the graph reaches only those. A rule seen before without
        any runs without."""
        with torch.set_grad_enabled(self.differentiable or rule_meta is not False):
            if self.proximal is not None:  # the gradient of (λ/2)‖φ − θ‖²
                grads = {n: g + self.proximal * (params[n] - self.theta[n]) for n, g in grads.items()}
            return rule.step(params, grads, state)

    # ------------------------------------------------------------------ snapshots
    def _hold(self, step: _Step, sign: int) -> None:
        """Count step's iterate and state in (``sign=+1``) or out (``-1``) of what is held."""
        self._held += sign
        self.iterate_bytes += sign * _nbytes(step.params, step.state)
        self.peak_iterates = max(self.peak_iterates, self._held)
        self.peak_iterate_bytes = max(self.peak_iterate_bytes, self.iterate_bytes)

    def _drop(self, m: int) -> None:
        """Free step m's iterate, state and step-size graph (closure and loss stay)."""
        step = self._steps[m]
        self._hold(step, -1)
        step.params, step.state = {}, {}
        self._first_order.pop(m, None)
        self._absent.add(m)

    def _thin(self, k: int, step: _Step) -> None:
        """Online uniform thinning (metagrad.snapshots): keep φ_k if k is a multiple of the
        stride, then double the stride while more snapshots are stored than the schedule
        allows. A step taken from a given loss, and the step after it, stay stored: its graph
        was kept, not its closure, so it cannot be recomputed."""
        assert self._schedule is not None
        if k == 0:
            self._schedule = self._schedule.for_bytes(_nbytes(step.params, step.state))
        if step.graph is not None or (k > 0 and self._steps[k - 1].graph is not None):
            self._pinned.add(k)
        if k % self._stride and k not in self._pinned:
            self._drop(k)
            return
        self._stored.append(k)
        while len(self._stored) - len(self._pinned) > self._schedule.limit(self._stride):
            self._stride *= 2
            for m in self._stored:
                if m % self._stride and m not in self._pinned:
                    self._drop(m)
            self._stored = [m for m in self._stored if m not in self._absent]

    def restore(self, first: int, last: int) -> None:
        """Make the iterates φ_first … φ_last (and their optimizer states) available, for the
        products an estimator is about to take there.

        With snapshots (:mod:`metagrad.snapshots`), each segment between two stored iterates
        that holds one of them is recomputed forward from its snapshot (:meth:`_recompute`),
        unless it is already; segments recomputed before that hold none of them are freed
        first, after their queued replay checks ran. Estimators that sweep backwards in time
        recompute every segment once. :meth:`vjp` and :meth:`iterate` call this for a step
        whose iterate is missing; :meth:`batched_vjp` for the steps of its call. Without
        snapshots it does nothing."""
        if self._schedule is None or not self._absent:
            return
        first, last = max(first, 0), min(last, self.length - 1)
        needed = []
        for i, start in enumerate(self._stored):
            end = self._stored[i + 1] if i + 1 < len(self._stored) else self.length
            if max(start + 1, first) <= min(end - 1, last):  # an iterate of the window inside
                needed.append((start, end))
        for start in [s for s in self._restored if s not in dict(needed)]:
            self.verify()  # its replay checks compare with the iterates about to be freed
            for m in self._restored.pop(start):
                self._drop(m)
        for start, end in needed:
            if start not in self._restored:
                self._recompute(start, end)

    def forget(self) -> None:
        """Free every recomputed iterate (after the queued replay checks): the end of a backward."""
        self.verify()
        for start in list(self._restored):
            for m in self._restored.pop(start):
                self._drop(m)

    def _recompute(self, start: int, end: int) -> None:
        """Run the inner steps start … end−1 again from the snapshot φ_start, as they were
        taken: the frozen closure, the generator states replayed, modes and autocast as they
        were (:meth:`_rebuild` without ``create_graph``: only the gradient is needed), the same
        update rule and state. The iterates between are filled in; so are the step-size graphs
        the inner loop kept (:meth:`vjp` with ``second_order=False``).

        The replay check (MATH.md, "Replaying a step"): every recomputed loss must equal the
        recorded one, and the recomputed φ_end the stored one (the next snapshot, or φ_K): only
        that iterate was stored, and a step that changed since it was taken moves it."""
        params, state = self._steps[start].params, self._steps[start].state
        filled, losses = [], []
        for m in range(start, end):
            step = self._steps[m]
            if m > start:
                step.params, step.state = params, state
                self._absent.discard(m)
                self._hold(step, +1)
                filled.append(m)
            leaves = {n: t.detach().requires_grad_() for n, t in params.items()}
            with torch.enable_grad():
                loss, grads = self._rebuild(m, step, leaves, create_graph=False)
            losses.append(loss.detach())
            rule_meta = self._rules_seen[id(step.rule)][1]
            new_params, new_state = self._update(step.rule, params, grads, state, rule_meta)
            if rule_meta:
                if m not in self._first_order:  # a snapshot keeps the inner loop's own
                    self._first_order[m] = new_params
                new_params, new_state = _detached(new_params, new_state)
            params, state = new_params, new_state
        self._restored[start] = filled
        self.recomputed_steps += end - start
        if self.replay_rtol is None:
            return
        steps = list(range(start, end))
        closures = [self._steps[m].closure for m in steps]
        check_losses(steps, torch.stack(losses), torch.stack([self._steps[m].loss for m in steps]),  # type: ignore[misc]
                     self.replay_rtol, closures=closures, recomputed_from=start)
        names = list(self.theta)
        stored, before = self.iterate(end), self.iterate(end - 1)
        check_step([end - 1], [params[n].unsqueeze(0) for n in names], [stored[n].unsqueeze(0) for n in names],
                   [before[n].unsqueeze(0) for n in names], self.replay_rtol, closures=closures[-1:],
                   recomputed_from=start)

    def storage(self) -> dict[str, int]:
        """What a backward reports about storage (``meta.info``): the iterates stored now, the
        steps recomputed so far, and the most iterates (and bytes, with optimizer states) held
        at once."""
        return {"stored_iterates": self.stored_iterates, "recomputed_steps": self.recomputed_steps,
                "peak_iterates": self.peak_iterates, "peak_iterate_bytes": self.peak_iterate_bytes}

    def _discover(self, loss: torch.Tensor, params: Params, closure: Optional[Frozen]) -> Optional[str]:
        """Add the η the step's loss depends on to :attr:`meta`; return the node on the loss's
        graph whose backward cannot be differentiated again (``None``: none).

        The rule: η is every tensor that requires grad, other than the fast weights, that the
        loss's graph reaches. A tensor the closure captures (a cell, a global, a default) is
        taken as it is, even when it is itself computed (``w = hypernet(z)``: the gradient then
        reaches ``hypernet`` through ``w``'s own graph); anything else is found as the leaf the
        graph ends at (a module parameter not adapted, a parameter of a module the closure
        calls). The graph is looked at once per closure key (its code, and the objects and
        tensor shapes it captures, tensors that require grad by identity).
        """
        names = {id(p): n for n, p in self.module.named_parameters()}
        stop: dict[int, list[torch.Tensor]] = {}
        if closure is not None:
            for slot, tensor in closure.tensors:
                names.setdefault(id(tensor), f"{closure.names[slot]} (captured by the closure)")
                if tensor.requires_grad and tensor.grad_fn is not None:
                    stop.setdefault(id(tensor.grad_fn), []).append(tensor)
        for t in params.values():  # fast weights that are themselves computed (adapters)
            if t.grad_fn is not None:
                stop.setdefault(id(t.grad_fn), [])
        found, once = _graph_inputs([loss], {id(t) for t in params.values()}, stop)
        self._add_meta(found, rule=False, names=names)
        return once

    def _add_meta(self, tensors: list[torch.Tensor], *, rule: bool, names: dict[int, str]) -> None:
        for tensor in tensors:
            if id(tensor) in self._meta_index:
                continue
            self._meta_index[id(tensor)] = len(self.meta)
            if rule:
                self.rule_meta.add(len(self.meta))
            self.meta.append(tensor)
            self._remember_grads([tensor])
            default = f"a tensor of shape {tuple(tensor.shape)}" + (" (update rule)" if rule else "")
            self.meta_names.append(names.get(id(tensor), default))

    def _remember_grads(self, tensors: list[torch.Tensor]) -> None:
        """Keep the ``.grad`` of the leaves a backward through ``tensors`` writes (each tensor,
        or the leaves behind a computed one, such as a hypernetwork's parameters) as it is
        now, the first time each is seen: :attr:`meta_saved_grads`, restored if the block raises."""
        for tensor in tensors:
            behind = [tensor] if tensor.is_leaf else _graph_inputs([tensor], set(), {})[0]
            for leaf in behind:
                if id(leaf) not in self._saved_ids:
                    self._saved_ids.add(id(leaf))
                    self.meta_saved_grads.append((leaf, None if leaf.grad is None else leaf.grad.clone()))

    def model_at(self, params: Params, fixed: Optional[Params] = None) -> FunctionalModel:
        """The module evaluated at the fast weights ``params`` (and, under torch.func, with
        ``fixed`` in place of parameters that are not fast weights)."""
        return FunctionalModel(self.module, params, layout=self.layout, fixed=fixed)

    def iterate(self, k: int) -> Params:
        """The fast weights φ_k after k steps (k = K is the current iterate)."""
        self.check_alive()
        if k == self.length:
            return self._current
        return self._step(k).params

    # ------------------------------------------------------------------- products
    def _rebuild(self, m: int, step: _Step, params: Params, *, create_graph: bool = True
                 ) -> tuple[torch.Tensor, Params]:
        """Step m's loss and gradient at ``params`` (leaves that require grad), with the
        gradient's graph (``create_graph=True``; without it, for a step recomputed forward),
        from the frozen closure and, if the step drew random numbers, the generator states it
        drew them from."""
        assert step.closure is not None
        if step.once and create_graph:
            refuse_twice(m, step.once)
        try:
            with self._as_taken(step.rng, step.modes, step.autocast), differentiated_twice(create_graph):
                loss = step.closure(self.model_at(params))
        except NestedBlockError:
            raise
        except Exception as error:
            self.verify()  # a mismatch found earlier says more
            raise ReplayError(
                f"closure: rebuilt during backward at inner step {m}, it raised {type(error).__name__}: "
                f"{error}. It ran at that step in the inner loop, so it reads something that has "
                "changed since (an iterator read with next() inside the closure is exhausted, an "
                "object's state moved on). Compute each step's data outside the closure and capture "
                "it, or use estimator=mg.Full(), which does not rebuild steps."
            ) from error
        return loss, _grads(loss, params, create_graph=create_graph, step=m, used=step.used)

    def _modes(self) -> tuple[bool, ...]:
        """``training`` of every submodule now; the previous step's tuple when unchanged."""
        modes = tuple(sub.training for sub in self._submodules)
        return self._last.modes if self._last is not None and modes == self._last.modes else modes

    @contextlib.contextmanager
    def _as_taken(self, rng: Optional[RandomState], modes: tuple[bool, ...],
                  autocast: Optional[torch.dtype] = None) -> Iterator[None]:
        """Run a rebuild as its step ran: the random generators from the states the step drew
        from, every submodule in the mode (train or eval) it was in, and autocast as it was
        (mixed precision set around the inner loop). All are put back."""
        now = tuple(sub.training for sub in self._submodules)
        changed = bool(modes) and modes != now
        if changed:
            for sub, mode in zip(self._submodules, modes):
                sub.training = mode
        device_type = self._device.type
        precision = (contextlib.nullcontext() if autocast == _autocast_dtype(device_type) else
                     torch.autocast(device_type, dtype=autocast, enabled=autocast is not None))
        try:
            with rng.replay() if rng is not None else contextlib.nullcontext(), precision:
                yield
        finally:
            if changed:
                for sub, mode in zip(self._submodules, now):
                    sub.training = mode

    def _check(self, m: int, rebuilt: Params, loss: torch.Tensor) -> None:
        """Queue the replay check of step m (the rebuilt ``Φ_m(φ_m)`` against the stored
        ``φ_{m+1}``); :meth:`verify` runs the queue, and so does every 16th entry. Checking
        steps together costs a few batched calls instead of a few calls per tensor per step."""
        if self.replay_rtol is None:
            return
        self._pending.append((m, {n: t.detach() for n, t in rebuilt.items()}, loss.detach()))
        if len(self._pending) >= _CHECK_BATCH:
            self.verify()

    def verify(self) -> None:
        """Run the queued replay checks; raise :class:`~metagrad.ReplayError` on a mismatch.

        Callers of :meth:`vjp` call it before they hand out a result (the context manager does,
        after every estimator's backward)."""
        pending, self._pending = self._pending, []
        if not pending or self.replay_rtol is None:
            return
        names = list(self.theta)
        steps = [m for m, _, _ in pending]
        nexts = [self.iterate(m + 1) for m in steps]
        starts = [self._step(m).params for m in steps]
        recorded = [self._step(m).loss for m in steps]
        check_step(steps, [torch.stack([r[n] for _, r, _ in pending]) for n in names],
                   [torch.stack([t[n] for t in nexts]) for n in names],
                   [torch.stack([t[n] for t in starts]) for n in names], self.replay_rtol,
                   losses=(torch.stack([loss for _, _, loss in pending]), torch.stack(recorded)),  # type: ignore[arg-type]
                   closures=[self._step(m).closure for m in steps])

    def vjp(self, m: int, u: Params, state_adjoint: Optional[list[Optional[torch.Tensor]]] = None,
            *, second_order: bool = True
            ) -> tuple[Params, MetaGrads, Optional[list[Optional[torch.Tensor]]]]:
        """The primitive every estimator composes: pull ``u`` back through step m, with respect
        to the step's input φ_m and to the meta-parameters η (:attr:`meta`).

        Returns ``(J_mᵀ u, B_mᵀ u, state adjoint)`` with ``J_m = ∂φ_{m+1}/∂φ_m`` and ``B_m =
        ∂φ_{m+1}/∂η`` (MATH.md (3)), by a double backward through the step's graph, rebuilt
        at φ_m (or kept, for a step taken from a given loss); ``B_mᵀ u`` lists one entry per η,
        ``None`` for zero.

        - Without ``state_adjoint`` the optimizer state is held constant. With it: the
          vector-Jacobian product of the whole step ``(φ_m, s_m) ↦ (φ_{m+1}, s_{m+1})``
          applied to ``(u, state_adjoint)``, and the adjoint of s_m is returned third.
          ``state_adjoint`` lists one adjoint per leaf of the flattened state
          (``torch.utils._pytree``), ``None`` or missing for zero; ``[]`` starts from zero.
        - ``second_order=False``: the step with its gradient held constant (MATH.md's table,
          the earlier steps of Truncated, FirstOrder): ``(u, the step-size part of B_mᵀ u,
          None)``, from the update's graph to the rule's η that the inner loop kept; no
          graph is rebuilt.

        A rebuilt step passes the replay check (:meth:`_check`).
        """
        meta = self.meta
        if not second_order:
            if m in self._absent:  # its step-size graph is recomputed with its iterate
                self.restore(m, m)
            kept = self._first_order.get(m)
            # Only the updates that depend on a step size carry a graph (a float step size,
            # or a parameter without a gradient, leaves its update constant).
            names = [] if kept is None else [n for n in kept if kept[n].requires_grad]
            if not names or not meta:
                return dict(u), [None] * len(meta), None
            with torch.enable_grad():
                grads = torch.autograd.grad([kept[n] for n in names], meta, [u[n] for n in names],
                                            allow_unused=True, retain_graph=True)
            return dict(u), list(grads), None
        step = self._step(m)
        carry = state_adjoint is not None
        if self.compiler is not None and step.graph is None and step.rng is None and not step.once:
            out = self.compiler.product(self, [m], [step], u, step.state, state_adjoint, batched=False)
            if out is not None:
                pulled, pulled_eta, adjoint, rebuilt, loss, explicit = out
                self._check(m, rebuilt, loss)
                meta_grads: MetaGrads = [None] * len(meta)
                for k, i in enumerate(explicit):
                    meta_grads[i] = pulled_eta[k]
                if self.rule_meta:  # a step size's part: the update the inner loop kept
                    meta_grads = add_meta(meta_grads, self.vjp(m, u, second_order=False)[1])
                return pulled, meta_grads, adjoint
        with torch.enable_grad():
            if step.graph is not None:
                params, grads = step.graph
                loss = None
            else:
                params = {n: t.detach().requires_grad_() for n, t in step.params.items()}
                loss, grads = self._rebuild(m, step, params)
            leaves, spec = pytree.tree_flatten(step.state)
            varied = [i for i, t in enumerate(leaves)
                      if carry and isinstance(t, torch.Tensor) and t.is_floating_point()]
            leaves = [t.detach().requires_grad_() if i in varied else t for i, t in enumerate(leaves)]
            new_params, new_state = step.rule.step(params, grads, pytree.tree_unflatten(leaves, spec))
            if loss is not None:
                self._check(m, new_params, loss)
            outputs = [new_params[n] for n in params]
            cotangents = [u[n] for n in params]
            if carry:
                for leaf, adjoint in zip(pytree.tree_leaves(new_state), state_adjoint or []):
                    if adjoint is not None and isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                        outputs.append(leaf)
                        cotangents.append(adjoint)
            inputs = list(params.values()) + [leaves[i] for i in varied] + meta
            # η may be reached through graphs of the user's (w = hypernet(z)): keep them. A
            # kept graph's fast weights are themselves computed from θ and η (the estimator's
            # node of an earlier step): with `pulling` set, that node passes nothing back, so
            # B_m holds φ_m fixed as it must.
            self.pulling = step.graph is not None
            try:
                out = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True,
                                          retain_graph=step.graph is not None or bool(meta))
            finally:
                self.pulling = False
        pulled = {n: _zero_if_none(g, params[n]) for n, g in zip(params, out)}
        meta_grads = list(out[len(out) - len(meta):]) if meta else []
        if not carry:
            return pulled, meta_grads, None
        adjoint_out: list[Optional[torch.Tensor]] = [None] * len(leaves)
        for i, g in zip(varied, out[len(params):len(params) + len(varied)]):
            adjoint_out[i] = g
        return pulled, meta_grads, adjoint_out

    def batched_vjp(self, steps: Sequence[int], vectors: Params,
                    chunk_size: Optional[int] = None) -> tuple[Params, MetaGrads]:
        """:meth:`vjp` for many steps at once: ``J_mᵀ u_i`` for each ``m = steps[i]`` and row
        ``u_i`` of ``vectors``, and ``Σ_i B_mᵀ u_i`` (one entry per η, ``None`` for zero).

        ``vectors`` maps each name to a tensor with a leading dimension of
        ``len(steps)``; the result has the same layout. Steps are batched with
        ``torch.func.vmap`` in chunks of at most ``chunk_size`` (``None``: all at once).
        Consecutive steps whose frozen closures differ at most in the tensors they capture
        (equal :attr:`~metagrad.replay.Frozen.key`), with the same rule, go into one call; the
        tensors that differ become batched inputs. A step that drew random numbers, or was
        taken from a given loss, is computed alone, and so is a chunk of one step, as a plain
        double backward (:meth:`vjp`): on a 2-core x86_64 CPU (AMD EPYC), torch 2.13.0, at
        84×84, a vmapped call of one product took 2.3× the time and 1.4× the memory of one.
        Every rebuilt step passes the replay check. Meta-parameters η that the closure captures,
        or module parameters not adapted, are explicit inputs of the vmapped call, and a step
        size's part comes from the update the inner loop kept; an η found elsewhere (behind an
        object the closure calls) can only be followed by autograd, and then every product is
        computed alone.
        """
        rows = len(steps)
        if rows:  # the iterates of these steps, and the next one for the replay check
            self.restore(min(steps), max(steps) + 1)
        size = rows if chunk_size is None else chunk_size
        pieces: list[Params] = []
        meta_sum: MetaGrads = [None] * len(self.meta)
        start = 0
        while start < rows:
            first_step = self._step(steps[start])
            key = first_step.batch_key() if not self.meta or self._explicit_meta(first_step) else None
            stop = start + 1
            while (key is not None and stop < rows and stop - start < size
                   and self._step(steps[stop]).batch_key() == key):
                stop += 1
            chunk = [self._step(m) for m in steps[start:stop]]
            u = {n: t[start:stop] for n, t in vectors.items()}
            states = _stacked([s.state for s in chunk]) if stop - start > 1 else None
            if states is None:  # one step, or states that cannot be batched: one product per step
                for i, m in enumerate(steps[start:stop]):
                    pulled, meta_grads, _ = self.vjp(m, {n: t[i] for n, t in u.items()})
                    pieces.append({n: t.unsqueeze(0) for n, t in pulled.items()})
                    meta_sum = add_meta(meta_sum, meta_grads)
            else:
                pulled, meta_grads = self._vmapped_vjp(list(steps[start:stop]), chunk, states, u)
                pieces.append(pulled)
                meta_sum = add_meta(meta_sum, meta_grads)
            start = stop
        return {n: torch.cat([p[n] for p in pieces]) for n in vectors}, meta_sum

    def _explicit_meta(self, step: _Step) -> Optional[dict[int, tuple[str, Any]]]:
        """Where each meta-parameter sits for a vmapped rebuild of ``step``: a slot of its
        frozen closure (``("slot", slot)``), a module parameter not adapted (``("param",
        name)``), or the update rule (``("rule", None)``, whose part needs no rebuild). ``None``
        if some η is elsewhere (reached through an object), which only autograd can follow."""
        if step.closure is None:
            return None
        slots = {id(t): slot for slot, t in step.closure.tensors}
        where: dict[int, tuple[str, Any]] = {}
        for i, tensor in enumerate(self.meta):
            if i in self.rule_meta:
                where[i] = ("rule", None)
            elif id(tensor) in slots:
                where[i] = ("slot", slots[id(tensor)])
            elif id(tensor) in self._param_names and self._param_names[id(tensor)] not in self.theta:
                where[i] = ("param", self._param_names[id(tensor)])
            else:
                return None
        return where

    def _vmapped_vjp(self, steps: list[int], chunk: list[_Step], states: State, u: Params
                     ) -> tuple[Params, MetaGrads]:
        first = chunk[0]
        if first.once:
            refuse_twice(steps[0], first.once)
        out = None if self.compiler is None else self.compiler.product(self, steps, chunk, u, states, None,
                                                                        batched=True)
        if out is None:
            pulled, pulled_eta, rebuilt, losses, explicit = self._vmapped_rows(steps, chunk, states, u)
        else:
            pulled, pulled_eta, _, rebuilt, losses, explicit = out
        meta: MetaGrads = [None] * len(self.meta)
        for k, i in enumerate(explicit):
            meta[i] = pulled_eta[k].sum(0)
        if self.replay_rtol is not None:
            nexts = [self.iterate(m + 1) for m in steps]
            names = list(self.theta)
            recorded = torch.stack([s.loss for s in chunk])  # type: ignore[misc]
            failed = check_step(steps, [rebuilt[n] for n in names],
                                [torch.stack([nxt[n] for nxt in nexts]) for n in names],
                                [torch.stack([s.params[n] for s in chunk]) for n in names], self.replay_rtol,
                                losses=(losses, recorded), raising=False)
            if failed:
                # A batched kernel rounds differently from the one the step was taken with,
                # and an ill-conditioned step (BatchNorm over a few examples in float32) can
                # magnify that past the tolerance. Those rows are rebuilt alone, as the step
                # was taken, and checked again there: a real mismatch raises then.
                pulled = {n: t.clone() for n, t in pulled.items()}
                for row_index in failed:
                    for k, i in enumerate(explicit):
                        meta[i] = meta[i] - pulled_eta[k][row_index]  # type: ignore[operator]
                    alone, more, _ = self.vjp(steps[row_index], {n: t[row_index] for n, t in u.items()})
                    for n in pulled:
                        pulled[n][row_index] = alone[n]
                    meta = add_meta(meta, [m if i not in self.rule_meta else None
                                           for i, m in enumerate(more)])
        if self.rule_meta:  # B_mᵀu of a step size: the update with its gradient held constant
            for row_index, m in enumerate(steps):
                _, more, _ = self.vjp(m, {n: t[row_index] for n, t in u.items()}, second_order=False)
                meta = add_meta(meta, more)
        return pulled, meta

    def _vmapped_rows(self, steps: list[int], chunk: list[_Step], states: State, u: Params
                      ) -> tuple[Params, list[torch.Tensor], Params, torch.Tensor, list[int]]:
        """The rows of :meth:`_vmapped_vjp` by one eager ``torch.func.vmap`` call: ``J_mᵀu_i``,
        ``B_mᵀu_i`` per explicit η (per row), the rebuilt ``Φ_m(φ_m)`` and losses, and the
        indices of those η in :attr:`meta`."""
        first = chunk[0]
        template, rule, used = first.closure, first.rule, first.used
        assert template is not None
        where = self._explicit_meta(first) or {}
        # η as explicit, unbatched inputs of the vmapped step (the rule's own come after).
        explicit = [i for i, (kind, _) in where.items() if kind != "rule"]
        eta = [self.meta[i] for i in explicit]
        eta_slots = {where[i][1]: k for k, i in enumerate(explicit) if where[i][0] == "slot"}
        eta_params = {where[i][1]: k for k, i in enumerate(explicit) if where[i][0] == "param"}
        # The captured tensors that differ between the chunk's steps become batched inputs.
        varying = [j for j, (_, tensor) in enumerate(template.tensors)
                   if any(s.closure.tensors[j][1] is not tensor for s in chunk[1:])]  # type: ignore[union-attr]
        slots = [template.tensors[j][0] for j in varying]
        captured = [torch.stack([s.closure.tensors[j][1] for s in chunk]) for j in varying]  # type: ignore[union-attr]
        params = {n: torch.stack([s.params[n] for s in chunk]) for n in self.theta}
        model_at = self.model_at

        def row(p: Params, state: State, vector: Params, tensors: list[torch.Tensor],
                eta: list[torch.Tensor]) -> tuple[Params, list[torch.Tensor], Params, torch.Tensor]:
            def step_fn(q: Params, e: list[torch.Tensor]) -> tuple[Params, torch.Tensor]:
                closure = template.with_tensors({**dict(zip(slots, tensors)),
                                                 **{slot: e[k] for slot, k in eta_slots.items()}})
                fixed = {name: e[k] for name, k in eta_params.items()}

                def loss_of(w: Params) -> torch.Tensor:
                    return closure(model_at({**q, **w}, fixed))

                grads, loss = torch.func.grad_and_value(loss_of)({n: q[n] for n in used})
                return rule.step(q, grads, state)[0], loss

            new, pullback, loss = torch.func.vjp(step_fn, p, eta, has_aux=True)
            pulled_p, pulled_eta = pullback(vector)
            return pulled_p, pulled_eta, new, loss

        try:
            # no_grad: the rule's own η (a step size that requires grad) must not record an
            # autograd graph through the batch; its part comes from the kept update below.
            with self._as_taken(None, first.modes, first.autocast), torch.no_grad():
                pulled, pulled_eta, rebuilt, losses = torch.func.vmap(
                    row, in_dims=(0, 0, 0, 0, None))(params, states, u, captured, eta)
        except Exception as error:
            if not isinstance(error, (RuntimeError, ValueError)):  # e.g. an exhausted iterator
                self.verify()
                raise ReplayError(
                    f"closure: rebuilt during backward at inner steps {steps[0]}…{steps[-1]}, it raised "
                    f"{type(error).__name__}: {error}. It ran at those steps in the inner loop, so it "
                    "reads something that has changed since (an iterator read with next() inside the "
                    "closure). Compute each step's data outside the closure and capture it, or use "
                    "estimator=mg.Full(), which does not rebuild steps."
                ) from error
            raise RuntimeError(
                "closure or update rule: rebuilding inner steps under torch.func.vmap failed. "
                "Closures and update rules used with Binomial must be vmap-compatible: no .item() or "
                "data-dependent control flow, no in-place writes to captured tensors. Use "
                "Binomial(chunk_size=1), which rebuilds one step at a time without vmap, or "
                f"estimator=Checkpointed(). ({error})"
            ) from error
        return pulled, pulled_eta, rebuilt, losses, explicit

    def graph_bytes(self, m: int) -> int:
        """The bytes one rebuilt graph of step m holds: the tensors its forward pass and its
        gradient (built with ``create_graph=True``) save for backward, each storage counted
        once, the iterate itself not counted. This is what each further product in a batched
        call adds (:meth:`batched_vjp`), and what ``Binomial(max_memory=...)`` divides its
        budget by. The graph is built here and freed on return.
        """
        step = self._step(m)
        if step.graph is not None:
            params, grads = step.graph
            return sum(g.untyped_storage().nbytes() for g in grads.values())
        params = {n: t.detach().requires_grad_() for n, t in step.params.items()}
        seen: dict[int, int] = {id(t.untyped_storage()): 0 for t in params.values()}

        held: list[list[torch.Tensor]] = []

        def pack(t: torch.Tensor) -> list[torch.Tensor]:
            storage = t.untyped_storage()
            seen.setdefault(id(storage), storage.nbytes())
            held.append([t])
            return held[-1]

        try:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box[0]), \
                    self._as_taken(step.rng, step.modes, step.autocast), differentiated_twice(True):
                loss = step.closure(self.model_at(params))  # type: ignore[misc]
                grads = _grads(loss, params, create_graph=True, step=m, used=step.used)
                step.rule.step(params, grads, step.state)
        finally:
            # A saved output held by the hook holds its own graph in a cycle that garbage
            # collection cannot see; emptying the boxes frees the graphs.
            for box in held:
                box.clear()
        return sum(seen.values())

    def hessian_operator(self, k: int) -> "Hessian":
        """``u ↦ H u`` with ``H = ∇²L_tr(φ_k)``, the Hessian of the last step's loss
        (without any proximal term) at the current iterate ``k = K``, and its mixed block
        ``x ↦ (∂_η ∇_φ L_tr)ᵀ x`` (:meth:`Hessian.mixed`).

        One graph is built here and kept for as long as the returned operator lives;
        each call is one double backward through it.
        """
        last = self._last
        closure = None if last is None else last.closure
        if closure is None and self.length > 0:
            raise RuntimeError(
                "the last inner step was taken from a loss tensor, so its graph cannot be "
                "rebuilt at the final fast weights; take inner steps with a closure "
                "(diffopt.step(closure=...)) to use this estimator."
            )
        if k != self.length or last is None or closure is None:
            raise RuntimeError(
                f"the Hessian is taken at the final fast weights φ_K (K={self.length}), but the "
                f"query was built after {k} steps. Build the query loss from meta.fmodel after "
                "the last inner step."
            )
        if last.once:
            refuse_twice(k - 1, last.once)
        with torch.enable_grad():
            params = {n: t.detach().requires_grad_() for n, t in self.iterate(k).items()}
            with self._as_taken(last.rng, last.modes, last.autocast), differentiated_twice(True):
                loss = closure(self.model_at(params))
            grads = _grads(loss, params, create_graph=True, step=k - 1, used=last.used)
        # Parameters the loss does not use have a zero Hessian row; so do gradients that
        # carry no graph (a loss linear in them).
        names = [n for n in grads if grads[n].requires_grad]
        outputs = [grads[n] for n in names]
        return Hessian(params, names, outputs, [t for i, t in enumerate(self.meta)
                                                if i not in self.rule_meta])

    # ---------------------------------------------------------------- bookkeeping
    def release(self) -> None:
        """Drop every stored iterate and graph; later use raises a clear error."""
        self._steps = {}
        self._first_order = {}
        self.meta = []
        self._pending = []
        self._restored, self._absent, self._stored = {}, set(), []
        self._last = None
        self._current = {}
        self._state = {}
        self.theta = {}
        self.lifetime.released = True

    def _step(self, m: int) -> _Step:
        self.check_alive()
        if m in self._absent:
            self.restore(m, m)
        step = self._steps.get(m)
        if step is None:
            raise RuntimeError(
                f"inner step {m} is no longer stored (the estimator keeps the last {self.keep} "
                f"of {self.length} steps). Build the query loss from meta.fmodel after the last "
                "inner step, before taking more steps."
            )
        return step

    def check_alive(self) -> None:
        """Raise if the trajectory was released."""
        self.lifetime.check()


def _hyperparameters(rule: Any) -> tuple[Any, ...]:
    """What a rule's step depends on besides its inputs, comparable between two steps: its
    attributes, with each tensor as (identity, version) and containers unpacked; ``()`` for a
    rule without attributes (nothing to freeze)."""
    attributes = getattr(rule, "__dict__", None)
    if not attributes:
        return ()
    leaves, spec = pytree.tree_flatten(dict(attributes))
    return (spec, tuple((id(leaf), leaf._version) if isinstance(leaf, torch.Tensor) else
                        leaf if isinstance(leaf, (int, float, str, bool, type(None))) else id(leaf)
                        for leaf in leaves))


def _clone_constant(value: Any) -> Any:
    """A tensor that does not require grad, cloned (a later in-place change leaves it as it
    was); anything else as it is."""
    if isinstance(value, torch.Tensor) and not value.requires_grad:
        return value.clone()
    return value


def _checked_loss(loss: Any, step: int) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"closure: must return a scalar loss tensor, got {type(loss).__name__} at step {step}."
        )
    if loss.dim() != 0:
        raise ValueError(
            f"closure: must return a scalar (0-dim) loss, got shape {tuple(loss.shape)} at step "
            f"{step}; reduce it with .mean() or .sum()."
        )
    if not loss.is_floating_point():
        raise TypeError(f"closure: the loss must be floating point, got dtype {loss.dtype}.")
    return loss


def _grads(loss: torch.Tensor, params: Params, *, create_graph: bool, step: int,
           used: Optional[Sequence[str]] = None, theta: Optional[set[int]] = None) -> Params:
    """``∇L_tr(φ)`` by autograd, for the fast weights the loss depends on (``used``, if
    known: the names that had a gradient when the step was taken; a rebuilt step that no
    longer reaches one of them gets a zero gradient there, which the replay check sees).
    Parameters the loss does not use get no entry: the update rule leaves them as they are.

    A loss that uses none of the fast weights but depends on something else (a parameter
    that ``adapt=`` leaves out, a meta-parameter) takes a step that moves nothing, as a plain
    unroll does. A loss that depends on nothing, or that reaches θ's own Parameters (``theta``,
    by id) instead of the fast weights, is refused: it was built from the original module."""
    wrong = ValueError(
        f"closure: the loss at step {step} does not depend on the fast weights. Compute it "
        "from the model the closure receives (fmodel(x)), not from the original module."
    )
    if not loss.requires_grad:
        raise wrong
    names = list(params) if used is None else list(used)
    if not names:
        return {}
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph,
                                allow_unused=True)
    if used is not None:
        return {n: _zero_if_none(g, params[n]) for n, g in zip(names, grads)}
    if all(g is None for g in grads) and theta and any(
            id(leaf) in theta for leaf in _graph_inputs([loss], set(), {})[0]):
        raise wrong
    return {n: g for n, g in zip(names, grads) if g is not None}


def _detached(params: Params, state: State) -> tuple[Params, State]:
    """An update's fast weights and state without the graph to the rule's step sizes."""
    return ({n: t.detach() for n, t in params.items()},
            pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, state))


def _nbytes(params: Params, state: State) -> int:
    """The bytes of an iterate's tensors and its optimizer state's."""
    leaves = list(params.values()) + pytree.tree_leaves(state)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def _zero_if_none(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _stacked(states: list[State]) -> Optional[State]:
    """The optimizer states of several steps stacked along a new first dimension, or
    ``None`` where they cannot be (different structures, or leaves that are not
    tensors, such as a Python step count)."""
    flat = [pytree.tree_flatten(state) for state in states]
    spec = flat[0][1]
    if any(other != spec for _, other in flat[1:]):
        return None
    columns = list(zip(*(leaves for leaves, _ in flat)))
    if not all(isinstance(leaf, torch.Tensor) for column in columns for leaf in column):
        return None
    return pytree.tree_unflatten([torch.stack(column) for column in columns], spec)


class Hessian:
    """The Hessian of one rebuilt inner loss at φ (:meth:`Trajectory.hessian_operator`)."""

    def __init__(self, params: Params, names: list[str], gradients: list[torch.Tensor],
                 meta: list[torch.Tensor]) -> None:
        self._params, self._names, self._gradients, self._meta = params, names, gradients, meta

    def __call__(self, u: Params) -> Params:
        """``H u``."""
        params = self._params
        if not self._gradients:
            return {n: torch.zeros_like(t) for n, t in params.items()}
        with torch.enable_grad():
            out = torch.autograd.grad(self._gradients, list(params.values()),
                                      [u[n] for n in self._names], retain_graph=True, allow_unused=True)
        return {n: _zero_if_none(g, params[n]) for n, g in zip(params, out)}

    def mixed(self, x: Params) -> dict[int, Optional[torch.Tensor]]:
        """``(∂_η ∇_φ L)ᵀ x`` for the η of the inner loss (not the rule's step sizes), by
        identity of the η tensor."""
        if not self._gradients or not self._meta:
            return {}
        with torch.enable_grad():
            out = torch.autograd.grad(self._gradients, self._meta, [x[n] for n in self._names],
                                      retain_graph=True, allow_unused=True)
        return {id(t): g for t, g in zip(self._meta, out)}


def add_meta(total: MetaGrads, more: Sequence[Optional[torch.Tensor]]) -> MetaGrads:
    """Entrywise sum of two η-gradient lists (``None`` is zero; a shorter list is padded)."""
    size = max(len(total), len(more))
    out: MetaGrads = []
    for i in range(size):
        a = total[i] if i < len(total) else None
        b = more[i] if i < len(more) else None
        out.append(b if a is None else a if b is None else a + b)
    return out


def _graph_inputs(roots: list[torch.Tensor], skip: set[int], stop: dict[int, list[torch.Tensor]]
                  ) -> tuple[list[torch.Tensor], Optional[str]]:
    """The tensors requiring grad that the graph of ``roots`` reaches: the leaves (not in
    ``skip``, by id) and, where a node is the ``grad_fn`` of tensors in ``stop`` (by the node's
    id), those tensors (none, for an empty list), without looking behind them. Also the first
    node found whose backward cannot be differentiated again (:func:`_once_differentiable`),
    described, or ``None``."""
    seen: set[int] = set()
    found: list[torch.Tensor] = []
    once: Optional[str] = None
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in stop:
            found.extend(stop[id(node)])
            continue
        variable = getattr(node, "variable", None)
        if variable is not None:  # AccumulateGrad: a leaf
            if id(variable) not in skip:
                found.append(variable)
            continue
        if once is None:
            once = _once_differentiable(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found, once


#: The code of the wrapper ``torch.autograd.function.once_differentiable`` puts around a backward.
_ONCE_CODE = torch.autograd.function.once_differentiable(lambda ctx: None).__code__


def _once_differentiable(node: Any) -> Optional[str]:
    """A description of ``node`` if its backward cannot be differentiated again, else ``None``:
    a ``torch.compile``'d function (aot_autograd has no double backward), an
    ``autograd.Function`` whose backward is marked ``@once_differentiable`` (as many custom
    CUDA ops are), and a node that raises when differentiated twice (``DelayedError``, which
    torch puts where a once-differentiable backward ran with ``create_graph=True``). A metagrad
    block's own node is not one: inside a step that is differentiated twice, a block builds its
    graph with autograd (:func:`second_order`), and elsewhere its node refuses ``create_graph``."""
    name = type(node).__name__
    if name.startswith("CompiledFunction"):
        return "a torch.compile'd function (aot_autograd's backward has no double backward)"
    if name in ("DelayedError", "DelayedErrorBackward"):
        return "a once-differentiable backward (torch raises when it is differentiated twice)"
    function = getattr(node, "_forward_cls", None)
    if function is None:
        return None
    backward = getattr(function, "backward", None)
    if getattr(backward, "__code__", None) is _ONCE_CODE:
        return (f"the autograd.Function {function.__qualname__}, whose backward is marked "
                "@once_differentiable")
    if name == "CheckpointFunctionBackward":
        return "torch.utils.checkpoint with use_reentrant=True (its backward cannot be differentiated again)"
    return None


def _step_size_names(rule: Any) -> dict[int, str]:
    """Descriptions of a rule's step-size tensors (``lr``, scalar or per parameter), by id."""
    lr = getattr(rule, "lr", None)
    if isinstance(lr, torch.Tensor):
        return {id(lr): "lr (update rule)"}
    if isinstance(lr, dict):
        return {id(t): f"lr[{n!r}] (update rule)" for n, t in lr.items() if isinstance(t, torch.Tensor)}
    return {}


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast computes in on ``device_type`` now, or ``None`` when it is off."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)
