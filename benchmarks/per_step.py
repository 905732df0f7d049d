"""The eager per-step cost of the context manager against a plain hand-written unroll, side by side.

Sinusoid MAML as users write it (a 1-40-40-1 ReLU net, ``--steps`` inner SGD steps, a meta-batch
of ``--meta-batch`` tasks, one ``MetaGradient`` block per task, a new lambda per step), four ways
in one process, in a shuffled order each round:

- **hand unroll**: ``torch.func.functional_call`` and ``torch.autograd.grad(create_graph=True)``
  written out, the query's ``.backward()`` through it: what Full computes, with no bookkeeping;
- **hand checkpointed**: what Checkpointed computes, written out: the iterates kept, each step's
  graph rebuilt in backward and pulled back by a double backward (the floor of an eager
  checkpointed backward, against which Checkpointed's own bookkeeping is measured);
- **Full** and **Checkpointed**: ``mg.MetaGradient`` with that estimator.

Each row is the median over ``--repeats`` rounds after a warm-up round, per meta-batch, with
the ratios the one-core issue sets targets for (eager Full / hand unroll, Checkpointed / Full),
and the split of one block into its inner loop and its backward (median per task).

Run (from the repository root)::

    python -m benchmarks.per_step --steps 20 --repeats 9 --json per_step.json
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import metagrad as mg  # noqa: E402
from examples.cli import (cpu_model, add_json_argument, add_threads_argument, count_argument,  # noqa: E402
                          make_parser, set_threads, write_json)


def problem(meta_batch: int) -> tuple[nn.Module, list[tuple[torch.Tensor, ...]]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    tasks = [tuple(torch.randn(10, 1) for _ in range(4)) for _ in range(meta_batch)]
    return net, tasks


def hand_unroll(net: nn.Module, tasks: list[tuple[torch.Tensor, ...]], steps: int, split: dict[str, list[float]]
                ) -> None:
    names = [n for n, _ in net.named_parameters()]
    for xs, ys, xq, yq in tasks:
        start = time.perf_counter()
        phi = list(net.parameters())
        for _ in range(steps):
            out = torch.func.functional_call(net, dict(zip(names, phi)), (xs,))
            grads = torch.autograd.grad(F.mse_loss(out, ys), phi, create_graph=True)
            phi = [p - 0.01 * g for p, g in zip(phi, grads)]
        middle = time.perf_counter()
        F.mse_loss(torch.func.functional_call(net, dict(zip(names, phi)), (xq,)), yq).backward()
        split["inner"].append(middle - start)
        split["backward"].append(time.perf_counter() - middle)


def hand_checkpointed(net: nn.Module, tasks: list[tuple[torch.Tensor, ...]], steps: int,
                      split: dict[str, list[float]]) -> None:
    """What Checkpointed computes, written out with no bookkeeping: the inner loop without a
    graph, keeping each iterate; backward rebuilds each step's graph at its iterate and pulls
    the query's gradient back through it by ``torch.autograd.grad`` (a double backward)."""
    names = [n for n, _ in net.named_parameters()]
    theta = list(net.parameters())
    for xs, ys, xq, yq in tasks:
        start = time.perf_counter()
        phi, iterates = [p.detach() for p in theta], []
        for _ in range(steps):
            iterates.append(phi)
            leaves = [p.requires_grad_() for p in phi]
            out = torch.func.functional_call(net, dict(zip(names, leaves)), (xs,))
            grads = torch.autograd.grad(F.mse_loss(out, ys), leaves)
            phi = [p.detach() - 0.01 * g for p, g in zip(leaves, grads)]
        middle = time.perf_counter()
        leaves = [p.requires_grad_() for p in phi]
        u = torch.autograd.grad(F.mse_loss(torch.func.functional_call(net, dict(zip(names, leaves)), (xq,)), yq),
                                leaves)
        for phi in reversed(iterates):
            leaves = [p.detach().requires_grad_() for p in phi]
            out = torch.func.functional_call(net, dict(zip(names, leaves)), (xs,))
            grads = torch.autograd.grad(F.mse_loss(out, ys), leaves, create_graph=True)
            u = torch.autograd.grad([p - 0.01 * g for p, g in zip(leaves, grads)], leaves, u)
        for p, g in zip(theta, u):
            p.grad = g if p.grad is None else p.grad + g
        split["inner"].append(middle - start)
        split["backward"].append(time.perf_counter() - middle)


def blocks(estimator: mg.Estimator) -> Callable[..., None]:
    def run(net: nn.Module, tasks: list[tuple[torch.Tensor, ...]], steps: int, split: dict[str, list[float]]) -> None:
        for xs, ys, xq, yq in tasks:
            with mg.MetaGradient(net, mg.optim.SGD(lr=0.01), estimator=estimator) as meta:
                start = time.perf_counter()
                for _ in range(steps):
                    meta.step(lambda f: F.mse_loss(f(xs), ys))  # a new lambda per step
                middle = time.perf_counter()
                F.mse_loss(meta.fmodel(xq), yq).backward()
            split["inner"].append(middle - start)
            split["backward"].append(time.perf_counter() - middle)
    return run


def measure(args: argparse.Namespace) -> dict[str, Any]:
    net, tasks = problem(args.meta_batch)
    ways = {"hand unroll": hand_unroll, "hand checkpointed": hand_checkpointed, "Full": blocks(mg.Full()),
            "Checkpointed": blocks(mg.Checkpointed())}
    times: dict[str, list[float]] = {name: [] for name in ways}
    splits: dict[str, dict[str, list[float]]] = {name: {"inner": [], "backward": []} for name in ways}
    order = list(ways)
    for round_ in range(args.repeats + 1):
        random.Random(round_).shuffle(order)
        for name in order:
            split: dict[str, list[float]] = {"inner": [], "backward": []}
            start = time.perf_counter()
            ways[name](net, tasks, args.steps, split)
            net.zero_grad()
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - start)
                for part in split:
                    splits[name][part] += split[part]
    median = {name: statistics.median(values) for name, values in times.items()}
    rows = {name: {"ms_per_meta_batch": 1e3 * median[name],
                   "inner_ms_per_task": 1e3 * statistics.median(splits[name]["inner"]),
                   "backward_ms_per_task": 1e3 * statistics.median(splits[name]["backward"])} for name in ways}
    return {"rows": rows, "full_over_hand": median["Full"] / median["hand unroll"],
            "checkpointed_over_full": median["Checkpointed"] / median["Full"],
            "hand_checkpointed_over_hand": median["hand checkpointed"] / median["hand unroll"],
            "checkpointed_over_hand_checkpointed": median["Checkpointed"] / median["hand checkpointed"]}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = make_parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=count_argument(), default=20, help="K, inner steps (default 20)")
    parser.add_argument("--meta-batch", type=count_argument(), default=4, help="tasks per meta-batch (default 4)")
    parser.add_argument("--repeats", type=count_argument(), default=9,
                        help="timed rounds after a warm-up round (default 9)")
    add_json_argument(parser, "write every number to this file")
    add_threads_argument(parser)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    result = measure(args)
    print(f"CPU: {cpu_model()}, torch {torch.__version__}, {threads} thread(s); "
          f"sinusoid 1-40-40-1, K = {args.steps}, meta-batch {args.meta_batch}, float32; median of "
          f"{args.repeats} rounds after a warm-up\n"
          "| way | ms / meta-batch | inner loop, ms / task | backward, ms / task |\n|---|---|---|---|")
    for name, row in result["rows"].items():
        print(f"| {name} | {row['ms_per_meta_batch']:.1f} | {row['inner_ms_per_task']:.2f} "
              f"| {row['backward_ms_per_task']:.2f} |")
    print(f"eager Full / hand unroll: {result['full_over_hand']:.2f}×; "
          f"Checkpointed / Full: {result['checkpointed_over_full']:.2f}×; "
          f"hand checkpointed / hand unroll: {result['hand_checkpointed_over_hand']:.2f}×; "
          f"Checkpointed / hand checkpointed: {result['checkpointed_over_hand_checkpointed']:.2f}×")
    if args.json:
        write_json(args.json, {"args": vars(args), "threads": threads, "torch": torch.__version__, **result},
                   indent=1)
    return result


if __name__ == "__main__":
    main()
