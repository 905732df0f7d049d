"""A meta-meta-gradient: learning the inner step size of a MAML learner through its meta-training.

Three levels, on sinusoid regression (amplitude in [0.1, 5], phase in [0, π], x in [−5, 5];
``--shots`` support and as many query points per task; a 1-40-40-1 ReLU network):

1. **adaptation** (the inner block): K = ``--inner-steps`` SGD steps of size α on a task's support
   loss, one ``mg.MetaGradient`` block per task; its query loss is the task's MAML loss;
2. **MAML meta-training** (the outer block): J = ``--maml-steps`` SGD steps of size β on θ, from one
   fixed initialization θ_0, each on the mean MAML loss of a meta-batch of ``--meta-batch`` tasks.
   This is a ``mg.MetaGradient`` block over the network whose inner loss (each ``outer.step``'s
   closure) opens the inner blocks: nested blocks (README, "Nested blocks");
3. **the step size** (a plain loop): the meta-validation loss, the mean MAML loss of
   ``--val-tasks`` new tasks at θ_J, is differentiated with respect to log α through all of it,
   ``torch.autograd.grad(val_loss, [log_alpha])``, and Adam (``--outer-lr``) steps on log α;
   ``--iterations`` times, with new tasks every time.

α enters each inner block as a step size that requires grad (``mg.optim.SGD(lr=alpha)``, α = exp(log α)
computed before the outer block), so for the outer block it is a meta-parameter: the outer estimator
differentiates the inner blocks, which run as differentiable unrolls (an exact inner estimator under
an outer one that differentiates twice). The defaults: outer ``mg.Checkpointed()``, inner ``mg.Full()``
(``--outer-estimator``, ``--inner-estimator``).

**Exact.** Before training, the script computes the meta-meta-gradient once in float64 (for log α
and for θ_0) with metagrad and with a hand-written double unroll (:func:`double_unroll`: plain
``torch.autograd.grad(..., create_graph=True)`` through J MAML steps, each through K adaptation
steps), and reports their relative difference (rounding: ~1e-16). After training, it evaluates the
meta-validation loss of α_0 and of the learned α on ``--eval-streams`` fixed streams of tasks, and
on a grid of α (the landscape the learned α should sit near the bottom of).

**Opening the inner block at the outer block's fast weights.** ``mg.MetaGradient`` takes an
``nn.Module`` and adapts its parameters from their values; MAML's adaptation must start from the
outer block's fast weights θ_j instead, which are not a module's parameters. The script opens the
inner block over :class:`Offset`, a module whose parameters are zeros δ and whose forward evaluates
the network at θ_j + δ. Adapting δ from 0 is adapting the weights from θ_j, and θ_j reaches the
inner block as a meta-parameter that the closure captures (it is passed to every call, not held
by the module: a tensor reached only through an object the closure calls is followed by autograd
alone, README "Meta-parameters").

Every exact pair is exact here (the exactness rows show it): inner Full or Checkpointed under an
outer Full or Checkpointed block. Inner Full is the default: under an outer block that
differentiates twice, an exact inner block runs as a differentiable unroll either way.

Outputs, in ``--out`` (default ``results/nested``): ``results.md`` (the table), ``results.json``
(configuration, machine, the exactness check, α and the meta-validation loss at every iteration,
the grid) and ``nested.png`` (α over the outer iterations; the meta-validation loss against α on
the grid, with α_0 and the learned α marked). ``--json PATH`` writes the results there too.

Run it::

    python examples/nested.py                  # about 20 s on 2 CPU cores
    python examples/nested.py --quick          # a smoke test in seconds
    python examples/nested.py --inner-steps 2 --maml-steps 20 --outer-estimator full
"""

from __future__ import annotations

import argparse
import copy
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cli and reweighting beside this file
from cli import (add_dtype_argument, add_json_argument, add_out_argument, add_quick_argument,  # noqa: E402
                 add_seed_argument, add_threads_argument, cpu_description, machine_description, make_parser,
                 parse_with_quick, positive_int, save_figure, set_threads, torch_dtype, write_results, write_table)
from reweighting import positive_float  # noqa: E402

ESTIMATORS = {"full": mg.Full, "checkpointed": mg.Checkpointed}
QUICK = {"iterations": 3, "maml_steps": 2, "meta_batch": 2, "val_tasks": 2, "eval_streams": 1, "eval_tasks": 5,
         "grid": 3}
#: Relative difference from the double unroll above which the exactness check says it failed.
EXACT = 1e-8
#: One task: support inputs, support targets, query inputs, query targets.
Task = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Params = dict[str, torch.Tensor]


# ----------------------------------------------------------------------- tasks and model
def sample_tasks(count: int, shots: int, generator: torch.Generator, dtype: torch.dtype = torch.float32
                 ) -> list[Task]:
    """``count`` sinusoid tasks, each with ``shots`` support and ``shots`` query points."""
    amplitude = torch.rand(count, 1, 1, generator=generator, dtype=dtype) * 4.9 + 0.1
    phase = torch.rand(count, 1, 1, generator=generator, dtype=dtype) * math.pi
    x = torch.rand(count, 2 * shots, 1, generator=generator, dtype=dtype) * 10 - 5
    y = amplitude * torch.sin(x + phase)
    return [(x[i, :shots], y[i, :shots], x[i, shots:], y[i, shots:]) for i in range(count)]


def make_model() -> nn.Module:
    """The MAML sinusoid network: 1-40-40-1 with ReLU."""
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


class Offset(nn.Module):
    """``net`` evaluated at ``base + δ``; the offsets δ (zeros) are this module's parameters.

    A ``MetaGradient`` block over it adapts δ from 0: the same steps as adapting ``net``'s weights
    from ``base`` (∇_δ L(base + δ) = ∇_w L(w) at w = base + δ). ``base`` is passed to every call,
    so that an inner closure captures it (an outer block's fast weights: a meta-parameter of the
    inner block). ``net`` is held outside the module's parameters.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.names = [name for name, _ in net.named_parameters()]
        self.offset = nn.ParameterList([nn.Parameter(torch.zeros_like(p)) for p in net.parameters()])
        self.__dict__["net"] = net  # not a submodule: its parameters are not δ

    def forward(self, x: torch.Tensor, base: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``net(x)`` at the weights ``base + δ``."""
        weights = {name: base[name] + delta for name, delta in zip(self.names, self.offset)}
        return functional_call(self.net, weights, (x,))


# ----------------------------------------------------------------------- the meta-meta-gradient by metagrad
def maml_loss(offset: Offset, base: Mapping[str, torch.Tensor], tasks: Sequence[Task], alpha: torch.Tensor,
              steps: int, estimator: mg.Estimator) -> torch.Tensor:
    """The mean MAML loss of ``tasks`` at the weights ``base``: per task, ``steps`` SGD steps of size
    ``alpha`` on the support loss (a ``MetaGradient`` block over ``offset``), then the query loss."""
    total = 0.0
    for x_s, y_s, x_q, y_q in tasks:
        with mg.MetaGradient(offset, inner_opt=mg.optim.SGD(lr=alpha), estimator=estimator) as inner:
            for _ in range(steps):
                inner.step(lambda f: F.mse_loss(f(x_s, base), y_s))  # captures base: θ_j of the outer block
            total = total + F.mse_loss(inner.fmodel(x_q, base), y_q)
    return total / len(tasks)


def meta_meta_gradient(net: nn.Module, log_alpha: torch.Tensor, train: Sequence[Sequence[Task]],
                       val: Sequence[Task], *, beta: float, inner_steps: int, outer: mg.Estimator,
                       inner: mg.Estimator, wrt_theta: bool = False) -> tuple[float, list[torch.Tensor]]:
    """The meta-validation loss after ``len(train)`` MAML steps from ``net``'s parameters θ_0, and
    its gradient with respect to ``log_alpha`` (and θ_0's parameters, if ``wrt_theta``).

    The outer block (``outer``) takes one SGD step of size ``beta`` per meta-batch of ``train`` on its
    MAML loss; each MAML loss opens one inner block (``inner``) per task. Neither ``net``'s nor
    ``log_alpha``'s ``.grad`` is touched (``torch.autograd.grad``).
    """
    offset = Offset(net)
    alpha = log_alpha.exp()
    with mg.MetaGradient(net, inner_opt=mg.optim.SGD(lr=beta), estimator=outer) as maml:
        for tasks in train:
            maml.step(lambda f: maml_loss(offset, dict(f.params), tasks, alpha, inner_steps, inner))
        val_loss = maml_loss(offset, dict(maml.fmodel.params), val, alpha, inner_steps, inner)
        wrt = [log_alpha, *net.parameters()] if wrt_theta else [log_alpha]
        grads = list(torch.autograd.grad(val_loss, wrt))
    return val_loss.item(), grads


# ----------------------------------------------------------------------- by hand
def maml_loss_by_hand(net: nn.Module, params: Params, tasks: Sequence[Task], alpha: torch.Tensor, steps: int,
                      create_graph: bool = True) -> torch.Tensor:
    """The mean MAML loss by plain autograd: ``steps`` SGD steps per task from ``params``, each
    gradient taken with ``create_graph`` (True: differentiable in ``params`` and ``alpha``)."""
    total = 0.0
    for x_s, y_s, x_q, y_q in tasks:
        phi = {name: p.view_as(p) for name, p in params.items()}  # aliases: the first step's graph starts here
        for _ in range(steps):
            loss = F.mse_loss(functional_call(net, phi, (x_s,)), y_s)
            grads = torch.autograd.grad(loss, list(phi.values()), create_graph=create_graph)
            phi = {name: p - alpha * g for (name, p), g in zip(phi.items(), grads)}
        total = total + F.mse_loss(functional_call(net, phi, (x_q,)), y_q)
    return total / len(tasks)


def double_unroll(net: nn.Module, log_alpha: torch.Tensor, train: Sequence[Sequence[Task]], val: Sequence[Task],
                  *, beta: float, inner_steps: int) -> tuple[float, list[torch.Tensor]]:
    """:func:`meta_meta_gradient` by two nested hand-written unrolls (``create_graph=True`` at both
    levels); the gradient with respect to ``log_alpha`` and θ_0's parameters."""
    alpha = log_alpha.exp()
    theta = {name: p.view_as(p) for name, p in net.named_parameters()}
    for tasks in train:
        grads = torch.autograd.grad(maml_loss_by_hand(net, theta, tasks, alpha, inner_steps), list(theta.values()),
                                    create_graph=True)
        theta = {name: p - beta * g for (name, p), g in zip(theta.items(), grads)}
    val_loss = maml_loss_by_hand(net, theta, val, alpha, inner_steps)
    return val_loss.item(), list(torch.autograd.grad(val_loss, [log_alpha, *net.parameters()]))


def meta_validation_loss(net: nn.Module, alpha: float, train: Sequence[Sequence[Task]], val: Sequence[Task], *,
                         beta: float, inner_steps: int) -> float:
    """The objective alone (no gradient with respect to α): J MAML steps from θ_0, then the mean
    MAML loss of ``val``."""
    rate = torch.tensor(alpha, dtype=next(net.parameters()).dtype)
    theta = {name: p.detach() for name, p in net.named_parameters()}
    for tasks in train:
        theta = {name: p.requires_grad_(True) for name, p in theta.items()}
        grads = torch.autograd.grad(maml_loss_by_hand(net, theta, tasks, rate, inner_steps), list(theta.values()))
        theta = {name: (p - beta * g).detach() for (name, p), g in zip(theta.items(), grads)}
    theta = {name: p.requires_grad_(True) for name, p in theta.items()}
    return maml_loss_by_hand(net, theta, val, rate, inner_steps, create_graph=False).item()


def relative_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """‖got − want‖ / ‖want‖ over all the tensors together."""
    difference = sum(float(((g - w) ** 2).sum()) for g, w in zip(got, want))
    norm = sum(float((w ** 2).sum()) for w in want)
    return math.sqrt(difference / norm)


# ----------------------------------------------------------------------- the experiment
def exactness_check(net: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """metagrad's meta-meta-gradient against :func:`double_unroll`, once, in float64, at α_0."""
    net64 = copy.deepcopy(net).double()
    generator = torch.Generator().manual_seed(args.seed + 10_000)
    train = [sample_tasks(args.meta_batch, args.shots, generator, torch.float64) for _ in range(args.maml_steps)]
    val = sample_tasks(args.val_tasks, args.shots, generator, torch.float64)
    log_alpha = torch.tensor(math.log(args.alpha_init), dtype=torch.float64, requires_grad=True)
    settings = {"beta": args.beta, "inner_steps": args.inner_steps}
    started = time.perf_counter()
    loss, grads = meta_meta_gradient(net64, log_alpha, train, val, outer=make_estimator(args.outer_estimator),
                                     inner=make_estimator(args.inner_estimator), wrt_theta=True, **settings)
    seconds = time.perf_counter() - started
    want_loss, want = double_unroll(net64, log_alpha, train, val, **settings)
    return {"alpha_error": relative_error(grads[:1], want[:1]), "theta_error": relative_error(grads[1:], want[1:]),
            "loss_difference": abs(loss - want_loss), "alpha_gradient": grads[0].item(),
            "alpha_gradient_by_hand": want[0].item(), "seconds": seconds}


def make_estimator(name: str) -> mg.Estimator:
    """``full`` or ``checkpointed``: the exact estimators a nested block differentiates."""
    return ESTIMATORS[name]()


def learn_step_size(net: nn.Module, args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    """Adam on log α for ``args.iterations`` iterations, new tasks each; α and the meta-validation
    loss (at the α of that iteration, before its step) at every iteration."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    log_alpha = torch.tensor(math.log(args.alpha_init), dtype=dtype, requires_grad=True)
    optimizer = torch.optim.Adam([log_alpha], lr=args.outer_lr)
    outer, inner = make_estimator(args.outer_estimator), make_estimator(args.inner_estimator)
    alphas, losses, times = [], [], []
    bar = tqdm(range(args.iterations), desc="learning α", unit="it", dynamic_ncols=True, mininterval=0.5,
               file=sys.stderr)
    for _ in bar:
        train = [sample_tasks(args.meta_batch, args.shots, generator, dtype) for _ in range(args.maml_steps)]
        val = sample_tasks(args.val_tasks, args.shots, generator, dtype)
        started = time.perf_counter()
        loss, (grad,) = meta_meta_gradient(net, log_alpha, train, val, beta=args.beta,
                                           inner_steps=args.inner_steps, outer=outer, inner=inner)
        log_alpha.grad = grad
        alphas.append(log_alpha.exp().item())
        losses.append(loss)
        optimizer.step()
        times.append(time.perf_counter() - started)
        bar.set_postfix({"alpha": f"{alphas[-1]:.4f}", "val": f"{loss:.3f}"}, refresh=False)
    bar.close()
    alphas.append(log_alpha.exp().item())  # after the last step: the learned α
    return {"alpha": alphas, "val_loss": losses, "seconds_per_iteration": statistics.median(times)}


def evaluate(net: nn.Module, alphas: Sequence[float], args: argparse.Namespace, dtype: torch.dtype,
             label: str) -> list[float]:
    """The meta-validation loss of each α, averaged over ``args.eval_streams`` fixed streams of tasks
    (the same streams for every α), each scored on ``args.eval_tasks`` tasks."""
    streams = []
    for stream in range(args.eval_streams):
        generator = torch.Generator().manual_seed(args.seed + 20_000 + stream)
        streams.append(([sample_tasks(args.meta_batch, args.shots, generator, dtype) for _ in range(args.maml_steps)],
                        sample_tasks(args.eval_tasks, args.shots, generator, dtype)))
    values = []
    for alpha in tqdm(alphas, desc=label, unit="α", dynamic_ncols=True, leave=False, file=sys.stderr):
        values.append(statistics.fmean(meta_validation_loss(net, alpha, train, val, beta=args.beta,
                                                            inner_steps=args.inner_steps) for train, val in streams))
    return values


# ----------------------------------------------------------------------- results
def format_table(results: dict[str, Any], caption: str) -> str:
    """The exactness check and the evaluation as a Markdown table, caption underneath."""
    check, ev = results["exactness"], results["evaluation"]
    grid = results["grid"]
    best = int(np.nanargmin(grid["val_loss"]))
    lines = ["| | α | meta-validation loss |", "|---|---|---|",
             f"| initial step size α_0 | {ev['alpha_init']:.4g} | {ev['val_loss_init']:.4f} |",
             f"| learned α ({results['config']['iterations']} iterations) | {ev['alpha_learned']:.4g} "
             f"| {ev['val_loss_learned']:.4f} |",
             f"| best α of the grid | {grid['alpha'][best]:.4g} | {grid['val_loss'][best]:.4f} |"]
    verdict = "exact" if max(check["alpha_error"], check["theta_error"]) < EXACT else "NOT EXACT"
    lines += ["", "| meta-meta-gradient vs hand-written double unroll (float64) | relative difference |",
              "|---|---|",
              f"| d L_val / d log α | {check['alpha_error']:.1e} |",
              f"| d L_val / d θ_0 | {check['theta_error']:.1e} |",
              f"| verdict (threshold {EXACT:g}) | {verdict} |"]
    return "\n".join(lines) + "\n\n" + caption + "\n"


def table_caption(args: argparse.Namespace, results: dict[str, Any]) -> str:
    """What the rows mean, and the settings behind them."""
    return (
        f"Learning the inner step size α of a MAML learner (sinusoid regression, 1-40-40-1 ReLU, {args.shots} "
        f"support and {args.shots} query points per task) through its meta-training: K = {args.inner_steps} "
        f"adaptation step(s) of size α per task, J = {args.maml_steps} MAML steps of size β = {args.beta:g} "
        f"from a fixed θ_0 on meta-batches of {args.meta_batch} tasks, the meta-validation loss on "
        f"{args.val_tasks} new tasks differentiated with respect to log α; {args.iterations} Adam steps (lr "
        f"{args.outer_lr:g}) on log α. Outer block mg.{ESTIMATORS[args.outer_estimator].__name__}(), inner "
        f"blocks mg.{ESTIMATORS[args.inner_estimator].__name__}(); {args.dtype}; seed {args.seed}; "
        f"{cpu_description()}, torch {torch.__version__}; "
        f"{results['learning']['seconds_per_iteration']:.2f} s per iteration (median). Meta-validation loss: "
        f"the mean over {args.eval_streams} fixed streams of tasks of the MAML loss of {args.eval_tasks} tasks "
        f"after J MAML steps with that α. Exactness: one meta-meta-gradient at α_0, {args.maml_steps} MAML "
        "steps, in float64, against plain torch.autograd.grad with create_graph=True through both levels."
    )


def plot(results: dict[str, Any], path: str) -> None:
    """α over the outer iterations, and the meta-validation loss against α on the grid."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    learning, grid, ev = results["learning"], results["grid"], results["evaluation"]
    left.plot(range(len(learning["alpha"])), learning["alpha"], color="tab:blue")
    best = grid["alpha"][int(np.nanargmin(grid["val_loss"]))]
    left.axhline(best, color="gray", linestyle=":", label=f"best α of the grid ({best:.3g})")
    left.set_yscale("log")
    left.set_xlabel("outer iteration")
    left.set_ylabel("inner step size α")
    left.set_title("α learned by the meta-meta-gradient", fontsize=10)
    left.legend(fontsize=8)
    right.plot(grid["alpha"], grid["val_loss"], marker="o", color="tab:gray", label="grid")
    right.plot([ev["alpha_init"]], [ev["val_loss_init"]], "s", color="tab:red", label="α_0")
    right.plot([ev["alpha_learned"]], [ev["val_loss_learned"]], "*", markersize=12, color="tab:blue",
               label="learned α")
    right.set_xscale("log")
    right.set_xlabel("inner step size α")
    right.set_ylabel("meta-validation loss after J MAML steps")
    right.set_title("the objective", fontsize=10)
    right.legend(fontsize=8)
    save_figure(fig, path)


# ----------------------------------------------------------------------- plumbing
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    parser = make_parser(
        description="A meta-meta-gradient: learn the inner step size of a MAML learner (sinusoid regression) "
                    "through J steps of its meta-training, with an mg.MetaGradient block per task nested in "
                    "an outer block's inner loss; check it against a hand-written double unroll in float64; "
                    "write results.md, results.json and nested.png.")
    levels = parser.add_argument_group("the three levels")
    levels.add_argument("--inner-steps", type=positive_int, default=1, help="K, adaptation steps per task")
    levels.add_argument("--alpha-init", type=positive_float, default=0.001, help="α_0, the initial inner step size")
    levels.add_argument("--maml-steps", type=positive_int, default=10,
                        help="J, MAML meta-training steps from θ_0 (the outer block's inner loop)")
    levels.add_argument("--beta", type=positive_float, default=0.05, help="β, the MAML meta-training step size")
    levels.add_argument("--meta-batch", type=positive_int, default=4, help="tasks per MAML step")
    levels.add_argument("--val-tasks", type=positive_int, default=10,
                        help="tasks of the meta-validation loss differentiated at each iteration")
    levels.add_argument("--iterations", type=positive_int, default=60, help="Adam steps on log α")
    levels.add_argument("--outer-lr", type=positive_float, default=0.1, help="Adam's learning rate on log α")
    levels.add_argument("--shots", type=positive_int, default=10, help="support points (and query points) per task")
    levels.add_argument("--outer-estimator", choices=tuple(ESTIMATORS), default="checkpointed",
                        help="estimator of the outer block (MAML meta-training)")
    levels.add_argument("--inner-estimator", choices=tuple(ESTIMATORS), default="full",
                        help="estimator of the inner blocks (adaptation); nested under an outer estimator that "
                             "differentiates twice, it must be exact")
    add_dtype_argument(levels, "floating-point type of the training (the exactness check is always float64)")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval-streams", type=positive_int, default=3,
                            help="fixed streams of tasks (J meta-batches and the scored tasks) averaged over")
    evaluation.add_argument("--eval-tasks", type=positive_int, default=100, help="tasks scored per stream")
    evaluation.add_argument("--grid", type=positive_int, default=12,
                            help="α values of the landscape, log-spaced from α_0 / 3 to 0.3")
    run = parser.add_argument_group("run")
    add_quick_argument(run, QUICK)
    add_threads_argument(run)
    add_seed_argument(run, "seed of θ_0 and of every stream of tasks")
    add_out_argument(run, "nested", "nested.png")
    add_json_argument(run, "also write the results to this file")
    return parse_with_quick(parser, argv, QUICK)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the experiment; return what was written to results.json."""
    args = parse_args(argv)
    set_threads(args.threads)
    dtype = torch_dtype(args.dtype)
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    net = make_model().to(dtype)  # θ_0

    exactness = exactness_check(net, args)
    print(f"meta-meta-gradient vs double unroll (float64): log α {exactness['alpha_error']:.1e}, "
          f"θ_0 {exactness['theta_error']:.1e}", file=sys.stderr)
    learning = learn_step_size(net, args, dtype)
    alpha_learned = learning["alpha"][-1]
    grid_alphas = np.geomspace(args.alpha_init / 3, 0.3, args.grid).tolist()
    init_loss, learned_loss = evaluate(net, [args.alpha_init, alpha_learned], args, dtype, "evaluating α_0, α")
    results: dict[str, Any] = {
        "config": vars(args),
        "machine": machine_description(cpu_description()),
        "exactness": exactness,
        "learning": learning,
        "evaluation": {"alpha_init": args.alpha_init, "val_loss_init": init_loss, "alpha_learned": alpha_learned,
                       "val_loss_learned": learned_loss},
        "grid": {"alpha": grid_alphas, "val_loss": evaluate(net, grid_alphas, args, dtype, "grid")},
    }
    caption = table_caption(args, results)
    table = format_table(results, caption)
    write_table(args.out, "Nested blocks: learning a MAML learner's inner step size", table)
    plot(results, os.path.join(args.out, "nested.png"))
    results["caption"] = caption
    results["seconds"] = time.perf_counter() - started
    # A diverged grid point (a NaN loss) is written as null: strict JSON.
    results["grid"]["val_loss"] = [v if math.isfinite(v) else None for v in results["grid"]["val_loss"]]
    write_results(args.out, results, "nested.png", args.json)
    return results


if __name__ == "__main__":
    main()
