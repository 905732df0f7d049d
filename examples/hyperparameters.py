"""Per-layer weight decay and per-layer step sizes by hypergradient descent, against random search.

An MLP classifier is trained from one fixed initialization θ_0 by K = ``--inner-steps`` (default 50)
full-batch gradient steps on a small training set. Its hyperparameters are one weight decay and one
step size per linear layer (three layers: six numbers), both log-parametrized:

- weight decay λ_l = exp(ρ_l), in the inner loss: ``CE(f(x_train), y_train) + Σ_l λ_l ‖W_l‖²``;
  the closure computes λ = ρ.exp() from ρ, a tensor it captures, so ρ is a meta-parameter
  (MATH.md, "Meta-parameters other than θ");
- step sizes α_l = exp(σ_l), in the update rule: ``mg.optim.SGD(lr={name: α_l})``, one entry per
  parameter name, the weight and the bias of layer l sharing the tensor α_l. A step size that
  requires grad is learned by every estimator (README, "Meta-parameters").

The outer objective is the cross-entropy on a validation set after the K steps. **Hypergradient
descent** takes ``--outer-steps`` (default 30) Adam steps on (ρ, σ), each from one inner training
through ``mg.MetaGradient(..., estimator=mg.Checkpointed())`` and
``torch.autograd.grad(val_loss, [rho, sigma])`` (θ_0 is fixed: the model's ``.grad`` is not
wanted, and ``torch.autograd.grad`` leaves it untouched). **Random search** draws the same number of
configurations, log-uniformly and independently per layer (step sizes in ``--lr-range``, weight decays
in ``--wd-range``), and trains each once: the same budget of inner trainings. Each method reports the
configuration of lowest validation loss among those it trained (hypergradient descent: among its
iterates), and that configuration's test accuracy. Hypergradient descent starts from ``--lr-init``
and ``--wd-init`` for every layer.

The comparison is repeated for ``--repeats`` seeds (``--seed``, ``--seed`` + 1, ...: the split,
θ_0 and the random search's draws change); the table gives mean ± standard deviation, and the wall
time of each method (a hypergradient costs a backward pass through the K steps besides the training).

Data (``--dataset``): scikit-learn's bundled 8×8 digits (default: 200 training, 300 validation and
1,297 test images), or Fashion-MNIST from its IDX files in ``--data-root`` (default
``/usr/share/datasets/fashion-mnist``; 1,000 / 1,000 / 10,000). The split and the IDX reader are
``examples/hypercleaning.py``'s (no label is corrupted here).

Outputs, in ``--out`` (default ``results/hyperparameters``): ``results.md`` (the table),
``results.json`` (configuration, machine, every trained configuration and its losses) and
``hyperparameters.png`` (validation loss against the number of inner trainings for both methods;
the per-layer step sizes and weight decays along hypergradient descent). ``--json PATH`` writes the
results there too.

Run it::

    python examples/hyperparameters.py                 # digits, 3 seeds, under a minute on 2 cores
    python examples/hyperparameters.py --quick         # a smoke test in seconds
    python examples/hyperparameters.py --dataset fashion-mnist --hidden 256
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")  # render to a file; no display is needed or assumed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402
from tqdm import tqdm  # noqa: E402

import metagrad as mg  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cli, hypercleaning, reweighting beside this file
from cli import (add_data_arguments, add_dtype_argument, add_json_argument, add_out_argument,  # noqa: E402
                 add_quick_argument, add_seed_argument, add_threads_argument, cpu_description, fill_default_sizes,
                 machine_description, make_parser, parse_with_quick, positive_int, save_figure, set_threads,
                 torch_dtype, write_results, write_table)
from hypercleaning import Split  # noqa: E402
from reweighting import load_data, mean_std, positive_float  # noqa: E402

#: (training, validation, test) sizes per dataset; the flags override them.
DEFAULT_SIZES = {"digits": (200, 300, 1297), "fashion-mnist": (1000, 1000, 10000)}
QUICK = {"train_size": 60, "val_size": 40, "test_size": 60, "hidden": 16, "inner_steps": 5, "outer_steps": 3,
         "repeats": 2}


# ----------------------------------------------------------------------- arguments
def range_argument(text: str) -> tuple[float, float]:
    """``--lr-range`` / ``--wd-range``: ``LOW,HIGH`` with 0 < LOW <= HIGH."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        low = high = math.nan
    if not (0 < low <= high < math.inf):
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with 0 < LOW <= HIGH (e.g. 0.01,3), got {text!r}")
    return low, high


# ----------------------------------------------------------------------- the model and its training
def make_model(features: int, classes: int, hidden: int) -> nn.Module:
    """An MLP with two ReLU hidden layers of ``hidden`` units: three linear layers."""
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def layers_of(model: nn.Module) -> list[str]:
    """The names of the model's linear layers, in order (``["0", "2", "4"]``)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def layer_index(model: nn.Module) -> dict[str, int]:
    """Each parameter name → the index of its layer in :func:`layers_of`."""
    layers = layers_of(model)
    return {name: layers.index(name.rpartition(".")[0]) for name, _ in model.named_parameters()}


def inner_loss(logits: torch.Tensor, y: torch.Tensor, params: Mapping[str, torch.Tensor],
               decay: torch.Tensor, index: Mapping[str, int]) -> torch.Tensor:
    """Cross-entropy plus ``Σ_l decay_l ‖W_l‖²`` over the layers' weight matrices (biases not decayed)."""
    penalty = sum(decay[index[name]] * (p ** 2).sum() for name, p in params.items() if name.endswith("weight"))
    return F.cross_entropy(logits, y) + penalty


def hypergradient(model: nn.Module, data: Split, log_lr: torch.Tensor, log_wd: torch.Tensor, steps: int,
                  estimator: Optional[mg.Estimator] = None) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Validation loss, test accuracy, and the gradients of the validation loss with respect to
    ``log_lr`` and ``log_wd`` (each one entry per layer), through ``steps`` inner steps from the
    model's parameters θ_0."""
    index = layer_index(model)
    lr = log_lr.exp()
    rates = {name: lr[layer] for name, layer in index.items()}  # weight and bias of a layer share α_l
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=rates),
                         estimator=mg.Checkpointed() if estimator is None else estimator) as meta:
        for _ in range(steps):
            # Captures log_wd: a meta-parameter. Rebuilt during backward at the stored iterate.
            meta.step(lambda f: inner_loss(f(data.x_train), data.y_train, f.params, log_wd.exp(), index))
        val_loss = F.cross_entropy(meta.fmodel(data.x_val), data.y_val)
        with torch.no_grad():
            test_accuracy = (meta.fmodel(data.x_test).argmax(dim=1) == data.y_test).double().mean().item()
        grad_lr, grad_wd = torch.autograd.grad(val_loss, [log_lr, log_wd])
    return val_loss.item(), test_accuracy, grad_lr, grad_wd


def train_and_evaluate(model: nn.Module, data: Split, lr: Sequence[float], wd: Sequence[float],
                       steps: int) -> tuple[float, float]:
    """The inner loop without metagrad (plain autograd, no graph kept): validation loss and test
    accuracy after ``steps`` steps from θ_0 with per-layer step sizes ``lr`` and weight decays ``wd``."""
    index = layer_index(model)
    decay = torch.tensor(wd, dtype=data.x_train.dtype)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    for _ in range(steps):
        loss = inner_loss(functional_call(model, params, (data.x_train,)), data.y_train, params, decay, index)
        grads = torch.autograd.grad(loss, list(params.values()))
        params = {n: (p - lr[index[n]] * g).detach().requires_grad_(True)
                  for (n, p), g in zip(params.items(), grads)}
    with torch.no_grad():
        val_loss = F.cross_entropy(functional_call(model, params, (data.x_val,)), data.y_val).item()
        logits = functional_call(model, params, (data.x_test,))
        test_accuracy = (logits.argmax(dim=1) == data.y_test).double().mean().item()
    return (val_loss if math.isfinite(val_loss) else math.inf), test_accuracy


# ----------------------------------------------------------------------- the two searches
def hypergradient_descent(model: nn.Module, data: Split, args: argparse.Namespace, bar: tqdm) -> dict[str, Any]:
    """``args.outer_steps`` Adam steps on the log step sizes and log weight decays; every iterate's
    configuration, validation loss and test accuracy."""
    layers = len(layers_of(model))
    dtype = data.x_train.dtype
    log_lr = torch.full((layers,), math.log(args.lr_init), dtype=dtype, requires_grad=True)
    log_wd = torch.full((layers,), math.log(args.wd_init), dtype=dtype, requires_grad=True)
    outer = torch.optim.Adam([log_lr, log_wd], lr=args.outer_lr)
    trials = []
    started = time.perf_counter()
    for _ in range(args.outer_steps):
        val_loss, test_accuracy, grad_lr, grad_wd = hypergradient(model, data, log_lr, log_wd, args.inner_steps)
        trials.append({"lr": log_lr.exp().tolist(), "wd": log_wd.exp().tolist(), "val_loss": val_loss,
                       "test_accuracy": test_accuracy})
        if not math.isfinite(val_loss):  # diverged: later steps would only propagate NaN
            trials[-1]["val_loss"] = math.inf
            break
        log_lr.grad, log_wd.grad = grad_lr, grad_wd
        outer.step()
        bar.update(1)
    return {"trials": trials, "seconds": time.perf_counter() - started}


def random_search(model: nn.Module, data: Split, args: argparse.Namespace, seed: int, bar: tqdm) -> dict[str, Any]:
    """``args.outer_steps`` configurations drawn log-uniformly per layer, each trained once."""
    layers = len(layers_of(model))
    rng = np.random.default_rng(seed)
    trials = []
    started = time.perf_counter()
    for _ in range(args.outer_steps):
        lr = np.exp(rng.uniform(*np.log(args.lr_range), size=layers)).tolist()
        wd = np.exp(rng.uniform(*np.log(args.wd_range), size=layers)).tolist()
        val_loss, test_accuracy = train_and_evaluate(model, data, lr, wd, args.inner_steps)
        trials.append({"lr": lr, "wd": wd, "val_loss": val_loss, "test_accuracy": test_accuracy})
        bar.update(1)
    return {"trials": trials, "seconds": time.perf_counter() - started}


def best_trial(trials: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The trial of lowest validation loss (the first, on ties)."""
    return min(trials, key=lambda trial: trial["val_loss"])


# ----------------------------------------------------------------------- results
def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: the chosen configuration's validation loss and test accuracy over seeds."""
    rows = []
    for method, label in (("hypergradient", "hypergradient descent (Checkpointed)"), ("random", "random search")):
        chosen = [best_trial(run[method]["trials"]) for run in runs]
        row: dict[str, Any] = {"method": method, "label": label,
                               "val_losses": [c["val_loss"] for c in chosen],
                               "test_accuracies": [c["test_accuracy"] for c in chosen],
                               "trainings": statistics.fmean(len(run[method]["trials"]) for run in runs),
                               "seconds": statistics.fmean(run[method]["seconds"] for run in runs)}
        row["val_mean"], row["val_std"] = mean_std(row["val_losses"])
        row["test_mean"], row["test_std"] = mean_std(row["test_accuracies"])
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict[str, Any]], start: dict[str, Any], caption: str) -> str:
    """The rows as a Markdown table, the starting configuration first, caption underneath."""
    lines = ["| method | validation loss (mean ± std) | test accuracy (mean ± std) | inner trainings | s / seed |",
             "|---|---|---|---|---|",
             f"| starting configuration | {start['val_mean']:.3f} ± {start['val_std']:.3f} "
             f"| {100 * start['test_mean']:.1f}% ± {100 * start['test_std']:.1f} | 1 | |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['val_mean']:.3f} ± {r['val_std']:.3f} "
                     f"| {100 * r['test_mean']:.1f}% ± {100 * r['test_std']:.1f} | {r['trainings']:g} "
                     f"| {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n\n" + caption + "\n"


def table_caption(args: argparse.Namespace, data: Split, seeds: Sequence[int]) -> str:
    """What the rows and columns mean, and the settings behind them."""
    return (
        f"Per-layer step sizes and weight decays on {args.dataset}: {len(data.y_train)} training, "
        f"{len(data.y_val)} validation and {len(data.y_test)} test examples; MLP (two ReLU layers of "
        f"{args.hidden}, three linear layers), K = {args.inner_steps} full-batch gradient steps from a fixed "
        f"θ_0 per seed. Hypergradient descent: {args.outer_steps} Adam steps (lr {args.outer_lr:g}) on the "
        f"log step sizes and log weight decays from α = {args.lr_init:g}, λ = {args.wd_init:g} for every layer, "
        f"hypergradients by mg.Checkpointed(). Random search: {args.outer_steps} draws, log-uniform per layer, "
        f"α in [{args.lr_range[0]:g}, {args.lr_range[1]:g}], λ in [{args.wd_range[0]:g}, {args.wd_range[1]:g}]. "
        "Each method's row is the configuration of lowest validation loss it trained; its test accuracy is "
        f"that training's. Mean ± standard deviation over seeds {', '.join(map(str, seeds))}; {args.dtype}; "
        f"{cpu_description()}, torch {torch.__version__}. s / seed: wall time of the method for one seed."
    )


def plot(runs: Sequence[dict[str, Any]], args: argparse.Namespace, path: str) -> None:
    """Validation loss against inner trainings (hypergradient iterates; random search's best so
    far), and the per-layer step sizes and weight decays along hypergradient descent."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=120)
    for number, run in enumerate(runs):
        label = (lambda text: text if number == 0 else None)
        hyper = [t["val_loss"] for t in run["hypergradient"]["trials"]]
        search = np.minimum.accumulate([t["val_loss"] for t in run["random"]["trials"]])
        axes[0].plot(range(1, len(hyper) + 1), hyper, color="tab:blue", alpha=0.8,
                     label=label("hypergradient descent (each iterate)"))
        axes[0].plot(range(1, len(search) + 1), search, color="tab:orange", alpha=0.8,
                     label=label("random search (best so far)"))
    axes[0].set_yscale("log")
    axes[0].set_xlabel("inner trainings")
    axes[0].set_ylabel("validation loss")
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"{args.dataset}, K = {args.inner_steps}, {len(runs)} seed{'s' if len(runs) > 1 else ''}",
                      fontsize=10)
    trials = runs[0]["hypergradient"]["trials"]
    for key, ax, title in (("lr", axes[1], "step size α_l"), ("wd", axes[2], "weight decay λ_l")):
        values = np.array([t[key] for t in trials])
        for layer in range(values.shape[1]):
            ax.plot(range(1, len(values) + 1), values[:, layer], label=f"layer {layer + 1}")
        ax.set_yscale("log")
        ax.set_xlabel("outer step")
        ax.set_title(f"{title} (seed {runs[0]['seed']})", fontsize=10)
        ax.legend(fontsize=8)
    save_figure(fig, path)


# ----------------------------------------------------------------------- plumbing
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    parser = make_parser(
        description="Per-layer weight decay and per-layer step sizes learned by hypergradient descent through "
                    "K inner training steps (mg.Checkpointed), against random search with the same number of "
                    "inner trainings; write results.md, results.json and hyperparameters.png.")
    add_data_arguments(parser, DEFAULT_SIZES)
    inner = parser.add_argument_group("inner training")
    inner.add_argument("--hidden", type=positive_int, default=128, help="units of each hidden layer")
    inner.add_argument("--inner-steps", type=positive_int, default=50, help="K, full-batch gradient steps")
    add_dtype_argument(inner, "floating-point type of every training")
    search = parser.add_argument_group("search")
    search.add_argument("--outer-steps", type=positive_int, default=30,
                        help="the budget: inner trainings per method (hypergradient steps; random draws)")
    search.add_argument("--outer-lr", type=positive_float, default=0.1,
                        help="Adam's learning rate on the log step sizes and log weight decays")
    search.add_argument("--lr-init", type=positive_float, default=0.1,
                        help="hypergradient descent: every layer's step size at the start")
    search.add_argument("--wd-init", type=positive_float, default=1e-3,
                        help="hypergradient descent: every layer's weight decay at the start")
    search.add_argument("--lr-range", type=range_argument, default=(0.01, 3.0), metavar="LOW,HIGH",
                        help="random search: the step sizes' range (log-uniform)")
    search.add_argument("--wd-range", type=range_argument, default=(1e-6, 1e-1), metavar="LOW,HIGH",
                        help="random search: the weight decays' range (log-uniform)")
    run = parser.add_argument_group("run")
    add_quick_argument(run, QUICK)
    run.add_argument("--repeats", type=positive_int, default=3,
                     help="seeds to run: --seed, --seed + 1, ... (mean ± std over them)")
    add_threads_argument(run)
    add_seed_argument(run, "first seed: of the split, θ_0 and the random search's draws")
    add_out_argument(run, "hyperparameters", "hyperparameters.png")
    add_json_argument(run, "also write the results to this file")
    args = parse_with_quick(parser, argv, QUICK)
    fill_default_sizes(args, DEFAULT_SIZES)
    args.corruption = 0.0  # load_split's label corruption: none here
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
    with tqdm(total=2 * len(seeds) * args.outer_steps, desc="inner trainings", unit="training",
              dynamic_ncols=True, mininterval=0.5, file=sys.stderr) as bar:
        for seed in seeds:
            data = load_data(args, seed, dtype)
            torch.manual_seed(seed)
            model = make_model(data.x_train.shape[1], data.classes, args.hidden).to(dtype)  # θ_0 of this seed
            layers = len(layers_of(model))
            start = train_and_evaluate(model, data, [args.lr_init] * layers, [args.wd_init] * layers,
                                       args.inner_steps)
            bar.set_postfix({"seed": seed, "method": "hypergradient"}, refresh=False)
            hyper = hypergradient_descent(model, data, args, bar)
            bar.set_postfix({"seed": seed, "method": "random search"}, refresh=False)
            search = random_search(model, data, args, seed, bar)
            runs.append({"seed": seed, "start": {"val_loss": start[0], "test_accuracy": start[1]},
                         "hypergradient": hyper, "random": search})
    assert data is not None
    rows = summarize(runs)
    start = {}
    start["val_mean"], start["val_std"] = mean_std([run["start"]["val_loss"] for run in runs])
    start["test_mean"], start["test_std"] = mean_std([run["start"]["test_accuracy"] for run in runs])
    caption = table_caption(args, data, seeds)
    table = format_table(rows, start, caption)
    wins = sum(h < r for h, r in zip(rows[0]["val_losses"], rows[1]["val_losses"]))
    table += (f"\nHypergradient descent reached a lower validation loss than random search on {wins} of "
              f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}.\n")
    write_table(args.out, "Hyperparameters: hypergradient descent vs random search", table)
    plot(runs, args, os.path.join(args.out, "hyperparameters.png"))
    results = {
        "config": vars(args),
        "machine": machine_description(cpu_description()),
        "seeds": seeds,
        "caption": caption,
        "start": start,
        "rows": rows,
        "hypergradient_wins": wins,
        "runs": runs,
        "seconds": time.perf_counter() - started,
    }
    # An infinite validation loss (a diverged random draw) is written as null: strict JSON.
    results = strict(results)
    write_results(args.out, results, "hyperparameters.png", args.json)
    return results


def strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no inf or NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


if __name__ == "__main__":
    main()
