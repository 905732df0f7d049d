"""Learning to reweight examples (Ren et al., ICML 2018) on noisy labels, with a one-step lookahead.

40% of the training labels (``--corruption``) are replaced by a class drawn uniformly among the
other classes; a small clean set (``--val-size``, 50 digits by default, five per class on average)
has its true labels. A classifier (an MLP) is trained by SGD with momentum on mini-batches of the
noisy training set, three ways, for the same number of steps and the same schedule:

- **plain**: the mean cross-entropy of each mini-batch (uniform weights);
- **reweighted**: each mini-batch's examples weighted by Ren et al.'s rule (below);
- **clean-only**: the clean examples alone, the whole clean set at every step.

The reweighting rule, at every training step, for a mini-batch (x_i, y_i) and the model's θ:

1. per-example weights ε = 0 (a tensor that requires grad; ε is a meta-parameter η, MATH.md
   "Meta-parameters other than θ");
2. a lookahead of one SGD step on the ε-weighted loss, ``φ(ε) = θ − α ∇_θ Σ_i ε_i ℓ_i(θ)``,
   written as a ``mg.MetaGradient`` block with one ``meta.step`` whose closure captures ε;
3. the clean-set loss at φ(ε), differentiated with respect to ε alone:
   ``g = torch.autograd.grad(val_loss, [eps])``. At ε = 0, ``g_i = −α ∇ℓ_i(θ)·∇L_clean(θ)``: an example
   whose gradient agrees with the clean set's gets a negative g_i;
4. weights ``w = max(−g, 0) / Σ max(−g, 0)`` (all zero when every g_i ≥ 0), and the real step
   on ``Σ_i w_i ℓ_i``.

``torch.autograd.grad`` rather than ``.backward()``: the lookahead's gradient is wanted for ε only,
and the model's ``.grad`` must stay clean for the real step (``torch.autograd.grad`` accumulates
nothing; the block still computes the θ part inside its estimator, see the README).
The lookahead's estimator is ``mg.Full()`` (one step: nothing to save by rebuilding it). The
lookahead's step size α is the optimizer's current learning rate; it scales every g_i alike, so
the normalized weights do not depend on it.

Every run uses a cosine learning-rate schedule from ``--lr`` to 0 and SGD momentum 0.9. The script
repeats the three trainings for ``--repeats`` seeds (``--seed``, ``--seed`` + 1, ...: the split,
the corrupted labels, the initialization and the mini-batch order all change with the seed) and
reports mean ± standard deviation of the final test accuracy. A second column, **early-stopped**,
gives each run's test accuracy at the evaluation step where its accuracy on the clean set was
highest (no extra training; not for clean-only, which trains on that set): plain training on noisy
labels peaks early and then memorizes the wrong labels, and a practitioner who holds a clean set
can stop it there.

Data (``--dataset``): scikit-learn's bundled 8×8 digits (default: 1,000 training, 50 clean and
747 test images, no download), or Fashion-MNIST from its IDX files in ``--data-root`` (default
``/usr/share/datasets/fashion-mnist``, where Debian's dataset-fashion-mnist package installs them;
5,000 / 100 / 10,000). The split, the label corruption and the IDX reader are
``examples/hypercleaning.py``'s.

Outputs, in ``--out`` (default ``results/reweighting``): ``results.md`` (the table),
``results.json`` (the configuration, the machine, every run's curves) and ``reweighting.png``
(test accuracy over training, mean over seeds with the range shaded; and the share of the
reweighted mini-batches' weight that went to corrupted examples, against their share of the
data). ``--json PATH`` writes the results there too.

Run it::

    python examples/reweighting.py                    # digits, 3 seeds, about 20 s on 2 cores
    python examples/reweighting.py --quick            # a smoke test in seconds
    python examples/reweighting.py --dataset fashion-mnist --steps 4000
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")  # render to a file; no display is needed or assumed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import metagrad as mg  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cli and hypercleaning beside this file
from cli import (add_data_arguments, add_dtype_argument, add_json_argument, add_out_argument,  # noqa: E402
                 add_quick_argument, add_seed_argument, add_threads_argument, cpu_description, fill_default_sizes,
                 machine_description, make_parser, parse_with_quick, positive_int, save_figure, set_threads,
                 torch_dtype, write_results, write_table)
from hypercleaning import DataError, Split, load_split  # noqa: E402

#: (training, clean, test) sizes per dataset; the flags override them.
DEFAULT_SIZES = {"digits": (1000, 50, 747), "fashion-mnist": (5000, 100, 10000)}
QUICK = {"train_size": 200, "val_size": 20, "test_size": 100, "steps": 20, "eval_every": 10, "repeats": 2}
METHODS = ("plain", "reweighted", "clean-only")
LABELS = {"plain": "plain", "reweighted": "reweighted (lookahead)", "clean-only": "clean-only"}


# ----------------------------------------------------------------------- arguments
def fraction_argument(text: str) -> float:
    """``--corruption``: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def positive_float(text: str) -> float:
    """``--lr``: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


# ----------------------------------------------------------------------- data
def load_data(args: argparse.Namespace, seed: int, dtype: torch.dtype) -> Split:
    """``examples/hypercleaning.py``'s split of ``args.dataset`` for ``seed``, in ``dtype``; a missing
    or malformed IDX file ends the run with its message."""
    try:
        return load_split(argparse.Namespace(**{**vars(args), "seed": seed})).to(dtype)
    except DataError as error:
        raise SystemExit(f"--dataset {args.dataset}: {error}") from None


# ----------------------------------------------------------------------- the method
def make_model(features: int, classes: int, hidden: int) -> nn.Module:
    """An MLP with two ReLU hidden layers of ``hidden`` units."""
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def example_weights(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_clean: torch.Tensor,
                    y_clean: torch.Tensor, lr: float) -> torch.Tensor:
    """Ren et al.'s weights of a mini-batch: ``max(−g, 0)`` normalized, ``g = ∂L_clean(φ(ε))/∂ε`` at ε = 0.

    φ(ε) is one SGD step of size ``lr`` from the model's parameters on ``Σ_i ε_i ℓ_i``; ε is a
    tensor the closure captures, so the block differentiates through the step with respect to it.
    Only ε's gradient is taken (``torch.autograd.grad``): the model's ``.grad`` is left as it was.
    """
    eps = torch.zeros(len(y), dtype=x.dtype, requires_grad=True)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=mg.Full()) as meta:
        meta.step(lambda fmodel: (eps * F.cross_entropy(fmodel(x), y, reduction="none")).sum())
        clean_loss = F.cross_entropy(meta.fmodel(x_clean), y_clean)
        (grad,) = torch.autograd.grad(clean_loss, [eps])
    weights = torch.clamp(-grad, min=0)
    total = weights.sum()
    return weights / total if total > 0 else weights


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of ``x`` the model classifies as ``y``."""
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).double().mean().item()


def train(method: str, data: Split, args: argparse.Namespace, seed: int, bar: tqdm) -> dict[str, Any]:
    """Train one classifier by ``method`` for ``args.steps`` steps; its curves and final accuracy.

    Every ``args.eval_every`` steps (and after the last) the test and clean-set accuracies are
    recorded; for ``reweighted``, also the share of the mini-batch weights on corrupted examples.
    """
    torch.manual_seed(seed)  # the same initialization for every method of a seed
    model = make_model(data.x_train.shape[1], data.classes, args.hidden).to(data.x_train.dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    order = torch.Generator().manual_seed(seed + 1)  # the same mini-batches for plain and reweighted
    batch = min(args.batch_size, len(data.y_train))
    curve: dict[str, list[float]] = {"step": [], "test_accuracy": [], "clean_accuracy": [], "corrupted_weight": []}
    corrupted_weight: list[float] = []
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        index = torch.randperm(len(data.y_train), generator=order)[:batch]
        if method == "clean-only":
            loss = F.cross_entropy(model(data.x_val), data.y_val)
        elif method == "plain":
            loss = F.cross_entropy(model(data.x_train[index]), data.y_train[index])
        else:
            x, y = data.x_train[index], data.y_train[index]
            weights = example_weights(model, x, y, data.x_val, data.y_val, schedule.get_last_lr()[0])
            corrupted_weight.append(weights[data.corrupted[index]].sum().item())
            loss = (weights * F.cross_entropy(model(x), y, reduction="none")).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.update(1)
        if step % args.eval_every == 0 or step == args.steps:
            curve["step"].append(step)
            curve["test_accuracy"].append(accuracy(model, data.x_test, data.y_test))
            curve["clean_accuracy"].append(accuracy(model, data.x_val, data.y_val))
            if corrupted_weight:
                curve["corrupted_weight"].append(statistics.fmean(corrupted_weight))
                corrupted_weight = []
    return {"method": method, "seed": seed, "test_accuracy": curve["test_accuracy"][-1], "curve": curve,
            "seconds": time.perf_counter() - started}


def early_stopped(curve: dict[str, list[float]]) -> tuple[float, int]:
    """The test accuracy and step of the evaluation of highest clean-set accuracy (the first, on ties)."""
    best = int(np.argmax(curve["clean_accuracy"]))
    return curve["test_accuracy"][best], curve["step"][best]


# ----------------------------------------------------------------------- results
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation over seeds (0 for one seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: final and early-stopped test accuracy over seeds, and the time of a run.

    Early stopping picks an evaluation step by clean-set accuracy; clean-only trains on the clean
    set, so it has none."""
    rows = []
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        final = [r["test_accuracy"] for r in mine]
        row = {"method": method, "label": LABELS[method], "values": final,
               "seconds_per_run": statistics.fmean(r["seconds"] for r in mine)}
        row["mean"], row["std"] = mean_std(final)
        row["early_mean"] = row["early_std"] = None
        if method != "clean-only":
            row["early_values"] = [early_stopped(r["curve"])[0] for r in mine]
            row["early_steps"] = [early_stopped(r["curve"])[1] for r in mine]
            row["early_mean"], row["early_std"] = mean_std(row["early_values"])
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict[str, Any]], caption: str) -> str:
    """The rows as a Markdown table, with the gain over plain training, caption underneath."""
    plain = next(r for r in rows if r["method"] == "plain")
    lines = ["| method | test accuracy, last step (mean ± std) | vs plain (points) | per seed "
             "| early-stopped on the clean set | s / run |", "|---|---|---|---|---|---|"]
    for r in rows:
        per_seed = ", ".join(f"{100 * v:.1f}" for v in r["values"])
        gain = "" if r is plain else f"{100 * (r['mean'] - plain['mean']):+.1f}"
        early = "—" if r["early_mean"] is None else f"{100 * r['early_mean']:.1f}% ± {100 * r['early_std']:.1f}"
        lines.append(f"| {r['label']} | {100 * r['mean']:.1f}% ± {100 * r['std']:.1f} | {gain} | {per_seed} "
                     f"| {early} | {r['seconds_per_run']:.1f} |")
    return "\n".join(lines) + "\n\n" + caption + "\n"


def table_caption(args: argparse.Namespace, data: Split, seeds: Sequence[int]) -> str:
    """What the rows and columns mean, and the settings behind them."""
    return (
        f"Learning to reweight (Ren et al. 2018) on {args.dataset}: {len(data.y_train)} training examples, "
        f"{args.corruption:.0%} of them with a uniformly random wrong label; {len(data.y_val)} clean examples; "
        f"{len(data.y_test)} test examples. MLP (two ReLU layers of {args.hidden}), {args.steps} SGD steps "
        f"(momentum 0.9, lr {args.lr:g} with a cosine schedule to 0, mini-batches of {args.batch_size}); "
        f"{args.dtype}; seeds {', '.join(map(str, seeds))}; {cpu_description()}, torch {torch.__version__}. "
        "Test accuracy after the last step, mean ± standard deviation over seeds. Plain: uniform weights on "
        "the noisy set. Reweighted: Ren et al.'s weights from a one-step lookahead on the clean set "
        "(mg.Full()). Clean-only: the clean examples alone. Early-stopped: the same run at the evaluation "
        f"(every {args.eval_every} steps) of highest clean-set accuracy; not for clean-only, which trains on "
        "that set. s / run: wall time of one training run."
    )


def plot(runs: Sequence[dict[str, Any]], args: argparse.Namespace, path: str) -> None:
    """Test accuracy over training (mean over seeds, range shaded), and the reweighted runs'
    share of weight on corrupted examples."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    colors = {"plain": "tab:red", "reweighted": "tab:blue", "clean-only": "tab:green"}
    for method in METHODS:
        curves = [r["curve"] for r in runs if r["method"] == method]
        steps = curves[0]["step"]
        values = np.array([c["test_accuracy"] for c in curves]) * 100
        left.plot(steps, values.mean(axis=0), color=colors[method], label=LABELS[method])
        left.fill_between(steps, values.min(axis=0), values.max(axis=0), color=colors[method], alpha=0.2)
    left.set_xlabel("training step")
    left.set_ylabel("test accuracy (%)")
    left.set_title(f"{args.dataset}, {args.corruption:.0%} of labels flipped", fontsize=10)
    left.legend(fontsize=8)
    curves = [r["curve"] for r in runs if r["method"] == "reweighted"]
    shares = np.array([c["corrupted_weight"] for c in curves]) * 100
    right.plot(curves[0]["step"], shares.mean(axis=0), color="tab:blue", label="reweighted")
    right.fill_between(curves[0]["step"], shares.min(axis=0), shares.max(axis=0), color="tab:blue", alpha=0.2)
    right.axhline(100 * args.corruption, color="gray", linestyle=":", label="uniform weights")
    right.set_xlabel("training step")
    right.set_ylabel("weight on corrupted examples (%)")
    right.set_ylim(0, max(100 * args.corruption * 1.2, 5))
    right.set_title("share of each mini-batch's weight on corrupted labels", fontsize=10)
    right.legend(fontsize=8)
    save_figure(fig, path)


# ----------------------------------------------------------------------- plumbing
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    parser = make_parser(
        description="Learning to reweight examples (Ren et al. 2018) on noisy labels: per-example weights from "
                    "a one-step lookahead on a small clean set, by mg.MetaGradient and torch.autograd.grad; "
                    "plain training vs reweighted vs clean-only, over several seeds; write results.md, "
                    "results.json and reweighting.png.")
    data = add_data_arguments(parser, DEFAULT_SIZES,
                              what=("noisy training examples", "clean examples", "test examples"))
    data.add_argument("--corruption", type=fraction_argument, default=0.4,
                      help="fraction of training labels replaced by a uniformly random wrong class")
    training = parser.add_argument_group("training")
    training.add_argument("--hidden", type=positive_int, default=128, help="units of each hidden layer")
    training.add_argument("--steps", type=positive_int, default=1500, help="SGD steps of every run")
    training.add_argument("--batch-size", type=positive_int, default=100, help="mini-batch size")
    training.add_argument("--lr", type=positive_float, default=0.1,
                          help="SGD learning rate at the start of the cosine schedule (momentum 0.9)")
    training.add_argument("--eval-every", type=positive_int, default=50,
                          help="steps between two evaluations (the curves, and plain's early stopping)")
    add_dtype_argument(training, "floating-point type of the training runs")
    run = parser.add_argument_group("run")
    add_quick_argument(run, QUICK)
    run.add_argument("--repeats", type=positive_int, default=3,
                     help="seeds to run: --seed, --seed + 1, ... (mean ± std over them)")
    add_threads_argument(run)
    add_seed_argument(run, "first seed: of the split, the corruption, the initialization and the batch order")
    add_out_argument(run, "reweighting", "reweighting.png")
    add_json_argument(run, "also write the results to this file")
    args = parse_with_quick(parser, argv, QUICK)
    fill_default_sizes(args, DEFAULT_SIZES)
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the experiment; return what was written to results.json."""
    args = parse_args(argv)
    set_threads(args.threads)
    dtype = torch_dtype(args.dtype)
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    seeds = [args.seed + r for r in range(args.repeats)]
    runs: list[dict[str, Any]] = []
    data = None
    with tqdm(total=len(seeds) * len(METHODS) * args.steps, desc="training", unit="step", dynamic_ncols=True,
              mininterval=0.5, file=sys.stderr) as bar:
        for seed in seeds:
            data = load_data(args, seed, dtype)
            for method in METHODS:
                bar.set_postfix({"seed": seed, "method": method}, refresh=False)
                runs.append(train(method, data, args, seed, bar))
    assert data is not None
    rows = summarize(runs)
    caption = table_caption(args, data, seeds)
    table = format_table(rows, caption)
    write_table(args.out, "Learning to reweight, noisy labels", table)
    plot(runs, args, os.path.join(args.out, "reweighting.png"))
    results = {
        "config": vars(args),
        "machine": machine_description(cpu_description()),
        "seeds": seeds,
        "caption": caption,
        "rows": rows,
        "runs": runs,
        "seconds": time.perf_counter() - started,
    }
    write_results(args.out, results, "reweighting.png", args.json)
    return results


if __name__ == "__main__":
    main()
