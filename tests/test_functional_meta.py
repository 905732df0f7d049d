"""Meta-parameters η in the functional face: ``mg.functional.meta_grad(..., meta=...)``.

A learned weight decay inside the loss and Meta-SGD's per-parameter step sizes held by the
update rule, in float64, against a plain hand-unrolled autograd loop written here (MATH.md's
table: exact estimators differentiate every step; FirstOrder holds every inner gradient
constant; Truncated(T) holds the gradients of all but the last T steps constant, so η gets
only the step-size part there), for one task and under ``torch.func.vmap`` over tasks.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import metagrad as mg

DT = torch.float64
TOL = 1e-10


def make_model(width: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 1)).to(DT)


MODEL = make_model()


def data(seed: int, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=DT)
    return x, torch.sin(3 * x.sum(1, keepdim=True))


def loss_fn(params, batch, meta):
    """The user's loss: mean squared error plus a learned L2 penalty exp(log_wd)·‖φ‖²."""
    x, y = batch
    fit = ((functional_call(MODEL, params, (x,)) - y) ** 2).mean()
    return fit + meta["log_wd"].exp() * sum((p ** 2).sum() for p in params.values())


def theta():
    return {n: p.detach().clone() for n, p in MODEL.named_parameters()}


def meta_parameters(lr: float = 0.1):
    return {"log_wd": torch.tensor(-3.0, dtype=DT),
            "lr": {n: torch.full_like(p, lr) for n, p in MODEL.named_parameters()}}


def hand_unrolled(support, query, K, held_until=0, lr=0.1):
    """The meta-gradient of θ, log_wd and the step sizes by a plain create_graph unroll; the
    gradients of steps k < held_until are detached (held constant)."""
    th = {n: t.requires_grad_() for n, t in theta().items()}
    meta = meta_parameters(lr)
    leaves = [meta["log_wd"], *meta["lr"].values()]
    for t in leaves:
        t.requires_grad_()
    phi = dict(th)
    for k in range(K):
        loss = loss_fn(phi, support, meta)
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=k >= held_until)
        if k < held_until:
            grads = [g.detach() for g in grads]
        phi = {n: phi[n] - meta["lr"][n] * g for n, g in zip(phi, grads)}
    inputs = [*th.values(), *leaves]
    out = torch.autograd.grad(loss_fn(phi, query, meta), inputs, allow_unused=True)
    return torch.cat([(torch.zeros_like(t) if g is None else g).reshape(-1) for g, t in zip(out, inputs)])


def flat(g, g_meta):
    return torch.cat([t.reshape(-1) for t in [*g.values(), g_meta["log_wd"], *g_meta["lr"].values()]])


def functional(estimator, support, query, K, lr=0.1):
    meta = meta_parameters(lr)
    return flat(*mg.functional.meta_grad(loss_fn, theta(), support, query, inner_opt=mg.optim.SGD(lr=meta["lr"]),
                                         steps=K, estimator=estimator, meta=meta))


def relative(a, b):
    return float((a - b).norm() / b.norm())


EXACT = [mg.Full(), mg.Checkpointed(), lambda K: mg.Truncated(K), lambda K: mg.Binomial(K, monitor=False),
         lambda K: mg.Binomial(K, monitor=False, chunk_size=1)]


@settings(max_examples=12, deadline=None)
@given(K=st.integers(0, 4), lr=st.floats(0.02, 0.3), seed=st.integers(0, 100),
       which=st.integers(0, len(EXACT) - 1))
def test_exact_estimators_equal_a_hand_unroll_for_every_meta_parameter(K, lr, seed, which):
    support, query = data(seed), data(seed + 1)
    estimator = EXACT[which] if isinstance(EXACT[which], mg.Estimator) else EXACT[which](K)
    got = functional(estimator, support, query, K, lr)
    assert relative(got, hand_unrolled(support, query, K, lr=lr)) < TOL


@pytest.mark.parametrize("K,T", [(4, 0), (4, 1), (4, 2), (3, 3)])
def test_truncated_and_first_order_hold_the_earlier_gradients_constant(K, T):
    support, query = data(3), data(4)
    expected = hand_unrolled(support, query, K, held_until=K - T)
    if T:
        got = functional(mg.Truncated(T), support, query, K)
    else:  # the weight decay gets its direct gradient only, and a warning says so
        with pytest.warns(mg.MetaGradientWarning, match="log_wd"):
            got = functional(mg.FirstOrder(), support, query, K)
    assert relative(got, expected) < TOL


def test_meta_gradients_under_vmap_over_tasks():
    """A meta-batch of 3 tasks in one vmapped call, η shared (in_dims=None): each row equals
    that task alone."""
    supports = [data(10 + i) for i in range(3)]
    queries = [data(20 + i) for i in range(3)]
    meta = meta_parameters()
    rule = mg.optim.SGD(lr=meta["lr"])
    for estimator in (mg.Checkpointed(), mg.Binomial(3, monitor=False), mg.Full()):
        one = functools.partial(mg.functional.meta_grad, loss_fn, inner_opt=rule, steps=3,
                                estimator=estimator, meta=meta)
        stack = lambda batches: tuple(torch.stack(t) for t in zip(*batches))  # noqa: E731
        g, g_meta = torch.func.vmap(one, in_dims=(None, 0, 0))(theta(), stack(supports), stack(queries))
        for i in range(3):
            alone = hand_unrolled(supports[i], queries[i], 3)
            row = flat({n: t[i] for n, t in g.items()},
                       {"log_wd": g_meta["log_wd"][i], "lr": {n: t[i] for n, t in g_meta["lr"].items()}})
            assert relative(row, alone) < TOL, estimator


def test_without_meta_the_result_is_the_theta_gradient_alone():
    support, query = data(5), data(6)
    g = mg.functional.meta_grad(lambda p, b: loss_fn(p, b, meta_parameters()), theta(), support, query,
                                inner_opt=mg.optim.SGD(lr=0.1), steps=2, estimator=mg.Checkpointed())
    assert isinstance(g, dict) and set(g) == set(theta())


@pytest.mark.parametrize("meta,error,match", [
    ({}, ValueError, "meta: holds no tensor"),
    ({"wd": 0.1}, TypeError, r"meta: meta\['wd'\] is float"),
    ({"n": torch.tensor(3)}, TypeError, "floating-point"),
])
def test_bad_meta_names_the_argument(meta, error, match):
    with pytest.raises(error, match=match):
        mg.functional.meta_grad(loss_fn, theta(), data(1), data(2), inner_opt=mg.optim.SGD(lr=0.1), steps=1,
                                meta=meta)


@pytest.mark.parametrize("estimator", [mg.Binomial(2, monitor=False), mg.Binomial(1, block=2, monitor=False),
                                       mg.Truncated(2)], ids=repr)
def test_both_faces_give_the_same_approximation(estimator):
    """The approximate estimators' η-gradients (MATH.md's table, checked against dense
    references in tests/estimators/test_meta_parameters.py for the context manager) are the
    same in the functional face."""
    support, query = data(7), data(8)
    K = 4
    model = make_model()
    meta = meta_parameters()
    leaves = [meta["log_wd"], *meta["lr"].values()]
    for t in leaves:
        t.requires_grad_()
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=meta["lr"]), estimator=estimator) as block:
        for _ in range(K):
            block.step(lambda f: loss_fn(dict(f.named_parameters()), support, meta))
        loss_fn(dict(block.fmodel.named_parameters()), query, meta).backward()
    expected = torch.cat([t.grad.reshape(-1) for t in [*model.parameters(), *leaves]])
    assert relative(functional(estimator, support, query, K), expected) < TOL


@pytest.mark.parametrize("estimator", [mg.Checkpointed(snapshots="sqrt"), mg.Checkpointed(snapshots=3),
                                       mg.Binomial(9, block=3, snapshots=True, monitor=False)], ids=repr)
def test_snapshots_in_the_functional_face(estimator):
    """Snapshots store a thinned schedule of iterates and recompute the others with the same
    pure step body: the same exact answer as a hand unroll, with fewer iterates held, for one
    task and under vmap over tasks."""
    from metagrad.pure import PureTrajectory

    K = 9
    support, query = data(30), data(31)
    assert relative(functional(estimator, support, query, K), hand_unrolled(support, query, K)) < TOL
    meta = meta_parameters()
    trajectory = PureTrajectory(lambda p, e: loss_fn(p, support, meta), theta(), mg.optim.SGD(lr=meta["lr"]), K,
                                snapshots=estimator.snapshot_schedule())
    assert trajectory.tape.held < K
    trajectory.restore(0, K - 1)
    assert trajectory.recomputed_steps > 0
    supports, queries = [data(40 + i) for i in range(2)], [data(50 + i) for i in range(2)]
    stack = lambda batches: tuple(torch.stack(t) for t in zip(*batches))  # noqa: E731
    one = functools.partial(mg.functional.meta_grad, loss_fn, inner_opt=mg.optim.SGD(lr=meta["lr"]), steps=K,
                            estimator=estimator, meta=meta)
    g, g_meta = torch.func.vmap(one, in_dims=(None, 0, 0))(theta(), stack(supports), stack(queries))
    for i in range(2):
        row = flat({n: t[i] for n, t in g.items()},
                   {"log_wd": g_meta["log_wd"][i], "lr": {n: t[i] for n, t in g_meta["lr"].items()}})
        assert relative(row, hand_unrolled(supports[i], queries[i], K)) < TOL


def dense_implicit(support, query, K, reg, lr=0.1):
    """MATH.md's Implicit, densely, on K proximal SGD steps written out: θ's meta-gradient
    ``x = (I + H*/λ)⁻¹ v`` with ``H* = ∇²_φ L_tr(φ_K)`` (the loss without the proximal term) and
    ``v = ∇_φ L_val(φ_K)``, and log_wd's ``∂L_val/∂η − (1/λ)(∂_η ∇_φ L_tr(φ_K))ᵀ x``."""
    meta = meta_parameters()
    th = theta()
    names, shapes = list(th), [t.shape for t in th.values()]

    def unflat(vector):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = vector[i:i + s.numel()].reshape(s)
            i += s.numel()
        return out

    phi = dict(th)
    for _ in range(K):
        leaves = {n: t.clone().requires_grad_() for n, t in phi.items()}
        grads = torch.autograd.grad(loss_fn(leaves, support, meta), list(leaves.values()))
        phi = {n: phi[n] - lr * (g + reg * (phi[n] - th[n])) for n, g in zip(names, grads)}
    x_K = torch.cat([t.reshape(-1) for t in phi.values()])
    log_wd = meta["log_wd"]

    def inner(x, w):
        return loss_fn(unflat(x), support, {**meta, "log_wd": w})

    H = torch.autograd.functional.hessian(lambda x: inner(x, log_wd), x_K)
    xl, wl = x_K.clone().requires_grad_(), log_wd.clone().requires_grad_()
    v, dval = torch.autograd.grad(loss_fn(unflat(xl), query, {**meta, "log_wd": wl}), [xl, wl])
    x = torch.linalg.solve(torch.eye(len(x_K), dtype=DT) + (H + H.T) / (2 * reg), v)
    # ∂_η ∇_φ L_tr(φ_K, η): the Jacobian of the inner gradient in log_wd, one column.
    mixed = torch.autograd.functional.jacobian(lambda w: torch.func.grad(lambda xx: inner(xx, w))(x_K), log_wd.clone())
    return torch.cat([x, (dval - mixed @ x / reg).reshape(1)])


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_implicit_called_directly_equals_its_dense_definition(solver):
    """meta_grad(estimator=Implicit(λ)) called directly (not under vmap): the inner loop takes
    the proximal term, and the solve runs on the step's products at φ_K, for θ and a learned
    weight decay inside the loss; under vmap it is refused with what to do."""
    support, query, K, reg = data(1), data(2), 6, 4.0
    meta = {"log_wd": meta_parameters()["log_wd"]}
    estimator = mg.Implicit(reg=reg, solver=solver, max_iter=200, tol=1e-13)
    report = {"stale": 1}
    g, g_meta = mg.functional.meta_grad(loss_fn, theta(), support, query, inner_opt=mg.optim.SGD(lr=0.1), steps=K,
                                        estimator=estimator, meta=meta, info=report)
    got = torch.cat([*(t.reshape(-1) for t in g.values()), g_meta["log_wd"].reshape(1)])
    assert relative(got, dense_implicit(support, query, K, reg)) < 1e-9
    assert report["converged"] and report["solver"] == solver and "stale" not in report  # meta_grad(info=...)
    with pytest.raises(TypeError, match="info: expected a dict"):
        mg.functional.meta_grad(loss_fn, theta(), support, query, inner_opt=mg.optim.SGD(lr=0.1), steps=K,
                                estimator=estimator, meta=meta, info=[])
    with pytest.raises(ValueError, match="estimator: .*Call meta_grad directly"):
        torch.func.vmap(lambda x, y: mg.functional.meta_grad(
            loss_fn, theta(), (x, y), query, inner_opt=mg.optim.SGD(lr=0.1), steps=K, estimator=estimator,
            meta=meta))(torch.stack([support[0]] * 2), torch.stack([support[1]] * 2))
    with pytest.raises(ValueError, match="compile: .*proximal term"):
        mg.functional.meta_grad(loss_fn, theta(), support, query, inner_opt=mg.optim.SGD(lr=0.1), steps=K,
                                estimator=estimator, meta=meta, compile=True)


def _input_gradient_loss(params, batch, derivative):
    """An inner loss with a penalty on the input gradient of the model's output, the derivative
    taken by ``torch.func.grad`` (at fixed weights) or by autograd on a leaf made here."""
    x, y = batch
    out = functional_call(MODEL, params, (x,))
    if derivative == "func":
        g = torch.func.grad(lambda z: functional_call(MODEL, params, (z,)).sum())(x)
    else:
        xi = x.clone().requires_grad_()
        g, = torch.autograd.grad(functional_call(MODEL, params, (xi,)).sum(), xi, create_graph=True)
    return ((out - y) ** 2).mean() + 0.1 * (g ** 2).mean()


@pytest.mark.parametrize("estimator", [mg.Full(), mg.Checkpointed(), mg.Binomial(3)], ids=repr)
def test_a_derivative_inside_the_loss(estimator):
    """By ``torch.func.grad`` it runs in the functional face and equals the hand-written unroll;
    by ``requires_grad_`` and ``torch.autograd.grad``, which cannot run under the transforms the
    face takes its gradients with, the error names ``loss_fn`` and what to write instead."""
    support, query = data(71), data(72)
    loss = functools.partial(_input_gradient_loss, derivative="func")
    th = {n: t.requires_grad_() for n, t in theta().items()}
    phi = dict(th)
    for _ in range(3):
        grads = torch.autograd.grad(loss(phi, support), list(phi.values()), create_graph=True)
        phi = {n: p - 0.1 * g for (n, p), g in zip(phi.items(), grads)}
    want = torch.autograd.grad(loss(phi, query), list(th.values()))
    got = mg.functional.meta_grad(loss, theta(), support, query, inner_opt=mg.optim.SGD(lr=0.1), steps=3,
                                  estimator=estimator)
    for g, w in zip(got.values(), want):
        torch.testing.assert_close(g, w, rtol=TOL, atol=TOL)
    with pytest.raises(ValueError, match=r"loss_fn: .*torch\.func\.grad"):
        mg.functional.meta_grad(functools.partial(_input_gradient_loss, derivative="autograd"), theta(), support,
                                query, inner_opt=mg.optim.SGD(lr=0.1), steps=3, estimator=estimator)
