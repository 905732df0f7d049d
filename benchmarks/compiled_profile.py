"""Where the time of ``MetaGradient(compile=True)`` goes, by cProfile.

One MAML meta-batch of benchmarks.compiled's problem (``--config sinusoid``: the 1-40-40-1
MLP; ``omniglot``: CNN4 on 28×28 5-way 1-shot; meta-batch 4, float32, one thread) with a compiled estimator, profiled over ``--runs`` meta-batches after two
warm-ups (compiling). The profiler's own overhead inflates Python-heavy parts, so the shares
are approximate; the absolute times are not the benchmark's. Shares of the profiled time:

- compiled kernels: the inductor-generated ``call`` functions (the kernels and their launch);
- compiled-call wrappers: TorchDynamo's and AOTAutograd's wrappers around them, guards included;
- the rest: eager torch ops (the query's forward and backward, each closure's first step, the
  replay check) and metagrad's Python (freezing closures, generator states, bookkeeping).

Run::

    python -m benchmarks.compiled_profile --estimator checkpointed --steps 5
"""

from __future__ import annotations

import cProfile
import pstats
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

if __package__ in (None, ""):  # run as a file: import the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metagrad as mg  # noqa: E402
from benchmarks.compiled import eager_metagradient, make_batch  # noqa: E402
from examples.cli import add_threads_argument, make_parser, set_threads  # noqa: E402

ESTIMATORS = {"checkpointed": lambda k: mg.Checkpointed(), "binomial3": lambda k: mg.Binomial(order=min(3, k), monitor=False)}


def shares(stats: pstats.Stats) -> dict[str, float]:
    """Seconds in compiled kernels, in the wrappers around them, and in all, from ``stats``."""
    table: Any = stats.stats  # type: ignore[attr-defined]
    kernels = wrappers = 0.0
    total = max(cum for (_, _, _, cum, _) in table.values())
    for (filename, _, name), (_, _, _, cum, _) in table.items():
        if "torchinductor" in filename and name == "call":
            kernels += cum
        elif filename.endswith("eval_frame.py") and name == "compile_wrapper":
            wrappers += cum
    return {"total_s": total, "kernels_s": kernels, "wrappers_s": max(wrappers - kernels, 0.0)}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    parser = make_parser(__doc__.split("\n\n")[0], prog="python -m benchmarks.compiled_profile")
    parser.add_argument("--estimator", choices=sorted(ESTIMATORS), default="checkpointed")
    parser.add_argument("--config", choices=["sinusoid", "omniglot"], default="sinusoid",
                        help="benchmarks.compiled's problem: the sinusoid MLP or CNN4 on 28×28 5-way 1-shot")
    parser.add_argument("--steps", type=int, default=5, help="inner steps K")
    parser.add_argument("--runs", type=int, default=20, help="profiled meta-batches")
    add_threads_argument(parser, "torch CPU threads")
    args = parser.parse_args(argv)
    set_threads(args.threads, say=False)
    batch = make_batch(args.steps, 0, args.config)
    run = eager_metagradient(batch, ESTIMATORS[args.estimator](args.steps), compile=True)
    run()
    run()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.runs):
        run()
    profile.disable()
    result = shares(pstats.Stats(profile))
    total = result["total_s"]
    rest = total - result["kernels_s"] - result["wrappers_s"]
    print(f"{args.config}, {args.estimator}, K = {args.steps}, {args.runs} meta-batches, torch threads {torch.get_num_threads()}: "
          f"{1e3 * total / args.runs:.2f} ms per meta-batch under the profiler")
    for label, seconds in (("compiled kernels", result["kernels_s"]), ("compiled-call wrappers", result["wrappers_s"]),
                           ("eager ops and Python", rest)):
        print(f"  {label:24s} {100 * seconds / total:5.1f}%")
    return result


if __name__ == "__main__":
    main()
