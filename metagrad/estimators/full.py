"""Full: autograd through the unrolled inner loop (MATH.md (1), table row "Full")."""

from __future__ import annotations

from typing import Any

import torch

from ..update_rule import Params
from ..discovery import MetaGrads
from .base import Estimator, TrajectoryView
from .checkpointed import Checkpointed

__all__ = ["Full"]


class Full(Estimator):
    """The exact meta-gradient by autograd through the unrolled inner loop.

    The inner loop runs with ``create_graph=True`` and keeps K step graphs in
    memory. Exact for any differentiable update rule. The reference every other
    estimator is measured against.

    ``meta.fmodel`` holds the unrolled fast weights themselves, so the query's
    ``.backward()`` runs through the query and the K step graphs in one autograd pass,
    as a hand-written unroll does (a pass-through node makes the block's checks).
    :meth:`backward` is the same product for callers that hold a trajectory.

    With ``compile=`` (:class:`~metagrad.MetaGradient`) a block runs :meth:`under_compile`'s
    exact path instead: autograd's double backward through a compiled function does not exist
    in this torch, so the iterates are stored and the backward pulls the query's gradient
    back through them by compiled step products (Checkpointed without snapshots), the same
    meta-gradient to rounding. What that path needs, Full's does not: each step's closure is
    called again during backward and checked against the step taken (a closure that reads an
    iterator raises :class:`~metagrad.ReplayError`), and the meta-gradient cannot be
    differentiated again (``create_graph=True`` raises). Run such a block with ``compile=False``.
    """

    differentiable = True
    exact = True

    def why_not_pure(self, traced: bool = True) -> str | None:
        return None  # meta_grad's own branch: torch.func.grad through the unroll

    def under_compile(self) -> Estimator:
        """:class:`Checkpointed` with every iterate stored: Full's meta-gradient by compiled
        sweeps."""
        return Checkpointed()

    def backward(self, trajectory: TrajectoryView, steps: int, v: Params
                 ) -> tuple[Params, MetaGrads, dict[str, Any]]:
        final = trajectory.iterate(steps)
        theta = trajectory.theta
        # retain_graph: the query loss may be backpropagated more than once while the
        # block is open; the graph is freed when the trajectory is released. Meta-parameters
        # η need nothing here: the unrolled graph reaches them, and autograd carries them.
        grads = torch.autograd.grad([final[n] for n in v], [theta[n] for n in v],
                                    [v[n] for n in v], retain_graph=True, allow_unused=True)
        g = {n: torch.zeros_like(v[n]) if t is None else t for n, t in zip(v, grads)}
        return g, [], {"steps": steps, "hessian_vector_products": steps}
