"""Memory budgets against measured peaks: ``Binomial(max_memory=...)``, ``Checkpointed(
max_memory=...)``, ``Checkpointed(snapshots="sqrt")`` and the chunk sizes, on one problem.

For each row, one meta-gradient (``--K`` inner SGD steps, the query loss, backward) runs once
to warm up and once measured, alone in the process at that moment. Columns:

- **process peak**: :func:`metagrad.memory.peak_memory` around the whole meta-gradient (the
  inner loop's stored iterates included), the growth of the process's peak resident set on
  the CPU (CUDA tensor memory on a GPU): the measure of ``benchmarks/estimators.py``;
- **/ budget**: that peak over the row's budget (an issue's bar: at most 1.5);
- **tensor peak** (``--tensor on``, CPU): the stored iterates plus the most bytes the CPU
  allocator had handed out at once during backward, from ``torch.profiler``'s memory records
  (exact tensor sizes, no allocator caching);
- **iterates**: the process and tensor peaks in units of one iterate (with its optimizer state);
- the plan (``meta.info``): ``chunk_size``, ``planned_peak_bytes``, ``peak_iterates``; or, for a
  budget that is refused, the smallest budget the ``ValueError`` names.

The default problem is an 8-256-256-1 tanh MLP on 64 random examples, float32, K = 200: its
68k parameters dominate its step graph, the case where stored iterates and level vectors
decide the peak. ``--fit`` instead measures what one product adds to backward's tensor peak,
for chunk sizes 1, 2, 4, 8 of ``Binomial(1)``, on that MLP, two small CNNs and a wide MLP on
2000 examples, in units of the step graph's bytes ``b`` and of one iterate ``d``: the
measurements behind ``metagrad.estimators.binomial.GRAPH_FACTOR`` and ``ITERATE_FACTOR``.

CPU process peaks depend on glibc's caching; ``MALLOC_MMAP_THRESHOLD_=131072`` in the
environment makes them follow tensor memory (``metagrad.memory``); the output says which.

Run::

    python -m benchmarks.budget --K 200 --budgets 150MiB 400MiB --json budget.json
    MALLOC_MMAP_THRESHOLD_=131072 python -m benchmarks.budget --K 200 400
    python -m benchmarks.budget --fit
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import metagrad as mg  # noqa: E402
from examples.cli import (cpu_model, add_dtype_argument, add_json_argument, add_threads_argument,  # noqa: E402
                          make_parser, set_threads, write_json)
from metagrad.memory import parse_bytes, peak_memory  # noqa: E402

Problem = tuple[nn.Module, torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]


def make_problem(name: str, dtype: torch.dtype) -> Problem:
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1))
        x, y, loss = torch.randn(64, 8), torch.randn(64, 1), F.mse_loss
    elif name == "wide":
        model = nn.Sequential(nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 1))
        x, y, loss = torch.randn(2000, 64), torch.randn(2000, 1), F.mse_loss
    elif name == "cnn":
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                              nn.ReLU(), nn.Flatten(), nn.Linear(16 * 32 * 32, 5))
        x, y, loss = torch.randn(20, 3, 32, 32), torch.randint(0, 5, (20,)), F.cross_entropy
    elif name == "cnn4":
        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o, track_running_stats=False),
                    nn.ReLU(), nn.MaxPool2d(2)]
        model = nn.Sequential(*block(1, 32), *block(32, 32), *block(32, 32), *block(32, 32),
                              nn.Flatten(), nn.Linear(32, 5))
        x, y, loss = torch.randn(5, 1, 28, 28), torch.randint(0, 5, (5,)), F.cross_entropy
    else:
        raise ValueError(f"--problem: expected mlp, wide, cnn or cnn4, got {name!r}")
    model = model.to(dtype)
    return model, (x.to(dtype) if x.is_floating_point() else x), (y.to(dtype) if y.is_floating_point() else y), loss


def tensor_peak(block: Callable[[], None]) -> int:
    """The most bytes the CPU allocator handed out at once during ``block``, above its start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        block()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for event in events:
        now += event.nbytes()
        peak = max(peak, now)
    return peak


def run(problem: Problem, estimator: mg.estimators.Estimator, steps: int, lr: float,
        tensor: bool) -> tuple[dict[str, Any], Optional[int]]:
    """One meta-gradient; returns ``meta.info`` and (``tensor``) the stored iterates plus the
    tensor peak of backward."""
    model, x, y, loss = problem
    backward_peak = None
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator) as meta:
        for _ in range(steps):
            meta.step(lambda f: loss(f(x), y))
        query = loss(meta.fmodel(x), y)
        if tensor:
            backward_peak = tensor_peak(query.backward)
        else:
            query.backward()
    model.zero_grad()
    info = dict(meta.info)
    if backward_peak is not None:  # the iterates stored when backward began (snapshots: those)
        each = info.get("peak_iterate_bytes", 0) // max(info.get("peak_iterates", 1), 1)
        backward_peak += info.get("stored_iterates", 0) * each
    return info, backward_peak


def rows(budgets: Sequence[str], checkpoint_budgets: Sequence[str]) -> list[tuple[str, Any, Optional[int]]]:
    out: list[tuple[str, Any, Optional[int]]] = []
    for text in budgets:
        out.append((f"Binomial(2, max_memory={text!r})", mg.Binomial(2, max_memory=text),
                    parse_bytes(text, "--budgets")))
    out += [("Binomial(2, chunk_size=1)", mg.Binomial(2, chunk_size=1), None),
            ("Binomial(2, chunk_size=16)", mg.Binomial(2, chunk_size=16), None),
            ("Binomial(2, chunk_size=1, monitor=False)", mg.Binomial(2, chunk_size=1, monitor=False), None),
            ("Checkpointed()", mg.Checkpointed(), None),
            ("Checkpointed(snapshots='sqrt')", mg.Checkpointed("sqrt"), None)]
    for text in checkpoint_budgets:
        out.append((f"Checkpointed(max_memory={text!r})", mg.Checkpointed(max_memory=text),
                    parse_bytes(text, "--checkpoint-budgets")))
    return out


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    dtype = getattr(torch, args.dtype)
    problem = make_problem(args.problem, dtype)
    iterate = sum(p.numel() * p.element_size() for p in problem[0].parameters())
    results = []
    for steps in args.K:
        for label, estimator, budget in rows(args.budgets, args.checkpoint_budgets):
            row: dict[str, Any] = {"K": steps, "estimator": label, "budget_bytes": budget,
                                   "iterate_bytes": iterate}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", mg.MetaGradientWarning)  # the series' accuracy
                try:
                    run(problem, estimator, steps, args.lr, False)  # warm-up
                    gc.collect()
                    with peak_memory("cpu") as mem:
                        info, _ = run(problem, estimator, steps, args.lr, False)
                    row.update(process_peak_bytes=mem.peak_bytes, memory_method=mem.method)
                    if args.tensor == "on":
                        row["tensor_peak_bytes"] = run(problem, estimator, steps, args.lr, True)[1]
                    row.update({key: info.get(key) for key in ("chunk_size", "planned_peak_bytes",
                                                               "peak_iterates", "stored_iterates")})
                except ValueError as error:
                    row["refused"] = str(error)
            results.append(row)
            print(format_row(row), file=sys.stderr, flush=True)
    return results


def format_row(row: dict[str, Any]) -> str:
    mib = lambda b: "–" if b is None else f"{b / 2**20:.1f} MiB"  # noqa: E731
    if "refused" in row:
        return f"| {row['K']} | {row['estimator']} | refused: {row['refused'][:160]}… | | | | |"
    budget, iterate = row["budget_bytes"], row["iterate_bytes"]
    ratio = "–" if budget is None else f"{row['process_peak_bytes'] / budget:.2f}"
    tensor = row.get("tensor_peak_bytes")
    units = f"{row['process_peak_bytes'] / iterate:.0f}" + ("" if tensor is None else f" / {tensor / iterate:.0f}")
    plan = ", ".join(f"{k}={row[k]}" for k in ("chunk_size", "peak_iterates") if row.get(k) is not None)
    return (f"| {row['K']} | {row['estimator']} | {mib(row['process_peak_bytes'])} | {ratio} | {mib(tensor)} | "
            f"{units} | {plan} |")


def fit(args: argparse.Namespace) -> list[dict[str, Any]]:
    """What one product adds to backward's tensor peak, per problem, in units of b and d."""
    results = []
    for name in ("mlp", "cnn", "cnn4", "wide"):
        problem = make_problem(name, getattr(torch, args.dtype))
        iterate = sum(p.numel() * p.element_size() for p in problem[0].parameters())
        peaks = []
        for chunk in (1, 2, 4, 8):
            _, peak = run(problem, mg.Binomial(1, chunk_size=chunk), 16, args.lr, True)
            peaks.append(peak)
        info, _ = run(problem, mg.Binomial(1, max_memory="64GiB"), 16, args.lr, False)
        graph = info["step_graph_bytes"]
        per = (peaks[-1] - peaks[0]) / 7
        row = {"problem": name, "iterate_bytes": iterate, "step_graph_bytes": graph, "per_product_bytes": per,
               "peaks": peaks}
        results.append(row)
        print(f"{name}: d = {iterate / 1024:.0f} KiB, b = {graph / iterate:.2f} d, one product adds "
              f"{per / iterate:.1f} d = {per / graph:.2f} b", file=sys.stderr, flush=True)
    return results


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = make_parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="mlp", choices=("mlp", "wide", "cnn", "cnn4"),
                        help="the model and task (default: the 8-256-256-1 MLP)")
    parser.add_argument("--K", type=int, nargs="+", default=[200], help="inner steps (default 200)")
    parser.add_argument("--lr", type=float, default=0.001, help="inner SGD step size")
    add_dtype_argument(parser)
    parser.add_argument("--budgets", nargs="*", default=["150MiB", "400MiB"],
                        help="Binomial(2, max_memory=...) rows")
    parser.add_argument("--checkpoint-budgets", nargs="*", default=["10MiB", "40MiB"],
                        help="Checkpointed(max_memory=...) rows")
    parser.add_argument("--tensor", choices=("on", "off"), default="on",
                        help="also measure tensor memory with torch.profiler (one more run per row)")
    parser.add_argument("--fit", action="store_true", help="measure the per-product factors instead")
    add_json_argument(parser, "write every number to this file")
    add_threads_argument(parser)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{threads} thread(s), MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')}",
          file=sys.stderr)
    if args.fit:
        results = fit(args)
    else:
        print("| K | estimator | process peak | / budget | tensor peak | iterates (process / tensor) | plan |\n"
              "|---|---|---|---|---|---|---|", file=sys.stderr)
        results = measure(args)
    if args.json:
        write_json(args.json, {"args": vars(args), "threads": threads,
                               "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                               "torch": torch.__version__, "results": results}, indent=1)
    return results


if __name__ == "__main__":
    main()
