"""metagrad.linalg: matrix-free solves of (I + H/λ) x = b over name→tensor mappings.

Every reference is dense plain torch: the operator is a dense symmetric H applied to the
flattened mapping, the exact solution is ``torch.linalg.solve``, residuals are computed
here from H, and Neumann partial sums are formed by explicit dense products.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import metagrad as mg
from metagrad.linalg import NegativeCurvatureError, SolveInfo, conjugate_gradient, neumann_series

try:
    import reference as ref
except ImportError:  # tests/ made a package
    from tests import reference as ref

F64 = torch.float64


# ============================================================================= helpers


class DenseOperator:
    """``u ↦ H u`` on a mapping {"a": (m, 1), "b": (d − m,)}, counting its calls."""

    def __init__(self, H: torch.Tensor, split: int) -> None:
        self.H = H
        self.split = split
        self.calls = 0

    def pack(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": vector[:self.split].reshape(self.split, 1).clone(),
                "b": vector[self.split:].clone()}

    @staticmethod
    def unpack(params) -> torch.Tensor:
        return torch.cat([params["a"].reshape(-1), params["b"].reshape(-1)])

    def __call__(self, u):
        self.calls += 1
        assert set(u) == {"a", "b"} and u["a"].shape == (self.split, 1)
        return self.pack(self.H @ self.unpack(u))


def symmetric(eigenvalues, seed: int) -> torch.Tensor:
    """``Q diag(eigenvalues) Qᵀ`` with a random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.as_tensor(eigenvalues, dtype=F64)
    Q, R = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=g, dtype=F64))
    Q = Q * torch.sign(torch.diagonal(R))
    H = Q @ torch.diag(lam) @ Q.T
    return 0.5 * (H + H.T)


def system(H: torch.Tensor, reg: float) -> torch.Tensor:
    return torch.eye(H.shape[0], dtype=F64) + H / reg


def residual(H, reg, x, b) -> float:
    """``‖(I + H/λ)x − b‖ / ‖b‖`` with the dense H."""
    return float((system(H, reg) @ x - b).norm() / b.norm())




@st.composite
def dense_problems(draw, *, low, high, min_d=2, max_d=10, min_abs=0.0):
    """(H, b, λ, split): H symmetric with eigenvalues drawn in [low·λ, high·λ], each of
    magnitude at least ``min_abs``·λ."""
    d = draw(st.integers(min_d, max_d))
    reg = draw(st.floats(0.1, 10.0))
    ratio = st.floats(low, high).filter(lambda r: abs(r) >= min_abs)
    ratios = draw(st.lists(ratio, min_size=d, max_size=d))
    seed = draw(st.integers(0, 2**31 - 1))
    split = draw(st.integers(1, d - 1))
    H = symmetric([r * reg for r in ratios], seed)
    b = torch.randn(d, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    return H, b, reg, split


TOLS = st.sampled_from([1e-6, 1e-8, 1e-10, 1e-12])


# ============================================================================= conjugate gradients


@settings(max_examples=60)
@given(problem=dense_problems(low=-0.9, high=50.0), tol=TOLS)
def test_cg_reaches_tol_on_positive_definite_systems(problem, tol):
    """H symmetric, possibly indefinite, with H ⪰ −0.9λ: I + H/λ is SPD (cond ≤ 5e3)."""
    H, b, reg, split = problem
    op = DenseOperator(H, split)
    max_iter = 10 * H.shape[0] + 20
    x, info = conjugate_gradient(op, op.pack(b), reg=reg, max_iter=max_iter, tol=tol)
    assert isinstance(info, SolveInfo)
    assert set(x) == {"a", "b"} and x["a"].shape == (split, 1)
    x = op.unpack(x)
    true = residual(H, reg, x, b)
    assert info.converged is True and info.diverged is False
    assert true <= tol + 1e-13, (true, tol)
    assert abs(info.residual - true) <= 1e-13
    assert 1 <= info.iterations <= max_iter
    assert info.products == info.iterations + 1 == op.calls
    # ‖x − x*‖ ≤ ‖(I + H/λ)⁻¹‖ · ‖residual‖
    A = system(H, reg)
    x_star = torch.linalg.solve(A, b)
    inverse_norm = 1.0 / float(torch.linalg.eigvalsh(A).min())
    assert float((x - x_star).norm()) <= inverse_norm * (tol + 1e-13) * float(b.norm())


def krylov_minimizer(A: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """The x in span{b, Ab, …, A^{k−1}b} that minimizes ‖x − A⁻¹b‖_A (A SPD), by a dense
    projected solve: what k iterations of CG from x = 0 return, in exact arithmetic."""
    columns, u = [], b
    for _ in range(k):
        columns.append(u / u.norm())
        u = A @ columns[-1]
    V, _ = torch.linalg.qr(torch.stack(columns, dim=1))
    return V @ torch.linalg.solve(V.T @ A @ V, V.T @ b)


@settings(max_examples=40)
@given(problem=dense_problems(low=0.0, high=20.0, min_d=3), max_iter=st.integers(1, 2))
def test_cg_reports_the_true_residual_when_stopped_early(problem, max_iter):
    """Stopped by max_iter, CG reports the residual of the x it returns (recomputed here
    from the dense system, not the recursion's), converged is exactly ``residual ≤ tol``,
    it ran to the limit unless it converged, and x is the CG iterate: not the zero start,
    but the Krylov-subspace minimizer for that many iterations."""
    H, b, reg, split = problem
    op = DenseOperator(H, split)
    tol = 1e-14
    x, info = conjugate_gradient(op, op.pack(b), reg=reg, max_iter=max_iter, tol=tol)
    x = op.unpack(x)
    A = system(H, reg)
    true = float((A @ x - b).norm() / b.norm())
    assert abs(info.residual - true) <= 1e-13
    assert info.converged == (info.residual <= tol)
    assert info.iterations == max_iter or (info.converged and 1 <= info.iterations < max_iter)
    assert info.products == info.iterations + 1 == op.calls
    assert float(x.norm()) > 0.0
    x_star = torch.linalg.solve(A, b)
    expected = krylov_minimizer(A, b, info.iterations)
    assert float((x - expected).norm()) <= 1e-9 * float(x_star.norm()), (info.iterations, true)


def test_cg_one_iteration_is_the_steepest_descent_step():
    H = symmetric([0.5, 2.0, 7.0, 11.0], seed=1)
    b = torch.tensor([1.0, -0.5, 2.0, 0.25], dtype=F64)
    op = DenseOperator(H, 2)
    x, info = conjugate_gradient(op, op.pack(b), reg=3.0, max_iter=1, tol=1e-14)
    A = system(H, 3.0)
    expected = (b @ b) / (b @ A @ b) * b
    assert torch.allclose(op.unpack(x), expected, rtol=1e-13, atol=0)
    assert info.iterations == 1 and info.converged is False


def test_cg_converges_in_as_many_iterations_as_distinct_eigenvalues():
    """Three distinct eigenvalues: CG (in exact arithmetic) converges in three iterations."""
    H = symmetric([1.0, 4.0, 9.0, 9.0, 1.0], seed=2)
    b = torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=F64)
    op = DenseOperator(H, 2)
    x, info = conjugate_gradient(op, op.pack(b), reg=2.0, max_iter=50, tol=1e-12)
    assert info.converged and info.iterations <= 4
    assert torch.allclose(op.unpack(x), torch.linalg.solve(system(H, 2.0), b), rtol=1e-11, atol=0)


def test_cg_zero_right_hand_side():
    op = DenseOperator(symmetric([1.0, 2.0, 3.0], seed=4), 1)
    x, info = conjugate_gradient(op, op.pack(torch.zeros(3, dtype=F64)), reg=1.0, max_iter=10,
                                 tol=1e-8)
    assert float(op.unpack(x).abs().max()) == 0.0
    assert info.converged is True and info.residual == 0.0
    assert info.products == 0 and op.calls == 0


@pytest.mark.parametrize("reg", [0.5, 2.0])
def test_cg_negative_curvature_raises(reg):
    """An eigenvalue −3·reg < −reg, b along its eigenvector: pᵀ(I + H/λ)p < 0 at once."""
    eigenvalues = torch.tensor([-3.0 * reg, reg, 2.0 * reg], dtype=F64)
    g = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=F64))
    H = Q @ torch.diag(eigenvalues) @ Q.T
    H = 0.5 * (H + H.T)
    b = Q @ torch.tensor([1.0, 0.1, 0.1], dtype=F64)
    op = DenseOperator(H, 1)
    with pytest.raises(NegativeCurvatureError, match="not positive definite") as excinfo:
        conjugate_gradient(op, op.pack(b), reg=reg, max_iter=20, tol=1e-10)
    assert "iteration 1" in str(excinfo.value)
    assert issubclass(NegativeCurvatureError, ArithmeticError)
    assert mg.NegativeCurvatureError is NegativeCurvatureError


def test_cg_nan_product_raises_instead_of_returning_nan():
    b = {"a": torch.ones(2, 1, dtype=F64), "b": torch.ones(1, dtype=F64)}
    nan_hvp = lambda u: {n: torch.full_like(t, math.nan) for n, t in u.items()}
    with pytest.raises(NegativeCurvatureError):
        conjugate_gradient(nan_hvp, b, reg=1.0, max_iter=5, tol=1e-8)


# ============================================================================= Neumann series


@settings(max_examples=60)
@given(problem=dense_problems(low=-0.9, high=0.9), tol=TOLS)
def test_neumann_converges_when_norm_below_reg(problem, tol):
    """‖H‖ ≤ 0.9λ (H possibly indefinite): the series meets tol within 263 terms; its
    residual is exact (the next term), and it agrees with the dense solve and with CG."""
    H, b, reg, split = problem
    op = DenseOperator(H, split)
    x, info = neumann_series(op, op.pack(b), reg=reg, max_iter=400, tol=tol)
    x = op.unpack(x)
    true = residual(H, reg, x, b)
    assert info.converged is True and info.diverged is False
    assert true <= tol + 1e-13
    assert abs(info.residual - true) <= 1e-13
    assert info.products == info.iterations == op.calls
    # ‖(I + H/λ)⁻¹‖ ≤ 1/(1 − 0.9) = 10
    x_star = torch.linalg.solve(system(H, reg), b)
    assert float((x - x_star).norm()) <= 10 * (tol + 1e-13) * float(b.norm())
    # and with conjugate gradients, where both apply
    op_cg = DenseOperator(H, split)
    x_cg, _ = conjugate_gradient(op_cg, op_cg.pack(b), reg=reg, max_iter=100, tol=tol)
    assert float((x - op_cg.unpack(x_cg)).norm()) <= 20 * (tol + 1e-13) * float(b.norm())


@settings(max_examples=40)
@given(problem=dense_problems(low=-0.9, high=0.9, min_abs=0.05), max_iter=st.integers(1, 6))
def test_neumann_stopped_by_max_iter_is_the_partial_sum(problem, max_iter):
    """|eigenvalues| in [0.05λ, 0.9λ]. With max_iter = N and a tol it cannot meet, x = Σ_{n<N} (−H/λ)^n b (N terms, N
    products) and the residual is ‖(H/λ)^N b‖/‖b‖."""
    H, b, reg, split = problem
    op = DenseOperator(H, split)
    x, info = neumann_series(op, op.pack(b), reg=reg, max_iter=max_iter, tol=1e-300)
    expected = ref.neumann_partial_sums(H, reg, b, max_iter)[-1]
    assert torch.allclose(op.unpack(x), expected, rtol=1e-12, atol=1e-14)
    assert info.iterations == info.products == op.calls == max_iter
    assert info.converged is False and info.diverged is False
    assert abs(info.residual - residual(H, reg, expected, b)) <= 1e-13


@settings(max_examples=60)
@given(problem=dense_problems(low=-3.0, high=3.0), data=st.data())
def test_neumann_divergence_returns_best_partial_sum(problem, data):
    """An eigenvalue with |μ| ≥ 1.2λ: the terms eventually grow, which is detected;
    x is the partial sum before the last term, whose residual is the smallest of all partial
    sums (dense reference, S_{−1} = 0 included), and no worse than 0 or b alone."""
    H, b, reg, split = problem
    d = H.shape[0]
    big = data.draw(st.floats(1.2, 4.0)) * data.draw(st.sampled_from([-1.0, 1.0])) * reg
    eigenvalues, Q = torch.linalg.eigh(H)
    eigenvalues[data.draw(st.integers(0, d - 1))] = big
    H = Q @ torch.diag(eigenvalues) @ Q.T
    H = 0.5 * (H + H.T)
    op = DenseOperator(H, split)
    x, info = neumann_series(op, op.pack(b), reg=reg, max_iter=500, tol=1e-12)
    x = op.unpack(x)
    assert info.diverged is True and info.converged is False
    assert info.products == info.iterations == op.calls
    sums = ref.neumann_partial_sums(H, reg, b, info.iterations + 5)
    residuals = [residual(H, reg, s, b) for s in sums]
    # the documented choice: S_{i−2} when the i-th term is the first to grow
    assert torch.allclose(x, sums[info.iterations - 1], rtol=1e-12, atol=1e-13 * float(b.norm()))
    true = residual(H, reg, x, b)
    assert abs(info.residual - true) <= 1e-12
    assert true <= min(residuals) * (1 + 1e-9) + 1e-15
    assert true <= 1.0 + 1e-12 and true <= residual(H, reg, b, b) + 1e-12


def test_neumann_divergence_at_the_first_term_returns_zero():
    H = symmetric([0.1, 5.0], seed=6)
    _, Q = torch.linalg.eigh(H)
    b = Q[:, 1].clone()  # the eigenvector of 5.0: ‖(H/λ) b‖ = 5‖b‖
    op = DenseOperator(H, 1)
    x, info = neumann_series(op, op.pack(b), reg=1.0, max_iter=50, tol=1e-10)
    assert float(op.unpack(x).norm()) == 0.0
    assert info.diverged is True and info.residual == pytest.approx(1.0, rel=1e-12)


def test_neumann_zero_right_hand_side():
    op = DenseOperator(symmetric([1.0, 2.0, 3.0], seed=7), 2)
    x, info = neumann_series(op, op.pack(torch.zeros(3, dtype=F64)), reg=10.0, max_iter=10,
                             tol=1e-8)
    assert float(op.unpack(x).abs().max()) == 0.0
    assert info.converged is True and info.products == 0 and op.calls == 0


def test_solvers_do_not_modify_their_inputs():
    H = symmetric([0.3, 0.5, 0.8], seed=8)
    b = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    for solver in (conjugate_gradient, neumann_series):
        op = DenseOperator(H, 1)
        rhs = op.pack(b)
        saved = {n: t.clone() for n, t in rhs.items()}
        solver(op, rhs, reg=1.0, max_iter=100, tol=1e-12)
        assert all(torch.equal(rhs[n], saved[n]) for n in rhs)
