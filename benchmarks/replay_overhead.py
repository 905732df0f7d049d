"""What replaying a step exactly costs (metagrad.replay), side by side in one process.

Checkpointed and Binomial rebuild every inner step during backward. To rebuild the step that
was taken, each inner step freezes its closure and notes the random generator state, and
each rebuilt step is compared with the stored next iterate (the replay check). This script
times one meta-gradient (the inner loop plus backward, a mini-batch loop whose lambda
captures the step's batch) three ways:

- ``shipped``: as metagrad runs by default (frozen closures, generator states, the check);
- ``no check``: ``MetaGradient(check_replay=False)`` (frozen closures and generator states);
- ``bare``: closures kept as given, no generator states (the closure's or the update rule's),
  no check (what metagrad did before replay existed; wrong on a mini-batch loop, timed only to
  show the cost). Its steps are
  still grouped by the closure's code, so Binomial batches them as the frozen ones are: the
  ratios measure the replay machinery, not batching.

Each round runs the three in a shuffled order; the table gives the median of ``--repeats``
rounds after a warm-up, and the ratios to ``bare``. One torch thread unless ``--threads``.

Run (from the repository root)::

    python benchmarks/replay_overhead.py --config sinusoid --steps 5 20
    python benchmarks/replay_overhead.py --config omniglot --steps 5 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional
from unittest import mock

import torch

if __package__ in (None, ""):  # run as a file, python benchmarks/replay_overhead.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metagrad as mg  # noqa: E402
from metagrad import replay, trajectory  # noqa: E402
from benchmarks.estimators import CONFIGS, build_problem, machine_description  # noqa: E402
from examples.cli import add_json_argument, add_threads_argument, make_parser, set_threads, write_json  # noqa: E402

VARIANTS = ("shipped", "no check", "bare")


class _Still:
    """A generator state that never reports a draw (the ``bare`` variant)."""

    def changed(self) -> bool:
        return False

    def ended(self) -> None:
        return None


@contextlib.contextmanager
def variant(name: str) -> Iterator[dict[str, Any]]:
    """Run the block as ``name``; yields the extra ``MetaGradient`` arguments."""
    if name != "bare":
        yield {"check_replay": name == "shipped"}
        return

    def opaque(closure: Any) -> replay.Frozen:
        # Keyed by its code, as a frozen closure of the loop is: the graph is looked at once.
        key = ("object", getattr(closure, "__code__", id(closure)))
        return replay.Frozen(lambda values: closure, [], [], key, closure)

    with mock.patch.object(trajectory, "freeze", opaque), \
            mock.patch.object(trajectory.RandomState, "capture", staticmethod(lambda device, sources=(): _Still())), \
            mock.patch.object(trajectory, "rule_draws", lambda device, then, sources, run: (run(), None)):
        yield {"check_replay": False}


def meta_gradient(problem: Any, estimator: mg.Estimator, batches: list[tuple[torch.Tensor, ...]],
                  extra: dict[str, Any]) -> None:
    x_q, y_q = problem.task[2], problem.task[3]
    for p in problem.params():
        p.grad = None
    with mg.MetaGradient(problem.model, mg.optim.SGD(lr=problem.lr), estimator=estimator, **extra) as meta:
        for x_b, y_b in batches:  # the natural mini-batch loop: the lambda captures the batch
            meta.step(lambda f: problem.loss(f(x_b), y_b))
        problem.loss(meta.fmodel(x_q), y_q).backward()


def batches_of(problem: Any, steps: int) -> list[tuple[torch.Tensor, ...]]:
    """A batch per step: the support set with its rows in a new order each time."""
    x_s, y_s = problem.task[0], problem.task[1]
    generator = torch.Generator().manual_seed(0)
    orders = [torch.randperm(x_s.shape[0], generator=generator) for _ in range(steps)]
    return [(x_s[order], y_s[order]) for order in orders]


def measure(config: str, steps: int, estimator: mg.Estimator, repeats: int) -> dict[str, Any]:
    problem = build_problem(CONFIGS[config], steps, 0.01, 0, torch.device("cpu"), torch.float32)
    batches = batches_of(problem, steps)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for name in VARIANTS:  # warm-up
        with variant(name) as extra:
            meta_gradient(problem, estimator, batches, extra)
    for _ in range(repeats):
        order = list(VARIANTS)
        random.shuffle(order)
        for name in order:
            with variant(name) as extra:
                start = time.perf_counter()
                meta_gradient(problem, estimator, batches, extra)
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"config": config, "steps": steps, "estimator": repr(estimator),
            "median_s": medians, "ratio_to_bare": {n: medians[n] / medians["bare"] for n in VARIANTS}}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = make_parser(__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog="See the module docstring for what each variant does.")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sinusoid")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 20], help="K, inner steps")
    parser.add_argument("--estimators", nargs="+", choices=["checkpointed", "binomial"],
                        default=["checkpointed", "binomial"],
                        help="checkpointed: Checkpointed(); binomial: Binomial(order=3)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds after the warm-up (>= 5)")
    add_threads_argument(parser, "torch CPU threads (default 1)")
    add_json_argument(parser, "write every number here")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error(f"--repeats: expected at least 5 (the median of >= 5 runs), got {args.repeats}.")
    return args


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    set_threads(args.threads, say=False)
    random.seed(0)
    machine = machine_description(torch.device("cpu"))
    print(f"{machine['cpu']}, {machine['cpu_count']} cores, torch {machine['torch']}, "
          f"{torch.get_num_threads()} torch thread(s), float32, median of {args.repeats} after a warm-up")
    estimators = {"checkpointed": mg.Checkpointed(), "binomial": mg.Binomial(order=3, monitor=False)}
    rows = []
    print("| config | K | estimator | bare | shipped | no check |")
    print("|---|---|---|---|---|---|")
    for steps in args.steps:
        for key in args.estimators:
            row = measure(args.config, steps, estimators[key], args.repeats)
            rows.append(row)
            medians, ratios = row["median_s"], row["ratio_to_bare"]
            print(f"| {args.config} | {steps} | {row['estimator']} | {1e3 * medians['bare']:.2f} ms | "
                  f"{ratios['shipped']:.3f}× | {ratios['no check']:.3f}× |", flush=True)
    if args.json:
        write_json(args.json, {"machine": machine, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
