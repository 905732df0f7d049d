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
  stores every S-th iterate: K/S snapshots).

Each segment is recomputed once per backward: K recomputed steps, one forward and one
gradient each (no ``create_graph``), about one extra inner step per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

__all__ = ["Schedule"]


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

    def limit(self, stride: int) -> float:
        """The most snapshots that may be stored at ``stride`` before it doubles."""
        if self.capacity == "sqrt":
            return 2 * stride
        return math.inf if self.capacity is None else self.capacity  # type: ignore[return-value]

    def for_bytes(self, iterate_bytes: int) -> "Schedule":
        """The schedule with the capacity a byte budget gives, for iterates of this size."""
        if self.max_bytes is None:
            return self
        capacity = self.max_bytes // max(iterate_bytes, 1)
        if capacity < 1:
            from .estimators.base import warn  # lazily: the estimators import the trajectory

            warn(
                f"Checkpointed(max_memory={self.max_bytes}): the budget is below one iterate with "
                f"its optimizer state ({iterate_bytes} bytes); storing one snapshot (φ_0). Raise "
                "max_memory, or pass snapshots=1 to silence this warning."
            )
            capacity = 1
        return Schedule(capacity=int(capacity), stride=self.stride)
