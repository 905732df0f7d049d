"""Fast weights that are not real, dense tensors, each against a hand-written float64 unroll
(no metagrad inside):

- complex parameters. torch's convention is that a complex entry is its real and imaginary
  parts (the gradient of a real loss is ``∂L/∂re + i ∂L/∂im``), so the meta-gradient is the
  one of the model written over those real parts, ``torch.view_as_real``; torch.optim's Adam,
  RMSprop and Adagrad keep their moments for each part, and mg.optim's do the same;
- sparse inner gradients (``nn.Embedding(sparse=True)``), the same numbers as dense ones.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import metagrad as mg
from metagrad.numerics import tolerance
from tests.reference import AdamRule, MomentumRule, SGDRule, exact_meta_gradient, flat

DT = torch.float64
C = torch.complex128


class ComplexNet(nn.Module):
    """``Re(v · tanh(W x)) + b`` with complex W (3×2) and v (1×3) and a real bias b."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(0.7 * torch.randn(3, 2, generator=g, dtype=C))
        self.v = nn.Parameter(0.7 * torch.randn(1, 3, generator=g, dtype=C))
        self.b = nn.Parameter(torch.randn(1, generator=g, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward([self.w, self.v, self.b], x)


def forward(params, x):
    """:class:`ComplexNet`'s function of its parameters, complex or as real parts."""
    w, v, b = (torch.view_as_complex(p) if i < 2 and not p.is_complex() else p for i, p in enumerate(params))
    return (torch.tanh(x.to(C) @ w.T) @ v.T).real.squeeze(-1) + b


def real_parts(model):
    return [torch.view_as_real(p.detach()) if p.is_complex() else p.detach() for p in model.parameters()]


def as_real(grads):
    return flat([torch.view_as_real(g) if g.is_complex() else g for g in grads])


def batches(seed: int, tasks: int):
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(tasks, 8, 2, generator=g, dtype=DT)
    return x, torch.sin(x.sum(-1)) + 0.1 * torch.randn(tasks, 8, generator=g, dtype=DT)


def reference(model, rule, K, x, y, xq, yq):
    """The mean over tasks of each task's meta-gradient, by a plain unroll over the real parts."""
    grads = [exact_meta_gradient(real_parts(model), lambda p, k: F.mse_loss(forward(p, x[t]), y[t]),
                                 lambda p: F.mse_loss(forward(p, xq[t]), yq[t]), rule, K)
             for t in range(x.shape[0])]
    return sum(grads) / len(grads)


RULES = {
    "sgd": (lambda lr: mg.optim.SGD(lr=lr), lambda lr: SGDRule(lr)),
    "momentum": (lambda lr: mg.optim.Momentum(lr=lr, momentum=0.8, weight_decay=0.05),
                 lambda lr: MomentumRule(lr, momentum=0.8, weight_decay=0.05)),
    "adam": (lambda lr: mg.optim.Adam(lr=lr / 4), lambda lr: AdamRule(lr / 4)),
}
#: (estimator, the rules it is exact for)
EXACT = [
    (lambda K: mg.Full(), ("sgd", "momentum", "adam")),
    (lambda K: mg.Checkpointed(), ("sgd", "momentum", "adam")),
    (lambda K: mg.Checkpointed(snapshots=2), ("sgd", "momentum", "adam")),
    (lambda K: mg.Truncated(K), ("sgd",)),
    (lambda K: mg.Binomial(order=K), ("sgd",)),
]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), K=st.integers(1, 4), lr=st.floats(0.02, 0.3),
       which=st.sampled_from([(e, r) for e, (_, rules) in enumerate(EXACT) for r in rules]),
       tasks=st.sampled_from([None, 2]))
def test_a_complex_model_matches_a_hand_unroll_over_its_real_parts(seed, K, lr, which, tasks):
    """Every exact estimator, with SGD, momentum (its buffer complex: its adjoint was dropped,
    Checkpointed 84% off) and Adam, one task or two: equal to the unroll over the real parts.
    No complex value is cast to a real one on the way (the series' monitor did)."""
    estimator, rule = EXACT[which[0]][0](K), which[1]
    model = ComplexNet(seed)
    x, y = batches(seed, tasks or 1)
    xq, yq = batches(seed + 1, tasks or 1)
    want = reference(model, RULES[rule][1](lr), K, x, y, xq, yq)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Casting complex")
        with mg.MetaGradient(model, inner_opt=RULES[rule][0](lr), estimator=estimator, tasks=tasks) as meta:
            for _ in range(K):
                if tasks:
                    meta.step(lambda f, a, b: F.mse_loss(f(a), b), x, y)
                else:
                    meta.step(lambda f: F.mse_loss(f(x[0]), y[0]))
            query = F.mse_loss(meta.fmodel(xq), yq) if tasks else F.mse_loss(meta.fmodel(xq[0]), yq[0])
            query.backward()
    got = as_real([p.grad for p in model.parameters()])
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (got - want).norm() / want.norm()


@pytest.mark.parametrize("tasks", [None, 2])
@pytest.mark.parametrize("rule", ["momentum", "adam"])
@pytest.mark.parametrize("estimator", [mg.Full(), mg.Checkpointed(), mg.Checkpointed(snapshots=2)], ids=repr)
def test_meta_grad_of_a_complex_model_matches_a_hand_unroll_over_its_real_parts(estimator, rule, tasks):
    """The functional face takes complex params (it refused them) and carries a complex
    optimizer state's adjoint."""
    K, lr, model = 3, 0.2, ComplexNet(7)
    x, y = batches(7, tasks or 1)
    xq, yq = batches(8, tasks or 1)
    want = reference(model, RULES[rule][1](lr), K, x, y, xq, yq)
    loss = lambda p, b: F.mse_loss(functional_call(model, p, (b[0],)), b[1])  # noqa: E731
    params = {n: p.detach() for n, p in model.named_parameters()}
    data = ((x, y), (xq, yq)) if tasks else ((x[0], y[0]), (xq[0], yq[0]))
    got = mg.functional.meta_grad(loss, params, *data, inner_opt=RULES[rule][0](lr), steps=K,
                                  estimator=estimator, tasks=tasks)
    assert torch.allclose(as_real(list(got.values())), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("solver,reg,lr", [("cg", 2.0, 0.2), ("neumann", 8.0, 0.05)])
def test_implicit_on_a_complex_model_is_the_derivative_of_a_converged_proximal_loop(solver, reg, lr):
    """Implicit(λ) against the exact derivative of the proximal loop over the real parts, run to
    convergence (K = 400; its last proximal gradient checked to be 0): the solve's inner
    products are those of the real parts (CG's cast the complex ones to real: 1.5e-4 off,
    no convergence, a warning)."""
    K = 400
    model = ComplexNet(1)
    x, y = batches(1, 1)
    xq, yq = batches(2, 1)
    theta = [t.clone().requires_grad_() for t in real_parts(model)]
    phi = list(theta)
    for _ in range(K):
        loss = F.mse_loss(forward(phi, x[0]), y[0]) + reg / 2 * sum(((p - t) ** 2).sum() for p, t in zip(phi, theta))
        grads = torch.autograd.grad(loss, phi, create_graph=True)
        phi = [p - lr * g for p, g in zip(phi, grads)]
    assert flat(grads).norm() < 1e-12  # a fixed point (not a cycle), so the derivatives agree
    want = flat(torch.autograd.grad(F.mse_loss(forward(phi, xq[0]), yq[0]), theta))
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr),
                         estimator=mg.Implicit(reg=reg, solver=solver, max_iter=200, tol=1e-12)) as meta:
        for _ in range(K):
            meta.step(lambda f: F.mse_loss(f(x[0]), y[0]))
        F.mse_loss(meta.fmodel(xq[0]), yq[0]).backward()
    assert meta.info["converged"] and meta.info["stationarity"] < 1e-9, meta.info
    got = as_real([p.grad for p in model.parameters()])
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-12), (got - want).norm() / want.norm()


def test_the_replay_check_of_a_complex_model_has_its_real_dtypes_tolerance():
    """complex128 fast weights are checked to float64's tolerance (they had bfloat16's, 0.1):
    a closure that reads a shift by ``getattr`` with a name (not followed, so not set back for
    its rebuild), 0.1–0.3% off on its rebuild, is refused."""
    assert tolerance(C, torch.device("cpu")) == tolerance(DT, torch.device("cpu"))
    model = ComplexNet(0)
    x, y = batches(0, 1)

    class Drift:
        k = 0.0

    drift = Drift()
    with pytest.raises(mg.ReplayError, match="is not the step the inner loop took"):
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed()) as meta:
            for _ in range(3):
                meta.step(lambda f: F.mse_loss(f(x[0] + 1e-3 * getattr(drift, "k")), y[0]))
                drift.k += 1.0
            F.mse_loss(meta.fmodel(x[0]), y[0]).backward()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("ours,torchs", [
    (lambda: mg.optim.Adam(lr=0.05, weight_decay=0.1), lambda p: torch.optim.Adam([p], lr=0.05, weight_decay=0.1)),
    (lambda: mg.optim.AdamW(lr=0.05), lambda p: torch.optim.AdamW([p], lr=0.05)),
    (lambda: mg.optim.RMSprop(lr=0.02, centered=True, momentum=0.5),
     lambda p: torch.optim.RMSprop([p], lr=0.02, centered=True, momentum=0.5)),
    (lambda: mg.optim.Adagrad(lr=0.1, initial_accumulator_value=0.2),
     lambda p: torch.optim.Adagrad([p], lr=0.1, initial_accumulator_value=0.2)),
], ids=["adam", "adamw", "rmsprop", "adagrad"])
def test_elementwise_rules_treat_a_complex_parameter_as_torch_optim_does(ours, torchs):
    """Adam, AdamW, RMSprop and Adagrad take torch.optim's steps on a complex parameter: its
    real and imaginary parts are two entries, each with its own moments (they squared the
    complex gradient, and failed on ``v > 0``)."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(4, 3, generator=g, dtype=C)
    grads = [torch.randn(4, 3, generator=g, dtype=C) for _ in range(4)]
    param = nn.Parameter(start.clone())
    optimizer = torchs(param)
    rule = ours()
    params, state = {"p": start.clone()}, rule.init({"p": start})
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
        params, state = rule.step(params, {"p": grad}, state)
        torch.testing.assert_close(params["p"], param.detach(), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ sparse inner gradients
class Bag(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.emb = nn.Embedding(10, 4, sparse=sparse, dtype=DT)
            self.lin = nn.Linear(4, 1, dtype=DT)

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.emb(i))).squeeze(-1)


def tokens(tasks: int = 1):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 10, (tasks, 16), generator=g), torch.randn(tasks, 16, generator=g, dtype=DT)


def dense_unroll(K=3, lr=0.3):
    model = Bag(sparse=False)
    i, y = tokens()
    phi = {n: p.view_as(p) for n, p in model.named_parameters()}
    for _ in range(K):
        grads = torch.autograd.grad(F.mse_loss(functional_call(model, phi, (i[0],)), y[0]), list(phi.values()),
                                    create_graph=True)
        phi = {n: p - lr * g for (n, p), g in zip(phi.items(), grads)}
    return torch.autograd.grad(F.mse_loss(functional_call(model, phi, (i[0],)), y[0]), list(model.parameters()))


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("estimator", [mg.Full(), mg.Checkpointed(), mg.Binomial(order=3, chunk_size=1),
                                       mg.Binomial(order=3)], ids=repr)
def test_a_sparse_embedding_gradient_gives_the_dense_meta_gradient(estimator):
    """``nn.Embedding(sparse=True)``: the block, and meta_grad, give the meta-gradient of the
    same model with a dense embedding, dense. Binomial's vmapped rows, which torch cannot run
    on a sparse gradient, are rebuilt one at a time with a warning (they raised)."""
    want = dense_unroll()
    model = Bag(sparse=True)
    i, y = tokens()
    batched = isinstance(estimator, mg.Binomial) and estimator.chunk_size is None
    with warnings.catch_warnings():
        if batched:
            warnings.filterwarnings("ignore", "closure: its inner gradient is sparse", mg.MetaGradientWarning)
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.3), estimator=estimator) as meta:
            for _ in range(3):
                meta.step(lambda f: F.mse_loss(f(i[0]), y[0]))
            F.mse_loss(meta.fmodel(i[0]), y[0]).backward()
    for p, w in zip(model.parameters(), want):
        assert p.grad.layout == torch.strided
        torch.testing.assert_close(p.grad, w, rtol=1e-10, atol=1e-13)
    if isinstance(estimator, mg.Binomial):
        return  # (meta_grad's Binomial batches its rows: test_a_sparse_gradient_under_vmap_is_named)
    got = mg.functional.meta_grad(lambda p, b: F.mse_loss(functional_call(model, p, (b[0],)), b[1]),
                                  {n: p.detach() for n, p in model.named_parameters()}, (i[0], y[0]), (i[0], y[0]),
                                  inner_opt=mg.optim.SGD(lr=0.3), steps=3, estimator=estimator)
    for g, w in zip(got.values(), want):
        assert g.layout == torch.strided
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


def test_implicit_and_adam_take_a_sparse_inner_gradient():
    """Where an update rule or the solve added a dense tensor to the sparse gradient, torch
    raised "add(sparse, dense) is not supported"; they now take it dense: Adam with Full
    against the dense model's unroll (and Implicit the same as with the dense model)."""
    i, y = tokens()
    model, dense = Bag(sparse=True), Bag(sparse=False)
    want = exact_meta_gradient([p.detach() for p in dense.parameters()],
                               lambda p, k: F.mse_loss(functional_call(dense, dict(zip(["emb.weight", "lin.weight", "lin.bias"], p)), (i[0],)), y[0]),
                               lambda p: F.mse_loss(functional_call(dense, dict(zip(["emb.weight", "lin.weight", "lin.bias"], p)), (i[0],)), y[0]),
                               AdamRule(0.1), 3)
    with mg.MetaGradient(model, inner_opt=mg.optim.Adam(lr=0.1), estimator=mg.Full()) as meta:
        for _ in range(3):
            meta.step(lambda f: F.mse_loss(f(i[0]), y[0]))
        F.mse_loss(meta.fmodel(i[0]), y[0]).backward()
    torch.testing.assert_close(flat([p.grad for p in model.parameters()]), want, rtol=1e-10, atol=1e-13)
    implicit = []
    for m in (Bag(sparse=True), Bag(sparse=False)):
        with mg.MetaGradient(m, inner_opt=mg.optim.SGD(lr=0.3), estimator=mg.Implicit(tol=1e-12)) as meta:
            for _ in range(3):
                meta.step(lambda f: F.mse_loss(f(i[0]), y[0]))
            F.mse_loss(meta.fmodel(i[0]), y[0]).backward()
        implicit.append(flat([p.grad for p in m.parameters()]))
    torch.testing.assert_close(implicit[0], implicit[1], rtol=1e-10, atol=1e-13)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("where", ["tasks", "meta_grad over tasks"])
def test_a_sparse_gradient_under_vmap_is_named(where):
    """torch.func.vmap cannot batch sparse tensors; the error names the embedding and
    sparse=False (torch's was "reshape is not implemented for sparse tensors")."""
    model = Bag(sparse=True)
    i, y = tokens(2)
    with pytest.raises(mg.errors.SparseGradientError, match=r"(?s)nn\.Embedding\(sparse=True\).*sparse=False"):
        if where == "meta_grad over tasks":
            mg.functional.meta_grad(lambda p, b: F.mse_loss(functional_call(model, p, (b[0],)), b[1]),
                                    {n: p.detach() for n, p in model.named_parameters()}, (i, y), (i, y),
                                    inner_opt=mg.optim.SGD(lr=0.3), steps=2, estimator=mg.Checkpointed(), tasks=2)
        else:
            with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.3), tasks=2, estimator=mg.Checkpointed()) as meta:
                for _ in range(2):
                    meta.step(lambda f, a, b: F.mse_loss(f(a), b), i, y)
                F.mse_loss(meta.fmodel(i), y).backward()
    assert all(p.grad is None for p in model.parameters())
