"""The stored inner trajectory: the inner loop records into it, estimators compute with it.

During the inner loop the trajectory keeps, for each step k, the iterate φ_k, the
update rule's state, the step's loss, and the closure that gave it, frozen with the values
it captured at the step and, if it drew random numbers, the generator states it started
from (:mod:`metagrad.frozen`). It keeps no graph, except for the Full estimator, whose inner
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

How a product is formed and what it costs: :mod:`metagrad.products`. The pieces: the tape of
records and iterates (:mod:`metagrad.tape`), the meta-parameters found (:mod:`metagrad.discovery`),
one step and its parts (:mod:`metagrad.step`), its products (:mod:`metagrad.products`,
:mod:`metagrad.batched`). :class:`Trajectory` records one inner loop into them and is what
estimators compose.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch

from .attention import math_attention
from .batched import Batched
from .discovery import MetaGrads, MetaParameters, Seen, add_meta, backward_once, closure_shape
from .fmodel import FunctionalModel, Layout
from .frozen import Frozen, freeze
from .generators import RandomState, rule_draws, rule_sources, step_sources
from .reads import model_reads, rule_reads
from .update_rule import Params, State, UpdateRule, step_in_layout
from .products import Products
from .numerics import at_precision, tolerance
from .replay import EtaRecords, check_eta, check_losses, check_step, refuse_twice
from .snapshots import Schedule
from .step import (KeptStep, RuleFreezer, StepRecord, autocast_dtype, checked_loss, detached, loss_grads,
                   pull_back)
from .tape import Lifetime, NestedBlockError, OnTape, Tape, differentiated_twice, second_order

if TYPE_CHECKING:  # pragma: no cover
    from .compiled import Compiler

__all__ = ["Trajectory", "Closure", "Lifetime", "MetaGrads", "add_meta", "NestedBlockError",
           "differentiated_twice", "second_order"]

Closure = Callable[[FunctionalModel], torch.Tensor]


#: The longest run of steps one pull-back covers (:meth:`Trajectory.sweep`): with
#: ``compile=True`` a run is one compiled call, and one run length compiles once whatever K is.
SWEEP = 4


class Trajectory(OnTape):
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
        replay_rtol: the relative tolerance of the replay check (:func:`metagrad.replay.check_step`),
            or ``None`` for no check; a default one follows autocast (:func:`~metagrad.numerics.at_precision`).
        compiler: computes inner gradients and step products by compiled calls where it can
            (:mod:`metagrad.compiled`), or ``None`` for eager.
        snapshots: store the iterates (with their optimizer states) only at the snapshots of this
            schedule (:mod:`metagrad.snapshots`), recompute the others when a product needs them
            (:meth:`restore`); ``None``: every iterate. Closures, generator states, losses: always.
        tasks: T of a block over tasks (:mod:`metagrad.tasks`): the iterates hold T independent
            inner loops along a first dimension, whose products act on each alone; ``None``: one.
    """

    #: The lengths of the runs of steps :meth:`sweep` may be asked for, longest first
    #: (:attr:`~metagrad.tape.OnTape.runs`, :func:`metagrad.estimators.base.sweep_back`).
    run_lengths = (SWEEP, 1)

    def __init__(self, module: torch.nn.Module, theta: Params, rule: UpdateRule, *, differentiable: bool,
                 keep: Optional[int], proximal: Optional[float] = None, check_finite: bool = True,
                 replay_rtol: Optional[float] = None, compiler: Optional["Compiler"] = None,
                 snapshots: Optional[Schedule] = None, tasks: Optional[int] = None) -> None:
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
        self.checked = replay_rtol is not None
        self.compiler = compiler
        self.tasks = tasks
        self.tape = Tape(theta, rule.init(theta), keep=keep, snapshots=snapshots)
        self.lifetime = self.tape.lifetime
        #: The meta-parameters η found so far (:mod:`metagrad.discovery`).
        self.eta = MetaParameters(module, list(theta))
        self.products = Products(self)
        self.batched = Batched(self, self.products)
        self.submodules = list(module.modules())
        self.layout = Layout.of(module)
        self.device = next(iter(theta.values())).device if theta else torch.device("cpu")
        self.sources: dict[Any, Any] = {}  # (what steps reach, found once: step_sources, rule_reads)
        #: Each step's update rule as it was when the step was taken (schedules, :class:`RuleFreezer`).
        self._frozen_rule = RuleFreezer()
        #: θ's own Parameters, by id (a loss that reaches them was built from the module itself).
        self._theta_ids = _ParameterIds(module, theta)
        #: The η side of the replay check: the fingerprints of each step's ``∂ℓ/∂η``.
        self.etas = EtaRecords(lambda: self.eta.tensors)

    # ------------------------------------------------------------------ what it holds
    @property
    def stored(self) -> int:
        """How many steps are stored for rebuilding (at most ``keep``)."""
        return len(self.tape.steps)

    @property
    def meta(self) -> list[torch.Tensor]:
        """The meta-parameters η: every tensor besides the fast weights that requires grad and
        that an inner step depends on (:meth:`MetaParameters.discover
        <metagrad.discovery.MetaParameters.discover>`)."""
        return self.eta.tensors

    @property
    def meta_names(self) -> list[str]:
        """A description of each η."""
        return self.eta.names

    @property
    def rule_meta(self) -> set[int]:
        """Which η come from the update rule (step sizes)."""
        return self.eta.rule

    @property
    def meta_saved_grads(self) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Each η leaf with its ``.grad`` when it was found (restored if the block raises)."""
        return self.eta.saved_grads

    @property
    def pulling(self) -> bool:
        """A product through a kept graph is being computed (see :meth:`vjp`)."""
        return self.products.pulling

    def storage(self) -> dict[str, int]:
        """What a backward reports about storage (:meth:`Tape.storage <metagrad.tape.Tape.storage>`)."""
        return self.tape.storage()

    def model_at(self, params: Params, fixed: Optional[Params] = None) -> FunctionalModel:
        """The module evaluated at the fast weights ``params`` (and, under torch.func, with
        ``fixed`` in place of parameters that are not fast weights)."""
        return FunctionalModel(self.module, params, layout=self.layout, fixed=fixed)

    def iterate(self, k: int) -> Params:
        """The fast weights φ_k after k steps (k = K is the current iterate)."""
        self.check_alive()
        if k == self.length:
            return self.tape.current
        return self._step(k).params

    # -------------------------------------------------------------------- inner loop
    def advance(self, closure: Closure, rule: Optional[UpdateRule] = None, *,
                frozen: Optional[Frozen] = None, parts: bool = False,
                probe: Optional[Closure] = None) -> torch.Tensor:
        """Take one inner step with ``closure``'s loss; return the loss, detached.

        ``rule`` replaces the trajectory's update rule for this step only (for adapters
        whose users change hyperparameters or transform gradients per step); it must use
        the same state as the trajectory's rule.

        Unless the trajectory is differentiable (nothing is rebuilt then), the closure is frozen
        with the values it captures now (:mod:`metagrad.frozen`), and the generator states it starts
        from are kept if it draws random numbers (:mod:`metagrad.generators`); ``frozen``: the closure
        frozen already (with its batch, :func:`metagrad.tasks.with_batch`). With ``parts`` the closure
        returns a 1-D tensor of independent losses (one per task), the step's loss is their sum
        (``frozen`` returns the sum), and the parts are returned, detached. ``probe``: one task's
        loss of a block over tasks (:func:`metagrad.tasks.advance_tasks`), from which a closure's
        first step finds η where its steps are compiled (:func:`_first_task_seen`).
        """
        self.check_alive()
        rng: Optional[RandomState] = None
        if self.differentiable:
            # At step 0, aliases of θ (a view node each, no copy): the step's gradient is then
            # the partial derivative in φ, also where the inner loss reaches θ another way (an
            # η computed from θ; in a nested block, an outer block's fast weights that depend
            # on θ), as every other estimator's detached iterates give it.
            params = self.tape.current if self.length else _aliases(self.tape.current)
            frozen = None  # nothing is rebuilt
        else:
            # Detached: a compiled call takes them as they are; the eager gradient makes leaves.
            params = self.tape.current
            frozen = freeze(closure) if frozen is None else frozen
            rng = RandomState.capture(self.device, step_sources(self.sources, frozen, self.module))
        # Attention's math kernel (metagrad.attention.math_attention), which can be differentiated twice:
        # every step taken and rebuilt runs the same one.
        with math_attention(), torch.enable_grad():  # (an inner loop under torch.no_grad() builds its graph too)
            params, loss, grads, drew = self._loss(closure, params, frozen, rng, probe)
            if frozen is not None:
                frozen.taken()
            split = loss.detach() if parts else None
            loss = loss.sum() if parts else loss
        then = rng  # (the states the closure ended at are the rule's start: _take_step)
        if rng is not None and not (rng.changed() if drew is None else drew):
            rng = None
        loss = self._take_step(loss, params, closure=frozen, keep_graph=False, rule=rule, rng=rng,
                               shape=closure_shape(closure) if self.differentiable else None,
                               grads=grads, then=None if then is None else then.ended())
        return loss if split is None else split

    def _loss(self, closure: Closure, params: Params, frozen: Optional[Frozen], rng: Optional[RandomState],
              probe: Optional[Closure]) -> tuple[Params, torch.Tensor, Optional[Params], Optional[bool]]:
        """The fast weights the step's loss was built from (``params``, or leaves made from
        them), the loss, its gradient where a compiled call took it (else ``None``), and whether
        that call drew random numbers (``None``: no call ran)."""
        grads = None
        drew: Optional[bool] = None  # whether a compiled call drew random numbers (None: no call ran)
        seen = None if frozen is None else self.eta.closures.get(frozen.key)
        if seen is None and probe is not None and self.compiler is not None and frozen is not None:
            seen = _first_task_seen(self, probe, frozen, rng)
        if self.compiler is not None and frozen is not None and seen is not None and not seen.once \
                and not seen.random and not seen.made and not seen.nested:  # (a block inside: never compiles)
            out = self.compiler.inner_grad(self, closure, frozen.structure, params, seen.used)
            if out is not None and rng is not None:
                drew = rng.changed()
                if drew:
                    # It drew random numbers inside compiled code, which an eager replay cannot
                    # reproduce: the step is taken again eagerly, from the same generator states.
                    seen.random = True
                    rng.restore()
                    out, drew = None, None
            if out is not None:
                loss, grads = out
        if grads is None:
            if not self.differentiable:
                params = {n: t.detach().requires_grad_() for n, t in params.items()}
            with torch.enable_grad(), differentiated_twice(self.differentiable):
                loss = _loss_at(self, closure, params)
            if self.compiler is not None:
                self.compiler.settle()  # why the step ran eagerly, now that it could
        return params, loss, grads, drew

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
        return self._take_step(loss, params, closure=None, keep_graph=keep_graph, rule=rule, source="loss")

    def _take_step(self, loss: Any, params: Params, *, closure: Optional[Frozen],
                   keep_graph: bool, rule: Optional[UpdateRule], rng: Optional[RandomState] = None,
                   grads: Optional[Params] = None, shape: Optional[tuple[Any, ...]] = None,
                   source: str = "closure", then: Optional[tuple[Any, ...]] = None) -> torch.Tensor:
        k = self.length
        rule = self._frozen_rule(self.rule if rule is None else rule)
        with torch.enable_grad():
            loss = checked_loss(loss, k)
            if self.check_finite and not math.isfinite(loss.item()):
                raise FloatingPointError(
                    f"closure: the inner loss at step {k} is {loss.item()}. metagrad stops here "
                    "rather than propagate non-finite fast weights; lower the step size or check "
                    "the data. Pass check_finite=False to MetaGradient to let it propagate."
                )
            # ∂ℓ/∂η of a step that will be rebuilt, in the same backward, for the replay check
            # (EtaProbes); a closure's first step keeps its graph until its η are found. Only where
            # every η is a leaf (the partial derivative in an η computed from another, w =
            # hypernet(z) or an outer block's fast weights, is not what a backward to both gives),
            # and not through a node whose backward runs once (a nested block's, a compiled
            # function's). The graph is kept (it may run through a graph of the user's that a
            # later backward needs).
            eta_grads: Optional[list[Optional[torch.Tensor]]] = None
            before = None if closure is None else self.eta.closures.get(closure.key)
            if (grads is None and closure is not None and self.replay_rtol is not None and not self.differentiable
                    and (self.meta or before is None) and self.eta.leaves()
                    and (not (before.nested or before.once) if before is not None else not backward_once(loss))):
                eta_grads = []
            if grads is None:  # (given: computed by a compiled call)
                grads = loss_grads(loss, params, create_graph=self.differentiable or keep_graph, step=k,
                                   theta=self._theta_ids, also=self.eta.read() if eta_grads is not None else (),
                                   also_out=eta_grads, retain_graph=eta_grads is not None or None, source=source)
        graph = (params, grads) if keep_graph else None
        inputs = params  # the tensors the loss was built from (the step's fast weights)
        if not self.differentiable:
            params = {n: t.detach() for n, t in params.items()}
            grads = {n: g.detach() for n, g in grads.items()}
        used = tuple(grads)
        rule_meta = self.eta.rule_holds_eta(rule, used)
        run = functools.partial(self.update, rule, params, grads, self.tape.state, rule_meta)
        # A rule that draws random numbers (SGLD's noise) is replayed where the step is rebuilt.
        (new_params, new_state), rule_rng = (run(), None) if self.differentiable else rule_draws(
            self.device, then, rule_sources(self.sources, rule), run)
        once, alone = None, False
        if self.differentiable:  # autograd differentiates this step's graph twice, now or later
            once = self.eta.differentiable_step(loss, inputs, rule, shape)
            if once is not None:
                refuse_twice(k, once, source)
        else:
            seen = None if closure is None else self.eta.closures.get(closure.key)
            if seen is None:
                again = None if closure is None else _again(self, closure, inputs, rng)
                seen = self.eta.first_step(loss, inputs, closure, used, again)
            once, alone = seen.once, seen.made
            seen.random = seen.random or rng is not None
            if before is None and eta_grads is not None and len(self.meta) > len(eta_grads):  # η found now
                if self.eta.leaves() and not once:
                    loss_grads(loss, {}, create_graph=False, step=k, used=(),
                               also=self.eta.read()[len(eta_grads):], also_out=eta_grads, retain_graph=True)
                else:
                    eta_grads = None
            if rule_meta is None:  # a new rule, or fast weights it has not updated before
                rule_meta = self.eta.learn_rule(rule, new_params, used)
            if rule_meta:
                if self.keep is not None:  # its iterate is not kept: the step-size part is this graph
                    self.tape.first_order[k] = new_params
                new_params, new_state = detached(new_params, new_state)
        self.replay_rtol = at_precision(self.replay_rtol, precision := autocast_dtype(self.device.type), self.device)
        step = StepRecord(params=self.tape.current,  # detached unless differentiable
                          state=self.tape.state, closure=closure, rule=rule, used=used,
                          loss=loss.detach(), rng=rng, rule_rng=rule_rng, once=once, modes=self._modes(),
                          rule_reads=() if self.differentiable else rule_reads(rule, self.sources),
                          model_reads=() if self.differentiable else model_reads(self.module, self.sources),
                          autocast=precision, graph=graph, alone=alone)
        if eta_grads:
            self.etas.keep(step, eta_grads)
        self.tape.append(step, new_params, new_state)
        return loss.detach()

    def eta_scale(self) -> Optional[torch.Tensor]:
        """The largest ‖∂ℓ/∂η‖ the stored steps recorded, per η (:meth:`EtaRecords.scale
        <metagrad.replay.EtaRecords.scale>`)."""
        return self.etas.scale(self.tape.steps.values(), self.length)

    def update(self, rule: UpdateRule, params: Params, grads: Params, state: State,
                rule_meta: Optional[bool], around: Optional[Callable[[], Any]] = None) -> tuple[Params, State]:
        """One update of the rule, with the proximal term's gradient ``λ(φ − θ)`` added (Implicit's
        inner problem), with grad enabled where the rule may hold η of its own (a step size that
        requires grad; ``rule_meta`` unknown or true): its inputs are detached, so the graph
        reaches only those. A rule seen before without any runs without. ``around``: for a rebuild,
        the rule as the step ran it (:meth:`StepRecord.rule_as_taken`: its draws, what it read)."""
        with torch.set_grad_enabled(self.differentiable or rule_meta is not False), \
                around() if around is not None else contextlib.nullcontext():
            if self.proximal is not None:  # the gradient of (λ/2)‖φ − θ‖²
                grads = {n: g + self.proximal * (params[n] - self.theta[n]) for n, g in grads.items()}
            return step_in_layout(rule, self.rule, params, grads, state, copy=self.length == 0,  # (φ_0: θ's storage)
                                  differentiated=self.compiler is not None and self.keep != 0)

    def _modes(self) -> tuple[bool, ...]:
        """``training`` of every submodule now; the previous step's tuple when unchanged."""
        modes = tuple(sub.training for sub in self.submodules)
        last = self.tape.last
        return last.modes if last is not None and modes == last.modes else modes

    # ---------------------------------------------------------------------- snapshots
    def restore(self, first: int, last: int) -> None:
        """Make the iterates φ_first … φ_last (and their optimizer states) available, for the
        products an estimator is about to take there.

        With snapshots (:mod:`metagrad.snapshots`), each segment between two stored iterates
        that holds one of them is recomputed forward from its snapshot (:func:`_recompute`),
        unless it is already; segments recomputed before that hold none of them are freed
        first, after their queued replay checks ran. Estimators that sweep backwards in time
        recompute every segment once. :meth:`~metagrad.products.Products.vjp` and :meth:`iterate` call this for a step
        whose iterate is missing; :meth:`~metagrad.batched.Batched.batched_vjp` for the steps of its call. Without
        snapshots it does nothing."""
        self.tape.restore(first, last, functools.partial(_recompute, self), self.products.verify)

    def forget(self) -> None:
        """Free every recomputed iterate (after the queued replay checks): the end of a backward."""
        self.products.verify()
        self.tape.forget()

    # ----------------------------------------------------------------------- products
    def vjp(self, m: int, u: Params, state_adjoint: Optional[list[Optional[torch.Tensor]]] = None,
            *, second_order: bool = True
            ) -> tuple[Params, MetaGrads, Optional[list[Optional[torch.Tensor]]]]:
        """The primitive every estimator composes (:meth:`Products.vjp <metagrad.products.Products.vjp>`)."""
        return self.products.vjp(m, u, state_adjoint, second_order=second_order)

    def sweep(self, first: int, last: int, u: Params, state_adjoint: Optional[list[Optional[torch.Tensor]]] = None
              ) -> tuple[Params, MetaGrads, Optional[list[Optional[torch.Tensor]]]]:
        """``u`` pulled back through steps ``last − 1`` down to ``first``: ``(J_firstᵀ⋯J_{last−1}ᵀu,
        Σ_m B_mᵀa_{m+1}, state adjoint)``, the products :meth:`vjp` gives one by one (the optimizer
        state's adjoint carried where ``state_adjoint`` is given, the state held constant where
        it is ``None``). With ``compile=True`` a run of steps of one
        structure is one compiled call (:meth:`Compiler.sweep <metagrad.compiled.Compiler.sweep>`)."""
        if self.compiler is not None and last - first > 1:
            steps = list(range(first, last))
            out = self.compiler.sweep(self, steps, [self._step(m) for m in steps], u, state_adjoint)
            if out is not None:
                pulled, pulled_eta, state_out, explicit = out
                meta: MetaGrads = [None] * len(self.meta)
                for k, i in enumerate(explicit):
                    meta[i] = pulled_eta[k]
                return pulled, meta, state_out
        return pull_back(self.vjp, first, last, u, state_adjoint)

    def batched_vjp(self, steps: Sequence[int], vectors: Params,
                    chunk_size: Optional[int] = None) -> tuple[Params, MetaGrads]:
        """Many products at once (:meth:`Batched.batched_vjp <metagrad.batched.Batched.batched_vjp>`)."""
        return self.batched.batched_vjp(steps, vectors, chunk_size)

    def graph_bytes(self, m: int) -> int:
        """The bytes one rebuilt graph of step m holds (:meth:`Products.graph_bytes
        <metagrad.products.Products.graph_bytes>`)."""
        return self.products.graph_bytes(m)

    def fixed_point(self, k: int, rule: UpdateRule) -> KeptStep:
        """The step at φ_K with ``rule``, kept for repeated VJPs (:meth:`Products.fixed_point
        <metagrad.products.Products.fixed_point>`)."""
        return self.products.fixed_point(k, rule)

    def verify(self) -> None:
        """Run the queued replay checks (:meth:`Products.verify <metagrad.products.Products.verify>`)."""
        self.products.verify()

    # --------------------------------------------------------------------- lifetime
    def release(self) -> None:
        """Drop every stored iterate and graph; later use raises a clear error."""
        self.tape.release()
        self.eta.clear()
        self.products.pending, self.products.measured = [], []
        self.theta = {}

    def _step(self, m: int) -> StepRecord:
        self.check_alive()
        if m in self.tape.absent:
            self.restore(m, m)
        step = self.tape.steps.get(m)
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


def _first_task_seen(trajectory: Trajectory, probe: Closure, frozen: Frozen, rng: Optional[RandomState]) -> Seen:
    """What a closure's first step in this block shows (:class:`~metagrad.discovery.Seen`:
    η, the fast weights its loss uses, a node that cannot be differentiated twice), found
    from ``probe``, its loss for the first task of a block over tasks alone, eagerly and
    without ``vmap``, so that the step itself can be a compiled call. Under ``vmap`` a
    closure cannot branch on its data, so every task's loss is the same code on other
    values and reaches what the first task's reaches; the names and the captured tensors
    discovery stops at are the frozen closure's, which holds every task's batch. A probe
    that drew random numbers gives the generator states back: the step then runs
    eagerly, from the states it started from."""
    params = {n: t[0].detach().requires_grad_() for n, t in trajectory.tape.current.items()}
    with torch.enable_grad():
        loss = checked_loss(probe(trajectory.model_at(params)), trajectory.length)
        used = tuple(loss_grads(loss, params, create_graph=False, step=trajectory.length, theta=trajectory._theta_ids))
    again = _again(trajectory, probe, params, rng)
    seen = trajectory.eta.first_step(loss, params, frozen, used, again)
    if rng is not None and rng.changed():
        seen.random = True
        rng.restore()
    return seen


def _aliases(theta: Params) -> Params:
    """Aliases of θ (a view node each, no copy) for a differentiable trajectory's step 0, made
    with grad enabled: an inner loop run under ``torch.no_grad()`` still builds its graph, as the
    estimators that rebuild steps compute theirs whatever the caller's grad mode."""
    with torch.enable_grad():
        return {n: t.view_as(t) for n, t in theta.items()}


def _again(trajectory: Trajectory, closure: Closure, params: Params,
           rng: Optional[RandomState]) -> Callable[[], torch.Tensor]:
    """``closure``'s loss at ``params``, computed (when called) once more as the step computed
    it: from the generator states it started from, the caller's put back (for
    :meth:`MetaParameters.first_step <metagrad.discovery.MetaParameters.first_step>` and
    :func:`_loss_at`)."""
    def run() -> torch.Tensor:
        with torch.enable_grad(), math_attention(), rng.replay() if rng is not None else contextlib.nullcontext():
            return closure(trajectory.model_at(params))
    return run


def _loss_at(trajectory: Trajectory, closure: Closure, params: Params) -> torch.Tensor:
    """``closure``'s loss at the fast weights ``params``. In a differentiable trajectory (Full), the
    first step after step 0 of a closure whose loss reaches tensors that require grad other than
    the fast weights (:meth:`MetaParameters.history_to_check
    <metagrad.discovery.MetaParameters.history_to_check>`) is computed once more at ``params``
    detached, from the same generator states: a loss that differentiates by such a tensor inside
    (``torch.autograd.grad(u.sum(), x)`` with ``x`` that requires grad) takes, through an unroll,
    that derivative also through the earlier steps, which made ``x`` an input of the fast
    weights. That is not the step of MATH.md, ``φ − α∇_φ L(φ, η)`` with ``L`` a function of the
    weights' values, which every other estimator takes; so it is refused."""
    tr = trajectory
    if not (tr.differentiable and tr.length and tr.eta.history_to_check(closure)):
        return closure(tr.model_at(params))
    rng = RandomState.capture(tr.device, step_sources(tr.sources, freeze(closure), tr.module))
    loss = closure(tr.model_at(params))
    rng.changed()
    alone = _again(tr, closure, {n: t.detach().requires_grad_() for n, t in params.items()}, rng)().detach()
    taken = loss.detach()
    eps = torch.finfo(taken.dtype).eps if taken.is_floating_point() else 0.0
    if not bool(((taken - alone).abs() <= (tolerance(taken.dtype, taken.device) + 16 * eps) * alone.abs()).all()):
        raise ValueError(
            f"closure: its loss at inner step {tr.length} depends on how the fast weights were computed, not "
            f"only on their values ({taken.sum().item():.10g} through the unrolled steps, {alone.sum().item():.10g} "
            "at the same weights detached). It differentiates with respect to a tensor that requires grad "
            "and that earlier steps made the fast weights depend on (torch.autograd.grad(..., inputs=x) with x "
            "a meta-parameter, such as collocation points made with requires_grad=True): through the unroll "
            "that derivative also runs back through the earlier steps, unlike the step every other estimator "
            "takes. Take the derivative at fixed weights: torch.func.grad(lambda z: f(z).sum())(x), or a leaf "
            "made inside the closure, xi = x.detach().requires_grad_().")
    return loss


def _recompute(trajectory: Trajectory, start: int, end: int) -> None:
    """Run the inner steps start … end−1 again from the snapshot φ_start, as they were
    taken: the frozen closure, the generator states replayed, modes and autocast as they
    were (:meth:`~metagrad.products.Products.rebuild` without ``create_graph``: only the gradient is needed), the same
    update rule and state. The iterates between are filled in.

    The replay check (MATH.md, "Replaying a step"): every recomputed loss must equal the
    recorded one, and the recomputed φ_end the stored one (the next snapshot, or φ_K): only
    that iterate was stored, and a step that changed since it was taken moves it."""
    losses = []
    etas: list[Optional[list[Optional[torch.Tensor]]]] = []

    def advance(m: int, step: StepRecord, params: Params, state: State) -> tuple[Params, State]:
        leaves = {n: t.detach().requires_grad_() for n, t in params.items()}
        with torch.enable_grad():
            loss, grads, eta = trajectory.products.rebuild(m, step, leaves, create_graph=False)
        losses.append(loss.detach())
        etas.append(eta)
        return trajectory.update(step.rule, params, grads, state, False, step.rule_as_taken)

    params, _ = trajectory.tape.recompute(start, end, advance)
    if trajectory.replay_rtol is None:
        return
    steps = list(range(start, end))
    closures = [trajectory.tape.steps[m].closure for m in steps]
    check_losses(steps, torch.stack(losses), torch.stack([trajectory.tape.steps[m].loss for m in steps]),
                 trajectory.replay_rtol, closures=closures, recomputed_from=start)
    scale = trajectory.eta_scale()
    check_eta(steps, (trajectory.etas.fingerprints(etas),
                      [trajectory.tape.steps[m].eta_grad for m in steps], scale),
              trajectory.replay_rtol, dtype=next(iter(trajectory.theta.values())).dtype,
              meta=trajectory.meta_names, closures=closures, recomputed_from=start)
    names = list(trajectory.theta)
    stored, before = trajectory.iterate(end), trajectory.iterate(end - 1)
    check_step([end - 1], [[params[n]] for n in names], [[stored[n]] for n in names],
               [[before[n]] for n in names], trajectory.replay_rtol, closures=closures[-1:],
               recomputed_from=start)


class _ParameterIds:
    """The ids of the module's parameters named in ``names``, looked up on the first ``in``
    (needed only where a step's loss reaches none of the fast weights)."""

    def __init__(self, module: torch.nn.Module, names: Params) -> None:
        self._module, self._names = module, names
        self._ids: Optional[set[int]] = None

    def __contains__(self, key: object) -> bool:
        if self._ids is None:
            self._ids = {id(p) for n, p in self._module.named_parameters() if n in self._names}
        return key in self._ids

    def __bool__(self) -> bool:
        return bool(self._names)
