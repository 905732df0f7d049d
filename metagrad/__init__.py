"""metagrad: meta-gradients through the user's own inner loop, with a choice of estimator.

One context manager, :class:`MetaGradient`, wraps the inner loop; the backward
strategy is one argument. See ``../MATH.md``-style derivations in each estimator's
module docstring.
"""

from . import optim
from .context import MetaGradient
from .estimators import (Binomial, Checkpointed, Estimator, FirstOrder, Full, MetaGradientWarning,
                         Truncated)
from .functional import FunctionalModel

__version__ = "0.1.0"

__all__ = [
    "MetaGradient",
    "FunctionalModel",
    "Estimator",
    "Full",
    "Checkpointed",
    "FirstOrder",
    "Truncated",
    "Binomial",
    "MetaGradientWarning",
    "optim",
    "__version__",
]
