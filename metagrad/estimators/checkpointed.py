"""Checkpointed: the exact meta-gradient, one rebuilt step graph at a time (MATH.md table)."""

from __future__ import annotations

from typing import Any, Optional, Union

from ..memory import format_bytes, parse_bytes
from ..update_rule import Params
from ..snapshots import Schedule
from ..discovery import MetaGrads
from .base import Estimator, TrajectoryView, sweep_back

__all__ = ["Checkpointed"]

#: Replay checks queued at most (one batch), the vectors each holds while its batch runs (the
#: rebuilt, stored and starting iterates, stacked and flattened, and their differences), and
#: the bytes a batch may hold: measured on an 8-256-256-1 MLP, checking each step alone was
#: faster there (0.45 s against 0.64 s for K=200) and 16% slower on a 1-40-40-1 MLP.
CHECK_QUEUE, CHECK_ROWS, CHECK_BYTES = 16, 8, 2**20


class Checkpointed(Estimator):
    """Exact meta-gradient from stored iterates, with one step graph alive at a time.

    The inner loop stores the iterates ``φ_0 … φ_{K−1}`` only. Backward runs
    ``u ← J_mᵀ u`` for m = K−1 … 0 from ``u = v`` (for SGD, ``u ← u − αH_m u``),
    rebuilding step m's graph at φ_m for one double backward and freeing it. With a
    stateful update rule (momentum, Adam) the adjoint of the optimizer state is carried
    through the vector-Jacobian product of the whole step, so the result stays exact
    (MATH.md, "Optimizers other than plain gradient descent").
    Memory: K iterates plus one step graph and a few vectors (the adjoint, the product, the
    rebuilt step, the replay check's rows: their checks run together in batches of at most 16
    steps, or fewer, so that their rows hold at most about 1 MiB; every step with snapshots or
    ``max_memory``). Measured (``python -m benchmarks.budget``, tensor memory, 8-256-256-1 MLP,
    K=200): the backward's peak above the stored iterates was 8 iterates. Time: about one extra
    forward and backward per step compared with Full.

    Meta-parameters η (MATH.md (3)): the same sweep gives ``B_mᵀ u`` at every step with the
    same rebuilt graph, and their sum is η's exact gradient through the inner loop.

    **Snapshots.** With ``snapshots=S`` the inner loop stores only some iterates (with their
    optimizer states), by online uniform thinning (:mod:`metagrad.snapshots`): every iterate
    at first, then, whenever more than S are stored, the stride between them doubles and every
    other one is dropped, so that at any K the snapshots are ``φ_0, φ_σ, φ_2σ, …``, between
    S/2 and S of them (K is the user's loop's to decide, so the schedule cannot wait for it).
    ``snapshots="sqrt"`` lets at most twice the stride be stored: stride and count both lie
    between √(K/2) and √(2K). Backward recomputes each segment's iterates forward from its
    snapshot, as the steps were taken (frozen closure, generator states, modes, autocast),
    just before its sweep, and frees them after: every segment once, K recomputed steps in
    all (a forward and a gradient each, no second derivative), so the time is about one inner
    step per step more than without snapshots. Every recomputed step's loss is checked
    against the recorded one, and the iterate it arrives at against the next snapshot (the
    replay check, MATH.md "Replaying a step"). The result is the same to rounding. Memory: S
    snapshots plus one segment of fewer than 2K/S iterates (``"sqrt"``: at most about 2.12√K in
    all, ``meta.info["peak_iterates"]``: 28 at K=200, 63 at K=1000), plus what backward holds
    without snapshots (above).
    Steps taken from a given loss (adapters without a closure) cannot be recomputed: their
    iterates, and the next, stay stored. ``meta.info`` reports ``stored_iterates``,
    ``recomputed_steps``, ``peak_iterates`` and ``peak_iterate_bytes``.

    Args:
        snapshots: the most iterates stored during the inner loop (an integer >= 1),
            ``"sqrt"`` (about √K), or ``None`` (all K: no recomputation).
        max_memory: in place of ``snapshots``, the bytes the iterates (with their optimizer
            states) may take at once, in the inner loop and in backward, as an integer or a
            string such as ``"1GiB"`` or ``"500MB"``. Of the n iterates that fit,
            :data:`~metagrad.snapshots.RESERVE` are left for backward's vectors, and at stride σ
            at most ``n − RESERVE − max(σ − 1, 1)`` snapshots are stored, so that they and one
            recomputed segment fit (:mod:`metagrad.snapshots`). That holds for up to about
            ``((n − RESERVE)/2)²`` inner steps; the step beyond is refused with a
            :class:`ValueError` that names the smallest budget for it, before the budget is
            exceeded. One step graph comes on top, as for every budget that does not know the
            graph's size before the first step (``Trajectory.graph_bytes`` measures it).
    """

    exact = True

    def __init__(self, snapshots: Union[int, str, None] = None, *,
                 max_memory: Union[int, str, None] = None) -> None:
        if snapshots is not None and max_memory is not None:
            raise ValueError(
                f"Checkpointed(max_memory): give a number of snapshots or a memory budget, not both; "
                f"got snapshots={snapshots!r} and max_memory={max_memory!r}."
            )
        accepted = "expected an integer >= 1, 'sqrt' or None"
        if snapshots is not None and snapshots != "sqrt":
            if isinstance(snapshots, bool) or not isinstance(snapshots, (int, str)):
                raise TypeError(f"Checkpointed(snapshots): {accepted}, got "
                                f"{type(snapshots).__name__} {snapshots!r}.")
            if isinstance(snapshots, str) or snapshots < 1:
                kind = "str " if isinstance(snapshots, str) else ""
                raise ValueError(f"Checkpointed(snapshots): {accepted}, got {kind}{snapshots!r}.")
        self.snapshots = snapshots
        self.max_memory = None if max_memory is None else parse_bytes(max_memory, "Checkpointed(max_memory)")

    def __repr__(self) -> str:
        if self.max_memory is not None:
            return f"Checkpointed(max_memory={format_bytes(self.max_memory)!r})"
        return "Checkpointed()" if self.snapshots is None else f"Checkpointed(snapshots={self.snapshots!r})"

    def snapshot_schedule(self) -> Optional[Schedule]:
        if self.max_memory is not None:
            return Schedule(max_bytes=self.max_memory)
        return None if self.snapshots is None else Schedule(capacity=self.snapshots)

    def backward(self, trajectory: TrajectoryView, steps: int, v: Params
                 ) -> tuple[Params, MetaGrads, dict[str, Any]]:
        # Each rebuilt step's replay check is queued (Trajectory.verify runs the queue): a batch
        # of checks holds about CHECK_ROWS vectors per step, so it is kept below CHECK_BYTES, and
        # to one step where the iterates are budgeted. Where nothing is checked, the runs of steps
        # are the trajectory's own (TrajectoryView.runs).
        size = sum(t.numel() * t.element_size() for t in v.values())
        every = max(1, min(CHECK_QUEUE, CHECK_BYTES // max(CHECK_ROWS * size, 1))) if trajectory.checked else 0
        if self.snapshots is not None or self.max_memory is not None:
            every = 1
        # With snapshots, vjp(m) recomputes m's segment from its snapshot when it first needs
        # it (Trajectory.restore) and frees the one after: sweeping backwards, each segment once.
        # The optimizer state's adjoint is carried, from zero: the query does not depend on it.
        u, meta, _ = sweep_back(trajectory, 0, steps, dict(v), [], verify_every=every)
        return u, meta, {"steps": steps, "hessian_vector_products": steps}
