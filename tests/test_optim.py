"""``mg.optim.SGD``: the update ``φ ← φ − α g`` and its argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import metagrad as mg

DT = torch.float64


def params_and_grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(4, 3, generator=g, dtype=DT), "b": torch.randn(4, generator=g, dtype=DT)}
    grads = {"w": torch.randn(4, 3, generator=g, dtype=DT), "b": torch.randn(4, generator=g, dtype=DT)}
    return params, grads


def test_is_an_update_rule():
    rule = mg.optim.SGD(lr=0.1)
    assert isinstance(rule, mg.optim.UpdateRule)
    assert "0.1" in repr(rule)
    assert "2" in repr(mg.optim.SGD(lr={"w": 0.1, "b": 0.2}))


@pytest.mark.parametrize("lr", [0.1, 0.0, 3, 1e-8])
def test_float_step_is_p_minus_lr_g(lr):
    params, grads = params_and_grads()
    originals = {n: t.clone() for n, t in {**params, **{"g" + n: g for n, g in grads.items()}}.items()}
    rule = mg.optim.SGD(lr=lr)
    state = rule.init(params)
    assert state == {}
    new, new_state = rule.step(params, grads, state)
    assert new_state == {}
    assert set(new) == set(params)
    for n in params:
        assert torch.equal(new[n], params[n] - float(lr) * grads[n])
        assert new[n] is not params[n]
    # inputs not modified
    for n in params:
        assert torch.equal(params[n], originals[n])
        assert torch.equal(grads[n], originals["g" + n])


def test_integer_lr_is_accepted_as_a_float():
    rule = mg.optim.SGD(lr=2)
    assert rule.lr == 2.0 and isinstance(rule.lr, float)


@pytest.mark.parametrize("lr", [
    {"w": 0.1, "b": 0.5},
    {"w": torch.tensor(0.1, dtype=DT), "b": 0.5},
    {"w": torch.tensor([[0.1], [0.2], [0.3], [0.4]], dtype=DT), "b": torch.full((4,), 0.2, dtype=DT)},
    {"w": torch.rand(4, 3, dtype=DT), "b": 0.0},
], ids=["floats", "scalar-tensor", "broadcast-tensors", "full-shape-tensor"])
def test_mapping_step_is_p_minus_lr_g_per_parameter(lr):
    params, grads = params_and_grads()
    rule = mg.optim.SGD(lr=lr)
    state = rule.init(params)
    new, _ = rule.step(params, grads, state)
    for n in params:
        torch.testing.assert_close(new[n], params[n] - torch.as_tensor(lr[n], dtype=DT) * grads[n],
                                   rtol=0, atol=0)
        assert new[n].shape == params[n].shape


def test_mapping_lr_is_copied():
    lr = {"w": 0.1, "b": 0.5}
    rule = mg.optim.SGD(lr=lr)
    lr["w"] = float("nan")  # mutating the caller's dict afterwards has no effect
    params, grads = params_and_grads()
    new, _ = rule.step(params, grads, rule.init(params))
    assert torch.isfinite(new["w"]).all()


def test_step_is_differentiable_in_params_and_grads():
    params, grads = params_and_grads()
    params = {n: t.requires_grad_() for n, t in params.items()}
    grads = {n: t.requires_grad_() for n, t in grads.items()}
    rule = mg.optim.SGD(lr={"w": 0.3, "b": torch.tensor(0.7, dtype=DT)})
    new, _ = rule.step(params, grads, rule.init(params))
    total = sum(t.sum() for t in new.values())
    dp = torch.autograd.grad(total, list(params.values()) + list(grads.values()))
    torch.testing.assert_close(dp[0], torch.ones_like(dp[0]))
    torch.testing.assert_close(dp[1], torch.ones_like(dp[1]))
    torch.testing.assert_close(dp[2], torch.full_like(dp[2], -0.3))
    torch.testing.assert_close(dp[3], torch.full_like(dp[3], -0.7))


def test_step_composes_with_vmap():
    params, grads = params_and_grads()
    batched_p = {n: torch.stack([t, 2 * t]) for n, t in params.items()}
    batched_g = {n: torch.stack([t, -t]) for n, t in grads.items()}
    rule = mg.optim.SGD(lr={"w": torch.full((4, 1), 0.1, dtype=DT), "b": 0.2})
    out = torch.func.vmap(lambda p, g: rule.step(p, g, {})[0])(batched_p, batched_g)
    for i in range(2):
        p = {n: t[i] for n, t in batched_p.items()}
        g = {n: t[i] for n, t in batched_g.items()}
        expected, _ = rule.step(p, g, {})
        for n in p:
            torch.testing.assert_close(out[n][i], expected[n])


@given(lr=st.floats(min_value=0.0, max_value=1e3, allow_nan=False, allow_infinity=False),
       seed=st.integers(0, 2**16))
def test_step_property(lr, seed):
    params, grads = params_and_grads(seed)
    new, _ = mg.optim.SGD(lr=lr).step(params, grads, {})
    for n in params:
        assert torch.equal(new[n], params[n] - lr * grads[n])


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("lr,error", [
    (float("nan"), ValueError),
    (float("inf"), ValueError),
    (-float("inf"), ValueError),
    (-1e-3, ValueError),
    ("0.1", TypeError),
    (b"0.1", TypeError),
    (True, TypeError),
    (None, TypeError),
    ([0.1], TypeError),
    (torch.tensor(float("nan")), ValueError),
    (torch.tensor(float("inf")), ValueError),
    (torch.tensor([0.1, -0.1]), ValueError),
    (torch.tensor(1), TypeError),
    (torch.tensor(-0.1, requires_grad=True), ValueError),
], ids=["nan", "inf", "-inf", "negative", "str", "bytes", "bool", "none", "list", "tensor-nan",
        "tensor-inf", "tensor-negative", "tensor-int", "tensor-requires-grad-negative"])
def test_bad_lr(lr, error):
    with pytest.raises(error, match="lr"):
        mg.optim.SGD(lr=lr)


@pytest.mark.parametrize("value,error", [
    (float("nan"), ValueError),
    (math.inf, ValueError),
    (-0.5, ValueError),
    ("fast", TypeError),
    (False, TypeError),
    (torch.tensor(-0.1, requires_grad=True), ValueError),
    (torch.tensor([float("nan")]), ValueError),
])
def test_bad_lr_in_mapping_names_the_entry(value, error):
    with pytest.raises(error) as info:
        mg.optim.SGD(lr={"w": 0.1, "b": value})
    assert "lr['b']" in str(info.value)


@pytest.mark.parametrize("lr,names", [
    ({"w": 0.1}, ["b"]),
    ({"w": 0.1, "b": 0.1, "c": 0.1}, ["c"]),
    ({"weight": 0.1, "bias": 0.1}, ["w", "b", "weight", "bias"]),
], ids=["missing", "unknown", "both"])
def test_mapping_must_name_exactly_the_parameters(lr, names):
    params, _ = params_and_grads()
    rule = mg.optim.SGD(lr=lr)
    with pytest.raises(ValueError, match="lr") as info:
        rule.init(params)
    for name in names:
        assert repr(name) in str(info.value)


def test_mapping_tensor_that_does_not_broadcast():
    params, _ = params_and_grads()
    rule = mg.optim.SGD(lr={"w": torch.ones(3, 4, dtype=DT), "b": 0.1})
    with pytest.raises(ValueError, match=r"lr\['w'\]"):
        rule.init(params)


def test_mapping_tensor_on_another_device():
    params, _ = params_and_grads()
    rule = mg.optim.SGD(lr={"w": torch.tensor(0.1, device="meta"), "b": 0.1})
    with pytest.raises(ValueError, match=r"lr\['w'\]"):
        rule.init(params)


# ------------------------------------------------------------ Momentum and Adam vs torch.optim
TORCH_TWINS = [
    ("momentum", lambda: mg.optim.Momentum(0.1, 0.9),
     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    ("momentum-dampening-decay", lambda: mg.optim.Momentum(0.05, 0.8, dampening=0.3, weight_decay=0.01),
     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01)),
    ("nesterov", lambda: mg.optim.Momentum(0.1, 0.9, nesterov=True),
     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)),
    ("adam", lambda: mg.optim.Adam(0.01), lambda ps: torch.optim.Adam(ps, lr=0.01)),
    ("adam-betas-eps-decay", lambda: mg.optim.Adam(0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
     lambda ps: torch.optim.Adam(ps, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
]


@pytest.mark.parametrize("name,ours,theirs", TORCH_TWINS, ids=[t[0] for t in TORCH_TWINS])
def test_rule_equals_torch_optim_on_the_same_gradients(name, ours, theirs):
    gen = torch.Generator().manual_seed(3)
    start = {"w": torch.randn(3, 4, dtype=torch.float64, generator=gen),
             "b": torch.randn(5, dtype=torch.float64, generator=gen)}
    twins = [torch.nn.Parameter(t.clone()) for t in start.values()]
    optimizer = theirs(twins)
    rule = ours()
    params, state = dict(start), rule.init(start)
    for step in range(7):
        grads = {n: torch.randn(t.shape, dtype=torch.float64, generator=gen) for n, t in params.items()}
        if step == 2:
            grads["b"] = torch.zeros_like(grads["b"])  # a zero gradient: Adam's √v at 0
        for p, g in zip(twins, grads.values()):
            p.grad = g.clone()
        optimizer.step()
        params, state = rule.step(params, grads, state)
        for p, n in zip(twins, params):
            torch.testing.assert_close(params[n], p.detach(), rtol=1e-12, atol=1e-12)


def test_adam_second_derivatives_are_finite_at_zero_gradient():
    rule = mg.optim.Adam(0.01)
    p = {"w": torch.ones(3, dtype=torch.float64, requires_grad=True)}
    g = {"w": torch.zeros(3, dtype=torch.float64, requires_grad=True)}
    new, _ = rule.step(p, g, rule.init(p))
    (grad_g,) = torch.autograd.grad(new["w"].sum(), g["w"])
    assert torch.isfinite(grad_g).all()


@pytest.mark.parametrize("make,argument", [
    (lambda: mg.optim.Momentum(0.1, momentum=1.0), "momentum"),
    (lambda: mg.optim.Momentum(0.1, momentum=-0.1), "momentum"),
    (lambda: mg.optim.Momentum(0.1, dampening=2.0), "dampening"),
    (lambda: mg.optim.Momentum(0.1, 0.9, dampening=0.1, nesterov=True), "nesterov"),
    (lambda: mg.optim.Momentum(float("nan")), "lr"),
    (lambda: mg.optim.Adam(0.1, betas=(0.9, 1.0)), "betas[1]"),
    (lambda: mg.optim.Adam(0.1, betas=0.9), "betas"),
    (lambda: mg.optim.Adam(0.1, eps=0.0), "eps"),
    (lambda: mg.optim.Adam(0.1, weight_decay=-1.0), "weight_decay"),
])
def test_stateful_rule_bad_arguments_name_the_argument(make, argument):
    with pytest.raises((TypeError, ValueError)) as error:
        make()
    assert argument in str(error.value)
