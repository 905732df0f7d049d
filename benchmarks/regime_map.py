"""The regime map: meta-gradient error against K·α·ℓ, per estimator.

On the 1-40-40-1 ReLU sinusoid net of MATH.md (float64, one task, random init), it
sweeps the inner step size α at fixed K, and records for FirstOrder, Truncated(L) and
Binomial(L) the relative error against the exact meta-gradient, with K·α·ℓ estimated
by :func:`metagrad.diagnose` (power iteration over the inner iterates). It prints a
Markdown table and writes a log-log plot, ``regime_map.png``, into the folder ``--out``
(``docs/regime_map.png`` is this command's)::

    python -m benchmarks.regime_map --K 5 20 --out docs
"""

from __future__ import annotations

import math
import os
import platform
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import metagrad as mg

if __package__ in (None, ""):  # run as a file: examples.cli from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.cli import (add_json_argument, add_seed_argument, add_threads_argument, make_parser,  # noqa: E402
                          set_threads, write_json)

ORDERS = (1, 2, 3)


BLOCK = 5


def estimators() -> list[mg.Estimator]:
    """FirstOrder, Truncated(1…3), Binomial(1…3) (tight grouping: nothing but the values), and
    the blocked Binomial(2…3) in blocks of 5 steps."""
    return ([mg.FirstOrder()] + [mg.Truncated(L) for L in ORDERS]
            + [mg.Binomial(L, monitor=False) for L in ORDERS]
            + [mg.Binomial(L, block=BLOCK, monitor=False) for L in (2, 3)] + [mg.Full()])


def label(estimator: mg.Estimator) -> str:
    if isinstance(estimator, mg.Truncated):
        return f"Truncated({estimator.steps})"
    if isinstance(estimator, mg.Binomial) and estimator.block is not None:
        return f"Binomial({estimator.order}, block={estimator.block})"
    if isinstance(estimator, mg.Binomial):
        return f"Binomial({estimator.order})"
    return type(estimator).__name__


def sweep(K: int, alphas: Sequence[float], seed: int) -> list[dict]:
    """One row per α: K·α·ℓ and each estimator's relative error."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40),
                                torch.nn.ReLU(), torch.nn.Linear(40, 1)).double()
    g = torch.Generator().manual_seed(seed)
    amplitude, phase = 0.1 + 4.9 * torch.rand(1, generator=g), math.pi * torch.rand(1, generator=g)
    x = (10 * torch.rand(20, 1, generator=g) - 5).double()
    y = amplitude.double() * torch.sin(x + phase.double())
    x_s, y_s, x_q, y_q = x[:10], y[:10], x[10:], y[10:]
    rows = []
    for alpha in alphas:
        report = mg.diagnose(model, lambda f: F.mse_loss(f(x_s), y_s), steps=K,
                             inner_opt=mg.optim.SGD(alpha), query=lambda f: F.mse_loss(f(x_q), y_q),
                             estimators=[e for e in estimators() if getattr(e, "order", 0) <= K
                                         and getattr(e, "steps", 0) <= K
                                         and (getattr(e, "block", None) or 0) < K], repeats=1)
        row = {"K": K, "alpha": alpha, "k_alpha_ell": report.k_alpha_ell}
        row.update({label(r.estimator): r.relative_error for r in report.rows
                    if not isinstance(r.estimator, mg.Full)})
        rows.append(row)
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({r["K"] for r in rows})
    fig, axes = plt.subplots(1, len(steps), figsize=(6 * len(steps), 4.5), squeeze=False, sharey=True)
    names = [label(e) for e in estimators() if not isinstance(e, mg.Full)]
    styles = {"FirstOrder": dict(color="black", linestyle=":")}
    oranges, blues = ("#fdae6b", "#e6550d", "#7f2704"), ("#9ecae1", "#4292c6", "#08306b")
    for i, L in enumerate(ORDERS):  # darker = higher order
        styles[f"Truncated({L})"] = dict(color=oranges[i], linestyle="--", marker="s", ms=3)
        styles[f"Binomial({L})"] = dict(color=blues[i], linestyle="-", marker="o", ms=3)
        styles[f"Binomial({L}, block={BLOCK})"] = dict(color=("#74c476", "#238b45", "#00441b")[i],
                                                        linestyle="-.", marker="^", ms=3)
    for ax, K in zip(axes[0], steps):
        subset = sorted((r for r in rows if r["K"] == K), key=lambda r: r["k_alpha_ell"])
        for name in names:
            if name in subset[0]:
                ax.plot([r["k_alpha_ell"] for r in subset], [max(r[name], 1e-17) for r in subset],
                        label=name, **styles.get(name, {}))
        ax.axvline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"K = {K}")
        ax.set_xlabel("K·α·ℓ")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("relative error against the exact meta-gradient")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("1-40-40-1 ReLU sinusoid net, float64: where each estimator can be trusted")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--K", type=int, nargs="+", default=[5, 20], help="inner steps")
    parser.add_argument("--points", type=int, default=10, help="step sizes per K")
    parser.add_argument("--min", type=float, default=0.03, help="smallest K·α·ℓ aimed at")
    parser.add_argument("--max", type=float, default=10.0, help="largest K·α·ℓ aimed at")
    parser.add_argument("--ell", type=float, default=30.0, help="ℓ guess used to place the α grid")
    add_seed_argument(parser)
    parser.add_argument("--out", default=os.path.join("results", "regime_map"), metavar="DIR",
                        help="output folder for the plot, regime_map.png (a path ending in .png is still read "
                             "as the earlier form: the plot file itself)")
    add_json_argument(parser, "also write the rows as JSON here")
    add_threads_argument(parser, "torch CPU threads (torch.set_num_threads); 1: the net is 40 wide, so thread "
                                 "fan-out costs more than it saves")
    args = parser.parse_args(argv)
    if args.points < 2:
        parser.error("--points must be >= 2")
    set_threads(args.threads, say=False)
    png = args.out if args.out.endswith(".png") else os.path.join(args.out, "regime_map.png")
    rows = []
    for K in args.K:
        alphas = [args.min * (args.max / args.min) ** (i / (args.points - 1)) / (K * args.ell)
                  for i in range(args.points)]
        rows += sweep(K, alphas, args.seed)
    names = [label(e) for e in estimators() if not isinstance(e, mg.Full)]
    print(f"torch {torch.__version__}, {platform.machine()} CPU, {torch.get_num_threads()} torch "
          f"thread{'s' if torch.get_num_threads() != 1 else ''}, float64, seed {args.seed}")
    print("| K | α | K·α·ℓ | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for r in rows:
        print(f"| {r['K']} | {r['alpha']:.2e} | {r['k_alpha_ell']:.3g} | "
              + " | ".join(f"{r[n]:.1e}" if n in r else "—" for n in names) + " |")
    os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
    plot(rows, png)
    print(f"wrote {png}", file=sys.stderr)
    if args.json:
        write_json(args.json, rows, indent=1)


if __name__ == "__main__":
    main()
