"""Binomial's error control: level norms, automatic order, divergence and fallback.

Ground truth: quadratics ``L_tr(φ) = ½φᵀAφ − bᵀφ`` with a chosen spectrum, where every
``H_k = A``, so ``g = (I − αA)^K v`` and the order-j level is ``T_j = C(K,j)(−αA)^j v``
(MATH.md, "Error bounds"), computed here with dense matrices, independently of metagrad.
"""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import metagrad as mg

DT = torch.float64


class Quadratic(torch.nn.Module):
    def __init__(self, theta):
        super().__init__()
        self.phi = torch.nn.Parameter(theta.clone())

    def forward(self, A, b):
        return 0.5 * self.phi @ A @ self.phi - b @ self.phi


def problem(seed, dim, spectrum):
    """A with eigenvalues ``spectrum`` in a random basis, b, θ, and a query target."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=DT))
    A = Q @ torch.diag(torch.as_tensor(spectrum, dtype=DT)) @ Q.T
    A = 0.5 * (A + A.T)
    b = torch.randn(dim, generator=g, dtype=DT)
    theta = torch.randn(dim, generator=g, dtype=DT)
    target = torch.randn(dim, generator=g, dtype=DT)
    return A, b, theta, target


def run(estimator, A, b, theta, target, K, alpha):
    model = Quadratic(theta)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=alpha), estimator=estimator) as meta:
        for _ in range(K):
            meta.step(lambda f: f(A, b))
        phi = meta.fmodel.params["phi"]
        (0.5 * ((phi - target) ** 2).sum()).backward()
    return model.phi.grad.clone(), dict(meta.info)


def exact(A, b, theta, target, K, alpha):
    """φ_K by the closed recursion, v = φ_K − target, g = (I − αA)^K v, and T_1 … T_K."""
    phi = theta.clone()
    for _ in range(K):
        phi = phi - alpha * (A @ phi - b)
    v = phi - target
    B = -alpha * A
    levels = [math.comb(K, j) * torch.linalg.matrix_power(B, j) @ v for j in range(1, K + 1)]
    return v + sum(levels), v, levels


def spectrum_for(draw_seed, dim, ell, low):
    g = torch.Generator().manual_seed(draw_seed)
    values = low * ell + (1 - low) * ell * torch.rand(dim, generator=g, dtype=DT)
    values[0] = ell
    return values.tolist()


@settings(max_examples=40)
@given(seed=st.integers(0, 2**31 - 1), dim=st.integers(1, 6), K=st.integers(1, 30),
       x=st.floats(0.01, 0.5), rtol=st.sampled_from([1e-2, 1e-3, 1e-5]), psd=st.booleans())
def test_auto_order_meets_rtol_where_k_alpha_ell_is_small(seed, dim, K, x, rtol, psd):
    """K·α·ℓ ≤ 0.5: order='auto' stops with a relative error below rtol, no fallback."""
    ell = 2.0
    spectrum = spectrum_for(seed, dim, ell, 0.0 if psd else -1.0)
    A, b, theta, target = problem(seed, dim, spectrum)
    alpha = x / (K * ell)
    g_true, v, _ = exact(A, b, theta, target, K, alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mg.MetaGradientWarning)
        g, info = run(mg.Binomial("auto", rtol=rtol, max_order=12), A, b, theta, target, K, alpha)
    assert info["converged"] and info["fallback"] is None and not info["diverged"]
    assert float((g - g_true).norm()) <= rtol * float(g_true.norm()) + 1e-13 * float(v.norm())
    assert info["order"] == len(info["level_norms"]) <= min(12, K)


@settings(max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), dim=st.integers(1, 5), K=st.integers(10, 30),
       kal=st.floats(3.0, 8.0))
def test_divergence_is_detected_where_k_alpha_ell_is_large(seed, dim, K, kal):
    """K·α·ℓ ≥ 3 with K > max_order: a warning, then the exact fallback (1e-10)."""
    ell = 2.0
    A, b, theta, target = problem(seed, dim, spectrum_for(seed, dim, ell, 0.8))
    alpha = kal / (K * ell)
    g_true, v, _ = exact(A, b, theta, target, K, alpha)
    with pytest.warns(mg.MetaGradientWarning, match="diverging"):
        g, info = run(mg.Binomial("auto", fallback="checkpointed"), A, b, theta, target, K, alpha)
    assert info["diverged"] and info["fallback"] == "Checkpointed()"
    # (I − αA)^K can shrink v by orders of magnitude: rounding is relative to ‖v‖.
    assert float((g - g_true).norm()) <= 1e-10 * max(float(g_true.norm()), float(v.norm()))
    # The default fallback is the blocked expansion, which meets rtol block by block.
    with pytest.warns(mg.MetaGradientWarning, match="diverging"):
        g, info = run(mg.Binomial("auto"), A, b, theta, target, K, alpha)
    assert info["diverged"] and info["fallback"].startswith("Binomial(order='auto', block='auto'")
    assert float((g - g_true).norm()) <= 1e-3 * len(info["blocks"]) * max(float(g_true.norm()), float(v.norm()))
    with pytest.raises(mg.SeriesDivergenceError, match="diverging"):
        run(mg.Binomial("auto", fallback=None), A, b, theta, target, K, alpha)


def test_truncated_fallback_and_max_order_without_convergence():
    ell, K, dim = 2.0, 12, 3
    A, b, theta, target = problem(0, dim, [ell, 0.9 * ell, 0.85 * ell])
    alpha = 3.5 / (K * ell)
    with pytest.warns(mg.MetaGradientWarning, match="Falling back to Truncated"):
        g, info = run(mg.Binomial("auto", fallback="truncated", max_order=4), A, b, theta, target, K, alpha)
    expected, _ = run(mg.Truncated(4), A, b, theta, target, K, alpha)
    assert torch.allclose(g, expected, rtol=1e-12, atol=0)
    # Converging, but max_order=2 is too few for rtol=1e-8: the estimate misses it and falls back.
    alpha = 0.3 / (K * ell)
    with pytest.warns(mg.MetaGradientWarning, match="max_order=2"):
        g, info = run(mg.Binomial("auto", rtol=1e-8, max_order=2, fallback="checkpointed"),
                      A, b, theta, target, K, alpha)
    g_true, _, _ = exact(A, b, theta, target, K, alpha)
    assert not info["diverged"] and info["fallback"] == "Checkpointed()"
    assert float((g - g_true).norm()) <= 1e-10 * float(g_true.norm())


@pytest.mark.parametrize("K,L", [(4, 2), (6, 3), (5, 5)])
def test_fixed_order_records_the_level_norms_of_expression_2(K, L):
    ell = 1.5
    A, b, theta, target = problem(1, 4, [ell, -0.5 * ell, 0.3 * ell, 0.1])
    alpha = 0.2 / (K * ell)
    _, _, levels = exact(A, b, theta, target, K, alpha)
    g, info = run(mg.Binomial(L), A, b, theta, target, K, alpha)
    assert info["order"] == L and len(info["level_norms"]) == L
    for norm, level in zip(info["level_norms"], levels):
        assert norm == pytest.approx(float(level.norm()), rel=1e-10)
    expected_estimate = 0.0 if L == K else float(levels[L - 1].norm()) / float(g.norm())
    assert info["error_estimate"] == pytest.approx(expected_estimate, rel=1e-10, abs=1e-300)
    assert info["hessian_vector_products"] == sum(K - j + 1 for j in range(1, L + 1))


def test_fixed_order_warns_when_the_norms_grow_and_the_warning_is_switchable():
    ell, K, L = 2.0, 10, 2
    A, b, theta, target = problem(2, 3, [ell, 0.9 * ell, 0.8 * ell])
    alpha = 5.0 / (K * ell)
    with pytest.warns(mg.MetaGradientWarning, match="not converging at order 2"):
        g_monitored, info = run(mg.Binomial(L), A, b, theta, target, K, alpha)
    assert info["diverged"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", mg.MetaGradientWarning)
        g_quiet, quiet = run(mg.Binomial(L, monitor=False), A, b, theta, target, K, alpha)
    assert "level_norms" not in quiet and quiet["hessian_vector_products"] == L * (K - L + 1)
    assert torch.allclose(g_monitored, g_quiet, rtol=1e-12, atol=1e-14)
    # In its regime, the same estimator is silent.
    with warnings.catch_warnings():
        warnings.simplefilter("error", mg.MetaGradientWarning)
        run(mg.Binomial(L), A, b, theta, target, K, 0.2 / (K * ell))


@pytest.mark.parametrize("kwargs,argument", [
    ({"order": "automatic"}, "order"), ({"order": "auto", "rtol": 0}, "rtol"),
    ({"order": "auto", "max_order": 0}, "max_order"), ({"order": "auto", "fallback": "full"}, "fallback"),
])
def test_bad_error_control_arguments(kwargs, argument):
    with pytest.raises((TypeError, ValueError), match=argument):
        mg.Binomial(**kwargs)


# ------------------------------------------------------------------ the fixed-order warning
# benchmarks/binomial_sweep.py's case where the growth rule alone was silent on results many
# times off: 1-40-1 ReLU sinusoid tasks at their random initialization, K = 5, α = 0.01.
SWEEP_K, SWEEP_ALPHA = 5, 0.01


def sinusoid_case(seed):
    """The sweep's draw: the net's initialization from ``seed``, then the task from ``seed``."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1)).to(DT)
    g = torch.Generator().manual_seed(seed)
    amplitude = 0.1 + 4.9 * torch.rand((), generator=g, dtype=DT)
    phase = math.pi * torch.rand((), generator=g, dtype=DT)
    x = 10 * torch.rand(20, 1, generator=g, dtype=DT) - 5
    y = amplitude * torch.sin(x - phase)
    return model, (x[:10], y[:10], x[10:], y[10:])


def unrolled_meta_gradient(model, task, K, alpha):
    """The exact meta-gradient by a plain unrolled autograd loop, written out for the MLP."""
    x_s, y_s, x_q, y_q = task
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]

    def net(w, x):
        return torch.relu(x @ w[0].T + w[1]) @ w[2].T + w[3]

    phi = theta
    for _ in range(K):
        grads = torch.autograd.grad(((net(phi, x_s) - y_s) ** 2).mean(), phi, create_graph=True)
        phi = [p - alpha * g for p, g in zip(phi, grads)]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(((net(phi, x_q) - y_q) ** 2).mean(), theta)])


def fixed_order_on_sinusoid(seed, orders):
    """Binomial(L) for each L of ``orders`` on the seed's task: relative error, meta.info
    and the MetaGradientWarnings it issued, per order."""
    model, (x_s, y_s, x_q, y_q) = sinusoid_case(seed)
    exact_g = unrolled_meta_gradient(model, (x_s, y_s, x_q, y_q), SWEEP_K, SWEEP_ALPHA)
    out = []
    for order in orders:
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # pyproject ignores "not converging" by default
            with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=SWEEP_ALPHA),
                                 estimator=mg.Binomial(order)) as meta:
                for _ in range(SWEEP_K):
                    meta.step(lambda f: torch.nn.functional.mse_loss(f(x_s), y_s))
                torch.nn.functional.mse_loss(meta.fmodel(x_q), y_q).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        ours = [w for w in caught if issubclass(w.category, mg.MetaGradientWarning)]
        out.append((float((g - exact_g).norm() / exact_g.norm()), dict(meta.info), ours))
    return out


def check_warns_where_far_off(seed, orders=(2, 3)):
    results = fixed_order_on_sinusoid(seed, orders)
    for order, (error, info, caught) in zip(orders, results):
        assert info["warned"] == bool(caught) and len(caught) <= 1
        if error > 0.3:
            assert caught, (seed, order, error, info["level_norms"], info["error_estimate"])
            assert str(caught[0].message).startswith("The binomial series is not converging")
            assert "Binomial(order='auto')" in str(caught[0].message)
            assert "Checkpointed()" in str(caught[0].message)
    return results


def test_fixed_order_warns_on_every_sweep_case_more_than_30_percent_off():
    """Seeds 0…15 of the sweep at L = 2 and 3: 23 of the 32 results are > 30% off, 11 of them
    with norms that shrink at the last order (the growth rule alone was silent there); all warn."""
    far, quiet_before = 0, 0
    for seed in range(16):
        for error, info, _ in check_warns_where_far_off(seed):
            ratio = info["level_norms"][-1] / info["level_norms"][-2]
            assert info["diverged"] == (ratio >= 1)
            far += error > 0.3
            quiet_before += error > 0.3 and ratio < 1
    assert far >= 15 and quiet_before >= 6, (far, quiet_before)


@settings(max_examples=12)
@given(seed=st.integers(0, 2**31 - 1))
def test_fixed_order_warns_wherever_it_is_more_than_30_percent_off(seed):
    check_warns_where_far_off(seed)


def test_fixed_order_warns_on_a_large_estimate_in_a_block_whose_norms_shrink():
    """One eigenvalue, α·λ = 0.3: in a block of S = 5 steps at order 2, ρ_2 = 2αλ = 0.6 < 1
    but ‖T_2‖/‖u‖ = C(5,2)(αλ)² = 0.9, and the block is 2.4× off ((1−αλ)^5 = 0.168
    against 1 − 1.5 + 0.9 = 0.4)."""
    ell, K = 2.0, 10
    A, b, theta, target = problem(4, 1, [ell])
    alpha = 0.3 / ell
    g_true, _, _ = exact(A, b, theta, target, K, alpha)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g, info = run(mg.Binomial(2, block=5), A, b, theta, target, K, alpha)
    messages = [str(w.message) for w in caught if issubclass(w.category, mg.MetaGradientWarning)]
    assert len(messages) == 1 and "in the block of steps 5…9" in messages[0], messages
    assert "0.9 of the vector the block expanded against" in messages[0]
    assert info["warned"] and not info["diverged"]
    assert float((g - g_true).norm()) > 0.3 * float(g_true.norm())
    # Unblocked, the same cut is ‖T_2‖/‖ĝ_2‖ = 0.9/0.4 of its estimate: it warns as well.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info = run(mg.Binomial(2), A, b, theta, target, 5, alpha)
    assert info["warned"] and not info["diverged"]
    assert info["error_estimate"] == pytest.approx(0.9 / 0.4, rel=1e-10)
    # Blocks of 2 steps at order 2 are exact: nothing to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("error", mg.MetaGradientWarning)
        _, info = run(mg.Binomial(2, block=2), A, b, theta, target, K, alpha)
    assert not info["warned"]


def test_the_name_binomial_is_the_automatic_order_with_the_blocked_fallback():
    estimator = mg.estimators.resolve("binomial")
    assert estimator == mg.Binomial(order="auto")
    assert estimator.fallback == "blocked" and estimator.block is None
    assert mg.estimators.resolve("binomial") is not estimator  # a fresh instance each time
    # Where the plain series diverges, the name gives the blocked expansion, within rtol.
    ell, K = 2.0, 20
    A, b, theta, target = problem(5, 3, [ell, 0.9 * ell, 0.8 * ell])
    alpha = 5.0 / (K * ell)
    g_true, v, _ = exact(A, b, theta, target, K, alpha)
    with pytest.warns(mg.MetaGradientWarning, match="Falling back to Binomial"):
        g, info = run("binomial", A, b, theta, target, K, alpha)
    assert info["warned"] and info["fallback"].startswith("Binomial(order='auto', block='auto'")
    assert float((g - g_true).norm()) <= 1e-3 * len(info["blocks"]) * max(float(g_true.norm()), float(v.norm()))
