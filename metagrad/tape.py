"""The tape: what one inner loop recorded, step by step.

For each step k the tape keeps a :class:`~metagrad.step.StepRecord`: the iterate φ_k and the
update rule's state (unless snapshots thinned it out), the step's loss, and the closure that
gave it, frozen with the values it captured and the generator states it started from
(:mod:`metagrad.frozen`). With snapshots (:mod:`metagrad.snapshots`) iterates are stored only
at a thinned schedule, and :meth:`Tape.restore` recomputes the others with the step the
caller gives (the context manager's rebuilt closure, the functional face's pure body); the
tape counts what is held. Both faces record into it. It also holds where the trajectory is in its life
(:class:`Lifetime`) and, per thread, whether an inner step being built will be differentiated
twice (:func:`second_order`, for nested blocks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Optional

from .errors import NestedBlockError
from .update_rule import Params, State
from .snapshots import Schedule
from .step import StepRecord, nbytes

__all__ = ["Tape", "OnTape", "Lifetime", "NestedBlockError", "differentiated_twice", "second_order", "RUN_BYTES"]

#: A run of steps one sweep pulls a vector back through (one compiled call) spans at most this
#: many bytes of fast weights: its length times one iterate's bytes (all tasks'). Longer runs
#: save a call per step on small models, where a call's overhead is most of a step; on larger
#: ones they mostly take longer to compile (CNN4 28×28, K = 5, one thread on a 2-core AMD EPYC:
#: runs of 4 compiled in 249 s against 84 s for single steps, for 1.03× against 1.12× of eager
#: Full per block).
RUN_BYTES = 2**18


_nesting = threading.local()


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


class Tape:
    """The records of one inner loop's steps, and the iterates and optimizer states held.

    Args:
        theta: φ_0.
        state: the update rule's state at φ_0.
        keep: how many of the most recent steps to store; ``None`` stores all. The last
            step's record (without its iterate) is kept whatever ``keep`` is.
        snapshots: store the iterates only at the snapshots of this schedule; ``None``: all.
    """

    def __init__(self, theta: Params, state: State, *, keep: Optional[int],
                 snapshots: Optional[Schedule]) -> None:
        self.steps: dict[int, StepRecord] = {}
        #: The number of steps taken, K.
        self.length = 0
        #: The last step taken, kept whatever ``keep`` is (Implicit's fixed-point step is its loss at φ_K).
        self.last: Optional[StepRecord] = None
        #: The current fast weights φ_K and the rule's state there.
        self.current: Params = dict(theta)
        self.state: State = state
        self.keep = keep
        self.lifetime = Lifetime()
        #: Per step: the update's graph to the rule's η, with the gradient held constant.
        self.first_order: dict[int, Params] = {}
        # Snapshots (metagrad.snapshots): the schedule, its stride now, the steps whose iterate
        # is stored (sorted), those that stay stored whatever the stride, the steps whose
        # iterate is neither stored nor recomputed now, and the recomputed segments (first
        # step → the steps filled in).
        self.schedule = snapshots
        self.stride = 1 if snapshots is None else snapshots.stride
        self.stored: list[int] = []
        self.pinned: set[int] = set()
        self.absent: set[int] = set()
        self.restored: dict[int, list[int]] = {}
        #: Inner steps recomputed forward from a snapshot so far.
        self.recomputed_steps = 0
        #: The bytes of the iterates and optimizer states held now, and the most held at once.
        self.iterate_bytes = 0
        self.peak_iterate_bytes = 0
        #: The iterates held now, and the most held at once (stored and recomputed).
        self.held = 0
        self.peak_iterates = 0

    def append(self, step: StepRecord, new_params: Params, new_state: State) -> None:
        """Record step K (taken from ``step.params``) and move to φ_{K+1} = ``new_params``."""
        k = self.length
        if self.keep is None or self.keep > 0:
            self.steps[k] = step
            self.hold(step, +1)
            if self.keep is not None:
                dropped = self.steps.pop(k - self.keep, None)
                if dropped is not None:
                    self.hold(dropped, -1)
            self.last = step
            if self.schedule is not None:
                self.thin(k, step)
        else:  # nothing is stored: keep how the step ran, not its iterate
            self.last = dataclasses.replace(step, params={}, state={}, graph=None)
        self.length += 1
        self.current, self.state = new_params, new_state

    def hold(self, step: StepRecord, sign: int) -> None:
        """Count step's iterate and state in (``sign=+1``) or out (``-1``) of what is held."""
        self.held += sign
        self.iterate_bytes += sign * nbytes(step.params, step.state)
        self.peak_iterates = max(self.peak_iterates, self.held)
        self.peak_iterate_bytes = max(self.peak_iterate_bytes, self.iterate_bytes)

    def drop(self, m: int) -> None:
        """Free step m's iterate, state and step-size graph (closure and loss stay)."""
        step = self.steps[m]
        self.hold(step, -1)
        step.params, step.state = {}, {}
        self.first_order.pop(m, None)
        self.absent.add(m)

    def thin(self, k: int, step: StepRecord) -> None:
        """Online uniform thinning (metagrad.snapshots): keep φ_k if k is a multiple of the
        stride, then double the stride while more snapshots are stored than the schedule
        allows. A step taken from a given loss, and the step after it, stay stored: its graph
        was kept, not its closure, so it cannot be recomputed."""
        assert self.schedule is not None
        if k == 0:
            self.schedule = self.schedule.for_bytes(nbytes(step.params, step.state))
        if step.graph is not None or (k > 0 and self.steps[k - 1].graph is not None):
            self.pinned.add(k)
        if k % self.stride and k not in self.pinned:
            self.drop(k)
            return
        self.stored.append(k)
        while len(self.stored) - len(self.pinned) > self.schedule.limit(self.stride):
            self.stride *= 2
            for m in self.stored:
                if m % self.stride and m not in self.pinned:
                    self.drop(m)
            self.stored = [m for m in self.stored if m not in self.absent]

    def restore(self, first: int, last: int, recompute: Callable[[int, int], None],
                before_free: Callable[[], None]) -> None:
        """Make the iterates φ_first … φ_last available: each segment between two stored
        iterates that holds one of them is recomputed (``recompute(start, end)``, which calls
        :meth:`recompute`), unless it is already; segments recomputed before that hold none of
        them are freed first, after ``before_free()`` (the replay checks that compare with
        them). Without snapshots it does nothing."""
        if self.schedule is None or not self.absent:
            return
        first, last = max(first, 0), min(last, self.length - 1)
        needed = []
        for i, start in enumerate(self.stored):
            end = self.stored[i + 1] if i + 1 < len(self.stored) else self.length
            if max(start + 1, first) <= min(end - 1, last):  # an iterate of the window inside
                needed.append((start, end))
        for start in [s for s in self.restored if s not in dict(needed)]:
            before_free()
            for m in self.restored.pop(start):
                self.drop(m)
        for start, end in needed:
            if start not in self.restored:
                recompute(start, end)

    def recompute(self, start: int, end: int,
                  advance: Callable[[int, StepRecord, Params, State], tuple[Params, State]]) -> tuple[Params, State]:
        """Run steps start … end−1 again from the snapshot φ_start with ``advance(m, record,
        φ_m, s_m) -> (φ_{m+1}, s_{m+1})``, filling in the iterates between; return the last
        (φ_end recomputed, which the caller may check against the stored one)."""
        params, state = self.steps[start].params, self.steps[start].state
        filled = []
        for m in range(start, end):
            step = self.steps[m]
            if m > start:
                step.params, step.state = params, state
                self.absent.discard(m)
                self.hold(step, +1)
                filled.append(m)
            params, state = advance(m, step, params, state)
        self.restored[start] = filled
        self.recomputed_steps += end - start
        return params, state

    def forget(self) -> None:
        """Free every recomputed iterate (the end of a backward)."""
        for start in list(self.restored):
            for m in self.restored.pop(start):
                self.drop(m)

    def storage(self) -> dict[str, int]:
        """What a backward reports about storage (``meta.info``): the iterates held now, the
        steps recomputed so far, and the most iterates (and bytes, with optimizer states) held
        at once."""
        return {"stored_iterates": self.held, "recomputed_steps": self.recomputed_steps,
                "peak_iterates": self.peak_iterates, "peak_iterate_bytes": self.peak_iterate_bytes}

    def release(self) -> None:
        """Drop every record, iterate and graph; later use raises a clear error."""
        self.steps, self.first_order = {}, {}
        self.restored, self.absent, self.stored = {}, set(), []
        self.last = None
        self.current, self.state = {}, {}
        self.lifetime.released = True


class OnTape:
    """What a trajectory of either face reads off its :class:`Tape` (``self.tape``) as it is:
    K, the current fast weights, the iterates held and their bytes, the steps recomputed."""

    tape: Tape
    #: The run lengths :attr:`runs` chooses from, longest first (1 last).
    run_lengths: tuple[int, ...] = (1,)
    #: Whether rebuilt steps are queued for the replay check (:mod:`metagrad.replay`), which
    #: ``verify`` runs: the context manager's, unless ``check_replay=False``.
    checked = False

    @property
    def runs(self) -> tuple[int, ...]:
        """The lengths of the runs of steps a sweep is asked for, longest first: those of
        :attr:`run_lengths` whose run spans at most :data:`RUN_BYTES` of fast weights, and 1."""
        size = sum(t.nbytes for t in self.tape.current.values())
        return tuple(run for run in self.run_lengths if run == 1 or run * size <= RUN_BYTES)

    @property
    def length(self) -> int:
        """The number of inner steps taken, K."""
        return self.tape.length

    @property
    def current(self) -> Params:
        """The current fast weights φ_K (graph-carrying for a differentiable trajectory)."""
        return self.tape.current

    @property
    def stored_iterates(self) -> int:
        """How many iterates φ_k (k < K) are held now: every stored step's, or, with snapshots,
        the snapshots' and those recomputed for backward."""
        return self.tape.held

    @property
    def recomputed_steps(self) -> int:
        """Inner steps recomputed forward from a snapshot so far."""
        return self.tape.recomputed_steps

    @property
    def iterate_bytes(self) -> int:
        """The bytes of the iterates and optimizer states held now."""
        return self.tape.iterate_bytes
