"""Binomial(L): MATH.md (2), the expansion of (1) truncated at order L.

Checked against an explicit subset sum over ``k_1 < … < k_l`` with dense factors
``B_k = J_kᵀ − I = −H_k D`` (every L in 0 … K, K ≤ 6), chunked against unchunked,
the identities Binomial(K) = Full and Binomial(0) = FirstOrder, the binomial theorem
on quadratics, and the 1-40-40-1 ReLU sinusoid net of MATH.md.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import metagrad as mg

from ._package import RTOL, meta_gradient, ref


@settings(max_examples=60)
@given(spec=ref.problem_specs(max_K=6), K=st.sampled_from(range(1, 7)), lr=ref.step_size_choices())
def test_binomial_matches_subset_sum_for_every_L(spec, K, lr):
    """Binomial(L) = v + Σ_{l≤L} Σ_{k_1<…<k_l} B_{k_1}⋯B_{k_l} v, for L = 0 … K."""
    problem = ref.build(spec)
    lr = ref.make_step_sizes(problem, lr)
    run = ref.unroll(problem, K, lr)
    Bs = ref.factors(run)
    for L in range(K + 1):
        expected, _ = ref.subset_sum(Bs, run.v, L)
        for monitor in (True, False):  # the level grouping and the tight grouping
            g, phi = meta_gradient(problem, mg.Binomial(L, monitor=monitor), K, lr)
            assert ref.rel_err(phi, run.iterates[-1]) <= RTOL
            assert ref.rel_err(g, expected) <= RTOL, (L, monitor, problem, K, lr.package)


@settings(max_examples=50)
@given(spec=ref.problem_specs(max_K=8), K=st.sampled_from(range(1, 9)), lr=ref.step_size_choices(),
       L=st.integers(0, 8))
def test_binomial_chunked_equals_unchunked(spec, K, lr, L):
    """chunk_size = 1, 2, 3 against one batched call per level. With an inner loss that
    changes along the steps, the chunks also split where the closure changes."""
    problem = ref.build(spec)
    lr = ref.make_step_sizes(problem, lr)
    L = min(L, K)
    for monitor in (True, False):
        unchunked, _ = meta_gradient(problem, mg.Binomial(L, monitor=monitor), K, lr)
        for chunk_size in (1, 2, 3):
            g, _ = meta_gradient(problem, mg.Binomial(L, chunk_size=chunk_size, monitor=monitor), K, lr)
            assert ref.rel_err(g, unchunked) <= RTOL, (chunk_size, monitor, L, problem, K)


@settings(max_examples=60)
@given(spec=ref.problem_specs(), K=st.sampled_from(range(1, 9)), lr=ref.step_size_choices(),
       chunk_size=st.sampled_from([None, 1, 2, 3]))
def test_binomial_identities(spec, K, lr, chunk_size):
    """Binomial(K) = Full = the reference's exact g; Binomial(0) = FirstOrder = v.

    The exact g is measured against the size of the terms it sums (at least ‖v‖ and ‖g‖):
    the terms can cancel to a g far smaller than v, and rounding is relative to the terms."""
    problem = ref.build(spec)
    lr = ref.make_step_sizes(problem, lr)
    run = ref.unroll(problem, K, lr)
    full, _ = meta_gradient(problem, mg.Full(), K, lr)
    first, _ = meta_gradient(problem, mg.FirstOrder(), K, lr)
    bK, _ = meta_gradient(problem, mg.Binomial(K, chunk_size=chunk_size), K, lr)
    b0, _ = meta_gradient(problem, mg.Binomial(0, chunk_size=chunk_size), K, lr)
    scale = max(float(run.g.norm()), float(run.v.norm()))
    assert ref.rel_err(bK, full, scale) <= RTOL, (problem, K, lr.package)
    assert ref.rel_err(bK, run.g, scale) <= RTOL, (problem, K, lr.package)
    assert ref.rel_err(b0, first) <= RTOL
    assert ref.rel_err(b0, run.v) <= RTOL


@settings(max_examples=50)
@given(seed=st.integers(0, 2 ** 31 - 1), d=st.sampled_from(range(1, 7)), K=st.sampled_from(range(1, 9)),
       x=st.floats(0.01, 1.5), psd=st.booleans())
def test_binomial_on_quadratic_is_the_binomial_theorem(seed, d, K, x, psd):
    """Every H_k = A: Binomial(L) = Σ_{l≤L} C(K,l) (−αA)^l v, by matrix powers.

    The tolerance is relative to Σ_l C(K,l) x^l ‖v‖, the scale of the terms: at x = 1 the
    sum itself can vanish exactly ((1 − αa)^K = 0 for an eigenvalue a = ℓ)."""
    spec = ref.ProblemSpec("quadratic", seed, dim=d, psd=psd, query_w=0.5)
    problem = ref.build(spec)
    alpha = x / problem.ell()
    lr = ref.step_sizes(problem, alpha)
    run = ref.unroll(problem, K, lr)
    B = -alpha * problem.As[0]
    for L in range(K + 1):
        expected = sum(math.comb(K, l) * torch.linalg.matrix_power(B, l) @ run.v for l in range(L + 1))
        scale = sum(math.comb(K, l) * x ** l for l in range(L + 1)) * float(run.v.norm())
        g, _ = meta_gradient(problem, mg.Binomial(L), K, lr)
        assert ref.rel_err(g, expected, scale) <= RTOL, (L, K, x)


@pytest.mark.parametrize("extra", [1, 4])
def test_binomial_order_above_K_is_clamped_with_warning(extra):
    problem = ref.build(ref.ProblemSpec("mlp", 4, widths=(2, 5, 1), activation="tanh", n_points=6))
    lr = ref.step_sizes(problem, 0.1)
    K = 3
    run = ref.unroll(problem, K, lr)
    with pytest.warns(mg.MetaGradientWarning):
        g, _ = meta_gradient(problem, mg.Binomial(K + extra), K, lr)
    assert ref.rel_err(g, run.g) <= RTOL


@settings(max_examples=50)
@given(seed=st.integers(0, 2 ** 31 - 1), d=st.sampled_from(range(1, 6)), K=st.sampled_from(range(1, 7)),
       scale=st.floats(0.01, 2.0))
def test_reference_forms_of_expression_2_agree(seed, d, K, scale):
    """The reference against itself: MATH.md's level recursion and its sequential form
    equal the explicit subset sum, for arbitrary (non-commuting, non-symmetric) factors."""
    g = torch.Generator().manual_seed(seed)
    Bs = [scale * torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d) for _ in range(K)]
    v = torch.randn(d, generator=g, dtype=torch.float64)
    for L in range(K + 1):
        expected, s = ref.subset_sum(Bs, v, L)
        assert ref.rel_err(ref.level_sum(Bs, v, L), expected, s) <= 1e-13
        assert ref.rel_err(ref.sequential_sum(Bs, v, L), expected, s) <= 1e-13
    assert ref.rel_err(ref.subset_sum(Bs, v, K)[0], ref.dense_product(Bs) @ v, ref.subset_sum(Bs, v, K)[1]) <= 1e-13


# ----------------------------------------------------------------------------- sinusoid


@pytest.fixture(scope="module")
def sinusoid():
    """The 1-40-40-1 ReLU sinusoid net of MATH.md, K = 5, α = 0.001, float64: the
    exact meta-gradient (reference unroll and Full) and Binomial(L) for L = 1 … 4."""
    problem = ref.sinusoid_problem(seed=0)
    lr = ref.step_sizes(problem, 0.001)
    K = 5
    run = ref.unroll(problem, K, lr)
    full, _ = meta_gradient(problem, mg.Full(), K, lr)
    binomial = {L: meta_gradient(problem, mg.Binomial(L), K, lr)[0] for L in range(1, 5)}
    return run, full, binomial


def test_sinusoid_full_matches_reference(sinusoid):
    run, full, _ = sinusoid
    assert ref.rel_err(full, run.g) <= RTOL


def test_sinusoid_binomial_3_is_accurate(sinusoid):
    _, full, binomial = sinusoid
    assert ref.rel_err(binomial[3], full) < 1e-4


def test_sinusoid_binomial_error_decreases_with_order(sinusoid):
    _, full, binomial = sinusoid
    errors = [ref.rel_err(binomial[L], full) for L in range(1, 5)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
