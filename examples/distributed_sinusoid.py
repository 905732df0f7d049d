"""Sinusoid meta-learning with each meta-batch split across processes (torch.distributed).

The problem, model and inner loop are those of ``examples/sinusoid.py`` (1-40-40-1
ReLU net, K plain SGD steps on the support MSE, Adam on the query MSE), with one
estimator. Every rank draws the same meta-batch from the same seeded stream, takes its
share with ``mg.distributed.shard``, accumulates its share's meta-gradients, and
``mg.distributed.average_gradients`` gives every rank the meta-batch mean before the
Adam step. So θ is the same on every rank throughout; the script checks it at the end.

Run it as one process (no process group; the metagrad calls do nothing)::

    python examples/distributed_sinusoid.py

or as two processes on this machine (gloo on the CPU; ``torchrun`` is in ``.venv/bin``
after ``make``)::

    .venv/bin/torchrun --nproc_per_node=2 examples/distributed_sinusoid.py

or across machines: the same command on every node, HOST being one of them (NCCL on
the GPUs, one process per GPU)::

    .venv/bin/torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=sinusoid --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29400 examples/distributed_sinusoid.py --device cuda

Rank 0 shows the progress bar and prints the result: the meta-test MSE on held-out
tasks, the median time per meta-iteration, and the part of it spent in
``average_gradients`` (communication, plus waiting for the slowest rank). With
``--json PATH`` rank 0 also writes them to a file; ``benchmarks/distributed_scaling.py``
runs this script at 1 and 2 processes and compares. The process group's backend follows
the device: gloo on the CPU, NCCL with ``--device cuda`` (``--backend`` overrides it).
The estimator's warnings are counted on every rank and reported once by rank 0, at the
end, for the whole meta-batch.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import metagrad as mg
import metagrad.distributed  # noqa: F401  (mg.distributed)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sinusoid and cli beside this file
from cli import (WarningCounts, add_dtype_argument, add_json_argument, add_seed_argument,  # noqa: E402
                 add_threads_argument, machine_description, make_parser, order_argument, set_threads,
                 torch_dtype, warning_summary, write_json)
from sinusoid import (ESTIMATORS, OUTER_LR, TEST_STREAM, TRAIN_STREAM, Tasks,  # noqa: E402
                      accumulate_meta_gradients, device_description, label, make_estimator, make_model,
                      mean_ci95, meta_test_mse, sample_tasks, seed_everything, stream)


def meta_gradient_step(model: nn.Module, estimator: mg.Estimator, tasks: Tasks,
                       steps: int, lr_inner: float, warnings_seen: Optional[WarningCounts] = None) -> float:
    """Accumulate this rank's share of the meta-batch's mean meta-gradient; return its summed query MSE.

    Each loss is divided by the size of the *whole* meta-batch, as in single-process
    code, so that the ranks' ``.grad`` add up to the mean (``average_gradients`` sums).
    """
    return accumulate_meta_gradients(model, estimator, tasks, mg.distributed.shard(range(len(tasks))),
                                     steps, lr_inner, warnings_seen)


def all_ranks_warnings(seen: WarningCounts) -> WarningCounts:
    """Every rank's counted warnings added up (a collective when distributed); the first message
    of each kind from the lowest rank that saw it."""
    if not dist.is_initialized():
        return seen
    gathered: list[Optional[WarningCounts]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, seen)
    total: WarningCounts = {}
    for rank_seen in gathered:
        for kind, entry in (rank_seen or {}).items():
            total.setdefault(kind, {"count": 0, "first": entry["first"]})["count"] += entry["count"]
    return total


def meta_batch_mse(local_sum: float, meta_batch: int, device: torch.device) -> float:
    """The meta-batch's mean query MSE, from every rank's share (a collective when distributed)."""
    if not dist.is_initialized():
        return local_sum / meta_batch
    total = torch.tensor([local_sum], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item() / meta_batch


def largest_difference_across_ranks(model: nn.Module) -> float:
    """``max_r ‖θ_r − θ_0‖_∞``: zero when every rank holds the same parameters."""
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(torch.float64)
    if not dist.is_initialized():
        return 0.0
    gathered = [torch.empty_like(theta) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, theta)
    return max((t - gathered[0]).abs().max().item() for t in gathered)


def time_average_gradients_alone(model: nn.Module, device: torch.device, calls: int = 20) -> float:
    """Median ms of ``average_gradients`` with every rank already there: the collectives alone.

    In training, ``average_gradients`` also waits for the slowest rank to finish its
    share. Here a barrier comes first, and the gradients are zeros (their sum stays zero).
    """
    if not dist.is_initialized():
        return 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    seconds = []
    for _ in range(calls):
        dist.barrier()
        start = time.perf_counter()
        mg.distributed.average_gradients(model)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return 1000 * statistics.median(seconds)


def train(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, rank: int,
          world: int) -> dict[str, Any]:
    """Meta-train on the seeded stream; return the timings and rank 0's meta-test result.

    The timings are medians over the iterations after ``--warmup``: the whole
    meta-iteration (this rank's share, ``average_gradients``, the Adam step), and the
    part in ``average_gradients``, which includes waiting for the slowest rank.
    """
    seed_everything(args.seed)
    model = make_model().to(device=device, dtype=dtype)  # seeded: the same θ_0 on every rank
    estimator = make_estimator(args.estimator, args.order, args.reg, args.solver)
    optimizer = torch.optim.Adam(model.parameters(), lr=OUTER_LR)
    generator = stream(args.seed, TRAIN_STREAM)  # the same meta-batches on every rank
    iteration_seconds, averaging_seconds, train_mse = [], [], []
    seen: WarningCounts = {}  # the estimator's warnings on this rank's tasks
    bar = tqdm(range(args.iterations), desc=f"{label(estimator)} × {world}", unit="it", dynamic_ncols=True,
               mininterval=0.5, file=sys.stderr, disable=rank != 0)
    for iteration in bar:
        tasks = sample_tasks(args.meta_batch, args.shots, generator, device, dtype)
        synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        local_mse = meta_gradient_step(model, estimator, tasks, args.steps, args.lr_inner, seen)
        synchronize(device)
        averaging = time.perf_counter()
        mg.distributed.average_gradients(model)
        synchronize(device)
        averaging = time.perf_counter() - averaging
        optimizer.step()
        synchronize(device)
        if iteration >= args.warmup:
            iteration_seconds.append(time.perf_counter() - start)
            averaging_seconds.append(averaging)
        if iteration % 25 == 0 or iteration == args.iterations - 1:  # the same iterations on every rank
            train_mse.append(meta_batch_mse(local_mse, len(tasks), device))
            bar.set_postfix(query_mse=f"{train_mse[-1]:.3f}", refresh=False)
    bar.close()

    result: dict[str, Any] = {
        "estimator": label(estimator),
        "processes": world,
        "ms_per_iteration": 1000 * statistics.median(iteration_seconds),
        "ms_average_gradients": 1000 * statistics.median(averaging_seconds),
        "timed_iterations": len(iteration_seconds),
        "max_theta_difference_across_ranks": largest_difference_across_ranks(model),
        "ms_average_gradients_alone": time_average_gradients_alone(model, device),
        "train_query_mse": train_mse,
        "estimator_warnings": [{"message": entry["first"], "tasks": entry["count"],
                                "of_tasks": args.iterations * args.meta_batch}
                               for entry in all_ranks_warnings(seen).values()],
    }
    if rank == 0:
        test_tasks = sample_tasks(args.test_tasks, args.shots, stream(args.seed, TEST_STREAM), device, dtype)
        mean, half = mean_ci95(meta_test_mse(model, test_tasks, args.steps, args.lr_inner))
        result.update(test_mse_mean=mean, test_mse_ci95=half)
    return result


# --------------------------------------------------------------------- plumbing
def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(args: argparse.Namespace) -> tuple[torch.device, int, int]:
    """The device, and the process group when launched by torchrun; ``(device, rank, world size)``."""
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available to this torch build.")
        # TF32 would dominate the accuracy of small meta-gradients (MATH.md, "Numerics").
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not launched_by_torchrun():
        return device, 0, 1
    backend = args.backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    return device, dist.get_rank(), dist.get_world_size()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    parser = make_parser(
        description="Meta-train the sinusoid regression net with each meta-batch split across processes: "
                    "run it with python (one process) or torchrun (--nproc_per_node=N, and --nnodes for "
                    "several machines). Rank 0 prints the meta-test MSE and the time per meta-iteration.",
    )
    parser.add_argument("--estimator", choices=ESTIMATORS, default="full", help="the meta-gradient estimator")
    parser.add_argument("--order", type=order_argument, default="auto",
                        help="'auto': Binomial(order='auto') (falls back to the blocked expansion where the "
                             "series diverges) and Truncated(steps=3); L: Binomial(order=L), Truncated(steps=L)")
    parser.add_argument("--reg", type=float, default=100.0, help="λ of Implicit's proximal term")
    parser.add_argument("--solver", choices=("cg", "neumann"), default="cg", help="Implicit's linear solver")
    parser.add_argument("--steps", type=int, default=5, help="K, inner SGD steps per task")
    parser.add_argument("--lr-inner", type=float, default=0.01, help="α, the inner SGD step size")
    parser.add_argument("--iterations", type=int, default=300, help="meta-training iterations (Adam steps)")
    parser.add_argument("--warmup", type=int, default=10, help="first iterations left out of the timings")
    parser.add_argument("--meta-batch", type=int, default=8,
                        help="tasks per meta-iteration, split across all processes")
    parser.add_argument("--shots", type=int, default=10, help="support points per task (and as many query points)")
    parser.add_argument("--test-tasks", type=int, default=100, help="held-out tasks for the meta-test MSE")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: one GPU per process (LOCAL_RANK), TF32 off")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                        help="torch.distributed backend under torchrun (default: nccl on cuda, gloo on cpu)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds a collective may wait for the other ranks before it fails")
    add_dtype_argument(parser, "floating-point type")
    add_threads_argument(parser, "torch CPU threads per process (default 1: the per-task ops are small, so "
                                 "spreading them over threads costs more than it saves, and the processes "
                                 "share the cores)")
    add_seed_argument(parser, "seed for the init and the task streams")
    add_json_argument(parser, "rank 0 writes the results to this file")
    args = parser.parse_args(argv)
    for name in ("steps", "order", "warmup"):
        if getattr(args, name) != "auto" and getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0")
    for name in ("iterations", "meta_batch", "shots"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.test_tasks < 2:
        parser.error("--test-tasks must be >= 2 for a confidence interval")
    if args.warmup >= args.iterations:
        parser.error(f"--warmup ({args.warmup}) must be below --iterations ({args.iterations})")
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict[str, Any]]:
    """Run on this rank; rank 0 prints and returns the results."""
    args = parse_args(argv)
    set_threads(args.threads, say=os.environ.get("RANK", "0") == "0")
    device, rank, world = setup(args)
    dtype = torch_dtype(args.dtype)
    try:
        result = train(args, device, dtype, rank, world)
        if dist.is_initialized():
            # Every rank reaches teardown together: a rank that tears its gloo connections
            # down while another still uses them can abort the other process.
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return None
    result.update(config=vars(args), machine=machine_description(device_description(device)))
    print(f"{result['estimator']} on {world} process{'es' if world > 1 else ''} "
          f"({device_description(device)} each), meta-batch {args.meta_batch}:")
    print(f"  meta-test MSE {result['test_mse_mean']:.4f} ± {result['test_mse_ci95']:.4f} "
          f"({args.test_tasks} held-out tasks)")
    print(f"  {result['ms_per_iteration']:.1f} ms per meta-iteration (median of {result['timed_iterations']}), "
          f"{result['ms_average_gradients']:.2f} ms of it in average_gradients "
          f"({result['ms_average_gradients_alone']:.2f} ms when no rank has to wait)")
    print(f"  θ identical on every rank: max |θ_r − θ_0| = {result['max_theta_difference_across_ranks']:.1e}")
    for warning in result["estimator_warnings"]:
        print("  " + warning_summary({"": {"count": warning["tasks"], "first": warning["message"]}},
                                     result["estimator"], warning["of_tasks"])[0])
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
