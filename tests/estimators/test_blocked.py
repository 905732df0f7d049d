"""The blocked binomial estimator (MATH.md, "Beyond the paper: the blocked binomial estimator").

Blocks of S steps, laid from the last step backwards (the earliest block takes the
remainder), each expanded to order L as in (2), chained exactly. Checked against an
explicit subset sum per block with dense factors, chained; the identities block=K =
Binomial(L) and block=1 / order ≥ block = Full; and, on quadratics with a known
spectrum, order='auto', block='auto' meets rtol where the plain expansion diverges.
"""

import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import metagrad as mg

from ._package import RTOL, meta_gradient, ref
from .test_error_control import exact, problem, run, spectrum_for


def chained_subset_sums(Bs, v, L, S):
    """Blocks of S steps from the end; each block's (2) applied in turn, last block first."""
    u, last = v, len(Bs)
    while last > 0:
        first = max(0, last - S)
        u, _ = ref.subset_sum(Bs[first:last], u, L)
        last = first
    return u


@settings(max_examples=40)
@given(spec=ref.problem_specs(max_K=6), K=st.integers(1, 6), lr=ref.step_size_choices(),
       L=st.integers(0, 6), S=st.integers(1, 6), monitor=st.booleans())
def test_blocked_matches_chained_subset_sums(spec, K, lr, L, S, monitor):
    problem_ = ref.build(spec)
    lr = ref.make_step_sizes(problem_, lr)
    run_ = ref.unroll(problem_, K, lr)
    L = min(L, K)
    expected = chained_subset_sums(ref.factors(run_), run_.v, L, S)
    g, _ = meta_gradient(problem_, mg.Binomial(L, block=S, monitor=monitor), K, lr)
    assert ref.rel_err(g, expected) <= RTOL, (L, S, K)


@settings(max_examples=30)
@given(spec=ref.problem_specs(), K=st.integers(1, 8), lr=ref.step_size_choices(), L=st.integers(0, 8))
def test_block_identities(spec, K, lr, L):
    problem_ = ref.build(spec)
    lr = ref.make_step_sizes(problem_, lr)
    L = min(L, K)
    plain, _ = meta_gradient(problem_, mg.Binomial(L), K, lr)
    whole, _ = meta_gradient(problem_, mg.Binomial(L, block=K), K, lr)
    assert ref.rel_err(whole, plain) <= RTOL  # block = K is the paper's estimator
    full, _ = meta_gradient(problem_, mg.Full(), K, lr)
    if L >= 1:
        single, _ = meta_gradient(problem_, mg.Binomial(L, block=1), K, lr)
        assert ref.rel_err(single, full) <= RTOL  # one step per block: exact
        wide, _ = meta_gradient(problem_, mg.Binomial(L, block=L), K, lr)
        assert ref.rel_err(wide, full) <= RTOL  # order ≥ block: exact


@settings(max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), dim=st.integers(1, 5), K=st.integers(10, 40),
       kal=st.floats(3.0, 12.0), rtol=st.sampled_from([1e-2, 1e-3, 1e-4]))
def test_auto_blocks_meet_rtol_where_the_plain_expansion_diverges(seed, dim, K, kal, rtol):
    ell = 2.0
    A, b, theta, target = problem(seed, dim, spectrum_for(seed, dim, ell, 0.8))
    alpha = kal / (K * ell)
    g_true, v, _ = exact(A, b, theta, target, K, alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mg.MetaGradientWarning)
        plain, _ = run(mg.Binomial(min(8, K - 1)), A, b, theta, target, K, alpha)
    # (I − αA)^K can shrink v by many orders of magnitude (to 1e-13‖v‖ at K·α·ℓ ≈ 10), where
    # float64 rounding of the K products, measured up to 1e-13‖v‖ when every block is
    # exact, is all that is left: errors are measured against at least 1e-8‖v‖.
    scale = max(float(g_true.norm()), 1e-8 * float(v.norm()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", mg.MetaGradientWarning)
        g, info = run(mg.Binomial("auto", block="auto", rtol=rtol), A, b, theta, target, K, alpha)
    error = float((g - g_true).norm()) / scale
    assert error <= rtol, (error, info["blocks"], info["orders"])
    assert info["converged"] and info["depth"] >= sum(info["orders"])
    assert [b - a for a, b in info["blocks"]] and info["blocks"][-1][1] == K and info["blocks"][0][0] == 0
    # Where the plain series is far off, the blocked one is the one to use.
    assert error <= float((plain - g_true).norm()) / scale or error <= 1e-12


def test_report_of_fixed_blocks():
    A, b, theta, target = problem(3, 3, [1.0, 0.5, 0.2])
    g, info = run(mg.Binomial(2, block=4), A, b, theta, target, 10, 0.05)
    assert info["blocks"] == [(0, 2), (2, 6), (6, 10)]  # the earliest block takes the remainder
    assert info["orders"] == [2, 2, 2] and info["depth"] == 6
    assert len(info["level_norms"]) == 3 and info["error_estimate"] > 0


@pytest.mark.parametrize("kwargs,error,argument", [
    ({"order": 2, "block": "auto"}, ValueError, "order='auto'"),
    ({"order": 2, "block": 0}, ValueError, "block"),
    ({"order": 2, "block": 1.5}, TypeError, "block"),
])
def test_bad_block_arguments(kwargs, error, argument):
    with pytest.raises(error, match=argument):
        mg.Binomial(**kwargs)


def test_auto_order_in_fixed_blocks():
    """order='auto' with block=S: each block chooses its order; a block that cannot meet
    rtol sends the whole estimate to the fallback."""
    A, b, theta, target = problem(4, 3, [1.0, 0.6, 0.3])
    K, alpha = 12, 0.05
    g_true, v, _ = exact(A, b, theta, target, K, alpha)
    g, info = run(mg.Binomial("auto", block=5, rtol=1e-6), A, b, theta, target, K, alpha)
    assert info["blocks"] == [(0, 2), (2, 7), (7, 12)] and info["converged"]
    assert float((g - g_true).norm()) <= 1e-5 * float(g_true.norm())
    with pytest.warns(mg.MetaGradientWarning, match="in the block of steps 7…11"):
        g, info = run(mg.Binomial("auto", block=5, rtol=1e-12, max_order=1, fallback="checkpointed"),
                      A, b, theta, target, K, alpha)
    assert info["fallback"] == "Checkpointed()"
    assert float((g - g_true).norm()) <= 1e-10 * max(float(g_true.norm()), float(v.norm()))
