"""The error bounds of MATH.md ("Error bounds", the paper's Theorems 3.6 and 3.8).

With ``x = αℓ`` and ``ℓ ≥ ‖H_k‖`` for every k:

- Binomial(L):  ‖ĝ_L − g‖ ≤ Σ_{l=L+1}^{K} C(K,l) x^l ‖v‖
- Truncated(T): ‖ĝ − g‖ ≤ [(1+x)^K − (1+x)^T] ‖v‖
- FirstOrder:   ‖v − g‖ ≤ [(1+x)^K − 1] ‖v‖
- convex (0 ⪯ H_k ⪯ ℓI, x ≤ 1): ‖ĝ_L − g‖ ≤ C(K, L+1) x^{L+1} ‖v‖

``g`` and ``v`` come from the reference unroll; ĝ from the package. On quadratics
``L_tr(φ) = ½φᵀAφ − bᵀφ`` every ``H_k = A`` (or ``A_k`` when the inner loss changes
along the steps), and ℓ = max |eig(A_k)|. The only slack is for rounding.
"""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import metagrad as mg

from ._package import meta_gradient, ref

ROUNDING = 1e-12


def _norm(t):
    return float(torch.linalg.vector_norm(t))


def _check_general_bounds(problem, K, lr, x):
    """Every general bound, for every L (and T) in 0 … K. The rounding slack is
    1e-12 · (1+x)^K ‖v‖: (1+x)^K ‖v‖ bounds ‖g‖, ‖ĝ‖ and every partial product, so it
    is the scale of their rounding error; it exceeds 1e-12‖v‖ only where x is large,
    and there every bound with L < K is far larger than it."""
    run = ref.unroll(problem, K, lr)
    nv = _norm(run.v)
    slack = ROUNDING * (1 + x) ** K * nv
    first, _ = meta_gradient(problem, mg.FirstOrder(), K, lr)
    assert _norm(first - run.g) <= ref.first_order_bound(K, x) * nv + slack
    for L in range(K + 1):
        binomial, _ = meta_gradient(problem, mg.Binomial(L), K, lr)
        error = _norm(binomial - run.g)
        assert error <= ref.binomial_bound(K, L, x) * nv + slack, (L, K, x, error / nv)
        truncated, _ = meta_gradient(problem, mg.Truncated(L), K, lr)
        error = _norm(truncated - run.g)
        assert error <= ref.truncated_bound(K, L, x) * nv + slack, (L, K, x, error / nv)


@settings(max_examples=80)
@given(spec=ref.problem_specs(kinds=("quadratic",)), K=st.sampled_from(range(1, 9)),
       x=st.floats(0.001, 2.0), per_param=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_general_bounds_on_quadratics(spec, K, x, per_param, seed):
    """A symmetric, possibly indefinite; one A for all steps, or A_k changing along
    them. With per-parameter step sizes D (entries ≤ α), ‖H_k D‖ ≤ αℓ still."""
    problem = ref.build(spec)
    ell = problem.ell()
    alpha = x / ell
    lr = ref.step_sizes(problem, alpha, ("full",) if per_param else None, seed)
    x = lr.max * ell
    _check_general_bounds(problem, K, lr, x)


@settings(max_examples=25)
@given(spec=ref.problem_specs(kinds=("mlp",)), K=st.sampled_from(range(1, 7)), lr=ref.step_size_choices())
def test_general_bounds_on_mlps(spec, K, lr):
    """The general bounds need only ‖H_k‖ ≤ ℓ along the trajectory: on MLPs, ℓ is
    the largest ‖H_k‖₂ of the reference's dense Hessians, x = ℓ·max(step size)."""
    problem = ref.build(spec)
    lr = ref.make_step_sizes(problem, lr)
    run = ref.unroll(problem, K, lr)
    ell = max(float(torch.linalg.matrix_norm(H, 2)) for H in ref.hessians(run))
    _check_general_bounds(problem, K, lr, lr.max * ell)


@settings(max_examples=100)
@given(spec=ref.problem_specs(kinds=("quadratic",), psd=True), K=st.sampled_from(range(1, 9)),
       x=st.one_of(st.floats(0.001, 1.0), st.just(1.0)))
def test_convex_bound_on_psd_quadratics(spec, K, x):
    """0 ⪯ A_k ⪯ ℓI and αℓ ≤ 1: ‖ĝ_L − g‖ ≤ C(K, L+1)(αℓ)^{L+1} ‖v‖ for every L."""
    problem = ref.build(spec)
    for A in problem.As:
        assert float(torch.linalg.eigvalsh(A).min()) >= -1e-12 * problem.ell()
    alpha = x / problem.ell()
    lr = ref.step_sizes(problem, alpha)
    run = ref.unroll(problem, K, lr)
    nv = _norm(run.v)
    for L in range(K + 1):
        g, _ = meta_gradient(problem, mg.Binomial(L), K, lr)
        error = _norm(g - run.g)
        assert error <= ref.convex_bound(K, L, x) * nv + ROUNDING * nv, (L, K, x, error / nv)


def test_convex_bound_is_attained_at_L_equal_K_minus_1():
    """The convex bound is tight: with A = I·ℓ and L = K−1 the error is x^K ‖v‖."""
    d, K, x = 3, 4, 0.5
    problem = ref.QuadraticProblem(torch.ones(d, dtype=torch.float64), [torch.eye(d, dtype=torch.float64)],
                                   [torch.zeros(d, dtype=torch.float64)], M=torch.eye(d, dtype=torch.float64),
                                   c=torch.full((d,), 3.0, dtype=torch.float64))
    lr = ref.step_sizes(problem, x)
    run = ref.unroll(problem, K, lr)
    g, _ = meta_gradient(problem, mg.Binomial(K - 1), K, lr)
    error = _norm(g - run.g)
    bound = ref.convex_bound(K, K - 1, x) * _norm(run.v)
    assert math.isclose(error, bound, rel_tol=1e-12)


def test_bound_formulas():
    """The closed forms against their definitions on a few values."""
    K, x = 5, 0.3
    assert ref.binomial_bound(K, 0, x) == sum(math.comb(K, l) * x ** l for l in range(1, 6))
    assert math.isclose(ref.binomial_bound(K, 0, x), ref.first_order_bound(K, x), rel_tol=1e-14)
    assert ref.binomial_bound(K, K, x) == 0
    assert ref.truncated_bound(K, K, x) == 0
    assert ref.convex_bound(K, K, x) == 0
    for L in range(K):
        assert ref.convex_bound(K, L, x) <= ref.binomial_bound(K, L, x)
        assert ref.binomial_bound(K, L, x) <= ref.truncated_bound(K, L, x) + 1e-15
