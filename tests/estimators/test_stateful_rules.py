"""Estimators with stateful update rules (MATH.md, "Optimizers other than plain gradient descent").

Full and Checkpointed are exact for every rule: they agree with a hand-unrolled
float64 reference that writes the momentum and Adam updates out by hand. Truncated and
Binomial hold the optimizer state constant, an approximation for momentum and Adam:
their relative error against Full is printed (run with ``-s``) and bounded generously.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import metagrad as mg

DT = torch.float64
K = 5
GEN = torch.Generator().manual_seed(11)
XS, YS = torch.randn(12, 2, dtype=DT, generator=GEN), torch.randn(12, 1, dtype=DT, generator=GEN)
XQ, YQ = torch.randn(12, 2, dtype=DT, generator=GEN), torch.randn(12, 1, dtype=DT, generator=GEN)


def make_model():
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).to(DT)


def forward(p, x):
    return F.linear(torch.tanh(F.linear(x, p[0], p[1])), p[2], p[3])


def reference(kind, lr):
    """∇_θ L_val(φ_K) through a hand-written momentum or Adam loop (plain autograd)."""
    theta = [p.detach().clone().requires_grad_() for p in make_model().parameters()]
    phi, m, v = theta, [torch.zeros_like(t) for t in theta], [torch.zeros_like(t) for t in theta]
    for t in range(1, K + 1):
        g = torch.autograd.grad(F.mse_loss(forward(phi, XS), YS), phi, create_graph=True)
        if kind == "momentum":  # torch.optim.SGD(momentum=0.9): b ← 0.9 b + g (b = g at first)
            m = [gi if t == 1 else 0.9 * mi + gi for mi, gi in zip(m, g)]
            phi = [p - lr * mi for p, mi in zip(phi, m)]
        else:  # torch.optim.Adam defaults
            m = [0.9 * mi + 0.1 * gi for mi, gi in zip(m, g)]
            v = [0.999 * vi + 0.001 * gi * gi for vi, gi in zip(v, g)]
            c1, c2 = 1 - 0.9 ** t, 1 - 0.999 ** t
            phi = [p - (lr / c1) * mi / (torch.sqrt(vi) / math.sqrt(c2) + 1e-8)
                   for p, mi, vi in zip(phi, m, v)]
    grads = torch.autograd.grad(F.mse_loss(forward(phi, XQ), YQ), theta)
    return torch.cat([g.flatten() for g in grads])


RULES = {
    "momentum": (lambda lr: mg.optim.Momentum(lr, 0.9), 0.02),
    "adam": (lambda lr: mg.optim.Adam(lr), 0.005),
}


def meta_gradient(rule, estimator):
    model = make_model()
    with mg.MetaGradient(model, inner_opt=rule, estimator=estimator) as meta:
        for _ in range(K):
            meta.step(lambda f: F.mse_loss(f(XS), YS))
        F.mse_loss(meta.fmodel(XQ), YQ).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", sorted(RULES))
def test_full_and_checkpointed_are_exact_for_stateful_rules(kind):
    make, lr = RULES[kind]
    expected = reference(kind, lr)
    assert rel(meta_gradient(make(lr), mg.Full()), expected) <= 1e-10
    assert rel(meta_gradient(make(lr), mg.Checkpointed()), expected) <= 1e-10


@pytest.mark.parametrize("kind", sorted(RULES))
def test_state_held_constant_is_measured_against_full(kind):
    make, lr = RULES[kind]
    full = meta_gradient(make(lr), mg.Full())
    errors = {}
    for estimator in (mg.Truncated(2), mg.Truncated(K), mg.Binomial(1), mg.Binomial(2), mg.Binomial(K),
                      mg.FirstOrder()):
        errors[repr(estimator)] = rel(meta_gradient(make(lr), estimator), full)
    print(f"\n{kind} (lr={lr}, K={K}) relative error against Full:",
          ", ".join(f"{name}: {error:.2e}" for name, error in errors.items()))
    # Generous: the state-constant products approximate, and with heavy momentum badly
    # (measured: about 1.5 here, the buffer carries most of the adjoint); each must still
    # beat ignoring the Hessians altogether.
    first_order = errors.pop("FirstOrder()")
    assert all(error < first_order for error in errors.values()), errors
    # At full depth Binomial and Truncated multiply the same parameter blocks.
    tk = meta_gradient(make(lr), mg.Truncated(K))
    assert rel(meta_gradient(make(lr), mg.Binomial(K)), tk) <= 1e-10


def test_sgd_with_per_parameter_step_sizes_stays_exact_for_binomial_and_truncated():
    model = make_model()
    lr = {n: torch.full_like(p, 0.05) * (1 + i) for i, (n, p) in enumerate(model.named_parameters())}
    full = meta_gradient(mg.optim.SGD(lr), mg.Full())
    for estimator in (mg.Binomial(K), mg.Truncated(K), mg.Checkpointed()):
        assert rel(meta_gradient(mg.optim.SGD(lr), estimator), full) <= 1e-10
