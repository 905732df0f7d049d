"""Eager metagrad against ``mg.functional.meta_grad`` under vmap and torch.compile, torch.func and JAX.

One meta-iteration of MAML (benchmarks.estimators' ``sinusoid`` config, a 1-40-40-1 ReLU MLP
with 10-shot support and 10 query points; or, with ``--config omniglot``, CNN4 on 28×28 5-way
1-shot), a meta-batch of 4 tasks, K inner SGD steps of α = 0.01, float32: the meta-gradient of
the meta-batch (the mean over its tasks of ∇_θ L_query(φ_K(θ))), no outer step. Side by side in one process, one torch thread
by default, each row timed ``--repeats`` times after a warm-up, the rows interleaved round by
round so that a change of load hits all of them alike:

- eager metagrad, the context manager ``mg.MetaGradient`` over the tasks with Full (the
  reference every ratio and error is taken against), Checkpointed, Truncated(2), FirstOrder,
  Binomial(3) and Implicit; and the same estimators with ``compile=True`` (Full's runs its
  exact compiled path, ``Full.under_compile``). The loop is written as users write it: a new
  loss module per task (``nn.MSELoss()``), a new mini-batch tensor per step (the support
  set's rows in a new order: the same loss) and a new lambda per step;
- the context manager over the whole meta-batch in one block (``tasks=4``), Full and
  Checkpointed, eager and with ``compile=True``, on the same mini-batches;
- the plain eager unroll: a hand-written autograd loop with ``create_graph=True`` over the same
  mini-batches;
- ``mg.functional.meta_grad`` under ``torch.func.vmap`` over the meta-batch, eager and under
  ``torch.compile`` (inductor), with Full and Checkpointed; and with ``tasks=4`` (the meta-batch
  in one call), eager and with ``compile=True`` (compiled pieces, the loops over steps in
  Python: its compile time does not grow with K);
- hand-written torch.func: ``torch.func.grad`` of the unrolled loss, vmapped over the tasks,
  eager and under ``torch.compile``;
- a loop form that does not unroll: Checkpointed's sweep with ``torch._higher_order_ops.scan``,
  compiled, one call per task (:func:`scan_checkpointed`);
- JAX: ``jit`` of ``vmap`` over the tasks of ``grad`` of a ``lax.scan`` over the inner steps,
  on the CPU in float32, when ``jax`` is importable (``pip install jax``; not a dependency of
  metagrad), for the sinusoid only.

``--rows`` runs a subset (by the keys the JSON names).

A compiled row's first call (tracing and compiling, then one run) is reported in its own
column. ``--cold`` points ``TORCHINDUCTOR_CACHE_DIR`` at a fresh temporary directory first, so
that inductor starts from an empty on-disk cache; otherwise the cache is whatever the default
location holds, and the output says how many entries it had at the start.

Run::

    python -m benchmarks.compiled                 # K = 5 and 20, with compile and JAX
    python -m benchmarks.compiled --cold --json out.json
    python -m benchmarks.compiled --quick         # K = 2, no compile: a fast smoke run
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file, python benchmarks/compiled.py: import the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metagrad as mg  # noqa: E402
from benchmarks.estimators import CONFIGS, build_problem, machine_description  # noqa: E402
from examples.cli import (add_json_argument, add_seed_argument, add_threads_argument, make_parser,  # noqa: E402
                          set_threads, write_json)

META_BATCH = 4
LR = 0.01


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((pred - target) ** 2).mean()


@dataclass
class Batch:
    """The model θ and a meta-batch of tasks, stacked along a first dimension."""

    model: torch.nn.Module
    tasks: list[tuple[torch.Tensor, ...]]
    steps: int
    config: str = "sinusoid"
    #: The inner and outer loss: MSE for the sinusoid, cross-entropy for the CNN configs.
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = field(default=None)  # type: ignore[assignment]
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.names = [n for n, _ in self.model.named_parameters()]
        if self.loss is None:
            self.loss = mse if self.config == "sinusoid" else torch.nn.functional.cross_entropy
        self.stacked = tuple(torch.stack([t[i] for t in self.tasks]) for i in range(4))
        # The order of the support set's rows at each inner step of each task: every step's
        # mini-batch is a new tensor of the same shape (and, the whole support set, the same loss).
        generator = torch.Generator().manual_seed(len(self.tasks) * 1000 + self.steps)
        self.orders = [[torch.randperm(t[0].shape[0], generator=generator) for _ in range(self.steps)]
                       for t in self.tasks]

    def criterion(self) -> torch.nn.Module:
        """A new loss module, as a user's loop makes one per task."""
        return torch.nn.MSELoss() if self.config == "sinusoid" else torch.nn.CrossEntropyLoss()

    def params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters()}

    @property
    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device


def make_batch(steps: int, seed: int, config: str = "sinusoid", device: torch.device = torch.device("cpu")) -> Batch:
    """θ from ``build_problem``'s seed ``seed``, and the tasks of seeds seed … seed+3, of
    ``benchmarks.estimators.CONFIGS[config]``, on ``device``."""
    problems = [build_problem(CONFIGS[config], steps, LR, seed + i, device, torch.float32) for i in range(META_BATCH)]
    return Batch(problems[0].model, [p.task for p in problems], steps, config)


def flatten(grads: dict[str, Any], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([torch.as_tensor(grads[n]).reshape(-1).to(torch.float32) for n in names])


# ------------------------------------------------------------------------------- rows
def eager_metagradient(batch: Batch, estimator: mg.Estimator, compile: bool = False) -> Callable[[], torch.Tensor]:
    """The context manager over the tasks, the loop as users write it: a new loss module per
    task, a new mini-batch tensor per step (the support set's rows in a new order) and a new
    lambda per step; the mean of the tasks' meta-gradients (``compile=True``: its compiled
    steps and products, :mod:`metagrad.compiled`)."""
    model, params = batch.model, list(batch.model.parameters())

    def run() -> torch.Tensor:
        for p in params:
            p.grad = None
        for (x_s, y_s, x_q, y_q), orders in zip(batch.tasks, batch.orders):
            criterion = batch.criterion()
            with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR), estimator=estimator,
                                 compile=compile) as meta:
                for order in orders:
                    x_b, y_b = x_s[order], y_s[order]
                    meta.step(lambda f: criterion(f(x_b), y_b))
                (criterion(meta.fmodel(x_q), y_q) / len(batch.tasks)).backward()
        return torch.cat([p.grad.reshape(-1) for p in params])

    return run


def tasks_metagradient(batch: Batch, estimator: mg.Estimator, compile: Any = False) -> Callable[[], torch.Tensor]:
    """The context manager over the whole meta-batch in one block (``tasks=4``): the same
    mini-batches as :func:`eager_metagradient`'s, stacked over tasks, a new loss module per
    meta-batch and a new lambda per step; the query loss the mean over tasks."""
    model, params = batch.model, list(batch.model.parameters())
    x_s, y_s, x_q, y_q = batch.stacked
    orders = [torch.stack(step) for step in zip(*batch.orders)]  # [tasks, shots] per step

    def run() -> torch.Tensor:
        for p in params:
            p.grad = None
        criterion = batch.criterion()
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR), estimator=estimator, compile=compile,
                             tasks=len(batch.tasks)) as meta:
            for order in orders:
                rows = torch.arange(len(batch.tasks)).unsqueeze(1)
                meta.step(lambda f, x, y: criterion(f(x), y), x_s[rows, order], y_s[rows, order])
            out = meta.fmodel(x_q)
            criterion(out.flatten(0, 1), y_q.flatten(0, 1)).backward()
        return torch.cat([p.grad.reshape(-1) for p in params])

    return run


def plain_unroll(batch: Batch) -> Callable[[], torch.Tensor]:
    """A hand-written autograd loop, ``create_graph=True``, task by task."""
    model, names, mse = batch.model, batch.names, batch.loss
    theta = list(model.parameters())

    def run() -> torch.Tensor:
        for p in theta:
            p.grad = None
        for (x_s, y_s, x_q, y_q), orders in zip(batch.tasks, batch.orders):
            params = theta
            for order in orders:  # the mini-batches of eager_metagradient's loop
                out = torch.func.functional_call(model, dict(zip(names, params)), (x_s[order],))
                grads = torch.autograd.grad(mse(out, y_s[order]), params, create_graph=True)
                params = [p - LR * g for p, g in zip(params, grads)]
            out = torch.func.functional_call(model, dict(zip(names, params)), (x_q,))
            (mse(out, y_q) / len(batch.tasks)).backward()
        return torch.cat([p.grad.reshape(-1) for p in theta])

    return run


def functional_meta_grad(batch: Batch, estimator: mg.Estimator) -> Callable[..., dict[str, torch.Tensor]]:
    """``vmap`` over the tasks of ``mg.functional.meta_grad``; the mean over the tasks."""
    model, mse = batch.model, batch.loss

    def loss_fn(p: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return mse(torch.func.functional_call(model, p, (data[0],)), data[1])

    step = functools.partial(mg.functional.meta_grad, loss_fn, inner_opt=mg.optim.SGD(lr=LR),
                             steps=batch.steps, estimator=estimator)
    batched = torch.func.vmap(step, in_dims=(None, 0, 0))

    def meta_batch(params: dict[str, torch.Tensor], x_s: torch.Tensor, y_s: torch.Tensor,
                   x_q: torch.Tensor, y_q: torch.Tensor) -> dict[str, torch.Tensor]:
        grads = batched(params, (x_s, y_s), (x_q, y_q))
        return {n: g.mean(0) for n, g in grads.items()}

    return meta_batch


def functional_tasks(batch: Batch, estimator: mg.Estimator, compile: Any = False) -> Callable[..., dict[str, torch.Tensor]]:
    """``mg.functional.meta_grad(..., tasks=4)``: the meta-batch in one call, the mean over the
    tasks (``compile``: its compiled pieces, the loops over steps in Python; call it uncompiled)."""
    model, mse = batch.model, batch.loss

    def loss_fn(p: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return mse(torch.func.functional_call(model, p, (data[0],)), data[1])

    def meta_batch(params: dict[str, torch.Tensor], x_s: torch.Tensor, y_s: torch.Tensor,
                   x_q: torch.Tensor, y_q: torch.Tensor) -> dict[str, torch.Tensor]:
        return mg.functional.meta_grad(loss_fn, params, (x_s, y_s), (x_q, y_q), inner_opt=mg.optim.SGD(lr=LR),
                                       steps=batch.steps, estimator=estimator, tasks=len(batch.tasks),
                                       compile=compile)

    return meta_batch


def hand_torch_func(batch: Batch) -> Callable[..., dict[str, torch.Tensor]]:
    """``torch.func.grad`` of the unrolled query loss, vmapped over the tasks, by hand."""
    model, steps, mse = batch.model, batch.steps, batch.loss

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mse(torch.func.functional_call(model, p, (x,)), y)

    inner_grad = torch.func.grad(loss)

    def task_loss(p: dict[str, torch.Tensor], x_s: torch.Tensor, y_s: torch.Tensor,
                  x_q: torch.Tensor, y_q: torch.Tensor) -> torch.Tensor:
        phi = p
        for _ in range(steps):
            g = inner_grad(phi, x_s, y_s)
            phi = {n: phi[n] - LR * g[n] for n in phi}
        return loss(phi, x_q, y_q)

    batched = torch.func.vmap(torch.func.grad(task_loss), in_dims=(None, 0, 0, 0, 0))

    def meta_batch(params: dict[str, torch.Tensor], x_s: torch.Tensor, y_s: torch.Tensor,
                   x_q: torch.Tensor, y_q: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: g.mean(0) for n, g in batched(params, x_s, y_s, x_q, y_q).items()}

    return meta_batch


def scan_checkpointed(batch: Batch) -> Callable[..., dict[str, torch.Tensor]]:
    """A loop form that does not unroll: Checkpointed's sweep written with
    ``torch._higher_order_ops.scan``, one compiled call per task.

    A forward ``scan`` of the inner SGD steps stores the iterates each step starts from, and a
    backward ``scan`` over them in reverse pulls ``u`` back with ``torch.func.vjp`` of the step.
    The program is one loop body whatever K, so it compiles once. In torch 2.13 it cannot be put
    under ``torch.func.vmap`` over the tasks (an internal functorch assertion fails, eager and
    compiled), nor differentiated by autograd (Full's form), hence the Python loop over the tasks.
    """
    from torch._higher_order_ops.scan import scan

    model, steps, mse = batch.model, batch.steps, batch.loss

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mse(torch.func.functional_call(model, p, (x,)), y)

    def task(p: dict[str, torch.Tensor], x_s: torch.Tensor, y_s: torch.Tensor,
             x_q: torch.Tensor, y_q: torch.Tensor) -> dict[str, torch.Tensor]:
        def step(q: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            g = torch.func.grad(loss)(q, x_s, y_s)
            return {n: q[n] - LR * g[n] for n in q}

        def forward(phi: dict[str, torch.Tensor], _: torch.Tensor) -> tuple[dict[str, torch.Tensor], ...]:
            return step(phi), {n: t.clone() for n, t in phi.items()}  # the iterate the step starts from

        final, iterates = scan(forward, p, torch.zeros(steps))
        v = torch.func.grad(loss)(final, x_q, y_q)

        def backward(u: dict[str, torch.Tensor], phi: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            _, pull = torch.func.vjp(step, phi)
            return pull(u)[0], torch.zeros(())

        g, _ = scan(backward, v, {n: t.flip(0) for n, t in iterates.items()})
        return g

    compiled = torch.compile(task, fullgraph=True)

    def meta_batch(params: dict[str, torch.Tensor], x_s: torch.Tensor, y_s: torch.Tensor,
                   x_q: torch.Tensor, y_q: torch.Tensor) -> dict[str, torch.Tensor]:
        grads = [compiled(params, x_s[i], y_s[i], x_q[i], y_q[i]) for i in range(x_s.shape[0])]
        return {n: torch.stack([g[n] for g in grads]).mean(0) for n in params}

    return meta_batch


def pure_call(batch: Batch, fn: Callable[..., dict[str, torch.Tensor]]) -> Callable[[], torch.Tensor]:
    params, names, data = batch.params(), batch.names, batch.stacked

    def run() -> torch.Tensor:
        return flatten(fn(params, *data), names)

    return run


def setup_jax(threads: int) -> Any:
    """Import JAX on the CPU in float32 with ``threads`` XLA threads; ``None`` if not installed."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "jax" not in sys.modules and "XLA_FLAGS" not in os.environ and threads == 1:
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    try:
        import jax
    except ImportError:
        return None
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_x64", False)
    return jax


def jax_row(batch: Batch, jax: Any) -> Callable[[], torch.Tensor]:
    """``jit(vmap(grad(query loss ∘ lax.scan of K inner steps)))``, the mean over the tasks."""
    import jax.numpy as jnp
    import numpy as np

    names = batch.names
    params = {n: jnp.asarray(p.numpy(), dtype=jnp.float32) for n, p in batch.params().items()}
    data = tuple(jnp.asarray(t.numpy(), dtype=jnp.float32) for t in batch.stacked)
    steps = batch.steps

    def forward(p: dict[str, Any], x: Any) -> Any:
        h = jax.nn.relu(x @ p["0.weight"].T + p["0.bias"])
        h = jax.nn.relu(h @ p["2.weight"].T + p["2.bias"])
        return h @ p["4.weight"].T + p["4.bias"]

    def loss(p: dict[str, Any], x: Any, y: Any) -> Any:
        return jnp.mean((forward(p, x) - y) ** 2)

    def task_loss(p: dict[str, Any], x_s: Any, y_s: Any, x_q: Any, y_q: Any) -> Any:
        def body(phi: dict[str, Any], _: Any) -> tuple[dict[str, Any], None]:
            g = jax.grad(loss)(phi, x_s, y_s)
            return jax.tree_util.tree_map(lambda a, b: a - LR * b, phi, g), None

        phi, _ = jax.lax.scan(body, p, None, length=steps)
        return loss(phi, x_q, y_q)

    @jax.jit
    def meta_batch(p: dict[str, Any], x_s: Any, y_s: Any, x_q: Any, y_q: Any) -> dict[str, Any]:
        grads = jax.vmap(jax.grad(task_loss), in_axes=(None, 0, 0, 0, 0))(p, x_s, y_s, x_q, y_q)
        return jax.tree_util.tree_map(lambda g: g.mean(0), grads)

    def run() -> torch.Tensor:
        out = jax.block_until_ready(meta_batch(params, *data))
        return torch.cat([torch.from_numpy(np.array(out[n])).reshape(-1) for n in names])

    return run


def compiled_estimators(steps: int) -> list[tuple[str, mg.Estimator]]:
    """The estimators timed with ``compile=True``: each one the context manager offers."""
    return [("full", mg.Full()), ("checkpointed", mg.Checkpointed()), ("truncated", mg.Truncated(steps=min(2, steps))),
            ("first_order", mg.FirstOrder()), ("binomial3", mg.Binomial(order=min(3, steps))),
            ("implicit", mg.Implicit(reg=100.0))]


# ------------------------------------------------------------------------------- timing
@dataclass
class Row:
    key: str
    label: str
    run: Optional[Callable[[], torch.Tensor]] = None
    compiled: bool = False
    library: str = "metagrad"
    first_call_s: Optional[float] = None
    times_ms: list[float] = field(default_factory=list)
    grad: Optional[torch.Tensor] = None
    failure: Optional[str] = None
    note: str = ""


def build_rows(batch: Batch, compile_rows: bool, jax: Any, jax_note: str) -> list[Row]:
    rows = [
        Row("eager_full", "eager metagrad Full (context manager)", eager_metagradient(batch, mg.Full())),
        Row("eager_checkpointed", "eager metagrad Checkpointed (context manager)",
            eager_metagradient(batch, mg.Checkpointed())),
        *[Row(f"eager_{name}", f"eager metagrad {estimator!r} (context manager)",
              eager_metagradient(batch, estimator))
          for name, estimator in compiled_estimators(batch.steps) if name not in ("full", "checkpointed")],
        Row("eager_tasks_full", "eager metagrad Full, tasks=4 (one block for the meta-batch)",
            tasks_metagradient(batch, mg.Full())),
        Row("eager_tasks_checkpointed", "eager metagrad Checkpointed, tasks=4",
            tasks_metagradient(batch, mg.Checkpointed())),
        Row("plain", "plain eager unroll (autograd, create_graph=True)", plain_unroll(batch), library="torch"),
        Row("functional_full", "mg.functional.meta_grad Full, vmap, eager",
            pure_call(batch, functional_meta_grad(batch, mg.Full()))),
        Row("functional_checkpointed", "mg.functional.meta_grad Checkpointed, vmap, eager",
            pure_call(batch, functional_meta_grad(batch, mg.Checkpointed()))),
        Row("functional_tasks", "mg.functional.meta_grad Checkpointed, tasks=4, eager",
            pure_call(batch, functional_tasks(batch, mg.Checkpointed()))),
        Row("torch_func", "hand-written torch.func (grad of unroll, vmap), eager",
            pure_call(batch, hand_torch_func(batch)), library="torch"),
    ]
    if compile_rows:
        rows += [
            Row(f"compiled_{name}", f"metagrad {estimator!r}, compile=True (context manager)",
                eager_metagradient(batch, estimator, compile=True), compiled=True)
            for name, estimator in compiled_estimators(batch.steps)
        ]
        rows += [
            Row("compiled_tasks_full", "metagrad Full, tasks=4, compile=True",
                tasks_metagradient(batch, mg.Full(), compile=True), compiled=True),
            Row("compiled_tasks_checkpointed", "metagrad Checkpointed, tasks=4, compile=True",
                tasks_metagradient(batch, mg.Checkpointed(), compile=True), compiled=True),
            Row("compiled_tasks_binomial3", f"metagrad Binomial(order={min(3, batch.steps)}), tasks=4, compile=True",
                tasks_metagradient(batch, mg.Binomial(order=min(3, batch.steps)), compile=True), compiled=True),
        ]
        rows += [
            Row("functional_full_compiled", "mg.functional.meta_grad Full, vmap, torch.compile",
                pure_call(batch, torch.compile(functional_meta_grad(batch, mg.Full()))), compiled=True),
            Row("functional_checkpointed_compiled", "mg.functional.meta_grad Checkpointed, vmap, torch.compile",
                pure_call(batch, torch.compile(functional_meta_grad(batch, mg.Checkpointed()))), compiled=True),
            Row("functional_tasks_compiled", "mg.functional.meta_grad Checkpointed, tasks=4, compile=True (compiled pieces)",
                pure_call(batch, functional_tasks(batch, mg.Checkpointed(), compile=True)), compiled=True),
            Row("torch_func_compiled", "hand-written torch.func (grad of unroll, vmap), torch.compile",
                pure_call(batch, torch.compile(hand_torch_func(batch))), compiled=True, library="torch"),
            Row("scan_checkpointed_compiled", "hand-written Checkpointed with scan (no unroll), torch.compile, per task",
                pure_call(batch, scan_checkpointed(batch)), compiled=True, library="torch"),
        ]
    if compile_rows and batch.model_device.type == "cuda":  # CUDA graphs: torch.compile's reduce-overhead
        rows.append(Row("compiled_tasks_checkpointed_cudagraphs",
                        'metagrad Checkpointed, tasks=4, compile="reduce-overhead" (CUDA graphs)',
                        tasks_metagradient(batch, mg.Checkpointed(), compile="reduce-overhead"), compiled=True))
    if batch.model_device.type != "cpu":
        rows.append(Row("jax", "JAX jit(vmap(grad(lax.scan)))", None, compiled=True, library="jax",
                        failure="the JAX row runs on the CPU only"))
    elif batch.config != "sinusoid":
        rows.append(Row("jax", "JAX jit(vmap(grad(lax.scan)))", None, compiled=True, library="jax",
                        failure="the JAX row is written for the sinusoid MLP only"))
    elif jax is not None:
        rows.append(Row("jax", f"JAX {jax.__version__} jit(vmap(grad(lax.scan)))", jax_row(batch, jax),
                        compiled=True, library="jax"))
    else:
        rows.append(Row("jax", "JAX jit(vmap(grad(lax.scan)))", None, compiled=True, library="jax",
                        failure=jax_note))
    return rows


def measure(rows: Sequence[Row], repeats: int, device: torch.device = torch.device("cpu")) -> None:
    """Time every row; on a GPU each call is timed to its end (``torch.cuda.synchronize``)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    live = [r for r in rows if r.failure is None]
    for r in live:  # first call: compile (for compiled rows) and one run
        try:
            start = time.perf_counter()
            r.grad = r.run().detach().clone()
            sync()
            r.first_call_s = time.perf_counter() - start
            r.run()  # warm-up
            sync()
        except Exception as error:  # noqa: BLE001 - a failing row is reported, not fatal
            r.failure = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            traceback.print_exc()
    live = [r for r in rows if r.failure is None]
    for _ in range(repeats):  # interleaved rounds
        for r in live:
            start = time.perf_counter()
            r.run()
            sync()
            r.times_ms.append(1e3 * (time.perf_counter() - start))


def rows_json(rows: Sequence[Row]) -> list[dict[str, Any]]:
    ref = next(r for r in rows if r.key == "eager_full")
    ref_ms = statistics.median(ref.times_ms) if ref.times_ms else None
    out = []
    for r in rows:
        median = statistics.median(r.times_ms) if r.times_ms else None
        error = None
        if r.grad is not None and ref.grad is not None:
            error = float((r.grad - ref.grad).norm() / ref.grad.norm())
        paired = None
        if r.times_ms and ref.times_ms:
            paired = statistics.median(a / b for a, b in zip(r.times_ms, ref.times_ms))
        out.append({
            "key": r.key, "method": r.label, "library": r.library, "compiled": r.compiled,
            "time_ms": median, "time_ms_min": min(r.times_ms) if r.times_ms else None,
            "time_ms_max": max(r.times_ms) if r.times_ms else None, "times_ms": r.times_ms,
            "time_ratio": median / ref_ms if median is not None and ref_ms else None,
            "time_ratio_paired_median": paired,
            "first_call_s": r.first_call_s if r.compiled else None,
            "rel_error": error, "failure": r.failure,
        })
    return out


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| method | ms / meta-batch (min–max) | time / eager Full (paired) | compile: first call "
             "| rel. error vs eager Full |", "|---|---|---|---|---|"]
    for r in rows:
        if r["failure"]:
            lines.append(f"| {r['method']} | {r['failure']} | | | |")
            continue
        first = f"{r['first_call_s']:.2f} s" if r["first_call_s"] is not None else "—"
        lines.append(f"| {r['method']} | {r['time_ms']:.2f} ({r['time_ms_min']:.2f}–{r['time_ms_max']:.2f}) "
                     f"| {r['time_ratio']:.3f}× ({r['time_ratio_paired_median']:.3f}×) | {first} "
                     f"| {r['rel_error']:.1e} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = make_parser(
        prog="python -m benchmarks.compiled",
        description="One meta-iteration of MAML (meta-batch 4, float32): metagrad's context manager "
                    "with every estimator, eager and with compile=True, a plain autograd unroll, "
                    "mg.functional.meta_grad under vmap eager and under torch.compile, hand-written "
                    "torch.func eager and compiled, a scan loop form, and JAX jit (when installed), "
                    "side by side in one process, as ratios to eager Full.")
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="numbers of inner SGD steps K (default 5 20; --quick: 2)")
    parser.add_argument("--config", choices=["sinusoid", "omniglot"], default="sinusoid",
                        help="sinusoid: the 1-40-40-1 MLP; omniglot: CNN4 on 28×28 5-way 1-shot "
                             "(benchmarks.estimators' configs; no JAX row)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the torch rows run (cuda: every call timed to its end, TF32 off, and a "
                             "row with compile=\"reduce-overhead\", CUDA graphs; the JAX row stays on the CPU)")
    parser.add_argument("--rows", nargs="+", default=None, metavar="KEY",
                        help="run only the rows with these keys (e.g. eager_full compiled_checkpointed; "
                             "the JSON names every row's key); eager_full always runs, as the reference")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per row after a warm-up, at least 7 (default 11; --quick: 7)")
    add_threads_argument(parser, "torch CPU threads (and XLA's, for JAX)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="run the torch.compile rows (default on; off with --quick)")
    parser.add_argument("--jax", action=argparse.BooleanOptionalAction, default=True,
                        help="run the JAX row when jax is importable")
    parser.add_argument("--cold", action="store_true",
                        help="set TORCHINDUCTOR_CACHE_DIR to a fresh temporary directory: compile "
                             "from an empty inductor cache")
    parser.add_argument("--quick", action="store_true",
                        help="K = 2, 7 repeats, no torch.compile unless --compile: a fast smoke run")
    add_seed_argument(parser, "seed of θ (tasks: seed … seed+3)")
    add_json_argument(parser, "write the results as JSON here")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = [2] if args.quick else [5, 20]
    if args.repeats is None:
        args.repeats = 7 if args.quick else 11
    if args.compile is None:
        args.compile = not args.quick
    if args.repeats < 7:
        parser.error("--repeats must be >= 7")
    if any(k < 1 for k in args.steps):
        parser.error("--steps: every value must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here; use --device cpu")
    return args


def inductor_cache_state(cold: bool) -> dict[str, Any]:
    if cold:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="metagrad-inductor-")
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    path = cache_dir()
    entries = sum(len(files) for _, _, files in os.walk(path)) if os.path.isdir(path) else 0
    return {"dir": path, "cold_flag": cold, "files_at_start": entries, "empty_at_start": entries == 0}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    cache = inductor_cache_state(args.cold) if args.compile else None
    set_threads(args.threads, say=False, compile_threads=args.compile)
    jax, jax_note = None, "jax not installed"
    if args.jax:
        jax = setup_jax(args.threads)
    else:
        jax_note = "jax row off (--no-jax)"
    device = torch.device(args.device)
    if device.type == "cuda":  # accuracy columns without TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    machine = machine_description(device)
    machine["jax"] = getattr(jax, "__version__", None)
    try:
        machine["load_average"] = list(os.getloadavg())
    except OSError:
        machine["load_average"] = None
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"Machine: {machine['cpu']}, {machine['cpu_count']} cores, torch {machine['torch']}, "
          f"jax {machine['jax'] or 'not installed'}, torch threads {torch.get_num_threads()}, "
          f"load average {machine['load_average']}, {date}")
    if cache is not None:
        print(f"Inductor cache: {cache['dir']} ({'empty' if cache['empty_at_start'] else 'not empty'} at "
              f"start: {cache['files_at_start']} files{'; fresh, --cold' if args.cold else ''}); "
              f"compile threads {args.threads}")
    cases = []
    for steps in args.steps:
        batch = make_batch(steps, args.seed, args.config, device)
        rows = build_rows(batch, args.compile, jax, jax_note)
        if args.rows is not None:
            rows = [r for r in rows if r.key in args.rows or r.key == "eager_full"]
        measure(rows, args.repeats, device)
        table = rows_json(rows)
        print(f"\n#### {CONFIGS[args.config].description}, K = {steps}, α = {LR}, meta-batch {META_BATCH}, "
              "float32\n")
        print(markdown(table))
        cases.append({"K": steps, "rows": table})
    print(f"\nTimes: median of {args.repeats} interleaved rounds after a warm-up; in parentheses the "
          "median over rounds of the ratio to eager Full in the same round. compile: the first call "
          "(trace, compile and one run). Rel. error: ‖g − g_Full‖/‖g_Full‖ in float32 against eager "
          "Full's meta-gradient of the meta-batch.")
    if machine["load_average"] is not None:
        machine["load_average_end"] = list(os.getloadavg())
    result = {"benchmark": "compiled", "date": date, "machine": machine, "threads": args.threads,
              "repeats": args.repeats, "lr": LR, "meta_batch": META_BATCH, "dtype": "float32",
              "config": CONFIGS[args.config].description, "inductor_cache": cache,
              "argv": list(sys.argv[1:] if argv is None else argv), "cases": cases}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
