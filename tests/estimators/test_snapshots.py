"""Snapshots: iterates stored at a thinned schedule, the rest recomputed during backward.

- ``Checkpointed(snapshots=S)`` (S = 1, S = K, uneven segments, ``"sqrt"``, ``max_memory``)
  equals a hand-unrolled float64 autograd loop written here (no metagrad inside) for θ and for
  the meta-parameters η (per-example weights the closure captures, a step size that requires
  grad, a body the inner loop does not adapt), to 1e-10.
- ``Binomial(block=S, snapshots=True)`` equals ``Binomial(block=S)``: the same computation, to
  1e-12.
- Stateful rules, dropout (replayed generator states) and a mini-batch loop give the same
  results with and without snapshots; a captured tensor changed in place after its step makes
  the recomputed step raise ``mg.ReplayError``; 200 meta-iterations leak nothing; and the loop
  as a user writes it, with a torch.optim outer optimizer.
"""

from __future__ import annotations

import gc
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import metagrad as mg

D = torch.float64
RTOL = 1e-10
SAME = 1e-12


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def problem(seed: int, n_batches: int = 3):
    """A 2-6-1 tanh MLP, mini-batches of 5 points, per-example weights (η) and a query."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).to(D)
    batches = [(torch.randn(5, 2, generator=gen, dtype=D), torch.randn(5, 1, generator=gen, dtype=D))
               for _ in range(n_batches)]
    weights = torch.rand(n_batches, 5, 1, generator=gen, dtype=D).add_(0.5).requires_grad_()
    query = (torch.randn(7, 2, generator=gen, dtype=D), torch.randn(7, 1, generator=gen, dtype=D))
    return model, batches, weights, query


def forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The MLP by hand from [W1, b1, W2, b2]."""
    return F.linear(torch.tanh(F.linear(x, params[0], params[1])), params[2], params[3])


def hand_unrolled(model, batches, weights, query, K, lr, adapted):
    """``∇ L_val(φ_K)`` with respect to θ (the model's parameters) and η (the weights, the step
    size when it is a tensor), through K steps of gradient descent unrolled by plain autograd
    with ``create_graph=True``. Parameters not in ``adapted`` stay at θ during the inner loop."""
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    phi = list(theta)
    for k in range(K):
        x, y = batches[k % len(batches)]
        loss = (weights[k % len(batches)] * (forward(phi, x) - y) ** 2).mean()
        index = [i for i in range(4) if adapted[i]]
        grads = torch.autograd.grad(loss, [phi[i] for i in index], create_graph=True)
        for i, g in zip(index, grads):
            phi[i] = phi[i] - lr * g
    query_loss = F.mse_loss(forward(phi, query[0]), query[1])
    eta = [weights] + ([lr] if isinstance(lr, torch.Tensor) else [])
    grads = torch.autograd.grad(query_loss, theta + eta)
    return flat(grads[:4]), [g.clone() for g in grads[4:]]


def package(model, batches, weights, query, K, lr, estimator, adapt=None, rule=None):
    """The same meta-gradient by metagrad: θ's (flattened), η's, and ``meta.info``."""
    for p in model.parameters():
        p.grad = None
    weights.grad = None
    if isinstance(lr, torch.Tensor):
        lr.grad = None
    rule = mg.optim.SGD(lr=lr) if rule is None else rule
    with mg.MetaGradient(model, rule, estimator=estimator, adapt=adapt) as meta:
        for k in range(K):
            (x, y), w = batches[k % len(batches)], weights[k % len(batches)]
            meta.step(lambda f: (w * (f(x) - y) ** 2).mean())
        F.mse_loss(meta.fmodel(query[0]), query[1]).backward()
    eta = [weights.grad] + ([lr.grad] if isinstance(lr, torch.Tensor) else [])
    # η's .grad stays None where the estimator keeps none of its terms (order 0: a weight of
    # the inner loss gets no gradient).
    return flat([p.grad for p in model.parameters()]), [g if g is None else g.clone() for g in eta], meta.info


SNAPSHOTS = st.one_of(st.integers(1, 14), st.just("sqrt"))


@settings(max_examples=40)
@given(seed=st.integers(0, 2**16), K=st.integers(1, 12), snapshots=SNAPSHOTS,
       learned_lr=st.booleans())
def test_checkpointed_snapshots_match_a_hand_unrolled_loop(seed, K, snapshots, learned_lr):
    model, batches, weights, query = problem(seed)
    lr = torch.tensor(0.3, dtype=D, requires_grad=True) if learned_lr else 0.3
    g_ref, eta_ref = hand_unrolled(model, batches, weights, query, K, lr, [True] * 4)
    g, eta, info = package(model, batches, weights, query, K, lr, mg.Checkpointed(snapshots=snapshots))
    assert rel_err(g, g_ref) <= RTOL
    for got, expected in zip(eta, eta_ref):
        assert rel_err(got, expected) <= RTOL
    limit = snapshots if snapshots != "sqrt" else math.isqrt(2 * K) + 1
    assert info["stored_iterates"] <= min(limit, K)
    # Every step past the last snapshot's segment start is recomputed once at most.
    assert info["recomputed_steps"] <= K


@pytest.mark.parametrize("K,snapshots", [(1, 1), (9, 1), (9, 9), (10, 4), (11, 3), (16, "sqrt"), (25, "sqrt")])
def test_checkpointed_snapshots_cases(K, snapshots):
    """S = 1 (one segment: everything recomputed from θ), S = K (nothing recomputed), uneven
    segments, and ``"sqrt"``; θ and the captured weights against the hand-unrolled loop."""
    model, batches, weights, query = problem(K)
    g_ref, eta_ref = hand_unrolled(model, batches, weights, query, K, 0.3, [True] * 4)
    g, eta, info = package(model, batches, weights, query, K, 0.3, mg.Checkpointed(snapshots=snapshots))
    assert rel_err(g, g_ref) <= RTOL and rel_err(eta[0], eta_ref[0]) <= RTOL
    if snapshots == K:
        assert info["stored_iterates"] == K and info["recomputed_steps"] == 0
    if snapshots == 1:
        assert info["stored_iterates"] == 1 and info["recomputed_steps"] == (K if K > 1 else 0)


def test_uniform_thinning_schedule():
    """S = 4, K = 10: the stride doubles at steps 4 and 8, leaving φ_0, φ_4, φ_8; backward
    recomputes the segments [0, 4), [4, 8) and [8, 10), each once, and holds at most the three
    snapshots and one segment's three iterates besides."""
    model, batches, weights, query = problem(1)
    _, _, info = package(model, batches, weights, query, 10, 0.3, mg.Checkpointed(snapshots=4))
    assert info["stored_iterates"] == 3
    assert info["recomputed_steps"] == 10
    assert info["peak_iterates"] == 6
    d = sum(p.numel() for p in model.parameters()) * 8
    assert info["peak_iterate_bytes"] == 6 * d
    _, _, plain = package(model, batches, weights, query, 10, 0.3, mg.Checkpointed())
    assert plain["stored_iterates"] == 10 and plain["recomputed_steps"] == 0
    assert plain["peak_iterate_bytes"] == 10 * d


def test_sqrt_stores_about_root_k():
    model, batches, weights, query = problem(2)
    K = 200
    _, _, info = package(model, batches, weights, query, K, 0.05, mg.Checkpointed(snapshots="sqrt"))
    assert math.sqrt(K / 2) <= info["stored_iterates"] <= math.sqrt(2 * K) + 1
    assert info["peak_iterates"] <= 2.2 * math.sqrt(K) + 2
    assert info["recomputed_steps"] == K


def test_non_adapted_body_is_a_meta_parameter():
    """ANIL: only the head adapts; the body's meta-gradient comes through the inner loop."""
    model, batches, weights, query = problem(5)
    K = 9
    g_ref, eta_ref = hand_unrolled(model, batches, weights, query, K, 0.3, [False, False, True, True])
    g, eta, _ = package(model, batches, weights, query, K, 0.3, mg.Checkpointed(snapshots=2),
                        adapt=["2.weight", "2.bias"])
    assert rel_err(g, g_ref) <= RTOL and rel_err(eta[0], eta_ref[0]) <= RTOL


def test_max_memory_holds_the_snapshots_and_a_segment_or_refuses_the_step():
    from metagrad.snapshots import RESERVE, most_steps

    model, batches, weights, query = problem(3)
    d = sum(p.numel() for p in model.parameters()) * 8  # float64, SGD: no optimizer state
    K = 12
    assert most_steps(5) < K <= most_steps(6)
    g_ref, eta_ref = hand_unrolled(model, batches, weights, query, K, 0.3, [True] * 4)
    g, eta, info = package(model, batches, weights, query, K, 0.3, mg.Checkpointed(max_memory=(RESERVE + 6) * d + 7))
    assert rel_err(g, g_ref) <= RTOL and rel_err(eta[0], eta_ref[0]) <= RTOL
    assert info["peak_iterates"] <= 6 and info["peak_iterate_bytes"] <= 6 * d
    smallest = f"smallest budget for {most_steps(5) + 1} steps is {(RESERVE + 6) * d} bytes"
    with pytest.raises(ValueError, match=r"Checkpointed\(max_memory\): got .*" + smallest):
        package(model, batches, weights, query, K, 0.3, mg.Checkpointed(max_memory=(RESERVE + 6) * d - 1))
    with pytest.raises(ValueError, match=r"Checkpointed\(max_memory\): got 8 bytes"):
        package(model, batches, weights, query, K, 0.3, mg.Checkpointed(max_memory=8))
    with_adam = sum(p.numel() for p in model.parameters()) * 8 * 3 + 8  # φ, Adam's two moments, its count
    _, _, info = package(model, batches, weights, query, K, 0.3,
                         mg.Checkpointed(max_memory="%dB" % ((RESERVE + 6) * with_adam + 10)),
                         rule=mg.optim.Adam(lr=0.01))
    assert info["peak_iterates"] <= 6


# --------------------------------------------------------------- blocked binomial on snapshots
@settings(max_examples=30)
@given(seed=st.integers(0, 2**16), K=st.integers(1, 16), block=st.integers(1, 6), order=st.integers(0, 3),
       monitor=st.booleans(), learned_lr=st.booleans())
def test_blocked_binomial_snapshots_change_nothing(seed, K, block, order, monitor, learned_lr):
    model, batches, weights, query = problem(seed)
    lr = torch.tensor(0.05, dtype=D, requires_grad=True) if learned_lr else 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mg.MetaGradientWarning)  # accuracy warnings: both alike
        g0, eta0, info0 = package(model, batches, weights, query, K, lr,
                                  mg.Binomial(order, block=block, monitor=monitor))
        g1, eta1, info1 = package(model, batches, weights, query, K, lr,
                                  mg.Binomial(order, block=block, monitor=monitor, snapshots=True))
    assert rel_err(g1, g0) <= SAME
    for got, expected in zip(eta1, eta0):
        assert (got is None) == (expected is None)
        assert got is None or rel_err(got, expected) <= SAME
    assert info1["stored_iterates"] == math.ceil(K / block)
    assert info1["peak_iterates"] <= math.ceil(K / block) + 2 * block
    assert info0["recomputed_steps"] == 0 and info1["recomputed_steps"] <= K


def test_blocked_binomial_snapshots_memory():
    """K = 100, blocks of 10: 10 snapshots and at most two segments of 9 recomputed iterates."""
    model, batches, weights, query = problem(4)
    _, _, plain = package(model, batches, weights, query, 100, 0.02, mg.Binomial(2, block=10))
    _, _, lean = package(model, batches, weights, query, 100, 0.02, mg.Binomial(2, block=10, snapshots=True))
    assert plain["peak_iterates"] == 100
    assert lean["stored_iterates"] == 10 and lean["peak_iterates"] <= 10 + 18
    assert lean["recomputed_steps"] == 100


# --------------------------------------------------------------- stateful rules, dropout, batches
RULES = {"Momentum": lambda: mg.optim.Momentum(lr=0.05, momentum=0.9),
         "Adam": lambda: mg.optim.Adam(lr=0.02)}


@pytest.mark.parametrize("rule", RULES)
def test_stateful_rules_with_and_without_snapshots(rule):
    model, batches, weights, query = problem(6)
    K = 11
    full, eta_full, _ = package(model, batches, weights, query, K, 0.0, mg.Full(), rule=RULES[rule]())
    plain, eta_plain, _ = package(model, batches, weights, query, K, 0.0, mg.Checkpointed(), rule=RULES[rule]())
    for snapshots in (1, 3, "sqrt"):
        g, eta, _ = package(model, batches, weights, query, K, 0.0, mg.Checkpointed(snapshots=snapshots),
                            rule=RULES[rule]())
        assert rel_err(g, plain) <= SAME and rel_err(eta[0], eta_plain[0]) <= SAME
        assert rel_err(g, full) <= RTOL and rel_err(eta[0], eta_full[0]) <= RTOL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mg.MetaGradientWarning)
        b0, e0, _ = package(model, batches, weights, query, K, 0.0, mg.Binomial(2, block=3), rule=RULES[rule]())
        b1, e1, _ = package(model, batches, weights, query, K, 0.0, mg.Binomial(2, block=3, snapshots=True),
                            rule=RULES[rule]())
    assert rel_err(b1, b0) <= SAME and rel_err(e1[0], e0[0]) <= SAME


def dropout_run(estimator, K=9):
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 1)).to(D)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 2, generator=gen, dtype=D), torch.randn(6, 1, generator=gen, dtype=D)
    torch.manual_seed(12)  # the same draws in every run
    with mg.MetaGradient(model, mg.optim.SGD(lr=0.2), estimator=estimator) as meta:
        for _ in range(K):
            meta.step(lambda f: F.mse_loss(f(x), y))
        model.eval()
        F.mse_loss(meta.fmodel(x), y).backward()
        model.train()
    return flat([p.grad for p in model.parameters()]), meta.info


def test_dropout_closures_are_replayed_in_the_recompute():
    full, _ = dropout_run(mg.Full())
    plain, _ = dropout_run(mg.Checkpointed())
    for snapshots in (1, 2, "sqrt"):
        g, info = dropout_run(mg.Checkpointed(snapshots=snapshots))
        assert info["recomputed_steps"] > 0
        assert rel_err(g, plain) <= SAME and rel_err(g, full) <= RTOL
    b0, _ = dropout_run(mg.Binomial(3, block=3))
    b1, _ = dropout_run(mg.Binomial(3, block=3, snapshots=True))
    assert rel_err(b1, b0) <= SAME and rel_err(b1, full) <= RTOL  # order ≥ block: exact


def test_minibatch_loop_captures_each_batch():
    """``for xb, yb in batches: meta.step(lambda f: ...)``: every recomputed step sees its batch."""
    model, _, _, query = problem(8)
    gen = torch.Generator().manual_seed(9)
    batches = [(torch.randn(4, 2, generator=gen, dtype=D), torch.randn(4, 1, generator=gen, dtype=D))
               for _ in range(13)]

    def run(estimator):
        model.zero_grad()
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.2), estimator=estimator) as meta:
            for xb, yb in batches:
                meta.step(lambda f: F.mse_loss(f(xb), yb))
            F.mse_loss(meta.fmodel(query[0]), query[1]).backward()
        return flat([p.grad for p in model.parameters()])

    plain = run(mg.Checkpointed())
    for snapshots in (1, 4, "sqrt"):
        assert rel_err(run(mg.Checkpointed(snapshots=snapshots)), plain) <= SAME
    assert rel_err(run(mg.Binomial(2, block=4, snapshots=True)), run(mg.Binomial(2, block=4))) <= SAME


# --------------------------------------------------------------- the replay check
@pytest.mark.parametrize("estimator", [mg.Checkpointed(snapshots=2), mg.Binomial(2, block=4, snapshots=True)],
                         ids=repr)
def test_replay_check_fires_on_a_recomputed_step(estimator):
    """A captured tensor changed in place after step 5 (not a snapshot): recomputing its segment
    gives a different loss there, and the check names the tensor."""
    model, batches, _, query = problem(10)
    xs = [batches[k % 3][0].clone() for k in range(8)]
    y = batches[0][1]
    with pytest.raises(mg.ReplayError) as error:
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.2), estimator=estimator) as meta:
            for k in range(8):
                x = xs[k]
                meta.step(lambda f: F.mse_loss(f(x), y))
            xs[5].mul_(1.5)
            F.mse_loss(meta.fmodel(query[0]), query[1]).backward()
    message = str(error.value)
    assert "inner step 5" in message and "['x']" in message and "in place" in message


def test_recomputed_iterate_is_checked_against_the_next_snapshot():
    """A rule that reads Python state which moved on at the last step of a segment: no loss can
    see it (each loss comes before its update), the iterate at the next snapshot does.

    K = 8, S = 2: the snapshots are φ_0 and φ_4; backward first recomputes steps 4 … 7, the
    rule's calls 9 … 12, and the 12th scales the step."""

    class Drifting(mg.optim.SGD):
        calls = 0

        def step(self, params, grads, state):
            Drifting.calls += 1
            scale = 1.2 if Drifting.calls == 12 else 1.0
            return {n: p - scale * 0.2 * grads[n] for n, p in params.items()}, state

    model, batches, _, query = problem(11)
    x, y = batches[0]
    with pytest.raises(mg.ReplayError, match=r"inner step 7, rebuilt during backward, is not the step .*‖Φ\(φ_7\) − φ_8‖"):
        with mg.MetaGradient(model, Drifting(lr=0.2), estimator=mg.Checkpointed(snapshots=2),
                             check_replay=1e-6) as meta:
            for _ in range(8):
                meta.step(lambda f: F.mse_loss(f(x), y))
            F.mse_loss(meta.fmodel(query[0]), query[1]).backward()


# --------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,error,match", [
    ({"snapshots": 0}, ValueError, r"Checkpointed\(snapshots\): expected an integer >= 1, 'sqrt' or None, got 0"),
    ({"snapshots": -3}, ValueError, r"got -3"),
    ({"snapshots": "x"}, ValueError, r"Checkpointed\(snapshots\): expected .*'sqrt'.*got str 'x'"),
    ({"snapshots": 2.5}, TypeError, r"Checkpointed\(snapshots\): expected an integer >= 1, 'sqrt' or None, got float"),
    ({"snapshots": True}, TypeError, r"got bool True"),
    ({"snapshots": 4, "max_memory": "1GiB"}, ValueError, r"not both; got snapshots=4 and max_memory='1GiB'"),
    ({"max_memory": "lots"}, ValueError, r"Checkpointed\(max_memory\)"),
    ({"max_memory": 0}, ValueError, r"Checkpointed\(max_memory\)"),
])
def test_checkpointed_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        mg.Checkpointed(**kwargs)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"order": 2, "snapshots": True}, ValueError, r"Binomial\(snapshots\): .*integer block; got order=2, block=None"),
    ({"order": "auto", "block": 4, "snapshots": True}, ValueError, r"got order='auto', block=4"),
    ({"order": "auto", "block": "auto", "snapshots": True}, ValueError, r"Binomial\(snapshots\)"),
    ({"order": 2, "block": 4, "snapshots": "yes"}, TypeError, r"Binomial\(snapshots\): expected True or False, got str 'yes'"),
])
def test_binomial_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        mg.Binomial(**kwargs)


def test_repr_round_trips():
    for estimator in (mg.Checkpointed(), mg.Checkpointed(snapshots=3), mg.Checkpointed(snapshots="sqrt"),
                      mg.Checkpointed(max_memory="1GiB"), mg.Binomial(2, block=4, snapshots=True)):
        assert eval(repr(estimator), {**vars(mg), "Checkpointed": mg.Checkpointed}) == estimator


# --------------------------------------------------------------- leaks, and the loop as users write it
def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


@pytest.mark.parametrize("estimator", [mg.Checkpointed(snapshots="sqrt"), mg.Checkpointed(snapshots=2),
                                       mg.Binomial(2, block=3, snapshots=True)], ids=repr)
def test_two_hundred_meta_iterations_leak_nothing(estimator):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    outer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.linspace(-2, 2, 10).unsqueeze(1)
    y = torch.sin(x)

    def meta_iteration():
        outer.zero_grad()
        with mg.MetaGradient(model, inner_opt=mg.optim.Adam(lr=0.01), estimator=estimator) as meta:
            for _ in range(9):
                meta.step(lambda f: F.mse_loss(f(x), y))
            F.mse_loss(meta.fmodel(x), y).backward()
        assert meta.info["recomputed_steps"] > 0
        outer.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mg.MetaGradientWarning)
        for _ in range(3):
            meta_iteration()
        before = live_tensors()
        for _ in range(200):
            meta_iteration()
        after = live_tensors()
    assert after <= before, f"{after - before} tensors more after 200 meta-iterations"


def test_as_a_user_writes_it():
    """A long inner loop on mini-batches, ``Checkpointed(snapshots="sqrt")``, torch.optim's Adam
    outside; the first meta-gradient equals Full's, and training lowers the query loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    outer = torch.optim.Adam(model.parameters(), lr=1e-2)
    inner_opt = mg.optim.SGD(lr=0.05)
    x = torch.linspace(-2, 2, 40).unsqueeze(1)
    y = torch.sin(2 * x)
    batches = [(x[i::4], y[i::4]) for i in range(4)]

    def meta_step(estimator):
        outer.zero_grad()
        with mg.MetaGradient(model, inner_opt, estimator=estimator) as meta:
            for epoch in range(10):
                for xb, yb in batches:
                    meta.step(lambda fmodel: F.mse_loss(fmodel(xb), yb))
            query = F.mse_loss(meta.fmodel(x), y)
            query.backward()
        return query.item(), meta.info

    meta_step(mg.Full())
    full = [p.grad.clone() for p in model.parameters()]
    first, info = meta_step(mg.Checkpointed(snapshots="sqrt"))
    assert info["stored_iterates"] <= math.isqrt(80) + 1 and info["recomputed_steps"] == 40
    for p, expected in zip(model.parameters(), full):
        assert torch.allclose(p.grad, expected, rtol=1e-4, atol=1e-6)  # float32
    for _ in range(15):
        outer.step()
        last, _ = meta_step(mg.Checkpointed(snapshots="sqrt"))
    assert last < first
