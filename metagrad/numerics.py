"""A scoped switch for GPU numerics that meta-gradient comparisons need (MATH.md, "Numerics that bite").

On an H200 with PyTorch's default TF32 convolutions, two identical Full meta-gradients of
a 4-conv net disagreed by 9–12%; with TF32 off they still disagreed by 3.5% at K = 20
until cuDNN was made deterministic. metagrad never changes these global flags on its
own; this context manager changes them for a block and restores them after::

    with mg.numerics.exact_gpu():
        ...  # accuracy comparisons, benchmarks' error columns

It does nothing harmful on a CPU-only build: the flags exist there and are ignored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["exact_gpu", "tf32_enabled"]


def tf32_enabled() -> bool:
    """Whether matmuls or cuDNN convolutions may use TF32 right now."""
    return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


@contextlib.contextmanager
def exact_gpu() -> Iterator[None]:
    """TF32 off for matmuls and cuDNN, cuDNN deterministic, for the block only."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic) = saved
