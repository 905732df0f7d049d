"""Checkpointed: exact, from stored iterates, one rebuilt step graph at a time.

Checkpointed = reference unroll = Full, to 1e-10 relative, over random small MLPs and
quadratics, K = 1 … 8, one or per-parameter step sizes, and inner losses that may
change from step to step.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import metagrad as mg

from ._package import RTOL, meta_gradient, ref


@settings(max_examples=100)
@given(spec=ref.problem_specs(), K=st.integers(1, 8), lr=ref.step_size_choices())
def test_checkpointed_matches_reference_and_full(spec, K, lr):
    problem = ref.build(spec)
    lr = ref.make_step_sizes(problem, lr)
    run = ref.unroll(problem, K, lr)
    g, phi = meta_gradient(problem, mg.Checkpointed(), K, lr)
    full, _ = meta_gradient(problem, mg.Full(), K, lr)
    assert g.dtype == torch.float64
    assert ref.rel_err(phi, run.iterates[-1]) <= RTOL
    assert ref.rel_err(g, run.g) <= RTOL, (problem, K, lr.package)
    assert ref.rel_err(g, full) <= RTOL, (problem, K, lr.package)


@settings(max_examples=40)
@given(spec=ref.problem_specs(max_K=6), K=st.integers(1, 6), lr=ref.step_size_choices())
def test_checkpointed_matches_dense_product(spec, K, lr):
    """Against (1) evaluated with dense Hessians: (I + B_0)⋯(I + B_{K−1}) v."""
    problem = ref.build(spec)
    lr = ref.make_step_sizes(problem, lr)
    run = ref.unroll(problem, K, lr)
    expected = ref.last_factors(ref.factors(run), run.v, K)
    g, _ = meta_gradient(problem, mg.Checkpointed(), K, lr)
    assert ref.rel_err(g, expected) <= RTOL, (problem, K, lr.package)


def test_checkpointed_relu_net_long_loop():
    """A slightly larger ReLU net and the longest loop of the suite (K = 8), exactly."""
    problem = ref.build(ref.ProblemSpec("mlp", 21, widths=(3, 8, 8, 2), activation="relu", n_points=10,
                                        n_batches=3, schedule=(0, 1, 2, 2, 1, 0, 0, 2)))
    lr = ref.step_sizes(problem, 0.05, ("full", "rows", "scalar", "float", "full", "scalar"), seed=3)
    run = ref.unroll(problem, 8, lr)
    g, _ = meta_gradient(problem, mg.Checkpointed(), 8, lr)
    assert ref.rel_err(g, run.g) <= RTOL
