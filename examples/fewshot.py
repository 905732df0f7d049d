"""Few-shot image classification with MAML, ANIL or Meta-SGD, the paper's main experiment, with any estimator.

The model is CNN4: four blocks of 3×3 convolution → BatchNorm → ReLU → 2×2 max-pool, then
a linear head with one output per class of a task. BatchNorm keeps no running statistics
(``track_running_stats=False``), so it normalizes every batch with that batch's own
statistics, in meta-training and at test alike, as MAML does. An N-way K-shot task
draws N classes, K support and ``--queries`` query images per class, with a fresh
assignment of classes to labels. The inner loop takes ``--inner-steps`` SGD steps of size
``--lr-inner`` on the support cross-entropy; the outer loop trains the initialization θ
with Adam on the query cross-entropy after adaptation, averaged over ``--meta-batch``
tasks. The meta-gradient comes from the estimator chosen by ``--estimator``
(Full, Checkpointed, FirstOrder, Truncated, Binomial, Implicit).

``--algorithm`` chooses what is meta-learned, with every estimator:

- ``maml`` (default): the inner loop adapts every parameter; the outer loop learns θ.
- ``anil`` (Raghu et al. 2020): the inner loop adapts the final linear layer only (its
  parameter names are found from the model: the last ``nn.Linear``), passed to
  ``mg.MetaGradient(adapt=...)``; the body stays fixed in the inner loop and gets its
  meta-gradient through it, as a meta-parameter.
- ``metasgd`` (Li et al. 2017): every parameter gets a learned step size of its own shape,
  initialized at ``--lr-inner`` and passed as ``mg.optim.SGD(lr={name: α_name})``; the step
  sizes are learned directly by the outer Adam beside θ (as in Li et al.), and after each outer
  step they are clamped at 0 (a projected step: metagrad's SGD refuses negative step sizes, and
  a negative one would ascend the support loss). Validation and test adapt with the learned
  step sizes; checkpoints hold them. ``Implicit`` gives step sizes no gradient (it warns, and
  they stay at ``--lr-inner``).

Every ``--val-every`` iterations the model adapts (``--eval-inner-steps`` steps) to a
fixed set of validation tasks; the θ with the best validation accuracy is kept, and
training stops early once it has not improved for ``--patience`` iterations. That θ is
then scored on ``--test-tasks`` test tasks: mean accuracy ± 95% confidence interval
(1.96 standard errors, the convention of the few-shot literature).

Defaults follow the paper's public configuration: 5-way 1-shot, 15 queries per class,
meta-batch 4, Adam at 1e-3, inner SGD at α = 0.01, 5 inner steps in training and 10 at
evaluation, 600 test tasks; 32 filters for 84×84 RGB (mini-, tieredImageNet) and 64 for
28×28 grayscale (Omniglot).

Datasets (``--dataset``, see ``examples/fewshot_data.py`` and docs/fewshot.md):

- ``synthetic`` (default): procedurally drawn glyph classes, generated in-process;
- ``omniglot``: the official release (``images_background/``, ``images_evaluation/``), MAML's
  1100/100/423 character split, each character in 4 rotations;
- ``miniimagenet``, ``tieredimagenet``: ``<root>/{train,val,test}/<class>/*.{jpg,png}``.

Decoded images are cached beside the data; later runs load the cache.

Outputs, in the folder ``--out``: ``results.json`` (``test_accuracy_mean``,
``test_accuracy_ci95`` as fractions, the configuration, wall time, curves, the estimator's
warnings), ``learning_curves.png`` (the training curves) and ``checkpoint.pt``.
The checkpoint (model, Adam state, Meta-SGD's step sizes, random-number state, iteration,
validation history) is written every ``--checkpoint-every`` iterations, at the end, and on Ctrl-C;
``--resume`` continues from it and produces the parameters the uninterrupted run would
have. The last line printed states the test accuracy.

Run it::

    python examples/fewshot.py --dataset synthetic --iterations 300      # CPU, minutes
    python examples/fewshot.py --dataset synthetic --iterations 300 --algorithm anil --estimator full
    python examples/fewshot.py --dataset omniglot --data-root ~/data/omniglot --ways 20 --device cuda
    python examples/fewshot.py --dataset miniimagenet --data-root ~/data/miniimagenet --shots 5 \\
        --estimator binomial --order 3 --device cuda

The default estimator is ``Binomial(order="auto")`` (``--order auto``): it adds orders until
the last is below 1e-3 of the estimate, and falls back to the blocked expansion where the
series diverges. ``--order L`` is the paper's fixed-order BinomMAML.

What to expect (docs/fewshot.md has the table): the synthetic command above with ``--order 2``
(the earlier default) took 2 min 23 s on an otherwise idle 2-core CPU and reached 91.3% ± 0.5%
test accuracy (5-way 1-shot, chance 20%; the random initialization adapted the same way
scores 53%). Full reached 92.5% and FirstOrder 90.7% on the same tasks. With α = 0.01 and
BatchNorm over 5 support images, K·α·ℓ sits near the edge of the binomial series' regime
(MATH.md): a fixed order warns on most tasks (Binomial(3): 641 of 1200, from its error
estimate), and ``--order auto`` falls back to blocks where it must. The run counts the
estimator's warnings and prints them once, at the end. The synthetic defaults (16×16 glyphs, CNN4-32) are
sized for a CPU; the paper's inputs are 28×28 (Omniglot) and 84×84 (ImageNet).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
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
from metagrad.optim import LearningRate  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cli and fewshot_data beside this file
from cli import (WarningCounts, add_dtype_argument, add_seed_argument, add_threads_argument,  # noqa: E402
                 counting_warnings, cpu_description, exact_numerics_on, machine_description, make_parser,
                 order_argument, save_figure, set_threads, setup_device, smooth, torch_dtype, warning_summary,
                 write_json)
from fewshot_data import (ClassPool, DataError, Task, load_image_folders, load_omniglot,  # noqa: E402
                          sample_task, synthetic_glyphs)

DATASETS = ("synthetic", "omniglot", "miniimagenet", "tieredimagenet")
ESTIMATORS = ("full", "checkpointed", "first_order", "truncated", "binomial", "implicit")
ALGORITHMS = ("maml", "anil", "metasgd")
ALGORITHM_NAMES = {"maml": "MAML", "anil": "ANIL", "metasgd": "Meta-SGD"}

#: Per-dataset defaults of the flags left unset: image side, channels, CNN width, and how
#: often to validate and checkpoint (the synthetic runs are short, so more often).
DATASET_DEFAULTS: dict[str, dict[str, int]] = {
    "synthetic": {"image_size": 16, "channels": 1, "filters": 32, "val_every": 100, "checkpoint_every": 100},
    "omniglot": {"image_size": 28, "channels": 1, "filters": 64, "val_every": 500, "checkpoint_every": 500},
    "miniimagenet": {"image_size": 84, "channels": 3, "filters": 32, "val_every": 500, "checkpoint_every": 500},
    "tieredimagenet": {"image_size": 84, "channels": 3, "filters": 32, "val_every": 500, "checkpoint_every": 500},
}

# Independent random streams: meta-training tasks, the fixed validation tasks, the test
# tasks. Offsets keep them apart for any --seed.
TRAIN_STREAM, VAL_STREAM, TEST_STREAM = 0, 1_000_003, 2_000_003

#: Settings that define the training trajectory (and the validation that selects θ):
#: --resume refuses a checkpoint written under different values.
RESUME_MUST_MATCH = ("algorithm", "dataset", "ways", "shots", "queries", "eval_queries", "inner_steps",
                     "eval_inner_steps", "lr_inner", "meta_batch", "outer_lr", "estimator", "order",
                     "truncate_steps", "chunk_size", "reg", "solver", "max_iter", "tol", "filters",
                     "image_size", "omniglot_rotations", "synthetic_classes", "data_seed", "seed",
                     "dtype", "val_tasks")
#: What a setting missing from a checkpoint meant when it was written (before the flag existed).
RESUME_DEFAULTS = {"algorithm": "maml"}
CHECKPOINT_VERSION = 1


# -------------------------------------------------------------------------- model
def conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    """3×3 conv → BatchNorm (batch statistics only) → ReLU → 2×2 max-pool."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        # No running statistics: every forward normalizes with its own batch, in
        # training and evaluation alike (MAML's choice), and there are no buffers for
        # the inner loop to leave stale (metagrad/functional.py, buffer policy).
        nn.BatchNorm2d(out_channels, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
    ]


def make_model(channels: int, image_size: int, filters: int, ways: int) -> nn.Sequential:
    """CNN4 with a linear head of ``ways`` outputs."""
    side = image_size
    for _ in range(4):
        side //= 2  # each max-pool halves, rounding down
    if side < 1:
        raise ValueError(f"--image-size {image_size}: CNN4 halves the image four times, so it needs at least 16.")
    return nn.Sequential(
        *conv_block(channels, filters), *conv_block(filters, filters),
        *conv_block(filters, filters), *conv_block(filters, filters),
        nn.Flatten(), nn.Linear(filters * side * side, ways),
    )


def head_parameter_names(model: nn.Module) -> list[str]:
    """The names of the final linear layer's trainable parameters (ANIL's adapted part).

    The head is the last ``nn.Linear`` in ``model.named_modules()`` order: ``17.weight``,
    ``17.bias`` for this script's CNN4, found from the model rather than written down.
    """
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"--algorithm anil adapts the final nn.Linear, and {type(model).__name__} has none.")
    head = model.get_submodule(linears[-1])
    names = [f"{linears[-1]}.{name}" if linears[-1] else name
             for name, param in head.named_parameters() if param.requires_grad]
    if not names:
        raise ValueError(f"--algorithm anil: the final nn.Linear ({linears[-1]!r}) has no parameters that "
                         "require grad.")
    return names


def adapted_names(model: nn.Module, algorithm: str) -> Optional[list[str]]:
    """``adapt=`` of the inner loop: the head for ANIL; ``None`` (every parameter) otherwise."""
    return head_parameter_names(model) if algorithm == "anil" else None


def make_step_sizes(model: nn.Module, alpha: float) -> dict[str, torch.Tensor]:
    """Meta-SGD's step sizes: one leaf tensor per trainable parameter, of its shape, all at ``alpha``."""
    return {name: torch.full_like(param, alpha, requires_grad=True)
            for name, param in model.named_parameters() if param.requires_grad}


def make_estimator(args: argparse.Namespace) -> mg.Estimator:
    """The estimator named by ``--estimator``, with its options."""
    if args.estimator == "full":
        return mg.Full()
    if args.estimator == "checkpointed":
        return mg.Checkpointed()
    if args.estimator == "first_order":
        return mg.FirstOrder()
    if args.estimator == "truncated":
        return mg.Truncated(steps=args.truncate_steps)
    if args.estimator == "binomial":
        return mg.Binomial(order=args.order, chunk_size=args.chunk_size)
    if args.estimator == "implicit":
        return mg.Implicit(reg=args.reg, solver=args.solver, max_iter=args.max_iter, tol=args.tol)
    raise ValueError(f"--estimator: unknown {args.estimator!r}; choose from {ESTIMATORS}")


def adaptation_estimator(args: argparse.Namespace) -> mg.Estimator:
    """The estimator whose inner loop evaluation adapts with: the same inner problem as training.

    No meta-gradient is taken at evaluation, so FirstOrder (which stores nothing) serves
    every estimator but Implicit, whose inner loop also descends the proximal term
    ``(reg/2)‖φ − θ‖²``: its tasks are adapted on that same problem.
    """
    if args.estimator == "implicit":
        return mg.Implicit(reg=args.reg, solver=args.solver, max_iter=args.max_iter, tol=args.tol)
    return mg.FirstOrder()


# ---------------------------------------------------------------- meta-learning
def task_tensors(task: Task, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Support images and labels, query images and labels, on ``device``; pixels in [0, 1]."""
    return (task.support_images.to(device=device, dtype=dtype) / 255, task.support_labels.to(device),
            task.query_images.to(device=device, dtype=dtype) / 255, task.query_labels.to(device))


def meta_batch_step(model: nn.Module, estimator: mg.Estimator, tasks: Sequence[Task], steps: int,
                    lr_inner: LearningRate, device: torch.device, dtype: torch.dtype,
                    warnings_seen: Optional[WarningCounts] = None, *, adapt: Optional[Sequence[str]] = None,
                    infos: Optional[list[dict[str, Any]]] = None, one_block: bool = False) -> tuple[float, float]:
    """Accumulate the meta-batch's mean meta-gradient into ``.grad``; return query loss and accuracy.

    The meta-gradient of the mean query loss is the mean of the per-task meta-gradients. With
    ``one_block`` (and an estimator that can run it: every estimator of the package can)
    the tasks run in one ``MetaGradient(tasks=...)`` block, each with its own fast weights
    (their tensors stacked); otherwise one block per task, each ``.backward()`` accumulating.

    ``lr_inner`` is the inner SGD step size: a float, or (Meta-SGD) a mapping name → step-size
    tensor; tensors that require grad get their meta-gradient in ``.grad`` too. ``adapt``
    names the parameters the inner loop adapts (ANIL: the head); the other parameters get
    theirs through the inner loop. Each task's ``meta.info`` is appended to ``infos``.

    The estimator's warnings (:class:`mg.MetaGradientWarning`: a solve that missed its
    tolerance, a binomial series that is not converging) would otherwise print once per
    task, with different numbers in each; they are counted into ``warnings_seen`` (one
    entry per kind: the tasks it warned on and the first message; ``cli.counting_warnings``)
    and summarized at the end of the run.
    """
    if one_block and estimator.why_not_tasks() is None:
        x_s, y_s, x_q, y_q = (torch.stack(parts) for parts in zip(*(task_tensors(t, device, dtype) for t in tasks)))
        with counting_warnings(warnings_seen):
            with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr_inner), estimator=estimator,
                                 adapt=adapt, tasks=len(tasks)) as meta:
                for _ in range(steps):
                    meta.step(lambda fmodel, x, y: F.cross_entropy(fmodel(x), y), x_s, y_s)
                logits = meta.fmodel(x_q)  # [tasks, queries, ways]
                loss = F.cross_entropy(logits.flatten(0, 1), y_q.flatten(0, 1))  # the mean over tasks
                loss.backward()
        if infos is not None:
            infos.append(dict(meta.info))
        return loss.item(), (logits.argmax(-1) == y_q).double().mean().item()
    total_loss = total_accuracy = 0.0
    for task in tasks:
        x_s, y_s, x_q, y_q = task_tensors(task, device, dtype)
        with counting_warnings(warnings_seen):
            with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr_inner), estimator=estimator,
                                 adapt=adapt) as meta:
                for _ in range(steps):
                    # Estimators that store iterates rebuild this step in backward (Binomial
                    # under vmap): the closure reads nothing but x_s and y_s, fixed in the block.
                    meta.step(lambda fmodel: F.cross_entropy(fmodel(x_s), y_s))
                logits = meta.fmodel(x_q)
                loss = F.cross_entropy(logits, y_q)
                (loss / len(tasks)).backward()
        if infos is not None:
            infos.append(dict(meta.info))
        total_loss += loss.item()
        total_accuracy += (logits.argmax(1) == y_q).double().mean().item()
    return total_loss / len(tasks), total_accuracy / len(tasks)


def adapted_accuracy(model: nn.Module, task: Task, steps: int, lr_inner: LearningRate, adapt_with: mg.Estimator,
                     device: torch.device, dtype: torch.dtype, adapt: Optional[Sequence[str]] = None) -> float:
    """Query accuracy of one task after ``steps`` inner SGD steps from the model's θ.

    ``lr_inner`` and ``adapt`` as in :func:`meta_batch_step` (step-size tensors detached here:
    no meta-gradient is taken).
    """
    x_s, y_s, x_q, y_q = task_tensors(task, device, dtype)
    if isinstance(lr_inner, Mapping):
        lr_inner = {name: value.detach() for name, value in lr_inner.items()}
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr_inner), estimator=adapt_with,
                         adapt=adapt) as meta:
        for _ in range(steps):
            meta.step(lambda fmodel: F.cross_entropy(fmodel(x_s), y_s))
        with torch.no_grad():
            return (meta.fmodel(x_q).argmax(1) == y_q).double().mean().item()


def evaluate(model: nn.Module, pool: ClassPool, count: int, offset: int, args: argparse.Namespace,
             device: torch.device, dtype: torch.dtype, desc: str,
             step_sizes: Optional[dict[str, torch.Tensor]] = None) -> list[float]:
    """Accuracy on ``count`` tasks of ``pool`` drawn from stream ``offset``: the same tasks every call.

    The tasks adapt as in meta-training: the head only for ANIL, with ``step_sizes`` (Meta-SGD's
    learned ones) in place of ``--lr-inner`` where given.
    """
    generator = stream(args.seed, offset)
    adapt_with = adaptation_estimator(args)
    lr_inner: LearningRate = step_sizes if step_sizes else args.lr_inner
    adapt = adapted_names(model, args.algorithm)
    accuracies = []
    for _ in tqdm(range(count), desc=desc, unit="task", leave=False, dynamic_ncols=True,
                  mininterval=0.5, file=sys.stderr):
        task = sample_task(pool, args.ways, args.shots, args.eval_queries, generator)
        accuracies.append(adapted_accuracy(model, task, args.eval_inner_steps, lr_inner, adapt_with,
                                           device, dtype, adapt))
    return accuracies


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (1.96 standard errors)."""
    mean = statistics.fmean(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean, half


def stream(seed: int, offset: int) -> torch.Generator:
    """A CPU generator for one of the independent task streams."""
    return torch.Generator().manual_seed(seed + offset)


# -------------------------------------------------------------------- training
class Training:
    """Everything a checkpoint holds, and the loop that advances it.

    The state is exactly what the next iteration depends on: θ, Meta-SGD's step sizes,
    Adam's state, the training task generator, torch's global generator, the iteration
    count, and the validation record that early stopping reads. Restoring it makes the
    rest of the run identical to the uninterrupted one.
    """

    def __init__(self, model: nn.Module, args: argparse.Namespace) -> None:
        self.model = model
        self.args = args
        #: ANIL: the head's parameter names (the inner loop adapts these only); else None (all).
        self.adapt = adapted_names(model, args.algorithm)
        #: Meta-SGD: the learned step sizes, name → leaf tensor of the parameter's shape; else {}.
        self.step_sizes: dict[str, torch.Tensor] = (make_step_sizes(model, args.lr_inner)
                                                    if args.algorithm == "metasgd" else {})
        groups: list[dict[str, Any]] = [{"params": list(model.parameters())}]
        if self.step_sizes:  # a second group, same Adam settings (Li et al. learn α and θ alike)
            groups.append({"params": list(self.step_sizes.values())})
        self.optimizer = torch.optim.Adam(groups, lr=args.outer_lr)
        self.generator = stream(args.seed, TRAIN_STREAM)
        self.iteration = 0
        self.train_loss: list[float] = []
        self.train_accuracy: list[float] = []
        self.validation: list[dict[str, float]] = []  # {"iteration", "accuracy_mean", "accuracy_ci95"}
        self.best_iteration = -1
        self.best_accuracy = -math.inf
        self.best_state: Optional[dict[str, torch.Tensor]] = None
        self.best_step_sizes: dict[str, torch.Tensor] = {}  # Meta-SGD: the step sizes of best_state
        self.stopped_early = False
        self.training_seconds = 0.0
        self.saved_iteration = -1  # the iteration of the last checkpoint this process wrote or read
        #: the estimator's warnings during meta-training: kind → {"count", "first"}
        self.estimator_warnings: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's content (tensors, lists and numbers only: loadable with weights_only)."""
        return {
            "version": CHECKPOINT_VERSION,
            "config": {key: getattr(self.args, key) for key in RESUME_MUST_MATCH},
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"tasks": self.generator.get_state(), "torch": torch.get_rng_state()},
            "train_loss": list(self.train_loss),
            "train_accuracy": list(self.train_accuracy),
            "validation": list(self.validation),
            "best_iteration": self.best_iteration,
            "best_accuracy": self.best_accuracy,
            "best_state": self.best_state,
            "step_sizes": {name: value.detach().clone() for name, value in self.step_sizes.items()},
            "best_step_sizes": self.best_step_sizes,
            "stopped_early": self.stopped_early,
            "training_seconds": self.training_seconds,
            "estimator_warnings": self.estimator_warnings,
        }

    def save(self, path: Path) -> None:
        """Write the checkpoint atomically: an interruption never leaves half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), temporary)
        os.replace(temporary, path)

    def load(self, path: Path) -> None:
        """Restore from a checkpoint written by :meth:`save` under the same settings."""
        if not path.is_file():
            raise DataError(f"--resume: no checkpoint at {path}. Run without --resume to start, or point "
                            "--checkpoint (or --out) at the run to continue.")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("version") != CHECKPOINT_VERSION:
            raise DataError(f"--resume: {path} is not a checkpoint of this script (version "
                            f"{state.get('version')!r}, expected {CHECKPOINT_VERSION}).")
        mine = {key: getattr(self.args, key) for key in RESUME_MUST_MATCH}
        theirs = {**RESUME_DEFAULTS, **state["config"]}
        differ = [f"--{k.replace('_', '-')} {theirs.get(k)!r} (now {mine[k]!r})"
                  for k in RESUME_MUST_MATCH if _plain(theirs.get(k)) != _plain(mine[k])]
        if differ:
            raise DataError(f"--resume: {path} was written with different settings: {'; '.join(differ)}. "
                            "Resume with the checkpoint's settings, or start a new run with another --out.")
        self.model.load_state_dict(state["model"])
        saved_sizes = state.get("step_sizes", {})
        if saved_sizes.keys() != self.step_sizes.keys():
            raise DataError(f"--resume: {path} holds step sizes for {sorted(saved_sizes)}, but this run "
                            f"learns them for {sorted(self.step_sizes)}.")
        with torch.no_grad():  # in place: the optimizer holds these very tensors
            for name, value in saved_sizes.items():
                self.step_sizes[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["rng"]["tasks"])
        torch.set_rng_state(state["rng"]["torch"])
        self.iteration = state["iteration"]
        self.train_loss = list(state["train_loss"])
        self.train_accuracy = list(state["train_accuracy"])
        self.validation = list(state["validation"])
        self.best_iteration = state["best_iteration"]
        self.best_accuracy = state["best_accuracy"]
        self.best_state = state["best_state"]
        self.best_step_sizes = state.get("best_step_sizes", {})
        # Early stopping is decided again under this run's --patience, so a larger one
        # lets a run that stopped early go on.
        self.stopped_early = bool(self.args.patience) and self.iteration - self.best_iteration >= self.args.patience
        self.training_seconds = state["training_seconds"]
        self.estimator_warnings = state["estimator_warnings"]
        self.saved_iteration = self.iteration

    # --------------------------------------------------------- the inner loop
    def inner_lr(self) -> LearningRate:
        """The inner step size: Meta-SGD's learned tensors (meta-parameters), else ``--lr-inner``."""
        return self.step_sizes if self.step_sizes else self.args.lr_inner

    def project_step_sizes(self) -> None:
        """Clamp Meta-SGD's step sizes at 0 after an outer step (a projected gradient step).

        Li et al. learn α directly, unconstrained; a negative step size would ascend the
        support loss, and ``mg.optim.SGD`` refuses one. Clamping keeps the direct
        parametrization (Adam's steps act on α itself) and only bites where a step size
        would cross 0.
        """
        if self.step_sizes:
            with torch.no_grad():
                for value in self.step_sizes.values():
                    value.clamp_(min=0)

    # ------------------------------------------------------------------ loop
    def run(self, pools: dict[str, ClassPool], estimator: mg.Estimator, checkpoint: Path,
            device: torch.device, dtype: torch.dtype) -> bool:
        """Meta-train up to ``--iterations``; return False if stopped by Ctrl-C (checkpoint saved)."""
        args = self.args
        bar = tqdm(total=args.iterations, initial=self.iteration, desc="meta-training", unit="it",
                   dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
        window = 50  # running means over this many iterations
        if self.iteration == 0 and not self.validation:
            self.validate(pools["val"], device, dtype)  # θ_0: where meta-training starts from
        with stop_on_interrupt() as stop:
            while self.iteration < args.iterations and not self.stopped_early:
                start = time.perf_counter()
                tasks = [sample_task(pools["train"], args.ways, args.shots, args.queries, self.generator)
                         for _ in range(args.meta_batch)]
                self.optimizer.zero_grad(set_to_none=True)
                try:
                    loss, accuracy = meta_batch_step(self.model, estimator, tasks, args.inner_steps,
                                                     self.inner_lr(), device, dtype, self.estimator_warnings,
                                                     adapt=self.adapt, one_block=args.one_block == "on")
                except (mg.NegativeCurvatureError, FloatingPointError) as error:
                    # The estimator or the inner loop cannot go on from this θ; say so
                    # plainly (and where the run can be taken up again) instead of a trace.
                    bar.close()
                    raise TrainingError(
                        f"meta-iteration {self.iteration + 1} stopped: {error} The checkpoint {checkpoint} "
                        f"holds the run up to iteration {self.saved_iteration}." if self.saved_iteration >= 0
                        else f"meta-iteration {self.iteration + 1} stopped: {error}") from None
                self.optimizer.step()
                self.project_step_sizes()
                self.iteration += 1
                self.train_loss.append(loss)
                self.train_accuracy.append(accuracy)
                if self.iteration % args.val_every == 0 or self.iteration == args.iterations:
                    self.validate(pools["val"], device, dtype)
                self.training_seconds += time.perf_counter() - start
                bar.update()
                postfix = {"loss": f"{np.mean(self.train_loss[-window:]):.3f}",
                           "acc": f"{np.mean(self.train_accuracy[-window:]):.3f}",
                           "best_val": f"{self.best_accuracy:.3f}" if self.validation else "-"}
                if self.estimator_warnings:
                    postfix["warned"] = sum(w["count"] for w in self.estimator_warnings.values())
                bar.set_postfix(postfix, refresh=False)
                if (self.iteration % args.checkpoint_every == 0 or self.iteration == args.iterations
                        or self.stopped_early or stop.requested):
                    self.save(checkpoint)
                    self.saved_iteration = self.iteration
                if stop.requested:
                    bar.close()
                    return False
        bar.close()
        return True

    def validate(self, pool: ClassPool, device: torch.device, dtype: torch.dtype) -> None:
        """Score θ on the fixed validation tasks; keep it if best; decide early stopping."""
        args = self.args
        accuracies = evaluate(self.model, pool, args.val_tasks, VAL_STREAM, args, device, dtype, "validation",
                              step_sizes=self.step_sizes)
        mean, ci = mean_ci95(accuracies)
        self.validation.append({"iteration": self.iteration, "accuracy_mean": mean, "accuracy_ci95": ci})
        if mean > self.best_accuracy:
            self.best_accuracy, self.best_iteration = mean, self.iteration
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.best_step_sizes = {k: v.detach().clone() for k, v in self.step_sizes.items()}
        if args.patience and self.iteration - self.best_iteration >= args.patience:
            self.stopped_early = True


class TrainingError(Exception):
    """Meta-training cannot continue (the estimator or the inner loop failed); the message says why."""


class StopRequest:
    """Set by the first Ctrl-C; the loop finishes its iteration, checkpoints and stops."""

    requested = False


@contextlib.contextmanager
def stop_on_interrupt() -> Iterator[StopRequest]:
    """Turn the first SIGINT into a request to stop at the next iteration boundary.

    Stopping between iterations keeps θ and Adam's state consistent (an interrupt inside
    ``optimizer.step()`` could leave half the parameters updated). A second Ctrl-C
    interrupts at once, as usual.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # signals need the main thread
        yield request
        return

    def handler(signum: int, frame: Any) -> None:
        if request.requested:
            raise KeyboardInterrupt
        request.requested = True
        print("\nInterrupt: stopping after this iteration and saving a checkpoint "
              "(Ctrl-C again to quit at once).", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield request
    finally:
        signal.signal(signal.SIGINT, previous)


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal after a round trip through a checkpoint."""
    return list(value) if isinstance(value, (tuple, list)) else value


# ---------------------------------------------------------------------- outputs
def plot_curves(training: Training, path: Path, title: str, chance: float,
                test: Optional[tuple[float, float]]) -> None:
    """Query loss and accuracy after adaptation per iteration; validation accuracy with its CI."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    iterations = np.arange(1, len(training.train_loss) + 1)
    window = max(1, min(100, len(iterations) // 10))
    ax_loss.plot(iterations, training.train_loss, color="C0", alpha=0.25, linewidth=0.8)
    ax_loss.plot(iterations, smooth(training.train_loss, window), color="C0", linewidth=1.6,
                 label=f"moving average ({window} it.)")
    ax_loss.set_xlabel("meta-iteration")
    ax_loss.set_ylabel("meta-training query cross-entropy after adaptation")
    ax_loss.grid(True, alpha=0.3)
    ax_loss.legend()
    ax_acc.plot(iterations, smooth(training.train_accuracy, window), color="C0", linewidth=1.6,
                label=f"meta-training query accuracy ({window}-it. average)")
    if training.validation:
        ax_acc.errorbar([v["iteration"] for v in training.validation],
                        [v["accuracy_mean"] for v in training.validation],
                        yerr=[v["accuracy_ci95"] for v in training.validation], color="C1", marker="o",
                        markersize=3, capsize=2, linewidth=1.2, label="validation (95% CI)")
        ax_acc.axvline(training.best_iteration, color="C1", linestyle=":", linewidth=1,
                       label=f"best validation (it. {training.best_iteration})")
    if test is not None:
        ax_acc.axhline(test[0], color="C2", linewidth=1.2, label=f"test {100 * test[0]:.1f}% ± {100 * test[1]:.1f}%")
    ax_acc.axhline(chance, color="gray", linestyle="--", linewidth=1, label=f"chance {100 * chance:.0f}%")
    ax_acc.set_xlabel("meta-iteration")
    ax_acc.set_ylabel("accuracy after adaptation")
    ax_acc.set_ylim(0, 1)
    ax_acc.grid(True, alpha=0.3)
    ax_acc.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def summarize_step_sizes(step_sizes: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Name → mean, min and max of Meta-SGD's step sizes for that parameter (empty without them)."""
    return {name: {"mean": value.detach().double().mean().item(), "min": value.min().item(),
                   "max": value.max().item()} for name, value in step_sizes.items()}


def device_description(device: torch.device) -> str:
    """A short description of the machine the numbers come from."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (TF32 off, cuDNN deterministic)"
    return cpu_description()


def describe(args: argparse.Namespace) -> str:
    """``5-way 1-shot synthetic, MAML, Binomial(order=2)``-style summary."""
    return (f"{args.ways}-way {args.shots}-shot {args.dataset}, {ALGORITHM_NAMES[args.algorithm]}, "
            f"{make_estimator(args)!r}")


# --------------------------------------------------------------------- plumbing
def run_files(out: str) -> tuple[Path, Path, Path]:
    """``--out``: the results JSON, the curves PNG and the default checkpoint of the run.

    ``--out DIR`` (the convention of every example): ``DIR/results.json``,
    ``DIR/learning_curves.png``, ``DIR/checkpoint.pt``. A path ending in ``.json`` is the
    earlier form, kept so that existing command lines run: that file, and the PNG and
    checkpoint beside it (``.png``, ``.checkpoint.pt`` in place of ``.json``).
    """
    path = Path(out)
    if path.suffix == ".json":
        return path, path.with_suffix(".png"), path.with_suffix(".checkpoint.pt")
    return path / "results.json", path / "learning_curves.png", path / "checkpoint.pt"


def load_pools(args: argparse.Namespace) -> dict[str, ClassPool]:
    """The three splits of ``--dataset``, checked against what a task needs."""
    if args.dataset == "synthetic":
        pools = synthetic_glyphs(args.image_size, args.synthetic_classes, seed=args.data_seed)
    elif args.data_root is None:
        raise DataError(f"--dataset {args.dataset} reads images from disk: pass --data-root PATH "
                        "(docs/fewshot.md describes the layouts).")
    elif args.dataset == "omniglot":
        pools = load_omniglot(Path(args.data_root).expanduser(), args.image_size,
                              rotations=args.omniglot_rotations, cache=not args.no_cache)
    else:
        pools = load_image_folders(Path(args.data_root).expanduser(), args.image_size,
                                   cache=not args.no_cache, dataset=args.dataset)
    channels = DATASET_DEFAULTS[args.dataset]["channels"]
    for split, queries in (("train", args.queries), ("val", args.eval_queries), ("test", args.eval_queries)):
        pools[split].require(args.ways, args.shots + queries,
                             f"{args.ways}-way {args.shots}-shot tasks with {queries} queries per class")
        assert pools[split].image_shape == (channels, args.image_size, args.image_size)
    return pools


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    parser = make_parser(
        description="Meta-train CNN4 with MAML, ANIL or Meta-SGD on N-way K-shot image classification, with the "
                    "meta-gradient "
                    "estimator of your choice; report test accuracy ± 95% CI, write results JSON, a PNG of "
                    "the training curves and a resumable checkpoint.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="synthetic",
                      help="synthetic: procedurally drawn glyphs made in-process; the others read --data-root")
    data.add_argument("--data-root", default=None,
                      help="omniglot: the folder holding images_background/ and images_evaluation/, or its "
                           "omniglot-py/ parent; mini/tieredimagenet: the folder holding train/, val/, test/")
    data.add_argument("--image-size", type=int, default=None,
                      help="image side in pixels (default: 16 for synthetic, 28 for omniglot, 84 for the ImageNets)")
    data.add_argument("--omniglot-rotations", type=int, choices=(1, 4), default=4,
                      help="4: every Omniglot character also counts as 3 rotated classes (Vinyals et al.)")
    data.add_argument("--synthetic-classes", type=int, nargs=3, default=[300, 50, 100],
                      metavar=("TRAIN", "VAL", "TEST"), help="glyph classes per split of the synthetic set")
    data.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic glyphs (the data, not the run)")
    data.add_argument("--no-cache", action="store_true",
                      help="decode the images every run instead of caching them beside the data")

    task = parser.add_argument_group("tasks")
    task.add_argument("--ways", type=int, default=5, help="N: classes per task")
    task.add_argument("--shots", type=int, default=1, help="K: support images per class")
    task.add_argument("--queries", type=int, default=15, help="query images per class in meta-training")
    task.add_argument("--eval-queries", type=int, default=15, help="query images per class in validation and test")

    train = parser.add_argument_group("meta-training")
    train.add_argument("--algorithm", choices=ALGORITHMS, default="maml",
                       help="maml: the inner loop adapts every parameter. anil (Raghu et al. 2020): it adapts the "
                            "final linear layer only; the body is meta-learned through the inner loop. metasgd "
                            "(Li et al. 2017): a learned step size per parameter entry, initialized at "
                            "--lr-inner, learned by the outer Adam and clamped at 0")
    train.add_argument("--iterations", type=int, default=20000, help="meta-iterations (Adam steps)")
    train.add_argument("--meta-batch", type=int, default=4, help="tasks per meta-iteration")
    train.add_argument("--one-block", choices=("on", "off"), default="on",
                       help="on: each meta-batch in one block over its tasks (MetaGradient(tasks=...)) "
                            "with every estimator that can (all of the package's); "
                            "off: a block per task")
    train.add_argument("--outer-lr", type=float, default=1e-3, help="Adam's learning rate")
    train.add_argument("--lr-inner", type=float, default=0.01,
                       help="α, the inner SGD step size (metasgd: the learned step sizes' initial value)")
    train.add_argument("--inner-steps", type=int, default=5, help="K, inner SGD steps in meta-training")
    train.add_argument("--eval-inner-steps", type=int, default=10, help="inner SGD steps at validation and test")
    train.add_argument("--filters", type=int, default=None,
                       help="CNN4 width (default: 64 for omniglot, 32 for the others)")

    est = parser.add_argument_group("meta-gradient estimator")
    est.add_argument("--estimator", choices=ESTIMATORS, default="binomial", help="how the meta-gradient is computed")
    est.add_argument("--order", type=order_argument, default="auto",
                     help="binomial: 'auto' (Binomial(order='auto'): the order chosen per task from the level "
                          "norms, with the blocked expansion as fallback where the series diverges), or L, "
                          "a fixed truncation order (the paper's BinomMAML: 2 or 3)")
    est.add_argument("--chunk-size", type=int, default=None,
                     help="binomial: at most this many step graphs at once (default: a whole level)")
    est.add_argument("--truncate-steps", type=int, default=2, help="truncated: T, the last steps differentiated")
    est.add_argument("--reg", type=float, default=190.0,
                     help="implicit: λ, the proximal term's strength. The proximal inner loop is stable only for "
                          "α·λ < 2 (λ < 200 at α = 0.01), and CG needs the inner Hessian ⪰ −λI: on the synthetic "
                          "set, λ = 1, 10, 100 and 150 met curvature below −λ within 4 iterations of the random "
                          "initialization (NegativeCurvatureError)")
    est.add_argument("--solver", choices=("cg", "neumann"), default="cg", help="implicit: the linear solver")
    est.add_argument("--max-iter", type=int, default=50, help="implicit: solver iterations at most")
    est.add_argument("--tol", type=float, default=1e-6, help="implicit: the solver's relative residual target")

    evaluation = parser.add_argument_group("validation, test, checkpoints")
    evaluation.add_argument("--val-every", type=int, default=None,
                            help="validate every this many iterations, at the start and at the end "
                                 "(default: 500; 100 for synthetic)")
    evaluation.add_argument("--val-tasks", type=int, default=100, help="validation tasks (the same ones every time)")
    evaluation.add_argument("--patience", type=int, default=5000,
                            help="stop once the best validation accuracy is this many iterations old (0: never)")
    evaluation.add_argument("--test-tasks", type=int, default=600, help="test tasks for the mean ± 95%% CI")
    evaluation.add_argument("--checkpoint-every", type=int, default=None,
                            help="checkpoint every this many iterations (default: 500; 100 for synthetic)")
    evaluation.add_argument("--checkpoint", default=None, help="checkpoint file (default: OUT/checkpoint.pt)")
    evaluation.add_argument("--resume", action="store_true",
                            help="continue from --checkpoint; the run then ends as the uninterrupted one would")
    evaluation.add_argument("--out", default=None, metavar="DIR",
                            help="output folder for results.json, learning_curves.png and checkpoint.pt "
                                 "(default: results/fewshot/<dataset>_<N>way<K>shot_<estimator>, with <algorithm>_ "
                                 "before <estimator> for anil and metasgd). A path "
                                 "ending in .json is still read as the earlier form: the results file, with "
                                 "<name>.png and <name>.checkpoint.pt beside it")

    machine = parser.add_argument_group("machine")
    machine.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                         help="cuda turns TF32 off and cuDNN determinism on (docs/MATH.md, numerics)")
    add_dtype_argument(machine, "floating-point type")
    add_threads_argument(machine)
    add_seed_argument(machine, "seed of the initialization and all task streams")
    args = parser.parse_args(argv)

    defaults = DATASET_DEFAULTS[args.dataset]
    for name in ("image_size", "filters", "val_every", "checkpoint_every"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.out is None:
        algorithm = "" if args.algorithm == "maml" else f"{args.algorithm}_"
        args.out = os.path.join("results", "fewshot",
                                f"{args.dataset}_{args.ways}way{args.shots}shot_{algorithm}{args.estimator}")
    if Path(args.out).suffix != ".json" and Path(args.out).is_file():
        parser.error(f"--out names a folder for the run's files; {args.out} is a file")
    if args.checkpoint is None:
        args.checkpoint = str(run_files(args.out)[2])
    for name in ("ways", "shots", "queries", "eval_queries", "iterations", "meta_batch", "val_every",
                 "val_tasks", "checkpoint_every", "filters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("inner_steps", "eval_inner_steps", "order", "truncate_steps", "patience"):
        if getattr(args, name) != "auto" and getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.ways < 2:
        parser.error(f"--ways must be >= 2 for a classification task, got {args.ways}")
    if args.test_tasks < 2:
        parser.error("--test-tasks must be >= 2 for a confidence interval")
    if args.image_size < 16:
        parser.error(f"--image-size must be >= 16 (CNN4 halves it four times), got {args.image_size}")
    if not (args.lr_inner >= 0 and args.outer_lr > 0):
        parser.error("--lr-inner must be >= 0 and --outer-lr > 0")
    if args.chunk_size is not None and args.chunk_size < 1:
        parser.error(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if args.estimator == "implicit" and not (args.reg > 0 and args.tol > 0 and args.max_iter >= 1):
        parser.error("implicit: --reg and --tol must be > 0 and --max-iter >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the experiment; return what was written to the results JSON.

    Exits with status 1 and a one-line message on missing or malformed data, and with
    status 130 after saving a checkpoint when interrupted by Ctrl-C.
    """
    started = time.perf_counter()
    args = parse_args(argv)
    device = setup_device(args.device)
    with exact_numerics_on(device):
        return run_experiment(args, device, started)


def run_experiment(args: argparse.Namespace, device: torch.device, started: float) -> dict[str, Any]:
    """Load the data, meta-train, test, write and print the results (see the module docstring)."""
    dtype = torch_dtype(args.dtype)
    # A task's batches are small (5 to 100 images), so intra-op threads mostly
    # synchronize; on the 2-core CPU this was written on, one thread was fastest.
    set_threads(args.threads)
    out, png, _ = run_files(args.out)
    checkpoint = Path(args.checkpoint)
    try:
        pools = load_pools(args)
        channels = DATASET_DEFAULTS[args.dataset]["channels"]
        torch.manual_seed(args.seed)  # the initialization θ_0
        model = make_model(channels, args.image_size, args.filters, args.ways).to(device=device, dtype=dtype)
        estimator = make_estimator(args)
        training = Training(model, args)
        if args.resume:
            training.load(checkpoint)
            print(f"Resuming from {checkpoint} at iteration {training.iteration}.", file=sys.stderr)
        elif checkpoint.exists():
            print(f"note: starting a new run; {checkpoint} will be overwritten (--resume continues it).",
                  file=sys.stderr)
    except DataError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"{describe(args)}: {pools['train'].num_classes}/{pools['val'].num_classes}/"
          f"{pools['test'].num_classes} train/val/test classes, CNN4-{args.filters} on "
          f"{channels}×{args.image_size}×{args.image_size}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters, {device_description(device)}.", file=sys.stderr)
    if training.adapt is not None:
        print(f"ANIL: the inner loop adapts {', '.join(training.adapt)}; the other parameters are meta-learned "
              "through it.", file=sys.stderr)
    if training.step_sizes:
        print(f"Meta-SGD: {sum(v.numel() for v in training.step_sizes.values()):,} learned step sizes "
              f"(one per parameter entry), initialized at {args.lr_inner}, clamped at 0.", file=sys.stderr)

    try:
        finished = training.run(pools, estimator, checkpoint, device, dtype)
    except TrainingError as error:
        raise SystemExit(f"error: {error}") from None
    if not finished:
        print(f"Interrupted at iteration {training.iteration}; checkpoint saved to {checkpoint}. "
              "Run the same command with --resume to continue.", file=sys.stderr)
        raise SystemExit(130)
    tasks_trained = training.iteration * args.meta_batch
    for line in warning_summary(training.estimator_warnings, repr(make_estimator(args)), tasks_trained):
        print(line, file=sys.stderr)
    if training.stopped_early:
        print(f"Early stop at iteration {training.iteration}: no validation improvement since iteration "
              f"{training.best_iteration} (--patience {args.patience}).", file=sys.stderr)

    # Test the θ (and Meta-SGD's step sizes) that validated best (early stopping), not
    # necessarily the last ones.
    test_step_sizes = training.step_sizes
    if training.best_state is not None:
        model.load_state_dict(training.best_state)
        if training.step_sizes:
            test_step_sizes = {k: v.to(device) for k, v in training.best_step_sizes.items()}
    test_started = time.perf_counter()
    accuracies = evaluate(model, pools["test"], args.test_tasks, TEST_STREAM, args, device, dtype, "test",
                          step_sizes=test_step_sizes)
    test_seconds = time.perf_counter() - test_started
    mean, ci = mean_ci95(accuracies)

    out.parent.mkdir(parents=True, exist_ok=True)
    alpha = f"α learned from {args.lr_inner}" if training.step_sizes else f"α = {args.lr_inner}"
    title = (f"{describe(args)}; CNN4-{args.filters}, K = {args.inner_steps} (eval {args.eval_inner_steps}), "
             f"{alpha}, meta-batch {args.meta_batch}; {device_description(device)}")
    plot_curves(training, png, title, 1 / args.ways, (mean, ci))
    results = {
        "test_accuracy_mean": mean,
        "test_accuracy_ci95": ci,
        "test_tasks": len(accuracies),
        "chance_accuracy": 1 / args.ways,
        "best_validation": {"iteration": training.best_iteration, "accuracy_mean": training.best_accuracy},
        "iterations_completed": training.iteration,
        "stopped_early": training.stopped_early,
        "estimator": repr(estimator),
        "algorithm": args.algorithm,
        "adapted_parameters": (list(training.adapt) if training.adapt is not None
                               else [n for n, p in model.named_parameters() if p.requires_grad]),
        # Meta-SGD: per parameter, the mean, min and max of its learned step sizes, as tested
        # (the best validation's) and at the end of meta-training.
        "step_sizes_tested": summarize_step_sizes(test_step_sizes),
        "step_sizes_final": summarize_step_sizes(training.step_sizes),
        "estimator_warnings": [{"message": kind["first"], "tasks": kind["count"], "of_tasks": tasks_trained}
                               for kind in training.estimator_warnings.values()],
        "config": vars(args),
        "data": {split: {"classes": pool.num_classes, "images": int(pool.images.shape[0]),
                         "image_shape": list(pool.image_shape)} for split, pool in pools.items()},
        "machine": machine_description(device_description(device)),
        "wall_time_seconds": time.perf_counter() - started,
        "training_seconds": training.training_seconds,
        "test_seconds": test_seconds,
        "history": {"train_loss": training.train_loss, "train_accuracy": training.train_accuracy,
                    "validation": training.validation},
        "curves_png": str(png),
        "checkpoint": str(checkpoint),
    }
    write_json(out, results)
    print(f"Wrote {out}, {png} and {checkpoint}.")
    print(f"Test accuracy, {describe(args)}, best validation θ (iteration {training.best_iteration}): "
          f"{100 * mean:.2f}% ± {100 * ci:.2f}% (95% CI, {len(accuracies)} tasks; chance {100 / args.ways:.0f}%)")
    return results


if __name__ == "__main__":
    main()
