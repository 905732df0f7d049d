"""How well a fixed-order Binomial's own error estimate predicts its true error.

For many random tasks, this script runs ``mg.Binomial(order=L)`` (monitored, the level
grouping) through :class:`metagrad.MetaGradient` and records, for each result,

- the **true relative error** ``‖ĝ_L − g‖/‖g‖`` against the exact meta-gradient ``g``,
  computed here by a plain hand-unrolled autograd loop in float64 (``create_graph=True``
  through the K inner SGD steps, then one ``torch.autograd.grad``), not by any metagrad
  estimator;
- the estimator's **error estimate** ``‖T_L‖/‖ĝ_L‖`` (``meta.info["error_estimate"]``: the
  last level kept, relative to the estimate);
- the **growth ratio** ``ρ_L = ‖T_L‖/‖T_{L−1}‖`` (``T_0 = v``), the older warning rule;
- whether metagrad itself warned (:class:`metagrad.MetaGradientWarning`).

Problems (float64, CPU):

- sinusoid regression, 1-40-1 and 1-40-40-1 ReLU nets at their random initialization,
  10-shot support, 10 query points, MSE; K in {5, 10, 20}, α in {0.001, 0.003, 0.01, 0.03};
- few-shot images: CNN4 (four 3×3 conv → BatchNorm with batch statistics → ReLU → 2×2
  max-pool, then a linear head) on 28×28 procedurally drawn glyphs
  (``examples/fewshot_data.synthetic_glyphs``), 5-way 1-shot, 5 queries per class,
  cross-entropy, K = 5, a few α.

Every task draws its own initialization and its own data from its seed. L runs over 1…4.

For each candidate threshold t, a result "warns" when ``estimate ≥ t`` or ``ρ_L ≥ 1``
(the rule metagrad applies, with ``t = metagrad.estimators.binomial.WARN_ESTIMATE``). The
table gives, per t, the share of results more than 30% off that warn (it must be 100%)
and the share of results less than 5% off that warn (false alarms). Output: the table on
stdout, and in ``--out``: ``binomial_sweep.json`` (every point) and ``binomial_sweep.png``
(true error against the estimate, log-log, with the threshold). Run::

    python -m benchmarks.binomial_sweep --out results/binomial_sweep
    python -m benchmarks.binomial_sweep --quick --out /tmp/sweep     # well under a minute
    python -m benchmarks.binomial_sweep --render results/binomial_sweep/binomial_sweep.json --out docs
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from tqdm import tqdm

import metagrad as mg
from metagrad.estimators.binomial import WARN_ESTIMATE

if __package__ in (None, ""):  # run as a file: examples.cli from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.cli import add_seed_argument, cpu_model, add_threads_argument, make_parser, set_threads, write_json  # noqa: E402

DT = torch.float64
ORDERS = (1, 2, 3, 4)
SINUSOID_K = (5, 10, 20)
SINUSOID_ALPHAS = (0.001, 0.003, 0.01, 0.03)
CNN_K = 5
CNN_ALPHAS = (0.01, 0.03, 0.1, 0.4)
CANDIDATES = (0.01, 0.03, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1.0)
BAD, GOOD = 0.30, 0.05  # "more than 30% off" and "less than 5% off"

Task = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------ problems
def mlp(widths: Sequence[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def sinusoid_task(seed: int) -> Task:
    g = torch.Generator().manual_seed(seed)
    amplitude = 0.1 + 4.9 * torch.rand((), generator=g, dtype=DT)
    phase = math.pi * torch.rand((), generator=g, dtype=DT)
    x = 10 * torch.rand(20, 1, generator=g, dtype=DT) - 5
    y = amplitude * torch.sin(x - phase)
    return x[:10], y[:10], x[10:], y[10:]


def cnn4(filters: int, ways: int, size: int = 28) -> nn.Module:
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, filters, 3, padding=1),
                   nn.BatchNorm2d(filters, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
        channels, size = filters, size // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters * size * size, ways))


class Glyphs:
    """5-way 1-shot tasks of 28×28 glyphs drawn by ``examples/fewshot_data.py``."""

    def __init__(self, classes: int, ways: int = 5, shots: int = 1, queries: int = 5) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
        from fewshot_data import sample_task, synthetic_glyphs

        self.pool = synthetic_glyphs(28, (classes, 1, 1), images_per_class=shots + queries, seed=0)["train"]
        self.sample, self.ways, self.shots, self.queries = sample_task, ways, shots, queries

    def task(self, seed: int) -> Task:
        t = self.sample(self.pool, self.ways, self.shots, self.queries, torch.Generator().manual_seed(seed))
        return (t.support_images.to(DT) / 255, t.support_labels, t.query_images.to(DT) / 255, t.query_labels)


# ------------------------------------------------------------------------------ gradients
def exact_meta_gradient(model: nn.Module, task: Task, K: int, alpha: float, loss: Loss
                        ) -> tuple[torch.Tensor, float]:
    """The exact meta-gradient by a plain unrolled autograd loop, flat, and ‖v‖."""
    x_s, y_s, x_q, y_q = task
    names = [n for n, _ in model.named_parameters()]
    theta = [p.detach().clone().requires_grad_() for _, p in model.named_parameters()]
    phi = theta
    for _ in range(K):
        inner = loss(functional_call(model, dict(zip(names, phi)), (x_s,)), y_s)
        grads = torch.autograd.grad(inner, phi, create_graph=True)
        phi = [p - alpha * g for p, g in zip(phi, grads)]
    query = loss(functional_call(model, dict(zip(names, phi)), (x_q,)), y_q)
    v = torch.autograd.grad(query, phi, retain_graph=True)
    g = torch.autograd.grad(query, theta)
    return torch.cat([t.reshape(-1) for t in g]), float(torch.cat([t.reshape(-1) for t in v]).norm())


def binomial(model: nn.Module, task: Task, K: int, alpha: float, loss: Loss, order: int
             ) -> tuple[torch.Tensor, dict[str, Any], list[str]]:
    """``mg.Binomial(order)``'s meta-gradient, flat, its ``meta.info`` and its warnings."""
    x_s, y_s, x_q, y_q = task
    for p in model.parameters():
        p.grad = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", mg.MetaGradientWarning)
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=alpha), estimator=mg.Binomial(order)) as meta:
            for _ in range(K):
                meta.step(lambda f: loss(f(x_s), y_s))
            loss(meta.fmodel(x_q), y_q).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return g, dict(meta.info), [str(w.message) for w in caught if issubclass(w.category, mg.MetaGradientWarning)]


def points_for(problem: str, model: nn.Module, task: Task, K: int, alpha: float, loss: Loss,
               seed: int) -> list[dict[str, Any]]:
    g_true, v_norm = exact_meta_gradient(model, task, K, alpha, loss)
    if not (torch.isfinite(g_true).all() and math.isfinite(v_norm)):
        raise FloatingPointError("the unrolled inner loop diverged")
    rows = []
    for L in ORDERS:
        if L >= K:
            continue
        g, info, messages = binomial(model, task, K, alpha, loss, L)
        norms = info["level_norms"]
        previous = norms[-2] if L >= 2 else v_norm
        rows.append({
            "problem": problem, "K": K, "alpha": alpha, "seed": seed, "order": L,
            "error": float((g - g_true).norm() / g_true.norm()),
            "estimate": float(info["error_estimate"]),
            "growth": norms[-1] / previous if previous > 0 else math.inf,
            "level_norms": norms, "v_norm": v_norm, "exact_norm": float(g_true.norm()),
            "metagrad_warned": bool(messages), "warnings": messages,
        })
    return rows


# ------------------------------------------------------------------------------ the sweep
def jobs(args: argparse.Namespace) -> list[tuple[str, int, float, int]]:
    """(problem, K, α, seed) for every task of the sweep."""
    out = []
    for problem in ("sinusoid 1-40-1", "sinusoid 1-40-40-1"):
        for K in args.sinusoid_K:
            for alpha in args.sinusoid_alphas:
                out += [(problem, K, alpha, args.seed + i) for i in range(args.tasks)]
    for alpha in args.cnn_alphas:
        out += [("CNN4 28×28 5-way 1-shot", CNN_K, alpha, args.seed + i) for i in range(args.cnn_tasks)]
    return out


def run_sweep(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The points, and the tasks left out because their inner loop itself diverged (a
    non-finite inner loss: there is no meta-gradient to compare with)."""
    glyphs = Glyphs(classes=40) if args.cnn_tasks > 0 else None
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    todo = jobs(args)
    for problem, K, alpha, seed in tqdm(todo, desc="tasks", unit="task", disable=args.no_progress,
                                         dynamic_ncols=True):
        torch.manual_seed(seed)
        if problem.startswith("sinusoid"):
            model = mlp((1, 40, 1) if problem.endswith("1-40-1") else (1, 40, 40, 1)).to(DT)
            task, loss = sinusoid_task(seed), F.mse_loss
        else:
            assert glyphs is not None
            model, task, loss = cnn4(args.filters, ways=5).to(DT), glyphs.task(seed), F.cross_entropy
        try:
            rows += points_for(problem, model, task, K, alpha, loss, seed)
        except FloatingPointError:
            skipped.append({"problem": problem, "K": K, "alpha": alpha, "seed": seed})
    return rows, skipped


def warns(row: dict[str, Any], threshold: float) -> bool:
    return row["estimate"] >= threshold or row["growth"] >= 1


def table(rows: list[dict[str, Any]], candidates: Sequence[float]) -> list[dict[str, Any]]:
    bad = [r for r in rows if r["error"] > BAD]
    good = [r for r in rows if r["error"] < GOOD]
    out = [{"threshold": None, "caught": _share(bad, lambda r: r["growth"] >= 1),
            "false_alarms": _share(good, lambda r: r["growth"] >= 1)}]
    for t in candidates:
        out.append({"threshold": t, "caught": _share(bad, lambda r: warns(r, t)),
                    "false_alarms": _share(good, lambda r: warns(r, t))})
    return out


def _share(rows: list[dict[str, Any]], test: Callable[[dict[str, Any]], bool]) -> Optional[float]:
    return sum(map(test, rows)) / len(rows) if rows else None


def critical(rows: list[dict[str, Any]]) -> float:
    """The largest threshold that still catches every result more than 30% off (∞ if the
    growth rule alone catches them all)."""
    missed = [r["estimate"] for r in rows if r["error"] > BAD and r["growth"] < 1]
    return min(missed) if missed else math.inf


def render(rows: list[dict[str, Any]], candidates: Sequence[float]) -> str:
    bad = [r for r in rows if r["error"] > BAD]
    mid = [r for r in rows if GOOD <= r["error"] <= BAD]
    good = [r for r in rows if r["error"] < GOOD]
    lines = [f"{len(rows)} results: {len(bad)} more than {BAD:.0%} off, {len(mid)} between, "
             f"{len(good)} less than {GOOD:.0%} off. Shares are rounded down.", "",
             f"| warn when | > {BAD:.0%} off that warn (of {len(bad)}) | {GOOD:.0%}–{BAD:.0%} off that warn "
             f"(of {len(mid)}) | < {GOOD:.0%} off that warn, false alarms (of {len(good)}) |",
             "|---|---|---|---|"]
    for t in [None, *candidates]:
        test = (lambda r: r["growth"] >= 1) if t is None else (lambda r, t=t: warns(r, t))
        rule = "ρ_L ≥ 1 only (the old rule)" if t is None else f"estimate ≥ {t:g} or ρ_L ≥ 1"
        lines.append(f"| {rule} | {_count(bad, test)} | {_count(mid, test)} | {_count(good, test)} |")
    lines += ["", f"Largest threshold catching every result more than {BAD:.0%} off: {critical(rows):.4g}"]
    lines += ["", f"| problem | results | > {BAD:.0%} off | of them ρ_L ≥ 1 | smallest estimate of the others "
              f"| < {GOOD:.0%} off | of them warn at {WARN_ESTIMATE:g} | metagrad warned on > {BAD:.0%} off |",
              "|---|---|---|---|---|---|---|---|"]
    for problem in sorted({r["problem"] for r in rows}):
        sub = [r for r in rows if r["problem"] == problem]
        b = [r for r in sub if r["error"] > BAD]
        gd = [r for r in sub if r["error"] < GOOD]
        others = [r["estimate"] for r in b if r["growth"] < 1]
        smallest = f"{min(others):.3g}" if others else "—"
        lines.append(f"| {problem} | {len(sub)} | {len(b)} | {sum(r['growth'] >= 1 for r in b)} | {smallest} "
                     f"| {len(gd)} | {sum(warns(r, WARN_ESTIMATE) for r in gd)} "
                     f"| {sum(r['metagrad_warned'] for r in b)} |")
    return "\n".join(lines)


def _count(rows: list[dict[str, Any]], test: Callable[[dict[str, Any]], bool]) -> str:
    if not rows:
        return "—"
    n = sum(map(test, rows))
    return f"{n} ({math.floor(1000 * n / len(rows)) / 10:.1f}%)"


def plot(rows: list[dict[str, Any]], path: Path, threshold: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    colors = {"sinusoid 1-40-1": "#1f77b4", "sinusoid 1-40-40-1": "#2ca02c", "CNN4 28×28 5-way 1-shot": "#d62728"}
    for problem in sorted({r["problem"] for r in rows}, key=lambda p: (p.startswith("CNN"), p)):  # CNN on top
        for grew, marker in ((False, "o"), (True, "x")):
            sub = [r for r in rows if r["problem"] == problem and (r["growth"] >= 1) == grew]
            if sub:
                ax.scatter([max(r["estimate"], 1e-17) for r in sub], [max(r["error"], 1e-17) for r in sub],
                           s=9, marker=marker, alpha=0.5, color=colors.get(problem, "grey"), linewidths=0.8,
                           label=f"{problem}{' (ρ_L ≥ 1)' if grew else ''}")
    ax.axvline(threshold, color="black", linewidth=1.2, label=f"WARN_ESTIMATE = {threshold:g}")
    ax.axhline(BAD, color="grey", linestyle="--", linewidth=0.8, label=f"{BAD:.0%} error")
    ax.axhline(GOOD, color="grey", linestyle=":", linewidth=0.8, label=f"{GOOD:.0%} error")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("error estimate ‖T_L‖ / ‖ĝ_L‖ (meta.info)")
    ax.set_ylabel("true relative error against the exact meta-gradient")
    ax.set_title("Fixed-order Binomial(L), L = 1…4, float64", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")  # error ≫ estimate: empty
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def machine() -> dict[str, Any]:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/binomial_sweep"),
                        help="folder for binomial_sweep.json and binomial_sweep.png")
    parser.add_argument("--quick", action="store_true",
                        help="a few tasks per setting (well under a minute), to check the script runs")
    parser.add_argument("--tasks", type=int, default=40, help="random sinusoid tasks per (net, K, α)")
    parser.add_argument("--cnn-tasks", type=int, default=40, help="random CNN tasks per α (0: no CNN)")
    parser.add_argument("--filters", type=int, default=16, help="CNN4 width")
    parser.add_argument("--sinusoid-K", type=int, nargs="+", default=list(SINUSOID_K))
    parser.add_argument("--sinusoid-alphas", type=float, nargs="+", default=list(SINUSOID_ALPHAS))
    parser.add_argument("--cnn-alphas", type=float, nargs="+", default=list(CNN_ALPHAS))
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(CANDIDATES),
                        help="candidate thresholds for the table")
    add_seed_argument(parser, "first task seed")
    add_threads_argument(parser, "torch CPU threads (torch.set_num_threads); the nets are small, so 1")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="print the tables of an earlier run's binomial_sweep.json and redraw its plot "
                             "into --out, without running anything")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.cnn_tasks, args.sinusoid_K, args.cnn_alphas = 1, 1, [5, 10], [0.1]
    if args.render is not None:
        earlier = json.loads(args.render.read_text())
        print(f"{args.render}: CPU {earlier['machine']['cpu']}, torch {earlier['machine']['torch']}, "
              f"torch threads: {earlier['machine']['torch_threads']}, {earlier['seconds']:.0f} s")
        print(render(earlier["points"], args.thresholds))
        args.out.mkdir(parents=True, exist_ok=True)
        plot(earlier["points"], args.out / "binomial_sweep.png", earlier["warn_estimate"])
        print(f"wrote {args.out / 'binomial_sweep.png'}")
        return earlier
    set_threads(args.threads, say=False)
    info = machine()
    print(f"CPU: {info['cpu']} ({info['cores']} cores), torch {info['torch']}, "
          f"torch threads: {info['torch_threads']}, float64")
    start = time.perf_counter()
    rows, skipped = run_sweep(args)
    seconds = time.perf_counter() - start
    text = render(rows, args.thresholds)
    print(text)
    print(f"\n{len(skipped)} task(s) left out: their inner loop diverged (non-finite inner loss)"
          + "".join(f"\n  {t['problem']}, K = {t['K']}, α = {t['alpha']}, seed {t['seed']}" for t in skipped))
    print(f"\nmetagrad's WARN_ESTIMATE = {WARN_ESTIMATE:g}; {len(rows)} results in {seconds:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": info, "seconds": seconds, "warn_estimate": WARN_ESTIMATE,
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "table": table(rows, args.thresholds), "critical_threshold": critical(rows), "skipped": skipped, "points": rows}
    write_json(args.out / "binomial_sweep.json", result, indent=1)
    plot(rows, args.out / "binomial_sweep.png", WARN_ESTIMATE)
    print(f"wrote {args.out / 'binomial_sweep.json'} and {args.out / 'binomial_sweep.png'}")
    return result


if __name__ == "__main__":
    main()
