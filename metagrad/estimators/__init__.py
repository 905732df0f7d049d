"""Meta-gradient estimators, one module each, sharing :class:`Estimator`'s interface."""

from __future__ import annotations

from functools import partial
from collections.abc import Callable
from typing import Union

from .base import Estimator, MetaGradientWarning
from .binomial import Binomial, SeriesDivergenceError
from .checkpointed import Checkpointed
from .first_order import FirstOrder
from .full import Full
from .implicit import Implicit
from .truncated import Truncated

__all__ = ["Estimator", "MetaGradientWarning", "Full", "Checkpointed", "FirstOrder", "Truncated",
           "Binomial", "Implicit", "SeriesDivergenceError", "resolve"]

#: The names ``MetaGradient(estimator=...)`` accepts, with their defaults.
BY_NAME: dict[str, Callable[[], Estimator]] = {
    "full": Full,
    "checkpointed": Checkpointed,
    "first_order": FirstOrder,
    "truncated": Truncated,  # Truncated(steps=2)
    # Binomial(order="auto"): adds levels until rtol=1e-3, falling back to blocks (fallback="blocked")
    # where the series does not converge; the paper's fixed order is Binomial(order=2).
    "binomial": partial(Binomial, order="auto"),
    "implicit": Implicit,  # Implicit(reg=1.0, solver="cg", max_iter=50, tol=1e-6)
}


def resolve(estimator: Union[Estimator, str, None]) -> Estimator:
    """Turn the ``estimator=`` argument into an :class:`Estimator` (``None`` is Full)."""
    if estimator is None:
        return Full()
    if isinstance(estimator, Estimator):
        return estimator
    if isinstance(estimator, str):
        try:
            return BY_NAME[estimator]()
        except KeyError:
            raise ValueError(
                f"estimator: unknown name {estimator!r}; accepted names are {sorted(BY_NAME)}, "
                "or an instance such as mg.Binomial(order=3)."
            ) from None
    if isinstance(estimator, type) and issubclass(estimator, Estimator):
        raise TypeError(
            f"estimator: got the class {estimator.__name__}; pass an instance, "
            f"e.g. {estimator.__name__}()."
        )
    raise TypeError(
        f"estimator: expected an Estimator instance or one of {sorted(BY_NAME)}, "
        f"got {type(estimator).__name__} {estimator!r}."
    )
