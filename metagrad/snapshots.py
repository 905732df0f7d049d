"""Which iterates the inner loop stores, when not all of them (``Checkpointed(snapshots=S)``,
``Binomial(block=S, snapshots=True)``).

The trajectory always keeps every step's frozen closure, generator states, modes and loss
(small), and the iterates ``φ_k`` (with the optimizer state they start from) only at the
*snapshots*: the multiples of a stride σ. Backward recomputes the iterates between two
snapshots forward from the earlier one, one segment at a time
(:meth:`metagrad.trajectory.Trajectory.restore`).

K is decided by the user's loop, so the stride is chosen online, by **uniform thinning**: it
starts at ``stride`` and doubles, dropping every other snapshot, whenever more snapshots are
stored than the capacity allows. At any K the snapshots are then ``φ_0, φ_σ, φ_2σ, …`` with

- ``capacity=S``: at most S snapshots, and more than S/2 once thinning started, so the
  segments hold fewer than 2K/S steps: backward holds about ``(S + 2K/S)`` iterates;
- ``capacity="sqrt"``: at most 2σ snapshots, and more than σ/2, so the stride and the number
  of snapshots both lie between √(K/2) and √(2K): backward holds at most about 2.1√K iterates
  at once (the snapshots and one segment), within 6% of the best possible ``2√K`` for
  segments recomputed once each;
- ``capacity=None``: the stride never changes (``Binomial(block=S, snapshots=True)``
  stores every S-th iterate: K/S snapshots);
- ``max_bytes=B`` (``Checkpointed(max_memory=B)``): with n the iterates (and optimizer states)
  that B holds, less :data:`RESERVE` for backward's vectors, at most ``n − max(σ − 1, 1)``
  snapshots at stride σ, so that the snapshots and one recomputed segment (σ − 1 iterates), or
  the snapshots and the step just taken (before thinning drops it), never hold more than n. Where no stride fits, the step is refused with a :class:`ValueError` that names
  the smallest budget for that many steps (:func:`most_steps`: about ``(n/2)²`` steps).

Each segment is recomputed once per backward: K recomputed steps, one forward and one
gradient each (no ``create_graph``), about one extra inner step per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

__all__ = ["Schedule", "most_steps", "RESERVE"]

#: Iterates' worth of memory ``Schedule(max_bytes=...)`` leaves for backward's vectors (the
#: adjoint, the product, the gradient, the replay check's rows), besides the iterates it holds.
RESERVE = 8


@dataclass(frozen=True)
class Schedule:
    """Online uniform thinning of the stored iterates (see the module docstring).

    Args:
        capacity: the most snapshots stored (an integer >= 1), ``"sqrt"`` (at most twice the
            stride: about √K), or ``None`` (no limit: the stride stays ``stride``).
        stride: the stride to start from (>= 1).
        max_bytes: in place of an integer capacity, the bytes the snapshots may take; the
            capacity is then ``max_bytes // (bytes of one iterate and its optimizer state)``,
            known at the first step (:meth:`for_bytes`).
    """

    capacity: Union[int, str, None] = None
    stride: int = 1
    max_bytes: Optional[int] = None
    #: With ``max_bytes``: the bytes of one iterate and its optimizer state (:meth:`for_bytes`).
    iterate_bytes: Optional[int] = None

    def limit(self, stride: int) -> float:
        """The most snapshots that may be stored at ``stride`` before it doubles."""
        if self.capacity == "sqrt":
            return 2 * stride
        if self.iterate_bytes is not None and self.max_bytes is not None:
            room = _room(self.max_bytes, self.iterate_bytes) - max(stride - 1, 1)
            if room < 1:
                self._refuse()
            return room
        return math.inf if not isinstance(self.capacity, int) else self.capacity

    def for_bytes(self, iterate_bytes: int) -> "Schedule":
        """The schedule a byte budget gives for iterates of this size (known at the first step);
        a budget below ``1 + RESERVE`` iterates is refused with a :class:`ValueError`."""
        if self.max_bytes is None:
            return self
        size = max(iterate_bytes, 1)
        schedule = Schedule(stride=self.stride, max_bytes=self.max_bytes, iterate_bytes=size)
        if _room(self.max_bytes, size) < 1:
            schedule._refuse(steps=1)
        return schedule

    def _refuse(self, steps: Optional[int] = None) -> None:
        """Raise: the budget holds no schedule for one more step (``steps``: for that many)."""
        size, budget = self.iterate_bytes, self.max_bytes
        assert size is not None and budget is not None
        most = most_steps(_room(budget, size))
        steps = most + 1 if steps is None else steps
        room = max(_room(budget, size), 1)
        while most_steps(room) < steps:
            room += 1
        need = (room + RESERVE) * size
        raise ValueError(
            f"Checkpointed(max_memory): got {budget} bytes, which holds {budget // size} iterates of "
            f"{size} bytes (with their optimizer state); the snapshots and one recomputed segment, "
            f"plus {RESERVE} iterates' worth for backward's vectors, fit at most {most} inner steps, "
            f"and step {steps} was taken. The smallest budget for {steps} steps is {need} bytes "
            f"(max_memory='{math.ceil(need / 2**20)}MiB' or more); or pass snapshots='sqrt', which "
            "holds about 2.1·√K iterates at any K."
        )


def _room(budget: int, size: int) -> int:
    """The iterates a budget leaves for snapshots and a segment."""
    return budget // size - RESERVE


def most_steps(room: int) -> int:
    """The most inner steps ``Schedule(max_bytes=...)`` takes with ``room`` iterates for the
    snapshots and one recomputed segment: at stride σ (1, 2, 4, …) it stores up to
    ``room − max(σ − 1, 1)`` snapshots, the multiples of σ, so step k is taken while
    ``k // σ + 1`` fits at some stride; 0 if ``room < 1``."""
    most, stride = 0, 1
    while room - max(stride - 1, 1) >= 1:
        most = max(most, (room - max(stride - 1, 1)) * stride)  # steps 0 … (limit − 1)·σ + σ − 1
        stride *= 2
    return most
