"""Time per meta-iteration at 1 and 2 processes on the same meta-batch, and the ratio.

Runs ``examples/distributed_sinusoid.py`` as one process (``python``, no process group)
and as two (``torchrun --standalone --nproc_per_node=2``, gloo on the CPU), on the same
meta-batches from the same seed, ``--repeats`` times each, alternating, so that both
see the same load on a shared machine. Prints one row per estimator and process count:

- ms per meta-iteration: the median over repeats of each run's median (iterations
  after the warm-up), and its ratio to one process (below 1 is a speed-up; the ideal
  at 2 processes is 0.5);
- ms in ``average_gradients`` during training (the collectives, plus waiting for the
  slower rank), and the same call timed after a barrier (the collectives alone);
- the meta-test MSE, which must agree between 1 and 2 processes to rounding: the two
  runs take the same Adam steps on the same meta-gradients.

Two processes can only approach half the time when each has a core of its own and
the all-reduce costs little next to a share of the meta-batch. On a 2-core machine
shared with other work, neither holds; the table shows what the machine shows.
With a GPU, ``--device cuda`` adds one row: one process on one GPU, on the same meta-batch.

Run it with::

    python benchmarks/distributed_scaling.py                     # about 3 minutes on 2 CPU cores
    python benchmarks/distributed_scaling.py --meta-batch 32 --estimators full
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

if __package__ in (None, ""):  # run as a file: examples.cli from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.cli import add_seed_argument, add_threads_argument, cpu_model, make_parser, write_json  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distributed_sinusoid.py"


def run_example(processes: int, estimator: str, args: argparse.Namespace, device: str,
                workdir: str) -> dict[str, Any]:
    """One run of the example; its JSON result."""
    out = os.path.join(workdir, f"{estimator}-{processes}-{device}-{time.monotonic_ns()}.json")
    flags = ["--estimator", estimator, "--meta-batch", str(args.meta_batch), "--iterations",
             str(args.iterations), "--warmup", str(args.warmup), "--steps", str(args.steps),
             "--order", str(args.order), "--test-tasks", str(args.test_tasks), "--device", device,
             "--seed", str(args.seed), "--threads", str(args.threads), "--json", out]
    if processes == 1:
        command = [sys.executable, str(EXAMPLE), *flags]
    else:  # torchrun from this interpreter; --standalone: a local rendezvous on a free port
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", str(EXAMPLE), *flags]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    with open(out, encoding="utf-8") as handle:
        return json.load(handle)


def load_average() -> str:
    try:
        return "/".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = make_parser(
        description="Time per meta-iteration of examples/distributed_sinusoid.py at 1 and 2 processes "
                    "(gloo on the CPU) on the same meta-batch; print the ratio.",
    )
    parser.add_argument("--estimators", nargs="+", default=["full", "binomial"],
                        choices=("full", "checkpointed", "first_order", "truncated", "binomial", "implicit"))
    parser.add_argument("--meta-batch", type=int, default=8, help="tasks per meta-iteration, split across processes")
    parser.add_argument("--iterations", type=int, default=110, help="meta-iterations per run")
    parser.add_argument("--warmup", type=int, default=10, help="first iterations left out of the timings")
    parser.add_argument("--steps", type=int, default=5, help="K, inner steps")
    parser.add_argument("--order", type=int, default=3, help="L of Binomial")
    parser.add_argument("--test-tasks", type=int, default=100, help="held-out tasks for the meta-test MSE")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration, alternating")
    add_seed_argument(parser)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: add a row for one process on one GPU beside the CPU rows")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
    add_threads_argument(parser, "torch CPU threads per process (torch.set_num_threads in the example); 1: the "
                                 "per-task ops are small, and the processes share the cores")
    parser.add_argument("--out", default=os.path.join("results", "distributed_scaling"),
                        help="folder for results.json and results.md")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    print(f"torch CPU threads per process: {args.threads} (--threads)", file=sys.stderr)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to this torch build.")
    configurations = [(1, "cpu"), (2, "cpu")] + ([(1, "cuda")] if args.device == "cuda" else [])
    load_before = load_average()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for estimator in args.estimators:
            runs: dict[tuple[int, str], list[dict[str, Any]]] = {c: [] for c in configurations}
            for repeat in range(args.repeats):
                for processes, device in configurations:
                    print(f"{estimator}, {processes} process(es) on {device}, run {repeat + 1} of {args.repeats}",
                          file=sys.stderr, flush=True)
                    runs[(processes, device)].append(run_example(processes, estimator, args, device, workdir))
            one = statistics.median(r["ms_per_iteration"] for r in runs[(1, "cpu")])
            for (processes, device), results in runs.items():
                ms = statistics.median(r["ms_per_iteration"] for r in results)
                rows.append({
                    "estimator": results[0]["estimator"], "processes": processes,
                    "device": "CPU" if device == "cpu" else results[0]["machine"]["device"],
                    "ms_per_iteration": ms, "ms_per_iteration_runs": [r["ms_per_iteration"] for r in results],
                    "time_vs_one_cpu_process": ms / one,
                    "ms_average_gradients": statistics.median(r["ms_average_gradients"] for r in results),
                    "ms_average_gradients_alone": statistics.median(r["ms_average_gradients_alone"]
                                                                    for r in results),
                    "test_mse_mean": results[0]["test_mse_mean"],
                })
    caption = (f"Meta-batch {args.meta_batch}, K = {args.steps}, {args.iterations - args.warmup} timed "
               f"iterations per run, median of {args.repeats} runs; {cpu_model()}, {os.cpu_count()} cores, "
               f"{args.threads} torch thread{'s' if args.threads != 1 else ''} per process, torch {torch.__version__}; load average (1/5/15 min) "
               f"{load_before} before and {load_average()} after.")
    lines = ["| estimator | processes | device | ms / meta-iter | vs 1 CPU process | ms in average_gradients "
             "| collectives alone (after a barrier) | meta-test MSE |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['estimator']} | {row['processes']} | {row['device']} | {row['ms_per_iteration']:.1f} "
                     f"| {row['time_vs_one_cpu_process']:.2f}× | {row['ms_average_gradients']:.2f} "
                     f"| {row['ms_average_gradients_alone']:.2f} | {row['test_mse_mean']:.4f} |")
    table = "\n".join(lines) + "\n\n" + caption + "\n"
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as handle:
        handle.write("# Time per meta-iteration at 1 and 2 processes\n\n" + table)
    write_json(os.path.join(args.out, "results.json"), {"config": vars(args), "caption": caption, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
