"""The one interface every estimator implements (:class:`Estimator`), and the one it reads a
trajectory through (:class:`TrajectoryView`)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, Literal, Optional, Protocol, overload

import torch

from ..discovery import MetaGrads, add_meta
from ..errors import MetaGradientWarning, warn
from ..step import KeptStep
from ..update_rule import Params, UpdateRule
from ..snapshots import Schedule
from ..trajectory import SWEEP

__all__ = ["Estimator", "TrajectoryView", "MetaGradientWarning", "warn", "SWEEP", "sweep_back"]

#: The adjoint of the optimizer state: one entry per leaf of the flattened state (``None`` for
#: a leaf that is not a floating-point tensor, or for zero).
StateAdjoint = Optional[list[Optional[torch.Tensor]]]


class TrajectoryView(Protocol):
    """What an estimator reads from the stored inner loop: the tape's iterates and the step's
    products, nothing else. Both faces give it over the same tape (:class:`metagrad.tape.Tape`)
    and the same step body (:func:`metagrad.step.step_body`): the context manager's
    :class:`~metagrad.trajectory.Trajectory` (steps rebuilt from the recorded closures, each
    checked against the stored iterate) and the functional face's
    :class:`~metagrad.pure.PureTrajectory` (steps of a pure loss function). An estimator
    written against this runs in both."""

    @property
    def length(self) -> int:
        """K, the number of inner steps taken."""
    @property
    def theta(self) -> Params:
        """The initialization θ (φ_0), name→tensor."""
    @property
    def meta(self) -> list[torch.Tensor]:
        """The meta-parameters η (MATH.md, "Meta-parameters other than θ")."""
    @property
    def meta_names(self) -> list[str]:
        """A description of each η, for messages."""
    @property
    def rule_meta(self) -> set[int]:
        """Which η the update rule holds (its learned step sizes), by index in :attr:`meta`."""
    @property
    def tasks(self) -> Optional[int]:
        """T of a block over tasks (the iterates hold T inner loops stacked), or ``None``."""
    @property
    def runs(self) -> tuple[int, ...]:
        """The lengths of the runs of steps :meth:`sweep` is asked for, longest first (1 last)."""
    @property
    def checked(self) -> bool:
        """Whether rebuilt steps are queued for the replay check (:meth:`verify` runs them)."""
    @property
    def stored_iterates(self) -> int:
        """How many iterates φ_k (k < K) are held now."""
    @property
    def iterate_bytes(self) -> int:
        """The bytes of the iterates and optimizer states held now."""

    def iterate(self, k: int) -> Params:
        """The fast weights φ_k after k steps (k = K: the final ones)."""
    def vjp(self, m: int, u: Params, state_adjoint: StateAdjoint = None, *, second_order: bool = True
            ) -> tuple[Params, MetaGrads, StateAdjoint]:
        """``(J_mᵀu, B_mᵀu, the adjoint of s_m)`` of step m (MATH.md (1), (3)); the optimizer
        state held constant where ``state_adjoint`` is ``None``; ``second_order=False``: the
        gradient held constant (``J_m`` taken as the identity)."""
    def sweep(self, first: int, last: int, u: Params, state_adjoint: StateAdjoint = None
              ) -> tuple[Params, MetaGrads, StateAdjoint]:
        """``u`` pulled back through steps ``last − 1`` down to ``first``, and the sum of their
        η products: :meth:`vjp` step by step, or one call for a run of :attr:`runs`."""
    def batched_vjp(self, steps: Sequence[int], vectors: Params, chunk_size: Optional[int] = None
                    ) -> tuple[Params, MetaGrads]:
        """``J_mᵀ u_i`` for each ``m = steps[i]`` and row ``u_i`` of ``vectors``, and
        ``Σ_i B_mᵀ u_i``: many products at once (Binomial's levels)."""
    def graph_bytes(self, m: int) -> int:
        """The bytes one step's product graph holds at step m (``Binomial(max_memory=...)``)."""
    def fixed_point(self, k: int, rule: UpdateRule) -> KeptStep:
        """The step at φ_K with ``rule`` in place of the inner loop's, kept for repeated VJPs
        (Implicit's solve)."""
    def restore(self, first: int, last: int) -> None:
        """Make the iterates φ_first … φ_last available (with snapshots, recompute them)."""
    def verify(self) -> None:
        """Run the replay checks queued so far (nothing where no step is replayed)."""


class Estimator(abc.ABC):
    """A backward strategy: how ``v = ∇L_val(φ_K)`` is carried back to θ and to the
    meta-parameters η (MATH.md, "Meta-parameters other than θ").

    Subclasses implement :meth:`backward` by composing the trajectory's one primitive,
    :meth:`TrajectoryView.vjp` (``J_mᵀ u`` and ``B_mᵀ u``
    of one step; :meth:`~TrajectoryView.batched_vjp` for many at once), and
    may set:

    - ``differentiable``: the inner loop builds its graph (``create_graph=True``).
    - ``exact``: it returns MATH.md's exact (1) and (3), whatever the problem; a block nested
      in an outer step that is differentiated twice then runs as a differentiable unroll,
      which gives the same number (an approximate estimator is refused there).
    - ``proximal``: λ of a proximal term the inner loop adds (Implicit).
    - ``needs_closure``: it rebuilds the last step from its closure, with no fallback for a step
      taken from a loss tensor (``meta.step_from_loss``, the adapters' ``step(loss)``).
    - :meth:`why_not_pure`: why the functional face cannot run it (``None``: it can).
    - :meth:`keep`: how many recent steps the trajectory must keep (``None``: all).
    - :meth:`snapshot_schedule`: which iterates it stores, the others recomputed when a product
      needs them (``None``: all).
    - :meth:`under_compile`: the estimator that runs in its place with ``compile=``.
    - :meth:`why_not_tasks`: why a block over several tasks cannot run it (``None``: it can).
    - :meth:`length_warning`: what to say about it on an inner loop of K steps (``None``: nothing).
    """

    differentiable: bool = False
    #: The estimate is the exact meta-gradient (MATH.md (1), (3)) for every problem.
    exact: bool = False
    @property
    def proximal(self) -> Optional[float]:
        """λ of a proximal term ``(λ/2)‖φ − θ‖²`` the inner loop adds to every step's loss, or
        ``None``."""
        return None
    #: It rebuilds the last inner step from its closure, which a step taken from a loss tensor
    #: (:meth:`MetaGradient.step_from_loss <metagrad.MetaGradient.step_from_loss>`) lacks.
    needs_closure: bool = False

    def why_not_pure(self, traced: bool = True) -> Optional[str]:
        """Why :func:`metagrad.functional.meta_grad`, a pure function that runs under
        ``torch.func.vmap`` and ``torch.compile``, cannot run this estimator: the rest of a
        ``ValueError`` message after ``"estimator: "``. ``None`` where it can. ``traced``: the
        call runs under such a transform (``False``: called directly, where reading a value back
        as a Python float works).

        Here: a proximal term, which the pure inner loop does not add, and a differentiable
        trajectory, which it does not build (Full overrides this: it has its own branch there).
        An estimator that reads values back as Python floats says so in its override, for a
        traced call.
        """
        if self.proximal is not None:
            return (f"{self!r} is not supported by meta_grad: its inner loop adds a proximal term "
                    f"(λ={self.proximal}), which meta_grad's does not. Use mg.Checkpointed(), "
                    "mg.Full(), or MetaGradient(estimator=...).")
        if self.differentiable:
            return (f"{self!r} needs a differentiable trajectory (differentiable=True), which "
                    "meta_grad does not build; only mg.Full() is computed that way, in its own branch.")
        return None

    def keep(self) -> Optional[int]:
        """How many of the most recent inner steps to store; ``None`` stores all."""
        return None

    def snapshot_schedule(self) -> Optional[Schedule]:
        """Which iterates the inner loop stores (:mod:`metagrad.snapshots`); ``None`` stores all.
        The trajectory recomputes the others, from the snapshot before them, for the products
        that need them (:meth:`TrajectoryView.restore`)."""
        return None

    def why_not_tasks(self) -> Optional[str]:
        """Why a block over several tasks (``MetaGradient(tasks=T)``) cannot run this estimator:
        the rest of a ``ValueError`` message after ``"estimator: "``; ``None`` where it can. A
        block over tasks differentiates the sum of the tasks' inner losses, so an estimator
        whose products act task by task (each one a sweep of step products) gives what T
        separate blocks give; one that chooses something from norms or inner products over
        the whole vector (an order, a solver's residual) would choose it for all tasks at once,
        unless it chooses per task (``trajectory.tasks``), as Implicit's solvers and
        ``Binomial(order="auto")`` do. Every estimator of the package can."""
        return None

    def length_warning(self, steps: int) -> Optional[str]:
        """A warning about running this estimator on an inner loop of K = ``steps`` steps (an order
        beyond K), or ``None``. Said once K is known: when a block with a backward through it has
        ended (an earlier backward, after k < K steps, cannot know K), and by ``meta_grad`` before
        its inner loop. A backward through fewer steps than the order (``meta.weights_at(k)``)
        differentiates all of them, silently."""
        return None

    def under_compile(self) -> "Estimator":
        """The estimator a block with ``compile=`` runs in this one's place: itself, unless its
        backward cannot be a compiled call and an exact equivalent can (Full: the iterates
        stored and pulled back by compiled sweeps, :meth:`Full.under_compile
        <metagrad.Full.under_compile>`). ``meta.info["compiled"]["estimator"]`` names it."""
        return self

    @abc.abstractmethod
    def backward(self, trajectory: TrajectoryView, steps: int, v: Params
                 ) -> tuple[Params, list[Optional[torch.Tensor]], dict[str, Any]]:
        """Return the meta-gradient estimate for θ and for η, and a report.

        Args:
            trajectory: the stored inner loop; ``trajectory.meta`` lists η.
            steps: K, the number of inner steps the query loss was built after.
            v: ``∇L_val(φ_K)``, name→tensor.

        Returns:
            ``(g, g_meta, info)``: the θ-estimate with the layout of ``v``; the η-estimate
            through the inner loop, one entry per ``trajectory.meta`` (``None`` for zero, and
            the list may be shorter: missing entries are zero); and a dict of what was done
            (read by users as ``meta.info``).
        """

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))


def sweep_back(trajectory: TrajectoryView, first: int, last: int, u: Params,
               state_adjoint: Optional[list[Optional[torch.Tensor]]] = None, *, verify_every: int = 0
               ) -> tuple[Params, MetaGrads, Optional[list[Optional[torch.Tensor]]]]:
    """``u`` pulled back through steps ``last − 1`` down to ``first`` (MATH.md (1): the last
    step's factor acts first) and ``Σ_m B_mᵀ a_{m+1}`` (MATH.md (3)), by runs of steps, each
    the longest of the trajectory's ``runs`` that fits (:meth:`TrajectoryView.sweep`; runs of
    :data:`SWEEP` and single steps for the context manager's, as long as the iterates' size
    allows: :attr:`metagrad.tape.OnTape.runs`). ``state_adjoint``: carry the optimizer state's
    adjoint (``[]`` starts from zero); ``None`` holds the state constant. ``verify_every``:
    run the queued replay checks after every that many steps (a run never crosses one); 0
    where none are queued."""
    meta: MetaGrads = []
    since = 0
    while last > first:
        room = last - first if not verify_every else min(verify_every - since, last - first)
        size = next(run for run in trajectory.runs if run <= room)
        u, grads, state_adjoint = trajectory.sweep(last - size, last, u, state_adjoint)
        meta = add_meta(meta, grads)
        last, since = last - size, since + size
        if verify_every and since == verify_every:
            trajectory.verify()
            since = 0
    return u, meta, state_adjoint


@overload
def check_count(value: Any, argument: str, *, minimum: int, allow_none: Literal[False] = False) -> int: ...
@overload
def check_count(value: Any, argument: str, *, minimum: int, allow_none: bool) -> Optional[int]: ...
def check_count(value: Any, argument: str, *, minimum: int, allow_none: bool = False) -> Optional[int]:
    """Validate an integer argument; the error names it, the value and what is accepted."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        accepted = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise TypeError(f"{argument}: expected {accepted}, got {type(value).__name__} {value!r}.")
    if value < minimum:
        accepted = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{argument}: expected {accepted}, got {value!r}.")
    return value


def beyond_steps(value: int, steps: int, what: str, name: str) -> Optional[str]:
    """The warning that an order or step count exceeds the block's K inner steps, so that every
    step is differentiated (:meth:`Estimator.length_warning`), or ``None`` where it does not."""
    if value <= steps:
        return None
    return (f"{what}: {name}={value} exceeds the number of inner steps K={steps}; using {name}={steps}, "
            f"which differentiates through every inner step (the exact meta-gradient with plain gradient "
            f"descent; with momentum or Adam the optimizer state is held constant in each step). Pass "
            f"{name} <= K to silence this warning.")
