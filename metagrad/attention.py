"""Attention's math kernel, for graphs that are differentiated twice.

``torch.nn.functional.scaled_dot_product_attention`` (and the modules built on it:
``nn.MultiheadAttention``, ``nn.Transformer*``) picks a fused kernel where it can (flash attention,
on the CPU too; memory-efficient and cuDNN attention on a GPU). Their backward has no derivative,
so a meta-gradient through them cannot be taken, and under ``torch.func.vmap`` they have no
batching rule. Its math kernel, written with ordinary differentiable ops, has both.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

import torch

try:  # (torch.nn.attention is newer than the oldest torch metagrad runs on)
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover
    sdpa_kernel = None  # type: ignore[assignment]

__all__ = ["math_attention"]


def _sdp_flags() -> list[tuple[Callable[[], bool], Callable[[bool], None], bool]]:
    """``(read, write, wanted)`` for each scaled-dot-product-attention backend switch this
    torch has: the math kernel on, every fused one off."""
    backends = torch.backends.cuda
    names = [("math_sdp_enabled", "enable_math_sdp", True), ("flash_sdp_enabled", "enable_flash_sdp", False),
             ("mem_efficient_sdp_enabled", "enable_mem_efficient_sdp", False),
             ("cudnn_sdp_enabled", "enable_cudnn_sdp", False)]
    return [(getattr(backends, read), getattr(backends, write), wanted) for read, write, wanted in names
            if hasattr(backends, read) and hasattr(backends, write)]


_SDP_FLAGS = _sdp_flags()


def math_attention() -> ContextManager[Any]:
    """Inside, ``scaled_dot_product_attention`` runs its math kernel. Every inner step metagrad
    takes from a closure and every step it rebuilds runs inside (the same kernel in both, so
    the replay check compares like with like), the functional face's whole computation, a block
    over tasks' vmapped forward and the adapters' forwards.

    Eagerly, the backend switches (``torch.backends.cuda.enable_*_sdp``, which the CPU's flash
    kernel obeys too) are set and put back on exit (:class:`_Switch`). While TorchDynamo traces
    (``torch.compile`` of a function that calls ``mg.functional.meta_grad``), torch's
    ``sdpa_kernel``, which it traces, selects the math kernel for the traced graph."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext() if sdpa_kernel is None else sdpa_kernel(SDPBackend.MATH)
    return _Switch()


class _Switch:
    """The SDPA backend switches set to the math kernel, and put back on exit."""

    __slots__ = ("_before",)

    def __enter__(self) -> None:
        self._before = [read() for read, _, _ in _SDP_FLAGS]
        for _, write, wanted in _SDP_FLAGS:
            write(wanted)

    def __exit__(self, *exc: Any) -> None:
        for (_, write, _), was in zip(_SDP_FLAGS, self._before):
            write(was)
