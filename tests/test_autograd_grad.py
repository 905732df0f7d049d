"""``torch.autograd.grad(query_loss, [η…])``: only the meta-parameters' gradient (README,
"Meta-parameters").

Learning to reweight takes the per-example weights' gradient and leaves the model's ``.grad``
for the real step. For every estimator, ``torch.autograd.grad`` must return what
``.backward()`` would accumulate into each η's ``.grad``, and leave every ``.grad`` (the
model's, η's) as it was. Where an estimator gives an η nothing through the inner loop
(FirstOrder keeps no second derivative; Implicit gives a step size nothing), ``.backward()``
leaves its ``.grad`` as it was, and ``torch.autograd.grad`` returns zeros after the same
warning, with or without ``allow_unused``, instead of torch's "appears to not have been used
in the graph". The exact estimators are also checked against a hand-unrolled loop in float64.
"""

from __future__ import annotations

import warnings
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metagrad as mg

DT = torch.float64
RTOL = 1e-10
K = 3

ESTIMATORS = [mg.Full(), mg.Checkpointed(), mg.Checkpointed(snapshots="sqrt"), mg.FirstOrder(),
              mg.Truncated(2), mg.Binomial(order=2), mg.Implicit(reg=1.0)]


class Task:
    """A regression task whose inner loss has per-example weights from a hypernetwork (a
    non-leaf η), a weight decay ``exp(log_wd)`` (a leaf η), and a learned step size."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
            self.hyper = nn.Linear(3, 6).to(DT)
        self.z = torch.randn(3, generator=g, dtype=DT)
        self.x, self.y = torch.randn(6, 2, generator=g, dtype=DT), torch.randn(6, 1, generator=g, dtype=DT)
        self.x_q, self.y_q = torch.randn(6, 2, generator=g, dtype=DT), torch.randn(6, 1, generator=g, dtype=DT)
        self.log_wd = torch.tensor(-3.0, dtype=DT, requires_grad=True)
        self.lr = torch.tensor(0.2, dtype=DT, requires_grad=True)

    @property
    def eta(self) -> list[torch.Tensor]:
        """The leaves whose gradient is asked for: the step size, the weight decay, the
        hypernetwork's parameters."""
        return [self.lr, self.log_wd, *self.hyper.parameters()]

    def inner(self, out: torch.Tensor, params, w: torch.Tensor) -> torch.Tensor:
        decay = self.log_wd.exp() * sum((p ** 2).sum() for p in params)
        return (w * ((out - self.y) ** 2).squeeze(-1)).mean() + decay

    def query(self, out: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, self.y_q)

    def package(self, estimator: mg.Estimator, by: str, allow_unused: bool = False
                ) -> list[Optional[torch.Tensor]]:
        """η's gradient by ``torch.autograd.grad`` (``by="grad"``) or ``.backward()``."""
        w = torch.sigmoid(self.hyper(self.z))  # computed before the block: a non-leaf η
        with mg.MetaGradient(self.model, inner_opt=mg.optim.SGD(lr=self.lr), estimator=estimator) as meta:
            for _ in range(K):
                meta.step(lambda f: self.inner(f(self.x), f.params.values(), w))
            query = self.query(meta.fmodel(self.x_q))
            if by == "grad":
                return list(torch.autograd.grad(query, self.eta, allow_unused=allow_unused))
            query.backward()
        return [t.grad for t in self.eta]

    def unrolled(self) -> list[torch.Tensor]:
        """The exact η-gradient: autograd through a hand-unrolled loop (plain torch)."""
        w = torch.sigmoid(self.hyper(self.z))
        params = [p.detach().requires_grad_() for p in self.model.parameters()]

        def forward(ps, x):
            return F.linear(torch.tanh(F.linear(x, ps[0], ps[1])), ps[2], ps[3])

        for _ in range(K):
            grads = torch.autograd.grad(self.inner(forward(params, self.x), params, w), params, create_graph=True)
            params = [p - self.lr * g for p, g in zip(params, grads)]
        return list(torch.autograd.grad(self.query(forward(params, self.x_q)), self.eta))


def _sentinels(task: Task) -> list[torch.Tensor]:
    """Give every model parameter a ``.grad`` (as after the real step's backward); return them."""
    for p in task.model.parameters():
        p.grad = torch.full_like(p, 7.0)
    return [p.grad.clone() for p in task.model.parameters()]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).norm().item() <= RTOL * max(b.norm().item(), 1e-12)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_autograd_grad_gives_what_backward_gives_and_touches_no_grad(estimator):
    task = Task()
    before = _sentinels(task)
    with warnings.catch_warnings(record=True) as caught_grad:
        warnings.simplefilter("always")
        by_grad = task.package(estimator, "grad")
    for p, saved in zip(task.model.parameters(), before):
        assert torch.equal(p.grad, saved), "torch.autograd.grad changed the model's .grad"
    assert all(t.grad is None for t in task.eta), "torch.autograd.grad wrote an η's .grad"
    for p in task.model.parameters():
        p.grad = None
    with warnings.catch_warnings(record=True) as caught_backward:
        warnings.simplefilter("always")
        by_backward = task.package(estimator, "backward")
    assert [str(w.message) for w in caught_grad] == [str(w.message) for w in caught_backward]
    assert all(p.grad is not None for p in task.model.parameters())  # .backward() fills θ's
    for i, (g, b) in enumerate(zip(by_grad, by_backward)):
        assert g is not None, f"η {i}: no gradient from torch.autograd.grad"
        if b is None:  # nothing through the inner loop: .backward() leaves .grad None
            assert not g.any(), f"η {i}: expected zeros"
        else:
            assert _close(g, b), f"η {i}: torch.autograd.grad and .backward() differ"
    if estimator.exact:
        for i, (g, e) in enumerate(zip(by_grad, task.unrolled())):
            assert _close(g, e), f"η {i}: differs from the hand-unrolled loop"


@pytest.mark.parametrize("allow_unused", [False, True])
def test_first_order_gives_zeros_after_its_warning(allow_unused):
    """FirstOrder gives the η of the inner loss nothing through the inner loop: it warns, then
    torch.autograd.grad returns zeros for them (no torch "not used in the graph" error), and
    the step size its step-size part."""
    task = Task()
    with pytest.warns(mg.MetaGradientWarning, match=r"FirstOrder: the meta-parameters .* get no gradient"):
        lr, log_wd, *hyper = task.package(mg.FirstOrder(), "grad", allow_unused=allow_unused)
    assert lr is not None and lr.abs().item() > 0
    for g, t in zip([log_wd, *hyper], [task.log_wd, *task.hyper.parameters()]):
        assert g is not None and g.shape == t.shape and not g.any()


def test_implicit_gives_a_step_size_zeros_after_its_warning():
    task = Task()
    with pytest.warns(mg.MetaGradientWarning, match=r"Implicit: the step sizes"):
        (lr,) = torch.autograd.grad(*_query_and(task, mg.Implicit(reg=1.0), lambda: [task.lr]))
    assert lr is not None and not lr.any()


def _query_and(task: Task, estimator: mg.Estimator, inputs):
    """A query loss built in a block that has ended (backward after the block), and ``inputs()``."""
    w = torch.sigmoid(task.hyper(task.z))
    with mg.MetaGradient(task.model, inner_opt=mg.optim.SGD(lr=task.lr), estimator=estimator) as meta:
        for _ in range(K):
            meta.step(lambda f: task.inner(f(task.x), f.params.values(), w))
        query = task.query(meta.fmodel(task.x_q))
    return query, inputs()


@pytest.mark.parametrize("estimator", [mg.Checkpointed(), mg.FirstOrder()], ids=repr)
def test_backward_with_inputs_accumulates_as_before(estimator):
    """``.backward(inputs=[η])`` accumulates: an η FirstOrder gives nothing keeps ``.grad``
    ``None``, as with a plain ``.backward()``."""
    task = Task()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mg.MetaGradientWarning)
        query, inputs = _query_and(task, estimator, lambda: [task.lr, task.log_wd])
        query.backward(inputs=inputs)
    assert task.lr.grad is not None
    assert (task.log_wd.grad is None) == (not estimator.exact)
    assert all(p.grad is None for p in task.model.parameters())
