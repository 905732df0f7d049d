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
  counting of an estimator's warnings;
- what the experiments that write ``results.md`` / ``results.json`` / a figure into ``--out``
  share (distillation, reweighting, hyperparameters, nested, hypercleaning):
  :func:`add_quick_argument` and :func:`parse_with_quick` (``--quick``: smoke-test settings
  that yield to the flags given), :func:`add_data_arguments` and :func:`fill_default_sizes`
  (``--dataset digits|fashion-mnist``, ``--data-root``, the split sizes), :func:`add_out_argument`,
  :func:`torch_dtype`, :func:`cpu_description` and :func:`machine_description` (the machine the
  numbers come from), :func:`save_figure`, :func:`write_table` and :func:`write_results`, and
  :func:`outer_step_warning_summary` (an estimator's warnings, counted over the outer steps).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
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



# --------------------------------------------------------------------- experiments writing into --out
#: ``--dataset`` of the classification examples: scikit-learn's bundled digits, or Fashion-MNIST's IDX files.
DATASETS = ("digits", "fashion-mnist")
#: Where Debian's dataset-fashion-mnist package puts the IDX files.
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
#: Images in scikit-learn's bundled 8x8 digits.
DIGITS_IMAGES = 1797
#: The split sizes' flags, as attributes of the parsed arguments.
SIZE_KEYS = ("train_size", "val_size", "test_size")


def add_quick_argument(parser: Union[argparse.ArgumentParser, Any], quick: Mapping[str, Any]) -> None:
    """``--quick`` on ``parser`` or an argument group of it: a smoke test with the settings ``quick``
    (attribute name → value), which :func:`parse_with_quick` applies; its help lists them as flags."""
    flags = ", ".join(f"--{key.replace('_', '-')} {value}" for key, value in quick.items())
    parser.add_argument("--quick", action="store_true", help=f"a smoke test in seconds: {flags} (flags given win)")


def parse_with_quick(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                     quick: Mapping[str, Any]) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick``, each setting of ``quick`` whose flag was not given replaces its default.

    Which flags were given is read from a second parse into a namespace of Nones (argparse fills
    in a default only where the namespace lacks the attribute), so a flag given with its default
    value still wins over ``quick``.
    """
    args = parser.parse_args(argv)
    if args.quick:
        given = parser.parse_args(argv, namespace=argparse.Namespace(**{k: None for k in vars(args)}))
        for key, value in quick.items():
            if getattr(given, key) is None:
                setattr(args, key, value)
    return args


def add_data_arguments(parser: argparse.ArgumentParser, sizes: Mapping[str, Sequence[int]], *,
                       data_root: Optional[str] = FASHION_MNIST, size_type: Callable[[str], int] = positive_int,
                       what: tuple[str, str, str] = ("training examples", "validation examples", "test examples")
                       ) -> Any:
    """The argument group ``data``: ``--dataset`` (:data:`DATASETS`, default digits), ``--data-root DIR``
    (default ``data_root``) and ``--train-size``, ``--val-size``, ``--test-size`` (of type ``size_type``).

    The sizes default to None, and :func:`fill_default_sizes` then takes them from ``sizes``
    (dataset → (train, validation, test)); their help names the three sets by ``what`` and
    gives those defaults. Returns the group, for a script's own data flags.
    """
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=DATASETS, default="digits",
                       help="digits: scikit-learn's bundled 8x8 digits (no download); fashion-mnist: the IDX files "
                            "in --data-root")
    group.add_argument("--data-root", default=data_root, metavar="DIR",
                       help="fashion-mnist: the folder of its IDX files")
    digits, fashion = sizes["digits"], sizes["fashion-mnist"]
    rest = ", the rest" if sum(digits) == DIGITS_IMAGES else ""
    group.add_argument("--train-size", type=size_type, default=None,
                       help=f"{what[0]} (default: digits {digits[0]}, fashion-mnist {fashion[0]})")
    group.add_argument("--val-size", type=size_type, default=None,
                       help=f"{what[1]} (default: digits {digits[1]}, fashion-mnist {fashion[1]})")
    group.add_argument("--test-size", type=size_type, default=None,
                       help=f"{what[2]} (default: digits {digits[2]}{rest}; fashion-mnist {fashion[2]})")
    return group


def fill_default_sizes(args: argparse.Namespace, sizes: Mapping[str, Sequence[int]]) -> None:
    """Set each split size of :func:`add_data_arguments` still None to ``sizes[args.dataset]``'s."""
    for key, value in zip(SIZE_KEYS, sizes[args.dataset]):
        if getattr(args, key) is None:
            setattr(args, key, value)


def add_out_argument(parser: Union[argparse.ArgumentParser, Any], name: str, figure: str) -> None:
    """``--out DIR`` (default ``results/<name>``): the folder of results.md, results.json and ``figure``."""
    parser.add_argument("--out", default=os.path.join("results", name), metavar="DIR",
                        help=f"output folder for results.md, results.json and {figure}")


def torch_dtype(name: str) -> torch.dtype:
    """``--dtype``'s value (see :func:`add_dtype_argument`) as a torch dtype."""
    return torch.float64 if name == "float64" else torch.float32


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_description(cpu: Optional[str] = None) -> str:
    """``CPU (<cpu>, <n> cores, <t> torch threads)``; ``cpu`` defaults to the model name (:func:`cpu_model`)."""
    threads = torch.get_num_threads()
    return (f"CPU ({cpu or cpu_model()}, {os.cpu_count()} cores, "
            f"{threads} torch thread{'s' if threads != 1 else ''})")


def machine_description(device: str, **extra: Any) -> dict[str, Any]:
    """``results.json``'s ``machine``: ``device`` (a description), then ``extra``, then torch's and
    Python's versions and the platform."""
    return {"device": device, **extra, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def save_figure(fig: Any, path: Union[str, os.PathLike]) -> None:
    """Lay out a matplotlib figure tightly, write it to ``path`` and close it."""
    import matplotlib.pyplot as plt  # the script has chosen its backend by now

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_table(out: str, title: str, table: str) -> None:
    """Print ``table`` after a blank line, and write it to ``out``/results.md under the heading ``title``."""
    print()
    print(table)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(f"# {title}\n\n" + table)


def write_results(out: str, results: dict[str, Any], figure: str, json_path: Optional[str] = None) -> None:
    """Write ``results`` to ``out``/results.json and, if given, to ``json_path`` (strict JSON: a NaN or
    an infinity is an error); then say so, with ``results["seconds"]``, the run's wall time."""
    write_json(os.path.join(out, "results.json"), results, allow_nan=False)
    if json_path:
        write_json(json_path, results, allow_nan=False)
    print(f"Wrote results.md, results.json and {figure} to {out} ({results['seconds']:.0f} s)")


# --------------------------------------------------------------------- warnings
#: An estimator's warnings by kind: the message with its numbers masked → ``{"count", "first"}``.
WarningCounts = dict[str, dict[str, Any]]


#: The task a warning names in a block over tasks ("for task 2 of the block, ").
_TASK = re.compile(r"for task (\d+) of the block, ")


def warning_kind(message: str) -> str:
    """A warning's message with its numbers masked and the task it names in a block over tasks
    ("for task 2 of the block, ") left out, so that one kind of warning is one key."""
    return re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "#", _TASK.sub("", message))


@contextlib.contextmanager
def counting_warnings(seen: Optional[WarningCounts]) -> Iterator[None]:
    """Count metagrad's warnings raised inside the block into ``seen`` instead of printing them.

    An estimator's warnings (:class:`mg.MetaGradientWarning`: a binomial series that is not
    converging, a fallback, a solve that missed its tolerance) would otherwise print once
    per task, each with its own numbers, into the progress bars. Wrap one task's
    meta-gradient in this block: each kind that the task raised counts once (``count`` is
    then the number of tasks it warned on; in a block over tasks, a warning that names its task,
    "for task 2 of the block", counts for that task), and the first message of each kind is kept.
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
                message = str(record.message)
                kind = warning_kind(message)
                entry = seen.setdefault(kind, {"count": 0, "first": message})
                # In a block over tasks, a warning about one of them ("for task 2 of the block")
                # counts for that task.
                task = _TASK.search(message)
                key = (kind, task.group(1) if task else None)
                if key not in kinds:
                    entry["count"] += 1
                    kinds.add(key)
            else:  # not ours to summarize: show it as it would have been
                warnings.showwarning(record.message, record.category, record.filename, record.lineno)


def warning_summary(seen: WarningCounts, who: str, tasks: int, what: str = "meta-training tasks") -> list[str]:
    """One line per kind of warning: ``note: <who> warned in N of <tasks> <what>; the first: ...``."""
    return [f"note: {who} warned in {entry['count']} of {tasks} {what}; the first: {entry['first']}"
            for entry in seen.values()]


def outer_step_warning_summary(entries: Sequence[Mapping[str, Any]], who: str) -> list[str]:
    """:func:`warning_summary`'s lines for warnings counted over outer steps, one per entry; an entry
    (as results.json holds it) has ``message`` (the first of its kind), ``steps`` (how many warned)
    and ``of_steps``."""
    return [line for entry in entries
            for line in warning_summary({"kind": {"count": entry["steps"], "first": entry["message"]}}, who,
                                        entry["of_steps"], "outer steps")]


if __name__ == "__main__":
    print("examples/cli.py holds pieces shared by the examples and the benchmarks; it is not a script. Run "
          "python examples/sinusoid.py --help (or fewshot.py, hypercleaning.py, distributed_sinusoid.py, "
          "higher_maml.py), or python -m benchmarks.estimators --help.")
