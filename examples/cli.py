"""Command-line pieces shared by the examples."""

from __future__ import annotations

import argparse
from typing import Union


def order_argument(text: str) -> Union[int, str]:
    """``--order``: a truncation order (an integer), or ``auto`` (Binomial chooses it)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None
