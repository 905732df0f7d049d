"""How to compute a batch of step products ``J_mᵀ u`` fastest on this device.

The products behind Checkpointed, Truncated and Binomial are Hessian-vector products
through rebuilt step graphs. This script times three ways of computing B of them, at B
different iterates, on the benchmark problems (``--config``), side by side in one process:

- ``vmap(vjp∘grad)``: reverse-over-reverse (double backward) under ``torch.func.vmap``,
  one batched call. What :meth:`metagrad.trajectory.Trajectory.batched_vjp` does.
- ``vmap(jvp∘grad)``: forward-over-reverse under ``vmap``, one batched call (for plain
  SGD, ``J_mᵀ u = u − α H_m u`` and ``H_m`` is symmetric, so ``jvp`` gives the same
  product).
- ``loop``: B double backwards one after another, one step graph at a time. What
  :meth:`~metagrad.trajectory.Trajectory.vjp` does, and a batched call of one product.

For each: the median time of ``--repeats`` runs after a warm-up (the order of the three
shuffled in every round), the time per product, the ratio to ``loop``, peak memory
(:func:`metagrad.memory.peak_memory`) and the relative difference ``‖p − p_loop‖/‖p_loop‖``
from ``loop``'s products (rounding only: the three compute the same products).
A formulation that fails (some operators have no forward-mode rule under ``vmap``) gets
its error in the notes column.

Run (from the repository root; ``python benchmarks/products.py`` works too)::

    python -m benchmarks.products --config omniglot --batch 20 --device cpu --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap

from metagrad.memory import peak_memory

if __package__ in (None, ""):  # run as a file, python benchmarks/products.py: import the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.estimators import (CONFIGS, build_problem, format_bytes,  # noqa: E402
                                   machine_description, setup_device, synchronize)
from examples.cli import (add_dtype_argument, add_json_argument, add_seed_argument,  # noqa: E402
                          add_threads_argument, make_parser, set_threads, write_json)

Params = dict[str, torch.Tensor]


def formulations(model: torch.nn.Module, loss: Callable[[Params], torch.Tensor]
                 ) -> dict[str, Callable[[Params, Params], Params]]:
    """The three ways, each a function of (iterates, vectors), both with a leading batch dim."""

    def reverse(p: Params, u: Params) -> Params:
        _, pullback = vjp(grad(loss), p)
        return pullback(u)[0]

    def forward(p: Params, u: Params) -> Params:
        return jvp(grad(loss), (p,), (u,))[1]

    def loop(params: Params, vectors: Params) -> Params:
        rows = []
        for i in range(next(iter(params.values())).shape[0]):
            p = {n: t[i].detach().requires_grad_() for n, t in params.items()}
            g = torch.autograd.grad(loss(p), list(p.values()), create_graph=True)
            rows.append(torch.autograd.grad(g, list(p.values()), [vectors[n][i] for n in p]))
        return {n: torch.stack([row[j] for row in rows]) for j, n in enumerate(params)}

    return {"vmap(vjp∘grad)": vmap(reverse), "vmap(jvp∘grad)": vmap(forward), "loop": loop}


def measure(config_name: str, batch: int, repeats: int, device: torch.device,
            dtype: torch.dtype, seed: int) -> list[dict[str, Any]]:
    """One row per formulation for ``batch`` products on the config's problem."""
    config = CONFIGS[config_name]
    problem = build_problem(config, 1, 0.0, seed, device, dtype)
    model, (x_s, y_s, _, _) = problem.model, problem.task
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def loss(p: Params) -> torch.Tensor:
        return problem.loss(functional_call(model, p, (x_s,)), y_s)

    base = {n: p.detach() for n, p in model.named_parameters()}
    noise = lambda t: torch.randn(t.shape, generator=generator).to(t)  # noqa: E731
    params = {n: torch.stack([t + 0.01 * noise(t) for _ in range(batch)]) for n, t in base.items()}
    vectors = {n: torch.stack([noise(t) for _ in range(batch)]) for n, t in base.items()}
    ways = formulations(model, loss)
    rows = {name: {"method": name, "times": [], "failure": None} for name in ways}
    outputs: dict[str, Params] = {}
    for name, way in ways.items():  # warm-up, then memory and the products themselves
        try:
            way(params, vectors)
            gc.collect()
            with peak_memory(device) as mem:
                outputs[name] = way(params, vectors)
                synchronize(device)
            rows[name]["peak_bytes"] = mem.peak_bytes
        except Exception as error:  # noqa: BLE001 - a failing formulation is a row note
            rows[name]["failure"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    for _ in range(repeats):
        order = [name for name in ways if rows[name]["failure"] is None]
        random.shuffle(order)
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            ways[name](params, vectors)
            synchronize(device)
            rows[name]["times"].append(time.perf_counter() - start)
    loop_time = statistics.median(rows["loop"]["times"]) if rows["loop"]["times"] else None
    result = []
    for name, row in rows.items():
        if row["times"]:
            median = statistics.median(row["times"])
            row.update(time_ms=1e3 * median, per_product_ms=1e3 * median / batch,
                       ratio_to_loop=median / loop_time if loop_time else None)
            if name in outputs and "loop" in outputs:
                difference = sum(float((outputs[name][n] - outputs["loop"][n]).square().sum()) for n in base)
                size = sum(float(outputs["loop"][n].square().sum()) for n in base)
                row["rel_diff"] = (difference / size) ** 0.5 if size > 0 else 0.0
        row["times_ms"] = [1e3 * t for t in row.pop("times")]
        result.append(row)
    return result


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| formulation | ms (B products) | ms / product | time / loop | peak memory | "
             "rel. difference vs loop | notes |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        def number(key: str, spec: str) -> str:
            return "—" if row.get(key) is None else format(row[key], spec)
        lines.append(f"| {row['method']} | {number('time_ms', '.1f')} | {number('per_product_ms', '.2f')} "
                     f"| {number('ratio_to_loop', '.2f')}× | {format_bytes(row.get('peak_bytes'))} "
                     f"| {number('rel_diff', '.1e')} | {row['failure'] or ''} |")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = make_parser(
        prog="python -m benchmarks.products",
        description="Time B step products (Hessian-vector products at B iterates) computed as "
                    "vmap(vjp∘grad), vmap(jvp∘grad) and a loop of double backwards, side by side.")
    parser.add_argument("--config", nargs="+", default=["sinusoid", "omniglot"], choices=sorted(CONFIGS),
                        help="benchmark problems (as in benchmarks.estimators)")
    parser.add_argument("--batch", type=int, nargs="+", default=[20], help="products per call, B")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda sets TF32 off and cudnn.deterministic on for the run")
    add_dtype_argument(parser)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after the warm-up")
    add_threads_argument(parser, "torch CPU threads (torch.set_num_threads); 1, as in every table of the README: "
                                 "the per-task ops are small, so thread fan-out costs more than it saves")
    add_seed_argument(parser)
    add_json_argument(parser, "write every number here")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error(f"--repeats: expected at least 5 (the median of >= 5 runs), got {args.repeats}.")
    if any(b < 1 for b in args.batch):
        parser.error(f"--batch: expected integers >= 1, got {args.batch}.")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads, say=False)
    device, flags = setup_device(args.device)
    dtype = getattr(torch, args.dtype)
    machine = machine_description(device)
    where = (f"{machine['gpu']}, torch CPU threads: {machine['torch_threads']}" if machine.get("gpu") else
             f"CPU: {machine['cpu']}, {machine['cpu_count']} cores, torch threads: {machine['torch_threads']}")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cases = []
    for name in args.config:
        for batch in args.batch:
            rows = measure(name, batch, args.repeats, device, dtype, args.seed)
            print(f"#### {name}, B = {batch} products, {args.dtype} ({where}, torch {torch.__version__}, "
                  f"{date})\n\n{markdown(rows)}\n", flush=True)
            cases.append({"config": name, "batch": batch, "rows": rows})
    data = {"date": date, "machine": machine, "device_flags": flags, "dtype": args.dtype,
            "repeats": args.repeats, "cases": cases}
    if args.json:
        write_json(args.json, data, indent=1)
    return data


if __name__ == "__main__":
    main()
