"""The user's module evaluated at fast weights, and the buffer policy.

Buffer policy (MATH.md, "Numerics that bite"): metagrad never writes to a buffer.
Every inner step, every rebuilt step graph and the query see the buffers as they
are. A normalization layer (BatchNorm, InstanceNorm) in training mode normalizes
with the statistics of the batch it is given and leaves its running statistics
untouched; in eval mode it uses the stored running statistics. This is what
MAML does, and it is the only policy under which a step graph rebuilt later, or
rebuilt inside ``torch.func.vmap``, computes the same function as the step the
inner loop took.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional

import torch
from torch.func import functional_call
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["FunctionalModel"]

_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


class FunctionalModel:
    """A module called at given fast weights, without touching the module.

    ``fmodel(*args, **kwargs)`` runs ``module.forward`` with its trainable
    parameters replaced by :attr:`params` (``torch.func.functional_call``).
    Parameters that do not require grad, and buffers, are taken from the module
    (see the module docstring for the buffer policy).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        params: Mapping[str, torch.Tensor],
        *,
        guard: Optional[Callable[[], None]] = None,
    ) -> None:
        self._module = module
        self._params = dict(params)
        self._guard = guard

    @property
    def module(self) -> torch.nn.Module:
        """The wrapped module (never modified)."""
        return self._module

    @property
    def params(self) -> Mapping[str, torch.Tensor]:
        """The fast weights, as a read-only name→tensor mapping."""
        if self._guard is not None:
            self._guard()
        return types.MappingProxyType(self._params)

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Iterate over ``(name, fast weight)`` pairs, like ``nn.Module.named_parameters``."""
        return iter(self.params.items())

    def parameters(self) -> Iterator[torch.Tensor]:
        """Iterate over the fast weights, like ``nn.Module.parameters``."""
        return iter(self.params.values())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._guard is not None:
            self._guard()
        tensors = {**_frozen_buffers(self._module), **self._params}
        return functional_call(self._module, tensors, args, kwargs)

    def __repr__(self) -> str:
        return f"FunctionalModel({type(self._module).__name__}, {len(self._params)} fast weights)"


def _frozen_buffers(module: torch.nn.Module) -> dict[str, Optional[torch.Tensor]]:
    """Replacement buffers that implement the buffer policy.

    For a normalization layer in training mode that tracks running statistics,
    the statistics are replaced by ``None``: it then normalizes with batch
    statistics and updates nothing. Every other buffer is left as it is.
    """
    frozen: dict[str, Optional[torch.Tensor]] = {}
    for prefix, sub in module.named_modules():
        if isinstance(sub, _NormBase) and sub.training and sub.track_running_stats:
            for stat in _RUNNING_STATS:
                frozen[f"{prefix}.{stat}" if prefix else stat] = None
    return frozen
