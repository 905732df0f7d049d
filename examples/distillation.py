"""Dataset distillation: learn 10 synthetic training images (one per class) and an inner step size.

Wang et al. (2018) ask for a few synthetic images such that a network trained on them alone, from
a random initialization, does well on the real test set. Here the inner loop trains a fresh MLP
(``--hidden`` ReLU units) for K = ``--inner-steps`` (default 100) full-batch SGD steps on the
learned images, with the learned step size α, from a new random initialization at every outer
step: the model's parameters θ are never learned, they do not require grad (θ fixed, README
"Meta-parameters"). The outer loss is the cross-entropy of ``meta.fmodel`` on a batch of real
training images (``--batch``); its ``.backward()`` fills the gradient of the images and of
log α, and ``torch.optim.Adam`` (``--outer-lr``) steps on them::

    images = torch.tensor(one_real_image_per_class, requires_grad=True)
    log_lr = torch.tensor(math.log(0.1), requires_grad=True)
    outer = torch.optim.Adam([images, log_lr], lr=0.01)
    for step in range(outer_steps):
        model = make_model().requires_grad_(False)          # a fresh init, θ fixed
        outer.zero_grad()
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=log_lr.exp()),
                             estimator=mg.Checkpointed(snapshots="sqrt")) as meta:
            for _ in range(K):
                meta.step(lambda f: F.cross_entropy(f(images), labels))
            F.cross_entropy(meta.fmodel(x_batch), y_batch).backward()
        outer.step()

``--learn-labels`` learns soft labels as well (a logit vector per image, starting from the
one-hot label, the inner loss a cross-entropy against their softmax).

The estimator is ``Checkpointed(snapshots="sqrt")`` by default: it stores about √K of the K
iterates and recomputes the others during backward, so memory grows like √K instead of K
(``--estimator`` and ``--snapshots`` choose another).

After distillation, fresh models (``--eval-inits``, each a new random init, the same inits for
every row) are trained and tested on the real test set:

- on the 10 learned images, for K steps at the learned step size;
- on 10 real training images, one per class, drawn at random for each init, for K steps at the
  step size of ``LR_GRID`` with the best mean validation accuracy;
- on all the training images (full batch), the same way: a reference, not a target.

Each row gives the mean ± standard deviation of the test accuracy over the inits.

Data (``--dataset``): ``digits`` (default), scikit-learn's bundled 8×8 handwritten digits (1,797
images; no download), split at random into 1,000 training, 297 validation and 500 test images;
``fashion-mnist``, the IDX files in ``--data-root`` (default: where Debian's
dataset-fashion-mnist package puts them, ``/usr/share/datasets/fashion-mnist``), 10,000
training and 5,000 validation images drawn from the training file and 10,000 test images.
Pixels are scaled to [0, 1] and centred with the training mean.

Outputs, in the folder ``--out`` (default ``results/distillation``): ``results.md`` (the
table), ``results.json`` (configuration, machine, rows, the outer loss curve, the learned step
size and images) and ``images.png`` (the real images distillation started from, and the learned
ones). ``--json PATH`` writes the JSON to a second path too.

Run it::

    python examples/distillation.py                  # digits, about a minute and a half on 2 CPU cores
    python examples/distillation.py --quick          # seconds: a smoke test
    python examples/distillation.py --learn-labels --inner-steps 200
    python examples/distillation.py --dataset fashion-mnist --hidden 128
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
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
from cli import (WarningCounts, add_data_arguments, add_dtype_argument, add_json_argument,  # noqa: E402
                 add_out_argument, add_quick_argument, add_seed_argument, add_threads_argument, count_argument,
                 counting_warnings, cpu_description, cpu_model, fill_default_sizes, machine_description,
                 make_parser, outer_step_warning_summary, parse_with_quick, save_figure, set_threads,
                 torch_dtype, write_results, write_table)
from hypercleaning import DataError, load_fashion_mnist  # noqa: E402

#: (train, validation, test) sizes per dataset; the flags override them.
DEFAULT_SIZES = {"digits": (1000, 297, 500), "fashion-mnist": (10000, 5000, 10000)}
ESTIMATORS = ("checkpointed", "full", "truncated", "binomial")
#: The step sizes the real-image rows choose from, by mean validation accuracy.
LR_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
QUICK = {"inner_steps": 10, "outer_steps": 3, "eval_inits": 2, "batch": 64}
#: ``--snapshots``: how many iterates Checkpointed stores (an integer >= 1), ``sqrt`` or ``none``.
snapshots_argument = count_argument("sqrt", "none")


# --------------------------------------------------------------------------- data
@dataclass
class Data:
    """Real images (flattened, centred) and labels: training, validation, test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int
    shape: tuple[int, int]  # an image's height and width, for the figure
    mean: torch.Tensor  # the training mean, added back for the figure


def load_data(args: argparse.Namespace, dtype: torch.dtype) -> Data:
    """The dataset of ``args``, split and centred with the training mean."""
    rng = np.random.default_rng(args.seed)
    n_train, n_val, n_test = args.train_size, args.val_size, args.test_size
    if args.dataset == "digits":
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        images, labels = load_digits(return_X_y=True)
        images, shape = images / 16.0, (8, 8)  # the 8×8 images hold 0 … 16
        if n_train + n_val + n_test > len(images):
            raise SystemExit(f"--train-size + --val-size + --test-size = {n_train + n_val + n_test}: the digits "
                             f"data set has {len(images)} images.")
        order = rng.permutation(len(images))
        parts = np.split(order[:n_train + n_val + n_test], [n_train, n_train + n_val])
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = [(images[i], labels[i]) for i in parts]
    else:
        if not os.path.isdir(args.data_root):
            raise SystemExit(f"--dataset fashion-mnist: --data-root {args.data_root} is not a folder. Install "
                             "Debian's dataset-fashion-mnist package, or pass --data-root DIR, the folder of the "
                             "IDX files (train-images-idx3-ubyte[.gz] and the three others).")
        try:
            train_images, train_labels, test_images, test_labels = load_fashion_mnist(args.data_root)
        except DataError as error:
            raise SystemExit(str(error)) from None
        if n_train + n_val > len(train_images) or n_test > len(test_images):
            raise SystemExit(f"--train-size + --val-size = {n_train + n_val} and --test-size = {n_test}: the "
                             f"files hold {len(train_images)} training and {len(test_images)} test images.")
        side = int(round(math.sqrt(train_images.shape[1])))
        shape = (side, train_images.shape[1] // side)
        order = rng.permutation(len(train_images))
        x_tr, y_tr = train_images[order[:n_train]], train_labels[order[:n_train]]
        x_va, y_va = train_images[order[n_train:n_train + n_val]], train_labels[order[n_train:n_train + n_val]]
        pick = rng.permutation(len(test_images))[:n_test]
        x_te, y_te = test_images[pick], test_labels[pick]
    classes = int(max(y_tr.max(), y_va.max(), y_te.max())) + 1
    missing = sorted(set(range(classes)) - set(y_tr.tolist()))
    if missing:
        raise SystemExit(f"--train-size {n_train}: the training images hold no example of classes {missing}; "
                         "take more training images.")
    mean = x_tr.mean(axis=0)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    def labels_of(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).long()

    return Data(tensor(x_tr - mean), labels_of(y_tr), tensor(x_va - mean), labels_of(y_va), tensor(x_te - mean),
                labels_of(y_te), classes, shape, tensor(mean))


def one_per_class(data: Data, rng: np.random.Generator) -> torch.Tensor:
    """The indices of one training image per class, drawn at random, in class order."""
    y = data.y_train.numpy()
    return torch.tensor([int(rng.choice(np.flatnonzero(y == c))) for c in range(data.classes)])


# -------------------------------------------------------------------------- model
def make_model(data: Data, hidden: int, dtype: torch.dtype) -> nn.Module:
    """A fresh MLP (one ReLU hidden layer) from torch's default random init, with θ fixed: no
    parameter requires grad."""
    model = nn.Sequential(nn.Linear(data.x_train.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, data.classes))
    return model.to(dtype).requires_grad_(False)


def make_estimator(args: argparse.Namespace) -> mg.Estimator:
    """The estimator of ``--estimator``, with this script's parameters."""
    if args.estimator == "full":
        return mg.Full()
    if args.estimator == "checkpointed":
        return mg.Checkpointed(snapshots=args.snapshots)
    if args.estimator == "truncated":
        return mg.Truncated(steps=args.truncate_steps)
    return mg.Binomial(order=args.order, block=args.block)


def label(estimator: mg.Estimator) -> str:
    """A short name for the table, e.g. ``Checkpointed(snapshots=sqrt)``."""
    if isinstance(estimator, mg.Checkpointed) and estimator.snapshots is not None:
        return f"Checkpointed(snapshots={estimator.snapshots})"
    if isinstance(estimator, mg.Truncated):
        return f"Truncated({estimator.steps})"
    if isinstance(estimator, mg.Binomial):
        return f"Binomial({estimator.order}, block={estimator.block})"
    return type(estimator).__name__


# ------------------------------------------------------------------ distillation
@dataclass
class Distilled:
    """What distillation learned, and what it cost."""

    images: torch.Tensor  # (classes, features), centred like the real images
    targets: torch.Tensor  # class indices, or (classes, classes) probabilities with --learn-labels
    lr: float
    start: torch.Tensor  # the real images it started from
    outer_loss: list[float] = field(default_factory=list)
    ms_per_outer_step: float = 0.0
    seconds: float = 0.0
    warnings: list[dict[str, Any]] = field(default_factory=list)


def distill(data: Data, args: argparse.Namespace, dtype: torch.dtype) -> Distilled:
    """Learn the images (and soft labels) and log α by Adam on the outer loss, a fresh model per
    outer step."""
    rng = np.random.default_rng(args.seed + 1)
    start = data.x_train[one_per_class(data, rng)].clone()
    images = start.clone().requires_grad_()
    labels = torch.arange(data.classes)
    learned: list[torch.Tensor] = [images]
    label_logits = None
    if args.learn_labels:  # starts from the one-hot labels (softmax ≈ 0.93 on the class)
        label_logits = (5.0 * F.one_hot(labels, data.classes)).to(dtype).requires_grad_()
        learned.append(label_logits)
    log_lr = torch.tensor(math.log(args.lr_inner), dtype=dtype, requires_grad=True)
    outer = torch.optim.Adam([*learned, log_lr], lr=args.outer_lr)
    estimator = make_estimator(args)
    batches = torch.Generator().manual_seed(args.seed + 2)
    torch.manual_seed(args.seed + 3)  # the fresh inits of the outer steps
    result = Distilled(images, labels, args.lr_inner, start)
    seen: WarningCounts = {}
    times = []
    began = time.perf_counter()
    bar = tqdm(range(args.outer_steps), desc="distilling", unit="step", dynamic_ncols=True, mininterval=0.5,
               file=sys.stderr)
    for step in bar:
        t0 = time.perf_counter()
        model = make_model(data, args.hidden, dtype)  # a fresh init every outer step: θ fixed
        targets = labels if label_logits is None else label_logits.softmax(-1)
        batch = torch.randint(len(data.y_train), (min(args.batch, len(data.y_train)),), generator=batches)
        outer.zero_grad()
        with counting_warnings(seen):
            with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=log_lr.exp()), estimator=estimator) as meta:
                for _ in range(args.inner_steps):
                    meta.step(lambda f: F.cross_entropy(f(images), targets))
                loss = F.cross_entropy(meta.fmodel(data.x_train[batch]), data.y_train[batch])
                loss.backward()
        outer.step()
        times.append(time.perf_counter() - t0)
        result.outer_loss.append(loss.item())
        if step % 10 == 0 or step == args.outer_steps - 1:
            bar.set_postfix({"loss": f"{loss.item():.3f}", "lr": f"{log_lr.exp().item():.3f}"}, refresh=False)
    bar.close()
    result.seconds = time.perf_counter() - began
    result.ms_per_outer_step = 1000 * statistics.median(times) if times else 0.0
    result.images = images.detach()
    result.targets = labels if label_logits is None else label_logits.detach().softmax(-1)
    result.lr = log_lr.exp().item()
    result.warnings = [{"message": e["first"], "steps": e["count"], "of_steps": args.outer_steps}
                       for e in seen.values()]
    return result


# -------------------------------------------------------------------- evaluation
def train(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, lr: float, steps: int) -> dict[str, torch.Tensor]:
    """``steps`` full-batch SGD steps of size ``lr`` from the model's parameters (plain torch)."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    for _ in range(steps):
        loss = F.cross_entropy(torch.func.functional_call(model, params, (x,)), targets)
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            params = {n: (p - lr * g).requires_grad_() for (n, p), g in zip(params.items(), grads)}
    return {n: p.detach() for n, p in params.items()}


def accuracy(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (torch.func.functional_call(model, params, (x,)).argmax(-1) == y).double().mean().item()


@dataclass
class Row:
    """One training set, trained from each fresh init."""

    name: str
    images: int
    lr: float
    lr_from: str  # "learned", or "validation" (the best of LR_GRID)
    test_accuracies: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.test_accuracies)

    @property
    def std(self) -> float:
        return statistics.stdev(self.test_accuracies) if len(self.test_accuracies) > 1 else 0.0


def evaluate(data: Data, distilled: Distilled, args: argparse.Namespace, dtype: torch.dtype) -> list[Row]:
    """Fresh models trained on the learned images, on 10 real ones and on all; test accuracy each."""
    inits = []
    for i in range(args.eval_inits):
        torch.manual_seed(args.seed + 10_000 + i)
        inits.append(make_model(data, args.hidden, dtype))
    rng = np.random.default_rng(args.seed + 4)
    real_sets = [one_per_class(data, rng) for _ in inits]
    name = "learned images" + (" and soft labels" if args.learn_labels else "")
    rows = [Row(name, len(distilled.images), distilled.lr, "learned")]
    for model in inits:
        params = train(model, distilled.images, distilled.targets, distilled.lr, args.inner_steps)
        rows[0].test_accuracies.append(accuracy(model, params, data.x_test, data.y_test))

    def tuned(row_name: str, sets: Sequence[torch.Tensor]) -> Row:
        """The step size of LR_GRID with the best mean validation accuracy, then the test accuracies."""
        best: Optional[tuple[float, float, list[float]]] = None
        for lr in LR_GRID:
            val, test = [], []
            for model, index in zip(inits, sets):
                params = train(model, data.x_train[index], data.y_train[index], lr, args.inner_steps)
                val.append(accuracy(model, params, data.x_val, data.y_val))
                test.append(accuracy(model, params, data.x_test, data.y_test))
            if best is None or statistics.fmean(val) > best[0]:
                best = (statistics.fmean(val), lr, test)
        assert best is not None
        return Row(row_name, len(sets[0]), best[1], "validation", best[2])

    everything = torch.arange(len(data.y_train))
    rows.append(tuned("real images, one per class at random", real_sets))
    rows.append(tuned("all training images (reference)", [everything] * len(inits)))
    return rows


# ------------------------------------------------------------------------ output
def format_table(rows: Sequence[Row], caption: str) -> str:
    """The results as a Markdown table, caption underneath."""
    lines = ["| trained on | images | step size | test accuracy (mean ± std) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.images} | {r.lr:.3g} ({r.lr_from}) "
                     f"| {100 * r.mean:.1f}% ± {100 * r.std:.1f} |")
    return "\n".join(lines) + "\n\n" + caption + "\n"


def table_caption(args: argparse.Namespace, data: Data, distilled: Distilled, estimator: str) -> str:
    """What the rows mean, and the settings behind them."""
    labels = " and soft labels" if args.learn_labels else ""
    return (
        f"Dataset distillation on {args.dataset}: {data.classes} learned images{labels} (one per class, starting "
        f"from real training images) and a learned inner step size (from {args.lr_inner:g}), {args.outer_steps} "
        f"Adam steps (lr {args.outer_lr:g}) on the cross-entropy of batches of {args.batch} real training images "
        f"after K = {args.inner_steps} SGD steps of a fresh MLP ({args.hidden} ReLU hidden units, a new random init "
        f"every outer step, θ fixed), estimator {estimator}; {args.dtype}, {cpu_description()}, seed "
        f"{args.seed}; {distilled.ms_per_outer_step:.0f} ms per outer step (median). Test accuracy on "
        f"{len(data.y_test)} test images of {args.eval_inits} fresh inits, each trained K full-batch SGD steps; "
        f"the real-image rows at the step size of {list(LR_GRID)} with the best mean accuracy on "
        f"{len(data.y_val)} validation images, the one-per-class images drawn anew for each init."
    )


def plot_images(data: Data, distilled: Distilled, rows: Sequence[Row], path: str) -> None:
    """The real images distillation started from (top) and the learned ones (bottom)."""
    classes = data.classes
    fig, axes = plt.subplots(2, classes, figsize=(1.3 * classes, 3.2), dpi=120, squeeze=False)
    for c in range(classes):
        for r, (images, title) in enumerate([(distilled.start, "start"), (distilled.images, "learned")]):
            ax = axes[r][c]
            ax.imshow((images[c] + data.mean).reshape(data.shape).double().numpy(), cmap="gray_r")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 1 and distilled.targets.dim() == 2:  # soft labels: the two largest
                top = distilled.targets[c].topk(2)
                ax.set_xlabel(" ".join(f"{int(i)}:{v:.2f}" for v, i in zip(top.values, top.indices)), fontsize=6)
            else:
                ax.set_xlabel(str(c), fontsize=8)
            if c == 0:
                ax.set_ylabel(title, fontsize=9)
    learned = rows[0]
    fig.suptitle(f"{learned.name}: {100 * learned.mean:.1f}% ± {100 * learned.std:.1f} test accuracy "
                 f"(α = {distilled.lr:.3g}); real images: {100 * rows[1].mean:.1f}% ± {100 * rows[1].std:.1f}",
                 fontsize=9)
    save_figure(fig, path)


# --------------------------------------------------------------------- plumbing
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    parser = make_parser(
        description="Dataset distillation (Wang et al. 2018): learn one synthetic training image per class "
                    "(and optionally soft labels) and the inner step size, so that a fresh MLP trained on them "
                    "alone for K SGD steps does well on the real test set; θ fixed, a new random init every "
                    "outer step. Prints the test accuracy of fresh models trained on the learned images, on real "
                    "images and on the whole training set, and writes results.md, results.json and images.png.",
    )
    add_data_arguments(parser, DEFAULT_SIZES, size_type=int,
                       what=("training images", "validation images, for the real-image rows' step size",
                             "test images"))
    loop = parser.add_argument_group("inner and outer loop")
    loop.add_argument("--hidden", type=int, default=64, help="the MLP's ReLU hidden units")
    loop.add_argument("--inner-steps", type=int, default=100, help="K, inner SGD steps on the learned images")
    loop.add_argument("--lr-inner", type=float, default=0.1, help="α at the start; it is learned (as log α)")
    loop.add_argument("--learn-labels", action="store_true",
                      help="learn a soft label per image too (logits from the one-hot label)")
    loop.add_argument("--outer-steps", type=int, default=300, help="Adam steps on the images and log α")
    loop.add_argument("--outer-lr", type=float, default=0.01, help="Adam's learning rate")
    loop.add_argument("--batch", type=int, default=256, help="real training images per outer loss")
    add_dtype_argument(loop, "floating-point type of every run")
    est = parser.add_argument_group("estimator")
    est.add_argument("--estimator", choices=ESTIMATORS, default="checkpointed", help="the meta-gradient estimator")
    est.add_argument("--snapshots", type=snapshots_argument, default="sqrt",
                     help="checkpointed: store only this many iterates (an integer, or 'sqrt': about √K) and "
                          "recompute the others during backward; 'none': store every iterate")
    est.add_argument("--truncate-steps", type=int, default=20, help="truncated: T, the last inner steps differentiated")
    est.add_argument("--order", type=int, default=3, help="binomial: the order L")
    est.add_argument("--block", type=int, default=10, help="binomial: the block size S (blocks chained exactly)")
    run = parser.add_argument_group("run")
    add_quick_argument(run, QUICK)
    run.add_argument("--eval-inits", type=int, default=10,
                     help="fresh inits each training set is trained from (mean ± std over them)")
    add_threads_argument(run)
    add_seed_argument(run, "seed of the split, the starting images, the inits and the batches")
    add_out_argument(run, "distillation", "images.png")
    add_json_argument(run, "also write results.json to this path")
    args = parse_with_quick(parser, argv, QUICK)
    fill_default_sizes(args, DEFAULT_SIZES)
    for name in ("train_size", "val_size", "test_size", "hidden", "inner_steps", "batch", "eval_inits",
                 "order", "block", "truncate_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.outer_steps < 0:
        parser.error(f"--outer-steps must be >= 0, got {args.outer_steps}")
    for name in ("lr_inner", "outer_lr"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the experiment; return what was written to results.json."""
    args = parse_args(argv)
    set_threads(args.threads)
    dtype = torch_dtype(args.dtype)
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    data = load_data(args, dtype)
    estimator = label(make_estimator(args))
    distilled = distill(data, args, dtype)
    rows = evaluate(data, distilled, args, dtype)

    caption = table_caption(args, data, distilled, estimator)
    table = format_table(rows, caption)
    notes = "\n".join(outer_step_warning_summary(distilled.warnings, estimator))
    if notes:
        table += "\n" + notes + "\n"
    write_table(args.out, "Dataset distillation", table)
    plot_images(data, distilled, rows, os.path.join(args.out, "images.png"))
    results = {
        "config": vars(args),
        "machine": machine_description(cpu_description(), cpu=cpu_model(), cores=os.cpu_count()),
        "data": {"train": len(data.y_train), "val": len(data.y_val), "test": len(data.y_test),
                 "classes": data.classes, "image_shape": list(data.shape)},
        "estimator": estimator,
        "caption": caption,
        "rows": [{**asdict(r), "test_accuracy_mean": r.mean, "test_accuracy_std": r.std} for r in rows],
        "learned_lr": distilled.lr,
        "outer_loss": distilled.outer_loss,
        "ms_per_outer_step": distilled.ms_per_outer_step,
        "distillation_seconds": distilled.seconds,
        "warnings": distilled.warnings,
        "images": distilled.images.tolist(),
        "labels": distilled.targets.tolist(),
        "seconds": time.perf_counter() - started,
    }
    write_results(args.out, results, "images.png", args.json)
    return results


if __name__ == "__main__":
    main()
