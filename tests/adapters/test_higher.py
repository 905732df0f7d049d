"""metagrad.adapters.higher against higher itself, and against a hand-unrolled reference.

With Full (the default) the adapter must give higher's gradients to 1e-10 in float64;
with the other estimators it must agree with Full where MATH.md says it must, and with
references that use no metagrad (tests/reference.py, torch.optim's rules written out by
hand): FirstOrder is ``∇L_val(φ_K)`` of a plain loop; Truncated(T) with SGD is the gradient
with respect to a leaf copy of ``φ_{K−T}`` through the last T steps unrolled again;
Binomial(L) with SGD is MATH.md (2) with dense Hessians; with momentum or Adagrad both are
built from the dense blocks ``J_k = ∂φ_{k+1}/∂φ_k`` with the optimizer state at step k held
constant (MATH.md, "Optimizers other than plain gradient descent").
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import metagrad as mg

higher = pytest.importorskip("higher", reason="higher is not installed (pip install 'metagrad[higher]')")
from metagrad.adapters import higher as mg_higher  # noqa: E402

try:
    import reference as ref
except ImportError:  # tests/ made a package
    from tests import reference as ref

DT = torch.float64
K = 4
X, Y = torch.randn(12, 2, dtype=DT, generator=torch.Generator().manual_seed(1)), None
GEN = torch.Generator().manual_seed(2)
XS, YS = torch.randn(10, 2, dtype=DT, generator=GEN), torch.randn(10, 1, dtype=DT, generator=GEN)
XQ, YQ = torch.randn(10, 2, dtype=DT, generator=GEN), torch.randn(10, 1, dtype=DT, generator=GEN)

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
    "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
}


def make_model(batchnorm: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(2, 8)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(8))
    layers += [torch.nn.Tanh(), torch.nn.Linear(8, 1)]
    return torch.nn.Sequential(*layers).to(DT)


def meta_gradient(library, make_opt, estimator=None, closure=False, batchnorm=False):
    model = make_model(batchnorm)
    kwargs = {} if library is higher else {"estimator": estimator}
    with library.innerloop_ctx(model, make_opt(model.parameters()), copy_initial_weights=False,
                               **kwargs) as (fmodel, diffopt):
        for _ in range(K):
            if closure:
                diffopt.step(closure=lambda f: F.mse_loss(f(XS), YS))
            else:
                diffopt.step(F.mse_loss(fmodel(XS), YS))
        F.mse_loss(fmodel(XQ), YQ).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]), model


def rel(a, b):
    return float((a - b).norm() / b.norm())


def forward(params, x, batchnorm=False):
    """make_model's network by hand from the list of its parameters (BatchNorm in training
    mode: batch statistics, no running statistics)."""
    h = F.linear(x, params[0], params[1])
    if batchnorm:
        h = F.batch_norm(h, None, None, params[2], params[3], training=True)
    return F.linear(torch.tanh(h), params[-2], params[-1])


def inner_loss(params, k, batchnorm=False):
    return F.mse_loss(forward(params, XS, batchnorm), YS)


def query_loss(params, batchnorm=False):
    return F.mse_loss(forward(params, XQ, batchnorm), YQ)


def reference_loop(rule, batchnorm=False):
    """The plain inner loop with a hand-written rule (no metagrad, no higher), and its
    inner and query losses."""
    theta = [p.detach() for p in make_model(batchnorm).parameters()]
    inner = lambda p, k: inner_loss(p, k, batchnorm)  # noqa: E731
    query = lambda p: query_loss(p, batchnorm)  # noqa: E731
    return ref.plain_loop(theta, inner, query, rule, K), inner, query


def higher_final_weights(make_opt):
    """φ_K from higher's own loop, to check the hand-written rule is torch.optim's."""
    model = make_model()
    with higher.innerloop_ctx(model, make_opt(model.parameters()), copy_initial_weights=False) as (f, d):
        for _ in range(K):
            d.step(F.mse_loss(f(XS), YS))
        return ref.flat([p.detach() for p in f.fast_params])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_full_equals_higher(name):
    expected, _ = meta_gradient(higher, OPTIMIZERS[name])
    got, _ = meta_gradient(mg_higher, OPTIMIZERS[name])
    assert rel(got, expected) <= 1e-10


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("closure", [False, True], ids=["loss", "closure"])
def test_exact_estimators_equal_higher(name, closure):
    expected, _ = meta_gradient(higher, OPTIMIZERS[name])
    for estimator in (mg.Checkpointed(), mg.Full()):
        got, _ = meta_gradient(mg_higher, OPTIMIZERS[name], estimator, closure=closure)
        assert rel(got, expected) <= 1e-10, estimator


@pytest.mark.parametrize("closure", [False, True], ids=["loss", "closure"])
def test_identities_through_the_adapter(closure):
    full, _ = meta_gradient(mg_higher, OPTIMIZERS["sgd"], mg.Full())
    for estimator in (mg.Binomial(K), mg.Truncated(K), mg.Binomial(K, chunk_size=1)):
        got, _ = meta_gradient(mg_higher, OPTIMIZERS["sgd"], estimator, closure=closure)
        assert rel(got, full) <= 1e-10, estimator
    first, _ = meta_gradient(mg_higher, OPTIMIZERS["sgd"], mg.FirstOrder(), closure=closure)
    b0, _ = meta_gradient(mg_higher, OPTIMIZERS["sgd"], mg.Binomial(0), closure=closure)
    assert rel(b0, first) <= 1e-12
    # Against references without metagrad: plain SGD, lr = 0.1 (OPTIMIZERS["sgd"]).
    rule = ref.SGDRule(0.1)
    loop, inner, query = reference_loop(rule)
    assert rel(loop.iterates[-1], higher_final_weights(OPTIMIZERS["sgd"])) <= 1e-12
    assert rel(first, loop.v) <= 1e-12  # FirstOrder: ∇L_val(φ_K) of the plain loop
    truncated, _ = meta_gradient(mg_higher, OPTIMIZERS["sgd"], mg.Truncated(2), closure=closure)
    assert rel(truncated, ref.restarted_gradient(loop, inner, query, rule, 2)) <= 1e-10
    binomial, _ = meta_gradient(mg_higher, OPTIMIZERS["sgd"], mg.Binomial(2), closure=closure)
    expected, _ = ref.subset_sum(ref.sgd_factors(loop, inner, 0.1), loop.v, 2)  # MATH.md (2)
    assert rel(binomial, expected) <= 1e-10


def test_loss_and_closure_paths_agree_for_every_estimator():
    """Momentum with weight decay (OPTIMIZERS["momentum"]): both paths give the reference's
    values, Checkpointed the exact meta-gradient through the buffer, Truncated and Binomial
    the products of blocks with the buffer held constant, FirstOrder the plain loop's v."""
    rule = ref.MomentumRule(0.05, 0.9, weight_decay=0.01)
    loop, inner, query = reference_loop(rule)
    assert rel(loop.iterates[-1], higher_final_weights(OPTIMIZERS["momentum"])) <= 1e-12
    Bs = ref.state_held_constant_factors(loop, inner, rule)
    theta = [p.detach() for p in make_model().parameters()]
    expected = {
        mg.Checkpointed(): ref.exact_meta_gradient(theta, inner, query, rule, K),
        # Snapshots: the closure path recomputes iterates; the loss path keeps every step's
        # graph, so its iterates stay stored.
        mg.Checkpointed(snapshots=2): ref.exact_meta_gradient(theta, inner, query, rule, K),
        mg.Truncated(2): ref.last_factors(Bs, loop.v, 2),
        mg.Binomial(2): ref.subset_sum(Bs, loop.v, 2)[0],
        mg.FirstOrder(): loop.v,
    }
    for estimator, value in expected.items():
        by_loss, _ = meta_gradient(mg_higher, OPTIMIZERS["momentum"], estimator)
        by_closure, _ = meta_gradient(mg_higher, OPTIMIZERS["momentum"], estimator, closure=True)
        assert rel(by_loss, by_closure) <= 1e-12, estimator
        assert rel(by_loss, value) <= 1e-10, estimator


def test_higher_optimizer_without_native_rule_runs_through_higher():
    make = lambda ps: torch.optim.Adagrad(ps, lr=0.05)  # noqa: E731
    expected, _ = meta_gradient(higher, make)
    got, _ = meta_gradient(mg_higher, make, mg.Checkpointed())
    assert rel(got, expected) <= 1e-10
    # Adagrad's state depends on the gradients, so Binomial and Truncated, which hold it
    # constant, approximate; at full depth both compute the same product of parameter blocks.
    bk, _ = meta_gradient(mg_higher, make, mg.Binomial(K))
    tk, _ = meta_gradient(mg_higher, make, mg.Truncated(K))
    assert rel(bk, tk) <= 1e-10
    # Both against the reference: Adagrad's sum of squares held constant in each step.
    # higher divides lr by a function of torch.optim.Adagrad's step count, a float32 tensor,
    # so its step size is 0.05 rounded to float32 (2.9e-9 from torch.optim.Adagrad's φ_K).
    rule = ref.AdagradRule(float(torch.tensor(0.05, dtype=torch.float32)))
    loop, inner, _ = reference_loop(rule)
    assert rel(loop.iterates[-1], higher_final_weights(make)) <= 1e-12
    Bs = ref.state_held_constant_factors(loop, inner, rule)
    assert rel(tk, ref.last_factors(Bs, loop.v, K)) <= 1e-10
    b2, _ = meta_gradient(mg_higher, make, mg.Binomial(2))
    assert rel(b2, ref.subset_sum(Bs, loop.v, 2)[0]) <= 1e-10


def test_batchnorm_model_and_buffers_untouched():
    expected, _ = meta_gradient(higher, OPTIMIZERS["sgd"], batchnorm=True)
    # Binomial(2): MATH.md (2) with dense Hessians of the batch-statistics inner loss.
    loop, inner, _ = reference_loop(ref.SGDRule(0.1), batchnorm=True)
    binomial, _ = ref.subset_sum(ref.sgd_factors(loop, inner, 0.1), loop.v, 2)
    for estimator, value in ((None, expected), (mg.Checkpointed(), expected), (mg.Binomial(2), binomial)):
        got, model = meta_gradient(mg_higher, OPTIMIZERS["sgd"], estimator, batchnorm=True)
        assert torch.equal(model[1].running_mean, torch.zeros(8, dtype=DT))
        assert int(model[1].num_batches_tracked) == 0
        assert rel(got, value) <= 1e-10, estimator


def test_fmodel_interface():
    model = make_model()
    with mg_higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                 copy_initial_weights=False) as (fmodel, diffopt):
        assert len(fmodel.fast_params) == len(list(model.parameters()))
        new = diffopt.step(F.mse_loss(fmodel(XS), YS))
        assert all(torch.equal(a, b) for a, b in zip(new, fmodel.fast_params))
        explicit = fmodel(XQ, params=[p.detach() for p in model.parameters()])
        torch.testing.assert_close(explicit, model(XQ))
        assert len(list(fmodel.parameters())) == len(new)
        initial = list(fmodel.parameters(time=0))
        assert all(torch.equal(a, b) for a, b in zip(initial, model.parameters()))
        with pytest.raises(NotImplementedError, match="params"):
            diffopt.step(F.mse_loss(fmodel(XS), YS), params=list(model.parameters()))
        with pytest.raises(TypeError, match="exactly one"):
            diffopt.step()


def test_copy_initial_weights_and_test_mode_give_no_gradient_as_higher_does():
    for kwargs in ({"copy_initial_weights": True}, {"copy_initial_weights": False, "track_higher_grads": False}):
        model = make_model()
        with mg_higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs) as (f, d):
            for _ in range(K):
                d.step(F.mse_loss(f(XS), YS))
            loss = F.mse_loss(f(XQ), YQ)
            if loss.requires_grad:
                loss.backward()
        assert all(p.grad is None for p in model.parameters()), kwargs


def test_importing_metagrad_does_not_import_higher():
    code = "import sys, metagrad, metagrad.adapters; print('higher' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_update_rule_works_in_metagradient():
    model = make_model()
    rule = mg_higher.update_rule(torch.optim.Adam(model.parameters(), lr=0.01), model)
    with mg.MetaGradient(model, inner_opt=rule, estimator=mg.Checkpointed()) as meta:
        for _ in range(K):
            meta.step(lambda f: F.mse_loss(f(XS), YS))
        F.mse_loss(meta.fmodel(XQ), YQ).backward()
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    expected, _ = meta_gradient(higher, OPTIMIZERS["adam"])
    assert rel(got, expected) <= 1e-10


def test_higher_maml_example_matches_higher_with_the_one_line_change():
    from pathlib import Path
    script = Path(__file__).resolve().parents[2] / "examples" / "higher_maml.py"
    tiny = ["--iterations", "3", "--test-tasks", "3", "--meta-batch", "2"]
    outputs = []
    for extra in (["--library", "higher"], ["--library", "metagrad"], ["--estimator", "binomial"]):
        result = subprocess.run([sys.executable, str(script), *tiny, *extra], capture_output=True,
                                text=True, timeout=120, check=True)
        outputs.append(result.stdout.strip().splitlines()[-1])
    assert all("query MSE" in line for line in outputs), outputs

    def numbers(line):
        """The printed 'mean ± half-width' of the held-out MSE, as floats."""
        mean, half = line.rsplit(": ", 1)[1].split(" ± ")
        return float(mean), float(half)

    # The same float32 computation by two code paths: equal up to rounding, which the
    # three printed decimals can turn into one unit of the last digit at most.
    (mean_h, half_h), (mean_m, half_m) = numbers(outputs[0]), numbers(outputs[1])
    assert mean_m == pytest.approx(mean_h, abs=1.5e-3) and half_m == pytest.approx(half_h, abs=1.5e-3)
    assert all(math.isfinite(x) and x >= 0 for x in numbers(outputs[2]))


def clip(grads):
    """A differentiable, vmap-compatible gradient clipping, as users pass to grad_callback."""
    return [None if g is None else g * torch.clamp(1.0 / (g.norm() + 1e-12), max=1.0) for g in grads]


def stepped_with_kwargs(library, make_opt, estimator=None, closure=False):
    model = make_model()
    kwargs = {} if library is higher else {"estimator": estimator}
    with library.innerloop_ctx(model, make_opt(model.parameters()), copy_initial_weights=False,
                               **kwargs) as (fmodel, diffopt):
        for k in range(K):
            override = {"lr": [0.05]} if k == 2 else None  # stays in force for later steps
            if closure:
                diffopt.step(closure=lambda f: F.mse_loss(f(XS), YS), override=override, grad_callback=clip)
            else:
                diffopt.step(F.mse_loss(fmodel(XS), YS), override=override, grad_callback=clip)
        F.mse_loss(fmodel(XQ), YQ).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("closure", [False, True], ids=["loss", "closure"])
def test_step_override_and_grad_callback_equal_higher(closure):
    for name in ("momentum", "adam"):
        expected = stepped_with_kwargs(higher, OPTIMIZERS[name])
        for estimator in (None, mg.Checkpointed()):
            got = stepped_with_kwargs(mg_higher, OPTIMIZERS[name], estimator, closure)
            assert rel(got, expected) <= 1e-10, (name, estimator)
    # With plain SGD the rebuilt products include the callback: Binomial(K) stays exact.
    expected = stepped_with_kwargs(higher, OPTIMIZERS["sgd"])
    for estimator in (mg.Binomial(K), mg.Binomial(K, chunk_size=1), mg.Truncated(K)):
        assert rel(stepped_with_kwargs(mg_higher, OPTIMIZERS["sgd"], estimator, closure), expected) <= 1e-10


def test_override_that_changes_the_rule_kind_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match="override"):
        with mg_higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                     copy_initial_weights=False) as (fmodel, diffopt):
            diffopt.step(F.mse_loss(fmodel(XS), YS), override={"momentum": [0.9]})


@pytest.mark.parametrize("estimator", [None, mg.Checkpointed(), mg.Checkpointed(snapshots=2), mg.Binomial(2)],
                         ids=repr)
def test_past_fast_weights_equal_higher_and_carry_the_meta_gradient(estimator):
    def run(library, **kwargs):
        model = make_model()
        with library.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                   copy_initial_weights=False, **kwargs) as (fmodel, diffopt):
            for _ in range(K):
                diffopt.step(F.mse_loss(fmodel(XS), YS))
            past = list(fmodel.parameters(time=2))
            F.mse_loss(fmodel(XQ, params=past), YQ).backward()
        return [p.detach().clone() for p in past], torch.cat([p.grad.flatten() for p in model.parameters()])
    past_h, grad_h = run(higher)
    past_m, grad_m = run(mg_higher, estimator=estimator)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(past_h, past_m))
    # Exact for all three: the query is built after two steps, and Binomial(2) over two SGD
    # steps keeps every term of (1).
    assert rel(grad_m, grad_h) <= 1e-10
    model = make_model()
    with mg_higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                 copy_initial_weights=False, estimator=mg.FirstOrder()) as (fmodel, diffopt):
        for _ in range(K):
            diffopt.step(F.mse_loss(fmodel(XS), YS))
        with pytest.raises(RuntimeError, match="no longer stored"):
            fmodel.parameters(time=1)


def test_optimizer_over_another_model_is_refused_clearly():
    with pytest.raises(ValueError, match="opt"):
        mg_higher.update_rule(torch.optim.SGD(make_model().parameters(), lr=0.1), make_model())


@pytest.mark.parametrize("make_estimator", [mg.Full, mg.Checkpointed, lambda: mg.Truncated(K),
                                            lambda: mg.Binomial(K), lambda: mg.Binomial(K, chunk_size=1)],
                         ids=["full", "checkpointed", "truncated-K", "binomial-K", "binomial-K-chunk1"])
@pytest.mark.parametrize("form", ["loss", "closure"])
def test_override_step_size_that_requires_grad_is_learned_as_higher_learns_it(make_estimator, form):
    """``diffopt.step(loss, override={"lr": [tensor requiring grad]})``: higher learns the step
    size by a full unroll; the adapter gives the same θ- and lr-gradients with every exact
    estimator (MATH.md (3))."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(DT)
    lr = torch.tensor(0.2, dtype=DT, requires_grad=True)

    def run(innerloop_ctx, **kwargs):
        for t in [*net.parameters(), lr]:
            t.grad = None
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        with innerloop_ctx(net, opt, copy_initial_weights=False, **kwargs) as (fmodel, diffopt):
            for _ in range(K):
                if form == "loss" or innerloop_ctx is higher.innerloop_ctx:
                    diffopt.step(F.mse_loss(fmodel(XS), YS), override={"lr": [lr]})
                else:
                    diffopt.step(closure=lambda f: F.mse_loss(f(XS), YS), override={"lr": [lr]})
            F.mse_loss(fmodel(XQ), YQ).backward()
        return [t.grad.clone() for t in [*net.parameters(), lr]]

    expected = run(higher.innerloop_ctx)
    got = run(mg_higher.innerloop_ctx, estimator=make_estimator())
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert expected[-1].abs() > 1e-6  # the step size's gradient is not trivially zero


def _first_steps(make_opt, adapter: bool) -> list[torch.Tensor]:
    """The fast weights after K inner steps: through the adapter, or by ``make_opt`` itself
    (torch.optim's own ``step()`` on a copy of the model)."""
    model = make_model()
    opt = make_opt(list(model.parameters()))
    if not adapter:
        for _ in range(K):
            opt.zero_grad()
            F.mse_loss(model(XS), YS).backward()
            opt.step()
        return [p.detach() for p in model.parameters()]
    with mg_higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(K):
            diffopt.step(F.mse_loss(fmodel(XS), YS))
        return [p.detach() for p in fmodel.parameters()]


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.2, nesterov=False, weight_decay=0.05),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    lambda ps: torch.optim.Adagrad(ps, lr=0.1, lr_decay=0.1, initial_accumulator_value=0.1, weight_decay=0.05),
    lambda ps: torch.optim.RMSprop(ps, lr=0.01, centered=True, momentum=0.5, weight_decay=0.05),
    lambda ps: torch.optim.Adamax(ps, lr=0.05, weight_decay=0.05),
    lambda ps: torch.optim.Rprop(ps, lr=0.01),
    lambda ps: torch.optim.ASGD(ps, lr=0.05, t0=1, lambd=0.1),
    lambda ps: torch.optim.Adadelta(ps, lr=1.0, weight_decay=0.05),
], ids=["sgd-momentum-dampening-decay", "sgd-nesterov", "adagrad", "rmsprop-centered", "adamax", "rprop", "asgd",
        "adadelta"])
def test_the_adapter_steps_as_the_torch_optim_optimizer_it_is_given(make_opt):
    """The inner loop through the adapter takes torch.optim's own steps (its ``step()`` on a
    copy of the model), for the optimizers whose arithmetic higher shares with torch.optim.
    (torch.optim keeps some scalars of its state, the step count and ASGD's step size, as
    float32 tensors: 1e-9-sized differences in float64, far below a setting it ignored.)"""
    for ours, theirs in zip(_first_steps(make_opt, True), _first_steps(make_opt, False)):
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)


def test_adam_through_the_adapter_is_higher_s_adam_within_an_epsilon_of_torch_optim():
    """higher's Adam adds ε before the bias correction rescales √v (the adapter keeps higher's
    numbers, as the module docstring says): an ε-sized difference from torch.optim.Adam."""
    make = lambda ps: torch.optim.Adam(ps, lr=0.01)  # noqa: E731
    for ours, theirs in zip(_first_steps(make, True), _first_steps(make, False)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, maximize=True),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, maximize=True),
    lambda ps: torch.optim.Adam(ps, lr=0.01, maximize=True),
    lambda ps: torch.optim.RMSprop(ps, lr=0.01, maximize=True),
    lambda ps: torch.optim.Adagrad(ps, lr=0.1, maximize=True),
], ids=["sgd", "momentum", "adam", "rmsprop", "adagrad"])
def test_maximize_which_higher_ignores_is_refused_not_descended(make_opt):
    """``maximize=True`` asks for ascent; higher's differentiable optimizers ignore it and
    descend (measured: the fast weights 0.3–0.8 off torch.optim's after three steps). The
    adapter refuses, naming the optimizer, the setting and the fix, before any step."""
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"opt: \w+\(maximize=True\).*negate the inner loss"):
        with mg_higher.innerloop_ctx(model, make_opt(model.parameters()), copy_initial_weights=False):
            pass
    assert all(torch.equal(p, b) and p.grad is None for p, b in zip(model.parameters(), before))


def test_maximize_set_by_override_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match=r"maximize=True"):
        mg_higher.update_rule(torch.optim.SGD(model.parameters(), lr=0.1), model, override={"maximize": [True]})


def test_adam_with_decoupled_weight_decay_which_higher_ignores_is_refused():
    model = make_model()
    try:
        opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)
    except TypeError:
        pytest.skip("this torch's Adam has no decoupled_weight_decay")
    with pytest.raises(ValueError, match=r"decoupled_weight_decay=True.*AdamW"):
        mg_higher.update_rule(opt, model)


_HEAD_OPTIMIZERS = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
                    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
                    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01)}


@pytest.mark.parametrize("opt_name, make_estimator", [
    *[(name, make) for name in _HEAD_OPTIMIZERS for make in (mg.Full, mg.Checkpointed)],
    ("sgd", lambda: mg.Binomial(K)),  # exact at order K for plain SGD (MATH.md)
], ids=["sgd-full", "sgd-checkpointed", "momentum-full", "momentum-checkpointed", "adam-full",
        "adam-checkpointed", "sgd-binomial-K"])
def test_an_optimizer_over_the_head_alone_equals_higher(opt_name, make_estimator):
    """ANIL as higher users write it: the inner optimizer holds the last layer's parameters
    only. The others keep their values at every step, and the meta-gradient reaches them
    through the inner loop and the query, as in higher; a grad_callback that clips by the
    global norm sees every parameter's gradient, as higher's does. (The adapter raised a
    ValueError about per-parameter step sizes for torch.optim.SGD here.)"""
    make_opt = _HEAD_OPTIMIZERS[opt_name]
    def clip(grads):
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None))
        return [None if g is None else g * torch.clamp(1.0 / norm, max=1.0) for g in grads]

    out = []
    for library in (higher, mg_higher):
        model = make_model()
        kwargs = {} if library is higher else {"estimator": make_estimator()}
        with library.innerloop_ctx(model, make_opt(model[-1].parameters()), copy_initial_weights=False,
                                   **kwargs) as (fmodel, diffopt):
            for k in range(K):
                diffopt.step(F.mse_loss(fmodel(XS), YS), grad_callback=clip if k % 2 else None)
            F.mse_loss(fmodel(XQ), YQ).backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert out[0][:-9].abs().max() > 1e-3  # the body gets a meta-gradient through the loop
    torch.testing.assert_close(out[1], out[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opt_name", sorted(_HEAD_OPTIMIZERS))
@pytest.mark.parametrize("make_estimator", [mg.Full, mg.Checkpointed], ids=["full", "checkpointed"])
def test_a_frozen_parameter_equals_higher(opt_name, make_estimator):
    """A parameter that does not require grad (a frozen bias) in a model whose optimizer holds
    every parameter: ``diffopt.step`` returned ``fmodel.fast_params`` with a KeyError. Now the
    fast weights after K steps, ``fmodel(x, params=...)`` and the meta-gradient equal higher's."""
    out = []
    for library in (higher, mg_higher):
        model = make_model()
        model[0].bias.requires_grad_(False)
        kwargs = {} if library is higher else {"estimator": make_estimator()}
        with library.innerloop_ctx(model, _HEAD_OPTIMIZERS[opt_name](model.parameters()), copy_initial_weights=False,
                                   **kwargs) as (fmodel, diffopt):
            for _ in range(K):
                diffopt.step(F.mse_loss(fmodel(XS), YS))
            final = [p.detach().clone() for p in fmodel.parameters()]
            F.mse_loss(fmodel(XQ, params=list(fmodel.parameters())), YQ).backward()
        out.append((torch.cat([p.reshape(-1) for p in final]),
                    torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])))
    assert model[0].bias.grad is None
    for ours, theirs in zip(out[1], out[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opt_name", sorted(_HEAD_OPTIMIZERS))
def test_a_step_override_on_a_copy_of_the_model_equals_higher(opt_name):
    """``copy_initial_weights=True`` (higher's default) with ``diffopt.step(..., override=...)``:
    the optimizer holds the original model's parameters, the loop runs on a copy; the override
    raised "opt: holds parameters that are not the model's". Now the gradient with respect to
    ``fmodel.parameters(time=0)`` (how higher's users read it there) equals higher's."""
    out = []
    for library in (higher, mg_higher):
        model = make_model()
        with library.innerloop_ctx(model, _HEAD_OPTIMIZERS[opt_name](model.parameters())) as (fmodel, diffopt):
            for k in range(K):
                diffopt.step(F.mse_loss(fmodel(XS), YS), override={"lr": [0.03]} if k == 1 else None)
            query = F.mse_loss(fmodel(XQ), YQ)
            out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(query, list(fmodel.parameters(time=0)))]))
    torch.testing.assert_close(out[1], out[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("head", [False, True], ids=["every-parameter", "head-only"])
def test_adamw_which_higher_cannot_differentiate_runs_as_torch_optim_computes_it(head):
    """``torch.optim.AdamW``: higher has no differentiable version; the adapter runs the native
    ``mg.optim.AdamW`` (torch.optim's arithmetic): the inner loop takes torch.optim's own steps,
    and Checkpointed's meta-gradient equals Full's (the unroll)."""
    def make(ps):
        return torch.optim.AdamW(ps, lr=0.02, betas=(0.8, 0.99), weight_decay=0.1)

    with pytest.raises(ValueError, match="not supported by higher"):  # higher's own error
        model = make_model()
        higher_opt = make(model.parameters())
        with higher.innerloop_ctx(model, higher_opt) as (fmodel, diffopt):
            pass
    if not head:
        for ours, theirs in zip(_first_steps(make, True), _first_steps(make, False)):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    grads = []
    for estimator in (mg.Full(), mg.Checkpointed()):
        model = make_model()
        with mg_higher.innerloop_ctx(model, make(model[-1].parameters() if head else model.parameters()),
                                     copy_initial_weights=False, estimator=estimator) as (fmodel, diffopt):
            for _ in range(K):
                diffopt.step(F.mse_loss(fmodel(XS), YS))
            F.mse_loss(fmodel(XQ), YQ).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


def test_adamw_with_amsgrad_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match=r"AdamW\(amsgrad=True\)"):
        mg_higher.update_rule(torch.optim.AdamW(model.parameters(), amsgrad=True), model)


_DRAWN_OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.2),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.7, dampening=0.1, weight_decay=0.02),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.7, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.03, weight_decay=0.01),
    "adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=0.03, amsgrad=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, lr_decay=0.05),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, centered=True, momentum=0.3),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=0.05),
    "adadelta": lambda ps: torch.optim.Adadelta(ps, lr=1.0),
    "asgd": lambda ps: torch.optim.ASGD(ps, lr=0.05),
}


@settings(max_examples=25, deadline=None)
@given(opt=st.sampled_from(sorted(_DRAWN_OPTIMIZERS)), steps=st.integers(1, 4), frozen=st.booleans(),
       held=st.sampled_from(["all", "head", "groups"]), copy=st.booleans(), closure=st.booleans(),
       override=st.booleans(), callback=st.booleans(),
       estimator=st.sampled_from(["full", "checkpointed", "checkpointed-snapshots"]))
def test_features_drawn_together_equal_higher(opt, steps, frozen, held, copy, closure, override, callback, estimator):
    """higher's features drawn together (the optimizer, a frozen parameter, an optimizer over
    the head or in two groups, ``copy_initial_weights``, ``diffopt.step`` with a loss or a
    closure, a per-step override, a ``grad_callback``) against higher itself: the fast weights
    after K steps and the meta-gradient (into ``.grad``, or with respect to
    ``fmodel.parameters(time=0)`` on a copy) to 1e-9."""
    def run(library):
        model = make_model()
        if frozen:
            model[0].bias.requires_grad_(False)
        params = {"all": list(model.parameters()), "head": list(model[-1].parameters()),
                  "groups": [{"params": list(model[0].parameters())},
                             {"params": list(model[-1].parameters()), "lr": 0.05}]}[held]
        kwargs = {} if library is higher else {"estimator": {
            "full": mg.Full(), "checkpointed": mg.Checkpointed(),
            "checkpointed-snapshots": mg.Checkpointed(snapshots=2)}[estimator]}
        halve = (lambda grads: [None if g is None else 0.5 * g for g in grads]) if callback else None
        with library.innerloop_ctx(model, _DRAWN_OPTIMIZERS[opt](params), copy_initial_weights=copy,
                                   **kwargs) as (fmodel, diffopt):
            for k in range(steps):
                change = {"lr": [0.07]} if override and k == 1 else None
                if closure and library is mg_higher:
                    diffopt.step(closure=lambda f: F.mse_loss(f(XS), YS), override=change, grad_callback=halve)
                else:
                    diffopt.step(F.mse_loss(fmodel(XS), YS), override=change, grad_callback=halve)
            final = torch.cat([p.detach().reshape(-1) for p in fmodel.parameters()])
            query = F.mse_loss(fmodel(XQ), YQ)
            if copy:
                initial = [p for p in fmodel.parameters(time=0) if p.requires_grad]
                grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(query, initial)])
            else:
                query.backward()
                grad = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        return final, grad

    for ours, theirs in zip(run(mg_higher), run(higher)):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
