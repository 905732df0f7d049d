"""Command-line and output pieces shared by the examples and the benchmarks.

This is a module, not a script. The examples import it as ``cli`` (it lies beside them);
the benchmarks, run from the repository root, as ``examples.cli``. It holds what every
script would otherwise write again:

- :func:`make_parser`: the argument parser (defaults shown in ``--help``);
- the common flags, each with its type and default, and the script's own help text:
  :func:`add_threads_argument` (``--threads N``, an integer >= 1, default 1),
  :func:`add_seed_argument` (``--seed``, default 0), :func:`add_dtype_argument`
  (``--dtype float32|float64``, default float32), :func:`add_json_argument` (``--json PATH``);
- :func:`set_threads`: applies ``--threads`` (torch's CPU threads and, for scripts that
  compile, inductor's compile threads);
- :func:`write_json`: writes a result file, making its folder;
- argument types (:func:`order_argument`, :func:`count_argument`), the device set-up, and the
  counting of an estimator's warnings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ContextManager, Optional, Union

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


def count_argument(*words: str) -> Callable[[str], Union[int, str, None]]:
    """An argparse type: an integer >= 1, or one of ``words`` (``"none"`` reads as ``None``)."""
    accepted = "".join(f" or {w!r}" for w in words)

    def parse(text: str) -> Union[int, str, None]:
        if text in words:
            return None if text == "none" else text
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected an integer >= 1{accepted}, got {text!r}")
        return value

    return parse


# --------------------------------------------------------------------- the parser
#: An argparse type: an integer >= 1.
positive_int = count_argument()


def make_parser(description: Optional[str], *, prog: Optional[str] = None, epilog: Optional[str] = None,
                formatter_class: type[argparse.HelpFormatter] = argparse.ArgumentDefaultsHelpFormatter
                ) -> argparse.ArgumentParser:
    """A script's argument parser; by default ``--help`` shows each flag's default."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   formatter_class=formatter_class)


#: ``--threads`` help of the examples.
THREADS_HELP = ("torch CPU threads (torch.set_num_threads). Default 1: a task's tensors here are small, so "
                "spreading each op over threads costs more in synchronization than it saves; on a loaded "
                "2-core machine Binomial(3) took 12-19x longer per meta-iteration at torch's default of 2 "
                "threads (README, Benchmarks)")


def add_threads_argument(parser: Union[argparse.ArgumentParser, Any], text: str = THREADS_HELP) -> None:
    """``--threads N`` (an integer >= 1, default 1) on ``parser`` or an argument group of it."""
    parser.add_argument("--threads", type=positive_int, default=1, help=text)


def add_seed_argument(parser: Union[argparse.ArgumentParser, Any], text: Optional[str] = None) -> None:
    """``--seed N`` (default 0) on ``parser`` or an argument group of it."""
    parser.add_argument("--seed", type=int, default=0, help=text)


def add_dtype_argument(parser: Union[argparse.ArgumentParser, Any], text: Optional[str] = None) -> None:
    """``--dtype float32|float64`` (default float32) on ``parser`` or an argument group of it."""
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help=text)


def add_json_argument(parser: Union[argparse.ArgumentParser, Any], text: str) -> None:
    """``--json PATH`` (default: none written) on ``parser``; the script writes it with :func:`write_json`."""
    parser.add_argument("--json", default=None, metavar="PATH", help=text)


def set_threads(threads: int, say: bool = True, compile_threads: bool = False) -> int:
    """Set torch's CPU thread count to ``threads`` and return it; say so on stderr (if ``say``).

    With ``compile_threads``, torch.compile's inductor also compiles with ``threads`` workers.
    """
    torch.set_num_threads(threads)
    if compile_threads:
        import torch._inductor.config as inductor_config  # only where the script compiles

        inductor_config.compile_threads = threads
    used = torch.get_num_threads()
    if say:
        print(f"torch CPU threads: {used} (--threads)", file=sys.stderr)
    return used


def write_json(path: Union[str, os.PathLike], data: Any, indent: int = 2, allow_nan: bool = True) -> None:
    """Write ``data`` as JSON to ``path`` (UTF-8), making its folder first."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=indent, allow_nan=allow_nan)


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


# --------------------------------------------------------------------- warnings
#: An estimator's warnings by kind: the message with its numbers masked → ``{"count", "first"}``.
WarningCounts = dict[str, dict[str, Any]]


def warning_kind(message: str) -> str:
    """A warning's message with its numbers masked, so that one kind of warning is one key."""
    return re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "#", message)


@contextlib.contextmanager
def counting_warnings(seen: Optional[WarningCounts]) -> Iterator[None]:
    """Count metagrad's warnings raised inside the block into ``seen`` instead of printing them.

    An estimator's warnings (:class:`mg.MetaGradientWarning`: a binomial series that is not
    converging, a fallback, a solve that missed its tolerance) would otherwise print once
    per task, each with its own numbers, into the progress bars. Wrap one task's
    meta-gradient in this block: each kind that the task raised counts once (``count`` is
    then the number of tasks it warned on), and the first message of each kind is kept.
    Other warnings are shown as they would have been. With ``seen=None`` nothing changes.
    """
    if seen is None:
        yield
        return
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", mg.MetaGradientWarning)
            yield
    finally:
        kinds = set()
        for record in caught:
            if issubclass(record.category, mg.MetaGradientWarning):
                kind = warning_kind(str(record.message))
                entry = seen.setdefault(kind, {"count": 0, "first": str(record.message)})
                if kind not in kinds:
                    entry["count"] += 1
                    kinds.add(kind)
            else:  # not ours to summarize: show it as it would have been
                warnings.showwarning(record.message, record.category, record.filename, record.lineno)


def warning_summary(seen: WarningCounts, who: str, tasks: int, what: str = "meta-training tasks") -> list[str]:
    """One line per kind of warning: ``note: <who> warned in N of <tasks> <what>; the first: ...``."""
    return [f"note: {who} warned in {entry['count']} of {tasks} {what}; the first: {entry['first']}"
            for entry in seen.values()]


if __name__ == "__main__":
    print("examples/cli.py holds pieces shared by the examples and the benchmarks; it is not a script. Run "
          "python examples/sinusoid.py --help (or fewshot.py, hypercleaning.py, distributed_sinusoid.py, "
          "higher_maml.py), or python -m benchmarks.estimators --help.")
