"""Command-line and output pieces shared by the examples."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from typing import ContextManager, Union

import numpy as np
import torch

import metagrad as mg


def order_argument(text: str) -> Union[int, str]:
    """``--order``: a truncation order (an integer), or ``auto`` (Binomial chooses it)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def setup_device(name: str) -> torch.device:
    """``--device``: ``cpu``, or ``cuda`` where this torch build has it (else exit with a message)."""
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to this torch build.")
    # With TF32, two identical Full meta-gradients of a 4-conv net disagreed by 9-12%
    # (MATH.md): comparisons would measure rounding, not estimators. The examples run
    # inside exact_numerics_on(device).
    print("CUDA: TF32 off and cudnn.deterministic = True for this run (mg.numerics.exact_gpu).",
          file=sys.stderr)
    return torch.device("cuda")


def exact_numerics_on(device: torch.device) -> ContextManager[None]:
    """``mg.numerics.exact_gpu()`` on CUDA; nothing to change on the CPU."""
    return mg.numerics.exact_gpu() if device.type == "cuda" else contextlib.nullcontext()


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average; the first points average over what is available."""
    values = np.asarray(values, dtype=float)
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    index = np.arange(1, len(values) + 1)
    start = np.maximum(index - window, 0)
    return (cumulative[index] - cumulative[start]) / (index - start)
