"""metagrad.replay: frozen closures, the replay check's switch, and the vmapped check's fallback.

The user patterns themselves (mini-batch loops, dropout, iterators, ...) are in
tests/test_user_patterns.py; here are the pieces they rest on.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import metagrad as mg
from metagrad import replay, trajectory

DT = torch.float64
K = 4


def make_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(DT)


def batches(count: int = K) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, generator=generator, dtype=DT), torch.randn(6, 2, generator=generator, dtype=DT))
            for _ in range(count)]


QUERY = (torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=DT),
         torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=DT))


def reference(net: torch.nn.Module, data, lr: torch.Tensor, log_wd: torch.Tensor) -> list[torch.Tensor]:
    """A hand-unrolled loop: the gradient of the query w.r.t. θ, lr and log_wd."""
    params = dict(net.named_parameters())
    for x, y in data:
        loss = F.mse_loss(torch.func.functional_call(net, params, (x,)), y) + log_wd.exp() * sum(
            (p ** 2).sum() for p in params.values())
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
    query = F.mse_loss(torch.func.functional_call(net, params, (QUERY[0],)), QUERY[1])
    return list(torch.autograd.grad(query, [*net.parameters(), lr, log_wd]))


def metagrad_run(net, data, lr, log_wd, estimator, **kwargs) -> list[torch.Tensor]:
    for t in [*net.parameters(), lr, log_wd]:
        t.grad = None
    with mg.MetaGradient(net, mg.optim.SGD(lr=lr), estimator=estimator, **kwargs) as meta:
        for x, y in data:
            meta.step(lambda f: F.mse_loss(f(x), y) + log_wd.exp() * sum((p ** 2).sum() for p in f.params.values()))
        F.mse_loss(meta.fmodel(QUERY[0]), QUERY[1]).backward()
    return [t.grad.clone() for t in [*net.parameters(), lr, log_wd]]


def assert_close_all(got, expected) -> None:
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_vmapped_rows_that_miss_the_tolerance_are_rebuilt_alone(monkeypatch):
    """A batched call whose rows fail the check (as a batched kernel's rounding can make them
    fail) recomputes those rows one at a time; the θ- and η-gradients stay exact."""
    net, data = make_net(), batches()
    lr = torch.tensor(0.2, dtype=DT, requires_grad=True)
    log_wd = torch.tensor(-2.0, dtype=DT, requires_grad=True)
    expected = reference(net, data, lr, log_wd)
    real = trajectory.check_step
    flagged: list[int] = []

    def strict_under_vmap(*args, **kwargs):
        if kwargs.get("raising", True):
            return real(*args, **kwargs)
        steps = args[0]
        rows = list(range(len(steps)))[::2]  # every other row "fails"
        flagged.extend(steps[i] for i in rows)
        return rows

    monkeypatch.setattr(trajectory, "check_step", strict_under_vmap)
    got = metagrad_run(net, data, lr, log_wd, mg.Binomial(order=K))
    assert flagged  # the vmapped path ran and some rows were redone alone
    assert_close_all(got, expected)


def test_a_real_mismatch_in_a_vmapped_row_still_raises():
    net, data = make_net(), batches()
    lr = torch.tensor(0.2, dtype=DT, requires_grad=True)
    log_wd = torch.tensor(-2.0, dtype=DT, requires_grad=True)
    x = data[0][0].clone()
    with pytest.raises(mg.ReplayError, match="in place"):
        with mg.MetaGradient(net, mg.optim.SGD(lr=lr), estimator=mg.Binomial(order=K)) as meta:
            for _ in range(K):
                meta.step(lambda f: F.mse_loss(f(x), data[0][1]))
                x.add_(0.5)
            F.mse_loss(meta.fmodel(QUERY[0]), QUERY[1]).backward()


@pytest.mark.parametrize("value", ["yes", 0, -1e-3, float("nan"), None])
def test_check_replay_rejects_what_it_cannot_use(value):
    with pytest.raises(ValueError, match="check_replay"):
        mg.MetaGradient(make_net(), mg.optim.SGD(lr=0.1), estimator="checkpointed", check_replay=value)


def test_check_replay_sets_the_tolerance_and_false_turns_it_off():
    """With the check off, an iterator read inside the closure is rebuilt with other batches
    and nothing says so (the documented cost of check_replay=False); with a tolerance it raises."""
    net = make_net()
    data = batches(2 * K)

    def run(check):
        it = iter(data)

        def closure(f):
            x, y = next(it)
            return F.mse_loss(f(x), y)

        with mg.MetaGradient(net, mg.optim.SGD(lr=0.2), estimator="checkpointed", check_replay=check) as meta:
            for _ in range(K):
                meta.step(closure)
            F.mse_loss(meta.fmodel(QUERY[0]), QUERY[1]).backward()

    with pytest.raises(mg.ReplayError):
        run(1e-4)
    run(False)


def test_frozen_closure_keeps_the_values_a_loop_variable_had():
    values = []
    frozen = []
    for i in range(3):
        frozen.append(replay.freeze(lambda: values.append(i) or i))
    assert [f() for f in frozen] == [0, 1, 2]


def test_frozen_partial_and_defaults_and_method():
    class Holder:
        def __init__(self) -> None:
            self.scale = 2.0

        def loss(self, x):
            return self.scale * x

    tensor = torch.ones(2)
    part = replay.freeze(functools.partial(torch.add, tensor, other=torch.ones(2)))
    torch.testing.assert_close(part(), torch.full((2,), 2.0))
    holder = Holder()
    method = replay.freeze(holder.loss)
    holder.scale = 3.0  # state read through an object is not frozen: the check guards it
    assert float(method(torch.ones(()))) == 3.0
    a = torch.zeros(3)

    def make(t):
        return lambda f, t=t: t + f

    first, second = replay.freeze(make(a)), replay.freeze(make(torch.ones(3)))
    assert first.key == second.key  # same code, tensors of one shape: batchable together
    assert first.tensors[0][1] is a
    assert replay.freeze(make(torch.ones(4))).key != first.key  # another shape


def test_frozen_key_separates_tensors_that_require_grad():
    """A tensor that requires grad is a meta-parameter: another one makes another closure."""
    u, w = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    assert replay.freeze(lambda f: f + u).key != replay.freeze(lambda f: f + w).key


@pytest.mark.parametrize("make_estimator", [mg.Checkpointed, lambda: mg.Truncated(3)],
                         ids=["checkpointed", "truncated-K"])
def test_steps_taken_under_autocast_are_rebuilt_under_it(make_estimator):
    """An inner loop inside ``torch.autocast`` (mixed precision) and a backward outside it: the
    rebuilt steps run under the autocast they were taken in, and give the unrolled gradient.
    (Binomial is left out: its products ``(J − I)u`` are differences of nearly equal vectors,
    which bfloat16 cannot resolve; it is replayed the same way.)"""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    data = [(x.float(), y.float()) for x, y in batches(3)]
    xq, yq = QUERY[0].float(), QUERY[1].float()

    params = dict(net.named_parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for x, y in data:
            loss = F.mse_loss(torch.func.functional_call(net, params, (x,)).float(), y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {n: p - 0.1 * g for (n, p), g in zip(params.items(), grads)}
    expected = torch.autograd.grad(F.mse_loss(torch.func.functional_call(net, params, (xq,)), yq),
                                   list(net.parameters()))

    with mg.MetaGradient(net, mg.optim.SGD(lr=0.1), estimator=make_estimator()) as meta:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for x, y in data:
                meta.step(lambda f: F.mse_loss(f(x).float(), y))
        F.mse_loss(meta.fmodel(xq), yq).backward()
    for p, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)
