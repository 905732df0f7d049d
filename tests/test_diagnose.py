"""mg.diagnose on quadratics with a known spectrum, and its command line."""

import subprocess
import sys

import pytest
import torch

import metagrad as mg

DT = torch.float64


class Quadratic(torch.nn.Module):
    def __init__(self, dim, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.phi = torch.nn.Parameter(torch.randn(dim, generator=g, dtype=DT))


def quadratic_task(spectrum, seed=0):
    dim = len(spectrum)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=DT))
    A = Q @ torch.diag(torch.tensor(spectrum, dtype=DT)) @ Q.T
    A = 0.5 * (A + A.T)
    b, target = torch.randn(dim, generator=g, dtype=DT), torch.randn(dim, generator=g, dtype=DT)
    model = Quadratic(dim, seed)
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


@pytest.mark.parametrize("alpha", [0.002, 0.02, 0.08])
@pytest.mark.parametrize("rtol", [1e-1, 1e-3, 1e-8])
def test_recommendation_is_never_less_accurate_than_asked(alpha, rtol):
    model, closure, query = quadratic_task([4.0, 2.0, 1.0, 0.5, -0.3])
    before = model.phi.detach().clone()
    report = mg.diagnose(model, closure, steps=8, inner_opt=mg.optim.SGD(alpha), query=query,
                         rtol=rtol, repeats=1)
    chosen = next(r for r in report.rows if r.estimator == report.recommended)
    assert chosen.relative_error <= rtol
    assert torch.equal(model.phi.detach(), before) and model.phi.grad is None
    names = {repr(r.estimator) for r in report.rows}
    assert {"Full()", "Checkpointed()", "FirstOrder()"} <= names
    for r in report.rows:
        assert -1.0 - 1e-12 <= r.cosine <= 1.0 + 1e-12 and r.seconds > 0
        if r.estimator in (mg.Full(), mg.Checkpointed()):
            assert r.relative_error <= 1e-10
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
    assert "--rtol" in out.stdout and "RuntimeWarning" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "metagrad.diagnose", "--steps", "3", "--repeats", "1"],
                         capture_output=True, text=True, check=True, timeout=120)
    assert "recommended" in out.stdout and "Binomial" in out.stdout
