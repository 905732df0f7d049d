"""metagrad.adapters.torchopt against torchopt's own unroll.

torchopt's unroll is written here two ways: the functional loop (``tx.update(...,
inplace=False)`` and ``torchopt.apply_updates``, with ``create_graph=True``) and the
object-style loop (``torchopt.MetaSGD`` / ``MetaAdam`` stepped in place, with
``extract_state_dict`` / ``recover_state_dict``). With Full, both adapter paths must give
its meta-gradients to 1e-10 in float64. The other estimators must agree with Full where
MATH.md says they are exact, and FirstOrder, Truncated and Binomial must agree with a
reference that uses torchopt's transformation itself and no metagrad (tests/reference.py):
FirstOrder is ``∇L_val(φ_K)`` of a plain loop; Truncated(T) and Binomial(L) are built from
the dense parameter blocks ``J_k = ∂φ_{k+1}/∂φ_k`` with torchopt's state at step k held
constant, the approximation MATH.md defines for optimizers with a state.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import metagrad as mg

torchopt = pytest.importorskip("torchopt", reason="torchopt is not installed (pip install 'metagrad[torchopt]')")
from metagrad.adapters import torchopt as mg_torchopt  # noqa: E402

try:
    import reference as ref
except ImportError:  # tests/ made a package
    from tests import reference as ref

DT = torch.float64
K = 4
GEN = torch.Generator().manual_seed(2)
TASKS = [tuple(torch.randn(10, width, dtype=DT, generator=GEN) for width in (3, 1, 3, 1)) for _ in range(2)]
XS, YS, XQ, YQ = TASKS[0]

TRANSFORMS = {
    "sgd": lambda: torchopt.sgd(lr=0.1),
    "momentum": lambda: torchopt.sgd(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda: torchopt.adam(lr=0.02),
    "chain": lambda: torchopt.chain(torchopt.transform.add_decayed_weights(0.01), torchopt.adam(lr=0.02)),
}
#: torch's batching rule for torchopt's addcmul_ falls back to a loop (correct, slow).
vmap_fallback = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def make_model(batchnorm: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(3, 8)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(8))
    layers += [torch.nn.Tanh(), torch.nn.Linear(8, 1)]
    return torch.nn.Sequential(*layers).to(DT)


def forward(params, x, batchnorm: bool = False) -> torch.Tensor:
    """make_model's network by hand, from the list of its parameters (BatchNorm in
    training mode: batch statistics, no running statistics)."""
    h = F.linear(x, params[0], params[1])
    if batchnorm:
        h = F.batch_norm(h, None, None, params[2], params[3], training=True)
    return F.linear(torch.tanh(h), params[-2], params[-1])


def reference(make_tx, batchnorm=False, task=TASKS[0]):
    """The inner loop through torchopt's own transformation, with no metagrad: the plain loop
    (FirstOrder's v, the iterates, the state each step starts from) and the dense factors
    ``B_k = J_kᵀ − I`` with that state held constant."""
    x_s, y_s, x_q, y_q = task
    theta = [p.detach() for p in make_model(batchnorm).parameters()]
    inner = lambda p, k: F.mse_loss(forward(p, x_s, batchnorm), y_s)  # noqa: E731
    query = lambda p: F.mse_loss(forward(p, x_q, batchnorm), y_q)  # noqa: E731
    rule = ref.TransformRule(make_tx())
    loop = ref.plain_loop(theta, inner, query, rule, K)
    return loop, ref.state_held_constant_factors(loop, inner, rule)


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ torchopt's own unroll
def torchopt_functional(make_tx, batchnorm=False):
    """torchopt's functional unroll: update(inplace=False), apply_updates, create_graph."""
    model = make_model(batchnorm)
    names = [n for n, _ in model.named_parameters()]
    theta = tuple(model.parameters())
    tx = make_tx()
    params, state = theta, tx.init(theta)
    for _ in range(K):
        loss = F.mse_loss(torch.func.functional_call(model, dict(zip(names, params)), (XS,)), YS)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        updates, state = tx.update(grads, state, params=params, inplace=False)
        params = torchopt.apply_updates(params, updates, inplace=False)
    query = F.mse_loss(torch.func.functional_call(model, dict(zip(names, params)), (XQ,)), YQ)
    return torch.cat([g.flatten() for g in torch.autograd.grad(query, theta)]), params


def object_loop(make_opt, batchnorm=False, tasks=TASKS):
    """torchopt's object-style MAML loop, two tasks, gradients accumulated."""
    model = make_model(batchnorm)
    inner_opt = make_opt(model)
    net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(inner_opt, by="reference")
    for x_s, y_s, x_q, y_q in tasks:
        for _ in range(K):
            inner_opt.step(F.mse_loss(model(x_s), y_s))
        F.mse_loss(model(x_q), y_q).backward()
        torchopt.recover_state_dict(model, net_state)
        torchopt.recover_state_dict(inner_opt, opt_state)
    return flat_grad(model), model, inner_opt


# ----------------------------------------------------------------------- functional style
def adapter_functional(make_tx, estimator=None, batchnorm=False):
    model = make_model(batchnorm)
    with mg.MetaGradient(model, inner_opt=mg_torchopt.as_update_rule(make_tx()), estimator=estimator) as meta:
        for _ in range(K):
            meta.step(lambda f: F.mse_loss(f(XS), YS))
        F.mse_loss(meta.fmodel(XQ), YQ).backward()
        final = dict(meta.fmodel.params)
    return flat_grad(model), final, model


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_functional_full_equals_torchopt_unroll(name):
    expected, expected_params = torchopt_functional(TRANSFORMS[name])
    got, final, _ = adapter_functional(TRANSFORMS[name])
    error = rel(got, expected)
    print(f"{name}: Full through as_update_rule vs torchopt's unroll, relative error {error:.1e}")
    assert error <= 1e-10
    for value, (n, fast) in zip(expected_params, final.items()):
        torch.testing.assert_close(fast, value, rtol=1e-12, atol=0)


@vmap_fallback
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_checkpointed_equals_full_and_state_held_constant_estimators_run(name):
    full, _, _ = adapter_functional(TRANSFORMS[name])
    checkpointed, _, _ = adapter_functional(TRANSFORMS[name], mg.Checkpointed())
    assert rel(checkpointed, full) <= 1e-10
    binomial, _, _ = adapter_functional(TRANSFORMS[name], mg.Binomial(K))  # torch.func.vmap rebuilds
    one_at_a_time, _, _ = adapter_functional(TRANSFORMS[name], mg.Binomial(K, chunk_size=1))
    truncated, _, _ = adapter_functional(TRANSFORMS[name], mg.Truncated(K))
    # At full depth both are the product of the parameter blocks, the state held constant.
    assert rel(binomial, truncated) <= 1e-10
    assert rel(one_at_a_time, binomial) <= 1e-10
    error = rel(binomial, full)
    print(f"{name}: Binomial(K) (state held constant) vs Full, relative error {error:.3f}")
    if name == "sgd":  # exact for plain gradient descent (MATH.md)
        assert error <= 1e-10
    else:  # an approximation: only a generous bound
        assert error < 2.0
    # Against the reference: torchopt's own transformation, its state held constant per step.
    loop, Bs = reference(TRANSFORMS[name])
    assert rel(truncated, ref.last_factors(Bs, loop.v, K)) <= 1e-10
    for estimator, expected in ((mg.Binomial(2), ref.subset_sum(Bs, loop.v, 2)[0]),
                                (mg.Truncated(2), ref.last_factors(Bs, loop.v, 2)),
                                (mg.FirstOrder(), loop.v)):
        got, final, _ = adapter_functional(TRANSFORMS[name], estimator)
        assert rel(ref.flat([t.detach() for t in final.values()]), loop.iterates[-1]) <= 1e-12
        assert rel(got, expected) <= 1e-10, estimator


def test_clip_grad_norm_is_exact_with_checkpointed_and_cannot_be_vmapped():
    """torchopt.clip_grad_norm takes float() of the norm: differentiable as torchopt treats it
    (the coefficient a constant), but not under torch.func.vmap, so Binomial refuses it."""
    clipped = lambda: torchopt.chain(torchopt.clip_grad_norm(0.5), torchopt.sgd(lr=0.1))  # noqa: E731
    expected, _ = torchopt_functional(clipped)
    full, _, _ = adapter_functional(clipped)
    checkpointed, _, _ = adapter_functional(clipped, mg.Checkpointed())
    assert rel(full, expected) <= 1e-10 and rel(checkpointed, expected) <= 1e-10
    with pytest.raises(RuntimeError, match="vmap"):
        adapter_functional(clipped, mg.Binomial(2))


def test_adam_tolerance_against_the_native_rule():
    """torchopt's Adam and mg.optim.Adam (torch.optim's arithmetic) apply the same formula: ε
    outside the square root of the bias-corrected second moment, ``eps_root = 0``. They
    differ in precision only: torchopt computes ``1 − β^t`` as ``1 - pow(β, count)`` with an
    int64 count tensor, which torch evaluates in float32, so ``1 − β2^t`` (≈ 1e-3 at t = 1)
    loses about 1e-5 of its relative accuracy to cancellation even for float64 parameters.
    Measured on this problem: each step about 7e-6 relative, the meta-gradient 2.6e-6
    relative. Through the adapter the arithmetic is torchopt's own: no difference at all."""
    expected, _ = torchopt_functional(TRANSFORMS["adam"])
    model = make_model()
    with mg.MetaGradient(model, inner_opt=mg.optim.Adam(lr=0.02)) as meta:
        for _ in range(K):
            meta.step(lambda f: F.mse_loss(f(XS), YS))
        F.mse_loss(meta.fmodel(XQ), YQ).backward()
    error = rel(flat_grad(model), expected)
    print(f"mg.optim.Adam vs torchopt.adam unroll: relative error {error:.1e}")
    assert error <= 1e-4


def test_update_rule_state_is_torchopts_with_tensor_leaves():
    rule = mg_torchopt.as_update_rule(torchopt.adam(lr=0.1, moment_requires_grad=True))
    params = {"w": torch.randn(3, dtype=DT, requires_grad=True)}
    state = rule.init(params)
    leaves = torch.utils._pytree.tree_leaves(state)
    assert leaves and all(isinstance(t, torch.Tensor) and not t.requires_grad for t in leaves)
    assert any(t.dtype == torch.int64 and t.dim() == 0 for t in leaves)  # the step count
    grads = {"w": torch.randn(3, dtype=DT)}
    new, new_state = rule.step(params, grads, state)
    assert new["w"].grad_fn is not None and params["w"].grad_fn is None  # not in place
    assert type(new_state) is type(state)
    assert mg_torchopt.as_update_rule(rule) is rule


def test_update_rule_rejects_what_is_not_a_gradient_transformation():
    with pytest.raises(TypeError, match="object-style"):
        mg_torchopt.as_update_rule(torchopt.MetaSGD(make_model(), lr=0.1))
    with pytest.raises(TypeError, match="Call it first"):
        mg_torchopt.as_update_rule(torchopt.sgd)
    with pytest.raises(TypeError, match="GradientTransformation"):
        mg_torchopt.as_update_rule(mg.optim.SGD(lr=0.1))


# --------------------------------------------------------------------------- object style
OBJECTS = {
    "sgd": (lambda m: torchopt.MetaSGD(m, 0.1),
            lambda m, e: mg_torchopt.MetaSGD(m, 0.1, estimator=e)),
    "momentum": (lambda m: torchopt.MetaSGD(m, 0.05, 0.9, 0.01, nesterov=True),  # as TRANSFORMS
                 lambda m, e: mg_torchopt.MetaSGD(m, 0.05, 0.9, 0.01, nesterov=True, estimator=e)),
    "adam": (lambda m: torchopt.MetaAdam(m, 0.02),
             lambda m, e: mg_torchopt.MetaAdam(m, 0.02, estimator=e)),
    # torchopt's other object-style optimizers, positional and keyword arguments as torchopt's
    **{name: (lambda m, name=name, a=args, k=kwargs: getattr(torchopt, name)(m, *a, **k),
              lambda m, e, name=name, a=args, k=kwargs: getattr(mg_torchopt, name)(m, *a, **k, estimator=e))
       for name, args, kwargs in [("MetaAdamW", (0.02,), {"eps_root": 1e-8}),
                                  ("MetaRMSProp", (0.01,), {"momentum": 0.3, "centered": True}),
                                  ("MetaRMSprop", (0.01,), {}), ("MetaAdaGrad", (0.1,), {"lr_decay": 0.05}),
                                  ("MetaAdagrad", (0.1,), {}), ("MetaAdaDelta", (1.0,), {}),
                                  ("MetaAdadelta", (1.0, 0.8), {})]},
}


@pytest.mark.parametrize("name", sorted(OBJECTS))
def test_object_style_equals_torchopt_for_exact_estimators(name):
    make_torchopt, make_ours = OBJECTS[name]
    expected, _, _ = object_loop(make_torchopt)
    for estimator in (None, mg.Checkpointed()):
        got, model, inner_opt = object_loop(lambda m: make_ours(m, estimator))
        error = rel(got, expected)
        print(f"{name}, {estimator}: object style vs torchopt.Meta*, relative error {error:.1e}")
        assert error <= 1e-10
        assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    assert isinstance(inner_opt, torchopt.MetaOptimizer)


def test_object_style_state_held_constant_estimators():
    make_torchopt, make_ours = OBJECTS["sgd"]
    expected, _, _ = object_loop(make_torchopt)
    for estimator in (mg.Binomial(K), mg.Truncated(K)):
        got, _, _ = object_loop(lambda m: make_ours(m, estimator))
        assert rel(got, expected) <= 1e-10, estimator
    first, _, _ = object_loop(lambda m: make_ours(m, mg.FirstOrder()))
    b0, _, _ = object_loop(lambda m: make_ours(m, mg.Binomial(0)))
    assert rel(b0, first) <= 1e-12
    # FirstOrder: the sum over both tasks of ∇L_val(φ_K), φ_K from a plain loop.
    sgd = lambda: torchopt.sgd(lr=0.1)  # noqa: E731  (as OBJECTS["sgd"])
    expected_first = sum(reference(sgd, task=task)[0].v for task in TASKS)
    assert rel(first, expected_first) <= 1e-12
    # Momentum: the object style (kept graphs) and closures compute the same approximation,
    # the reference's, with torchopt's momentum buffer held constant in each step.
    loop_got, _, _ = object_loop(lambda m: OBJECTS["momentum"][1](m, mg.Binomial(2)), tasks=TASKS[:1])
    closure_got, _, _ = adapter_functional(TRANSFORMS["momentum"], mg.Binomial(2))
    assert rel(loop_got, closure_got) <= 1e-10
    loop, Bs = reference(TRANSFORMS["momentum"])
    assert rel(closure_got, ref.subset_sum(Bs, loop.v, 2)[0]) <= 1e-10
    truncated, _, _ = object_loop(lambda m: OBJECTS["momentum"][1](m, mg.Truncated(2)), tasks=TASKS[:1])
    assert rel(truncated, ref.last_factors(Bs, loop.v, 2)) <= 1e-10


def test_object_style_puts_fast_weights_in_the_module_and_reports():
    model = make_model()
    theta = list(model.parameters())
    inner_opt = mg_torchopt.MetaSGD(model, 0.1, estimator=mg.Binomial(2))
    net_state = torchopt.extract_state_dict(model, by="reference")
    for _ in range(K):
        assert inner_opt.step(F.mse_loss(model(XS), YS)) is None
    fast = list(model.parameters())
    assert all(f is not p and f.grad_fn is not None for f, p in zip(fast, theta))
    functional, final, _ = adapter_functional(lambda: torchopt.sgd(lr=0.1), mg.Binomial(2))
    for f, value in zip(fast, final.values()):
        torch.testing.assert_close(f, value, rtol=1e-12, atol=0)
    query = F.mse_loss(model(XQ), YQ)
    torchopt.recover_state_dict(model, net_state)  # the loop ends; backward comes later
    assert all(a is b for a, b in zip(model.parameters(), theta))
    query.backward()
    assert rel(flat_grad(model), functional) <= 1e-10
    assert inner_opt.info["order"] == 2 and inner_opt.info["steps"] == K
    # Plain SGD: MATH.md (2) with dense Hessians of the inner loss at the plain loop's iterates.
    loop, _ = reference(lambda: torchopt.sgd(lr=0.1))
    inner = lambda p, k: F.mse_loss(forward(p, XS), YS)  # noqa: E731
    expected, _ = ref.subset_sum(ref.sgd_factors(loop, inner, 0.1), loop.v, 2)
    assert rel(functional, expected) <= 1e-10


def test_object_style_lifecycle_errors():
    model = make_model()
    inner_opt = mg_torchopt.MetaSGD(model, 0.1, estimator=mg.Checkpointed())
    assert inner_opt.state_dict() == (torchopt.base.UninitializedState(),)
    inner_opt.step(F.mse_loss(model(XS), YS))
    with pytest.raises(RuntimeError, match="in progress"):
        torchopt.extract_state_dict(inner_opt)
    with pytest.raises(ValueError, match="fresh optimizer state"):
        inner_opt.load_state_dict(({"not": "initial"},))
    torchopt.stop_gradient(model)
    with pytest.raises(RuntimeError, match="stop_gradient"):
        inner_opt.step(F.mse_loss(model(XS), YS))
    # A failed step ends the loop and gives the module its parameters back.
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    with pytest.raises(NotImplementedError, match="one module"):
        inner_opt.add_param_group(make_model())
    with pytest.raises(ValueError, match="Implicit"):
        mg_torchopt.MetaSGD(model, 0.1, estimator=mg.Implicit())
    inner_opt.close()
    with pytest.raises(RuntimeError, match="closed"):
        inner_opt.step(F.mse_loss(model(XS), YS))


def test_object_style_context_manager_and_tied_weights():
    model = make_model()
    model[2].weight = torch.nn.Parameter(torch.randn(1, 8, dtype=DT))
    head = torch.nn.Linear(8, 1).to(DT)
    head.weight = model[2].weight  # tied: one parameter in two modules
    both = torch.nn.ModuleList([model, head])
    weight = head.weight
    with mg_torchopt.MetaSGD(both, 0.1) as inner_opt:
        for _ in range(K):
            inner_opt.step(F.mse_loss(model(XS) + head(torch.tanh(model[0](XS))), YS))
        assert head.weight is model[2].weight and head.weight.grad_fn is not None
        F.mse_loss(model(XQ), YQ).backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------- buffers
@vmap_fallback
def test_batchnorm_model_equals_torchopt_and_buffers_are_never_written():
    adam = lambda: torchopt.adam(lr=0.02, eps_root=1e-10)  # noqa: E731  (BatchNorm zeroes a bias gradient)
    expected, _ = torchopt_functional(adam, batchnorm=True)
    loop, Bs = reference(adam, batchnorm=True)  # batch statistics, Adam's moments held constant
    for estimator, reference_value in ((None, expected), (mg.Checkpointed(), expected),
                                       (mg.Binomial(2), ref.subset_sum(Bs, loop.v, 2)[0])):
        got, _, model = adapter_functional(adam, estimator, batchnorm=True)
        assert torch.equal(model[1].running_mean, torch.zeros(8, dtype=DT))
        assert int(model[1].num_batches_tracked) == 0
        assert rel(got, reference_value) <= 1e-10, estimator
    # Object style: the same gradients as torchopt's loop, which updates the running statistics.
    theirs, _, _ = object_loop(lambda m: torchopt.MetaSGD(m, 0.1), batchnorm=True)
    for estimator in (None, mg.Checkpointed(), mg.Binomial(K)):
        ours, model, inner_opt = object_loop(lambda m: mg_torchopt.MetaSGD(m, 0.1, estimator=estimator),
                                             batchnorm=True)
        assert rel(ours, theirs) <= 1e-10, estimator
        assert torch.equal(model[1].running_mean, torch.zeros(8, dtype=DT))
        assert int(model[1].num_batches_tracked) == 0
    model[1].eval()  # eval mode normalizes with the running statistics, and writes nothing
    bn = model[1]
    hidden = F.batch_norm(model[0](XQ), bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False)
    torch.testing.assert_close(model(XQ), model[3](model[2](hidden)))
    assert int(bn.num_batches_tracked) == 0
    inner_opt.close()  # detached: the module is plain torch again, and torchopt's loop writes
    model[1].train()
    inner_opt = torchopt.MetaSGD(model, 0.1)
    inner_opt.step(F.mse_loss(model(XS), YS))
    assert int(model[1].num_batches_tracked) == 1


def assert_alike(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """NaN in the same entries, the finite entries equal to 1e-10 of the finite part's norm."""
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    finite = ~torch.isnan(theirs)
    if finite.any():
        scale = float(theirs[finite].norm())
        torch.testing.assert_close(ours[finite], theirs[finite], rtol=0, atol=1e-10 * max(scale, 1e-300))


def test_adam_eps_root_zero_gives_nan_through_batchnorm_in_torchopt_and_here_alike():
    """The first layer's bias feeds a BatchNorm: its inner gradient cancels to 0 in exact
    arithmetic, and in floating point to 0 or to about 1e-17, depending on the machine's
    rounding. Where it is exactly 0, Adam's square root at 0 backpropagates 0·inf = NaN; where
    it is not, the meta-gradient is finite. Either way torchopt's loop and the adapter must
    agree. eps_root > 0 avoids the square root at 0 on every machine (module docstring)."""
    for eps_root in (0.0, 1e-16):
        theirs, _, _ = object_loop(lambda m: torchopt.MetaAdam(m, 0.05, eps_root=eps_root), True, TASKS[1:])
        ours, _, _ = object_loop(lambda m: mg_torchopt.MetaAdam(m, 0.05, eps_root=eps_root), True, TASKS[1:])
        assert_alike(ours, theirs)
        if eps_root > 0:
            assert torch.isfinite(theirs).all() and torch.isfinite(ours).all()


def test_adam_eps_root_zero_gives_nan_for_an_exactly_zero_inner_gradient_on_every_machine():
    """An input feature that is 0 in every support point makes the inner gradient of its
    first-layer weights exactly 0 (a sum of products with 0: no cancellation, no rounding).
    With eps_root = 0 the square root at 0 then gives NaN in torchopt's loop and through the
    adapter alike; eps_root > 0, or mg.optim.Adam (zero derivative of √v at 0), stays finite."""
    x_s, y_s, x_q, y_q = TASKS[1]
    x_s = x_s.clone()
    x_s[:, 1] = 0.0
    tasks = [(x_s, y_s, x_q, y_q)]
    for eps_root in (0.0, 1e-16):
        theirs, _, _ = object_loop(lambda m: torchopt.MetaAdam(m, 0.05, eps_root=eps_root), tasks=tasks)
        ours, _, _ = object_loop(lambda m: mg_torchopt.MetaAdam(m, 0.05, eps_root=eps_root), tasks=tasks)
        assert bool(torch.isnan(theirs).any()) is (eps_root == 0.0)
        assert_alike(ours, theirs)
    model = make_model()
    with mg.MetaGradient(model, inner_opt=mg.optim.Adam(lr=0.05)) as meta:
        for _ in range(K):
            meta.step(lambda f: F.mse_loss(f(x_s), y_s))
        F.mse_loss(meta.fmodel(x_q), y_q).backward()
    assert torch.isfinite(flat_grad(model)).all()


def test_importing_metagrad_does_not_import_torchopt():
    code = ("import sys, metagrad, metagrad.adapters, metagrad.adapters.torchopt as a; "
            "a.as_update_rule; print('torchopt' in sys.modules); a.MetaSGD; print('torchopt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_metagradient_accepts_a_gradient_transformation_directly():
    expected, _, _ = adapter_functional(TRANSFORMS["adam"])
    model = make_model()
    with mg.MetaGradient(model, inner_opt=torchopt.adam(lr=0.02)) as meta:
        for _ in range(K):
            meta.step(lambda f: F.mse_loss(f(XS), YS))
        F.mse_loss(meta.fmodel(XQ), YQ).backward()
    assert rel(flat_grad(model), expected) <= 1e-12


@pytest.mark.parametrize("make_estimator", [mg.Full, mg.Checkpointed, lambda: mg.Truncated(3),
                                            lambda: mg.Binomial(3, chunk_size=1)],
                         ids=["full", "checkpointed", "truncated-K", "binomial-K"])
def test_tensor_learning_rate_that_requires_grad_is_learned(make_estimator):
    """``torchopt.sgd(lr=tensor)`` with a tensor that requires grad: its gradient through the
    inner loop, against torchopt's own differentiable loop (no metagrad), for the estimators
    that are exact with plain SGD."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 2, generator=gen, dtype=torch.float64), torch.randn(8, 1, generator=gen, dtype=torch.float64)
    xq, yq = torch.randn(6, 2, generator=gen, dtype=torch.float64), torch.randn(6, 1, generator=gen, dtype=torch.float64)
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    tx = torchopt.sgd(lr=lr)
    params = dict(net.named_parameters())
    state = tx.init(params)
    for _ in range(3):
        loss = F.mse_loss(torch.func.functional_call(net, params, (x,)), y)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=True)))
        updates, state = tx.update(grads, state, params=params, inplace=False)
        params = {n: p + updates[n] for n, p in params.items()}
    query = F.mse_loss(torch.func.functional_call(net, params, (xq,)), yq)
    expected = torch.autograd.grad(query, [*net.parameters(), lr])

    with mg.MetaGradient(net, torchopt.sgd(lr=lr), estimator=make_estimator()) as meta:
        for _ in range(3):
            meta.step(lambda f: F.mse_loss(f(x), y))
        F.mse_loss(meta.fmodel(xq), yq).backward()
    for tensor, e in zip([*net.parameters(), lr], expected):
        torch.testing.assert_close(tensor.grad, e, rtol=1e-10, atol=1e-12)
    assert expected[-1].abs() > 1e-6


@pytest.mark.parametrize("make_estimator", [mg.Full, mg.Checkpointed, lambda: mg.Binomial(3)],
                         ids=["full", "checkpointed", "binomial-K"])
def test_object_style_learning_rate_that_requires_grad_is_learned_as_torchopt_learns_it(make_estimator):
    """``MetaSGD(net, lr=tensor requiring grad)``: the adapter's θ- and lr-gradients equal
    torchopt's own unroll with every estimator that is exact here."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(8, 3, generator=gen, dtype=torch.float64), torch.randn(8, 2, generator=gen, dtype=torch.float64)
    xq, yq = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(6, 2, generator=gen, dtype=torch.float64)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)

    def run(make):
        for t in [*net.parameters(), lr]:
            t.grad = None
        saved = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
        opt = make()
        for _ in range(3):
            opt.step(F.mse_loss(net(x), y))
        F.mse_loss(net(xq), yq).backward()
        torchopt.recover_state_dict(net, saved)
        return [t.grad.clone() for t in [*net.parameters(), lr]]

    expected = run(lambda: torchopt.MetaSGD(net, lr=lr))
    got = run(lambda: mg_torchopt.MetaSGD(net, lr=lr, estimator=make_estimator()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_the_core_wraps_a_gradient_transformation_without_the_adapter():
    """``inner_opt=torchopt.sgd(...)`` is wrapped by the core (metagrad.optim), which imports
    no adapter: metagrad.adapters stays unimported."""
    code = ("import sys, torch, torchopt, metagrad as mg\n"
            "m = torch.nn.Linear(2, 1)\n"
            "with mg.MetaGradient(m, inner_opt=torchopt.sgd(lr=0.1), estimator=mg.Checkpointed()) as meta:\n"
            "    meta.step(lambda f: f(torch.ones(3, 2)).pow(2).mean())\n"
            "    meta.fmodel(torch.ones(3, 2)).sum().backward()\n"
            "print(type(meta.inner_opt).__name__, [k for k in sys.modules if k.startswith('metagrad.adapters')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["TransformationRule", "[]"]
    assert mg_torchopt.TorchoptUpdateRule is mg.optim.TransformationRule
    assert mg.optim.TransformationRule(torchopt.sgd(lr=0.1)).update_options == {"inplace": False}


def test_meta_grad_accepts_a_gradient_transformation():
    """The functional face takes the same inner rules: torchopt's sgd gives mg.optim.SGD's
    meta-gradient, for Full and Checkpointed."""
    model = make_model()
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_fn(p, data):
        return F.mse_loss(torch.func.functional_call(model, p, (data[0],)), data[1])

    for estimator in (mg.Full(), mg.Checkpointed()):
        ours = mg.functional.meta_grad(loss_fn, params, (XS, YS), (XQ, YQ), inner_opt=torchopt.sgd(lr=0.1),
                                       steps=K, estimator=estimator)
        native = mg.functional.meta_grad(loss_fn, params, (XS, YS), (XQ, YQ), inner_opt=mg.optim.SGD(lr=0.1),
                                         steps=K, estimator=estimator)
        for n in params:
            torch.testing.assert_close(ours[n], native[n], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["MetaAdaMax", "MetaAdamax", "MetaRAdam"])
def test_object_style_optimizers_with_an_integer_step_count_are_refused_by_name(name):
    """torchopt's adamax and radam keep a Python int in their state: no metagrad version, and
    the AttributeError says why and what to use."""
    assert hasattr(torchopt, name)
    with pytest.raises(AttributeError, match=rf"{name}: torchopt\.\w+ keeps its step count as a Python int"):
        getattr(mg_torchopt, name)


_DRAWN = {
    "MetaSGD": ((0.1,), {"momentum": 0.6, "weight_decay": 0.02, "nesterov": True}),
    "MetaSGD-maximize": ((0.1,), {"momentum": 0.3, "maximize": True}),  # (dampening: the test below)
    "MetaAdam": ((0.03,), {"eps_root": 1e-8, "weight_decay": 0.05}),
    "MetaAdamW": ((0.03,), {"eps_root": 1e-8}),
    "MetaRMSProp": ((0.01,), {"momentum": 0.3, "centered": True}),
    "MetaAdaGrad": ((0.1,), {"lr_decay": 0.05}),
    "MetaAdaDelta": ((1.0,), {}),
}


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(sorted(_DRAWN)), steps=st.integers(1, 3), head=st.booleans(), twice=st.booleans(),
       estimator=st.sampled_from(["full", "checkpointed"]))
def test_object_style_features_drawn_together_equal_torchopt(name, steps, head, twice, estimator):
    """torchopt's object style drawn: the optimizer class and its settings, an optimizer over
    the last layer alone, a loss with two forward passes, two tasks with extract/recover;
    the meta-gradient accumulated over both equals torchopt's own to 1e-10."""
    args, kwargs = _DRAWN[name]
    cls = name.split("-")[0]

    def run(library):
        model = make_model()
        extra = {} if library is torchopt else {"estimator": mg.Full() if estimator == "full" else mg.Checkpointed()}
        inner_opt = getattr(library, cls)(model[-1] if head else model, *args, **kwargs, **extra)
        net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(inner_opt, by="reference")
        for x_s, y_s, x_q, y_q in TASKS:
            for _ in range(steps):
                loss = F.mse_loss(model(x_s), y_s)
                inner_opt.step(loss + 0.1 * model(x_s[:3]).pow(2).mean() if twice else loss)
            F.mse_loss(model(x_q), y_q).backward()
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
        if library is not torchopt:
            inner_opt.close()
        return flat_grad(model)

    assert rel(run(mg_torchopt), run(torchopt)) <= 1e-10


@pytest.mark.parametrize("estimator", [mg.Checkpointed(), mg.Truncated(K), mg.Binomial(1)],
                         ids=["checkpointed", "truncated-K", "binomial-1"])
def test_dampening_whose_first_call_flag_is_python_state_is_refused_through_a_kept_graph(estimator):
    """torchopt's ``sgd(momentum, dampening>0)`` skips the dampening at its first call by a
    Python flag. A step taken from a loss keeps its gradient's graph, and the estimators that
    take products run the update again on it: the flag has flipped, so the step differs. That
    gave a meta-gradient 3–6% off torchopt's with no error (one step, one task: 6.4%); now the
    replay check of the re-run update raises, naming the cause and Full, which is exact."""
    def make(library, **extra):
        return lambda m: library.MetaSGD(m, 0.1, momentum=0.3, dampening=0.2, **extra)

    expected, _, _ = object_loop(make(torchopt), tasks=TASKS[:1])
    got, _, _ = object_loop(make(mg_torchopt, estimator=mg.Full()), tasks=TASKS[:1])
    assert rel(got, expected) <= 1e-12
    with pytest.raises(mg.ReplayError, match=r"taken from a given loss.*first-call flag.*estimator=mg\.Full\(\)"):
        object_loop(make(mg_torchopt, estimator=estimator), tasks=TASKS[:1])


@pytest.mark.parametrize("estimator, compile", [
    (mg.Checkpointed(), False), (mg.Truncated(K), False), (mg.Binomial(K, monitor=False), False),
    (mg.Checkpointed(), True), (mg.Truncated(K), True)], ids=repr)
def test_dampening_whose_first_call_flag_is_python_state_is_refused_by_the_functional_face(estimator, compile):
    """mg.functional.meta_grad with torchopt.sgd(momentum, dampening>0): every product calls the
    update again, after its first-call flag flipped, and the meta-gradient was about 10% off
    torchopt's own unroll with no error (Checkpointed, eager and compiled). The rule is now
    run again from φ_0 before the backward and compared with the step taken; Full (eager)
    calls each step once and equals torchopt's unroll."""
    model = make_model()
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach() for n, p in model.named_parameters()}

    def loss_fn(p, batch):
        return F.mse_loss(torch.func.functional_call(model, p, (batch[0],)), batch[1])

    def make():
        return torchopt.sgd(lr=0.1, momentum=0.3, dampening=0.2)

    with pytest.raises(mg.ReplayError, match=r"first-call flag"):
        mg.functional.meta_grad(loss_fn, theta, (XS, YS), (XQ, YQ), inner_opt=make(), steps=K,
                                estimator=estimator, compile=compile)
    expected, _ = torchopt_functional(make)
    g = mg.functional.meta_grad(loss_fn, theta, (XS, YS), (XQ, YQ), inner_opt=make(), steps=K, estimator=mg.Full())
    assert rel(torch.cat([g[n].flatten() for n in names]), expected) <= 1e-12
