"""A meta-batch in the functional face: ``mg.functional.meta_grad(..., tasks=T, compile=...)``.

In float64, against a plain hand-unrolled autograd loop per task written here (θ, a learned
weight decay inside the loss, and Meta-SGD's per-parameter step sizes held by the update rule),
and against T separate one-task calls for the approximate estimators (MATH.md's definitions
hold per task: the result is the mean over the tasks). The compiled path (its pieces compiled
once, the loops over steps in Python: metagrad.pure_compiled) equals the eager one, and a
second call with new data of the same shapes compiles nothing new.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import metagrad as mg
from metagrad import compiled
# The model, the user's loss (a learned weight decay inside it), θ, η (with Meta-SGD's step
# sizes) and the flattening of the one-task functional tests.
from test_functional_meta import DT, TOL, flat, loss_fn, meta_parameters, relative, theta
from test_functional_meta import hand_unrolled as one_task_unrolled
# A user's rule whose step branches on its float step size.
from test_compiled import TRACED, _BranchesOnLr

TASKS = 3


def batch(seed: int, tasks: int = TASKS, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``tasks`` tasks' batches, stacked: x [T, n, 2], y [T, n, 1] (each task its own phase)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, n, 2, generator=g, dtype=DT)
    phase = torch.rand(tasks, 1, 1, generator=g, dtype=DT) * 3
    return x, torch.sin(3 * x.sum(2, keepdim=True) + phase)


def hand_unrolled(support, query, K, lr=0.1):
    """The mean over the tasks of each task's meta-gradient of θ, log_wd and the step sizes, by
    the one-task tests' plain create_graph unroll of each task alone."""
    return torch.stack([one_task_unrolled((support[0][t], support[1][t]), (query[0][t], query[1][t]), K, lr=lr)
                        for t in range(support[0].shape[0])]).mean(0)


def functional(estimator, support, query, K, lr=0.1, **options):
    meta = meta_parameters(lr)
    return flat(*mg.functional.meta_grad(loss_fn, theta(), support, query, inner_opt=mg.optim.SGD(lr=meta["lr"]),
                                         steps=K, estimator=estimator, meta=meta, **options))


def separately(estimator, support, query, K):
    """The mean over the tasks of one-task calls."""
    rows = [functional(estimator, (support[0][t], support[1][t]), (query[0][t], query[1][t]), K)
            for t in range(support[0].shape[0])]
    return torch.stack(rows).mean(0)


@pytest.mark.parametrize("estimator", [mg.Full(), mg.Checkpointed(), mg.Checkpointed(snapshots=2)], ids=repr)
def test_exact_estimators_over_a_meta_batch_equal_a_hand_unroll_of_each_task(estimator):
    support, query = batch(1), batch(2)
    assert relative(functional(estimator, support, query, 4, tasks=TASKS), hand_unrolled(support, query, 4)) < TOL


@pytest.mark.parametrize("estimator", [mg.Truncated(2), mg.Binomial(2, monitor=False),
                                       mg.Binomial(1, block=2, monitor=False)], ids=repr)
def test_approximate_estimators_over_a_meta_batch_equal_the_mean_of_the_tasks(estimator):
    support, query = batch(3), batch(4)
    expected = separately(estimator, support, query, 4)
    assert relative(functional(estimator, support, query, 4, tasks=TASKS), expected) < TOL


def test_binomial_auto_over_a_meta_batch_chooses_each_tasks_order():
    """Called directly (not under vmap), meta_grad runs Binomial(order="auto"): over a meta-batch
    each task chooses its own order and fallback, as a one-task call does (task 2's larger
    inputs make its series diverge), eagerly and with compile=True."""
    support, query = batch(3), batch(4)
    x = support[0].clone()
    x[2] *= 3.0
    support = (x, support[1])
    estimator = mg.Binomial(order="auto", rtol=1e-4)
    report, reports, rows = {}, [{} for _ in range(TASKS)], []
    with pytest.warns(mg.MetaGradientWarning, match="the level norms grew at two consecutive orders"):
        for t in range(TASKS):  # one-task calls, each reporting its order (meta_grad(info=...))
            rows.append(functional(estimator, (support[0][t], support[1][t]), (query[0][t], query[1][t]), 4,
                                   info=reports[t]))
        expected = torch.stack(rows).mean(0)
        eager = functional(estimator, support, query, 4, tasks=TASKS, info=report)
        compiled_pieces = functional(estimator, support, query, 4, tasks=TASKS, compile=TRACED)
    assert relative(eager, expected) < TOL
    assert relative(compiled_pieces, expected) < TOL
    assert report["order"] == [one["order"] for one in reports]  # meta_grad(info=...): each task's
    assert report["fallback"] == [one["fallback"] for one in reports] and report["fallback"][2] is not None


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_implicit_over_a_meta_batch_solves_each_task_as_a_one_task_call(solver):
    support, query = batch(5), batch(6)
    estimator = mg.Implicit(reg=20.0, solver=solver, tol=1e-12, max_iter=100)

    def call(s, q, **options):
        meta = {"log_wd": meta_parameters()["log_wd"]}
        g, g_meta = mg.functional.meta_grad(loss_fn, theta(), s, q, inner_opt=mg.optim.SGD(lr=0.05), steps=4,
                                            estimator=estimator, meta=meta, **options)
        return torch.cat([*(t.reshape(-1) for t in g.values()), g_meta["log_wd"].reshape(1)])

    rows = [call((support[0][t], support[1][t]), (query[0][t], query[1][t])) for t in range(TASKS)]
    assert relative(call(support, query, tasks=TASKS), torch.stack(rows).mean(0)) < TOL


def user_loss():
    """The loss as a user passes it: a new lambda at every call (of one code)."""
    return lambda p, b, m: loss_fn(p, b, m)


def test_compiled_meta_batch_equals_a_hand_unroll_and_a_new_batch_compiles_nothing():
    """K = 5: a compiled run of 4 steps and one of 1, the same sweeps back; Full runs as
    Checkpointed there. Later calls with new data and new parameters of the same shapes (an
    outer loop with torch.optim.Adam, as a user writes it, a new lambda at every call) find
    every compiled piece."""
    K = 5
    support, query = batch(5), batch(6)
    expected = hand_unrolled(support, query, K)

    def call(estimator, params, s, q, **options):
        meta = meta_parameters()
        return mg.functional.meta_grad(user_loss(), params, s, q, inner_opt=mg.optim.SGD(lr=meta["lr"]), steps=K,
                                       estimator=estimator, meta=meta, tasks=TASKS, **options)

    for estimator in (mg.Checkpointed(), mg.Full()):
        assert relative(flat(*call(estimator, theta(), support, query, compile=True)), expected) < TOL
    params = {n: p.clone().requires_grad_() for n, p in theta().items()}
    eager = {n: p.clone().requires_grad_() for n, p in theta().items()}
    outer = [torch.optim.Adam(params.values(), lr=1e-2), torch.optim.Adam(eager.values(), lr=1e-2)]
    compiled_so_far = (len(compiled._CACHE), counters["stats"]["unique_graphs"])
    for i in range(2):
        s, q = batch(10 + i), batch(20 + i)
        for weights, optimizer, options in ((params, outer[0], {"compile": True}), (eager, outer[1], {})):
            g, _ = call(mg.Checkpointed(), weights, s, q, **options)
            for n, p in weights.items():
                p.grad = g[n]
            optimizer.step()
    assert compiled_so_far == (len(compiled._CACHE), counters["stats"]["unique_graphs"])
    for n in params:
        assert torch.allclose(params[n], eager[n], rtol=0, atol=1e-12), n


def test_compiled_momentum_and_binomial_equal_their_eager_selves():
    """A stateful rule (the state's adjoint carried through the compiled sweeps), and Binomial's
    levels as compiled vmapped rows."""
    support, query = batch(7), batch(8)

    def plain(p, b):
        return loss_fn(p, b, meta_parameters())

    cases = [(mg.optim.Momentum(lr=0.05, momentum=0.9), mg.Checkpointed()),
             (mg.optim.SGD(lr=0.1), mg.Binomial(2, monitor=False))]
    for rule, estimator in cases:
        kw = dict(inner_opt=rule, steps=5, estimator=estimator, tasks=TASKS)
        eager = mg.functional.meta_grad(plain, theta(), support, query, **kw)
        got = mg.functional.meta_grad(plain, theta(), support, query, compile=TRACED, **kw)
        for n in eager:
            assert relative(got[n], eager[n]) < TOL, (estimator, n)


def test_compiled_one_task_equals_a_hand_unroll():
    """``compile=True`` without ``tasks``: one task, the same pieces unbatched."""
    support, query = batch(9, tasks=1), batch(10, tasks=1)
    one_s, one_q = (support[0][0], support[1][0]), (query[0][0], query[1][0])
    expected = hand_unrolled(support, query, 2)
    assert relative(functional(mg.Checkpointed(), one_s, one_q, 2, compile=True), expected) < TOL


@pytest.mark.parametrize("options,error,match", [
    ({"tasks": 0}, ValueError, "tasks: expected an integer >= 1"),
    ({"tasks": 2}, ValueError, r"support: with tasks=2 .* support\[0\] has shape \(3, 8, 2\)"),
    ({"compile": "fastest"}, ValueError, "compile: unknown torch.compile mode 'fastest'"),
])
def test_bad_tasks_or_compile_names_the_argument(options, error, match):
    with pytest.raises(error, match=match):
        functional(mg.Checkpointed(), batch(1), batch(2), 2, **options)


def test_compile_under_vmap_is_refused_with_what_to_do_instead():
    def one(support, query):
        return functional(mg.Checkpointed(), support, query, 2, compile=True)

    with pytest.raises(ValueError, match="compile: .* cannot run inside torch.compile or a torch.func transform .* tasks=T"):
        torch.func.vmap(one)(batch(1), batch(2))


def test_a_monitored_fixed_order_judges_each_task_as_its_own_call_does():
    """Binomial(order=2) monitored (the default) with tasks=T: each task's error estimate and
    warning are those of its own one-task call (the levels' norms taken per task), and a
    warning names its task."""
    support, query = batch(3, tasks=2), batch(4, tasks=2)
    # task 1's larger inputs: its error estimate 0.50, above WARN_ESTIMATE = 0.4; task 0's 0.23
    support = (support[0] * torch.tensor([0.3, 8.0], dtype=DT).reshape(2, 1, 1), support[1])

    def run(s, q, **options):
        info = {}
        meta = meta_parameters(0.03)  # (its step sizes held by the rule: every tensor of meta is used)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mg.functional.meta_grad(loss_fn, theta(), s, q, inner_opt=mg.optim.SGD(lr=meta["lr"]), steps=6,
                                    estimator=mg.Binomial(2), meta=meta, info=info, **options)
        return info, [str(w.message) for w in caught if issubclass(w.category, mg.MetaGradientWarning)]

    together, messages = run(support, query, tasks=2)
    alone = [run((support[0][t], support[1][t]), (query[0][t], query[1][t])) for t in range(2)]
    assert together["tasks"] == 2
    assert together["warned"] == [one["warned"] for one, _ in alone] == [False, True]
    for t, (one, _) in enumerate(alone):
        assert together["error_estimate"][t] == pytest.approx(one["error_estimate"], rel=1e-8)
        assert together["level_norms"][t] == pytest.approx(one["level_norms"], rel=1e-8)
    assert len(messages) == 1 and "not converging at order 2 for task 1 of the block" in messages[0]


@pytest.mark.parametrize("rule_of", [lambda lr: mg.optim.SGD(lr={n: lr * (1 + i) for i, n in enumerate(theta())}),
                                     _BranchesOnLr],
                         ids=["per-parameter float step sizes", "a rule that branches on it"])
def test_a_float_step_size_of_another_value_each_call_compiles_nothing_new(rule_of):
    """meta_grad(compile=True) with the inner learning rate a Python float of another value at
    every call (an annealed or searched step size): the pieces take it as an input, so later
    calls compile nothing new, and each equals the eager call. A rule that branches on its step
    size runs one call eagerly (no warning) and compiles it as a constant from then on (each
    value its own pieces: the later call repeats one)."""
    support, query = batch(11), batch(12)

    def plain(p, b):
        return loss_fn(p, b, meta_parameters())

    def call(lr, **options):
        g = mg.functional.meta_grad(plain, theta(), support, query, inner_opt=rule_of(lr), steps=5,
                                    estimator=mg.Checkpointed(), tasks=TASKS, **options)
        return torch.cat([t.reshape(-1) for t in g.values()])

    # (The first compiled call takes its first step eagerly: a run of 4 steps, then 4 and 1.)
    lrs = [0.05, 0.15, 0.15, 0.15] if rule_of is _BranchesOnLr else [0.05, 0.06, 0.15, 0.07, 0.16]
    got = [call(lr, compile=TRACED) for lr in lrs[:3]]
    compiled_so_far = (len(compiled._CACHE), counters["stats"]["unique_graphs"])
    got += [call(lr, compile=TRACED) for lr in lrs[3:]]
    assert compiled_so_far == (len(compiled._CACHE), counters["stats"]["unique_graphs"])
    for lr, g in zip(lrs, got):
        assert relative(g, call(lr)) < TOL, lr
