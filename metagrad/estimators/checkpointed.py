"""Checkpointed: the exact meta-gradient, one rebuilt step graph at a time (MATH.md table)."""

from __future__ import annotations

from typing import Any, Optional, Union

from ..memory import parse_bytes
from ..optim import Params
from ..snapshots import Schedule
from ..trajectory import MetaGrads, Trajectory, add_meta
from .base import Estimator

__all__ = ["Checkpointed"]


class Checkpointed(Estimator):
    """Exact meta-gradient from stored iterates, with one step graph alive at a time.

    The inner loop stores the iterates ``φ_0 … φ_{K−1}`` only. Backward runs
    ``u ← J_mᵀ u`` for m = K−1 … 0 from ``u = v`` (for SGD, ``u ← u − αH_m u``),
    rebuilding step m's graph at φ_m for one double backward and freeing it. With a
    stateful update rule (momentum, Adam) the adjoint of the optimizer state is carried
    through the vector-Jacobian product of the whole step, so the result stays exact
    (MATH.md, "Optimizers other than plain gradient descent").
    Memory: K iterates plus one step graph. Time: about one extra forward and
    backward per step compared with Full.

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
    snapshots plus one segment of fewer than 2K/S iterates (``"sqrt"``: about 2.1√K in all).
    Steps taken from a given loss (adapters without a closure) cannot be recomputed: their
    iterates, and the next, stay stored. ``meta.info`` reports ``stored_iterates``,
    ``recomputed_steps``, ``peak_iterates`` and ``peak_iterate_bytes``.

    Args:
        snapshots: the most iterates stored during the inner loop (an integer >= 1),
            ``"sqrt"`` (about √K), or ``None`` (all K: no recomputation).
        max_memory: in place of ``snapshots``, the bytes the stored iterates may take, as an
            integer or a string such as ``"1GiB"`` or ``"500MB"``: ``snapshots`` is then the
            most iterates (with their optimizer states) that fit, known at the first inner step.
            The recomputed segment of backward comes on top.
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
            return f"Checkpointed(max_memory={self.max_memory})"
        return "Checkpointed()" if self.snapshots is None else f"Checkpointed(snapshots={self.snapshots!r})"

    def snapshot_schedule(self) -> Optional[Schedule]:
        if self.max_memory is not None:
            return Schedule(max_bytes=self.max_memory)
        return None if self.snapshots is None else Schedule(capacity=self.snapshots)

    def backward(self, trajectory: Trajectory, steps: int, v: Params
                 ) -> tuple[Params, MetaGrads, dict[str, Any]]:
        u, state_adjoint = dict(v), []  # the query does not depend on the optimizer state
        meta: MetaGrads = []
        # With snapshots, vjp(m) recomputes m's segment from its snapshot when it first needs
        # it (Trajectory.restore) and frees the one after: sweeping backwards, each segment once.
        for m in reversed(range(steps)):  # MATH.md (1): the last step's factor acts first
            u, grads, state_adjoint = trajectory.vjp(m, u, state_adjoint)
            meta = add_meta(meta, grads)  # MATH.md (3): B_mᵀ a_{m+1}
        return u, meta, {"steps": steps, "hessian_vector_products": steps}
