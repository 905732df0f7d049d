"""The adapted model out of a block: ``meta.fmodel.state_dict()`` and ``meta.fmodel.to_module()``.

``state_dict()`` has the module's ``state_dict()`` keys (tied weights under each name, the
buffers), the fast weights where the inner loop adapts, every value detached; ``to_module()``
is a deep copy of the module at those weights, a real ``nn.Module`` for evaluation code. The
expected fast weights come from a hand-unrolled SGD loop (plain torch, float64).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metagrad as mg

DT = torch.float64
K, LR = 3, 0.1
ESTIMATORS = [mg.Full(), mg.Checkpointed(), mg.FirstOrder(), mg.Truncated(1), mg.Binomial(order=2),
              mg.Implicit(reg=1.0)]


class Net(nn.Module):
    """Linear → BatchNorm → tanh → Linear, the output layer tied to a second name."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4, dtype=DT)
        self.norm = nn.BatchNorm1d(4, dtype=DT)
        self.last = nn.Linear(4, 2, dtype=DT)
        self.alias = nn.Linear(4, 2, dtype=DT)
        self.alias.weight = self.last.weight  # tied: one Parameter, two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.tanh(self.norm(self.first(x))))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, 2, generator=g, dtype=DT)


def _net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # running statistics that differ from the defaults
        net.norm.running_mean.uniform_(-1, 1)
        net.norm.running_var.uniform_(0.5, 2)
    net.first.bias.requires_grad_(False)  # frozen: not a fast weight
    return net


def _unrolled(net: Net, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fast weights after K SGD steps, by hand (BatchNorm with batch statistics)."""
    w0, w1, b1 = (t.detach().requires_grad_() for t in (net.first.weight, net.last.weight, net.last.bias))
    b0, gamma, beta = net.first.bias, net.norm.weight.detach().requires_grad_(), net.norm.bias.detach().requires_grad_()
    params = [w0, gamma, beta, w1, b1]
    for _ in range(K):
        h = F.batch_norm(F.linear(x, params[0], b0), None, None, params[1], params[2], training=True)
        loss = F.mse_loss(F.linear(torch.tanh(h), params[3], params[4]), y)
        grads = torch.autograd.grad(loss, params)
        params = [p - LR * g for p, g in zip(params, grads)]
    return dict(zip(["first.weight", "norm.weight", "norm.bias", "last.weight", "last.bias"], params))


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_state_dict_has_the_module_keys_at_the_fast_weights(estimator):
    net = _net()
    x, y = _data()
    expected = _unrolled(net, x, y)
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    with mg.MetaGradient(net, inner_opt=mg.optim.SGD(lr=LR), estimator=estimator) as meta:
        for _ in range(K):
            meta.step(lambda f: F.mse_loss(f(x), y))
        state = meta.fmodel.state_dict()
    assert list(state) == list(net.state_dict())
    assert all(not t.requires_grad and t.grad_fn is None for t in state.values())
    for name, value in expected.items():
        if estimator.proximal is None:  # (Implicit's inner problem has a proximal term)
            torch.testing.assert_close(state[name], value.detach(), rtol=1e-12, atol=1e-14)
        assert not torch.equal(state[name], net.get_parameter(name).detach())
    assert torch.equal(state["alias.weight"], state["last.weight"])  # tied: the fast weight
    assert torch.equal(state["alias.bias"], net.alias.bias)  # not used by forward: as it is
    assert torch.equal(state["first.bias"], net.first.bias)  # frozen: as it is
    for name, value in buffers.items():
        assert torch.equal(state[name], value) and torch.equal(net.get_buffer(name), value)
    fresh = Net()
    fresh.load_state_dict(state)  # the keys another module of the class expects


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_to_module_is_a_module_at_the_fast_weights(estimator):
    net = _net()
    x, y = _data()
    before = {n: t.clone() for n, t in net.state_dict().items()}
    with mg.MetaGradient(net, inner_opt=mg.optim.SGD(lr=LR), estimator=estimator) as meta:
        for _ in range(K):
            meta.step(lambda f: F.mse_loss(f(x), y))
        adapted = meta.fmodel.to_module()
        fmodel_out = meta.fmodel(x).detach()
        net.eval()
        fmodel_eval = meta.fmodel(x).detach()
        net.train()
    assert isinstance(adapted, Net) and adapted is not net
    assert adapted.alias.weight is adapted.last.weight  # tied in the copy too
    assert [p.requires_grad for p in adapted.parameters()] == [p.requires_grad for p in net.parameters()]
    assert all(p.grad is None and p.grad_fn is None for p in adapted.parameters())
    adapted.eval()  # evaluation with the running statistics, as the fmodel in eval mode
    torch.testing.assert_close(adapted(x), fmodel_eval, rtol=1e-12, atol=1e-14)
    adapted.train()
    torch.testing.assert_close(adapted(x).detach(), fmodel_out, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        for p in adapted.parameters():
            p.add_(1.0)
    for name, value in before.items():  # the copy is its own: the module is untouched
        assert torch.equal(net.state_dict()[name], value), name


def test_with_adapt_only_the_adapted_weights_move():
    net = _net()
    x, y = _data()
    with mg.MetaGradient(net, inner_opt=mg.optim.SGD(lr=LR), estimator=mg.Checkpointed(), adapt=net.last) as meta:
        for _ in range(K):
            meta.step(lambda f: F.mse_loss(f(x), y))
        state = meta.fmodel.state_dict()
        adapted = meta.fmodel.to_module()
    assert torch.equal(state["first.weight"], net.first.weight.detach())
    assert not torch.equal(state["last.weight"], net.last.weight.detach())
    assert torch.equal(adapted.last.bias, meta_bias := state["last.bias"]) and meta_bias.grad_fn is None


def test_after_the_block_it_raises_clearly():
    net = _net()
    x, y = _data()
    with mg.MetaGradient(net, inner_opt=mg.optim.SGD(lr=LR), estimator=mg.Checkpointed()) as meta:
        meta.step(lambda f: F.mse_loss(f(x), y))
        fmodel = meta.fmodel
        kept = fmodel.to_module()
    with pytest.raises(RuntimeError, match=r"block has ended.*take meta\.fmodel\.to_module\(\)"):
        fmodel(x)
    assert kept(x).shape == (len(x), 2)  # what the error points to runs after the block, at φ_1
    assert not torch.equal(kept.last.weight, net.last.weight.detach())
    with pytest.raises(RuntimeError, match="block has ended"):
        fmodel.state_dict()
    with pytest.raises(RuntimeError, match="block has ended"):
        fmodel.to_module()


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_fmodel_first_read_under_no_grad_still_carries_the_meta_gradient(estimator):
    """Evaluating ``meta.fmodel`` under ``torch.no_grad()`` first, then building the query with
    grad enabled at the same step: the query reaches θ (it once held weights without a graph)."""
    net = _net()
    x, y = _data()
    with mg.MetaGradient(net, inner_opt=mg.optim.SGD(lr=LR), estimator=estimator) as meta:
        for _ in range(K):
            meta.step(lambda f: F.mse_loss(f(x), y))
        with torch.no_grad():
            meta.fmodel(x)
        F.mse_loss(meta.fmodel(x), y).backward()
    assert net.first.weight.grad is not None and net.first.weight.grad.any()
