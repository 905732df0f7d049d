"""Data hyper-cleaning, the standard bilevel benchmark, once per meta-gradient estimator.

Half of the training labels are corrupted: each corrupted example's label is replaced
by a class drawn uniformly among the other classes. Corrupting half the training set
follows the hyper-cleaning setup of Franceschi et al. (ICML 2017: 2,500 of 5,000 MNIST
training examples), which Shaban et al. (AISTATS 2019) reuse; ``--corruption`` changes
the fraction. Every training example i gets a weight ``σ(w_i)``; ``w`` is one tensor with
``requires_grad=True``, initialized to 0 (every weight 0.5: nothing is presumed clean or
corrupted, and an example counts as flagged once its weight has fallen below that).

The inner loop trains a classifier (a linear softmax model; ``--model mlp`` for a
one-hidden-layer ReLU net) from the same initialization θ_0 at every outer step: K =
``--inner-steps`` (default 100) plain SGD steps of size α = ``--lr-inner`` on the weighted
training loss

    (σ(w) * F.cross_entropy(f(x_train), y_train, reduction="none")).mean()

written as a closure that captures ``w``:
``meta.step(lambda f: weighted_loss(f, w, x_train, y_train))``. The outer loss is the
cross-entropy of ``meta.fmodel`` on a clean validation set; its ``.backward()`` fills
``w.grad`` (the gradient with respect to a tensor the closure captures, MATH.md "Meta-parameters
other than θ"), and Adam (``--outer-lr``) steps on ``w``. θ_0 itself is never trained.

The script runs this once per estimator (``--estimators``; default Full, Checkpointed,
Truncated(20), Binomial(3, block=10)), each from the same θ_0 and w = 0, and prints one row
per estimator:

- test accuracy of the classifier trained (the same K inner steps from θ_0) on the
  corrupted training set with the learned weights σ(w), beside two baselines computed once:
  uniform weights (plain training on the corrupted set) and a clean-only oracle (trained on the
  uncorrupted training examples only);
- precision, recall and F1 of flagging the corrupted examples, an example being flagged when
  its learned weight σ(w_i) is below 0.5;
- the hypergradient error at the first outer step (θ_0, w = 0): ``‖g − g_Full‖ / ‖g_Full‖``
  for w's gradient, computed in float64 whatever ``--dtype`` trains in;
- the median wall time of an outer step (inner loop, hypergradient, Adam step).

Long inner loops (``--snapshots sqrt`` or ``--snapshots S``): Checkpointed stores only about
√K (or S) of the K iterates and recomputes the others during backward (MATH.md, "Replaying a
step"), and the blocked Binomial stores one iterate per block. The script then also measures, at
the first outer step, one hypergradient of Full, Checkpointed, Checkpointed with snapshots and
the blocked Binomial with and without them: wall time, peak memory
(:func:`metagrad.memory.peak_memory`: on the CPU the process's resident memory, an
approximation, see its docstring), and the exact bytes of the iterates held at once and the
steps recomputed (``meta.info``)::

    python examples/hypercleaning.py --inner-steps 1000 --outer-steps 5 --estimators checkpointed \
        binomial --snapshots sqrt

Binomial is blocked by default: at K = 100 and α = 1, K·α·ℓ is about 7 (ℓ the largest
|eigenvalue| of the inner Hessians, MATH.md), past where one expansion of all K steps converges;
blocks of 10 steps are at about 0.7. ``--order auto --block auto`` lets Binomial choose both.

An estimator that does not give a gradient with respect to a captured tensor (it raises, or
leaves ``w.grad`` None without saying so) is reported as "not supported: <why>" and the run
continues. Meta-training runs in float32 by default (``--dtype``); the first-step
hypergradient comparison is always float64.

Data (``--dataset``):

- ``digits`` (default): scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10
  classes; no download), split at random into 1,000 training, 300 validation and 497 test
  images;
- ``fashion-mnist``: the standard IDX files (``train-images-idx3-ubyte.gz``,
  ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``,
  gzipped or not) in ``--data-root``; training and validation images are drawn from the
  training file, test images from the t10k file (default 5,000 / 5,000 / 10,000, the sizes of
  Franceschi et al.'s MNIST experiment).

``--train-size``, ``--val-size`` and ``--test-size`` take subsets. Pixels are scaled to
[0, 1] and centred with the training set's mean.

Outputs, in the folder ``--out`` (default ``results/hypercleaning``): ``results.json`` (the
configuration, the baselines, one row per estimator with its validation-loss curve and its
counted warnings), ``results.md`` (the table) and ``weights.png`` (one panel per estimator:
histograms of the learned weights of the clean and of the corrupted training examples).

Run it::

    python examples/hypercleaning.py                         # digits, a few minutes on 2 CPU cores
    python examples/hypercleaning.py --quick                 # seconds: a smoke test
    python examples/hypercleaning.py --estimators full checkpointed first_order implicit
    python examples/hypercleaning.py --dataset fashion-mnist --data-root ~/data/fashion-mnist \\
        --outer-steps 300 --model mlp
"""

from __future__ import annotations

import argparse
import copy
import gzip
import math
import os
import statistics
import struct
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import matplotlib

matplotlib.use("Agg")  # render to a file; no display is needed or assumed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import metagrad as mg  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cli beside this file
from cli import (WarningCounts, add_data_arguments, add_dtype_argument, add_out_argument,  # noqa: E402
                 add_quick_argument, add_seed_argument, add_threads_argument, count_argument, counting_warnings,
                 cpu_description, fill_default_sizes, machine_description, make_parser, order_argument,
                 outer_step_warning_summary, parse_with_quick, save_figure, set_threads, torch_dtype,
                 write_results, write_table)

ESTIMATORS = ("full", "checkpointed", "truncated", "binomial", "first_order", "implicit")
DEFAULT_ESTIMATORS = ("full", "checkpointed", "truncated", "binomial")
#: (train, validation, test) sizes per dataset; the flags override them.
DEFAULT_SIZES = {"digits": (1000, 300, 497), "fashion-mnist": (5000, 5000, 10000)}
QUICK = {"train_size": 200, "val_size": 100, "test_size": 200, "inner_steps": 20, "outer_steps": 4,
         "truncate_steps": 5}
#: Errors by which an estimator says it cannot differentiate a captured tensor.
UNSUPPORTED = (NotImplementedError, TypeError, ValueError)
#: A metagrad warning that says one of these explains a None ``w.grad``: the estimate is zero.
ZERO_GRADIENT_PHRASES = ("meta-parameter", "no gradient", "zero")
IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


# --------------------------------------------------------------------------- data
@dataclass
class Split:
    """The hyper-cleaning data: a training set with corrupted labels, clean validation and test sets."""

    x_train: torch.Tensor
    y_train: torch.Tensor  # labels as given to the inner loop, half of them corrupted
    y_train_clean: torch.Tensor
    corrupted: torch.Tensor  # bool, True where y_train != y_train_clean
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int

    def to(self, dtype: torch.dtype) -> "Split":
        """The same split with its inputs in ``dtype``."""
        return Split(self.x_train.to(dtype), self.y_train, self.y_train_clean, self.corrupted,
                     self.x_val.to(dtype), self.y_val, self.x_test.to(dtype), self.y_test, self.classes)


class DataError(RuntimeError):
    """A dataset file is missing or malformed."""


def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format; gzipped or not) as a numpy array of unsigned bytes."""
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()!r}, "
                        "expected 00000801, 00000803 or similar).")
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes), "
                        f"found {body.size} bytes.")
    return body.reshape(shape)


def find_idx(root: str, name: str) -> str:
    """``root/name.gz`` or ``root/name``; else a DataError that lists what was looked for."""
    for candidate in (name + ".gz", name):
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    raise DataError(f"--data-root {root}: found neither {name}.gz nor {name}. Fashion-MNIST needs "
                    f"{', '.join(n + '[.gz]' for n in IDX_FILES.values())} in that folder.")


def load_fashion_mnist(root: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training images and labels, test images and labels; images flattened, scaled to [0, 1]."""
    arrays = {key: read_idx(find_idx(root, name)) for key, name in IDX_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"--data-root {root}: {split} images of shape {images.shape} and labels of "
                            f"shape {labels.shape}; expected (N, rows, cols) and (N,).")
    flat = {k: (v.reshape(len(v), -1).astype(np.float64) / 255.0 if "images" in k else v.astype(np.int64))
            for k, v in arrays.items()}
    return flat["train_images"], flat["train_labels"], flat["test_images"], flat["test_labels"]


def corrupt_labels(labels: np.ndarray, fraction: float, classes: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Replace the labels of ``round(fraction · N)`` examples, chosen at random, by a class drawn
    uniformly among the other ``classes − 1``; return the new labels and the corrupted mask."""
    count = int(round(fraction * len(labels)))
    mask = np.zeros(len(labels), dtype=bool)
    mask[rng.choice(len(labels), size=count, replace=False)] = True
    noisy = labels.copy()
    noisy[mask] = (labels[mask] + rng.integers(1, classes, size=count)) % classes  # never the true class
    return noisy, mask


def load_split(args: argparse.Namespace) -> Split:
    """The dataset of ``args``, split, centred, with ``args.corruption`` of its training labels corrupted."""
    rng = np.random.default_rng(args.seed)
    n_train, n_val, n_test = args.train_size, args.val_size, args.test_size
    if args.dataset == "digits":
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        images, labels = load_digits(return_X_y=True)
        images = images / 16.0  # the 8×8 images hold 0 … 16
        if n_train + n_val + n_test > len(images):
            raise SystemExit(f"--train-size + --val-size + --test-size = {n_train + n_val + n_test}: the digits "
                             f"data set has {len(images)} images.")
        order = rng.permutation(len(images))
        parts = np.split(order[:n_train + n_val + n_test], [n_train, n_train + n_val])
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = [(images[i], labels[i]) for i in parts]
    else:
        if args.data_root is None:
            raise SystemExit("--dataset fashion-mnist needs --data-root DIR, the folder of the IDX files "
                             f"({', '.join(n + '[.gz]' for n in IDX_FILES.values())}).")
        train_images, train_labels, test_images, test_labels = load_fashion_mnist(args.data_root)
        if n_train + n_val > len(train_images) or n_test > len(test_images):
            raise SystemExit(f"--train-size + --val-size = {n_train + n_val} and --test-size = {n_test}: the "
                             f"files hold {len(train_images)} training and {len(test_images)} test images.")
        order = rng.permutation(len(train_images))
        x_tr, y_tr = train_images[order[:n_train]], train_labels[order[:n_train]]
        x_va, y_va = train_images[order[n_train:n_train + n_val]], train_labels[order[n_train:n_train + n_val]]
        pick = rng.permutation(len(test_images))[:n_test]
        x_te, y_te = test_images[pick], test_labels[pick]
    classes = int(max(y_tr.max(), y_va.max(), y_te.max())) + 1
    mean = x_tr.mean(axis=0)
    noisy, mask = corrupt_labels(y_tr, args.corruption, classes, rng)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    return Split(tensor(x_tr - mean), tensor(noisy), tensor(y_tr), tensor(mask), tensor(x_va - mean), tensor(y_va),
                 tensor(x_te - mean), tensor(y_te), classes)


#: ``--snapshots``: how many iterates Checkpointed stores (an integer >= 1), ``sqrt`` or ``none``.
snapshots_argument = count_argument("sqrt", "none")
#: ``--block``: a block size (an integer >= 1), ``none`` or ``auto``.
block_argument = count_argument("none", "auto")


# -------------------------------------------------------------------------- model
def make_model(features: int, classes: int, kind: str, hidden: int) -> nn.Module:
    """A linear softmax classifier, or (``kind="mlp"``) one ReLU hidden layer of ``hidden`` units."""
    if kind == "linear":
        return nn.Linear(features, classes)
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def make_estimator(name: str, args: argparse.Namespace) -> mg.Estimator:
    """The estimator called ``name``, with this script's parameters."""
    if name == "full":
        return mg.Full()
    if name == "checkpointed":
        return mg.Checkpointed(snapshots=args.snapshots)
    if name == "truncated":
        return mg.Truncated(steps=args.truncate_steps)
    if name == "binomial":
        return mg.Binomial(order=args.order, block=args.block, snapshots=binomial_snapshots(args))
    if name == "first_order":
        return mg.FirstOrder()
    if name == "implicit":
        return mg.Implicit(reg=args.reg)
    raise ValueError(f"unknown estimator {name!r}; choose from {ESTIMATORS}")


def binomial_snapshots(args: argparse.Namespace) -> bool:
    """With ``--snapshots``, the blocked Binomial stores one iterate per block (it needs an
    integer order and block; otherwise it stores them all)."""
    return args.snapshots is not None and isinstance(args.block, int) and args.order != "auto"


def label(estimator: mg.Estimator) -> str:
    """A short name for tables and plots, e.g. ``Truncated(20)``, ``Binomial(3, block=10)``."""
    if isinstance(estimator, mg.Truncated):
        return f"Truncated({estimator.steps})"
    if isinstance(estimator, mg.Binomial):
        block = "" if estimator.block is None else f", block={estimator.block}"
        snapshots = ", snapshots" if estimator.snapshots else ""
        return f"Binomial({estimator.order}{block}{snapshots})"
    if isinstance(estimator, mg.Checkpointed) and estimator.snapshots is not None:
        return f"Checkpointed(snapshots={estimator.snapshots})"
    if isinstance(estimator, mg.Implicit):
        return f"Implicit(reg={estimator.reg:g})"
    return type(estimator).__name__


# ------------------------------------------------------------------ hyper-cleaning
def weighted_loss(fmodel: Any, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The inner loss: each training example's cross-entropy weighted by σ(w_i), averaged."""
    return (torch.sigmoid(w) * F.cross_entropy(fmodel(x), y, reduction="none")).mean()


class NotSupported(Exception):
    """The estimator gives no gradient with respect to a tensor the inner closure captures."""


def describe(error: BaseException) -> str:
    """``Type: message (file:line)``, the line being where it was raised, so that a deliberate
    refusal can be told from a bug."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" ({os.path.relpath(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def hypergradient(model: nn.Module, estimator: mg.Estimator, data: Split, w: torch.Tensor, steps: int,
                  lr_inner: float, warnings_seen: Optional[WarningCounts] = None,
                  info: Optional[dict[str, Any]] = None) -> tuple[float, torch.Tensor]:
    """One outer step's validation loss and ``w``'s gradient, left in ``w.grad`` (and, in
    ``info``, the estimator's ``meta.info``).

    K inner steps from the model's parameters θ_0 on the σ(w)-weighted training loss, then the
    validation cross-entropy of ``meta.fmodel``, backpropagated. θ_0's own ``.grad`` is discarded
    (θ_0 is not trained here). Raises :class:`NotSupported` when the estimator raises one of
    ``UNSUPPORTED`` or a metagrad error, or leaves ``w.grad`` None; a None after a metagrad
    warning about it (FirstOrder: a tensor that only the inner loss uses gets no gradient through
    the inner loop, MATH.md "Meta-parameters other than θ") counts as zero.
    """
    w.grad = None
    seen: WarningCounts = {}
    try:
        with counting_warnings(seen), \
                mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr_inner), estimator=estimator) as meta:
            for _ in range(steps):
                # Captures w: the meta-parameter. Rebuilding estimators call it again during
                # backward; it reads nothing else that changes inside this block.
                meta.step(lambda fmodel: weighted_loss(fmodel, w, data.x_train, data.y_train))
            loss = F.cross_entropy(meta.fmodel(data.x_val), data.y_val)
            loss.backward()
        if info is not None:
            info.update(meta.info)
    except UNSUPPORTED as error:
        raise NotSupported(describe(error)) from error
    except Exception as error:  # noqa: BLE001 -- only metagrad's own errors are a verdict on support
        if type(error).__module__.split(".")[0] != "metagrad":
            raise
        raise NotSupported(describe(error)) from error
    finally:
        model.zero_grad(set_to_none=True)
        if warnings_seen is not None:
            for kind, entry in seen.items():
                total = warnings_seen.setdefault(kind, {"count": 0, "first": entry["first"]})
                total["count"] += entry["count"]
    if w.grad is None:
        said_so = [e["first"] for e in seen.values()
                   if any(phrase in e["first"].lower() for phrase in ZERO_GRADIENT_PHRASES)]
        if not said_so:
            raise NotSupported("w.grad is None after .backward(): this estimator did not propagate the "
                               "meta-gradient to a tensor the inner closure captures")
        w.grad = torch.zeros_like(w)  # the estimator said so: zero through the inner loop
    return loss.item(), w.grad


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                     steps: int, lr: float) -> dict[str, torch.Tensor]:
    """The inner loop without metagrad: ``steps`` SGD steps from the model's parameters on
    ``(weights · cross-entropy).mean()``; returns the trained parameters."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    weights = weights.detach()
    for _ in range(steps):
        logits = torch.func.functional_call(model, params, (x,))
        loss = (weights * F.cross_entropy(logits, y, reduction="none")).mean()
        grads = torch.autograd.grad(loss, list(params.values()))
        params = {n: (p - lr * g).detach().requires_grad_(True) for (n, p), g in zip(params.items(), grads)}
    return {n: p.detach() for n, p in params.items()}


def accuracy(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of ``x`` classified as ``y`` by the model at ``params``."""
    with torch.no_grad():
        return (torch.func.functional_call(model, params, (x,)).argmax(dim=1) == y).double().mean().item()


def flag_scores(weights: torch.Tensor, corrupted: torch.Tensor) -> dict[str, Any]:
    """Precision, recall and F1 of flagging an example as corrupted when its weight is below 0.5.

    Precision is NaN when nothing is flagged (it is 0/0), and F1 is then 0."""
    flagged = weights < 0.5
    true_positives = int((flagged & corrupted).sum())
    flagged_count, corrupted_count = int(flagged.sum()), int(corrupted.sum())
    precision = true_positives / flagged_count if flagged_count else math.nan
    recall = true_positives / corrupted_count if corrupted_count else math.nan
    f1 = (2 * true_positives / (flagged_count + corrupted_count)) if flagged_count + corrupted_count else math.nan
    return {"precision": precision, "recall": recall, "f1": f1, "flagged": flagged_count}


# ---------------------------------------------------------------------- results
@dataclass
class Row:
    """One estimator's line of the table."""

    name: str
    estimator: str
    supported: bool = True
    message: str = ""
    test_accuracy: Optional[float] = None
    precision: Optional[float] = None
    recall: Optional[float] = None
    f1: Optional[float] = None
    flagged: Optional[int] = None
    hypergradient_error: Optional[float] = None
    ms_per_outer_step: Optional[float] = None
    val_loss: list[float] = field(default_factory=list)
    #: the estimator's warnings: {"phase", "message" (the first), "steps" (warned on), "of_steps"}
    warnings: list[dict[str, Any]] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # σ(w) after training


def first_step_hypergradients(init: nn.Module, names: Sequence[str], data: Split, args: argparse.Namespace,
                              ) -> dict[str, Union[torch.Tensor, str]]:
    """Each estimator's w-gradient at the first outer step (θ_0, w = 0), in float64, or why it has none."""
    model = copy.deepcopy(init).double()
    data = data.to(torch.float64)
    out: dict[str, Union[torch.Tensor, str]] = {}
    for name in tqdm(names, desc="first-step hypergradients (float64)", unit="est", dynamic_ncols=True,
                     file=sys.stderr, leave=False):
        w = torch.zeros(len(data.y_train), dtype=torch.float64, requires_grad=True)
        try:
            _, grad = hypergradient(model, make_estimator(name, args), data, w, args.inner_steps, args.lr_inner)
            out[name] = grad.clone()
        except NotSupported as why:
            out[name] = str(why)
    return out


def memory_comparison(init: nn.Module, data: Split, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--snapshots``: one hypergradient at the first outer step (θ_0, w = 0, ``--dtype``) per
    configuration, with its wall time, peak memory (:func:`metagrad.memory.peak_memory`), the
    bytes of the iterates held at once and the steps recomputed (``meta.info``), and its
    distance to Full's."""
    block = args.block if isinstance(args.block, int) else 10
    order = args.order if args.order != "auto" else 3
    configs = [mg.Full(), mg.Checkpointed(), mg.Checkpointed(snapshots=args.snapshots),
               mg.Binomial(order, block=block), mg.Binomial(order, block=block, snapshots=True)]
    rows, reference = [], None
    for estimator in configs:
        model = copy.deepcopy(init)
        w = torch.zeros(len(data.y_train), dtype=data.x_train.dtype, requires_grad=True)
        info: dict[str, Any] = {}
        with counting_warnings({}), mg.memory.peak_memory("cpu") as memory:
            started = time.perf_counter()
            _, grad = hypergradient(model, estimator, data, w, args.inner_steps, args.lr_inner, info=info)
            seconds = time.perf_counter() - started
        reference = grad.clone() if reference is None else reference
        rows.append({"estimator": label(estimator), "seconds": seconds, "peak_mib": memory.peak_bytes / 2**20,
                     "iterate_mib": info.get("peak_iterate_bytes", 0) / 2**20,
                     "stored_iterates": info.get("stored_iterates"), "recomputed_steps": info.get("recomputed_steps"),
                     "error_vs_full": (torch.linalg.vector_norm(grad - reference)
                                       / torch.linalg.vector_norm(reference)).item(),
                     "memory_method": memory.method})
    return rows


def format_memory_table(rows: Sequence[dict[str, Any]], args: argparse.Namespace) -> str:
    """The ``--snapshots`` comparison as a Markdown table, with what its columns measure."""
    lines = ["| estimator | time (s) | peak memory (MiB) | iterates held at once (MiB) | stored iterates "
             "| recomputed steps | error vs Full |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['estimator']} | {r['seconds']:.2f} | {r['peak_mib']:.1f} | {r['iterate_mib']:.2f} "
                     f"| {r['stored_iterates']} | {r['recomputed_steps']} | {r['error_vs_full']:.1e} |")
    return ("\n".join(lines) + f"\n\nOne hypergradient at the first outer step, K = {args.inner_steps}, {args.dtype}, "
            f"{cpu_description()}. Peak memory: {mg.memory.peak_memory('cpu').description}. Iterates held "
            "at once: the exact bytes of the stored and recomputed iterates at their peak (meta.info).\n")


def clean(init: nn.Module, name: str, data: Split, args: argparse.Namespace, row: Row) -> torch.Tensor:
    """Learn the weights with ``name``'s hypergradients; fill ``row``; return σ(w)."""
    estimator = make_estimator(name, args)
    model = copy.deepcopy(init)  # the same θ_0 for every estimator
    w = torch.zeros(len(data.y_train), dtype=data.x_train.dtype, requires_grad=True)
    outer = torch.optim.Adam([w], lr=args.outer_lr)
    seen: WarningCounts = {}
    times = []
    bar = tqdm(range(args.outer_steps), desc=f"{row.estimator:>20}", unit="step", dynamic_ncols=True,
               mininterval=0.5, file=sys.stderr)
    for step in bar:
        start = time.perf_counter()
        val_loss, _ = hypergradient(model, estimator, data, w, args.inner_steps, args.lr_inner, seen)
        outer.step()
        times.append(time.perf_counter() - start)
        row.val_loss.append(val_loss)
        if step % 10 == 0 or step == args.outer_steps - 1:
            bar.set_postfix({"val_loss": f"{val_loss:.3f}"}, refresh=False)
    bar.close()
    row.ms_per_outer_step = 1000 * statistics.median(times)
    row.warnings = [{"phase": "outer steps", "message": e["first"], "steps": e["count"], "of_steps": args.outer_steps}
                    for e in seen.values()]
    return torch.sigmoid(w.detach())


def evaluate(init: nn.Module, data: Split, weights: torch.Tensor, args: argparse.Namespace) -> float:
    """Test accuracy after the inner loop (K steps from θ_0) on the training set with ``weights``."""
    params = train_classifier(init, data.x_train, data.y_train, weights, args.inner_steps, args.lr_inner)
    return accuracy(init, params, data.x_test, data.y_test)


def format_table(rows: Sequence[Row], baselines: dict[str, float], caption: str) -> str:
    """The results as a Markdown table, caption underneath."""

    def fmt(value: Optional[float], spec: str) -> str:
        return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    lines = ["| estimator | test accuracy | precision | recall | F1 | hypergradient error vs Full (1st step) "
             "| ms / outer step (median) |", "|" + "---|" * 7]
    lines.append(f"| uniform weights | {100 * baselines['uniform']:.1f}% | | | | | |")
    lines.append(f"| clean-only oracle | {100 * baselines['oracle']:.1f}% | | | | | |")
    for r in rows:
        if not r.supported:
            lines.append(f"| {r.estimator} | not supported: {r.message} | | | | | |")
            continue
        lines.append(f"| {r.estimator} | {fmt(None if r.test_accuracy is None else 100 * r.test_accuracy, '.1f')}% "
                     f"| {fmt(r.precision, '.3f')} | {fmt(r.recall, '.3f')} | {fmt(r.f1, '.3f')} "
                     f"| {fmt(r.hypergradient_error, '.2e')} | {fmt(r.ms_per_outer_step, '.1f')} |")
    return "\n".join(lines) + "\n\n" + caption + "\n"


def table_caption(args: argparse.Namespace, data: Split) -> str:
    """What the columns mean, and the settings behind them."""
    model = "linear softmax model" if args.model == "linear" else f"MLP ({args.hidden} ReLU hidden units)"
    return (
        f"Data hyper-cleaning on {args.dataset}: {len(data.y_train)} training examples, "
        f"{int(data.corrupted.sum())} of them ({args.corruption:.0%}) with a uniformly random wrong label; "
        f"{len(data.y_val)} clean validation and {len(data.y_test)} test examples. {model}, K = "
        f"{args.inner_steps} inner SGD steps of α = {args.lr_inner} from one fixed θ_0, weights σ(w) with w = 0 "
        f"at the start, {args.outer_steps} Adam steps on w (lr {args.outer_lr}); {args.dtype}, "
        f"{cpu_description()}, seed {args.seed}. Test accuracy: the classifier trained by the same inner "
        "loop with the learned weights (uniform weights: plain training on the corrupted set; oracle: plain "
        "training on its clean examples only). Precision, recall, F1: flagging an example as corrupted when "
        "σ(w_i) < 0.5 (precision —: nothing flagged). Hypergradient error: ‖g − g_Full‖/‖g_Full‖ for w's "
        "gradient at the first outer step (θ_0, w = 0), float64. Time: median wall time of an outer step "
        "(inner loop, hypergradient, Adam step)."
    )


def implicit_note(rows: Sequence[Row], args: argparse.Namespace) -> str:
    """Say what Implicit's row measures: its inner problem is not the others'."""
    if not any(r.name == "implicit" and r.supported for r in rows):
        return ""
    return (f"Note: Implicit (reg = {args.reg:g}) learns the weights on a different inner problem, the weighted "
            "loss plus (reg/2)‖φ − θ_0‖², and takes its K steps to have converged on it; its hypergradient error "
            "against Full measures that difference as well as the approximation. Its test accuracy uses the "
            "same plain inner loop as every other row.")


def warning_notes(rows: Sequence[Row]) -> str:
    """One line per estimator and kind of warning, counted over the outer steps."""
    return "\n".join(line for r in rows for line in outer_step_warning_summary(r.warnings, r.estimator))


def plot_weights(rows: Sequence[Row], corrupted: torch.Tensor, path: str) -> None:
    """One panel per estimator: histograms of σ(w) of the clean and of the corrupted examples."""
    trained = [r for r in rows if r.supported and r.weights]
    panels = max(1, len(trained))
    fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.2), dpi=120, squeeze=False, sharey=True)
    bins = np.linspace(0.0, 1.0, 41)
    mask = corrupted.numpy()
    for ax, r in zip(axes[0], trained):
        weights = np.asarray(r.weights)
        ax.hist(weights[~mask], bins=bins, alpha=0.6, color="tab:blue", label="clean")
        ax.hist(weights[mask], bins=bins, alpha=0.6, color="tab:red", label="corrupted")
        ax.axvline(0.5, color="gray", linestyle=":", linewidth=1)
        f1 = "—" if r.f1 is None or math.isnan(r.f1) else f"{r.f1:.2f}"
        ax.set_title(f"{r.estimator}\nF1 {f1}", fontsize=9)
        ax.set_xlabel("learned weight σ(w_i)")
    if not trained:
        axes[0][0].text(0.5, 0.5, "no estimator gave a hypergradient", ha="center", va="center")
    axes[0][0].set_ylabel("training examples")
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)


# --------------------------------------------------------------------- plumbing
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    parser = make_parser(
        description="Data hyper-cleaning (Franceschi et al. 2017; Shaban et al. 2019): learn a weight σ(w_i) per "
                    "training example, half of whose labels are corrupted, by hypergradient descent through K "
                    "inner SGD steps of a classifier, once per meta-gradient estimator; print test accuracy, "
                    "precision/recall/F1 of flagging the corrupted examples, the first-step hypergradient error "
                    "against Full and the time per outer step, and write results.json, results.md and weights.png.",
    )
    data = add_data_arguments(parser, DEFAULT_SIZES, data_root=None, size_type=int,
                              what=("training examples", "clean validation examples", "test examples"))
    data.add_argument("--corruption", type=float, default=0.5,
                      help="fraction of training labels replaced by a uniformly random wrong class")
    inner = parser.add_argument_group("inner and outer loop")
    inner.add_argument("--model", choices=("linear", "mlp"), default="linear", help="the classifier")
    inner.add_argument("--hidden", type=int, default=64, help="mlp: hidden units")
    inner.add_argument("--inner-steps", type=int, default=100, help="K, inner SGD steps per outer step")
    inner.add_argument("--lr-inner", type=float, default=1.0, help="α, the inner SGD step size")
    inner.add_argument("--outer-steps", type=int, default=100, help="Adam steps on w")
    inner.add_argument("--outer-lr", type=float, default=0.1, help="Adam's learning rate on w")
    add_dtype_argument(inner, "floating-point type of the training runs (the first-step hypergradient error is "
                              "always measured in float64)")
    est = parser.add_argument_group("estimators")
    est.add_argument("--estimators", "--estimator", nargs="+", choices=ESTIMATORS,
                     default=list(DEFAULT_ESTIMATORS), metavar="NAME", help=f"estimators to run, any of {' '.join(ESTIMATORS)}")
    est.add_argument("--truncate-steps", type=int, default=20, help="truncated: T, the last inner steps differentiated")
    est.add_argument("--order", type=order_argument, default=3,
                     help="binomial: the order L, or 'auto' (chosen per outer step to rtol 1e-3, falling back to "
                          "the blocked expansion where the series diverges). At K = 100 on digits, K·α·ℓ is about "
                          "7; for θ's gradient (float64), Binomial(order='auto') took 9x Full's time and Binomial(3, "
                          "block=10) 2.6x, at relative errors 7e-5 and 5e-4")
    est.add_argument("--block", type=block_argument, default=10,
                     help="binomial: S, the block size of the blocked expansion (blocks chained exactly); 'none': "
                          "one block of K steps (the paper's estimator); 'auto' (with --order auto): chosen")
    est.add_argument("--snapshots", type=snapshots_argument, default=None,
                     help="checkpointed: store only this many iterates (an integer, or 'sqrt': about √K) and "
                          "recompute the others during backward; binomial with an integer --block and --order: "
                          "one iterate per block. Also measures time and peak memory of one hypergradient per "
                          "configuration. 'none': store every iterate")
    est.add_argument("--reg", type=float, default=1.0,
                     help="implicit: λ of its proximal term (reg/2)‖φ − θ_0‖², which it adds to the inner loss")
    run = parser.add_argument_group("run")
    add_quick_argument(run, QUICK)
    add_threads_argument(run)
    add_seed_argument(run, "seed of the split, the corruption and θ_0")
    add_out_argument(run, "hypercleaning", "weights.png")
    args = parse_with_quick(parser, argv, QUICK)
    fill_default_sizes(args, DEFAULT_SIZES)
    for name in ("train_size", "val_size", "test_size", "outer_steps", "hidden"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.inner_steps < 0 or args.truncate_steps < 0:
        parser.error("--inner-steps and --truncate-steps must be >= 0")
    if not 0 <= args.corruption <= 1:
        parser.error("--corruption must be in [0, 1]")
    args.estimators = [name for name in ESTIMATORS if name in args.estimators]  # fixed order, no repeats
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the experiment; return what was written to results.json."""
    args = parse_args(argv)
    set_threads(args.threads)
    dtype = torch_dtype(args.dtype)
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()

    data64 = load_split(args)
    data = data64.to(dtype)
    torch.manual_seed(args.seed)
    init = make_model(data.x_train.shape[1], data.classes, args.model, args.hidden).to(dtype)  # θ_0 for every run

    clean_only = ~data.corrupted
    ones = torch.ones(len(data.y_train), dtype=dtype)
    baselines = {
        "uniform": evaluate(init, data, ones, args),
        "oracle": accuracy(init, train_classifier(init, data.x_train[clean_only], data.y_train[clean_only],
                                                  ones[clean_only], args.inner_steps, args.lr_inner),
                           data.x_test, data.y_test),
    }

    names = list(dict.fromkeys(["full", *args.estimators]))  # Full is the reference, even when not run
    first = first_step_hypergradients(init, names, data64, args)
    reference = first["full"]
    rows = []
    for name in args.estimators:
        row = Row(name, label(make_estimator(name, args)))
        rows.append(row)
        if isinstance(first[name], str):
            row.supported, row.message = False, first[name]
            print(f"{row.estimator}: not supported: {row.message}", file=sys.stderr)
            continue
        if isinstance(reference, torch.Tensor):
            row.hypergradient_error = (torch.linalg.vector_norm(first[name] - reference)
                                       / torch.linalg.vector_norm(reference)).item()
        try:
            weights = clean(init, name, data, args, row)
        except NotSupported as why:  # supported at the first step, failed at a later one
            row.supported, row.message = False, f"failed during the outer steps: {why}"
            continue
        row.weights = weights.tolist()
        row.test_accuracy = evaluate(init, data, weights, args)
        scores = flag_scores(weights, data.corrupted)
        # NaN (0/0: nothing flagged) is written as null: results.json stays strict JSON.
        row.precision, row.recall, row.f1 = (None if math.isnan(scores[k]) else scores[k]
                                             for k in ("precision", "recall", "f1"))
        row.flagged = scores["flagged"]

    caption = table_caption(args, data)
    table = format_table(rows, baselines, caption)
    notes = "\n".join(filter(None, [implicit_note(rows, args), warning_notes(rows)]))
    if notes:
        table += "\n" + notes + "\n"
    memory = memory_comparison(init, data, args) if args.snapshots is not None else []
    if memory:
        table += "\n## Time and memory of one hypergradient\n\n" + format_memory_table(memory, args)
    write_table(args.out, "Data hyper-cleaning, one run per estimator", table)
    plot_weights(rows, data.corrupted, os.path.join(args.out, "weights.png"))
    results = {
        "config": vars(args),
        "machine": machine_description(cpu_description()),
        "data": {"train": len(data.y_train), "val": len(data.y_val), "test": len(data.y_test),
                 "corrupted": int(data.corrupted.sum()), "classes": data.classes,
                 "corrupted_mask": data.corrupted.tolist()},
        "baselines": {"uniform_test_accuracy": baselines["uniform"], "oracle_test_accuracy": baselines["oracle"]},
        "caption": caption,
        "rows": [asdict(r) for r in rows],
        "memory": memory,
        "seconds": time.perf_counter() - started,
    }
    write_results(args.out, results, "weights.png")
    return results


if __name__ == "__main__":
    main()
