"""Full: autograd through the unrolled inner loop equals the hand-unrolled reference.

Also checks the reference itself (its autograd unroll against the dense product of
MATH.md (1)), and that every estimator works in float32.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import metagrad as mg

from ._package import RTOL, meta_gradient, ref


@settings(max_examples=100)
@given(spec=ref.problem_specs(), K=st.integers(1, 8), lr=ref.step_size_choices())
def test_full_matches_reference_unroll(spec, K, lr):
    problem = ref.build(spec)
    lr = ref.make_step_sizes(problem, lr)
    run = ref.unroll(problem, K, lr)
    g, phi = meta_gradient(problem, mg.Full(), K, lr)
    assert g.dtype == torch.float64
    assert ref.rel_err(phi, run.iterates[-1]) <= RTOL
    assert ref.rel_err(g, run.g) <= RTOL, (problem, K, lr.package)


@settings(max_examples=40)
@given(spec=ref.problem_specs(), K=st.integers(1, 6), lr=ref.step_size_choices())
def test_reference_unroll_equals_dense_product(spec, K, lr):
    """The reference's two routes to (1) agree: autograd through the unroll, and the
    product (I − H_0 D)⋯(I − H_{K−1} D) v of dense Hessians."""
    problem = ref.build(spec)
    lr = ref.make_step_sizes(problem, lr)
    run = ref.unroll(problem, K, lr)
    Bs = ref.factors(run)
    assert ref.rel_err(ref.last_factors(Bs, run.v, K), run.g) <= RTOL
    assert ref.rel_err(ref.dense_product(Bs) @ run.v, run.g) <= RTOL


def test_reference_on_scalar_quadratic_closed_form():
    """1-d quadratic L_tr = ½aφ², query ½(φ − c)²: φ_K = (1 − αa)^K θ and
    g = (1 − αa)^K (φ_K − c), by hand."""
    a, alpha, c, theta, K = 1.7, 0.2, 0.3, 0.9, 5
    problem = ref.QuadraticProblem(torch.tensor([theta], dtype=torch.float64),
                                   [torch.tensor([[a]], dtype=torch.float64)],
                                   [torch.zeros(1, dtype=torch.float64)],
                                   M=torch.eye(1, dtype=torch.float64),
                                   c=torch.tensor([c], dtype=torch.float64))
    lr = ref.step_sizes(problem, alpha)
    run = ref.unroll(problem, K, lr)
    r = (1 - alpha * a) ** K
    assert run.iterates[-1].item() == pytest.approx(r * theta, rel=1e-14)
    assert run.g.item() == pytest.approx(r * (r * theta - c), rel=1e-13)
    g, _ = meta_gradient(problem, mg.Full(), K, lr)
    assert g.item() == pytest.approx(r * (r * theta - c), rel=1e-13)


@pytest.mark.parametrize("estimator", [mg.Full(), mg.Checkpointed(), mg.FirstOrder(), mg.Truncated(2),
                                       mg.Binomial(2), mg.Binomial(2, chunk_size=1)], ids=repr)
def test_meta_gradient_accumulates_into_grad(estimator):
    """backward() adds the meta-gradient to an existing .grad, like any backward."""
    problem = ref.build(ref.ProblemSpec("mlp", 11, widths=(2, 5, 1), activation="tanh", n_points=6))
    lr = ref.step_sizes(problem, 0.1)
    g, _ = meta_gradient(problem, estimator, 3, lr)
    model = problem.module()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.1), estimator=estimator) as meta:
        for k in range(3):
            meta.step(problem.closure(k))
        problem.package_query_loss(meta.fmodel).backward()
    assert ref.rel_err(ref.flat([p.grad for p in model.parameters()]), g + 1) <= RTOL


# ----------------------------------------------------------------------------- float32

K32 = 4
EXACT = [mg.Full(), mg.Checkpointed(), mg.Truncated(K32), mg.Binomial(K32), mg.Binomial(K32, chunk_size=1)]
APPROX = [mg.FirstOrder(), mg.Truncated(2), mg.Binomial(2), mg.Binomial(2, chunk_size=2)]


def _float32_problem(dtype):
    spec = ref.ProblemSpec("mlp", 5, widths=(2, 6, 6, 1), activation="tanh", n_points=8)
    return ref.build(spec, dtype=dtype)


@pytest.mark.parametrize("estimator", EXACT + APPROX, ids=repr)
def test_float32(estimator):
    """In float32 each estimator returns float32 and agrees with its float64 value to
    1e-4; the exact ones agree with Full in float32 to 1e-4."""
    p32, p64 = _float32_problem(torch.float32), _float32_problem(torch.float64)
    lr32, lr64 = ref.step_sizes(p32, 0.05), ref.step_sizes(p64, 0.05)
    g32, _ = meta_gradient(p32, estimator, K32, lr32)
    g64, _ = meta_gradient(p64, estimator, K32, lr64)
    assert g32.dtype == torch.float32
    assert ref.rel_err(g32.double(), g64) <= 1e-4
    full32, _ = meta_gradient(p32, mg.Full(), K32, lr32)
    full64 = ref.unroll(p64, K32, lr64).g
    assert ref.rel_err(full32.double(), full64) <= 1e-4
    if any(estimator == e for e in EXACT):
        assert ref.rel_err(g32, full32) <= 1e-4
    else:  # the approximations are not exact, but float32 does not change them
        assert ref.rel_err(g64, full64) > 1e-4
