"""Memory budgets: Binomial(max_memory=...) in place of a chunk size, and the iterates
Checkpointed and Binomial hold.

The chunk size is chosen from the measured bytes of one step graph and the stored iterates; a
budget below one product's need is refused with the smallest budget that works. The estimate
itself must not change: it equals the explicit subset sum of MATH.md (2), as without a budget.
The bounds are checked with the trajectory's counters and the plan's bytes (``meta.info``), not
with process memory (``python -m benchmarks.budget`` measures that).
"""

import json
import math
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import metagrad as mg
from benchmarks.budget import tensor_peak
from metagrad.estimators.binomial_control import GRAPH_FACTOR, ITERATE_FACTOR, VECTORS

from ._package import RTOL, meta_gradient, ref


@settings(max_examples=30)
@given(spec=ref.problem_specs(max_K=6), K=st.integers(1, 6), lr=ref.step_size_choices(),
       L=st.integers(0, 6), budget=st.sampled_from(["1KiB", "64KiB", "1MiB", "1GiB"]))
def test_budgeted_binomial_is_the_subset_sum(spec, K, lr, L, budget):
    problem = ref.build(spec)
    lr = ref.make_step_sizes(problem, lr)
    run = ref.unroll(problem, K, lr)
    L = min(L, K)
    expected, _ = ref.subset_sum(ref.factors(run), run.v, L)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mg.MetaGradientWarning)
        try:
            g, _ = meta_gradient(problem, mg.Binomial(L, max_memory=budget), K, lr)
        except ValueError as error:  # a small budget is refused with the smallest that works
            g, _ = meta_gradient(problem, mg.Binomial(L, max_memory=smallest(error)), K, lr)
    assert ref.rel_err(g, expected) <= RTOL


@settings(max_examples=20)
@given(spec=ref.problem_specs(max_K=6, varying=False), K=st.integers(1, 6), lr=ref.step_size_choices(),
       L=st.integers(0, 6), budget=st.sampled_from(["1KiB", "64KiB", "1MiB"]))
def test_budgeted_binomial_in_the_functional_face_is_the_subset_sum(spec, K, lr, L, budget):
    """``mg.functional.meta_grad`` called directly plans the same budget from the pure body's
    graph (``PureTrajectory.graph_bytes``); the estimate is MATH.md (2)'s subset sum whatever
    chunk size the budget gives (or, below one product, the smallest budget that works)."""
    problem = ref.build(spec)
    lr = ref.make_step_sizes(problem, lr)
    run = ref.unroll(problem, K, lr)
    L = min(L, K)
    expected, _ = ref.subset_sum(ref.factors(run), run.v, L)
    names = problem.names

    def loss_fn(params, which):  # which: 0.0 the inner loss (one batch: varying=False), 1.0 the query
        listed = [params[n] for n in names]
        return (1 - which) * problem.inner_loss(listed, 0) + which * problem.query_loss(listed)

    theta = dict(zip(names, problem.theta))
    zero, one = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)

    def call(max_memory):
        return mg.functional.meta_grad(loss_fn, theta, zero, one, inner_opt=mg.optim.SGD(lr=lr.package),
                                       steps=K, estimator=mg.Binomial(L, max_memory=max_memory))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mg.MetaGradientWarning)
        try:
            g = call(budget)
        except ValueError as error:  # a small budget is refused with the smallest that works
            g = call(smallest(error))
    assert ref.rel_err(ref.flat([g[n] for n in names]), expected) <= RTOL


def smallest(error):
    found = re.search(r"Binomial\(max_memory\): got .* smallest budget that works here is (\d+) bytes", str(error))
    assert found, str(error)
    return int(found.group(1))


def mlp_block(estimator, K=6, batch=64, width=32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 1)).double()
    x, y = torch.randn(batch, 8, dtype=torch.float64), torch.randn(batch, 1, dtype=torch.float64)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.01), estimator=estimator) as meta:
        for _ in range(K):
            meta.step(lambda f: F.mse_loss(f(x), y))
        F.mse_loss(meta.fmodel(x), y).backward()
    return meta.info, [p.grad.clone() for p in model.parameters()]


def test_chunk_size_follows_the_budget_and_the_measured_graph():
    info, _ = mlp_block(mg.Binomial(2, max_memory="1GiB"))
    graph = info["step_graph_bytes"]
    assert graph > 0
    assert info["chunk_size"] == 6  # a whole level fits
    iterate = (8 * 32 + 32 + 32 + 1) * 8
    # The 6 stored iterates, a level buffer of 6 vectors and VECTORS more, 3 products.
    planned = (6 + 6 + VECTORS) * iterate + 3 * int(GRAPH_FACTOR * graph + ITERATE_FACTOR * iterate)
    info, _ = mlp_block(mg.Binomial(2, max_memory=planned + 1))
    assert info["chunk_size"] == 3 and info["step_graph_bytes"] == graph
    assert info["planned_peak_bytes"] == planned and info["peak_iterate_bytes"] == 6 * iterate


def test_graph_bytes_grow_with_the_batch():
    small, _ = mlp_block(mg.Binomial(1, max_memory="1GiB"), batch=256)
    large, _ = mlp_block(mg.Binomial(1, max_memory="1GiB"), batch=512)
    ratio = large["step_graph_bytes"] / small["step_graph_bytes"]
    assert 1.6 < ratio < 2.1, ratio  # activations dominate; the parameters do not double


def test_a_budget_below_one_product_is_refused_with_the_smallest_that_works():
    with pytest.raises(ValueError, match=r"Binomial\(max_memory\): got 1000B \(1000 bytes\), below") as refused:
        mlp_block(mg.Binomial(2, max_memory=1000))
    need = smallest(refused.value)
    assert f"max_memory='{math.ceil(need / 2**20)}MiB'" in str(refused.value)
    info, g = mlp_block(mg.Binomial(2, max_memory=need))
    assert info["chunk_size"] == 1 and info["planned_peak_bytes"] == need
    with pytest.raises(ValueError, match="smallest budget that works here is %d bytes" % need):
        mlp_block(mg.Binomial(2, max_memory=need - 1))
    _, whole = mlp_block(mg.Binomial(2))
    for a, b in zip(g, whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("monitor", [True, False])
def test_the_tensors_backward_allocates_stay_within_the_plan(monitor):
    """Every byte the CPU allocator hands out during backward, from the profiler's records
    (exact sizes, not process memory), with the stored iterates: at most the budget. An MLP
    whose parameters dominate its step graph, the case where level vectors matter most."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)).double()
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    K, budget = 40, 6 * 2**20
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the level norms' accuracy warning
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.01),
                             estimator=mg.Binomial(2, max_memory=budget, monitor=monitor)) as meta:
            for _ in range(K):
                meta.step(lambda f: F.mse_loss(f(x), y))
            query = F.mse_loss(meta.fmodel(x), y)
            peak = tensor_peak(query.backward)
    info = meta.info
    assert 1 <= info["chunk_size"] < K - 1  # neither one product at a time nor a whole level
    assert info["planned_peak_bytes"] <= budget
    assert info["peak_iterate_bytes"] + peak <= budget, (info["peak_iterate_bytes"], peak, info)


def test_max_memory_and_chunk_size_together_are_refused():
    with pytest.raises(ValueError, match=r"max_memory.*not both"):
        mg.Binomial(2, chunk_size=4, max_memory="1GiB")


@pytest.mark.parametrize("bad,error", [("lots", ValueError), ("-2GiB", ValueError), (0, ValueError),
                                       (1.5e9, TypeError), (True, TypeError)])
def test_bad_budgets_name_the_argument(bad, error):
    with pytest.raises(error, match=r"Binomial\(max_memory\).*'2GiB'"):
        mg.Binomial(2, max_memory=bad)


def test_repr_shows_the_budget():
    assert "max_memory='2GiB'" in repr(mg.Binomial(3, max_memory="2GiB"))
    assert "max_memory='500MiB'" in repr(mg.Binomial(3, max_memory=500 * 2**20))


#: The measurement of :func:`test_cpu_peak_memory_of_backward_stays_within_the_budget`, run in a
#: fresh process with ``MALLOC_MMAP_THRESHOLD_=131072`` (large blocks go back to the system when
#: freed, so the peak follows tensor memory: metagrad.memory, benchmarks/budget.py). In the test
#: session's own process the peak resident set also holds what glibc kept from every test before,
#: and moved between runs from 104 to 168 MiB for the same backward.
_PEAK_SCRIPT = """
import json
import torch, torch.nn as nn, torch.nn.functional as F
import metagrad as mg
from metagrad.memory import peak_memory

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                      nn.ReLU(), nn.Flatten(), nn.Linear(16 * 32 * 32, 5))
x, y = torch.randn(20, 3, 32, 32), torch.randint(0, 5, (20,))

def backward_peak(estimator):
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.01), estimator=estimator) as meta:
        for _ in range(10):
            meta.step(lambda f: F.cross_entropy(f(x), y))
        loss = F.cross_entropy(meta.fmodel(x), y)
        with peak_memory("cpu") as mem:
            loss.backward()
    model.zero_grad()
    return mem

whole = backward_peak(mg.Binomial(2))  # K = 10: the stored iterates are small here
budgeted = backward_peak(mg.Binomial(2, max_memory=BUDGET))
print(json.dumps({"whole": whole.peak_bytes, "budgeted": budgeted.peak_bytes, "method": budgeted.method,
                  "description": budgeted.description}))
"""


def test_cpu_peak_memory_of_backward_stays_within_the_budget():
    """Process memory (metagrad.memory, VmHWM on Linux) of the backward alone, in a fresh process."""
    budget = 96 * 2**20
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT.replace("BUDGET", str(budget))],
                            capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert result.returncode == 0, result.stderr
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    if peaks["method"] != "proc_vmhwm":
        pytest.skip(f"needs a resettable peak-RSS counter ({peaks['description']})")
    whole, budgeted = peaks["whole"], peaks["budgeted"]
    # The plan counts tensors; the process also holds the C allocator's cache (metagrad.memory).
    assert budgeted <= 1.5 * budget, (budgeted, whole)
    assert whole > 1.3 * budgeted, (budgeted, whole)


@pytest.mark.parametrize("K", [3, 50, 200, 333])
def test_sqrt_snapshots_hold_about_two_sqrt_k_iterates(K):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.01), estimator=mg.Checkpointed("sqrt")) as meta:
        for _ in range(K):
            meta.step(lambda f: F.mse_loss(f(x), y))
        F.mse_loss(meta.fmodel(x), y).backward()
    assert meta.info["peak_iterates"] <= 2.13 * math.sqrt(K) + 1, meta.info


def test_checkpointed_and_binomial_show_a_memory_budget_alike():
    """Both reprs show ``max_memory`` as a string ``parse_bytes`` reads back (Checkpointed's
    showed a bare integer, Binomial's a string)."""
    from metagrad.memory import format_bytes, parse_bytes

    assert repr(mg.Checkpointed(max_memory="512MiB")) == "Checkpointed(max_memory='512MiB')"
    assert "max_memory='512MiB'" in repr(mg.Binomial(3, max_memory=512 * 2**20))
    for size in (1, 1000, 1024, 10**9, 2**30, 3 * 2**20 + 1):
        assert parse_bytes(format_bytes(size), "max_memory") == size
