"""Truncated(T) = (I + B_{K−T})⋯(I + B_{K−1}) v: only the last T factors of (1).

Checked against the reference product of dense factors ``B_m = J_mᵀ − I = −H_m D``
for every T in 0 … K, and the identities Truncated(K) = Full, Truncated(0) = FirstOrder.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import metagrad as mg

from ._package import RTOL, meta_gradient, ref


@settings(max_examples=60)
@given(spec=ref.problem_specs(), K=st.sampled_from(range(1, 9)), lr=ref.step_size_choices())
def test_truncated_matches_last_factors_for_every_T(spec, K, lr):
    problem = ref.build(spec)
    lr = ref.make_step_sizes(problem, lr)
    run = ref.unroll(problem, K, lr)
    Bs = ref.factors(run)
    for T in range(K + 1):
        expected = ref.last_factors(Bs, run.v, T)
        g, phi = meta_gradient(problem, mg.Truncated(T), K, lr)
        assert ref.rel_err(phi, run.iterates[-1]) <= RTOL
        assert ref.rel_err(g, expected) <= RTOL, (T, problem, K, lr.package)


@settings(max_examples=60)
@given(spec=ref.problem_specs(), K=st.sampled_from(range(1, 9)), lr=ref.step_size_choices())
def test_truncated_identities(spec, K, lr):
    """Truncated(K) = Full and Truncated(0) = FirstOrder, package against package, and
    Truncated(K) = the reference's exact g."""
    problem = ref.build(spec)
    lr = ref.make_step_sizes(problem, lr)
    run = ref.unroll(problem, K, lr)
    full, _ = meta_gradient(problem, mg.Full(), K, lr)
    first, _ = meta_gradient(problem, mg.FirstOrder(), K, lr)
    tK, _ = meta_gradient(problem, mg.Truncated(K), K, lr)
    t0, _ = meta_gradient(problem, mg.Truncated(0), K, lr)
    assert ref.rel_err(tK, full) <= RTOL
    assert ref.rel_err(tK, run.g) <= RTOL
    assert ref.rel_err(t0, first) <= RTOL
    assert ref.rel_err(t0, run.v) <= RTOL


@pytest.mark.parametrize("extra", [1, 3])
def test_truncated_steps_above_K_is_clamped_with_warning(extra):
    problem = ref.build(ref.ProblemSpec("mlp", 7, widths=(2, 4, 1), activation="softplus", n_points=5))
    lr = ref.step_sizes(problem, 0.1)
    K = 3
    run = ref.unroll(problem, K, lr)
    with pytest.warns(mg.MetaGradientWarning):
        g, _ = meta_gradient(problem, mg.Truncated(K + extra), K, lr)
    assert ref.rel_err(g, run.g) <= RTOL


def test_truncated_one_sees_only_the_last_hessian():
    """Truncated(1) = v + B_{K−1} v, which differs from Binomial(1) = v + Σ_k B_k v when
    the Hessians differ along the trajectory."""
    problem = ref.build(ref.ProblemSpec("mlp", 8, widths=(1, 6, 1), activation="tanh", n_points=7))
    lr = ref.step_sizes(problem, 0.3)
    K = 4
    run = ref.unroll(problem, K, lr)
    Bs = ref.factors(run)
    g, _ = meta_gradient(problem, mg.Truncated(1), K, lr)
    assert ref.rel_err(g, run.v + Bs[-1] @ run.v) <= RTOL
    assert ref.rel_err(g, run.v + sum(B @ run.v for B in Bs)) > 1e-3
