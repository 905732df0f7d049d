"""θ fixed: a model none of whose adapted parameters requires grad (README, "Meta-parameters").

Dataset distillation re-initializes the model every outer step and learns only the inputs of
the inner loss (synthetic images, optionally soft labels) and the inner step size. The fast
weights then start from the parameters' values, the parameters get no gradient, and the
meta-parameters η get what MATH.md's table defines for the estimator. With nothing at all to
learn (no η either), the query's backward raises, naming the argument.

Every expected value is computed here with plain torch in float64 (the model evaluated by hand
with ``F.linear`` from a list of tensors, nothing of metagrad):

- the exact η-gradient (Full, Checkpointed with or without snapshots, Truncated(K),
  Binomial(K)): autograd through a hand-unrolled loop (``create_graph=True``);
- Truncated(T): the same unroll with the first K−T steps' inner gradients detached (taken as
  constants, as MATH.md's table says: (3) over the last T steps, plus the step-size part of
  every earlier step with ``a_{K−T}``);
- Binomial(L): MATH.md's table evaluated with dense matrices: ``H_k`` by
  ``torch.autograd.functional.hessian``, the mixed part ``M_k = ∂(−α∇_φ L_tr)/∂η`` and the
  step-size part ``S_k = −∇_φ L_tr(φ_k)`` by autograd, and the adjoint expanded by order,
  ``a_k^{(j)} = a_{k+1}^{(j)} − αH_k a_{k+1}^{(j−1)}``: the mixed part takes orders ≤ L−1,
  the step-size part orders ≤ L.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import metagrad as mg

DT = torch.float64
RTOL = 1e-10
D_IN, HIDDEN, CLASSES = 3, 5, 3


# ---------------------------------------------------------------------------- the problem
@dataclass(frozen=True)
class Setup:
    """What Hypothesis draws."""

    K: int
    lr: float
    images: int
    soft_labels: bool
    seed: int


@dataclass
class Problem:
    theta: list[torch.Tensor]  # the fixed initialization: 0.weight, 0.bias, 2.weight, 2.bias
    x_syn: torch.Tensor  # learned inputs
    labels: torch.Tensor  # learned soft-label logits, or hard labels
    soft: bool
    x_q: torch.Tensor
    y_q: torch.Tensor


setups = st.builds(Setup, K=st.integers(1, 6), lr=st.floats(0.05, 0.6), images=st.integers(2, 4),
                   soft_labels=st.booleans(), seed=st.integers(0, 2 ** 16))


def make_problem(s: Setup) -> Problem:
    g = torch.Generator().manual_seed(s.seed)
    theta = [torch.randn(HIDDEN, D_IN, generator=g, dtype=DT) / D_IN ** 0.5,
             0.1 * torch.randn(HIDDEN, generator=g, dtype=DT),
             torch.randn(CLASSES, HIDDEN, generator=g, dtype=DT) / HIDDEN ** 0.5,
             0.1 * torch.randn(CLASSES, generator=g, dtype=DT)]
    x_syn = torch.randn(s.images, D_IN, generator=g, dtype=DT)
    if s.soft_labels:
        labels = torch.randn(s.images, CLASSES, generator=g, dtype=DT)
    else:
        labels = torch.arange(s.images) % CLASSES
    x_q = torch.randn(12, D_IN, generator=g, dtype=DT)
    y_q = torch.randint(0, CLASSES, (12,), generator=g)
    return Problem(theta, x_syn, labels, s.soft_labels, x_q, y_q)


def forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    w0, b0, w1, b1 = params
    return F.linear(torch.tanh(F.linear(x, w0, b0)), w1, b1)


def inner_loss(logits: torch.Tensor, labels: torch.Tensor, soft: bool) -> torch.Tensor:
    if soft:  # cross-entropy against learned soft labels
        return -(labels.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
    return F.cross_entropy(logits, labels)


def learned(p: Problem) -> list[torch.Tensor]:
    """The η of the inner loss: the images, and the soft labels if learned."""
    return [p.x_syn, p.labels] if p.soft else [p.x_syn]


# -------------------------------------------------------------------------- the reference
def unrolled(p: Problem, lr: float, K: int, constant_before: int = 0) -> list[torch.Tensor]:
    """d query / d (η of the inner loss…, lr) through a hand-unrolled loop; the inner gradients
    of steps before ``constant_before`` are constants (Truncated(K − constant_before))."""
    eta = [t.detach().requires_grad_() for t in learned(p)]
    alpha = torch.tensor(lr, dtype=DT, requires_grad=True)
    labels = eta[1] if p.soft else p.labels
    params = [t.detach().requires_grad_() for t in p.theta]
    for k in range(K):
        loss = inner_loss(forward(params, eta[0]), labels, p.soft)
        grads = torch.autograd.grad(loss, params, create_graph=k >= constant_before)
        params = [w - alpha * g for w, g in zip(params, grads)]
    query = F.cross_entropy(forward(params, p.x_q), p.y_q)
    return list(torch.autograd.grad(query, [*eta, alpha], allow_unused=True))


def binomial_reference(p: Problem, lr: float, K: int, order: int) -> list[torch.Tensor]:
    """MATH.md's table for Binomial(order), from dense H_k, M_k and S_k (module docstring)."""
    shapes = [t.shape for t in p.theta]
    sizes = [t.numel() for t in p.theta]
    eta0 = learned(p)
    eta_sizes = [t.numel() for t in eta0]

    def unflat(vector: torch.Tensor, like_shapes, like_sizes) -> list[torch.Tensor]:
        return [c.reshape(s) for c, s in zip(vector.split(like_sizes), like_shapes)]

    def loss_at(phi: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        eta = unflat(z, [t.shape for t in eta0], eta_sizes)
        labels = eta[1] if p.soft else p.labels
        return inner_loss(forward(unflat(phi, shapes, sizes), eta[0]), labels, p.soft)

    def grad_phi(phi: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        phi = phi.detach().requires_grad_() if not phi.requires_grad else phi
        return torch.autograd.grad(loss_at(phi, z), phi, create_graph=True)[0]

    z = torch.cat([t.reshape(-1) for t in eta0])
    phi = torch.cat([t.reshape(-1) for t in p.theta])
    hessians, mixed, step_size = [], [], []
    for _ in range(K):
        hessians.append(torch.autograd.functional.hessian(lambda w: loss_at(w, z), phi))
        mixed.append(torch.autograd.functional.jacobian(lambda e: -lr * grad_phi(phi, e), z))
        g = grad_phi(phi, z).detach()
        step_size.append(-g)
        phi = phi - lr * g
    phi = phi.detach().requires_grad_()
    v = torch.autograd.grad(F.cross_entropy(forward(unflat(phi, shapes, sizes), p.x_q), p.y_q), phi)[0]
    # a[k][j]: the order-j part of the adjoint a_k = J_kᵀ a_{k+1}, J_k = I − αH_k.
    a = [v] + [torch.zeros_like(v)] * order
    grad_z, grad_lr = torch.zeros_like(z), torch.zeros((), dtype=DT)
    for k in reversed(range(K)):
        grad_z = grad_z + mixed[k].T @ sum(a[:order])  # orders ≤ order − 1
        grad_lr = grad_lr + step_size[k] @ sum(a[:order + 1])  # orders ≤ order
        a = [a[0]] + [a[j] - lr * hessians[k] @ a[j - 1] for j in range(1, order + 1)]
    return [*unflat(grad_z, [t.shape for t in eta0], eta_sizes), grad_lr]


# -------------------------------------------------------------------------- the package
def model_at(theta: list[torch.Tensor]) -> nn.Module:
    """The module at θ, with no parameter that requires grad."""
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN, dtype=DT), nn.Tanh(), nn.Linear(HIDDEN, CLASSES, dtype=DT))
    with torch.no_grad():
        for param, value in zip(model.parameters(), theta):
            param.copy_(value)
    return model.requires_grad_(False)


def package(p: Problem, lr: float, K: int, estimator: mg.Estimator, *, by: str = "backward"
            ) -> list[Optional[torch.Tensor]]:
    """η's gradient from metagrad, by ``.backward()`` (the ``.grad``) or ``torch.autograd.grad``."""
    model = model_at(p.theta)
    eta = [t.detach().requires_grad_() for t in learned(p)]
    alpha = torch.tensor(lr, dtype=DT, requires_grad=True)
    x_syn = eta[0]
    labels = eta[1] if p.soft else p.labels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mg.MetaGradientWarning)  # Binomial's estimate warnings
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=alpha), estimator=estimator) as meta:
            for _ in range(K):
                meta.step(lambda f: inner_loss(f(x_syn), labels, p.soft))
            query = F.cross_entropy(meta.fmodel(p.x_q), p.y_q)
            if by == "grad":
                grads = list(torch.autograd.grad(query, [*eta, alpha]))
            else:
                query.backward()
                grads = [t.grad for t in [*eta, alpha]]
    for param, value in zip(model.parameters(), p.theta):
        assert param.grad is None and not param.requires_grad  # θ gets no gradient
        assert torch.equal(param, value)  # and is not modified
    return grads


def assert_close(actual: list[Optional[torch.Tensor]], expected: list[torch.Tensor], what: str) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a is not None, f"{what}: η {i} got no gradient"
        scale = max(e.norm().item(), 1e-12)
        error = (a - e).norm().item() / scale
        assert error <= RTOL, f"{what}: η {i} relative error {error:.3g}"


# ------------------------------------------------------------------------------ the tests
@settings(max_examples=12)
@given(s=setups, data=st.data())
def test_theta_fixed_every_estimator_against_a_hand_unrolled_loop(s, data):
    """Learned inputs (and soft labels) and a learned step size, θ fixed: Full, Checkpointed,
    Checkpointed(snapshots="sqrt"), Truncated(K) and Binomial(K) give the exact η-gradient;
    Truncated(T) and Binomial(L) what MATH.md's table defines for them."""
    p = make_problem(s)
    exact = unrolled(p, s.lr, s.K)
    for estimator in [mg.Full(), mg.Checkpointed(), mg.Checkpointed(snapshots="sqrt"),
                      mg.Truncated(s.K), mg.Binomial(order=s.K)]:
        assert_close(package(p, s.lr, s.K, estimator), exact, repr(estimator))
    T = data.draw(st.integers(1, s.K), label="T")
    assert_close(package(p, s.lr, s.K, mg.Truncated(T)), unrolled(p, s.lr, s.K, constant_before=s.K - T),
                 f"Truncated({T})")
    L = data.draw(st.integers(1, s.K), label="L")
    assert_close(package(p, s.lr, s.K, mg.Binomial(order=L)), binomial_reference(p, s.lr, s.K, L),
                 f"Binomial({L})")


@settings(max_examples=4)
@given(s=setups)
def test_the_dense_reference_equals_the_unroll_at_full_order(s):
    """The two references agree where they must (Binomial(K) is exact): a check of the test."""
    p = make_problem(s)
    assert_close(binomial_reference(p, s.lr, s.K, s.K), unrolled(p, s.lr, s.K), "dense reference")


@pytest.mark.parametrize("estimator", [mg.Full(), mg.Checkpointed(), mg.Checkpointed(snapshots="sqrt"),
                                       mg.Truncated(2), mg.Binomial(order=2)], ids=repr)
def test_theta_fixed_by_autograd_grad(estimator):
    """``torch.autograd.grad(query, [x_syn, lr])`` gives what ``.backward()`` fills."""
    s = Setup(K=4, lr=0.3, images=3, soft_labels=True, seed=7)
    p = make_problem(s)
    by_backward = package(p, s.lr, s.K, estimator)
    assert_close(package(p, s.lr, s.K, estimator, by="grad"), by_backward, repr(estimator))


def test_adapt_leaving_nothing_of_theta_that_requires_grad():
    """``adapt=`` names a frozen parameter only: the inner loop adapts it from its value, it
    gets no gradient, and the bias (not adapted, requires grad) is η through the inner loop."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 4, generator=g, dtype=DT), torch.randn(6, 2, generator=g, dtype=DT)
    x_q, y_q = torch.randn(6, 4, generator=g, dtype=DT), torch.randn(6, 2, generator=g, dtype=DT)
    model = nn.Linear(4, 2, dtype=DT)
    model.weight.requires_grad_(False)
    K, lr = 3, 0.2
    # Reference: weight unrolled from its value, bias a constant of the inner loop.
    bias = model.bias.detach().clone().requires_grad_()
    weight = model.weight.detach().clone().requires_grad_()
    for _ in range(K):
        (g_w,) = torch.autograd.grad(F.mse_loss(F.linear(x, weight, bias), y), weight, create_graph=True)
        weight = weight - lr * g_w
    (expected,) = torch.autograd.grad(F.mse_loss(F.linear(x_q, weight, bias), y_q), bias)
    for estimator in [mg.Full(), mg.Checkpointed(), mg.Binomial(order=K)]:
        model.bias.grad = None
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator, adapt=["weight"]) as meta:
            for _ in range(K):
                meta.step(lambda f: F.mse_loss(f(x), y))
            assert list(meta.fmodel.params) == ["weight"]
            F.mse_loss(meta.fmodel(x_q), y_q).backward()
        assert model.weight.grad is None
        assert_close([model.bias.grad], [expected], repr(estimator))


@pytest.mark.parametrize("estimator", [mg.Full(), mg.Checkpointed(), mg.Checkpointed(snapshots="sqrt"),
                                       mg.FirstOrder(), mg.Truncated(1), mg.Binomial(order=2),
                                       mg.Implicit(reg=1.0)], ids=repr)
@pytest.mark.parametrize("steps", [0, 3])
def test_nothing_to_learn_raises_at_the_query_backward(estimator, steps):
    """No parameter requires grad and no η: the block runs (the query can be evaluated), and a
    backward through it raises a ValueError naming the model and what would work."""
    model = model_at(make_problem(Setup(1, 0.1, 2, False, 0)).theta)
    x, y = torch.randn(4, D_IN, dtype=DT), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError) as info:
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.1), estimator=estimator) as meta:
            for _ in range(steps):
                meta.step(lambda f: F.cross_entropy(f(x), y))
            with torch.no_grad():
                assert meta.fmodel(x).shape == (4, CLASSES)  # evaluating is fine
            F.cross_entropy(meta.fmodel(x), y).backward()
    message = str(info.value)
    assert message.startswith("model: Sequential has no parameters that require grad"), message
    assert "nothing to meta-learn" in message and "requires_grad_()" in message
    assert "mg.optim.SGD(lr=lr_tensor)" in message
    assert all(param.grad is None for param in model.parameters())


def test_a_model_without_parameters_is_refused_at_entry():
    with pytest.raises(ValueError, match=r"model: ReLU has no parameters, so the inner loop has nothing to adapt"):
        with mg.MetaGradient(nn.ReLU(), inner_opt=mg.optim.SGD(lr=0.1)):
            pass


def test_some_frozen_parameters_are_not_fast_weights():
    """Some adapted parameters require grad: only those are fast weights, as before."""
    model = model_at(make_problem(Setup(1, 0.1, 2, False, 0)).theta)
    model[2].requires_grad_(True)
    x, y = torch.randn(4, D_IN, dtype=DT), torch.tensor([0, 1, 2, 0])
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed()) as meta:
        meta.step(lambda f: F.cross_entropy(f(x), y))
        assert sorted(meta.fmodel.params) == ["2.bias", "2.weight"]
        F.cross_entropy(meta.fmodel(x), y).backward()
    assert model[0].weight.grad is None and model[2].weight.grad is not None


def test_distillation_as_a_user_writes_it():
    """The pattern of examples/distillation.py: a fresh model every outer step (θ fixed),
    torch.optim.Adam over the images and the step size, Checkpointed with snapshots. Each
    outer step's gradients equal the hand-unrolled loop's at that step's init and η."""
    g = torch.Generator().manual_seed(11)
    x_real, y_real = torch.randn(30, D_IN, generator=g, dtype=DT), torch.randint(0, CLASSES, (30,), generator=g)
    images = torch.randn(CLASSES, D_IN, generator=g, dtype=DT, requires_grad=True)
    labels = torch.arange(CLASSES)
    lr = torch.tensor(0.2, dtype=DT, requires_grad=True)
    outer = torch.optim.Adam([images, lr], lr=0.05)
    K = 8
    for outer_step in range(3):
        torch.manual_seed(outer_step)
        model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)).to(DT)
        model.requires_grad_(False)
        p = Problem([t.detach().clone() for t in model.parameters()], images.detach().clone(), labels,
                    False, x_real, y_real)
        expected = unrolled(p, lr.item(), K)
        outer.zero_grad()
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr),
                             estimator=mg.Checkpointed(snapshots="sqrt")) as meta:
            for _ in range(K):
                meta.step(lambda f: F.cross_entropy(f(images), labels))
            F.cross_entropy(meta.fmodel(x_real), y_real).backward()
        assert all(param.grad is None for param in model.parameters())
        assert_close([images.grad, lr.grad], expected, f"outer step {outer_step}")
        outer.step()
