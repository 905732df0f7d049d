"""``mg.diagnose``: which estimator to trust on the user's own task.

It runs the user's inner loop once per estimator, compares each meta-gradient with
the exact one (Full), measures time and peak memory, estimates ``K·α·ℓ`` (MATH.md,
"Where it works, and where it breaks") and recommends the cheapest estimator within
a relative-error tolerance::

    report = mg.diagnose(model, closure, steps=K, inner_opt=mg.optim.SGD(lr=0.01),
                         query=lambda fmodel: loss_fn(fmodel(x_q), y_q))
    print(report)          # a table
    report.recommended     # e.g. Binomial(order=3, chunk_size=None)

From the command line, on a built-in sinusoid task: ``python -m metagrad.diagnose --help``
(the entry point is the module metagrad/diagnose.py: ``python -m metagrad.diagnosis`` runs
the same but warns, because ``import metagrad`` has imported this module already). It runs
with one torch CPU thread unless ``--threads`` says otherwise: the task's ops are small, so
spreading them over threads costs more than it saves.

**The ℓ estimate.** At ``probes`` iterates spread over the loop (φ_0, the middle, φ_{K−1})
it runs ``power_iterations`` steps of power iteration on ``u ↦ (I − J_k)ᵀ u`` (``αH_k u``
for SGD), started from a fixed random vector. The largest norm ratio is ``‖A‖ = α·ℓ``,
and ``K·α·ℓ`` is K times it; ℓ itself is reported for a single float step size. Power
iteration approaches the largest |eigenvalue| from below at the rate of the ratio of
the two largest: 20 iterations reach 5% when that ratio is at most 0.85.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .context import MetaGradient
from .estimators import Binomial, Checkpointed, Estimator, FirstOrder, Full, MetaGradientWarning, Truncated
from .fmodel import FunctionalModel
from .linalg import norm
from .memory import peak_memory
from .numerics import real_view, tf32_enabled
from .optim import SGD, UpdateRule

__all__ = ["diagnose", "Report", "Row"]

Closure = Callable[[FunctionalModel], torch.Tensor]


@dataclass
class Row:
    """One estimator's results."""

    estimator: Estimator
    relative_error: float
    cosine: float
    seconds: float
    peak_bytes: Optional[int]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """What :func:`diagnose` found. ``str(report)`` is a Markdown table."""

    rows: list[Row]
    steps: int
    rtol: float
    alpha_ell: float
    ell: Optional[float]
    recommended: Estimator
    memory_method: str
    notes: list[str] = field(default_factory=list)

    @property
    def k_alpha_ell(self) -> float:
        """``K·α·ℓ``: below about 1 the binomial series converges fast; well above, it diverges."""
        return self.steps * self.alpha_ell

    def __str__(self) -> str:
        full = next((r.seconds for r in self.rows if r.estimator == Full()), None)
        lines = ["| estimator | rel. error vs exact | cosine | time (ms) | time / Full | peak memory (MiB) |",
                 "|---|---|---|---|---|---|"]
        for r in self.rows:
            ratio = f"{r.seconds / full:.2f}×" if full else "—"
            memory = "—" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.1f}"
            mark = " ← recommended" if r.estimator == self.recommended else ""
            lines.append(f"| {r.estimator!r}{mark} | {r.relative_error:.2e} | {r.cosine:.6f} | "
                         f"{1e3 * r.seconds:.1f} | {ratio} | {memory} |")
        ell = "" if self.ell is None else f", ℓ ≈ {self.ell:.3g}"
        lines += ["", f"K = {self.steps}, K·α·ℓ ≈ {self.k_alpha_ell:.3g}{ell}. Recommended within "
                      f"rtol = {self.rtol:g}: {self.recommended!r} (the fastest whose error is within it). "
                      f"Memory: {self.memory_method}."]
        lines += self.notes
        return "\n".join(lines)


def default_estimators(steps: int) -> list[Estimator]:
    """FirstOrder, Truncated(1…3), Binomial(1…4), Binomial('auto'), Checkpointed and Full,
    without orders above K."""
    candidates: list[Estimator] = [FirstOrder()]
    candidates += [Truncated(t) for t in (1, 2, 3) if t < steps]
    candidates += [Binomial(order) for order in (1, 2, 3, 4) if order < steps]
    candidates += [Binomial("auto"), Checkpointed(), Full()]
    return candidates


def diagnose(model: torch.nn.Module, closure: Closure, *, steps: int, inner_opt: UpdateRule,
             query: Closure, meta: Sequence[torch.Tensor] = (), estimators: Optional[Sequence[Estimator]] = None,
             rtol: float = 1e-2, repeats: int = 3, probes: int = 3,
             power_iterations: int = 20) -> Report:
    """Run every estimator on one task and report error, time, memory and ``K·α·ℓ``.

    Args:
        model: the module (its parameters and ``.grad`` are left as they are).
        closure: the inner loss, as for ``meta.step``.
        steps: K, the number of inner steps.
        inner_opt: the inner update rule.
        query: ``query(fmodel) -> loss`` at the adapted weights.
        meta: the meta-parameters η the inner loop learns besides θ (a step size the rule
            holds, a weight decay the closure reads), whose meta-gradients are compared too: a
            row's relative error is then the larger of θ's and η's (η's tensors flattened
            together), its cosine over both. Where a block finds η and none is given here, the
            error column is θ's alone, which hides an estimator that gives η nothing through
            the inner loop (FirstOrder): a :class:`MetaGradientWarning` and a note say so.
        estimators: the estimators to compare (default :func:`default_estimators`).
            Full is added if missing: it is the exact reference.
        rtol: the relative error a recommendation must meet.
        repeats: timed runs per estimator, after one warm-up; the median is reported.
        probes: iterates at which ℓ is estimated.
        power_iterations: power-iteration steps per probe.

    Returns:
        A :class:`Report`.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps!r}.")
    if not (isinstance(rtol, (int, float)) and rtol > 0):
        raise ValueError(f"rtol: expected a float > 0, got {rtol!r}.")
    meta = [meta] if isinstance(meta, torch.Tensor) else list(meta)
    for i, t in enumerate(meta):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad):
            got = f"a tensor of dtype {t.dtype}, requires_grad={t.requires_grad}" if isinstance(t, torch.Tensor) \
                else type(t).__name__
            raise ValueError(f"meta[{i}]: expected a floating-point tensor that requires grad (a "
                             f"meta-parameter), got {got}.")
    device = next(model.parameters()).device
    notes = []
    if device.type == "cuda" and tf32_enabled():
        message = ("TF32 is enabled: GPU meta-gradients then disagree by about 10% between identical "
                   "runs (MATH.md, 'Numerics that bite'), which swamps the error column. Set "
                   "torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False, "
                   "or run diagnose inside `with mg.numerics.exact_gpu():`.")
        warnings.warn(message, MetaGradientWarning, stacklevel=2)
        notes.append("Warning: " + message)
    chosen = list(estimators) if estimators is not None else default_estimators(steps)
    if Full() not in chosen:  # the reference every row is measured against
        chosen.append(Full())
    params = [p for p in model.parameters() if p.requires_grad]

    def meta_gradient(estimator: Estimator) -> tuple[torch.Tensor, dict[str, Any]]:
        """θ's meta-gradient flattened, then η's (a row of :attr:`Row`'s comparison), and ``meta.info``."""
        with MetaGradient(model, inner_opt=inner_opt, estimator=estimator) as block:
            for _ in range(steps):
                block.step(closure)
            grads = torch.autograd.grad(query(block.fmodel), params + meta, allow_unused=True)
        flat = torch.cat([real_view(torch.zeros_like(p) if g is None else g).reshape(-1)
                          for p, g in zip(params + meta, grads)])
        return flat.detach(), dict(block.info)

    exact, _ = meta_gradient(Full())
    split = sum(p.numel() for p in params)  # θ's entries first, then η's
    rows = []
    method = ""
    for estimator in chosen:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetaGradientWarning)  # the table says it all
            g, info = meta_gradient(estimator)  # warm-up, and the values
            times = []
            for _ in range(repeats):
                _synchronize(device)
                start = time.perf_counter()
                meta_gradient(estimator)
                _synchronize(device)
                times.append(time.perf_counter() - start)
            with peak_memory(device) as memory:
                meta_gradient(estimator)
        method = memory.description
        error = max(_relative(g[:split], exact[:split]), _relative(g[split:], exact[split:]) if meta else 0.0)
        rows.append(Row(estimator, error, _cosine(g, exact), statistics.median(times), memory.peak_bytes, info))
    found = next((r.info["meta_parameters"] for r in rows if r.info.get("meta_parameters")), None)
    if found and not meta:  # (Full differentiates the unroll and names none: the others do)
        message = (f"the inner loop has meta-parameters {found}, and meta= gives none of them, so the error "
                   "column compares θ's meta-gradient alone; an estimator that gives η no gradient "
                   "through the inner loop (FirstOrder) can look exact. Pass meta=[...] (the tensors) "
                   "to compare theirs too.")
        warnings.warn(message, MetaGradientWarning, stacklevel=2)
        notes.append("Warning: " + message)
    alpha_ell = _largest_step_curvature(model, closure, steps, inner_opt, probes, power_iterations)
    lr = getattr(inner_opt, "lr", None)
    ell = alpha_ell / lr if isinstance(inner_opt, SGD) and isinstance(lr, float) and lr > 0 else None
    qualified = [r for r in rows if r.relative_error <= rtol]
    recommended = min(qualified, key=lambda r: r.seconds).estimator
    return Report(rows, steps, float(rtol), alpha_ell, ell, recommended, method, notes)


def _largest_step_curvature(model: torch.nn.Module, closure: Closure, steps: int,
                            inner_opt: UpdateRule, probes: int, iterations: int) -> float:
    """``max_k ‖I − J_k‖`` over ``probes`` iterates, by power iteration (``α·ℓ`` for SGD)."""
    with MetaGradient(model, inner_opt=inner_opt, estimator=Checkpointed()) as meta:
        for _ in range(steps):
            meta.step(closure)
        trajectory = meta._trajectory
        assert trajectory is not None
        where = sorted({round(i * (steps - 1) / max(probes - 1, 1)) for i in range(probes)})
        generator = torch.Generator().manual_seed(0)
        largest = 0.0
        for k in where:
            u = {n: torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
                 for n, t in trajectory.iterate(k).items()}
            estimate = 0.0
            for _ in range(iterations):
                size = norm(u)
                if size == 0:
                    break
                u = {n: t / size for n, t in u.items()}
                pulled, _, _ = trajectory.vjp(k, u)
                u = {n: u[n] - pulled[n] for n in u}  # (I − J_k)ᵀ u
                estimate = norm(u)
            largest = max(largest, estimate)
        trajectory.verify()  # the replay checks of the rebuilt steps
    return largest



def _relative(g: torch.Tensor, exact: torch.Tensor) -> float:
    scale = float(exact.norm())
    return float((g - exact).norm()) / scale if scale > 0 else float((g - exact).norm())


def _cosine(g: torch.Tensor, exact: torch.Tensor) -> float:
    denominator = float(g.norm()) * float(exact.norm())
    return float(g @ exact) / denominator if denominator > 0 else 1.0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sinusoid_task(seed: int, shots: int, dtype: torch.dtype) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The examples' sinusoid task: a 1-40-40-1 ReLU net and one sine wave."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40),
                                torch.nn.ReLU(), torch.nn.Linear(40, 1)).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    amplitude = 0.1 + 4.9 * torch.rand(1, generator=generator, dtype=dtype)
    phase = math.pi * torch.rand(1, generator=generator, dtype=dtype)
    x = 10 * torch.rand(2 * shots, 1, generator=generator, dtype=dtype) - 5
    y = amplitude * torch.sin(x + phase)
    return model, (x[:shots], y[:shots], x[shots:], y[shots:])


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m metagrad.diagnose``: diagnose the estimators on a built-in sinusoid task."""
    parser = argparse.ArgumentParser(
        prog="python -m metagrad.diagnose",
        description="Compare every meta-gradient estimator with the exact one on the sinusoid "
                    "regression task of the examples (1-40-40-1 ReLU net), estimate K·α·ℓ, and "
                    "recommend the fastest estimator within --rtol.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="K, inner SGD steps")
    parser.add_argument("--lr", type=float, default=0.01, help="α, the inner SGD step size")
    parser.add_argument("--shots", type=int, default=10, help="support (and query) points")
    parser.add_argument("--rtol", type=float, default=1e-2, help="relative error a recommendation must meet")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per estimator")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--seed", type=int, default=0, help="seed for the net and the task")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (torch.set_num_threads); 1: the task's ops are small, so "
                             "thread fan-out costs more than it saves, and the timings are comparable")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, (x_s, y_s, x_q, y_q) = _sinusoid_task(args.seed, args.shots, dtype)
    mse = torch.nn.functional.mse_loss
    report = diagnose(model, lambda f: mse(f(x_s), y_s), steps=args.steps, inner_opt=SGD(args.lr),
                      query=lambda f: mse(f(x_q), y_q), rtol=args.rtol, repeats=args.repeats)
    print(report)
    threads = torch.get_num_threads()
    print(f"torch CPU threads: {threads} (--threads), torch {torch.__version__}.")


if __name__ == "__main__":
    main()
