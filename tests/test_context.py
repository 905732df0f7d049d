"""Behaviour of ``mg.MetaGradient`` with every estimator, against an independent reference.

The reference below never imports metagrad. It computes, in float64:

- the exact meta-gradient by a plain hand-unrolled autograd loop (``create_graph=True``)
  over a manual forward pass (``F.linear``/``F.batch_norm``), and
- each estimator's own quantity from explicit step Jacobians ``J_k = ∂φ_{k+1}/∂φ_k``
  (MATH.md table): FirstOrder ``v``; Truncated(T) ``J_{K−T}ᵀ⋯J_{K−1}ᵀ v``; Binomial(L)
  the explicit subset sum of ``∏(I + (J_kᵀ − I))`` up to order L, leftmost factor first.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import metagrad as mg

DT = torch.float64
K = 3
LR = 0.3
RTOL, ATOL = 1e-9, 1e-12


# ------------------------------------------------------------------ models and data
def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)


def mlp_forward(p, x):
    h = torch.tanh(F.linear(x, p["0.weight"], p["0.bias"]))
    return F.linear(h, p["2.weight"], p["2.bias"])


def make_bn(mode: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].num_batches_tracked.fill_(7)
    model.train(mode == "train")
    return model


def bn_forward_for(model: nn.Module):
    """Manual forward of ``make_bn``: batch statistics in train mode, running ones in eval."""
    bn = model[1]
    training = bn.training
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()

    def forward(p, x):
        h = F.linear(x, p["0.weight"], p["0.bias"])
        if training:
            h = F.batch_norm(h, None, None, p["1.weight"], p["1.bias"], training=True, eps=bn.eps)
        else:
            h = F.batch_norm(h, rm, rv, p["1.weight"], p["1.bias"], training=False, eps=bn.eps)
        return F.linear(torch.tanh(h), p["3.weight"], p["3.bias"])

    return forward


def batch(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=DT)
    y = torch.sin(2 * x.sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g, dtype=DT)
    return x, y


SUPPORT = [batch(100 + k) for k in range(6)]  # one batch per inner step
QUERY = batch(200)
QUERY_B = batch(201)


def closure_for(x, y):
    return lambda fmodel: F.mse_loss(fmodel(x), y)


def query_loss(f, data=QUERY):
    return F.mse_loss(f(data[0]), data[1])


def combined_query(f):
    return 0.3 * query_loss(f, QUERY) + 2.0 * query_loss(f, QUERY_B)


# ------------------------------------------------------------------ the reference
class Reference:
    """Independent float64 meta-gradients (no metagrad inside)."""

    def __init__(self, model, forward, support=SUPPORT, lr=LR):
        self.forward = forward
        named = list(model.named_parameters())
        self.theta = {n: p.detach().clone() for n, p in named if p.requires_grad}
        self.const = {n: p.detach().clone() for n, p in named if not p.requires_grad}
        self.names = list(self.theta)
        self.support = list(support)
        self.lr = {}
        for n, t in self.theta.items():
            value = lr[n] if isinstance(lr, Mapping) else lr
            self.lr[n] = torch.as_tensor(value, dtype=DT) * torch.ones_like(t)

    # the model at fast weights φ, as a callable x ↦ output
    def at(self, phi):
        return lambda x: self.forward({**self.const, **phi}, x)

    def inner_loss(self, phi, k):
        x, y = self.support[k]
        return F.mse_loss(self.at(phi)(x), y)

    def iterates(self, steps):
        phi = dict(self.theta)
        out = [phi]
        for k in range(steps):
            p = {n: t.clone().requires_grad_() for n, t in phi.items()}
            g = torch.autograd.grad(self.inner_loss(p, k), list(p.values()))
            phi = {n: (p[n] - self.lr[n] * gi).detach() for n, gi in zip(p, g)}
            out.append(phi)
        return out

    def inner_losses(self, steps):
        return [self.inner_loss(phi, k).detach() for k, phi in enumerate(self.iterates(steps)[:steps])]

    def exact(self, steps, query):
        """∇_θ query(φ_K(θ)) by a hand-unrolled loop with create_graph=True."""
        theta = {n: t.clone().requires_grad_() for n, t in self.theta.items()}
        phi = theta
        for k in range(steps):
            g = torch.autograd.grad(self.inner_loss(phi, k), list(phi.values()), create_graph=True)
            phi = {n: phi[n] - self.lr[n] * gi for n, gi in zip(phi, g)}
        grads = torch.autograd.grad(query(self.at(phi)), list(theta.values()), allow_unused=True)
        return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(theta.items(), grads)}

    # -- flat-vector helpers for the explicit-Jacobian estimates
    def _flat(self, d):
        return torch.cat([d[n].reshape(-1) for n in self.names])

    def _unflat(self, vec):
        out, i = {}, 0
        for n in self.names:
            t = self.theta[n]
            out[n] = vec[i:i + t.numel()].view_as(t)
            i += t.numel()
        return out

    def jacobian(self, phi, k):
        lr = self._flat(self.lr)

        def step(vec):
            loss = self.inner_loss(self._unflat(vec), k)
            (g,) = torch.autograd.grad(loss, vec, create_graph=True)
            return vec - lr * g

        return torch.autograd.functional.jacobian(step, self._flat(phi))

    def estimate(self, kind, steps, query):
        """The quantity the estimator ``kind`` computes, for a query loss ``query(f)``."""
        name = kind[0]
        if name == "exact":
            return self.exact(steps, query)
        phis = self.iterates(steps)
        final = {n: t.clone().requires_grad_() for n, t in phis[-1].items()}
        v = self._flat(dict(zip(final, torch.autograd.grad(query(self.at(final)),
                                                            list(final.values())))))
        if name == "first_order":
            return self._unflat(v)
        jac_t = [self.jacobian(phis[k], k).T for k in range(steps)]
        if name in ("truncated", "jacobian_exact"):
            kept = kind[1] if name == "truncated" else steps
            u = v
            for m in reversed(range(steps - kept, steps)):
                u = jac_t[m] @ u
            return self._unflat(u)
        if name == "binomial":
            order = kind[1]
            eye = torch.eye(v.numel(), dtype=DT)
            d = [j - eye for j in jac_t]
            total = v.clone()
            for level in range(1, order + 1):
                for subset in itertools.combinations(range(steps), level):
                    w = v
                    for k in reversed(subset):  # D_{k1} D_{k2} ⋯ D_{kl} v
                        w = d[k] @ w
                    total = total + w
            return self._unflat(total)
        raise AssertionError(kind)


# ------------------------------------------------------------------ estimators under test
# (id, factory, the reference quantity). Truncated(2)/Binomial(2) need K >= 2.
ESTIMATOR_SPECS = [
    ("full", lambda: mg.Full(), ("exact",)),
    ("checkpointed", lambda: mg.Checkpointed(), ("exact",)),
    ("first_order", lambda: mg.FirstOrder(), ("first_order",)),
    ("truncated2", lambda: mg.Truncated(steps=2), ("truncated", 2)),
    ("binomial2", lambda: mg.Binomial(order=2), ("binomial", 2)),
    ("binomial2_chunk1", lambda: mg.Binomial(order=2, chunk_size=1), ("binomial", 2)),
]
ESTIMATORS = [pytest.param(factory, kind, id=name) for name, factory, kind in ESTIMATOR_SPECS]


# ------------------------------------------------------------------ helpers
def run_inner(meta, steps, support=SUPPORT):
    losses = []
    for k in range(steps):
        losses.append(meta.step(closure_for(*support[k])))
    return losses


def meta_gradient(model, estimator, steps=K, query=query_loss, lr=LR, support=SUPPORT):
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator) as meta:
        run_inner(meta, steps, support)
        query(meta.fmodel).backward()
    return meta


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bitwise_equal(model, before):
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"parameter {n} was modified"


def assert_grads(model, expected, scale=1.0, offset=None):
    for n, p in model.named_parameters():
        if n not in expected:
            continue
        want = scale * expected[n] + (0 if offset is None else offset[n])
        assert p.grad is not None, f"{n}.grad is None"
        torch.testing.assert_close(p.grad, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{n}: {m}")


def add(a, b):
    return {n: a[n] + b[n] for n in a}


# ------------------------------------------------------------------ the reference itself
def test_reference_is_self_consistent_and_discriminating():
    ref = Reference(make_mlp(), mlp_forward)
    exact = ref.exact(K, query_loss)
    via_jacobians = ref.estimate(("jacobian_exact",), K, query_loss)
    for n in exact:
        torch.testing.assert_close(via_jacobians[n], exact[n], rtol=1e-10, atol=1e-13)
    for full_kind in [("truncated", K), ("binomial", K)]:
        est = ref.estimate(full_kind, K, query_loss)
        for n in exact:
            torch.testing.assert_close(est[n], exact[n], rtol=1e-10, atol=1e-13)
    # the approximations differ from the exact value, so the tests below can tell them apart
    flat = lambda d: torch.cat([t.reshape(-1) for t in d.values()])  # noqa: E731
    for kind in [("first_order",), ("truncated", 2), ("binomial", 2), ("binomial", 1)]:
        rel = (flat(ref.estimate(kind, K, query_loss)) - flat(exact)).norm() / flat(exact).norm()
        assert rel > 1e-4, kind
    rel = (flat(ref.estimate(("binomial", 2), K, query_loss))
           - flat(ref.estimate(("truncated", 2), K, query_loss))).norm()
    assert rel > 1e-6


# ------------------------------------------------------------------ core behaviour
@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_matches_reference_and_leaves_params_bitwise_unchanged(factory, kind):
    model = make_mlp()
    before = snapshot(model)
    buffers = [b.clone() for b in model.buffers()]
    meta_gradient(model, factory())
    assert_bitwise_equal(model, before)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))
    assert_grads(model, Reference(model, mlp_forward).estimate(kind, K, query_loss))


@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_meta_gradient_accumulates_into_existing_grad(factory, kind):
    model = make_mlp()
    torch.manual_seed(5)
    existing = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = existing[n].clone()
    before = snapshot(model)
    meta_gradient(model, factory())
    assert_bitwise_equal(model, before)
    assert_grads(model, Reference(model, mlp_forward).estimate(kind, K, query_loss), offset=existing)


@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_two_tasks_in_a_row_sum_their_meta_gradients(factory, kind):
    model = make_mlp()
    ref = Reference(model, mlp_forward)
    task_b_support = [batch(300 + k) for k in range(K)]
    ref_b = Reference(model, mlp_forward, support=task_b_support)
    query_b = lambda f: query_loss(f, QUERY_B)  # noqa: E731
    expected = add(ref.estimate(kind, K, query_loss), ref_b.estimate(kind, K, query_b))

    # task 1 in a fresh MetaGradient; task 2 re-enters the same object
    meta = mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR), estimator=factory())
    with meta:
        run_inner(meta, K)
        query_loss(meta.fmodel).backward()
    with meta:
        run_inner(meta, K, task_b_support)
        query_b(meta.fmodel).backward()
    assert_grads(model, expected)

    # the same with two separate MetaGradient objects
    model2 = make_mlp()
    meta_gradient(model2, factory())
    meta_gradient(model2, factory(), query=query_b, support=task_b_support)
    assert_grads(model2, expected)


@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_combined_query_loss_from_two_fmodel_calls(factory, kind):
    model = make_mlp()
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR), estimator=factory()) as meta:
        run_inner(meta, K)
        loss_a = query_loss(meta.fmodel, QUERY)
        loss_b = query_loss(meta.fmodel, QUERY_B)
        (0.3 * loss_a + 2.0 * loss_b).backward()
    assert_grads(model, Reference(model, mlp_forward).estimate(kind, K, combined_query))


@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_step_returns_detached_scalar_inner_loss(factory, kind):
    model = make_mlp()
    expected = Reference(model, mlp_forward).inner_losses(K)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR), estimator=factory()) as meta:
        assert meta.steps == 0
        for k in range(K):
            loss = meta.step(closure_for(*SUPPORT[k]))
            assert isinstance(loss, torch.Tensor)
            assert loss.dim() == 0
            assert not loss.requires_grad and loss.grad_fn is None
            torch.testing.assert_close(loss, expected[k], rtol=1e-12, atol=1e-14)
            assert meta.steps == k + 1
        query_loss(meta.fmodel).backward()


@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_fmodel_params_is_a_name_to_tensor_mapping_of_the_fast_weights(factory, kind):
    model = make_mlp()
    names = [n for n, _ in model.named_parameters()]
    phis = Reference(model, mlp_forward).iterates(K)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR), estimator=factory()) as meta:
        for k in range(K + 1):
            fmodel = meta.fmodel
            assert isinstance(fmodel, mg.FunctionalModel)
            assert fmodel.module is model
            params = fmodel.params
            assert isinstance(params, Mapping)
            assert list(params) == names
            for n in names:
                assert isinstance(params[n], torch.Tensor)
                assert params[n].shape == dict(model.named_parameters())[n].shape
                torch.testing.assert_close(params[n].detach(), phis[k][n], rtol=1e-12, atol=1e-14)
            with pytest.raises(TypeError):
                params["0.bias"] = torch.zeros(5, dtype=DT)  # read-only
            assert [n for n, _ in fmodel.named_parameters()] == names
            assert len(list(fmodel.parameters())) == len(names)
            if k < K:
                meta.step(closure_for(*SUPPORT[k]))
        query_loss(meta.fmodel).backward()


@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_fmodel_accessed_mid_loop(factory, kind):
    """Reading meta.fmodel mid-loop (and backpropagating through it then) leaves the rest intact.

    Full's fast weights are the unrolled graph itself, so, as with any autograd graph, a
    backward that is to be followed by another through the same steps keeps it with
    ``retain_graph=True`` (the other estimators do not need it, and ignore it)."""
    model = make_mlp()
    ref = Reference(model, mlp_forward)
    phis = ref.iterates(4)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR), estimator=factory()) as meta:
        run_inner(meta, 2)
        mid = meta.fmodel
        torch.testing.assert_close(mid(QUERY[0]).detach(), ref.at(phis[2])(QUERY[0]),
                                   rtol=1e-12, atol=1e-14)
        query_loss(mid).backward(retain_graph=True)  # a meta-gradient at K = 2
        for k in range(2, 4):
            meta.step(closure_for(*SUPPORT[k]))
        assert meta.steps == 4
        final = meta.fmodel
        assert final is not mid
        torch.testing.assert_close(final(QUERY[0]).detach(), ref.at(phis[4])(QUERY[0]),
                                   rtol=1e-12, atol=1e-14)
        query_loss(final).backward()
    assert_grads(model, add(ref.estimate(kind, 2, query_loss), ref.estimate(kind, 4, query_loss)))


def test_full_mid_loop_backward_frees_the_unrolled_steps_as_autograd_does():
    model = make_mlp()
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR), estimator=mg.Full()) as meta:
        run_inner(meta, 2)
        query_loss(meta.fmodel).backward()
        for k in range(2, 4):
            meta.step(closure_for(*SUPPORT[k]))
        with pytest.raises(RuntimeError, match="retain_graph=True"):
            query_loss(meta.fmodel).backward()


@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_one_loss_from_a_mid_loop_and_the_final_fmodel(factory, kind):
    model = make_mlp()
    ref = Reference(model, mlp_forward)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR), estimator=factory()) as meta:
        run_inner(meta, 2)
        loss_mid = query_loss(meta.fmodel, QUERY_B)
        for k in range(2, 4):
            meta.step(closure_for(*SUPPORT[k]))
        loss = 0.5 * loss_mid + query_loss(meta.fmodel)
        if isinstance(meta.estimator, mg.Truncated):
            # Truncated(2) keeps the last 2 steps only; steps 0 and 1 are gone (documented)
            with pytest.raises(RuntimeError, match="no longer stored"):
                loss.backward()
            return
        loss.backward()
    expected = add({n: 0.5 * t for n, t in
                    ref.estimate(kind, 2, lambda f: query_loss(f, QUERY_B)).items()},
                   ref.estimate(kind, 4, query_loss))
    assert_grads(model, expected)


@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_same_closure_object_every_step(factory, kind):
    """The common pattern: one support batch, one closure, reused every step."""
    model = make_mlp()
    support = [SUPPORT[0]] * 4
    closure = closure_for(*SUPPORT[0])
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR), estimator=factory()) as meta:
        for _ in range(4):
            meta.step(closure)
        query_loss(meta.fmodel).backward()
    assert_grads(model, Reference(model, mlp_forward, support=support).estimate(kind, 4, query_loss))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_batchnorm_model(factory, kind, mode):
    model = make_bn(mode)
    before = snapshot(model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    ref = Reference(model, bn_forward_for(model))
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR), estimator=factory()) as meta:
        losses = run_inner(meta, K)
        out = meta.fmodel(QUERY[0])
        torch.testing.assert_close(out.detach(), ref.at(ref.iterates(K)[-1])(QUERY[0]),
                                   rtol=1e-12, atol=1e-13)
        F.mse_loss(out, QUERY[1]).backward()
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref.inner_losses(K)),
                               rtol=1e-12, atol=1e-14)
    assert model.training == (mode == "train")
    assert_bitwise_equal(model, before)
    for n, b in model.named_buffers():  # running stats and num_batches_tracked untouched
        assert torch.equal(b, buffers[n]), f"buffer {n} was modified"
    assert_grads(model, ref.estimate(kind, K, query_loss))


@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_frozen_parameter_is_a_constant(factory, kind):
    model = make_mlp()
    model[0].bias.requires_grad_(False)
    frozen_before = model[0].bias.detach().clone()
    before = snapshot(model)
    ref = Reference(model, mlp_forward)
    assert "0.bias" in ref.const
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR), estimator=factory()) as meta:
        run_inner(meta, K)
        assert "0.bias" not in meta.fmodel.params
        query_loss(meta.fmodel).backward()
    assert model[0].bias.grad is None
    assert torch.equal(model[0].bias, frozen_before)
    assert_bitwise_equal(model, before)
    assert_grads(model, ref.estimate(kind, K, query_loss))


@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_per_parameter_lr_mapping(factory, kind):
    model = make_mlp()
    lr = {
        "0.weight": 0.2,
        "0.bias": torch.tensor(0.4, dtype=DT),
        "2.weight": torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]], dtype=DT),  # broadcast row
        "2.bias": 0.05,
    }
    ref = Reference(model, mlp_forward, lr=lr)
    uniform = Reference(model, mlp_forward, lr=0.2).estimate(kind, K, query_loss)
    meta_gradient(model, factory(), lr=lr)
    expected = ref.estimate(kind, K, query_loss)
    assert not torch.allclose(expected["0.weight"], uniform["0.weight"])
    assert_grads(model, expected)


@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_zero_inner_steps_give_the_ordinary_gradient(factory, kind):
    model = make_mlp()
    before = snapshot(model)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR), estimator=factory()) as meta:
        assert meta.steps == 0
        query_loss(meta.fmodel).backward()
    assert_bitwise_equal(model, before)
    assert_grads(model, Reference(model, mlp_forward).exact(0, query_loss))


@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_zero_step_size_gives_the_ordinary_gradient(factory, kind):
    model = make_mlp()
    meta_gradient(model, factory(), lr=0.0)
    assert_grads(model, Reference(model, mlp_forward).exact(0, query_loss))


@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_info_is_populated_after_backward(factory, kind):
    model = make_mlp()
    estimator = factory()
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR), estimator=estimator) as meta:
        assert len(meta.info) == 0
        run_inner(meta, K)
        loss = query_loss(meta.fmodel)
        assert len(meta.info) == 0
        loss.backward()
        info = meta.info
    assert isinstance(info, Mapping)
    assert info["estimator"] == repr(estimator)
    assert info["steps"] == K
    if isinstance(estimator, mg.Binomial):
        assert info["order"] == 2
    if isinstance(estimator, mg.Truncated):
        assert info["truncated_to"] == 2
    # a new block starts with an empty report
    with meta:
        assert len(meta.info) == 0
        meta.step(closure_for(*SUPPORT[0]))


@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_loss_built_inside_block_backpropagated_after_it_ends(factory, kind):
    model = make_mlp()
    before = snapshot(model)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR), estimator=factory()) as meta:
        run_inner(meta, K)
        loss = query_loss(meta.fmodel)
    assert all(p.grad is None for p in model.parameters())
    loss.backward()
    assert_bitwise_equal(model, before)
    assert_grads(model, Reference(model, mlp_forward).estimate(kind, K, query_loss))
    assert meta.info["steps"] == K


@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_meta_batch_of_losses_from_several_blocks_with_one_backward(factory, kind):
    """Build each task's loss in its own block, sum them, backpropagate once after all blocks."""
    model = make_mlp()
    before = snapshot(model)
    tasks = [([batch(600 + 10 * t + k) for k in range(K)], batch(700 + t)) for t in range(3)]
    total, expected = 0.0, None
    for support, query in tasks:
        q = lambda f, query=query: query_loss(f, query)  # noqa: E731
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR), estimator=factory()) as meta:
            run_inner(meta, K, support)
            total = total + q(meta.fmodel)
        g = Reference(model, mlp_forward, support=support).estimate(kind, K, q)
        expected = g if expected is None else add(expected, g)
    assert all(p.grad is None for p in model.parameters())
    (total / len(tasks)).backward()
    assert_bitwise_equal(model, before)
    assert_grads(model, expected, scale=1 / len(tasks))


@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_trajectory_released_after_first_backward_outside_block(factory, kind):
    """Documented: kept until the first backward after the block, released after it."""
    model = make_mlp()
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR), estimator=factory()) as meta:
        run_inner(meta, K)
        first = query_loss(meta.fmodel)
        second = query_loss(meta.fmodel, QUERY_B)
    first.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="released"):
        second.backward()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n])


@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_backward_twice_inside_block_with_retain_graph(factory, kind):
    model = make_mlp()
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR), estimator=factory()) as meta:
        run_inner(meta, K)
        loss = query_loss(meta.fmodel)
        loss.backward(retain_graph=True)
        loss.backward()
    assert_grads(model, Reference(model, mlp_forward).estimate(kind, K, query_loss), scale=2.0)


@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_torch_adam_outer_step_with_accumulated_grads(factory, kind):
    model = make_mlp()
    twin = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.05)
    tasks = [([batch(400 + 10 * t + k) for k in range(K)], batch(500 + t)) for t in range(2)]
    for _ in range(2):  # two outer iterations, a batch of two tasks each
        opt.zero_grad()
        twin_opt.zero_grad()
        expected = None
        for support, query in tasks:
            q = lambda f, query=query: query_loss(f, query)  # noqa: E731
            meta_gradient(model, factory(), query=q, support=support)
            g = Reference(twin, mlp_forward, support=support).estimate(kind, K, q)
            expected = g if expected is None else add(expected, g)
        for n, p in twin.named_parameters():
            p.grad = expected[n].clone()
        assert_grads(model, expected)
        opt.step()
        twin_opt.step()
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), make_mlp().parameters()))


# ------------------------------------------------------------------ estimator identities
@pytest.mark.parametrize("steps", [1, 3])
def test_exact_orders_equal_full(steps):
    model = make_mlp()
    exact = Reference(model, mlp_forward).exact(steps, query_loss)
    for estimator in [mg.Full(), mg.Checkpointed(), mg.Truncated(steps=steps),
                      mg.Binomial(order=steps), mg.Binomial(order=steps, chunk_size=1)]:
        model.zero_grad(set_to_none=True)
        meta_gradient(model, estimator, steps=steps)
        assert_grads(model, exact)


def test_order_zero_equals_first_order():
    model = make_mlp()
    v = Reference(model, mlp_forward).estimate(("first_order",), K, query_loss)
    for estimator in [mg.FirstOrder(), mg.Truncated(steps=0), mg.Binomial(order=0)]:
        model.zero_grad(set_to_none=True)
        meta_gradient(model, estimator)
        assert_grads(model, v)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_binomial_orders_match_subset_sum(order):
    model = make_mlp()
    ref = Reference(model, mlp_forward)
    for chunk in [None, 1, 2]:
        model.zero_grad(set_to_none=True)
        meta_gradient(model, mg.Binomial(order=order, chunk_size=chunk), steps=4)
        assert_grads(model, ref.estimate(("binomial", order), 4, query_loss))


@pytest.mark.parametrize("name,expected,kind", [
    ("full", mg.Full(), ("exact",)),
    ("checkpointed", mg.Checkpointed(), ("exact",)),
    ("first_order", mg.FirstOrder(), ("first_order",)),
    ("truncated", mg.Truncated(steps=2), ("truncated", 2)),
    # "binomial" is the automatic order (the fixed order of the paper is Binomial(order=2)):
    # compared with (2) at the order it stopped at.
    ("binomial", mg.Binomial(order="auto"), ("binomial", "auto")),
    (None, mg.Full(), ("exact",)),
])
def test_estimator_names(name, expected, kind):
    model = make_mlp()
    meta = meta_gradient(model, name)
    assert meta.estimator == expected
    if kind == ("binomial", "auto"):
        assert meta.info["fallback"] is None and meta.info["order"] >= 1
        kind = ("binomial", meta.info["order"])
    assert_grads(model, Reference(model, mlp_forward).estimate(kind, K, query_loss))


# ------------------------------------------------ for code that builds inner losses itself
@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_step_from_loss_on_fast_weights_equals_the_reference(factory, kind):
    """The public interface the adapters use: a loss built from ``meta.fast_weights()`` (here
    with the reference's own forward) stepped by ``meta.step_from_loss``, a query built from
    them too, gives the estimator's quantity; ``weights_at(k)`` are the reference's iterates."""
    model = make_mlp()
    ref = Reference(model, mlp_forward)
    iterates = ref.iterates(K)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR), estimator=factory()) as meta:
        for k in range(K):
            weights = meta.fast_weights()
            x, y = SUPPORT[k]
            loss = meta.step_from_loss(F.mse_loss(mlp_forward(weights, x), y), weights)
            assert not loss.requires_grad and meta.steps == k + 1
        for k in ([0, K - 1, K] if kind[0] == "exact" else [K]):
            for n, t in meta.weights_at(k).items():
                torch.testing.assert_close(t.detach(), iterates[k][n], rtol=1e-12, atol=1e-14)
        query_loss(lambda x: mlp_forward(meta.fast_weights(), x)).backward()
    assert_grads(model, ref.estimate(kind, K, query_loss))


def test_step_rule_replaces_the_update_rule_for_that_step_only():
    """``meta.step(closure, rule=...)``: step 1 with half the step size, the others with
    ``inner_opt``; the same meta-gradient by Full and by Checkpointed, which rebuilds step 1
    with the rule it was taken with."""
    lrs = [LR, LR / 2, LR]
    model = make_mlp()
    ref = Reference(model, mlp_forward)
    theta = {n: t.clone().requires_grad_() for n, t in ref.theta.items()}
    phi = theta
    for k, lr in enumerate(lrs):
        g = torch.autograd.grad(ref.inner_loss(phi, k), list(phi.values()), create_graph=True)
        phi = {n: phi[n] - lr * gi for n, gi in zip(phi, g)}
    expected = dict(zip(theta, torch.autograd.grad(query_loss(ref.at(phi)), list(theta.values()))))
    for estimator in (mg.Full(), mg.Checkpointed()):
        model.zero_grad(set_to_none=True)
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR), estimator=estimator) as meta:
            for k, lr in enumerate(lrs):
                meta.step(closure_for(*SUPPORT[k]), rule=None if lr == LR else mg.optim.SGD(lr=lr))
            query_loss(meta.fmodel).backward()
        assert_grads(model, expected)


def test_public_interface_errors_name_the_argument():
    model = make_mlp()
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=LR)) as meta:
        with pytest.raises(TypeError, match="rule: expected an update rule"):
            meta.step(closure_for(*SUPPORT[0]), rule="sgd")
        with pytest.raises(TypeError, match="rule: .*gradient transformation.*TransformationRule"):
            meta.step(closure_for(*SUPPORT[0]), rule=_PlainSGDTransformation(LR))
        weights = meta.fast_weights()
        loss = F.mse_loss(mlp_forward(weights, SUPPORT[0][0]), SUPPORT[0][1])
        with pytest.raises(ValueError, match=r"params: .*\['0.weight', '0.bias'"):
            meta.step_from_loss(loss, {"0.weight": weights["0.weight"]})
        with pytest.raises(TypeError, match="params: expected the name→tensor mapping"):
            meta.step_from_loss(loss, list(weights.values()))
        meta.step_from_loss(loss, weights)
        with pytest.raises(IndexError, match=r"k: expected an integer in \[0, 1\].*got 2"):
            meta.weights_at(2)
        with pytest.raises(TypeError, match="k: expected an integer"):
            meta.weights_at(1.0)
    with pytest.raises(RuntimeError, match="block has ended"):
        meta.fast_weights()


class _PlainSGDTransformation:
    """A gradient transformation in optax's shape, written here (no torchopt, no ``inplace``):
    ``u = −lr·g``, no state."""

    def __init__(self, lr):
        self.lr = lr

    def init(self, params):
        return ()

    def update(self, updates, state, params=None):
        return {n: None if g is None else -self.lr * g for n, g in updates.items()}, state


@pytest.mark.parametrize("factory,kind", ESTIMATORS)
def test_a_gradient_transformation_is_an_inner_rule_by_its_shape(factory, kind):
    """Any object with init() and update() is recognized as a gradient transformation, by the
    core itself, and gives the same meta-gradient as the rule it computes."""
    model = make_mlp()
    with mg.MetaGradient(model, inner_opt=_PlainSGDTransformation(LR), estimator=factory()) as meta:
        assert isinstance(meta.inner_opt, mg.optim.TransformationRule)
        assert meta.inner_opt.update_options == {}  # its update takes no inplace=
        run_inner(meta, K)
        query_loss(meta.fmodel).backward()
    assert_grads(model, Reference(model, mlp_forward).estimate(kind, K, query_loss))
