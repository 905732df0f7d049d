"""A scoped switch for GPU numerics that meta-gradient comparisons need (MATH.md, "Numerics that bite").

On an H200 with PyTorch's default TF32 convolutions, two identical Full meta-gradients of
a 4-conv net disagreed by 9–12%; with TF32 off they still disagreed by 3.5% at K = 20
until cuDNN was made deterministic. metagrad never changes these global flags on its
own; this context manager changes them for a block and restores them after::

    with mg.numerics.exact_gpu():
        ...  # accuracy comparisons, benchmarks' error columns

It does nothing harmful on a CPU-only build: the flags exist there and are ignored.

The replay check's tolerance (:func:`tolerance`, :func:`relative_tolerance`) lives here too: it
follows the precision a step computes in, TF32 and autocast included.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, Optional

import torch

__all__ = ["exact_gpu", "tf32_enabled", "tolerance", "DefaultTolerance", "at_precision", "relative_tolerance"]


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


# ------------------------------------------------ the replay check's tolerance (metagrad.replay)
def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """The default relative tolerance of the replay check for fast weights of ``dtype``.

    A rebuilt step runs the same operations as the step taken, sometimes in other kernels
    (batched under vmap, another convolution algorithm), so it agrees to a few units of
    rounding in the gradient. A step that read other data, other random numbers or another
    flag differs by a sizeable fraction of the step itself.
    """
    if dtype.is_complex:  # each part rounds as its real dtype does
        dtype = dtype.to_real()
    if dtype == torch.float64:
        return 1e-7
    if dtype == torch.float32:
        return 3e-2 if device.type == "cuda" and tf32_enabled() else 1e-3
    return 5e-2 if dtype == torch.float16 else 1e-1


def inexact(t: Any) -> bool:
    """Whether ``t`` is a tensor autograd differentiates: floating point or complex (an
    optimizer's state of complex fast weights is complex; its adjoint is carried too)."""
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


def real_view(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real and imaginary parts (a last dimension of 2), a real one as
    it is: the norms and inner products of the fast weights are those of ℝ²ⁿ, ``Re Σ conj(a)·b``,
    which sums of products of these views give (a cast to a real dtype would drop the
    imaginary parts)."""
    return torch.view_as_real(t.resolve_conj()) if t.is_complex() else t


class DefaultTolerance(float):
    """The tolerance ``check_replay=True`` gives, :func:`tolerance` of the fast weights' dtype:
    :func:`at_precision` raises it where a step computes in a lower one."""


def at_precision(rtol: Optional[float], precision: Optional[torch.dtype], device: torch.device) -> Optional[float]:
    """``rtol`` for a block with a step taken under autocast to ``precision`` (``None``: off): a
    default tolerance becomes that precision's where it is looser (a rebuild in other kernels, a
    compiled one above all, rounds to bfloat16 or float16 in other places than the step taken);
    one the user gave stays as it is."""
    if type(rtol) is not DefaultTolerance or precision is None:
        return rtol
    return DefaultTolerance(max(rtol, tolerance(precision, device)))


def relative_tolerance(check: Any, dtype: torch.dtype, device: torch.device) -> Optional[float]:
    """The tolerance ``MetaGradient(check_replay=...)`` asks for: ``None`` for no check."""
    if check is False:
        return None
    if check is True:
        return DefaultTolerance(tolerance(dtype, device))
    if isinstance(check, (int, float)) and not isinstance(check, bool) and math.isfinite(check) and check > 0:
        return float(check)
    raise ValueError(
        f"check_replay: expected True (the default tolerance), False (no check) or a relative "
        f"tolerance > 0, got {check!r}."
    )
