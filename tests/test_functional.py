"""``mg.FunctionalModel``: calls at fast weights, a read-only params mapping, the buffer policy.

Buffer policy (metagrad/functional.py): no buffer is ever written. A normalization layer in
training mode normalizes with the batch's statistics; in eval mode with its running statistics.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import metagrad as mg

DT = torch.float64


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)


def fast_weights(model, scale=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: p.detach() + scale * torch.randn(p.shape, generator=g, dtype=DT)
            for n, p in model.named_parameters()}


def mlp_forward(p, x):
    return F.linear(torch.tanh(F.linear(x, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"])


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} was modified"


X = torch.randn(7, 3, dtype=DT, generator=torch.Generator().manual_seed(3))


def test_call_evaluates_the_module_at_the_given_weights():
    model = make_mlp()
    before = state_of(model)
    phi = fast_weights(model)
    fmodel = mg.FunctionalModel(model, phi)
    torch.testing.assert_close(fmodel(X), mlp_forward(phi, X), rtol=1e-13, atol=1e-14)
    assert not torch.allclose(fmodel(X), model(X))
    assert fmodel.module is model
    assert_state_equal(model, before)
    assert all(p.grad is None for p in model.parameters())


def test_call_is_differentiable_in_the_fast_weights_only():
    model = make_mlp()
    phi = {n: t.requires_grad_() for n, t in fast_weights(model).items()}
    out = mg.FunctionalModel(model, phi)(X).pow(2).sum()
    grads = torch.autograd.grad(out, list(phi.values()))
    ref_phi = {n: t.detach().requires_grad_() for n, t in phi.items()}
    ref = torch.autograd.grad(mlp_forward(ref_phi, X).pow(2).sum(), list(ref_phi.values()))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)
    assert all(p.grad is None for p in model.parameters())


def test_params_is_a_read_only_name_to_tensor_mapping():
    model = make_mlp()
    phi = fast_weights(model)
    fmodel = mg.FunctionalModel(model, phi)
    params = fmodel.params
    assert isinstance(params, Mapping)
    assert list(params) == list(phi)
    assert all(params[n] is phi[n] for n in phi)
    with pytest.raises(TypeError):
        params["0.bias"] = torch.zeros(5, dtype=DT)
    with pytest.raises(TypeError):
        del params["0.bias"]
    # the caller's dict is copied: changing it later does not change the fmodel
    phi["0.bias"] = torch.zeros(5, dtype=DT)
    assert fmodel.params["0.bias"] is not phi["0.bias"]
    assert [n for n, _ in fmodel.named_parameters()] == list(params)
    assert all(a is b for a, b in zip(fmodel.parameters(), params.values()))
    assert "FunctionalModel" in repr(fmodel)


def test_partial_weights_take_the_rest_from_the_module():
    model = make_mlp()
    phi = fast_weights(model)
    partial = {n: phi[n] for n in ["0.weight", "2.bias"]}
    mixed = {**{n: p.detach() for n, p in model.named_parameters()}, **partial}
    torch.testing.assert_close(mg.FunctionalModel(model, partial)(X), mlp_forward(mixed, X),
                               rtol=1e-13, atol=1e-14)


def test_kwargs_are_passed_to_forward():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2).to(DT)

        def forward(self, x, *, scale=1.0):
            return scale * self.lin(x)

    model = Scaled()
    phi = fast_weights(model)
    out = mg.FunctionalModel(model, phi)(X, scale=3.0)
    torch.testing.assert_close(out, 3.0 * F.linear(X, phi["lin.weight"], phi["lin.bias"]))


def test_guard_is_checked_on_call_and_params():
    calls = []

    def guard():
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("closed")

    fmodel = mg.FunctionalModel(make_mlp(), fast_weights(make_mlp()), guard=guard)
    fmodel(X)
    fmodel.params
    with pytest.raises(RuntimeError, match="closed"):
        fmodel(X)
    with pytest.raises(RuntimeError, match="closed"):
        fmodel.params


def test_composes_with_torch_func_grad_and_vmap():
    model = make_mlp()
    phi = fast_weights(model)

    def loss(w):
        return mg.FunctionalModel(model, w)(X).pow(2).mean()

    grads = torch.func.grad(loss)(phi)
    batched = {n: torch.stack([t, 2 * t]) for n, t in phi.items()}
    vgrads = torch.func.vmap(torch.func.grad(loss))(batched)
    for n in phi:
        torch.testing.assert_close(vgrads[n][0], grads[n])


# ------------------------------------------------------------------ buffer policy
def make_bn(mode, momentum=0.1, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=momentum), nn.Tanh(),
                          nn.Linear(4, 2)).to(DT)
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].num_batches_tracked.fill_(11)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    model.train(mode == "train")
    return model


def bn_reference(model, p, x):
    bn = model[1]
    h = F.linear(x, p["0.weight"], p["0.bias"])
    if bn.training:
        h = F.batch_norm(h, None, None, p["1.weight"], p["1.bias"], training=True, eps=bn.eps)
    else:
        h = F.batch_norm(h, bn.running_mean.clone(), bn.running_var.clone(), p["1.weight"],
                         p["1.bias"], training=False, eps=bn.eps)
    return F.linear(torch.tanh(h), p["3.weight"], p["3.bias"])


@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_policy(mode, momentum):
    model = make_bn(mode, momentum)
    before = state_of(model)
    phi = {n: t.requires_grad_() for n, t in fast_weights(model, scale=0.2).items()}
    fmodel = mg.FunctionalModel(model, phi)
    out = fmodel(X)
    torch.testing.assert_close(out, bn_reference(model, phi, X), rtol=1e-12, atol=1e-13)
    out.sum().backward()  # a backward does not write buffers either
    fmodel(X[:3])
    assert_state_equal(model, before)
    assert model.training == (mode == "train")
    assert model[1].training == (mode == "train")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_normalizes_with_batch_statistics_only_in_train_mode(mode):
    model = make_bn(mode)
    fmodel = mg.FunctionalModel(model, fast_weights(model, scale=0.2))
    # with batch statistics a row's output depends on the rest of the batch
    same = torch.allclose(fmodel(X)[:3], fmodel(X[:3]), rtol=1e-12, atol=1e-13)
    assert same == (mode == "eval")


def test_batchnorm_under_vmap_leaves_buffers_alone():
    model = make_bn("train")
    before = state_of(model)
    phi = fast_weights(model, scale=0.2)
    batched = {n: torch.stack([t, 1.5 * t]) for n, t in phi.items()}

    def loss(w):
        return mg.FunctionalModel(model, w)(X).pow(2).mean()

    vgrads = torch.func.vmap(torch.func.grad(loss))(batched)
    single = torch.func.grad(loss)(phi)
    for n in phi:
        torch.testing.assert_close(vgrads[n][0], single[n], rtol=1e-10, atol=1e-12)
    assert_state_equal(model, before)


def test_nested_and_other_norm_layers_keep_their_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
        nn.Unflatten(1, (2, 2)),
        nn.InstanceNorm1d(2, affine=True, track_running_stats=True),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).to(DT)
    model.register_buffer("offset", torch.full((2,), 0.25, dtype=DT))
    orig_forward = model.forward
    model.forward = lambda x: orig_forward(x) + model.offset  # a plain buffer, read not written
    with torch.no_grad():
        model[2].running_mean.fill_(0.3)
        model[0][1].running_var.fill_(2.0)
    model.train()
    before = state_of(model)
    phi = fast_weights(model, scale=0.1)
    out = mg.FunctionalModel(model, phi)(X)
    assert out.shape == (7, 2)
    assert_state_equal(model, before)

    # batch statistics in training mode, running ones in eval mode
    h = F.linear(X, phi["0.0.weight"], phi["0.0.bias"])
    h = F.batch_norm(h, None, None, phi["0.1.weight"], phi["0.1.bias"], training=True)
    h = F.instance_norm(h.view(7, 2, 2), None, None, phi["2.weight"], phi["2.bias"],
                        use_input_stats=True).flatten(1)
    expected = F.linear(h, phi["4.weight"], phi["4.bias"]) + 0.25
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-13)


def test_batchnorm_without_running_stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).to(DT)
    phi = fast_weights(model)
    out = mg.FunctionalModel(model, phi)(X)
    h = F.linear(X, phi["0.weight"], phi["0.bias"])
    torch.testing.assert_close(out, F.batch_norm(h, None, None, phi["1.weight"], phi["1.bias"],
                                                 training=True))


def test_meta_fmodel_is_a_functional_model_of_the_user_model():
    model = make_bn("train")
    before = state_of(model)
    x, y = X, torch.zeros(7, 2, dtype=DT)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed()) as meta:
        assert isinstance(meta.fmodel, mg.FunctionalModel)
        assert meta.fmodel.module is model
        meta.step(lambda f: F.mse_loss(f(x), y))
        out = meta.fmodel(x)
        torch.testing.assert_close(
            out.detach(), bn_reference(model, {n: t.detach() for n, t in meta.fmodel.params.items()}, x))
        F.mse_loss(out, y).backward()
    # the buffers were not written
    for k in ["1.running_mean", "1.running_var", "1.num_batches_tracked"]:
        assert torch.equal(model.state_dict()[k], before[k])


def tied_model():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).to(DT)
    model[2].weight = model[0].weight  # one parameter, two names
    return model


def test_tied_weights_use_the_fast_weight_under_every_name():
    model = tied_model()
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "2.bias"]
    phi = fast_weights(model)
    x = torch.randn(6, 4, dtype=DT)
    expected = torch.tanh(x @ phi["0.weight"].T + phi["0.bias"]) @ phi["0.weight"].T + phi["2.bias"]
    torch.testing.assert_close(mg.FunctionalModel(model, phi)(x), expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("estimator", [mg.Full(), mg.Checkpointed(), mg.Binomial(3)], ids=repr)
def test_tied_weights_meta_gradient_equals_a_hand_unrolled_loop(estimator):
    model = tied_model()
    x, y = torch.randn(8, 4, dtype=DT), torch.randn(8, 4, dtype=DT)
    K, lr = 3, 0.1

    def forward(w, b0, b2, inputs):
        return torch.tanh(inputs @ w.T + b0) @ w.T + b2

    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    params = theta
    for _ in range(K):
        grads = torch.autograd.grad(F.mse_loss(forward(*params, x), y), params, create_graph=True)
        params = [p - lr * g for p, g in zip(params, grads)]
    expected = torch.autograd.grad(F.mse_loss(forward(*params, y), x), theta)

    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator) as meta:
        for _ in range(K):
            meta.step(lambda f: F.mse_loss(f(x), y))
        F.mse_loss(meta.fmodel(y), x).backward()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)
