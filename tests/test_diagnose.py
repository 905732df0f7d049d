"""mg.diagnose on quadratics with a known spectrum, and its command line.

Its error column and its recommendation are checked against a hand-unrolled float64
autograd reference written here, not against the package's own Full.
"""

import subprocess
import sys
import warnings

import pytest
import torch

import metagrad as mg

DT = torch.float64


class Quadratic(torch.nn.Module):
    def __init__(self, dim, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.phi = torch.nn.Parameter(torch.randn(dim, generator=g, dtype=DT))


def quadratic_data(spectrum, seed=0):
    """``A = Q diag(spectrum) Qᵀ``, b and the query's target."""
    dim = len(spectrum)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=DT))
    A = Q @ torch.diag(torch.tensor(spectrum, dtype=DT)) @ Q.T
    A = 0.5 * (A + A.T)
    b, target = torch.randn(dim, generator=g, dtype=DT), torch.randn(dim, generator=g, dtype=DT)
    return A, b, target


def quadratic_task(spectrum, seed=0):
    A, b, target = quadratic_data(spectrum, seed)
    model = Quadratic(len(spectrum), seed)
    closure = lambda f: 0.5 * f.params["phi"] @ A @ f.params["phi"] - b @ f.params["phi"]  # noqa: E731
    query = lambda f: 0.5 * ((f.params["phi"] - target) ** 2).sum()  # noqa: E731
    return model, closure, query


@pytest.mark.parametrize("spectrum", [[4.0, 3.4, 1.0, 0.2], [-4.0, 3.0, 0.5], [4.0, -3.4, 2.0]])
def test_ell_estimate_within_5_percent(spectrum):
    """20 power iterations; the two largest |eigenvalues| have a ratio of at most 0.85."""
    model, closure, query = quadratic_task(spectrum)
    alpha, steps = 0.01, 6
    report = mg.diagnose(model, closure, steps=steps, inner_opt=mg.optim.SGD(alpha), query=query,
                         estimators=[mg.FirstOrder()], repeats=1)
    ell = max(abs(x) for x in spectrum)
    assert report.ell == pytest.approx(ell, rel=0.05)
    assert report.k_alpha_ell == pytest.approx(steps * alpha * ell, rel=0.05)


def hand_unrolled_meta_gradient(A, b, target, theta, alpha, steps):
    """``∇_θ L_val(φ_K)`` by plain autograd through K steps of ``φ ← φ − α(Aφ − b)`` (the
    gradient of ``½φᵀAφ − bᵀφ`` written out), ``L_val = ½‖φ − target‖²``."""
    theta = theta.detach().clone().requires_grad_()
    phi = theta
    for _ in range(steps):
        phi = phi - alpha * (A @ phi - b)
    (g,) = torch.autograd.grad(0.5 * ((phi - target) ** 2).sum(), theta)
    return g


def package_meta_gradient(model, closure, query, alpha, steps, estimator):
    """One estimator's meta-gradient, as a user gets it (warnings about the series are the
    report's business here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mg.MetaGradientWarning)
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(alpha), estimator=estimator) as meta:
            for _ in range(steps):
                meta.step(closure)
            (g,) = torch.autograd.grad(query(meta.fmodel), [model.phi])
    return g


@pytest.mark.parametrize("alpha", [0.002, 0.02, 0.08])
@pytest.mark.parametrize("rtol", [1e-1, 1e-3, 1e-8])
def test_recommendation_is_never_less_accurate_than_asked(alpha, rtol):
    """Every row's error and cosine are measured here against the hand-unrolled reference;
    the recommended estimator's error must be within rtol of it, and the recommendation is
    the fastest row that is (by the report's own times, which are not asserted)."""
    spectrum, steps = [4.0, 2.0, 1.0, 0.5, -0.3], 8
    model, closure, query = quadratic_task(spectrum)
    A, b, target = quadratic_data(spectrum)
    before = model.phi.detach().clone()
    exact = hand_unrolled_meta_gradient(A, b, target, before, alpha, steps)
    report = mg.diagnose(model, closure, steps=steps, inner_opt=mg.optim.SGD(alpha), query=query,
                         rtol=rtol, repeats=1)
    assert torch.equal(model.phi.detach(), before) and model.phi.grad is None
    names = {repr(r.estimator) for r in report.rows}
    assert {"Full()", "Checkpointed()", "FirstOrder()"} <= names
    errors = {}
    for r in report.rows:
        g = package_meta_gradient(model, closure, query, alpha, steps, r.estimator)
        error = float((g - exact).norm() / exact.norm())
        cosine = float(g @ exact / (g.norm() * exact.norm()))
        errors[repr(r.estimator)] = error
        # the report's columns are these, up to rounding of the package's own Full
        assert abs(r.relative_error - error) <= 1e-12 + 1e-9 * error, (r.estimator, r.relative_error, error)
        assert abs(r.cosine - cosine) <= 1e-12, r.estimator
        assert -1.0 - 1e-12 <= r.cosine <= 1.0 + 1e-12
        if r.estimator in (mg.Full(), mg.Checkpointed()):
            assert error <= 1e-12, r.estimator
    assert errors["FirstOrder()"] > 1e-3  # the table spans accurate and inaccurate rows
    # The recommendation meets rtol against the reference (with rounding to spare only where
    # rtol is near it), and nothing faster met it.
    assert errors[repr(report.recommended)] <= rtol * (1 + 1e-6) + 1e-14, (report.recommended, errors)
    chosen = next(r for r in report.rows if r.estimator == report.recommended)
    assert all(r.seconds >= chosen.seconds for r in report.rows
               if errors[repr(r.estimator)] <= rtol * (1 - 1e-6) - 1e-14)
    table = str(report)
    assert "recommended" in table and "K·α·ℓ" in table


def test_diagnose_rejects_bad_arguments():
    model, closure, query = quadratic_task([1.0, 0.5])
    with pytest.raises(ValueError, match="steps"):
        mg.diagnose(model, closure, steps=0, inner_opt=mg.optim.SGD(0.1), query=query)
    with pytest.raises(ValueError, match="rtol"):
        mg.diagnose(model, closure, steps=2, inner_opt=mg.optim.SGD(0.1), query=query, rtol=0)


def test_command_line():
    out = subprocess.run([sys.executable, "-m", "metagrad.diagnose", "--help"], capture_output=True,
                         text=True, check=True)
    assert "--rtol" in out.stdout and "--threads" in out.stdout and "RuntimeWarning" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "metagrad.diagnose", "--steps", "3", "--repeats", "1"],
                         capture_output=True, text=True, check=True, timeout=120)
    assert "recommended" in out.stdout and "Binomial" in out.stdout
    assert "torch CPU threads: 1 (--threads)" in out.stdout  # one thread unless asked otherwise


def hand_unrolled_with_meta(A, b, target, theta, lr, decay, steps):
    """θ's, the step size's and the decay's meta-gradients by plain autograd through K steps
    of ``φ ← φ − lr·(Aφ − b + decay·φ)`` (the inner loss plus ``(decay/2)‖φ‖²``)."""
    theta, lr, decay = (t.detach().clone().requires_grad_() for t in (theta, lr, decay))
    phi = theta
    for _ in range(steps):
        phi = phi - lr * (A @ phi - b + decay * phi)
    grads = torch.autograd.grad(0.5 * ((phi - target) ** 2).sum(), [theta, lr, decay])
    return [g.reshape(-1) for g in grads]


def test_meta_parameters_are_compared_when_given():
    """A learned step size and a weight decay read by the closure, passed as ``meta=``: each
    row's error is the larger of θ's and η's relative errors against the hand unroll, so
    FirstOrder, which gives the decay nothing through the inner loop, is not recommended."""
    spectrum, steps = [2.0, 1.0, 0.5], 5
    model, _, query = quadratic_task(spectrum)
    A, b, target = quadratic_data(spectrum)
    lr = torch.tensor(0.05, dtype=DT, requires_grad=True)
    decay = torch.tensor(0.1, dtype=DT, requires_grad=True)
    p = lambda f: f.params["phi"]  # noqa: E731
    closure = lambda f: 0.5 * p(f) @ A @ p(f) - b @ p(f) + 0.5 * decay * (p(f) ** 2).sum()  # noqa: E731
    theta_g, lr_g, decay_g = hand_unrolled_with_meta(A, b, target, model.phi, lr, decay, steps)
    report = mg.diagnose(model, closure, steps=steps, inner_opt=mg.optim.SGD(lr), query=query,
                         meta=[lr, decay], rtol=1e-6, repeats=1,
                         estimators=[mg.FirstOrder(), mg.Truncated(2), mg.Checkpointed(), mg.Full()])
    assert model.phi.grad is None and lr.grad is None and decay.grad is None
    eta = torch.cat([lr_g, decay_g])
    for row in report.rows:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mg.MetaGradientWarning)
            with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr), estimator=row.estimator) as meta:
                for _ in range(steps):
                    meta.step(closure)
                g = torch.autograd.grad(query(meta.fmodel), [model.phi, lr, decay], allow_unused=True)
        g = [torch.zeros(1, dtype=DT) if t is None else t.reshape(-1) for t in g]
        error = max(float((g[0] - theta_g).norm() / theta_g.norm()),
                    float((torch.cat(g[1:]) - eta).norm() / eta.norm()))
        assert abs(row.relative_error - error) <= 1e-9 + 1e-9 * error, (row.estimator, row.relative_error, error)
    first_order = next(r for r in report.rows if r.estimator == mg.FirstOrder())
    assert first_order.relative_error > 0.1
    assert report.recommended in (mg.Checkpointed(), mg.Full())
    assert not any("meta=" in note for note in report.notes)


def test_meta_parameters_found_but_not_given_are_warned_about():
    """The same loop without ``meta=``: the error column is θ's alone, and the report says so."""
    model, _, query = quadratic_task([2.0, 1.0])
    A, b, _ = quadratic_data([2.0, 1.0])
    decay = torch.tensor(0.1, dtype=DT, requires_grad=True)
    closure = lambda f: 0.5 * f.params["phi"] @ A @ f.params["phi"] - b @ f.params["phi"] \
        + 0.5 * decay * (f.params["phi"] ** 2).sum()  # noqa: E731
    with pytest.warns(mg.MetaGradientWarning, match=r"meta-parameters .* Pass meta=\[\.\.\.\]"):
        report = mg.diagnose(model, closure, steps=3, inner_opt=mg.optim.SGD(0.05), query=query,
                             estimators=[mg.FirstOrder()], repeats=1)
    assert any("meta=" in note for note in report.notes) and "meta=" in str(report)


def test_meta_that_is_not_a_meta_parameter_is_refused():
    model, closure, query = quadratic_task([1.0, 0.5])
    with pytest.raises(ValueError, match=r"meta\[0\]: expected a floating-point tensor that requires grad"):
        mg.diagnose(model, closure, steps=2, inner_opt=mg.optim.SGD(0.1), query=query, meta=[torch.ones(2)])
