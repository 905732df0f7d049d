"""Implicit (iMAML): the solution x of (I + H/λ) x = ∇L_val(φ_K) (MATH.md, "Implicit differentiation").

Every reference here is written with plain torch (dense matrices, ``torch.linalg.solve``,
a hand-unrolled autograd loop); nothing is computed with metagrad except the value under
test.

- Ridge regression, where ``φ*(θ) = (A + λI)⁻¹(c + λθ)`` and the meta-gradient
  ``(I + A/λ)⁻¹ ∇L_val(φ*)`` have closed forms (both solvers, with and without a bias).
- Full unrolling of the proximal inner loop by hand: its exact derivative of
  ``L_val(φ_K(θ))`` tends to the implicit one as the inner loop converges (ridge and a
  tanh MLP).
- Hypothesis on random SPD quadratics with known spectra: CG meets its residual
  tolerance (true residual from the dense matrix); Neumann agrees with CG and the dense
  solve wherever ``‖A‖ < λ``.
- No per-step storage; failures (unconverged solve, diverging Neumann series, negative
  curvature); argument checks; ``meta.info``; float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import metagrad as mg

from ._package import ref

F64 = torch.float64


# ============================================================================= helpers


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ``‖actual − expected‖ / ‖expected‖`` in float64."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm())


def grads_of(model: nn.Module) -> torch.Tensor:
    return flat([p.grad for p in model.parameters()])


def random_orthogonal(d: int, generator: torch.Generator, dtype=F64) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=dtype))
    return Q * torch.sign(torch.diagonal(R))


def with_spectrum(eigenvalues, generator: torch.Generator) -> torch.Tensor:
    """A dense symmetric matrix ``Q diag(eigenvalues) Qᵀ`` with a random orthogonal Q."""
    lam = torch.as_tensor(eigenvalues, dtype=F64)
    Q = random_orthogonal(lam.numel(), generator)
    A = Q @ torch.diag(lam) @ Q.T
    return 0.5 * (A + A.T)


@dataclass
class Ridge:
    """A linear model ``x ↦ Wx (+ b)`` with ``L = ½·mean((model(x) − y)²)`` on the support
    and on the query set. With all parameters as one vector w and the design matrix
    ``Z = [X, 1]`` (``[X]`` without bias), ``L_tr(w) = ½ wᵀAw − cᵀw + const`` with
    ``A = ZᵀZ/n``, ``c = Zᵀy/n``; likewise ``∇L_val(w) = A_q w − c_q``."""

    X: torch.Tensor
    Y: torch.Tensor
    Xq: torch.Tensor
    Yq: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]

    @classmethod
    def make(cls, seed: int = 0, *, bias: bool = True, n: int = 40, nq: int = 30, d: int = 4,
             dtype=F64) -> "Ridge":
        g = torch.Generator().manual_seed(seed)
        w_true = torch.randn(d, 1, generator=g, dtype=F64)
        X = torch.randn(n, d, generator=g, dtype=F64)
        Y = X @ w_true + 0.3 + 0.1 * torch.randn(n, 1, generator=g, dtype=F64)
        Xq = torch.randn(nq, d, generator=g, dtype=F64)
        Yq = Xq @ w_true + 0.3 + 0.1 * torch.randn(nq, 1, generator=g, dtype=F64)
        weight = 0.5 * torch.randn(1, d, generator=g, dtype=F64)
        b = 0.5 * torch.randn(1, generator=g, dtype=F64) if bias else None
        cast = (lambda t: None if t is None else t.to(dtype))
        return cls(cast(X), cast(Y), cast(Xq), cast(Yq), cast(weight), cast(b))

    @property
    def dtype(self):
        return self.X.dtype

    def module(self) -> nn.Linear:
        model = nn.Linear(self.X.shape[1], 1, bias=self.bias is not None, dtype=self.dtype)
        with torch.no_grad():
            model.weight.copy_(self.weight)
            if self.bias is not None:
                model.bias.copy_(self.bias)
        return model

    # ---- the package side
    def closure(self):
        X, Y = self.X, self.Y
        return lambda fmodel: 0.5 * ((fmodel(X) - Y) ** 2).mean()

    def query(self, fmodel) -> torch.Tensor:
        return 0.5 * ((fmodel(self.Xq) - self.Yq) ** 2).mean()

    # ---- the reference side (float64, dense)
    def theta(self) -> list[torch.Tensor]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def forward(self, params, x):
        return F.linear(x, params[0], params[1] if len(params) > 1 else None)

    def _design(self, X):
        X = X.double()
        return torch.cat([X, torch.ones(X.shape[0], 1, dtype=F64)], 1) if self.bias is not None else X

    def quadratic(self, X, Y):
        Z = self._design(X)
        return Z.T @ Z / Z.shape[0], (Z.T @ Y.double()).reshape(-1) / Z.shape[0]

    def closed_form(self, lam: float):
        """``(φ*, meta-gradient, A)``: φ* = (A + λI)⁻¹(c + λθ), g = (I + A/λ)⁻¹ (A_q φ* − c_q)."""
        A, c = self.quadratic(self.X, self.Y)
        Aq, cq = self.quadratic(self.Xq, self.Yq)
        I = torch.eye(A.shape[0], dtype=F64)
        theta = flat(self.theta()).double()
        phi = torch.linalg.solve(A + lam * I, c + lam * theta)
        g = torch.linalg.solve(I + A / lam, Aq @ phi - cq)
        return phi, g, A

    def ell(self) -> float:
        return float(torch.linalg.eigvalsh(self.quadratic(self.X, self.Y)[0]).max())


def run_package(model, closure, query, *, K, lr, estimator):
    """One MetaGradient block: K inner steps, the query's backward. Returns the
    meta-gradient (flat), φ_K (flat), meta.info and the step losses."""
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator) as meta:
        losses = [meta.step(closure) for _ in range(K)]
        fmodel = meta.fmodel
        phi = flat(fmodel.params.values()).detach().clone()
        query(fmodel).backward()
    return grads_of(model), phi, meta.info, losses


def hand_unroll(theta, inner_loss, query_loss, *, lam, lr, K):
    """The exact ``∇_θ L_val(φ_K(θ))`` of the proximal inner loop, by plain autograd:
    φ_0 = θ, φ_{k+1} = φ_k − α ∇_φ[L_tr(φ_k) + (λ/2)‖φ_k − θ‖²], θ differentiable."""
    theta = [t.detach().clone().requires_grad_() for t in theta]
    phi = list(theta)
    for _ in range(K):
        prox = sum(((p - t) ** 2).sum() for p, t in zip(phi, theta))
        loss = inner_loss(phi) + 0.5 * lam * prox
        grads = torch.autograd.grad(loss, phi, create_graph=True)
        phi = [p - lr * g for p, g in zip(phi, grads)]
    return flat(torch.autograd.grad(query_loss(phi), theta))


class Vector(nn.Module):
    """One parameter vector φ; calling the module returns φ."""

    def __init__(self, phi: torch.Tensor) -> None:
        super().__init__()
        self.phi = nn.Parameter(phi.detach().clone())

    def forward(self) -> torch.Tensor:
        return self.phi


def quadratic_closure(A, b):
    return lambda fmodel: 0.5 * fmodel() @ (A @ fmodel()) - b @ fmodel()


def linear_query(q):
    """``L_val(φ) = qᵀφ``: ``∇L_val = q`` exactly, wherever φ_K is."""
    return lambda fmodel: q @ fmodel()


# ============================================================================= 1. ridge closed form


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("solver,lam_over_ell", [("cg", 0.5), ("cg", 2.0), ("neumann", 2.0)])
def test_ridge_matches_closed_form(bias, solver, lam_over_ell):
    """φ_K → φ* and the meta-gradient → (I + A/λ)⁻¹ ∇L_val(φ*) to 1e-8. Measured: φ_K
    1e-16; meta-gradient 6e-16 (CG), 8e-13 (Neumann, which stops at tol = 1e-12).
    CG also with λ < ‖A‖, where the Neumann series would diverge."""
    problem = Ridge.make(seed=1, bias=bias)
    ell = problem.ell()
    lam = lam_over_ell * ell
    lr = 1.0 / (ell + lam)  # below 2/(ℓ + λ); contraction ≤ 1 − λ/(ℓ + λ) per step
    phi_star, g_star, _ = problem.closed_form(lam)
    g, phi, info, _ = run_package(problem.module(), problem.closure(), problem.query, K=300, lr=lr,
                                  estimator=mg.Implicit(reg=lam, solver=solver, max_iter=200,
                                                        tol=1e-12))
    assert rel(phi, phi_star) <= 1e-10
    assert rel(g, g_star) <= 1e-8, rel(g, g_star)
    assert info["converged"] is True and info["residual"] <= 1e-12
    assert info["solver"] == solver


def test_ridge_needs_a_converged_inner_loop():
    """The estimate is only as good as φ_K: after 2 inner steps it is far from the closed
    form, so the closed-form agreement above does depend on the inner loop."""
    problem = Ridge.make(seed=1)
    lam = problem.ell()
    _, g_star, _ = problem.closed_form(lam)
    g, _, _, _ = run_package(problem.module(), problem.closure(), problem.query, K=2,
                             lr=0.5 / (2 * lam), estimator=mg.Implicit(reg=lam, tol=1e-12))
    assert rel(g, g_star) > 1e-2


# ============================================================================= 2. full unrolling


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_ridge_matches_full_unroll(bias):
    """A hand-unrolled proximal inner loop (θ differentiable) gives the exact derivative of
    L_val(φ_K(θ)). At K = 200 (contraction ≤ 1/2 per step) it agrees with Implicit to
    1e-6 relative; measured 3.5e-16 (with bias) and 2.1e-16 (without), already at K = 50
    (1e-10 at K = 20). At K = 3 they differ by ≈ 1e-2; asserted > 1e-3."""
    problem = Ridge.make(seed=2, bias=bias)
    lam = problem.ell()
    lr = 1.0 / (problem.ell() + lam)
    estimator = mg.Implicit(reg=lam, solver="cg", max_iter=50, tol=1e-12)
    inner = lambda p: 0.5 * ((problem.forward(p, problem.X) - problem.Y) ** 2).mean()
    outer = lambda p: 0.5 * ((problem.forward(p, problem.Xq) - problem.Yq) ** 2).mean()

    g, _, _, _ = run_package(problem.module(), problem.closure(), problem.query, K=200, lr=lr,
                             estimator=estimator)
    unrolled = hand_unroll(problem.theta(), inner, outer, lam=lam, lr=lr, K=200)
    assert rel(g, unrolled) <= 1e-6, rel(g, unrolled)

    g3, _, _, _ = run_package(problem.module(), problem.closure(), problem.query, K=3, lr=lr,
                              estimator=estimator)
    unrolled3 = hand_unroll(problem.theta(), inner, outer, lam=lam, lr=lr, K=3)
    assert rel(g3, unrolled3) > 1e-3


def test_tanh_mlp_matches_full_unroll():
    """A tanh MLP (2-8-1, nonlinear inner loss), λ = 0.5, α = 0.3. Implicit against the
    hand-unrolled exact derivative: measured relative disagreement 2.3e-2 at K = 20,
    2.1e-5 at K = 100, 5.3e-9 at K = 200, 1.0e-12 at K = 400. Asserted: ≤ 1e-8 at K = 400;
    and at K = 20 the disagreement is above 1e-3 (so agreement is a property of the
    converged inner loop)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 2, generator=g, dtype=F64)
    Y = torch.sin(X.sum(1, keepdim=True))
    Xq = torch.randn(15, 2, generator=g, dtype=F64)
    Yq = torch.sin(Xq.sum(1, keepdim=True))
    shapes = [(8, 2), (8,), (1, 8), (1,)]
    theta = [0.7 * torch.randn(s, generator=g, dtype=F64) for s in shapes]

    def module():
        m = nn.Sequential(nn.Linear(2, 8, dtype=F64), nn.Tanh(), nn.Linear(8, 1, dtype=F64))
        with torch.no_grad():
            for p, t in zip(m.parameters(), theta):
                p.copy_(t)
        return m

    def forward(p, x):
        return F.linear(torch.tanh(F.linear(x, p[0], p[1])), p[2], p[3])

    mse = lambda out, y: 0.5 * ((out - y) ** 2).mean()
    lam, lr = 0.5, 0.3
    estimator = mg.Implicit(reg=lam, solver="cg", max_iter=100, tol=1e-12)
    errors = {}
    for K in (20, 400):
        got, _, info, _ = run_package(module(), lambda f: mse(f(X), Y), lambda f: mse(f(Xq), Yq),
                                      K=K, lr=lr, estimator=estimator)
        assert info["converged"]
        exact = hand_unroll(theta, lambda p: mse(forward(p, X), Y), lambda p: mse(forward(p, Xq), Yq),
                            lam=lam, lr=lr, K=K)
        errors[K] = rel(got, exact)
    assert errors[400] <= 1e-8, errors
    assert errors[20] > 1e-3, errors


# ============================================================================= 3. random SPD quadratics


def solve_quadratic(A, b, theta, c, *, lam, estimator, K=5):
    """Implicit on ``L_tr = ½φᵀAφ − bᵀφ`` and ``L_val = ½‖φ − c‖²``. Returns (x, v, info)
    with ``v = φ_K − c = ∇L_val(φ_K)`` computed here from the package's φ_K."""
    lr = 1.0 / (float(torch.linalg.eigvalsh(A).abs().max()) + lam)
    model = Vector(theta)
    x, phi, info, _ = run_package(model, quadratic_closure(A, b),
                                  lambda f: 0.5 * ((f() - c) ** 2).sum(), K=K, lr=lr,
                                  estimator=estimator)
    return x, phi - c, info


def true_residual(A, lam, x, v) -> float:
    """``‖(I + A/λ)x − v‖ / ‖v‖`` with the dense A."""
    return float((x + A @ x / lam - v).norm() / v.norm())


def dense_solve(A, lam, v):
    return torch.linalg.solve(torch.eye(A.shape[0], dtype=F64) + A / lam, v)


@st.composite
def spd_problems(draw, *, max_ratio: Optional[float] = None):
    """(A, b, θ, c, λ) with A SPD of a drawn spectrum. With ``max_ratio``, the spectrum is
    rescaled so that ‖A‖ = max_ratio·λ·(drawn factor in [0.05, 1])."""
    d = draw(st.integers(2, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    lam = draw(st.floats(0.1, 10.0))
    spectrum = draw(st.lists(st.floats(1e-2, 50.0), min_size=d, max_size=d))
    if max_ratio is not None:
        top = max(spectrum)
        scale = draw(st.floats(0.05, 1.0)) * max_ratio * lam / top
        spectrum = [s * scale for s in spectrum]
    g = torch.Generator().manual_seed(seed)
    A = with_spectrum(spectrum, g)
    b = torch.randn(d, generator=g, dtype=F64)
    theta = torch.randn(d, generator=g, dtype=F64)
    c = torch.randn(d, generator=g, dtype=F64)
    return A, b, theta, c, lam


@settings(max_examples=40)
@given(problem=spd_problems(), tol=st.sampled_from([1e-6, 1e-8, 1e-10]))
def test_cg_meets_its_tolerance_on_random_spd_quadratics(problem, tol):
    A, b, theta, c, lam = problem
    x, v, info = solve_quadratic(A, b, theta, c, lam=lam,
                                 estimator=mg.Implicit(reg=lam, solver="cg", max_iter=100, tol=tol))
    residual = true_residual(A, lam, x, v)
    assert info["converged"] is True
    assert residual <= tol + 1e-13, (residual, tol)
    assert abs(info["residual"] - residual) <= 1e-12
    # ‖x − x*‖ ≤ ‖(I + A/λ)⁻¹‖·residual·‖v‖ ≤ residual·‖v‖, since A ⪰ 0
    x_star = dense_solve(A, lam, v)
    assert float((x - x_star).norm()) <= (tol + 1e-13) * float(v.norm())
    assert info["iterations"] <= 100 and info["hessian_vector_products"] == info["iterations"] + 1


@settings(max_examples=40)
@given(problem=spd_problems(max_ratio=0.9), tol=st.sampled_from([1e-6, 1e-8, 1e-10]))
def test_neumann_agrees_with_cg_when_norm_below_reg(problem, tol):
    """With ‖A‖ ≤ 0.9λ the series converges (≤ 219 terms for tol = 1e-10); both solvers
    land within 2·tol of the dense solve, hence of each other."""
    A, b, theta, c, lam = problem
    assert float(torch.linalg.eigvalsh(A).max()) < lam
    x_n, v, info_n = solve_quadratic(A, b, theta, c, lam=lam,
                                     estimator=mg.Implicit(reg=lam, solver="neumann", max_iter=400,
                                                           tol=tol))
    x_c, v_c, info_c = solve_quadratic(A, b, theta, c, lam=lam,
                                       estimator=mg.Implicit(reg=lam, solver="cg", max_iter=100,
                                                             tol=tol))
    assert torch.equal(v, v_c)  # the same inner loop
    assert info_n["converged"] is True and info_c["converged"] is True
    assert true_residual(A, lam, x_n, v) <= tol + 1e-13
    assert info_n["hessian_vector_products"] == info_n["iterations"]
    x_star = dense_solve(A, lam, v)
    assert rel(x_n, x_star) <= 2 * tol + 1e-13
    assert rel(x_n, x_c) <= 4 * tol + 1e-13


# ============================================================================= 4. memory


@pytest.mark.parametrize("K", [1, 5, 50])
def test_no_per_step_state(K):
    """``meta._trajectory.stored`` is the trajectory's count of inner steps stored for
    rebuilding (private). Implicit stores none, whatever K; Checkpointed, for contrast,
    stores all K, so the counter does count."""
    problem = Ridge.make(seed=3)
    lam = problem.ell()
    for estimator, expected in ((mg.Implicit(reg=lam), 0), (mg.Checkpointed(), K)):
        with mg.MetaGradient(problem.module(), inner_opt=mg.optim.SGD(lr=0.5 / (2 * lam)),
                             estimator=estimator) as meta:
            for _ in range(K):
                meta.step(problem.closure())
                assert meta._trajectory.stored == min(expected, meta.steps)
            assert meta.steps == K
            assert meta._trajectory.stored == expected
            problem.query(meta.fmodel).backward()
            assert meta._trajectory.stored == expected


# ============================================================================= 5. failures


def rotated_diagonal(eigenvalues, seed=0):
    return with_spectrum(eigenvalues, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_unconverged_solve_warns_with_residual(solver):
    """max_iter=1 cannot reach tol=1e-14 on a spectrum {0.5, 1, 3}, λ = 4. The result is the
    one-iteration solution: for CG ``(bᵀb / bᵀ(I + A/λ)b)·b``, for Neumann the first term b."""
    A = rotated_diagonal([0.5, 1.0, 3.0])
    lam = 4.0
    q = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    model = Vector(torch.tensor([0.1, 0.2, 0.3], dtype=F64))
    with pytest.warns(mg.MetaGradientWarning, match=r"residual") as record:
        x, _, info, _ = run_package(model, quadratic_closure(A, torch.zeros(3, dtype=F64)),
                                    linear_query(q), K=3, lr=0.1,
                                    estimator=mg.Implicit(reg=lam, solver=solver, max_iter=1,
                                                          tol=1e-14))
    assert info["converged"] is False and info["iterations"] == 1
    message = " ".join(str(w.message) for w in record)
    assert f"{info['residual']:.3g}" in message
    assert "tol" in message
    M = torch.eye(3, dtype=F64) + A / lam
    expected = (q @ q) / (q @ M @ q) * q if solver == "cg" else q
    assert rel(x, expected) <= 1e-12
    assert abs(info["residual"] - true_residual(A, lam, x, q)) <= 1e-12
    assert info["residual"] > 1e-3




@pytest.mark.parametrize("weights", [[1.0, 1.0, 1e-3], [0.0, 0.0, 1.0]],
                         ids=["grows-late", "grows-at-once"])
def test_diverging_neumann_is_detected_and_returns_best_partial_sum(weights):
    """Spectrum {0.2, 0.3, 2.5} with λ = 1 (‖A‖/λ = 2.5): the series diverges along the top
    eigenvector. The warning names ‖H‖/λ, converged is False, and x is the partial sum with
    the smallest residual (dense reference over the first 80 sums), whose residual is at most
    that of the first term b. When b lies along the top eigenvector the best sum is 0."""
    eigenvalues = [0.2, 0.3, 2.5]
    g = torch.Generator().manual_seed(4)
    Q = random_orthogonal(3, g)
    A = Q @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ Q.T
    A = 0.5 * (A + A.T)
    lam = 1.0
    q = Q @ torch.tensor(weights, dtype=F64)
    model = Vector(torch.tensor([0.1, 0.2, 0.3], dtype=F64))
    with pytest.warns(mg.MetaGradientWarning, match="‖H‖/λ") as record:
        x, _, info, _ = run_package(model, quadratic_closure(A, torch.zeros(3, dtype=F64)),
                                    linear_query(q), K=2, lr=0.1,
                                    estimator=mg.Implicit(reg=lam, solver="neumann", max_iter=200,
                                                          tol=1e-12))
    assert info["converged"] is False
    assert any("diverg" in str(w.message) for w in record)
    residual = true_residual(A, lam, x, q)
    assert math.isfinite(residual)
    assert residual <= true_residual(A, lam, q, q)  # no worse than the first term alone
    sums = ref.neumann_partial_sums(A, lam, q, 80)
    residuals = [true_residual(A, lam, s, q) for s in sums]
    best = min(range(len(sums)), key=residuals.__getitem__)
    assert float((x - sums[best]).norm()) <= 1e-12 * float(q.norm())
    assert abs(info["residual"] - residuals[best]) <= 1e-12
    if weights[0] == 0.0:
        assert best == 0 and float(x.norm()) <= 1e-12
    else:
        assert residual < 0.05


class TwoVectors(nn.Module):
    """Two parameter vectors; calling the module returns their sum."""

    def __init__(self, phi: torch.Tensor, psi: torch.Tensor) -> None:
        super().__init__()
        self.phi = nn.Parameter(phi.detach().clone())
        self.psi = nn.Parameter(psi.detach().clone())

    def forward(self) -> torch.Tensor:
        return self.phi + self.psi


@pytest.mark.parametrize("initial_grad", [None, "known"])
def test_cg_negative_curvature_raises_and_leaves_the_model(initial_grad):
    """H = diag(−3, 1, 2) (rotated), λ = 1: I + H/λ has the eigenvalue −2, and the query
    gradient points mostly along it, so CG meets negative curvature at its first iteration.
    The error propagates out of backward and out of the block. Inside the block a first
    backward (a penalty on θ itself) has already accumulated into ``.grad``; after the error
    every ``.grad`` is what it was before the block (None, or the known tensors set there),
    and the module holds the same Parameter objects with the same values."""
    g = torch.Generator().manual_seed(5)
    Q = random_orthogonal(3, g)
    A = Q @ torch.diag(torch.tensor([-3.0, 1.0, 2.0], dtype=F64)) @ Q.T
    A = 0.5 * (A + A.T)
    q = Q @ torch.tensor([1.0, 0.1, 0.1], dtype=F64)
    model = TwoVectors(torch.tensor([0.3, -0.2, 0.5], dtype=F64), torch.tensor([0.1, 0.4, -0.6], dtype=F64))
    params = dict(model.named_parameters())
    values = {n: p.detach().clone() for n, p in params.items()}
    known = {"phi": torch.tensor([0.5, -1.5, 2.0], dtype=F64), "psi": torch.tensor([-0.25, 3.0, 0.75], dtype=F64)}
    if initial_grad == "known":
        for n, p in params.items():
            p.grad = known[n].clone()
    with pytest.raises(mg.NegativeCurvatureError, match=r"not positive definite") as excinfo:
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.05),
                             estimator=mg.Implicit(reg=1.0, solver="cg")) as meta:
            for _ in range(3):
                meta.step(quadratic_closure(A, torch.zeros(3, dtype=F64)))
            with pytest.warns(mg.MetaGradientWarning, match="not through the inner loop"):
                (model.phi ** 2).sum().backward()  # accumulates 2φ into phi.grad inside the block
            assert model.psi.grad is None or torch.equal(model.psi.grad, known["psi"])
            assert not torch.equal(model.phi.grad, known["phi"] if initial_grad else torch.zeros(3, dtype=F64))
            linear_query(q)(meta.fmodel).backward()
    message = str(excinfo.value)
    assert "reg" in message and "eigenvalue" in message
    assert [n for n, _ in model.named_parameters()] == list(params)
    assert all(model.get_parameter(n) is p for n, p in params.items())  # the same objects
    assert all(type(p) is nn.Parameter and p.requires_grad for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), values[n]), n
        if initial_grad is None:
            assert p.grad is None, n
        else:
            assert p.grad is not None and torch.equal(p.grad, known[n]), n


def test_neumann_on_indefinite_hessian_with_small_norm_is_fine():
    """Neumann only needs ‖H‖ < λ, not H ⪰ 0: spectrum {−0.6, 0.2, 0.7}, λ = 1."""
    A = rotated_diagonal([-0.6, 0.2, 0.7], seed=6)
    q = torch.tensor([0.3, -1.0, 2.0], dtype=F64)
    x, _, info, _ = run_package(Vector(torch.zeros(3, dtype=F64)),
                                quadratic_closure(A, torch.ones(3, dtype=F64)), linear_query(q),
                                K=4, lr=0.1,
                                estimator=mg.Implicit(reg=1.0, solver="neumann", max_iter=200,
                                                      tol=1e-12))
    assert info["converged"] is True
    assert rel(x, dense_solve(A, 1.0, q)) <= 1e-11


# ============================================================================= 6. bad input


@pytest.mark.parametrize("kwargs,error,name", [
    ({"reg": 0}, ValueError, "reg"),
    ({"reg": 0.0}, ValueError, "reg"),
    ({"reg": -1}, ValueError, "reg"),
    ({"reg": float("nan")}, ValueError, "reg"),
    ({"reg": float("inf")}, ValueError, "reg"),
    ({"reg": "a"}, TypeError, "reg"),
    ({"reg": True}, TypeError, "reg"),
    ({"max_iter": 0}, ValueError, "max_iter"),
    ({"max_iter": -3}, ValueError, "max_iter"),
    ({"max_iter": 1.5}, TypeError, "max_iter"),
    ({"tol": 0}, ValueError, "tol"),
    ({"tol": -1}, ValueError, "tol"),
    ({"tol": float("nan")}, ValueError, "tol"),
    ({"tol": "small"}, TypeError, "tol"),
    ({"solver": "lu"}, ValueError, "solver"),
], ids=lambda p: repr(p) if isinstance(p, dict) else None)
def test_bad_arguments_raise_naming_the_argument(kwargs, error, name):
    with pytest.raises(error, match=rf"\b{name}\b"):
        mg.Implicit(**kwargs)


# ============================================================================= 7. info, names, losses


def test_info_after_backward():
    problem = Ridge.make(seed=7)
    lam = problem.ell()
    _, _, info, _ = run_package(problem.module(), problem.closure(), problem.query, K=20,
                                lr=1.0 / (2 * lam),
                                estimator=mg.Implicit(reg=lam, solver="cg", max_iter=30, tol=1e-9))
    for key in ("solver", "iterations", "residual", "converged", "hessian_vector_products"):
        assert key in info, key
    assert info["solver"] == "cg"
    assert isinstance(info["iterations"], int) and 1 <= info["iterations"] <= 30
    assert 0.0 <= info["residual"] <= 1e-9
    assert info["converged"] is True
    assert info["hessian_vector_products"] == info["iterations"] + 1
    assert info["reg"] == lam and info["steps"] == 20
    assert "Implicit" in info["estimator"]


@pytest.mark.parametrize("tasks", [None, 2])
def test_stationarity_says_how_far_the_inner_loop_is_from_the_fixed_point(tasks):
    """``meta.info["stationarity"]`` is ``‖r‖ / (‖∇L_tr(φ_K)‖ + λ‖φ_K − θ‖)`` with
    ``r = ∇L_tr(φ_K) + λ(φ_K − θ)``, computed here by hand from φ_K: near 1 after one small
    step, near 0 once the proximal loop has converged (where the implicit formula holds); one
    number per task over tasks."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(tasks or 1, 12, 2, generator=g, dtype=F64), torch.randn(tasks or 1, 12, 1, generator=g, dtype=F64)
    lam = 2.0
    for K, lr, near in ((1, 0.02, (0.8, 1.0)), (150, 0.3, (0.0, 1e-6))):
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(2, 6, dtype=F64), nn.Tanh(), nn.Linear(6, 1, dtype=F64))
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=mg.Implicit(reg=lam, tol=1e-10),
                             tasks=tasks) as meta:
            for _ in range(K):
                if tasks:
                    meta.step(lambda f, a, b: F.mse_loss(f(a), b), x, y)
                else:
                    meta.step(lambda f: F.mse_loss(f(x[0]), y[0]))
            phi = {n: t.detach() for n, t in meta.fmodel.params.items()}
            (F.mse_loss(meta.fmodel(x), y) if tasks else F.mse_loss(meta.fmodel(x[0]), y[0])).backward()
        got = meta.info["stationarity"] if tasks else [meta.info["stationarity"]]
        for t in range(tasks or 1):
            leaves = {n: (p[t] if tasks else p).clone().requires_grad_() for n, p in phi.items()}
            grads = torch.autograd.grad(F.mse_loss(torch.func.functional_call(model, leaves, (x[t],)), y[t]),
                                        list(leaves.values()))
            pull = [lam * (leaves[n].detach() - p.detach()) for n, p in model.named_parameters()]
            r = flat([a + b for a, b in zip(grads, pull)]).norm()
            want = float(r / (flat(grads).norm() + flat(pull).norm()))
            assert got[t] == pytest.approx(want, rel=1e-8, abs=1e-12), (K, t)
            assert near[0] <= got[t] <= near[1], (K, got)


def test_estimator_by_name():
    """``estimator="implicit"`` is Implicit(reg=1.0, solver="cg", max_iter=50, tol=1e-6);
    it matches the λ = 1 closed form to the accuracy its tol allows."""
    problem = Ridge.make(seed=8)
    lr = 1.0 / (problem.ell() + 1.0)
    model = problem.module()
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator="implicit") as meta:
        assert isinstance(meta.estimator, mg.Implicit)
        assert meta.estimator.reg == 1.0 and meta.estimator.solver == "cg"
        for _ in range(300):
            meta.step(problem.closure())
        problem.query(meta.fmodel).backward()
    _, g_star, _ = problem.closed_form(1.0)
    assert meta.info["solver"] == "cg" and meta.info["converged"] is True
    assert meta.info["reg"] == 1.0
    assert rel(grads_of(model), g_star) <= 1e-5


def test_step_returns_inner_loss_without_proximal_term():
    """meta.step returns L_tr(φ_k), evaluated here by hand at φ_k read from meta.fmodel
    before the step; the proximal term (λ/2)‖φ_k − θ‖² is not in it (and is not negligible)."""
    problem = Ridge.make(seed=9)
    lam = 3.0
    theta = flat(problem.theta())
    model = problem.module()
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.05),
                         estimator=mg.Implicit(reg=lam)) as meta:
        for k in range(6):
            phi = [t.detach().clone() for t in meta.fmodel.params.values()]
            expected = 0.5 * ((problem.forward(phi, problem.X) - problem.Y) ** 2).mean()
            prox = 0.5 * lam * float(((flat(phi) - theta) ** 2).sum())
            loss = meta.step(problem.closure())
            assert not loss.requires_grad
            assert abs(float(loss) - float(expected)) <= 1e-14 * max(1.0, float(expected))
            if k > 0:
                assert prox > 1e-4
        problem.query(meta.fmodel).backward()


def test_proximal_term_pulls_towards_theta():
    """The inner loop minimizes L_tr + (λ/2)‖φ − θ‖², not L_tr: with a huge λ the fast
    weights stay at θ (φ* − θ = (A + λI)⁻¹(c − Aθ) = O(1/λ))."""
    problem = Ridge.make(seed=10)
    lam = 1e4
    phi_star, _, _ = problem.closed_form(lam)
    _, phi, _, _ = run_package(problem.module(), problem.closure(), problem.query, K=50,
                               lr=1.0 / (problem.ell() + lam),
                               estimator=mg.Implicit(reg=lam, tol=1e-10))
    theta = flat(problem.theta())
    assert rel(phi, phi_star) <= 1e-8
    assert float((phi - theta).norm()) <= 1e-2 * float(theta.norm())


def test_grad_accumulates():
    """The meta-gradient is accumulated into .grad, as by any backward."""
    problem = Ridge.make(seed=11)
    lam = problem.ell()
    lr = 1.0 / (2 * lam)
    est = mg.Implicit(reg=lam, tol=1e-12)
    model = problem.module()
    g1, _, _, _ = run_package(model, problem.closure(), problem.query, K=100, lr=lr, estimator=est)
    g2, _, _, _ = run_package(model, problem.closure(), problem.query, K=100, lr=lr, estimator=est)
    assert rel(g2, 2 * g1) <= 1e-12


# ============================================================================= 8. float32


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_float32_matches_float64_closed_form(solver):
    """Implicit in float32 on the ridge problem against the float64 closed form: 1e-4
    relative. Measured 1.1e-7 (CG, 5 iterations) and 4.4e-6 (Neumann, tol = 1e-5)."""
    problem64 = Ridge.make(seed=12)
    problem32 = Ridge.make(seed=12, dtype=torch.float32)
    ell = problem64.ell()
    lam = 2.0 * ell
    _, g_star, _ = problem64.closed_form(lam)
    model = problem32.module()
    g, _, info, _ = run_package(model, problem32.closure(), problem32.query, K=300,
                                lr=1.0 / (ell + lam),
                                estimator=mg.Implicit(reg=lam, solver=solver, max_iter=100,
                                                      tol=1e-5))
    assert g.dtype == torch.float32
    assert info["converged"] is True
    assert rel(g, g_star) <= 1e-4, rel(g, g_star)
