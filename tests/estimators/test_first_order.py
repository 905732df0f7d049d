"""FirstOrder (FOMAML) = ∇L_val(φ_K), and the estimators that must reduce to it:
Binomial(0) and Truncated(0). The reference's v is the gradient of the query loss at
its own final iterate, so these tests also check the inner loop's forward values.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import metagrad as mg

from ._package import RTOL, meta_gradient, ref


@settings(max_examples=80)
@given(spec=ref.problem_specs(), K=st.integers(1, 8), lr=ref.step_size_choices())
def test_first_order_is_query_gradient_at_final_iterate(spec, K, lr):
    problem = ref.build(spec)
    lr = ref.make_step_sizes(problem, lr)
    run = ref.unroll(problem, K, lr)
    for estimator in (mg.FirstOrder(), mg.Binomial(0), mg.Binomial(0, chunk_size=1), mg.Truncated(0)):
        g, phi = meta_gradient(problem, estimator, K, lr)
        assert g.dtype == torch.float64
        assert ref.rel_err(phi, run.iterates[-1]) <= RTOL, estimator
        assert ref.rel_err(g, run.v) <= RTOL, (estimator, problem, K, lr.package)


@settings(max_examples=40)
@given(spec=ref.problem_specs(), K=st.integers(1, 8), lr=ref.step_size_choices())
def test_estimators_agree_on_first_order(spec, K, lr):
    """FirstOrder = Binomial(0) = Truncated(0), package against package."""
    problem = ref.build(spec)
    lr = ref.make_step_sizes(problem, lr)
    fo, _ = meta_gradient(problem, mg.FirstOrder(), K, lr)
    for estimator in (mg.Binomial(0), mg.Truncated(0)):
        g, _ = meta_gradient(problem, estimator, K, lr)
        assert ref.rel_err(g, fo) <= RTOL, estimator


def test_first_order_differs_from_exact():
    """A sanity check that the problems are not degenerate: v ≠ g for K ≥ 1."""
    problem = ref.build(ref.ProblemSpec("mlp", 1, widths=(2, 5, 1), activation="softplus", n_points=6))
    lr = ref.step_sizes(problem, 0.2)
    run = ref.unroll(problem, 3, lr)
    g, _ = meta_gradient(problem, mg.FirstOrder(), 3, lr)
    assert ref.rel_err(g, run.v) <= RTOL
    assert ref.rel_err(g, run.g) > 1e-3
