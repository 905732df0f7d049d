"""What a learned step size costs: the same meta-gradient with a float step size and with
Meta-SGD's per-parameter step sizes (tensors that require grad), side by side in one process.

Every estimator that stores (or recomputes) the iterates takes the step-size part of ``B_k``
from the gradient it rebuilds in backward, and keeps nothing per step for it; FirstOrder and
Truncated, which store no iterate for the earlier steps, keep each step's update instead.
Each row runs the inner loop of ``--K`` SGD steps, the query loss and its backward; columns:

- **time**: median of ``--repeats`` runs after a warm-up, learned and float alternating;
- **tensor peak**: the most bytes the CPU allocator had handed out at once over the whole
  meta-gradient (``torch.profiler``'s memory records: exact tensor sizes, no allocator
  caching), one more run per row;
- the ratio learned / float of each.

The default problem is the 8-256-256-1 tanh MLP on 64 random examples of
``benchmarks/budget.py`` (68k parameters, so the iterates dominate memory).

Run (from the repository root)::

    python -m benchmarks.step_sizes --K 100 600 --json step_sizes.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import metagrad as mg  # noqa: E402
from benchmarks.budget import make_problem, tensor_peak  # noqa: E402
from examples.cli import (cpu_model, add_json_argument, add_threads_argument, count_argument,  # noqa: E402
                          make_parser, set_threads, write_json)

ESTIMATORS = {
    "Checkpointed()": mg.Checkpointed,
    'Checkpointed(snapshots="sqrt")': lambda: mg.Checkpointed(snapshots="sqrt"),
    "Binomial(2)": lambda: mg.Binomial(2),
    "FirstOrder()": mg.FirstOrder,
}


def meta_gradient(problem: Any, estimator: mg.Estimator, steps: int, learned: bool) -> None:
    """One meta-gradient with a float step size or per-parameter step sizes that require grad."""
    model, x, y, loss = problem
    lr: Any = 1e-3
    if learned:
        lr = {n: torch.full_like(p, 1e-3, requires_grad=True) for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mg.MetaGradientWarning)  # Binomial's own notes
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator) as meta:
            for _ in range(steps):
                meta.step(lambda f: loss(f(x), y))
            loss(meta.fmodel(x), y).backward()
    model.zero_grad()


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    problem = make_problem("mlp", torch.float32)
    rows = []
    for steps in args.K:
        for name, make in ESTIMATORS.items():
            times: dict[bool, list[float]] = {False: [], True: []}
            for learned in (False, True):  # warm-up
                meta_gradient(problem, make(), steps, learned)
            for _ in range(args.repeats):
                for learned in (False, True):
                    start = time.perf_counter()
                    meta_gradient(problem, make(), steps, learned)
                    times[learned].append(time.perf_counter() - start)
            peaks = {learned: tensor_peak(lambda: meta_gradient(problem, make(), steps, learned))
                     for learned in (False, True)}
            row = {"K": steps, "estimator": name,
                   "time_float_s": statistics.median(times[False]), "time_learned_s": statistics.median(times[True]),
                   "peak_float_bytes": peaks[False], "peak_learned_bytes": peaks[True]}
            row["time_ratio"] = row["time_learned_s"] / row["time_float_s"]
            row["peak_ratio"] = row["peak_learned_bytes"] / row["peak_float_bytes"]
            rows.append(row)
            print(f"| {steps} | {name} | {row['time_float_s'] * 1e3:.0f} ms | {row['time_learned_s'] * 1e3:.0f} ms "
                  f"| {row['time_ratio']:.2f}× | {peaks[False] / 2**20:.1f} MiB | {peaks[True] / 2**20:.1f} MiB "
                  f"| {row['peak_ratio']:.2f}× |", flush=True)
    return rows


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = make_parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--K", type=count_argument(), nargs="+", default=[100, 600],
                        help="inner steps, one row group each (default: 100 600)")
    parser.add_argument("--repeats", type=count_argument(), default=5,
                        help="timed runs per configuration after a warm-up (default 5)")
    add_json_argument(parser, "write every number to this file")
    add_threads_argument(parser)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    print(f"CPU: {cpu_model()}, torch {torch.__version__}, {threads} thread(s); "
          f"8-256-256-1 tanh MLP, 64 examples, float32; median of {args.repeats} after a warm-up\n"
          "| K | estimator | time, float lr | time, learned lrs | ratio | tensor peak, float lr "
          "| tensor peak, learned lrs | ratio |\n|---|---|---|---|---|---|---|---|", flush=True)
    rows = measure(args)
    if args.json:
        write_json(args.json, {"args": vars(args), "threads": threads, "torch": torch.__version__,
                               "results": rows}, indent=1)
    return rows


if __name__ == "__main__":
    main()
