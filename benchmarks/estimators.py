"""Benchmark every metagrad estimator against the full unrolls users run today.

For one problem (``--config``) and each number of inner steps K (``--K``), this script
computes the meta-gradient of one task with every metagrad estimator and with the full
unroll of ``higher``, of ``torchopt`` and of a plain hand-written autograd loop, all on
the same model, the same task and the same inner SGD step, side by side in one process.
For each it reports:

- **time** per meta-gradient (inner loop, query loss and backward): the median of
  ``--repeats`` timed runs after one warm-up run, with the min–max range; the timed runs
  of all methods are interleaved, round by round, so that a change in the machine's load
  hits every method alike;
- the ratio of that time to Full's;
- **peak memory** of one meta-gradient (:func:`metagrad.memory.peak_memory`: CUDA tensor
  memory above the level at entry on a GPU, growth of the process's peak resident set on
  the CPU) and its ratio to Full's;
- **relative error** ``‖g − g_Full‖ / ‖g_Full‖`` against metagrad's Full, computed in a
  separate pass in float64 on the CPU, or on a GPU in the timing dtype with TF32 off and
  cuDNN deterministic (``--error-dtype`` overrides).

With ``--meta on`` (off by default) every metagrad estimator row and the plain unroll run a
second time, in the same interleaved rounds, with meta-parameters η (MATH.md, "Meta-parameters
other than θ"): per-parameter learned step sizes (Meta-SGD, ``mg.optim.SGD(lr={name: tensor
requiring grad})``) and a weight-decay strength ``exp(log_wd)`` captured by the inner loss
``L_tr + exp(log_wd)·Σ‖φ‖²``. A second table per K gives each η row's time, its ratio to the
same row's time without η (of the medians, and paired per round), its ratio to Full with η,
and the relative error of its η-gradient (every η's ``.grad``, concatenated) and of its
θ-gradient against Full's with η, in the error pass's dtype.

Output: a markdown table per K on stdout (``--markdown`` also writes it to a file) and
a JSON file (``--json``) with every number, the machine, the versions and the date.

Configs (random inputs of the right shapes; the sinusoid tasks are real sinusoids):

- ``sinusoid``: 1-40-40-1 ReLU MLP, 10-shot support, 10 query points, MSE;
- ``omniglot``: 28×28 grayscale, 5-way 1-shot, 15 queries per class, CNN4;
- ``miniimagenet``: 84×84 RGB, 5-way 5-shot, 15 queries per class, CNN4;
- ``long_horizon``: a 1-100-100-1 ReLU MLP on a sinusoid task, for K in the thousands.

Long horizons (``--snapshots``): each value (an integer S, or ``sqrt``) adds the row
``Checkpointed(snapshots=S)``, and each ``--block`` S adds ``Binomial(L, block=S,
snapshots=True)`` beside ``Binomial(L, block=S)``. The notes column and the JSON then give the
exact bytes of the iterates (and optimizer states) held at once (``meta.info``:
``peak_iterate_bytes``, a finer measure than the CPU's resident memory), the iterates stored and
the steps recomputed; ``--plot`` draws memory against K, log-log. ``--full-max-K`` skips Full
above a K (its unrolled graph grows with K); Checkpointed, exact too, is then the reference of
the error column::

    python -m benchmarks.estimators --config long_horizon --K 200 1000 5000 --lr 0.001 \
        --estimators full checkpointed binomial --order 2 --block 25 --snapshots sqrt \
        --whole-levels off --tight off --baselines off --plot docs/long_horizon.png --json lh.json

CNN4 is four blocks of 3×3 conv → BatchNorm (``track_running_stats=False``: batch
statistics, as in MAML) → ReLU → 2×2 max-pool, then a linear head; 32 filters by
default for both image configs, the shapes of docs/MATH.md's measurements
(``--filters 64`` gives MAML's Omniglot net).

On a GPU the script sets ``torch.backends.cuda.matmul.allow_tf32 = False``,
``torch.backends.cudnn.allow_tf32 = False``, ``torch.backends.cudnn.deterministic = True``
and ``torch.backends.cudnn.benchmark = False`` for the whole run, and prints that it did.

Run::

    python -m benchmarks.estimators --config sinusoid --K 5 20 50 --device cpu --json out.json
    python -m benchmarks.estimators --config sinusoid --K 5 20 --meta on --json meta.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import metagrad as mg
from metagrad.memory import peak_memory

if __package__ in (None, ""):  # run as a file: examples.cli from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.cli import (cpu_model, add_dtype_argument, add_json_argument, add_seed_argument,  # noqa: E402
                          add_threads_argument, count_argument, make_parser, set_threads, write_json)

ESTIMATORS = ("full", "checkpointed", "first_order", "truncated", "binomial", "implicit")
BASELINES = ("plain", "higher", "torchopt")

#: The weight-decay strength exp(log_wd) of the --meta inner loss, at which log_wd starts.
WEIGHT_DECAY = 1e-4
#: The baselines that also run with η under --meta (written by hand here, as Full's reference).
META_BASELINES = ("plain",)
META_NOTE = (
    "η (--meta on): per-parameter learned step sizes (Meta-SGD: mg.optim.SGD(lr={name: tensor "
    "of α requiring grad})) and a weight-decay strength captured by the inner loss "
    "L_tr + exp(log_wd)·Σ‖φ‖², log_wd = log(1e-4) requiring grad."
)

NOISE_NOTE_CPU = (
    "Timings on a shared CPU are noisy: other jobs run on the same cores, so single ratios can "
    "move by 10-30% between runs; the min-max range of the repeats is shown beside each median."
)


# ----------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Config:
    """One benchmark problem."""

    name: str
    description: str
    kind: str  # "mlp" or "cnn"
    channels: int = 1
    size: int = 28
    ways: int = 5
    shots: int = 1
    queries: int = 15  # per class for the CNN configs; points for the sinusoid
    filters: int = 32
    width: int = 40  # the MLP's hidden units


CONFIGS = {
    "sinusoid": Config("sinusoid", "1-40-40-1 ReLU MLP, sinusoid regression, 10-shot support, "
                       "10 query points, MSE", "mlp", shots=10, queries=10),
    "omniglot": Config("omniglot", "28×28×1, 5-way 1-shot, 15 queries/class, CNN4, cross-entropy",
                       "cnn", channels=1, size=28, ways=5, shots=1, queries=15),
    "miniimagenet": Config("miniimagenet", "84×84×3, 5-way 5-shot, 15 queries/class, CNN4, "
                           "cross-entropy", "cnn", channels=3, size=84, ways=5, shots=5, queries=15),
    "long_horizon": Config("long_horizon", "1-100-100-1 ReLU MLP, sinusoid regression, 10-shot support, "
                           "10 query points, MSE", "mlp", shots=10, queries=10, width=100),
}


def make_model(config: Config) -> nn.Module:
    """The config's network (float32, CPU); the caller moves and casts it."""
    if config.kind == "mlp":
        width = config.width
        return nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, 1))
    layers: list[nn.Module] = []
    channels, size = config.channels, config.size
    for _ in range(4):
        layers += [nn.Conv2d(channels, config.filters, 3, padding=1),
                   nn.BatchNorm2d(config.filters, track_running_stats=False),
                   nn.ReLU(), nn.MaxPool2d(2)]
        channels, size = config.filters, size // 2
    layers += [nn.Flatten(), nn.Linear(config.filters * size * size, config.ways)]
    return nn.Sequential(*layers)


def make_task(config: Config, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``(x_s, y_s, x_q, y_q)`` on the CPU in float32 (labels int64)."""
    if config.kind == "mlp":
        amplitude = 0.1 + 4.9 * torch.rand((), generator=generator)
        phase = math.pi * torch.rand((), generator=generator)
        x = 10 * torch.rand(config.shots + config.queries, 1, generator=generator) - 5
        y = amplitude * torch.sin(x - phase)
        return x[:config.shots], y[:config.shots], x[config.shots:], y[config.shots:]
    shape = (config.channels, config.size, config.size)
    x_s = torch.randn(config.ways * config.shots, *shape, generator=generator)
    x_q = torch.randn(config.ways * config.queries, *shape, generator=generator)
    y_s = torch.arange(config.ways).repeat_interleave(config.shots)
    y_q = torch.arange(config.ways).repeat_interleave(config.queries)
    return x_s, y_s, x_q, y_q


def loss_function(config: Config) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return F.mse_loss if config.kind == "mlp" else F.cross_entropy


# ------------------------------------------------------------------------------ methods
@dataclass
class Method:
    """One way of computing the meta-gradient: a label and what builds it."""

    key: str  # "full", "binomial", "higher", ...
    label: str
    estimator: Optional[mg.Estimator] = None  # None for the baselines
    order: int = 0  # L, for the hand-written Binomial
    meta: bool = False  # with the meta-parameters η of --meta (Meta-SGD step sizes, weight decay)


@dataclass
class Problem:
    """A model and one task on one device in one dtype, with the inner loop's settings."""

    model: nn.Module
    task: tuple[torch.Tensor, ...]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    steps: int
    lr: float
    device: torch.device
    #: The meta-parameters of ``--meta``: a learned step size per parameter entry (Meta-SGD,
    #: by parameter name) and the log of a weight-decay strength in the inner loss.
    lrs: Optional[dict[str, torch.Tensor]] = None
    log_wd: Optional[torch.Tensor] = None

    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def meta_tensors(self) -> list[torch.Tensor]:
        """η in a fixed order: ``log_wd``, then the step sizes in parameter order."""
        if self.log_wd is None or self.lrs is None:
            return []
        return [self.log_wd, *self.lrs.values()]

    def attach_meta(self) -> None:
        """Create η (MATH.md, "Meta-parameters other than θ"): ``lrs[n]``, a tensor of α the
        shape of parameter n that requires grad, and ``log_wd = log(1e-4)``, captured by the
        inner loss ``L + exp(log_wd)·Σ‖φ‖²``."""
        dtype = next(iter(self.model.parameters())).dtype
        self.lrs = {n: torch.full_like(p, self.lr, requires_grad=True)
                    for n, p in self.model.named_parameters() if p.requires_grad}
        self.log_wd = torch.tensor(math.log(WEIGHT_DECAY), dtype=dtype, device=self.device,
                                   requires_grad=True)


def _accepts(function: Callable[..., Any], argument: str) -> bool:
    import inspect

    return argument in inspect.signature(function).parameters


def estimator_methods(names: Sequence[str], steps: int, orders: Sequence[int],
                      chunk_sizes: Sequence[int], reg: Optional[float], lr: float,
                      tight: bool = True, max_memory: Sequence[str] = (),
                      blocks: Sequence[int] = (), whole_levels: bool = True,
                      snapshots: Sequence[Any] = (), full: bool = True) -> list[Method]:
    methods = []
    for name in names:
        if name == "full":
            if full:
                methods.append(Method("full", "Full", mg.Full()))
        elif name == "checkpointed":
            methods.append(Method("checkpointed", "Checkpointed", mg.Checkpointed()))
            for count in snapshots:
                methods.append(Method("checkpointed", f"Checkpointed(snapshots={count!r})",
                                      mg.Checkpointed(snapshots=count)))
        elif name == "first_order":
            methods.append(Method("first_order", "FirstOrder", mg.FirstOrder()))
        elif name == "truncated":
            for order in orders:
                methods.append(Method("truncated", f"Truncated({order})", mg.Truncated(steps=order)))
        elif name == "binomial":
            for order in orders:
                if whole_levels:
                    methods.append(Method("binomial", f"Binomial({order})", mg.Binomial(order=order)))
                if tight and whole_levels and _accepts(mg.Binomial, "monitor"):
                    # The tight grouping: L(K−L+1) products, no level norms (MATH.md).
                    methods.append(Method("binomial", f"Binomial({order}, monitor=False)",
                                          mg.Binomial(order=order, monitor=False)))
                for block in blocks:
                    if order < block < steps:  # otherwise the same as plain Binomial, or exact
                        methods.append(Method("binomial", f"Binomial({order}, block={block})",
                                              mg.Binomial(order=order, block=block)))
                        if snapshots:
                            methods.append(Method("binomial", f"Binomial({order}, block={block}, snapshots=True)",
                                                  mg.Binomial(order=order, block=block, snapshots=True)))
                for chunk in chunk_sizes:
                    methods.append(Method("binomial", f"Binomial({order}, chunk_size={chunk})",
                                          mg.Binomial(order=order, chunk_size=chunk)))
                if _accepts(mg.Binomial, "max_memory"):
                    for budget in max_memory:
                        methods.append(Method("binomial", f"Binomial({order}, max_memory={budget!r})",
                                              mg.Binomial(order=order, max_memory=budget)))
        elif name == "implicit":
            lam = reg if reg is not None else (1.0 / (steps * lr) if steps * lr > 0 else 1.0)
            methods.append(Method("implicit", f"Implicit(reg={lam:g})", mg.Implicit(reg=lam)))
    return methods


def baseline_methods(enabled: bool) -> tuple[list[Method], list[str]]:
    """The full unrolls of a plain autograd loop, higher and torchopt (those installed)."""
    if not enabled:
        return [], []
    methods, notes = [Method("plain", "plain autograd unroll")], []
    try:
        import higher  # noqa: F401
        methods.append(Method("higher", "higher (full unroll)"))
    except ImportError as error:
        notes.append(f"higher not installed ({error}); its row is left out.")
    try:
        import torchopt  # noqa: F401
        methods.append(Method("torchopt", "torchopt MetaSGD (full unroll)"))
    except ImportError as error:
        notes.append(f"torchopt not installed ({error}); its row is left out.")
    return methods, notes


def run_method(method: Method, problem: Problem) -> dict[str, Any]:
    """Compute one meta-gradient into the parameters' ``.grad``; return ``meta.info``."""
    model, loss_fn, steps, lr = problem.model, problem.loss, problem.steps, problem.lr
    x_s, y_s, x_q, y_q = problem.task
    if method.meta:
        return run_meta_method(method, problem)
    if method.estimator is not None:
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=method.estimator) as meta:
            for _ in range(steps):
                meta.step(lambda fmodel: loss_fn(fmodel(x_s), y_s))
            loss_fn(meta.fmodel(x_q), y_q).backward()
        return dict(meta.info)
    if method.key == "plain":  # what MetaGradient's Full does, written by hand
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = problem.params()
        for _ in range(steps):
            out = torch.func.functional_call(model, dict(zip(names, params)), (x_s,))
            grads = torch.autograd.grad(loss_fn(out, y_s), params, create_graph=True)
            params = [p - lr * g for p, g in zip(params, grads)]
        loss_fn(torch.func.functional_call(model, dict(zip(names, params)), (x_q,)), y_q).backward()
        return {}
    if method.key == "plain_binomial":  # what MetaGradient's Binomial(L) does, written by hand
        plain_binomial(problem, method.order)
        return {}
    if method.key == "higher":
        import higher

        inner = torch.optim.SGD(problem.params(), lr=lr)
        with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(loss_fn(fmodel(x_s), y_s))
            loss_fn(fmodel(x_q), y_q).backward()
        return {}
    if method.key == "torchopt":
        import torchopt

        saved = torchopt.extract_state_dict(model)
        inner = torchopt.MetaSGD(model, lr=lr)
        try:
            for _ in range(steps):
                inner.step(loss_fn(model(x_s), y_s))
            loss_fn(model(x_q), y_q).backward()
        finally:
            torchopt.recover_state_dict(model, saved)
        return {}
    raise ValueError(f"unknown method {method.key!r}")


def run_meta_method(method: Method, problem: Problem) -> dict[str, Any]:
    """The same meta-gradient with η (``--meta``): Meta-SGD step sizes ``problem.lrs`` and the
    weight decay ``exp(problem.log_wd)·Σ‖φ‖²`` in the inner loss. Fills the ``.grad`` of θ and
    of every η; returns ``meta.info``."""
    model, loss_fn, steps = problem.model, problem.loss, problem.steps
    x_s, y_s, x_q, y_q = problem.task
    lrs, log_wd = problem.lrs, problem.log_wd
    if lrs is None or log_wd is None:
        raise ValueError("a --meta method needs Problem.attach_meta()")
    if method.estimator is not None:
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lrs), estimator=method.estimator) as meta:
            for _ in range(steps):
                meta.step(lambda fmodel: loss_fn(fmodel(x_s), y_s)
                          + log_wd.exp() * sum((p ** 2).sum() for p in fmodel.params.values()))
            loss_fn(meta.fmodel(x_q), y_q).backward()
        return dict(meta.info)
    if method.key == "plain":  # what MetaGradient's Full does with η, written by hand
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = problem.params()
        for _ in range(steps):
            out = torch.func.functional_call(model, dict(zip(names, params)), (x_s,))
            inner = loss_fn(out, y_s) + log_wd.exp() * sum((p ** 2).sum() for p in params)
            grads = torch.autograd.grad(inner, params, create_graph=True)
            params = [p - lrs[n] * g for n, p, g in zip(names, params, grads)]
        loss_fn(torch.func.functional_call(model, dict(zip(names, params)), (x_q,)), y_q).backward()
        return {}
    raise ValueError(f"no --meta variant of method {method.key!r}")


def meta_methods(methods: Sequence[Method]) -> list[Method]:
    """The η twin of every metagrad estimator row and of the plain unroll, in the same order
    (each with its own copy of the estimator, so that no state passes between the twins)."""
    import copy

    return [Method(m.key, m.label, copy.deepcopy(m.estimator), m.order, meta=True) for m in methods
            if m.estimator is not None or m.key in META_BASELINES]


def plain_binomial(problem: Problem, order: int) -> None:
    """Binomial(L) in its level grouping (MATH.md (2)) written directly with torch.func:
    iterates in a list, one ``vmap(vjp∘grad)`` call per level; the meta-gradient is added
    to the parameters' ``.grad``. The yardstick of metagrad's own overhead."""
    model, loss_fn, steps, lr = problem.model, problem.loss, problem.steps, problem.lr
    x_s, y_s, x_q, y_q = problem.task
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    inner = lambda p: loss_fn(torch.func.functional_call(model, p, (x_s,)), y_s)  # noqa: E731
    phi = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    iterates = []
    for _ in range(steps):
        iterates.append(phi)
        grads = torch.func.grad(inner)(phi)
        phi = {n: phi[n] - lr * grads[n] for n in names}
    final = {n: t.requires_grad_() for n, t in phi.items()}
    query = loss_fn(torch.func.functional_call(model, final, (x_q,)), y_q)
    v = dict(zip(names, torch.autograd.grad(query, [final[n] for n in names])))
    stacked = {n: torch.stack([it[n] for it in iterates]) for n in names}

    def term(p: dict[str, torch.Tensor], u: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        _, pullback = torch.func.vjp(torch.func.grad(inner), p)
        return {n: -lr * h for n, h in pullback(u)[0].items()}  # (J_kᵀ − I) u = −α H_k u

    g = dict(v)
    suffix = {n: t.expand(steps, *t.shape) for n, t in v.items()}
    for level in range(1, order + 1):
        rows = steps - level + 1
        terms = torch.func.vmap(term)({n: t[:rows] for n, t in stacked.items()},
                                      {n: t[:rows] for n, t in suffix.items()})
        g = {n: g[n] + terms[n].sum(0) for n in names}
        suffix = {n: t.flip(0).cumsum(0).flip(0)[1:] for n, t in terms.items()}
    for n, p in model.named_parameters():
        if n in g:
            p.grad = g[n].detach() if p.grad is None else p.grad + g[n].detach()


# --------------------------------------------------------------------------- measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clear_grads(problem: Problem) -> None:
    for p in [*problem.model.parameters(), *problem.meta_tensors()]:
        p.grad = None


def flat_grad(problem: Problem) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                      for p in problem.params()]).detach().clone()


def flat_meta_grad(problem: Problem) -> torch.Tensor:
    """The concatenation of every η's ``.grad`` (``log_wd``, then the step sizes; zero where
    an estimator leaves one without a gradient)."""
    return torch.cat([(torch.zeros_like(t) if t.grad is None else t.grad).reshape(-1)
                      for t in problem.meta_tensors()]).detach().clone()


@dataclass
class Result:
    method: Method
    times: list[float] = field(default_factory=list)
    peak_bytes: Optional[int] = None
    memory_method: Optional[str] = None
    grad: Optional[torch.Tensor] = None  # for the error pass
    rel_error: Optional[float] = None
    meta_grad: Optional[torch.Tensor] = None  # the η-gradient, for the error pass of an η row
    meta_rel_error: Optional[float] = None
    #: The same error for log_wd alone and for the step sizes alone: the step sizes' part is
    #: most of the norm, so the concatenation says little about log_wd.
    meta_rel_error_log_wd: Optional[float] = None
    meta_rel_error_step_sizes: Optional[float] = None
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    failure: Optional[str] = None


def guarded(result: Result, problem: Problem, call: Callable[[], Any]) -> Any:
    """Run ``call``, recording warnings and turning an exception into a recorded failure."""
    if result.failure is not None:
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - any failure becomes a row note
            result.failure = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            if os.environ.get("BENCHMARK_TRACEBACK"):
                traceback.print_exc()
            clear_grads(problem)
            if problem.device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        finally:
            for w in caught:
                message = f"{w.category.__name__}: {str(w.message)[:200]}"
                if message not in result.warnings:
                    result.warnings.append(message)


def measure_case(methods: Sequence[Method], problem: Problem, error_problem: Optional[Problem],
                 repeats: int, progress: Any) -> list[Result]:
    """Warm-up, memory, interleaved timings, then the error pass, for every method."""
    results = [Result(m) for m in methods]
    device = problem.device

    def once(result: Result) -> dict[str, Any]:
        clear_grads(problem)
        return run_method(result.method, problem)

    # Warm-up: first-call costs (lazy initialization, vmap tracing caches) are not timed.
    for r in results:
        info = guarded(r, problem, lambda r=r: once(r))
        r.info = info or {}
        synchronize(device)
        progress.update(1)
    # Peak memory: one separate run each, nothing else in the process running.
    for r in results:
        def measured(r: Result = r) -> None:
            clear_grads(problem)
            gc.collect()
            with peak_memory(device) as mem:
                run_method(r.method, problem)
            r.peak_bytes, r.memory_method = mem.peak_bytes, mem.method
        guarded(r, problem, measured)
        progress.update(1)
    # Timings, interleaved: round i starts at method i mod n, so no method always runs first.
    n = len(results)
    for i in range(repeats):
        for j in range(n):
            r = results[(i + j) % n]

            def timed(r: Result = r) -> None:
                clear_grads(problem)
                synchronize(device)
                start = time.perf_counter()
                run_method(r.method, problem)
                synchronize(device)
                r.times.append(time.perf_counter() - start)
            guarded(r, problem, timed)
            progress.update(1)
    # Error pass: one more meta-gradient per method, on the error problem.
    if error_problem is not None:
        for r in results:
            def gradient(r: Result = r) -> None:
                clear_grads(error_problem)
                run_method(r.method, error_problem)
                r.grad = flat_grad(error_problem)
                if r.method.meta:
                    r.meta_grad = flat_meta_grad(error_problem)
            guarded(r, error_problem, gradient)
            progress.update(1)
        # Each row against Full of its own problem: rows with η against Full with η.
        for meta in (False, True):
            full = next((r for r in results if r.method.key == "full" and r.method.meta == meta
                         and r.grad is not None), None)
            if full is None:  # Full skipped (--full-max-K): Checkpointed is exact too
                full = next((r for r in results if r.method.label == "Checkpointed"
                             and r.method.meta == meta and r.grad is not None), None)
            if full is None:
                continue
            reference = full.grad
            norm = torch.linalg.vector_norm(reference)
            for r in results:
                if r.method.meta == meta and r.grad is not None:
                    r.rel_error = float(torch.linalg.vector_norm(r.grad - reference) / norm)
            if meta and full.meta_grad is not None:
                def relative(g: torch.Tensor, ref: torch.Tensor) -> float:
                    return float(torch.linalg.vector_norm(g - ref) / torch.linalg.vector_norm(ref))

                for r in results:
                    if r.method.meta and r.meta_grad is not None:
                        # Element 0 is log_wd, the rest the step sizes (Problem.meta_tensors).
                        r.meta_rel_error = relative(r.meta_grad, full.meta_grad)
                        r.meta_rel_error_log_wd = relative(r.meta_grad[:1], full.meta_grad[:1])
                        r.meta_rel_error_step_sizes = relative(r.meta_grad[1:], full.meta_grad[1:])
        for r in results:
            r.grad = r.meta_grad = None
        clear_grads(error_problem)
    clear_grads(problem)
    return results


def sharpness(problem: Problem, iterations: int = 30) -> Optional[float]:
    """ℓ: the largest |eigenvalue| of the inner Hessian at θ (power iteration, an estimate
    from below). ``K·α·ℓ`` decides whether Binomial's series converges (MATH.md)."""
    params = problem.params()
    x_s, y_s = problem.task[0], problem.task[1]
    try:
        loss = problem.loss(problem.model(x_s), y_s)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        generator = torch.Generator().manual_seed(0)
        vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
        value = 0.0
        for _ in range(iterations):
            norm = torch.sqrt(sum((v * v).sum() for v in vector))
            vector = [v / norm for v in vector]
            vector = list(torch.autograd.grad(grads, params, vector, retain_graph=True))
            value = float(torch.sqrt(sum((v * v).sum() for v in vector)))
        return value
    except Exception:  # noqa: BLE001 - a missing diagnostic, not a failed benchmark
        return None


# ----------------------------------------------------------------------------- reports
def format_bytes(value: Optional[int]) -> str:
    if value is None:
        return "—"
    if value < 2**20:
        return f"{value / 2**10:.0f} KiB"
    if value < 2**30:
        return f"{value / 2**20:.1f} MiB"
    return f"{value / 2**30:.2f} GiB"


def format_ratio(value: Optional[float]) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.2f}×"


def row_notes(result: Result) -> str:
    if result.failure is not None:
        return f"failed: {result.failure[:120]}"
    info, notes = result.info, []
    if "hessian_vector_products" in info and result.method.key != "implicit":
        notes.append(f"{info['hessian_vector_products']} HVPs")
    if "peak_iterate_bytes" in info and result.method.key != "implicit":
        notes.append(f"iterates {format_bytes(info['peak_iterate_bytes'])} at once "
                     f"({info['stored_iterates']} stored, {info['recomputed_steps']} recomputed)")
    if result.method.key == "implicit" and "iterations" in info:
        notes.append(f"CG {info['iterations']} it, residual {info['residual']:.1e}"
                     + ("" if info.get("converged") else ", not converged"))
    if result.warnings:
        notes.append("warned (see JSON)")
    return ", ".join(notes)


def case_rows(results: Sequence[Result]) -> list[dict[str, Any]]:
    """The JSON rows of one case, with ratios to Full's time and memory."""
    full = next((r for r in results if r.method.key == "full"), None)
    full_time = statistics.median(full.times) if full is not None and full.times else None
    full_peak = full.peak_bytes if full is not None else None
    rows = []
    for r in results:
        median = statistics.median(r.times) if r.times else None
        rows.append({
            "method": r.method.label,
            "kind": r.method.key,
            "library": "metagrad" if r.method.estimator is not None else r.method.key,
            "time_ms": None if median is None else 1e3 * median,
            "time_ms_min": None if not r.times else 1e3 * min(r.times),
            "time_ms_max": None if not r.times else 1e3 * max(r.times),
            "times_ms": [1e3 * t for t in r.times],
            "time_ratio": None if median is None or not full_time else median / full_time,
            # Round i of the interleaved timings ran every method once; the median over rounds
            # of (this method's time / Full's time in the same round) cancels slow load drift.
            "time_ratio_paired_median": (
                None if full is None or not r.times or len(r.times) != len(full.times)
                else statistics.median(t / f for t, f in zip(r.times, full.times))),
            "peak_bytes": r.peak_bytes,
            "peak_mib": None if r.peak_bytes is None else r.peak_bytes / 2**20,
            "memory_ratio": (None if r.peak_bytes is None or not full_peak else r.peak_bytes / full_peak),
            "memory_method": r.memory_method,
            # The exact bytes of the iterates and optimizer states held at once (meta.info).
            "iterate_bytes": r.info.get("peak_iterate_bytes"),
            "rel_error": r.rel_error,
            "info": {k: v for k, v in r.info.items()
                     if isinstance(v, (int, float, str, bool, type(None)))
                     or (isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v))},
            "warnings": r.warnings,
            "failure": r.failure,
            "notes": row_notes(r),
        })
    return rows


def meta_case_rows(results: Sequence[Result]) -> list[dict[str, Any]]:
    """The JSON rows of the η runs of one case (``--meta``): :func:`case_rows`' keys with
    ``time_ratio``, ``memory_ratio`` and ``rel_error`` (of θ's gradient) against Full with η,
    plus ``meta_rel_error`` (of η's gradient, against Full's with η; ``meta_rel_error_log_wd``
    and ``meta_rel_error_step_sizes`` for each part alone) and the ratio of the time
    to the same method's time without η: of the medians (``meta_time_ratio``) and the median
    over rounds (``meta_time_ratio_paired_median``; the two ran in every round)."""
    plain = {r.method.label: r for r in results if not r.method.meta}
    with_meta = [r for r in results if r.method.meta]
    rows = case_rows(with_meta)
    for r, row in zip(with_meta, rows):
        twin = plain.get(r.method.label)
        median = statistics.median(r.times) if r.times else None
        twin_median = statistics.median(twin.times) if twin is not None and twin.times else None
        row["meta"] = True
        row["meta_rel_error"] = r.meta_rel_error
        row["meta_rel_error_log_wd"] = r.meta_rel_error_log_wd
        row["meta_rel_error_step_sizes"] = r.meta_rel_error_step_sizes
        row["without_meta_time_ms"] = None if twin_median is None else 1e3 * twin_median
        row["meta_time_ratio"] = None if median is None or not twin_median else median / twin_median
        row["meta_time_ratio_paired_median"] = (
            None if twin is None or not r.times or len(r.times) != len(twin.times)
            else statistics.median(t / u for t, u in zip(r.times, twin.times)))
        found = r.info.get("meta_parameters")
        row["meta_parameters"] = list(found) if isinstance(found, (list, tuple)) else None
    return rows


def meta_markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| method, with η | ms / meta-gradient (min–max) | time / same without η (paired) "
             "| time / Full with η (paired) | peak memory | η rel. error vs Full | log_wd rel. error "
             "| θ rel. error vs Full | notes |",
             "|---|---|---|---|---|---|---|---|---|"]

    def error_cell(error: Optional[float]) -> str:
        return "—" if error is None else ("0" if error == 0 else f"{error:.1e}")

    for row in rows:
        if row["time_ms"] is None:
            time_cell = "—"
        else:
            time_cell = f"{row['time_ms']:.1f} ({row['time_ms_min']:.1f}–{row['time_ms_max']:.1f})"
        own = format_ratio(row["meta_time_ratio"])
        if row["meta_time_ratio_paired_median"] is not None:
            own += f" ({format_ratio(row['meta_time_ratio_paired_median'])})"
        full = format_ratio(row["time_ratio"])
        if row["time_ratio_paired_median"] is not None:
            full += f" ({format_ratio(row['time_ratio_paired_median'])})"
        lines.append(f"| {row['method']} | {time_cell} | {own} | {full} | {format_bytes(row['peak_bytes'])} "
                     f"| {error_cell(row['meta_rel_error'])} | {error_cell(row['meta_rel_error_log_wd'])} "
                     f"| {error_cell(row['rel_error'])} "
                     f"| {row['notes']} |")
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| method | ms / meta-gradient (min–max) | time / Full (paired) | peak memory | memory / Full "
             "| rel. error vs Full | notes |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["time_ms"] is None:
            time_cell = "—"
        else:
            time_cell = f"{row['time_ms']:.1f} ({row['time_ms_min']:.1f}–{row['time_ms_max']:.1f})"
        error = row["rel_error"]
        error_cell = "—" if error is None else ("0" if error == 0 else f"{error:.1e}")
        ratio_cell = format_ratio(row["time_ratio"])
        if row["time_ratio_paired_median"] is not None:
            ratio_cell += f" ({format_ratio(row['time_ratio_paired_median'])})"
        lines.append(f"| {row['method']} | {time_cell} | {ratio_cell} "
                     f"| {format_bytes(row['peak_bytes'])} | {format_ratio(row['memory_ratio'])} "
                     f"| {error_cell} | {row['notes']} |")
    return "\n".join(lines)


def machine_description(device: torch.device) -> dict[str, Any]:
    cpu = cpu_model()
    description = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # glibc's mmap threshold, where fixed: large blocks then go back to the OS on free, so
        # the CPU memory column follows tensor memory instead of the heap's high-water mark.
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "torch": torch.__version__,
        "metagrad": mg.__version__,
        "git": _git_state(),
    }
    from importlib import metadata

    for name in ("higher", "torchopt"):
        try:
            description[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            description[name] = None
    if device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
        description["cuda"] = torch.version.cuda
        description["cudnn"] = torch.backends.cudnn.version()
    return description


# --------------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = make_parser(
        prog="python -m benchmarks.estimators",
        description="Time, peak memory and error against Full of every metagrad estimator and of "
                    "the full unrolls of higher, torchopt and a plain autograd loop, on one "
                    "few-shot problem, side by side in one process. Prints markdown tables and "
                    "writes JSON.",
    )
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sinusoid",
                        help="the problem: " + "; ".join(f"{c.name}: {c.description}" for c in CONFIGS.values()))
    parser.add_argument("--K", type=int, nargs="+", default=[5, 20, 50], help="numbers of inner SGD steps")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda sets TF32 off, cudnn.deterministic on and cudnn.benchmark off for "
                             "the whole run (and prints so)")
    add_dtype_argument(parser, "dtype of the timed and memory runs")
    parser.add_argument("--error-dtype", choices=("float32", "float64"), default=None,
                        help="dtype of the error pass (default: float64 on cpu, the timing dtype on "
                             "cuda); on cpu the error pass is a separate run per method")
    parser.add_argument("--errors", choices=("on", "off"), default="on", help="compute the error column")
    parser.add_argument("--timing", choices=("on", "off"), default="on",
                        help="time the methods; off measures memory (and errors) only, e.g. in a "
                             "process started with MALLOC_MMAP_THRESHOLD_=131072, where the CPU "
                             "memory column follows tensor memory closely but every run is slower")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per method after one warm-up run; the table shows their median")
    parser.add_argument("--estimators", nargs="+", choices=ESTIMATORS, default=list(ESTIMATORS),
                        metavar="NAME", help=f"metagrad estimators, any of {' '.join(ESTIMATORS)}; "
                                             "full is always run (it is the reference)")
    parser.add_argument("--order", type=int, nargs="+", default=None,
                        help="L for Binomial(L) and Truncated(L) (one row per value); default 3 for "
                             "K < 50 and 4 for K >= 50 (the sizes of the speed targets), at most K")
    parser.add_argument("--block", type=int, nargs="*", default=[5],
                        help="also run the blocked Binomial(L, block=S) for each S given (where L < S < K)")
    parser.add_argument("--snapshots", type=count_argument("sqrt"), nargs="*", default=[], metavar="S",
                        help="also run Checkpointed(snapshots=S) for each S (an integer or 'sqrt'), and "
                             "Binomial(L, block=B, snapshots=True) beside each --block row")
    parser.add_argument("--full-max-K", type=int, default=None, metavar="K",
                        help="skip Full for K above this (its unrolled graph grows with K); Checkpointed "
                             "is then the error column's reference")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="write a log-log plot of memory against K (exact iterate bytes and peak "
                             "memory, per method) here")
    parser.add_argument("--chunk-size", type=int, nargs="*", default=[],
                        help="also run Binomial(L, chunk_size=C) for each C given")
    parser.add_argument("--max-memory", nargs="*", default=[], metavar="BUDGET",
                        help="also run Binomial(L, max_memory=BUDGET) for each budget (e.g. 2GiB), "
                             "where this metagrad's Binomial has a max_memory argument; otherwise "
                             "a note says the rows were skipped")
    parser.add_argument("--whole-levels", choices=("on", "off"), default="on",
                        help="run Binomial(L) with whole levels in one call; off where they do not fit "
                             "in memory (84×84, K = 50 needs tens of GiB), leaving its --chunk-size, "
                             "--max-memory and --block rows")
    parser.add_argument("--tight", choices=("on", "off"), default="on",
                        help="also run Binomial(L, monitor=False), the tight grouping with the fewest "
                             "products, where this metagrad's Binomial has the monitor argument")
    parser.add_argument("--reg", type=float, default=None,
                        help="λ of Implicit(reg=λ); default 1/(K·α), at which Implicit's first-order "
                             "term (I − H/λ) matches the unroll's (I − KαH)")
    parser.add_argument("--lr", type=float, default=0.001, help="α, the inner SGD step size")
    parser.add_argument("--baselines", choices=("on", "off"), default="on",
                        help="also run the full unrolls of a plain autograd loop, higher and torchopt")
    parser.add_argument("--meta", choices=("on", "off"), default="off",
                        help="also run every metagrad estimator row and the plain unroll with "
                             "meta-parameters η: per-parameter learned step sizes (Meta-SGD) and a "
                             "weight-decay strength exp(log_wd) captured by the inner loss; a second "
                             "table per K gives each η row's time, its ratio to the same row without η "
                             "(timed in the same rounds) and the error of its η-gradient against Full's")
    parser.add_argument("--filters", type=int, default=None, help="CNN4 filters; None means 32, MATH.md's shapes (64 is MAML's Omniglot net)")
    add_threads_argument(parser, "torch CPU threads (torch.set_num_threads), on cpu and cuda alike; 1, as in "
                                 "every table of the README: the per-task ops are small, so thread fan-out costs "
                                 "more than it saves, and on a shared machine more threads mostly wait on each other")
    add_seed_argument(parser, "seed of the init and the task")
    add_json_argument(parser, "write the results as JSON here")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="also write the tables here")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="print the markdown tables of an earlier run's JSON and exit")
    args = parser.parse_args(argv)
    if any(k < 1 for k in args.K):
        parser.error("--K: every value must be >= 1")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.order is not None and any(o < 1 for o in args.order):
        parser.error("--order: every value must be >= 1")
    if any(c < 1 for c in args.chunk_size):
        parser.error("--chunk-size: every value must be >= 1")
    if args.lr < 0:
        parser.error("--lr must be >= 0")
    args.estimators = [e for e in ESTIMATORS if e in args.estimators or e == "full"]
    return args


def plot_memory(cases: Sequence[dict[str, Any]], path: str, description: str) -> None:
    """Memory against K, log-log: each method's exact iterate bytes (solid) and peak memory
    (dashed), from the cases' rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(row["method"] for case in cases for row in case["rows"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for index, label in enumerate(labels):
        color = f"C{index % 10}"
        for ax, key in zip(axes, ("iterate_bytes", "peak_bytes")):
            points = [(case["K"], row[key]) for case in cases for row in case["rows"]
                      if row["method"] == label and row.get(key)]
            if points:
                ks, values = zip(*points)
                ax.plot(ks, [v / 2**20 for v in values], "o-", color=color, label=label)
    axes[0].set_title("iterates held at once (exact, meta.info)", fontsize=10)
    axes[1].set_title("peak memory of one meta-gradient", fontsize=10)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted({case["K"] for case in cases}), [str(case["K"]) for case in
                                                              sorted(cases, key=lambda c: c["K"])])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("K, inner steps")
        ax.set_ylabel("MiB")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(description, fontsize=8, wrap=True)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def setup_device(name: str) -> tuple[torch.device, list[str]]:
    if name == "cpu":
        return torch.device("cpu"), []
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to this torch build.")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    flags = ["torch.backends.cuda.matmul.allow_tf32 = False", "torch.backends.cudnn.allow_tf32 = False",
             "torch.backends.cudnn.deterministic = True", "torch.backends.cudnn.benchmark = False"]
    print("This benchmark set, for the whole run: " + ", ".join(flags) + ".")
    return torch.device("cuda"), flags


def build_problem(config: Config, steps: int, lr: float, seed: int, device: torch.device,
                  dtype: torch.dtype, meta: bool = False) -> Problem:
    """The problem; with ``meta``, also its meta-parameters η (:meth:`Problem.attach_meta`)."""
    torch.manual_seed(seed)
    model = make_model(config)
    task = make_task(config, torch.Generator().manual_seed(seed + 1))
    model = model.to(device=device, dtype=dtype)
    task = tuple(t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in task)
    problem = Problem(model, task, loss_function(config), steps, lr, device)
    if meta:
        problem.attach_meta()
    return problem


def render(path: str) -> dict[str, Any]:
    """Print the tables of a JSON file this script wrote."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    machine = data["machine"]
    where = (machine.get("gpu") or f"CPU: {machine['cpu']}, {machine['cpu_count']} cores, "
             f"torch threads: {machine['torch_threads']}")
    for case in data["cases"]:
        kal = case.get("k_alpha_ell")
        title = case.get("title") or (f"{case['config']}, K = {case['K']}, α = {case['lr']}"
                                      + ("" if kal is None else f", K·α·ℓ at θ ≈ {kal:.2g}")
                                      + f" ({where}, torch {machine['torch']}, {data['date']})")
        print(f"#### {title}\n\n{markdown_table(case['rows'])}\n")
        if case.get("meta_rows"):
            print(f"#### {title}, with η\n\n{meta_markdown_table(case['meta_rows'])}\n")
    return data


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        return render(args.render)
    set_threads(args.threads, say=False)
    device, flags = setup_device(args.device)
    config = CONFIGS[args.config]
    if args.filters is not None:
        config = Config(**{**config.__dict__, "filters": args.filters})
    dtype = getattr(torch, args.dtype)
    error_dtype_name = args.error_dtype or ("float64" if device.type == "cpu" else args.dtype)
    error_device = torch.device("cpu") if device.type == "cpu" else device
    error_dtype = getattr(torch, error_dtype_name)
    baselines, baseline_notes = baseline_methods(args.baselines == "on")
    if args.max_memory and not _accepts(mg.Binomial, "max_memory"):
        baseline_notes.append(f"--max-memory {' '.join(args.max_memory)}: this metagrad's Binomial "
                              "has no max_memory argument; those rows are skipped.")
    machine = machine_description(device)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    where = (f"{machine['gpu']} (CUDA {machine['cuda']}, TF32 off, cuDNN deterministic), "
             f"torch CPU threads: {machine['torch_threads']}"
             if device.type == "cuda" else
             f"CPU: {machine['cpu']}, {machine['cpu_count']} cores, torch threads: {machine['torch_threads']}")
    header = [
        f"metagrad estimator benchmark: {config.name} ({config.description}"
        + (f", {config.filters} filters" if config.kind == "cnn" else "") + ")",
        f"Device: {where}; {platform.platform()}",
        f"torch {machine['torch']}, higher {machine['higher']}, torchopt {machine['torchopt']}, "
        f"metagrad {mg.__version__}; {date}",
        f"Inner loop: SGD, α = {args.lr}; timing dtype {args.dtype}; median of {args.repeats} timed "
        f"runs after one warm-up, all methods interleaved in one process; "
        + (f"error pass in {error_dtype_name} on {error_device.type}." if args.errors == "on"
           else "no error pass (--errors off)."),
    ]
    meta = args.meta == "on"
    if meta:
        header.append(META_NOTE)
    if device.type == "cpu":
        header.append(NOISE_NOTE_CPU)
    header += baseline_notes
    print("\n".join(header), flush=True)

    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is optional
        tqdm = None

    plans = []
    for steps in args.K:
        orders = args.order or [3 if steps < 50 else 4]
        orders = sorted({min(o, steps) for o in orders})
        methods = estimator_methods(args.estimators, steps, orders, args.chunk_size, args.reg, args.lr,
                                    tight=args.tight == "on", max_memory=args.max_memory,
                                    blocks=args.block, whole_levels=args.whole_levels == "on",
                                    snapshots=args.snapshots,
                                    full=args.full_max_K is None or steps <= args.full_max_K)
        hand_written = [Method("plain_binomial", f"hand-written torch.func Binomial({order})", order=order)
                        for order in orders
                        if baselines and "binomial" in args.estimators and args.whole_levels == "on"]
        twins = meta_methods(methods + baselines) if meta else []
        plans.append((steps, methods + baselines + hand_written + twins))
    repeats = args.repeats if args.timing == "on" else 0
    runs_per_method = 2 + repeats + (1 if args.errors == "on" else 0)
    total = sum(len(m) for _, m in plans) * runs_per_method
    progress = (tqdm(total=total, desc=f"{config.name}", unit="run", file=sys.stderr)
                if tqdm is not None and not args.no_progress else _NoProgress())

    cases, tables = [], []
    memory_description = None
    for steps, methods in plans:
        progress.set_description(f"{config.name} K={steps}")
        problem = build_problem(config, steps, args.lr, args.seed, device, dtype, meta=meta)
        error_problem = None
        if args.errors == "on":
            if error_device == device and error_dtype == dtype:
                error_problem = problem
            else:
                error_problem = build_problem(config, steps, args.lr, args.seed, error_device, error_dtype,
                                              meta=meta)
        ell = sharpness(error_problem or problem)
        started = time.perf_counter()
        results = measure_case(methods, problem, error_problem, repeats, progress)
        rows = case_rows([r for r in results if not r.method.meta])
        meta_rows = meta_case_rows(results) if meta else None
        memory_method = next((r.memory_method for r in results if r.memory_method), None)
        if memory_method is not None:
            memory_description = peak_memory(device).description if memory_description is None else memory_description
        kal = None if ell is None else steps * args.lr * ell
        title = (f"{config.name}, K = {steps}, α = {args.lr}"
                 + ("" if kal is None else f", K·α·ℓ at θ ≈ {kal:.2g}")
                 + f" ({where}, torch {machine['torch']}, {date})")
        table = f"#### {title}\n\n{markdown_table(rows)}\n"
        if meta_rows is not None:
            table += f"\n#### {title}, with η\n\n{meta_markdown_table(meta_rows)}\n"
        tables.append(table)
        if hasattr(progress, "write"):
            progress.write("\n" + table)
        else:
            print("\n" + table, flush=True)
        cases.append({"config": config.name, "K": steps, "lr": args.lr, "title": title, "ell_at_theta": ell,
                      "k_alpha_ell": kal, "seconds": time.perf_counter() - started, "rows": rows,
                      **({"meta_rows": meta_rows} if meta_rows is not None else {})})
        del problem, error_problem
        gc.collect()
    progress.close()

    footer = [
        "Columns: time is the wall time of one meta-gradient (inner loop, query loss, backward), "
        f"median of {args.repeats} after a warm-up; time / Full is the ratio of the medians, and in "
        "parentheses the median over rounds of the ratio to Full's time in the same round (the "
        "rounds interleave all methods, so this cancels slow changes in load); peak memory: "
        + (memory_description or "not measured") + ".",
        "Relative error: ‖g − g_Full‖/‖g_Full‖ against metagrad's Full on the same task, in "
        f"{error_dtype_name}" + ("" if args.full_max_K is None else
                                 f" (against Checkpointed where Full was skipped, K > {args.full_max_K})")
        + ". Implicit solves a different (proximal) inner problem, so its error "
        "column measures how far iMAML's gradient is from MAML's, not rounding.",
    ]
    if meta:
        footer.append(
            "With η: the same rows on the same task with η (" + META_NOTE.split("(--meta on): ", 1)[1]
            .rstrip(".") + "), timed in the same interleaved rounds as the rows without η. time / same "
            "without η: the ratio of the medians, in parentheses the median over rounds of the ratio "
            "in the same round. time / Full with η, θ rel. error: against Full with η. η rel. error: "
            "‖g_η − g_η,Full‖/‖g_η,Full‖ over the concatenation of every η's .grad (log_wd, then the "
            "step sizes; zero where an estimator gives one none), in " + error_dtype_name + "; the "
            "step sizes' part is most of its norm, so log_wd rel. error gives log_wd's alone. "
            "Binomial with η always uses the level grouping (monitor=False included: η needs the "
            "adjoint at every step); it keeps its vmapped levels for these η (captured, step sizes) "
            "where this metagrad does so. Implicit gives no step-size "
            "gradient (a warning says so); FirstOrder gives log_wd none through the inner loop.")
    print("\n".join(footer))
    result = {
        "config": config.name,
        "description": config.description,
        "config_fields": dict(config.__dict__),
        "device": str(device),
        "machine": machine,
        "date": date,
        "flags_set": flags,
        "dtype": args.dtype,
        "error_dtype": error_dtype_name if args.errors == "on" else None,
        "repeats": args.repeats,
        "lr": args.lr,
        "memory_measure": memory_description,
        "noise_note": NOISE_NOTE_CPU if device.type == "cpu" else None,
        "argv": list(sys.argv[1:] if argv is None else argv),
        **({"meta": {"description": META_NOTE, "weight_decay": WEIGHT_DECAY, "step_size": args.lr}}
           if meta else {}),
        "cases": cases,
    }
    if args.plot:
        plot_memory(cases, args.plot, f"{config.name} ({config.description})\n{where}, torch {machine['torch']}, "
                    f"{args.dtype}; Full, Checkpointed and Binomial(block) hold the same K iterates")
    if args.json:
        write_json(args.json, result)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write("\n".join(header) + "\n\n" + "\n".join(tables) + "\n" + "\n".join(footer) + "\n")
    return result


def _git_state() -> Optional[dict[str, Any]]:
    """The commit the benchmark ran at, and whether metagrad/ had uncommitted changes."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "metagrad", "adapters"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "metagrad_uncommitted_changes": bool(dirty)}


class _NoProgress:
    def update(self, n: float) -> None:
        pass

    def set_description(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


if __name__ == "__main__":
    main()
