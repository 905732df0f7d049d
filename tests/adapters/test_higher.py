"""metagrad.adapters.higher against higher itself, and against a hand-unrolled reference.

With Full (the default) the adapter must give higher's gradients to 1e-10 in float64;
with the other estimators it must agree with Full where MATH.md says it must.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import metagrad as mg

higher = pytest.importorskip("higher", reason="higher is not installed (pip install 'metagrad[higher]')")
from metagrad.adapters import higher as mg_higher  # noqa: E402

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


def test_loss_and_closure_paths_agree_for_every_estimator():
    for estimator in (mg.Checkpointed(), mg.Truncated(2), mg.Binomial(2), mg.FirstOrder()):
        by_loss, _ = meta_gradient(mg_higher, OPTIMIZERS["momentum"], estimator)
        by_closure, _ = meta_gradient(mg_higher, OPTIMIZERS["momentum"], estimator, closure=True)
        assert rel(by_loss, by_closure) <= 1e-12, estimator


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


def test_batchnorm_model_and_buffers_untouched():
    expected, _ = meta_gradient(higher, OPTIMIZERS["sgd"], batchnorm=True)
    for estimator in (None, mg.Checkpointed(), mg.Binomial(2)):
        got, model = meta_gradient(mg_higher, OPTIMIZERS["sgd"], estimator, batchnorm=True)
        assert torch.equal(model[1].running_mean, torch.zeros(8, dtype=DT))
        assert int(model[1].num_batches_tracked) == 0
        if estimator is None:
            assert rel(got, expected) <= 1e-10


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
        outputs.append(result.stdout.strip().splitlines()[-1].split(": ", 1)[1])
    assert outputs[0].split(":")[-1] == outputs[1].split(":")[-1]  # the same MSE, to the digit
    assert "query MSE" in outputs[2]


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


@pytest.mark.parametrize("estimator", [None, mg.Checkpointed(), mg.Binomial(2)], ids=repr)
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
    if estimator is None or isinstance(estimator, mg.Checkpointed):
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
