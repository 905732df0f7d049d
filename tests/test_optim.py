"""``mg.optim.SGD``: the update ``φ ← φ − α g`` and its argument checks."""

from __future__ import annotations

import math
import re

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


def step_both(rule, params, state, optimizer, twins, grads):
    """One step of ``rule`` from ``(params, state)`` and of the torch ``optimizer`` over ``twins``
    (name→Parameter), both on ``grads``; returns the rule's ``(params, state)``."""
    for n, p in twins.items():
        p.grad = grads[n].clone()
    optimizer.step()
    return rule.step(params, grads, state)


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
        assert_is_p_minus_lr_g(new[n], params[n], float(lr), grads[n])
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
        assert_is_p_minus_lr_g(new[n], params[n], lr, grads[n])


def assert_is_p_minus_lr_g(new, p, lr, g):
    """``new == p − lr·g`` to the rounding of one operation (a fused kernel rounds the
    product and the difference once, the plain form twice)."""
    bound = 2 * torch.finfo(p.dtype).eps * (p.abs() + lr * g.abs())
    assert bool(((new - (p - lr * g)).abs() <= bound).all())


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


@pytest.mark.parametrize("holder", ["ParameterDict", "ParameterList"])
def test_step_sizes_held_in_a_parameter_container_are_refused_with_the_dict_to_build(holder):
    """Meta-SGD code often keeps its step sizes in an ``nn.ParameterDict`` (keys without dots) or an
    ``nn.ParameterList``; the error shows the dict keyed like ``named_parameters()`` to pass."""
    model = torch.nn.Linear(2, 1)
    if holder == "ParameterDict":
        lrs = torch.nn.ParameterDict({n.replace(".", "_"): torch.nn.Parameter(torch.full_like(p, 0.1))
                                      for n, p in model.named_parameters()})
        build = "{n: lrs[n.replace('.', '_')] for n, _ in model.named_parameters()}"
    else:
        lrs = torch.nn.ParameterList([torch.nn.Parameter(torch.full_like(p, 0.1)) for p in model.parameters()])
        build = "dict(zip([n for n, _ in model.named_parameters()], lrs))"
    with pytest.raises(TypeError, match=rf"lr: got an nn.{holder}.*pass {re.escape(build)}"):
        mg.optim.SGD(lr=lrs)
    names = [n for n, _ in model.named_parameters()]
    built = eval(build, {"model": model, "lrs": lrs})  # the code the error shows, as written
    assert set(built) == set(names) and all(isinstance(t, torch.nn.Parameter) for t in built.values())
    mg.optim.SGD(lr=built).init(dict(model.named_parameters()))


@pytest.mark.parametrize("options", [{"momentum": 0.9}, {"weight_decay": 1e-2}, {"momentum": 0.9, "nesterov": True}])
def test_torch_optim_sgd_options_are_refused_with_the_rule_that_takes_them(options):
    """``mg.optim.SGD(lr=0.1, momentum=0.9)``, written as for ``torch.optim.SGD``, names
    ``mg.optim.Momentum``, which takes those options and steps as ``torch.optim.SGD`` does."""
    with pytest.raises(TypeError, match=r"SGD: got .*mg\.optim\.Momentum\(lr=\.\.\., momentum=0\.9") as info:
        mg.optim.SGD(lr=0.1, **options)
    for name, value in options.items():
        assert f"{name}={value!r}" in str(info.value)
    params, grads = params_and_grads()
    rule = mg.optim.Momentum(lr=0.1, **{"momentum": 0.0, **options})
    weights = {n: p.clone().requires_grad_() for n, p in params.items()}
    opt = torch.optim.SGD(list(weights.values()), lr=0.1, **options)
    phi, state = dict(params), rule.init(params)
    for _ in range(3):
        phi, state = step_both(rule, phi, state, opt, weights, grads)
    for n in params:
        torch.testing.assert_close(phi[n], weights[n].detach(), rtol=1e-12, atol=1e-12)


def test_an_unknown_sgd_option_is_refused_by_name():
    with pytest.raises(TypeError, match=r"SGD: got betas=\(0\.9, 0\.99\); mg\.optim\.SGD takes only lr"):
        mg.optim.SGD(lr=0.1, betas=(0.9, 0.99))


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
    twins = {n: torch.nn.Parameter(t.clone()) for n, t in start.items()}
    optimizer = theirs(list(twins.values()))
    rule = ours()
    params, state = dict(start), rule.init(start)
    for step in range(7):
        grads = {n: torch.randn(t.shape, dtype=torch.float64, generator=gen) for n, t in params.items()}
        if step == 2:
            grads["b"] = torch.zeros_like(grads["b"])  # a zero gradient: Adam's √v at 0
        params, state = step_both(rule, params, state, optimizer, twins, grads)
        for n, p in twins.items():
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


# ------------------------------------------------------ RMSprop, Adagrad, AdamW vs torch.optim
NEW_TWINS = [
    ("rmsprop", lambda: mg.optim.RMSprop(0.01), lambda ps: torch.optim.RMSprop(ps, lr=0.01)),
    ("rmsprop-centered-momentum-decay",
     lambda: mg.optim.RMSprop(0.02, alpha=0.9, eps=1e-6, weight_decay=0.05, momentum=0.7, centered=True),
     lambda ps: torch.optim.RMSprop(ps, lr=0.02, alpha=0.9, eps=1e-6, weight_decay=0.05, momentum=0.7,
                                    centered=True)),
    ("rmsprop-centered", lambda: mg.optim.RMSprop(0.01, centered=True),
     lambda ps: torch.optim.RMSprop(ps, lr=0.01, centered=True)),
    ("adagrad", lambda: mg.optim.Adagrad(0.1), lambda ps: torch.optim.Adagrad(ps, lr=0.1)),
    ("adagrad-decay-accumulator",
     lambda: mg.optim.Adagrad(0.1, lr_decay=0.3, weight_decay=0.02, initial_accumulator_value=0.5, eps=1e-6),
     lambda ps: torch.optim.Adagrad(ps, lr=0.1, lr_decay=0.3, weight_decay=0.02,
                                    initial_accumulator_value=0.5, eps=1e-6)),
    ("adamw", lambda: mg.optim.AdamW(0.01), lambda ps: torch.optim.AdamW(ps, lr=0.01)),
    ("adamw-betas-eps-decay", lambda: mg.optim.AdamW(0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3),
     lambda ps: torch.optim.AdamW(ps, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3)),
]


@pytest.mark.parametrize("name,ours,theirs", NEW_TWINS, ids=[t[0] for t in NEW_TWINS])
def test_new_rule_equals_torch_optim_on_the_same_gradients(name, ours, theirs):
    test_rule_equals_torch_optim_on_the_same_gradients(name, ours, theirs)


@pytest.mark.parametrize("rule,optimizer", [
    (mg.optim.RMSprop, torch.optim.RMSprop),
    (mg.optim.Adagrad, torch.optim.Adagrad),
    (mg.optim.AdamW, torch.optim.AdamW),
    (mg.optim.Adam, torch.optim.Adam),
], ids=["rmsprop", "adagrad", "adamw", "adam"])
def test_defaults_are_torch_optims(rule, optimizer):
    ours = rule()
    theirs = optimizer([torch.nn.Parameter(torch.zeros(1))]).defaults
    for key, value in vars(ours).items():
        assert theirs[key] == (tuple(value) if isinstance(value, tuple) else value), key


@pytest.mark.parametrize("ours,theirs", [
    (lambda lr: mg.optim.RMSprop(lr, momentum=0.5), lambda groups: torch.optim.RMSprop(groups, momentum=0.5)),
    (lambda lr: mg.optim.Adagrad(lr, lr_decay=0.1), lambda groups: torch.optim.Adagrad(groups, lr_decay=0.1)),
    (lambda lr: mg.optim.AdamW(lr), lambda groups: torch.optim.AdamW(groups)),
], ids=["rmsprop", "adagrad", "adamw"])
def test_per_parameter_step_sizes_equal_torch_parameter_groups(ours, theirs):
    gen = torch.Generator().manual_seed(4)
    start = {"w": torch.randn(3, 4, dtype=DT, generator=gen), "b": torch.randn(5, dtype=DT, generator=gen)}
    lrs = {"w": 0.03, "b": 0.007}
    twins = {n: torch.nn.Parameter(t.clone()) for n, t in start.items()}
    optimizer = theirs([{"params": [twins[n]], "lr": lrs[n]} for n in start])
    rule = ours({"w": lrs["w"], "b": torch.tensor(lrs["b"], dtype=DT)})
    params, state = dict(start), rule.init(start)
    for _ in range(4):
        grads = {n: torch.randn(t.shape, dtype=DT, generator=gen) for n, t in params.items()}
        params, state = step_both(rule, params, state, optimizer, twins, grads)
    for n in start:
        torch.testing.assert_close(params[n], twins[n].detach(), rtol=1e-12, atol=1e-12)


NEW_RULES = [
    pytest.param(lambda lr: mg.optim.RMSprop(lr), id="rmsprop"),
    pytest.param(lambda lr: mg.optim.RMSprop(lr, momentum=0.9, centered=True, weight_decay=0.1),
                 id="rmsprop-centered-momentum-decay"),
    pytest.param(lambda lr: mg.optim.Adagrad(lr), id="adagrad"),
    pytest.param(lambda lr: mg.optim.Adagrad(lr, lr_decay=0.5, weight_decay=0.1), id="adagrad-decay"),
    pytest.param(lambda lr: mg.optim.AdamW(lr), id="adamw"),
]


@pytest.mark.parametrize("make", NEW_RULES)
def test_new_rule_leaves_a_parameter_without_gradient_and_its_state_as_they_are(make):
    params, grads = params_and_grads()
    rule = make(0.1)
    state = rule.init(params)
    params, state = rule.step(params, grads, state)  # a first step moves both
    for missing in ({"w": grads["w"]}, {"w": grads["w"], "b": None}):
        new, new_state = rule.step(params, missing, state)
        assert new["b"] is params["b"]
        assert not torch.equal(new["w"], params["w"])
        for key, value in state.items():
            if isinstance(value, dict):
                assert new_state[key]["b"] is value["b"], key


@pytest.mark.parametrize("make", NEW_RULES)
def test_new_rule_step_size_tensor_that_requires_grad_gets_a_gradient(make):
    """A step-size tensor (a meta-parameter) is differentiated like the existing rules' is,
    and second derivatives stay finite at a zero gradient (the square roots at 0)."""
    params, grads = params_and_grads()
    lr = torch.tensor(0.05, dtype=DT, requires_grad=True)
    rule = make({"w": lr, "b": 0.1})
    p = {n: t.clone().requires_grad_() for n, t in params.items()}
    g = {"w": grads["w"].clone().requires_grad_(), "b": torch.zeros(4, dtype=DT, requires_grad=True)}
    new, _ = rule.step(p, g, rule.init(p))
    total = sum((t ** 2).sum() for t in new.values())
    d_lr, d_gb = torch.autograd.grad(total, [lr, g["b"]], create_graph=True)
    assert torch.isfinite(d_lr) and d_lr != 0
    assert torch.isfinite(d_gb).all()
    (second,) = torch.autograd.grad(d_gb.sum(), g["b"], allow_unused=True)
    assert second is None or torch.isfinite(second).all()


@pytest.mark.parametrize("make", NEW_RULES)
def test_new_rule_step_composes_with_vmap(make):
    params, grads = params_and_grads()
    rule = make(0.1)
    state = rule.init(params)
    batched_p = {n: torch.stack([t, 2 * t]) for n, t in params.items()}
    batched_g = {n: torch.stack([t, -t]) for n, t in grads.items()}
    out = torch.func.vmap(lambda p, g: rule.step(p, g, state)[0])(batched_p, batched_g)
    for i in range(2):
        expected, _ = rule.step({n: t[i] for n, t in batched_p.items()},
                                {n: t[i] for n, t in batched_g.items()}, state)
        for n in params:
            torch.testing.assert_close(out[n][i], expected[n], rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("make,argument", [
    (lambda: mg.optim.RMSprop(0.1, alpha=1.5), "alpha"),
    (lambda: mg.optim.RMSprop(0.1, eps=0.0), "eps"),
    (lambda: mg.optim.RMSprop(0.1, momentum=1.0), "momentum"),
    (lambda: mg.optim.RMSprop(0.1, weight_decay=-0.1), "weight_decay"),
    (lambda: mg.optim.RMSprop(0.1, centered=1), "centered"),
    (lambda: mg.optim.RMSprop(-0.1), "lr"),
    (lambda: mg.optim.Adagrad(0.1, lr_decay=-1.0), "lr_decay"),
    (lambda: mg.optim.Adagrad(0.1, initial_accumulator_value=-1.0), "initial_accumulator_value"),
    (lambda: mg.optim.Adagrad(0.1, eps=0.0), "eps"),
    (lambda: mg.optim.Adagrad("0.1"), "lr"),
    (lambda: mg.optim.AdamW(0.1, betas=(1.0, 0.9)), "betas[0]"),
    (lambda: mg.optim.AdamW(0.1, weight_decay=float("nan")), "weight_decay"),
    (lambda: mg.optim.AdamW(0.1, eps=-1e-8), "eps"),
])
def test_new_rule_bad_arguments_name_the_argument(make, argument):
    with pytest.raises((TypeError, ValueError)) as error:
        make()
    assert str(error.value).startswith(argument + ":"), str(error.value)


def test_new_rules_are_exported_and_are_update_rules():
    for name in ("RMSprop", "Adagrad", "AdamW"):
        assert name in mg.optim.__all__ and name in mg.optim.RULES
        rule = getattr(mg.optim, name)()
        assert isinstance(rule, mg.optim.UpdateRule)
        assert repr(rule).startswith(name + "(")


# ------------------------------- the new rules through Full and Checkpointed, against a hand unroll
def _hand_unrolled(kind, lr, model, xs, ys, xq, yq, steps):
    """∇_θ L_val(φ_K) through a plain float64 autograd loop that writes the update out by hand."""
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    phi = theta
    s1 = [torch.zeros_like(t) for t in theta]  # RMSprop's v, Adagrad's sum, AdamW's m
    s2 = [torch.zeros_like(t) for t in theta]  # RMSprop's centered mean, AdamW's v
    s3 = [torch.zeros_like(t) for t in theta]  # RMSprop's momentum buffer
    forward = lambda p, x: torch.nn.functional.linear(
        torch.tanh(torch.nn.functional.linear(x, p[0], p[1])), p[2], p[3])
    for t in range(1, steps + 1):
        loss = torch.nn.functional.mse_loss(forward(phi, xs), ys)
        g = torch.autograd.grad(loss, phi, create_graph=True)
        new = []
        for i, (p, gi) in enumerate(zip(phi, g)):
            if kind == "rmsprop":  # alpha 0.9, eps 1e-8, weight decay 0.01, momentum 0.5, centered
                gi = gi + 0.01 * p
                s1[i] = 0.9 * s1[i] + 0.1 * gi * gi
                s2[i] = 0.9 * s2[i] + 0.1 * gi
                s3[i] = 0.5 * s3[i] + gi / (torch.sqrt(s1[i] - s2[i] ** 2) + 1e-8)
                new.append(p - lr * s3[i])
            elif kind == "adagrad":  # lr_decay 0.1, initial accumulator 0.1, eps 1e-10
                s1[i] = s1[i] + gi * gi
                new.append(p - lr / (1 + (t - 1) * 0.1) * gi / (torch.sqrt(0.1 + s1[i]) + 1e-10))
            else:  # AdamW defaults: betas (0.9, 0.999), eps 1e-8, weight decay 1e-2
                s1[i] = 0.9 * s1[i] + 0.1 * gi
                s2[i] = 0.999 * s2[i] + 0.001 * gi * gi
                c1, c2 = 1 - 0.9 ** t, 1 - 0.999 ** t
                decayed = p * (1 - lr * 1e-2)
                new.append(decayed - (lr / c1) * s1[i] / (torch.sqrt(s2[i]) / math.sqrt(c2) + 1e-8))
        phi = new
    grads = torch.autograd.grad(torch.nn.functional.mse_loss(forward(phi, xq), yq), theta)
    return torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("kind,make,lr", [
    ("rmsprop", lambda lr: mg.optim.RMSprop(lr, alpha=0.9, weight_decay=0.01, momentum=0.5, centered=True),
     0.01),
    ("adagrad", lambda lr: mg.optim.Adagrad(lr, lr_decay=0.1, initial_accumulator_value=0.1), 0.1),
    ("adamw", lambda lr: mg.optim.AdamW(lr), 0.01),
])
def test_full_and_checkpointed_with_the_new_rules_equal_a_hand_unrolled_loop(kind, make, lr):
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(11)
    xs, ys = torch.randn(12, 2, dtype=DT, generator=gen), torch.randn(12, 1, dtype=DT, generator=gen)
    xq, yq = torch.randn(12, 2, dtype=DT, generator=gen), torch.randn(12, 1, dtype=DT, generator=gen)
    steps = 5

    def make_model():
        torch.manual_seed(5)
        return torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).to(DT)

    expected = _hand_unrolled(kind, lr, make_model(), xs, ys, xq, yq, steps)
    for estimator in (mg.Full(), mg.Checkpointed()):
        model = make_model()
        with mg.MetaGradient(model, inner_opt=make(lr), estimator=estimator) as meta:
            for _ in range(steps):
                meta.step(lambda f: F.mse_loss(f(xs), ys))
            F.mse_loss(meta.fmodel(xq), yq).backward()
        got = torch.cat([p.grad.flatten() for p in model.parameters()])
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=f"{estimator!r}")
    # and the functional face, Checkpointed, on the same loop
    model = make_model()
    theta = {n: p.detach() for n, p in model.named_parameters()}

    def loss_fn(p, batch):
        return F.mse_loss(torch.func.functional_call(model, p, (batch[0],)), batch[1])

    g = mg.functional.meta_grad(loss_fn, theta, (xs, ys), (xq, yq), inner_opt=make(lr), steps=steps,
                                estimator=mg.Checkpointed())
    torch.testing.assert_close(torch.cat([g[n].flatten() for n in theta]), expected,
                               rtol=1e-10, atol=1e-12)
