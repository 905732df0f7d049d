"""metagrad: meta-gradients through the user's own inner loop, with a choice of estimator.

One context manager, :class:`MetaGradient`, wraps the inner loop; the backward
strategy (the estimator) is one argument. Each estimator's module docstring gives
its formula from docs/MATH.md.
"""

from . import distributed, errors, functional, linalg, numerics, optim, replay
from .diagnosis import diagnose
from .context import MetaGradient
from .errors import (MetaGradientWarning, NegativeCurvatureError, NestedBlockError, ReplayError,
                     SeriesDivergenceError, UpdateRuleError)
from .estimators import Binomial, Checkpointed, Estimator, FirstOrder, Full, Implicit, Truncated
from .fmodel import FunctionalModel

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
    "Implicit",
    "NegativeCurvatureError",
    "SeriesDivergenceError",
    "ReplayError",
    "NestedBlockError",
    "UpdateRuleError",
    "errors",
    "MetaGradientWarning",
    "optim",
    "functional",
    "numerics",
    "distributed",
    "diagnose",
    "linalg",
    "replay",
    "__version__",
]
