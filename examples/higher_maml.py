"""A typical ``higher`` MAML loop, switched to metagrad by changing one import.

The loop below is written for ``higher.innerloop_ctx``: sinusoid regression, a
1-40-40-1 ReLU net, an inner ``torch.optim.SGD``, ``diffopt.step(loss)``. The only
change is the import::

    import higher                                   # before
    from metagrad.adapters import higher            # after

after which ``innerloop_ctx`` also takes ``estimator=``. Run it with any estimator::

    python examples/higher_maml.py --estimator binomial             # Binomial(order="auto")
    python examples/higher_maml.py --estimator binomial --order 3   # the paper's fixed order
    python examples/higher_maml.py --estimator checkpointed --steps 20
    python examples/higher_maml.py --library higher      # the original, if higher is installed

It prints the meta-training query loss as it goes and, at the end, the query MSE after
adaptation on held-out tasks. The estimator's warnings are counted and reported once, at
the end (on stderr).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import metagrad as mg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cli beside this file
from cli import (WarningCounts, add_seed_argument, add_threads_argument, counting_warnings,  # noqa: E402
                 make_parser, order_argument, set_threads, warning_summary)


def sample_task(generator: torch.Generator, shots: int) -> tuple[torch.Tensor, ...]:
    """Support and query points of one sine wave ``A sin(x + b)``."""
    amplitude = torch.empty(1).uniform_(0.1, 5.0, generator=generator)
    phase = torch.empty(1).uniform_(0.0, math.pi, generator=generator)
    x = torch.empty(2 * shots, 1).uniform_(-5.0, 5.0, generator=generator)
    y = amplitude * torch.sin(x + phase)
    return x[:shots], y[:shots], x[shots:], y[shots:]


def make_estimator(args: argparse.Namespace) -> Optional[mg.Estimator]:
    """The estimator the flags name (None: the adapter's default, Full)."""
    return {
        "full": lambda: mg.Full(),
        "checkpointed": lambda: mg.Checkpointed(),
        "first_order": lambda: mg.FirstOrder(),
        "truncated": lambda: mg.Truncated(steps=3 if args.order == "auto" else args.order),
        "binomial": lambda: mg.Binomial(order=args.order),
    }[args.estimator]()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--library", choices=("metagrad", "higher"), default="metagrad",
                        help="run the loop through metagrad's adapter, or through higher itself")
    parser.add_argument("--estimator", default="full",
                        choices=("full", "checkpointed", "first_order", "truncated", "binomial"),
                        help="metagrad estimator (ignored with --library higher)")
    parser.add_argument("--order", type=order_argument, default="auto",
                        help="binomial: 'auto' (Binomial(order='auto'), falling back to the blocked expansion "
                             "where the series diverges) or a fixed order L; truncated: its steps (3 for auto)")
    parser.add_argument("--steps", type=int, default=5, help="inner SGD steps per task")
    parser.add_argument("--lr-inner", type=float, default=0.01, help="inner SGD step size")
    parser.add_argument("--iterations", type=int, default=300, help="meta-training iterations")
    parser.add_argument("--meta-batch", type=int, default=4, help="tasks per meta-iteration")
    parser.add_argument("--shots", type=int, default=10, help="support (and query) points per task")
    parser.add_argument("--test-tasks", type=int, default=100, help="held-out tasks for the final MSE")
    add_seed_argument(parser, "seed for the init and the tasks")
    add_threads_argument(parser)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    set_threads(args.threads)  # 40-wide layers: threads add synchronization, not speed
    if args.library == "higher":
        import higher  # the original library
        context = higher.innerloop_ctx
        extra: dict = {}
    else:
        from metagrad.adapters import higher  # <- the one-line change
        context = higher.innerloop_ctx
        extra = {"estimator": make_estimator(args)}

    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    inner_opt = torch.optim.SGD(model.parameters(), lr=args.lr_inner)
    generator = torch.Generator().manual_seed(args.seed)

    seen: WarningCounts = {}  # the estimator's warnings, reported once at the end
    bar = tqdm(range(args.iterations), desc=f"{args.library}:{args.estimator}")
    for _ in bar:
        meta_opt.zero_grad()
        total = 0.0
        for _ in range(args.meta_batch):
            x_s, y_s, x_q, y_q = sample_task(generator, args.shots)
            # --- the higher loop, unchanged (counting_warnings only gathers the estimator's warnings) ---
            with counting_warnings(seen), \
                    context(model, inner_opt, copy_initial_weights=False, **extra) as (fmodel, diffopt):
                for _ in range(args.steps):
                    diffopt.step(F.mse_loss(fmodel(x_s), y_s))
                query = F.mse_loss(fmodel(x_q), y_q)
                (query / args.meta_batch).backward()
            total += query.item() / args.meta_batch
        meta_opt.step()
        bar.set_postfix(query_mse=f"{total:.3f}", refresh=False)

    test_generator = torch.Generator().manual_seed(args.seed + 1_000_003)
    errors = []
    for _ in range(args.test_tasks):
        x_s, y_s, x_q, y_q = sample_task(test_generator, args.shots)
        with context(model, inner_opt, copy_initial_weights=False, track_higher_grads=False) as (fmodel, diffopt):
            for _ in range(args.steps):
                diffopt.step(F.mse_loss(fmodel(x_s), y_s))
            errors.append(F.mse_loss(fmodel(x_q), y_q).item())
    who = args.library if args.library == "higher" else repr(extra["estimator"])
    for line in warning_summary(seen, who, args.iterations * args.meta_batch):
        print(line, file=sys.stderr)
    half = 1.96 * statistics.stdev(errors) / math.sqrt(len(errors))
    print(f"{args.library} ({args.estimator}): query MSE after {args.steps} steps on "
          f"{args.test_tasks} held-out tasks: {statistics.fmean(errors):.3f} ± {half:.3f}")


if __name__ == "__main__":
    main()
