"""The η side of the replay check (metagrad.replay.EtaProbes): a value the closure reads in a way
metagrad cannot set back, which changes between inner steps and enters the loss only in a term
whose meta-parameter is small or zero, leaves every rebuilt step within the tolerance of the step
taken while η's gradient is wrong by the change. The gradient of each step's loss in η shows it:
such a block raises ReplayError instead of returning the wrong gradient.

Each case is checked against a hand-written unroll: where nothing changed the estimators are
exact, where something did they raise."""

from __future__ import annotations

import contextlib
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import metagrad as mg

from test_compiled import TRACED

K, LR = 4, 0.1


def _problem(dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).to(dtype)
    data = [torch.randn(8, 3, dtype=dtype), torch.randn(8, 1, dtype=dtype),
            torch.randn(8, 3, dtype=dtype), torch.randn(8, 1, dtype=dtype)]
    return net, data


def _l2(params) -> torch.Tensor:
    return sum((p ** 2).sum() for p in params)


class Settings:
    """A config object whose value the loss reads by name (getattr with a string), which
    metagrad does not follow."""
    scale = 1.0


def _hand(net, data, eta0: float, scales: list[float]) -> tuple[float, torch.Tensor]:
    """η's and θ's gradient of a plain unroll of the loop in :func:`_metagrad`."""
    x, y, xq, yq = data
    eta = torch.tensor(eta0, dtype=x.dtype, requires_grad=True)
    theta = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    phi = dict(theta)
    for k in range(K):
        loss = F.mse_loss(torch.func.functional_call(net, phi, (x,)), y) + eta * scales[k] * _l2(phi.values())
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
        phi = {n: p - LR * g for (n, p), g in zip(phi.items(), grads)}
    query = F.mse_loss(torch.func.functional_call(net, phi, (xq,)), yq)
    g_eta, *g_theta = torch.autograd.grad(query, [eta, *theta.values()])
    return g_eta.item(), torch.cat([g.reshape(-1) for g in g_theta])


def _metagrad(net, data, estimator, eta0: float, scales: list[float], cfg: Settings) -> tuple[float, torch.Tensor]:
    x, y, xq, yq = data
    eta = torch.tensor(eta0, dtype=x.dtype, requires_grad=True)
    net.zero_grad()
    with mg.MetaGradient(net, inner_opt=mg.optim.SGD(lr=LR), estimator=estimator) as meta:
        for k in range(K):
            cfg.scale = scales[k]
            meta.step(lambda f: F.mse_loss(f(x), y) + eta * getattr(cfg, "scale") * _l2(f.parameters()))
        F.mse_loss(meta.fmodel(xq), yq).backward()
    return eta.grad.item(), torch.cat([p.grad.reshape(-1) for p in net.parameters()])


ESTIMATORS = {
    "checkpointed": lambda: mg.Checkpointed(),
    "truncated": lambda: mg.Truncated(K),
    "binomial": lambda: mg.Binomial(K),
    "binomial-one-at-a-time": lambda: mg.Binomial(K, chunk_size=1),
    "snapshots": lambda: mg.Checkpointed(snapshots=2),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.parametrize("dtype,eta0", [(torch.float64, 0.0), (torch.float64, 1e-9), (torch.float32, 0.0),
                                        (torch.float32, 1e-5)])
@pytest.mark.parametrize("scales", [[1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 4.0, 4.0]], ids=["annealed", "first-step-only"])
def test_a_value_changed_in_a_term_with_small_eta_raises(name, dtype, eta0, scales):
    """``first-step-only``: only the closure's first step, where its η are found, read another
    value than the one at backward time."""
    net, data = _problem(dtype)
    exact, _ = _hand(net, data, eta0, scales)
    # Full does not rebuild: it is right, and shows how far off a rebuild with the last value is.
    full, _ = _metagrad(net, data, mg.Full(), eta0, scales, Settings())
    stale, _ = _hand(net, data, eta0, [scales[-1]] * K)
    assert full == pytest.approx(exact, rel=1e-4)
    assert abs(stale - exact) > 0.02 * abs(exact)
    with pytest.raises(mg.ReplayError, match="gradient of its loss in the meta-parameter"):
        _metagrad(net, data, ESTIMATORS[name](), eta0, scales, Settings())


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_the_same_loop_with_an_unchanged_value_is_exact(name):
    net, data = _problem(torch.float64)
    scales = [2.0] * K
    exact, exact_theta = _hand(net, data, 1e-3, scales)
    got, got_theta = _metagrad(net, data, ESTIMATORS[name](), 1e-3, scales, Settings())
    assert got == pytest.approx(exact, rel=1e-9)
    torch.testing.assert_close(got_theta, exact_theta, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["checkpointed", "binomial"])
def test_a_block_over_tasks_raises_too(name):
    """``tasks=2``: the closure runs under vmap over the tasks; ∂ℓ/∂η is the tasks' sum."""
    net, (x, y, xq, yq) = _problem(torch.float64)
    xs, ys = torch.stack([x, x.flip(0)]), torch.stack([y, y.flip(0)])
    eta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    cfg = Settings()
    with pytest.raises(mg.ReplayError, match="gradient of its loss in the meta-parameter"):
        with mg.MetaGradient(net, inner_opt=mg.optim.SGD(lr=LR), estimator=ESTIMATORS[name](), tasks=2) as meta:
            for k in range(K):
                cfg.scale = 1.0 + k
                meta.step(lambda f, a, b: F.mse_loss(f(a), b) + eta * getattr(cfg, "scale") * (f(a) ** 2).mean(),
                          xs, ys)
            F.mse_loss(meta.fmodel(torch.stack([xq, xq])), torch.stack([yq, yq])).backward()


def _noise(source: str, shape: torch.Size) -> torch.Tensor:
    if source == "numpy":  # NumPy's global generator
        return torch.from_numpy(np.random.randn(*shape))
    if source == "python":  # Python's random module
        return torch.tensor([[random.gauss(0, 1) for _ in range(shape[1])] for _ in range(shape[0])],
                            dtype=torch.float64)
    # A generator made anew inside the closure, from the OS's entropy: nothing can replay it.
    return torch.from_numpy(np.random.default_rng().standard_normal(tuple(shape)))


@pytest.mark.parametrize("source", ["numpy", "python"])
def test_random_numbers_from_numpy_or_python_in_a_term_with_zero_eta_are_replayed(source):
    """Noise drawn from NumPy's or Python's global generator in a term whose learned weight
    starts at zero: each rebuilt step draws it again from the generator's state at its step
    (metagrad.generators), so η's gradient, and θ's, are the plain unroll's."""
    net, (x, y, xq, yq) = _problem(torch.float64)
    np.random.seed(0)
    random.seed(0)
    eta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    theta = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    phi = dict(theta)
    for _ in range(K):
        f = lambda a: torch.func.functional_call(net, phi, (a,))  # noqa: E731
        loss = F.mse_loss(f(x), y) + eta * F.mse_loss(f(x + _noise(source, x.shape)), y)
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
        phi = {n: p - LR * g for (n, p), g in zip(phi.items(), grads)}
    expected = torch.autograd.grad(F.mse_loss(torch.func.functional_call(net, phi, (xq,)), yq), [eta, *theta.values()])

    np.random.seed(0)
    random.seed(0)
    with mg.MetaGradient(net, inner_opt=mg.optim.SGD(lr=LR), estimator=mg.Checkpointed()) as meta:
        for _ in range(K):
            meta.step(lambda f: F.mse_loss(f(x), y) + eta * F.mse_loss(f(x + _noise(source, x.shape)), y))
        F.mse_loss(meta.fmodel(xq), yq).backward()
    got = torch.cat([eta.grad.reshape(-1), *(p.grad.reshape(-1) for p in net.parameters())])
    want = torch.cat([g.reshape(-1) for g in expected])
    assert torch.linalg.vector_norm(got - want) <= 1e-10 * torch.linalg.vector_norm(want)
    assert abs(eta.grad - expected[0]) <= 1e-10 * abs(expected[0])


def test_random_numbers_from_a_generator_made_inside_the_closure_in_a_term_with_zero_eta_raise():
    """Noise from a generator the closure makes anew at each call (``np.random.default_rng()``,
    seeded by the OS), which nothing can replay, in a term whose learned weight starts at zero:
    the steps agree, η's gradient would not."""
    net, (x, y, xq, yq) = _problem(torch.float64)
    eta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    with pytest.raises(mg.ReplayError, match="gradient of its loss in the meta-parameter"):
        with mg.MetaGradient(net, inner_opt=mg.optim.SGD(lr=LR), estimator=mg.Checkpointed()) as meta:
            for _ in range(K):
                meta.step(lambda f: F.mse_loss(f(x), y) + eta * F.mse_loss(f(x + _noise("fresh", x.shape)), y))
            F.mse_loss(meta.fmodel(xq), yq).backward()
    assert all(p.grad is None for p in net.parameters())  # nothing was written


@pytest.mark.parametrize("read", ["getattr", "numpy"])
def test_compile_true_rebuilds_a_fingerprinted_step_eagerly_and_raises(read):
    """With compile=True the compiled step product holds the values the closure read when it was
    traced; a step that kept a fingerprint (its gradient taken eagerly: a closure's first step,
    a closure that cannot be compiled) is rebuilt eagerly, where the fingerprint is checked."""
    net, (x, y, xq, yq) = _problem(torch.float64)
    eta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    cfg = Settings()
    with pytest.raises(mg.ReplayError, match="gradient of its loss in the meta-parameter"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mg.MetaGradientWarning)  # a closure that does not compile
            with mg.MetaGradient(net, inner_opt=mg.optim.SGD(lr=LR), estimator=mg.Checkpointed(), compile=TRACED) as meta:
                for k in range(K):
                    cfg.scale = 1.0 + k
                    if read == "getattr":
                        meta.step(lambda f: F.mse_loss(f(x), y) + eta * getattr(cfg, "scale") * (f(x) ** 2).mean())
                    else:
                        meta.step(lambda f: F.mse_loss(f(x), y)
                                  + eta * F.mse_loss(f(x + _noise("fresh", x.shape)), y))
                F.mse_loss(meta.fmodel(xq), yq).backward()


def test_compile_true_a_value_held_as_traced_in_an_earlier_block_raises():
    """A value read by getattr, constant within each block and changed between blocks: the compiled
    step product of the second block holds the first block's value (TorchDynamo guards the inner
    step, not the traced product). The second block's first step, taken eagerly, kept a
    fingerprint; its compiled product's ∂ℓ/∂η disagrees."""
    net, (x, y, xq, yq) = _problem(torch.float64)
    cfg = Settings()
    for block in range(2):
        cfg.scale = 1.0 + 3 * block
        eta = torch.zeros((), dtype=torch.float64, requires_grad=True)
        raised = pytest.raises(mg.ReplayError, match="gradient of its loss in the meta-parameter")
        with raised if block else contextlib.nullcontext():
            with mg.MetaGradient(net, inner_opt=mg.optim.SGD(lr=LR), estimator=mg.Checkpointed(), compile=TRACED) as meta:
                for _ in range(K + 1):
                    meta.step(lambda f: F.mse_loss(f(x), y) + eta * getattr(cfg, "scale") * (f(x) ** 2).mean())
                F.mse_loss(meta.fmodel(xq), yq).backward()
        if not block:
            assert meta.info["compiled"]["products"] > 0


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2 ** 16), eta0=st.sampled_from([0.0, 1e-4, 0.3]),
       width=st.integers(2, 8), lr=st.floats(0.01, 0.3),
       name=st.sampled_from(["checkpointed", "binomial", "snapshots"]))
def test_no_false_alarm_in_float32_with_eta_captured_and_read_through_an_object(seed, eta0, width, lr, name):
    """A learned weight decay captured by the closure, and a learned scale read through an
    object (both η), in float32: the η check passes whenever nothing changed, and the gradient
    matches a float64 hand unroll to float32 accuracy."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
    x, y, xq, yq = torch.randn(6, 3), torch.randn(6, 1), torch.randn(6, 3), torch.randn(6, 1)

    class Holder:
        scale = torch.tensor(1.0, requires_grad=True)

    holder = Holder()
    wd = torch.tensor(eta0, requires_grad=True)
    with mg.MetaGradient(net, inner_opt=mg.optim.SGD(lr=lr), estimator=ESTIMATORS[name]()) as meta:
        for _ in range(K):
            meta.step(lambda f: holder.scale * F.mse_loss(f(x), y) + wd * _l2(f.parameters()))
        F.mse_loss(meta.fmodel(xq), yq).backward()

    # the float64 reference
    d = torch.float64
    theta = {n: p.detach().to(d).requires_grad_() for n, p in net.named_parameters()}
    s64, wd64 = holder.scale.detach().to(d).requires_grad_(), wd.detach().to(d).requires_grad_()
    phi = dict(theta)
    for _ in range(K):
        loss = s64 * F.mse_loss(torch.func.functional_call(net, phi, (x.to(d),)), y.to(d)) + wd64 * _l2(phi.values())
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
        phi = {n: p - lr * g for (n, p), g in zip(phi.items(), grads)}
    query = F.mse_loss(torch.func.functional_call(net, phi, (xq.to(d),)), yq.to(d))
    g_wd, g_s = torch.autograd.grad(query, [wd64, s64])
    scale = 1e-3 * (1 + abs(g_wd.item()) + abs(g_s.item()))
    assert abs(wd.grad.item() - g_wd.item()) <= scale
    assert abs(holder.scale.grad.item() - g_s.item()) <= scale
