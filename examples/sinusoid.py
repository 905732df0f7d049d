"""Sinusoid regression meta-learning (the MAML setting), once per meta-gradient estimator.

Each task is a sine wave ``y = A sin(x + b)`` with amplitude ``A ~ U[0.1, 5]`` and
phase ``b ~ U[0, π]``, observed at ``x ~ U[-5, 5]``: ``--shots`` support points to
adapt on and as many query points to score the adapted model. The model is a
1-40-40-1 ReLU network. The inner loop takes ``--steps`` (K) plain gradient steps
of size ``--lr-inner`` (α) on the support MSE; the outer loop trains the
initialization θ with Adam (lr 1e-3) on the query MSE after adaptation, averaged
over a meta-batch of tasks.

The script meta-trains the same initialization on the same stream of tasks once
per estimator (Full, Checkpointed, FirstOrder, Truncated, Binomial; Implicit on
request) and prints one table row per estimator. Binomial is ``Binomial(order="auto")``
by default, which chooses its order per task and falls back to the blocked expansion
where the series diverges, with Truncated(3) beside it; ``--order L`` runs the paper's
fixed-order Binomial(L) and Truncated(L) instead. The columns:

- meta-test MSE: query MSE after K inner steps from the learned θ, on held-out
  tasks, as mean ± 95% confidence interval (normal approximation); the row
  "no meta-training" is the random initialization, adapted the same way;
- meta-gradient error: at that estimator's final θ, its meta-gradient and Full's on
  the same held-out tasks; the median over tasks of ``‖g − g_full‖ / ‖g_full‖``;
- time per meta-iteration: the median over the run's iterations, and its ratio to
  Full's, measured in the same process;
- peak memory of one meta-iteration's meta-gradient, measured with
  :mod:`metagrad.memory` where it means something: peak CUDA tensor memory on a GPU. On the
  CPU the only measure is the process's resident memory, which at this model size (a few
  thousand parameters) is allocator and framework overhead, not what the estimators store:
  it is not measured unless ``--memory on`` (``benchmarks/budget.py`` and
  ``benchmarks/step_sizes.py`` measure memory on models where it means something).

The estimators' warnings (a series that is not converging, a fallback) are counted
per task instead of printed into the progress bars, and reported once per estimator
and kind under the table. The script also writes ``results.json``, ``results.md`` and
``learning_curves.png`` (the smoothed meta-training query MSE per iteration) into the
folder ``--out``.

Run it with ``make demo`` or::

    python examples/sinusoid.py                      # defaults
    python examples/sinusoid.py --iterations 50 --test-tasks 20 --gradient-tasks 4   # a quick look
    python examples/sinusoid.py --order 2 --estimators full binomial truncated
    python examples/sinusoid.py --device cuda --dtype float64 --iterations 5000

What to expect (MATH.md, "Where it works, and where it breaks"): the accuracy of
Binomial(L) is governed by ``K·α·ℓ``, ℓ the largest |eigenvalue| of the inner
Hessians, which the table reports. Meta-training sharpens the inner Hessians. At
the defaults (K = 5, α = 0.01) K·α·ℓ is about 1.3 at the random initialization and
4 to 6 after meta-training, past the point where the expansion converges. With
``--order 3`` Binomial(3)'s meta-gradient then ends up off by tens of percent (the
script says so under the table) while Truncated(3) stays near 30%; the default
``Binomial(order="auto")`` detects the divergence and falls back to the blocked
expansion, and the warnings it raises doing so are counted under the table. With
``--lr-inner 0.002``, K·α·ℓ stays near 2, Binomial(3) stays within a few percent of
Full and matches its meta-test MSE, and Truncated(3) is off by about 17%.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # render to a file; no display is needed or assumed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import metagrad as mg  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cli beside this file
from cli import (WarningCounts, add_dtype_argument, add_seed_argument, add_threads_argument,  # noqa: E402
                 counting_warnings, cpu_description, exact_numerics_on, machine_description, make_parser,
                 order_argument, save_figure, set_threads, setup_device, smooth, torch_dtype, warning_summary,
                 write_json, write_table)
from metagrad.memory import peak_memory  # noqa: E402

ESTIMATORS = ("full", "checkpointed", "first_order", "truncated", "binomial", "implicit")
DEFAULT_ESTIMATORS = ESTIMATORS[:-1]  # Implicit on request: its inner problem differs (proximal term)
OUTER_LR = 1e-3
AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)

# Independent random streams: meta-training tasks, held-out test tasks, held-out
# tasks for the meta-gradient comparison. Offsets keep them apart for any --seed.
TRAIN_STREAM, TEST_STREAM, GRADIENT_STREAM = 0, 1_000_003, 2_000_003


# --------------------------------------------------------------------------- data
@dataclass
class Tasks:
    """A batch of sinusoid tasks; every tensor has a leading task dimension."""

    x_support: torch.Tensor  # (tasks, shots, 1)
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor

    def __len__(self) -> int:
        return self.x_support.shape[0]

    def task(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Support inputs and targets, query inputs and targets of task ``i``."""
        return self.x_support[i], self.y_support[i], self.x_query[i], self.y_query[i]


def sample_tasks(count: int, shots: int, generator: torch.Generator,
                 device: torch.device, dtype: torch.dtype) -> Tasks:
    """Draw ``count`` tasks with ``shots`` support and ``shots`` query points each.

    Sampling happens on the CPU from ``generator``, so the task stream is the same
    for every device and dtype.
    """
    amplitude = torch.empty(count, 1, 1, dtype=torch.float64).uniform_(*AMPLITUDE, generator=generator)
    phase = torch.empty(count, 1, 1, dtype=torch.float64).uniform_(*PHASE, generator=generator)
    x = torch.empty(count, 2 * shots, 1, dtype=torch.float64).uniform_(*X_RANGE, generator=generator)
    y = amplitude * torch.sin(x + phase)
    x, y = x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
    return Tasks(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def stream(seed: int, offset: int) -> torch.Generator:
    """A CPU generator for one of the independent task streams."""
    return torch.Generator().manual_seed(seed + offset)


# -------------------------------------------------------------------------- model
def make_model() -> nn.Module:
    """The 1-40-40-1 ReLU network of the MAML sinusoid experiment."""
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def make_estimator(name: str, order: Union[int, str], reg: float = 1.0, solver: str = "cg") -> mg.Estimator:
    """The estimator called ``name``; Truncated keeps as many steps as Binomial's order
    (3 with ``order="auto"``, where Binomial chooses its order per task).

    Implicit (iMAML) adds ``(reg/2)‖φ − θ‖²`` to the inner loss during meta-training, so
    its meta-gradient differs from Full's by design, not only by approximation.
    """
    if name == "full":
        return mg.Full()
    if name == "checkpointed":
        return mg.Checkpointed()
    if name == "first_order":
        return mg.FirstOrder()
    if name == "truncated":
        return mg.Truncated(steps=3 if order == "auto" else order)
    if name == "binomial":
        return mg.Binomial(order=order)
    if name == "implicit":
        return mg.Implicit(reg=reg, solver=solver)
    raise ValueError(f"unknown estimator {name!r}; choose from {ESTIMATORS}")


def label(estimator: mg.Estimator) -> str:
    """A short name for tables and plots, e.g. ``Binomial(3)``."""
    if isinstance(estimator, mg.Truncated):
        return f"Truncated({estimator.steps})"
    if isinstance(estimator, mg.Binomial):
        return f"Binomial({estimator.order})"  # Binomial(auto) for order="auto"
    return type(estimator).__name__


# ---------------------------------------------------------------- meta-learning
def meta_gradient_step(model: nn.Module, estimator: mg.Estimator, tasks: Tasks,
                       steps: int, lr_inner: float, warnings_seen: Optional[WarningCounts] = None,
                       one_block: bool = False) -> float:
    """Accumulate the meta-batch's averaged meta-gradient into ``.grad``; return its query MSE."""
    return accumulate_meta_gradients(model, estimator, tasks, range(len(tasks)), steps, lr_inner,
                                     warnings_seen, one_block) / len(tasks)


def in_one_block(estimator: mg.Estimator, one_block: bool) -> bool:
    """Whether the meta-batch runs in one block (``tasks=``): asked for, and the estimator can
    (every estimator of the package can; Binomial(order="auto") chooses each task's order)."""
    return one_block and estimator.why_not_tasks() is None


def accumulate_meta_gradients(model: nn.Module, estimator: mg.Estimator, tasks: Tasks,
                              indices: Iterable[int], steps: int, lr_inner: float,
                              warnings_seen: Optional[WarningCounts] = None, one_block: bool = False) -> float:
    """Accumulate the meta-gradients of the tasks ``indices`` into ``.grad``, each scaled by
    1/len(tasks) (the whole meta-batch); return their summed query MSE.

    The meta-gradient of the mean query loss is the mean of the per-task meta-gradients. With
    ``one_block`` (and an estimator that can, :func:`in_one_block`) the tasks run in one
    ``MetaGradient(tasks=...)`` block, each with its own fast weights; otherwise one block per
    task, each block's ``.backward()`` accumulating into the model's ``.grad``. With
    ``warnings_seen``, the estimator's warnings are counted there per block instead of printed
    (``cli.counting_warnings``).
    """
    indices = list(indices)
    if in_one_block(estimator, one_block) and indices:
        chosen = torch.tensor(indices, device=tasks.x_support.device)
        x_s, y_s, x_q, y_q = (t[chosen] for t in (tasks.x_support, tasks.y_support, tasks.x_query, tasks.y_query))
        with counting_warnings(warnings_seen), mg.MetaGradient(
                model, inner_opt=mg.optim.SGD(lr=lr_inner), estimator=estimator, tasks=len(indices)) as meta:
            for _ in range(steps):
                meta.step(lambda fmodel, x, y: F.mse_loss(fmodel(x), y), x_s, y_s)
            losses = F.mse_loss(meta.fmodel(x_q), y_q, reduction="none").mean(dim=(1, 2))  # each task's
            (losses.sum() / len(tasks)).backward()
        return float(losses.detach().sum())
    total = 0.0
    for i in indices:
        x_s, y_s, x_q, y_q = tasks.task(i)
        with counting_warnings(warnings_seen), \
                mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr_inner), estimator=estimator) as meta:
            for _ in range(steps):
                # Rebuilt during backward by the estimators that store iterates only;
                # it reads nothing but x_s and y_s, which stay fixed in this block.
                meta.step(lambda fmodel: F.mse_loss(fmodel(x_s), y_s))
            loss = F.mse_loss(meta.fmodel(x_q), y_q)
            (loss / len(tasks)).backward()
        total += loss.item()
    return total


@dataclass
class Run:
    """What one estimator's meta-training produced."""

    name: str
    estimator: mg.Estimator
    model: nn.Module
    train_mse: list[float] = field(default_factory=list)
    seconds_per_iteration: list[float] = field(default_factory=list)
    #: the estimator's warnings in meta-training, and in the evaluation after it (error and memory)
    train_warnings: WarningCounts = field(default_factory=dict)
    evaluation_warnings: WarningCounts = field(default_factory=dict)
    evaluation_tasks: int = 0


def meta_train(name: str, estimator: mg.Estimator, init: nn.Module, args: argparse.Namespace,
               device: torch.device, dtype: torch.dtype) -> Run:
    """Meta-train a copy of ``init`` with ``estimator`` on the seeded training stream."""
    torch.manual_seed(args.seed)  # every run starts from the same global RNG state
    model = copy.deepcopy(init)
    optimizer = torch.optim.Adam(model.parameters(), lr=OUTER_LR)
    generator = stream(args.seed, TRAIN_STREAM)  # the same task stream for every estimator
    run = Run(name, estimator, model)
    bar = tqdm(range(args.iterations), desc=f"{label(estimator):>14}", unit="it",
               dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
    for iteration in bar:
        tasks = sample_tasks(args.meta_batch, args.shots, generator, device, dtype)
        synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        mse = meta_gradient_step(model, estimator, tasks, args.steps, args.lr_inner, run.train_warnings,
                                 args.one_block == "on")
        optimizer.step()
        synchronize(device)
        run.seconds_per_iteration.append(time.perf_counter() - start)
        run.train_mse.append(mse)
        if iteration % 25 == 0 or iteration == args.iterations - 1:
            postfix = {"query_mse": f"{np.mean(run.train_mse[-25:]):.3f}"}
            if run.train_warnings:  # counted here, reported once after the table
                postfix["warned"] = str(max(w["count"] for w in run.train_warnings.values()))
            bar.set_postfix(postfix, refresh=False)
    bar.close()
    return run


# ------------------------------------------------------------------- evaluation
def meta_test_mse(model: nn.Module, tasks: Tasks, steps: int, lr_inner: float) -> list[float]:
    """Query MSE of each task after ``steps`` inner SGD steps from the model's parameters.

    Adaptation uses metagrad's own inner loop (FirstOrder stores no iterates), so
    it is the same update the meta-training used.
    """
    errors = []
    for i in range(len(tasks)):
        x_s, y_s, x_q, y_q = tasks.task(i)
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr_inner), estimator=mg.FirstOrder()) as meta:
            for _ in range(steps):
                meta.step(lambda fmodel: F.mse_loss(fmodel(x_s), y_s))
            with torch.no_grad():
                errors.append(F.mse_loss(meta.fmodel(x_q), y_q).item())
    return errors


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (normal approximation)."""
    mean = statistics.fmean(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean, half


def single_task_meta_gradient(model: nn.Module, estimator: mg.Estimator, task: tuple[torch.Tensor, ...],
                              steps: int, lr_inner: float,
                              warnings_seen: Optional[WarningCounts] = None) -> torch.Tensor:
    """One task's meta-gradient under ``estimator``, flattened; ``.grad`` is left alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    x_s, y_s, x_q, y_q = task
    with counting_warnings(warnings_seen), \
            mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr_inner), estimator=estimator) as meta:
        for _ in range(steps):
            meta.step(lambda fmodel: F.mse_loss(fmodel(x_s), y_s))
        loss = F.mse_loss(meta.fmodel(x_q), y_q)
        grads = torch.autograd.grad(loss, params)
    return torch.cat([g.reshape(-1) for g in grads])


def relative_gradient_errors(model: nn.Module, estimator: mg.Estimator, tasks: Tasks,
                             steps: int, lr_inner: float,
                             warnings_seen: Optional[WarningCounts] = None) -> list[float]:
    """``‖g − g_full‖ / ‖g_full‖`` per task, both computed at the model's current θ."""
    errors = []
    for i in range(len(tasks)):
        task = tasks.task(i)
        g = single_task_meta_gradient(model, estimator, task, steps, lr_inner, warnings_seen)
        g_full = single_task_meta_gradient(model, mg.Full(), task, steps, lr_inner)
        errors.append((torch.linalg.vector_norm(g - g_full) / torch.linalg.vector_norm(g_full)).item())
    return errors


def inner_sharpness(model: nn.Module, task: tuple[torch.Tensor, ...], steps: int, lr_inner: float,
                    iterations: int = 20) -> float:
    """ℓ: the largest |eigenvalue| of the inner Hessians ``H_0 … H_{K−1}`` of one task.

    The inner loop is replayed with ``torch.func``; each ``H_k`` is probed by power
    iteration on Hessian-vector products, all K at once under ``vmap``. Power
    iteration approaches ℓ from below, so this is an estimate, not a bound.
    ``K·α·ℓ`` decides whether Binomial's expansion converges (MATH.md).
    """
    x_s, y_s, _, _ = task
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def support_loss(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(torch.func.functional_call(model, weights, (x_s,)), y_s)

    gradient = torch.func.grad(support_loss)
    iterates = [params]
    for _ in range(steps - 1):
        g = gradient(iterates[-1])
        iterates.append({n: t - lr_inner * g[n] for n, t in iterates[-1].items()})
    stacked = {n: torch.stack([it[n] for it in iterates]) for n in params}

    def hvp(weights: dict[str, torch.Tensor], vector: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # H is symmetric, so the vector-Jacobian product of the gradient is H·vector.
        return torch.func.vjp(gradient, weights)[1](vector)[0]

    generator = torch.Generator().manual_seed(0)  # a fixed start: the estimate is reproducible
    vector = {n: torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
              for n, t in stacked.items()}
    norms = torch.zeros(len(iterates), dtype=torch.float64)
    for _ in range(iterations):
        norm = torch.sqrt(sum((t.flatten(1) ** 2).sum(1) for t in vector.values()))
        vector = {n: t / norm.view(-1, *[1] * (t.dim() - 1)) for n, t in vector.items()}
        vector = torch.func.vmap(hvp)(stacked, vector)
        norms = torch.sqrt(sum((t.flatten(1) ** 2).sum(1) for t in vector.values()))
    return float(norms.max())


def k_alpha_ell(model: nn.Module, tasks: Tasks, steps: int, lr_inner: float) -> float:
    """Median over ``tasks`` of ``K·α·ℓ`` at the model's current θ."""
    return statistics.median(steps * lr_inner * inner_sharpness(model, tasks.task(i), steps, lr_inner)
                             for i in range(len(tasks)))


def meta_iteration_peak_memory(model: nn.Module, estimator: mg.Estimator, tasks: Tasks,
                               steps: int, lr_inner: float, device: torch.device,
                               repeats: int = 3, warnings_seen: Optional[WarningCounts] = None,
                               one_block: bool = False) -> tuple[int, str]:
    """Median peak memory (bytes) of one meta-batch's meta-gradient, and the measure used.

    One unmeasured call first, so that one-off costs (code paths run for the first
    time, lazily allocated buffers) are not counted. ``.grad`` is restored afterwards.
    """
    saved = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    meta_gradient_step(model, estimator, tasks, steps, lr_inner, warnings_seen, one_block)
    peaks, method = [], ""
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        with peak_memory(device) as mem:
            meta_gradient_step(model, estimator, tasks, steps, lr_inner, warnings_seen, one_block)
        assert mem.peak_bytes is not None
        peaks.append(mem.peak_bytes)
        method = mem.method
    for p, g in zip(model.parameters(), saved):
        p.grad = g
    return int(statistics.median(peaks)), method


# ---------------------------------------------------------------------- results
@dataclass
class Row:
    """One line of the results table."""

    name: str
    estimator: str
    test_mse_mean: float
    test_mse_ci95: float
    gradient_error_median: Optional[float] = None
    ms_per_iteration: Optional[float] = None
    time_vs_full: Optional[float] = None
    peak_memory_bytes: Optional[int] = None
    k_alpha_ell_median: Optional[float] = None
    #: the estimator's warnings: {"phase", "message" (the first), "tasks" (warned on), "of_tasks"}
    warnings: list[dict[str, Any]] = field(default_factory=list)


def format_table(rows: Sequence[Row], caption: str) -> str:
    """The results as a Markdown table, caption underneath."""
    header = ("| estimator | meta-test MSE (mean ± 95% CI) | rel. meta-grad error vs Full (median) "
              "| K·α·ℓ at θ (median) | ms / meta-iter (median) | time vs Full | peak memory (KiB) |")
    lines = [header, "|" + "---|" * 7]

    def fmt(value: Optional[float], spec: str) -> str:
        return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    for r in rows:
        memory = None if r.peak_memory_bytes is None else r.peak_memory_bytes / 1024
        lines.append(
            f"| {r.estimator} | {r.test_mse_mean:.3f} ± {r.test_mse_ci95:.3f} "
            f"| {fmt(r.gradient_error_median, '.2e')} | {fmt(r.k_alpha_ell_median, '.2f')} "
            f"| {fmt(r.ms_per_iteration, '.1f')} "
            f"| {fmt(r.time_vs_full, '.2f') + ('×' if r.time_vs_full is not None else '')} "
            f"| {fmt(memory, ',.0f')} |"
        )
    return "\n".join(lines) + "\n\n" + caption + "\n"


def regime_notes(rows: Sequence[Row], args: argparse.Namespace) -> str:
    """Say when Binomial ran outside the regime where its expansion converges."""
    notes = []
    for r in rows:
        # Flag the breakdown only where it shows: a large error with K·α·ℓ above 1.
        if (r.name == "binomial" and args.order != "auto" and 0 < args.order < args.steps
                and r.k_alpha_ell_median is not None and r.k_alpha_ell_median > 1
                and r.gradient_error_median is not None and r.gradient_error_median > 0.1):
            notes.append(
                f"Note: {r.estimator}'s meta-gradient is off by {r.gradient_error_median:.0%} at its final θ, "
                f"where K·α·ℓ ≈ {r.k_alpha_ell_median:.1f}. The inner Hessians sharpen as meta-training "
                "proceeds, and once K·α·ℓ is well above 1 the binomial expansion stops converging "
                "(MATH.md, \"Where it works, and where it breaks\"). Fewer inner steps (--steps), a "
                "smaller --lr-inner or a higher --order keep it in its regime."
            )
        if r.name == "implicit":
            notes.append(
                f"Note: Implicit (iMAML, reg = {args.reg}) meta-trains on a different inner problem, the "
                "support loss plus (reg/2)‖φ − θ‖², and assumes its K steps have nearly converged on it; "
                "its meta-gradient error against Full measures that difference, not only approximation. "
                "Its meta-test MSE uses the same plain K-step adaptation as every other row."
            )
    return "\n".join(notes)


def warning_records(run: Run, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The run's counted warnings, for results.json."""
    phases = (("meta-training", run.train_warnings, args.iterations * args.meta_batch),
              ("evaluation", run.evaluation_warnings, run.evaluation_tasks))
    return [{"phase": phase, "message": entry["first"], "tasks": entry["count"], "of_tasks": of}
            for phase, seen, of in phases for entry in seen.values()]


def warning_notes(runs: Sequence[Run], args: argparse.Namespace) -> str:
    """The estimators' warnings, counted during the run: one line per estimator and kind of warning."""
    lines = []
    for run in runs:
        for kind in {**run.train_warnings, **run.evaluation_warnings}:
            train = run.train_warnings.get(kind, {"count": 0})
            evaluation = run.evaluation_warnings.get(kind, {"count": 0})
            first = train.get("first") or evaluation["first"]
            lines += warning_summary(
                {kind: {"count": train["count"], "first": first}}, label(run.estimator),
                args.iterations * args.meta_batch,
                f"meta-training tasks and {evaluation['count']} of the {run.evaluation_tasks} meta-gradients "
                "after it (error comparison" + (", memory measurement)" if run.evaluation_tasks > args.gradient_tasks
                                               else ")"))
    return "\n".join(lines)


def measure_memory(args: argparse.Namespace, device: torch.device) -> bool:
    """Whether the memory column is measured: ``--memory on``, or ``auto`` on a GPU."""
    return args.memory == "on" or (args.memory == "auto" and device.type == "cuda")


def table_caption(args: argparse.Namespace, device: torch.device, memory_method: str,
                  gradient_tasks: int) -> str:
    """What every column means, and the settings behind them."""
    if not memory_method:
        memory = ("not measured (—): on the CPU the only measure is the process's resident memory, "
                  "which at this model size is allocator and framework overhead, not what the estimators "
                  "store (--memory on measures it anyway; benchmarks/budget.py and benchmarks/step_sizes.py "
                  "measure memory where it means something)")
    elif memory_method == "cuda_max_memory_allocated":
        memory = ("peak CUDA tensor memory (torch.cuda.max_memory_allocated) above the level at entry, "
                  "for one meta-batch's meta-gradient")
    elif memory_method == "proc_vmhwm":
        memory = ("peak process resident memory (Linux VmHWM, reset through /proc/self/clear_refs) "
                  "above the resident memory at entry, for one meta-batch's meta-gradient; it counts "
                  "every allocation of the process in whole pages, not tensors only, so it is an "
                  "approximation, and at this model size it is mostly allocator and framework overhead")
    else:
        memory = ("growth of the process's lifetime peak RSS (getrusage ru_maxrss) over one meta-batch's "
                  "meta-gradient: /proc/self/clear_refs was not writable, so this is a lower bound")
    return (
        f"Sinusoid regression, 1-40-40-1 ReLU net, K = {args.steps} inner SGD steps, α = {args.lr_inner}, "
        f"{args.shots}-shot support and query, meta-batch {args.meta_batch}, {args.iterations} Adam "
        f"iterations (lr {OUTER_LR}), {args.dtype} on {device_description(device)}, seed {args.seed}. "
        f"Meta-test MSE: query MSE after K inner steps on {args.test_tasks} held-out tasks. "
        f"Meta-gradient error: ‖g − g_full‖/‖g_full‖ at the estimator's final θ, median over "
        f"{gradient_tasks} held-out single tasks. K·α·ℓ: ℓ the largest |eigenvalue| of the inner "
        f"Hessians H_0 … H_(K−1) at that θ (power iteration), median over the same tasks; the "
        f"binomial expansion is accurate up to about 1 and diverges well above it. Time: median wall time of a meta-iteration "
        f"(meta-gradient of the meta-batch and the Adam step), and its ratio to Full's; "
        + ("each meta-batch in one block over its tasks (MetaGradient(tasks=...)); Binomial(auto) "
           "chooses each task's order. " if args.one_block == "on"
           else "a block per task. ") +
        f"Peak memory: {memory}" + ("; median of 3." if memory_method else ".")
    )


def device_description(device: torch.device) -> str:
    """A short description of the machine the numbers come from."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (TF32 off, cuDNN deterministic)"
    return cpu_description()


def plot_learning_curves(runs: Sequence[Run], path: str, baseline_mse: float) -> None:
    """Smoothed meta-training query MSE against iteration, one line per estimator, log y axis."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    window = max(1, min(50, len(runs[0].train_mse) // 10)) if runs else 1
    # Full and Checkpointed compute the same meta-gradient, so their curves coincide:
    # Full is drawn wide underneath, Checkpointed dashed on top.
    style = {"full": {"linewidth": 3.0, "alpha": 0.6}, "checkpointed": {"linestyle": "--"}}
    for run in runs:
        ax.plot(np.arange(1, len(run.train_mse) + 1), smooth(run.train_mse, window),
                label=label(run.estimator), **{"linewidth": 1.4, **style.get(run.name, {})})
    ax.axhline(baseline_mse, color="gray", linestyle=":", linewidth=1,
               label="no meta-training (test)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel(f"query MSE after adaptation (moving average, {window} it.)")
    ax.set_title("Sinusoid meta-training, one run per estimator (same init, same tasks)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


# --------------------------------------------------------------------- plumbing
def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    parser = make_parser(
        description="Meta-train a 1-40-40-1 ReLU net on sinusoid regression (MAML setting) once per "
                    "meta-gradient estimator, from the same init on the same tasks; print a table of "
                    "meta-test MSE, meta-gradient error against Full, time and peak memory, and "
                    "write results.json, results.md and learning_curves.png.",
    )
    parser.add_argument("--steps", type=int, default=5, help="K, inner SGD steps per task")
    parser.add_argument("--lr-inner", type=float, default=0.01, help="α, the inner SGD step size")
    parser.add_argument("--order", type=order_argument, default="auto",
                        help="'auto': Binomial(order='auto') chooses its order per task (rtol 1e-3, falling "
                             "back to the blocked binomial expansion, which meets rtol block by block, where "
                             "the series diverges), and Truncated keeps 3 steps; L: the paper's fixed-order "
                             "Binomial(order=L), and Truncated(steps=L) for a comparison at equal depth")
    parser.add_argument("--iterations", type=int, default=700, help="meta-training iterations (Adam steps)")
    parser.add_argument("--meta-batch", type=int, default=4, help="tasks per meta-iteration")
    parser.add_argument("--shots", type=int, default=10, help="support points per task (and as many query points)")
    parser.add_argument("--test-tasks", type=int, default=200, help="held-out tasks for the meta-test MSE")
    parser.add_argument("--gradient-tasks", type=int, default=20,
                        help="held-out tasks for the meta-gradient error against Full")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda turns TF32 off and cuDNN determinism on, so that accuracy columns are not "
                             "dominated by reduced-precision matmuls")
    add_dtype_argument(parser, "floating-point type")
    add_threads_argument(parser)
    add_seed_argument(parser, "seed for the init and all task streams")
    parser.add_argument("--estimators", "--estimator", nargs="+", choices=ESTIMATORS,
                        default=list(DEFAULT_ESTIMATORS), metavar="NAME",
                        help=f"estimators to run, any of {' '.join(ESTIMATORS)} (implicit: iMAML, whose "
                             "inner loop adds the proximal term (reg/2)‖φ − θ‖²)")
    parser.add_argument("--reg", type=float, default=100.0,
                        help="λ of Implicit's proximal term. CG needs the inner Hessian ⪰ −λI: during "
                             "meta-training this net's Hessian reaches eigenvalues below −50 (reg 50 stops "
                             "with NegativeCurvatureError), and α·(ℓ + λ) < 2 keeps the inner loop stable")
    parser.add_argument("--solver", choices=("cg", "neumann"), default="cg", help="Implicit's linear solver")
    parser.add_argument("--one-block", choices=("on", "off"), default="on",
                        help="on: meta-train each meta-batch in one block over its tasks "
                             "(MetaGradient(tasks=meta_batch)) with every estimator that can (all of "
                             "the package's: Binomial(order='auto') chooses each task's order); off: a "
                             "block per task for every estimator")
    parser.add_argument("--memory", choices=("auto", "on", "off"), default="auto",
                        help="measure the peak memory column: auto measures it on a GPU only (on the CPU "
                             "the process's resident memory at this model size is allocator overhead)")
    parser.add_argument("--out", default=os.path.join("results", "sinusoid"),
                        help="output folder for results.json, results.md and learning_curves.png")
    args = parser.parse_args(argv)
    if args.steps < 0 or (args.order != "auto" and args.order < 0):
        parser.error("--steps and --order must be >= 0")
    for name in ("iterations", "meta_batch", "shots", "gradient_tasks"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.test_tasks < 2:
        parser.error("--test-tasks must be >= 2 for a confidence interval")
    if args.lr_inner < 0:
        parser.error("--lr-inner must be >= 0")
    args.estimators = [name for name in ESTIMATORS if name in args.estimators]  # fixed order, no repeats
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the experiment; return what was written to results.json."""
    args = parse_args(argv)
    device = setup_device(args.device)
    with exact_numerics_on(device):
        return run_experiment(args, device)


def run_experiment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Meta-train, evaluate, print and write the results (see the module docstring)."""
    dtype = torch_dtype(args.dtype)
    # Every tensor here is tiny (at most 40 x 40 per task), so intra-op threads only
    # synchronize; on a machine shared with other work, spinning threads made the
    # evaluation about 10x slower.
    set_threads(args.threads)
    seed_everything(args.seed)
    os.makedirs(args.out, exist_ok=True)

    init = make_model().to(device=device, dtype=dtype)  # seeded: the same θ_0 for every estimator
    test_tasks = sample_tasks(args.test_tasks, args.shots, stream(args.seed, TEST_STREAM), device, dtype)
    gradient_tasks = sample_tasks(args.gradient_tasks, args.shots, stream(args.seed, GRADIENT_STREAM),
                                  device, dtype)
    memory_tasks = sample_tasks(args.meta_batch, args.shots, stream(args.seed, GRADIENT_STREAM + 1),
                                device, dtype)

    baseline = mean_ci95(meta_test_mse(init, test_tasks, args.steps, args.lr_inner))
    rows = [Row("none", "no meta-training", *baseline,
                k_alpha_ell_median=k_alpha_ell(init, gradient_tasks, args.steps, args.lr_inner))]
    runs: list[Run] = []
    memory_method = ""
    started = time.perf_counter()
    for name in args.estimators:
        estimator = make_estimator(name, args.order, args.reg, args.solver)
        run = meta_train(name, estimator, init, args, device, dtype)
        runs.append(run)
        mse = mean_ci95(meta_test_mse(run.model, test_tasks, args.steps, args.lr_inner))
        errors = relative_gradient_errors(run.model, estimator, gradient_tasks, args.steps, args.lr_inner,
                                          run.evaluation_warnings)
        repeats = 3
        peak: Optional[int] = None
        run.evaluation_tasks = len(gradient_tasks)
        if measure_memory(args, device):
            peak, memory_method = meta_iteration_peak_memory(run.model, estimator, memory_tasks, args.steps,
                                                             args.lr_inner, device, repeats, run.evaluation_warnings,
                                                             args.one_block == "on")
            run.evaluation_tasks += (1 + repeats) * len(memory_tasks)
        rows.append(Row(name, label(estimator), *mse, gradient_error_median=statistics.median(errors),
                        ms_per_iteration=1000 * statistics.median(run.seconds_per_iteration),
                        peak_memory_bytes=peak,
                        k_alpha_ell_median=k_alpha_ell(run.model, gradient_tasks, args.steps, args.lr_inner),
                        warnings=warning_records(run, args)))
    full_ms = next((r.ms_per_iteration for r in rows if r.name == "full"), None)
    for r in rows[1:]:
        r.time_vs_full = None if full_ms is None or r.ms_per_iteration is None else r.ms_per_iteration / full_ms

    caption = table_caption(args, device, memory_method, args.gradient_tasks)
    table = format_table(rows, caption)
    notes = "\n".join(filter(None, [regime_notes(rows, args), warning_notes(runs, args)]))
    if notes:
        table += "\n" + notes + "\n"
    write_table(args.out, "Sinusoid meta-learning, one run per estimator", table)
    results = {
        "config": {**vars(args), "outer_lr": OUTER_LR},
        "machine": machine_description(device_description(device)),
        "memory_method": memory_method,
        "caption": caption,
        "rows": [asdict(r) for r in rows],
        "learning_curves": {run.name: run.train_mse for run in runs},
        "seconds_meta_training_and_evaluation": time.perf_counter() - started,
    }
    write_json(os.path.join(args.out, "results.json"), results)
    if runs:
        plot_learning_curves(runs, os.path.join(args.out, "learning_curves.png"), baseline[0])
    print(f"Wrote results.md, results.json and learning_curves.png to {args.out}")
    return results


if __name__ == "__main__":
    main()
