"""The library's errors and warnings, in one place.

Each says what went wrong and what to do. They are raised where the problem is found and are
importable from the top level (``mg.ReplayError``, ``mg.MetaGradientWarning``, ...).
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import warnings
from typing import Any, Optional

import torch

__all__ = ["ReplayError", "NestedBlockError", "UpdateRuleError", "SeriesDivergenceError", "NegativeCurvatureError",
           "MetaGradientWarning", "warn", "misfit_signature", "SparseGradientError",
           "sparse_gradient"]


class ReplayError(RuntimeError):
    """A step rebuilt during backward is not the step the inner loop took, or cannot be
    differentiated twice: the estimator would otherwise return a wrong meta-gradient."""


class NestedBlockError(ValueError):
    """A ``MetaGradient`` block nested in an outer block's inner step cannot give what the
    outer estimator needs there (its estimator, or a ``torch.func`` transform around it)."""


class UpdateRuleError(ValueError):
    """An update rule's step that a meta-gradient cannot go through: it writes the fast weights
    or the state it was given in place, returns other fast weights (or in another shape or
    dtype), or returns fast weights that do not depend on those it was given."""


class SeriesDivergenceError(ArithmeticError):
    """The binomial series diverged (or missed ``rtol``) and ``fallback=None`` was asked for."""


class NegativeCurvatureError(ArithmeticError):
    """Conjugate gradients met a direction p with ``pᵀ A p ≤ 0``: A is not positive definite."""


class MetaGradientWarning(UserWarning):
    """A warning about how a meta-gradient is computed."""


_LIBRARY_DIRS = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,  # metagrad/
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)


def warn(message: str) -> None:
    """Issue a :class:`MetaGradientWarning` attributed to the user's code.

    Estimators warn during backward, several frames below the user's
    ``loss.backward()`` inside torch's autograd; the warning is attributed to the
    first frame outside metagrad and torch (the outermost frame when backward runs
    on an autograd device thread).
    """
    frame = sys._getframe(1)
    level = 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame = frame.f_back
        level += 1
    warnings.warn(message, MetaGradientWarning, stacklevel=level)


def misfit_signature(function: Any, count: int) -> Optional[inspect.Signature]:
    """``function``'s signature where it cannot take ``count`` positional arguments (for an error
    that shows it); ``None`` where it can, or where it has no signature to read."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*range(count))
    except TypeError:
        return signature
    return None


#: What torch says where a sparse tensor meets an op or a transform that has no kernel for it.
_SPARSE = re.compile(r"for sparse tensors|'Sparse\w*' backend|\(sparse, dense\)|sparse_coo")


class SparseGradientError(RuntimeError):
    """An inner gradient is sparse where ``torch.func.vmap`` runs it (:func:`sparse_gradient`): a
    ``RuntimeError``, as torch's own error there is."""


def sparse_gradient(error: BaseException) -> Optional[SparseGradientError]:
    """The error to raise instead of torch's where ``error`` came from a sparse gradient under
    ``torch.func.vmap`` (torch has no batching rule for sparse tensors); ``None`` for any other."""
    if (not isinstance(error, RuntimeError) or isinstance(error, SparseGradientError)  # (NotImplementedError is one)
            or not _SPARSE.search(str(error))):
        return None
    return SparseGradientError(
        "model: the inner loss's gradient is sparse (nn.Embedding(sparse=True) or "
        "F.embedding(..., sparse=True)), and torch.func.vmap, which runs a block's tasks (tasks=) "
        "and meta_grad's products, cannot batch sparse tensors "
        f"(torch: {str(error).splitlines()[0][:160]}). Build the embedding with sparse=False (the "
        "default): its gradient holds the same numbers, densely, and the fast weights it moves are "
        "dense anyway. Or run one task per block (tasks unset)."
    )
