"""``mg.functional.meta_grad``: the estimators' pure functional face (metagrad/pure.py).

Checked in float64 on a small MLP against the context manager (same estimator code, a
different trajectory), against a hand-unrolled autograd loop for the exact estimators,
under ``torch.func.vmap`` over a meta-batch, and under ``torch.compile``.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import metagrad as mg

DT = torch.float64
K = 3
LR = 0.2
TOL = 1e-10


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).to(DT)


def batch(seed: int, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=DT)
    return x, torch.sin(3 * x.sum(1, keepdim=True))


MODEL = make_model()
SUPPORT, QUERY = batch(1), batch(2)


def mse(pred, y):
    # Not F.mse_loss: in torch 2.13 its second derivative fails under two nested vmap levels
    # (vmap of meta_grad around Binomial's vmapped levels); see test_mse_loss_works_under_vmap_with_chunk_size_1.
    return ((pred - y) ** 2).mean()


def loss_fn(params, data):
    x, y = data
    return mse(functional_call(MODEL, params, (x,)), y)


def theta():
    return {n: p.detach().clone() for n, p in MODEL.named_parameters()}


RULES = {
    "sgd": lambda: mg.optim.SGD(lr=LR),
    "momentum": lambda: mg.optim.Momentum(lr=LR, momentum=0.7),
}

ESTIMATORS = {
    "full": (mg.Full, True),
    "checkpointed": (mg.Checkpointed, True),
    "first_order": (mg.FirstOrder, False),
    "truncated2": (lambda: mg.Truncated(2), False),
    "truncatedK": (lambda: mg.Truncated(K), True),
    "binomial2": (lambda: mg.Binomial(2, monitor=False), False),
    "binomialK": (lambda: mg.Binomial(K, monitor=False), True),
}


def context_grad(estimator, rule):
    model = make_model()
    with mg.MetaGradient(model, inner_opt=rule, estimator=estimator) as meta:
        for _ in range(K):
            meta.step(lambda f: mse(f(SUPPORT[0]), SUPPORT[1]))
        mse(meta.fmodel(QUERY[0]), QUERY[1]).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def hand_unrolled(kind: str, support=SUPPORT, query=QUERY, start=None):
    """The exact meta-gradient by plain autograd through a hand-written inner loop."""
    leaves = {n: t.clone().requires_grad_() for n, t in (start or theta()).items()}
    phi = dict(leaves)
    buffers = None
    for k in range(K):
        loss = loss_fn(phi, support)
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
        grads = dict(zip(phi, grads))
        if kind == "sgd":
            phi = {n: phi[n] - LR * grads[n] for n in phi}
        else:
            buffers = dict(grads) if k == 0 else {n: 0.7 * buffers[n] + grads[n] for n in phi}
            phi = {n: phi[n] - LR * buffers[n] for n in phi}
    out = torch.autograd.grad(loss_fn(phi, query), list(leaves.values()))
    return dict(zip(leaves, out))


def is_exact(name: str, rule: str) -> bool:
    """Truncated(K) and Binomial(K) are exact for SGD; with momentum they hold the optimizer
    state constant (MATH.md, "Optimizers other than plain gradient descent")."""
    return ESTIMATORS[name][1] and (rule == "sgd" or name in ("full", "checkpointed"))


def assert_close(a, b):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=TOL, atol=TOL, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_matches_context_manager_and_hand_unroll(name, rule):
    factory, exact = ESTIMATORS[name][0], is_exact(name, rule)
    g = mg.functional.meta_grad(loss_fn, theta(), SUPPORT, QUERY, inner_opt=RULES[rule](),
                                steps=K, estimator=factory())
    assert_close(g, context_grad(factory(), RULES[rule]()))
    if exact:
        assert_close(g, hand_unrolled(rule))
    else:  # an estimate, not the exact value
        assert any((g[n] - hand_unrolled(rule)[n]).abs().max() > 1e-8 for n in g)


def tasks(count: int = 3):
    supports = [batch(10 + i) for i in range(count)]
    queries = [batch(20 + i) for i in range(count)]
    stack = lambda bs: tuple(torch.stack([b[j] for b in bs]) for j in range(2))  # noqa: E731
    return supports, queries, stack(supports), stack(queries)


@pytest.mark.parametrize("name", ["full", "checkpointed", "truncated2", "binomial2", "binomialK"])
@pytest.mark.parametrize("rule", ["sgd", "momentum"])
def test_vmap_over_a_meta_batch_equals_the_loop(name, rule):
    factory, exact = ESTIMATORS[name][0], is_exact(name, rule)
    supports, queries, stacked_s, stacked_q = tasks()
    fn = functools.partial(mg.functional.meta_grad, loss_fn, inner_opt=RULES[rule](), steps=K,
                           estimator=factory())
    batched = torch.func.vmap(fn, in_dims=(None, 0, 0))(theta(), stacked_s, stacked_q)
    for i in range(3):
        assert_close({n: t[i] for n, t in batched.items()}, fn(theta(), supports[i], queries[i]))
        if exact:
            assert_close({n: t[i] for n, t in batched.items()},
                         hand_unrolled(rule, supports[i], queries[i]))


def test_binomial_chunks_and_blocks_match_the_context_manager():
    for estimator in (lambda: mg.Binomial(2, chunk_size=1, monitor=False),
                      lambda: mg.Binomial(1, block=2, monitor=False)):
        g = mg.functional.meta_grad(loss_fn, theta(), SUPPORT, QUERY, inner_opt=RULES["sgd"](),
                                    steps=K, estimator=estimator())
        assert_close(g, context_grad(estimator(), RULES["sgd"]()))


def test_zero_steps_is_the_query_gradient():
    for estimator in (mg.Full(), mg.Checkpointed()):
        g = mg.functional.meta_grad(loss_fn, theta(), SUPPORT, QUERY, inner_opt=RULES["sgd"](),
                                    steps=0, estimator=estimator)
        assert_close(g, dict(torch.func.grad(loss_fn)(theta(), QUERY)))


@pytest.mark.parametrize("make, text", [(lambda: mg.Truncated(K + 2), f"Truncated: steps={K + 2}"),
                                        (lambda: mg.Binomial(K + 1, monitor=False), f"Binomial: order={K + 1}")])
def test_an_order_beyond_k_warns_once_and_differentiates_every_step(make, text):
    """The functional face says what a block says at its end (K is known before the loop), once,
    and the estimate is the exact one of every step (SGD)."""
    with pytest.warns(mg.MetaGradientWarning, match=rf"{re.escape(text)} exceeds the number of inner steps K={K}") as caught:
        g = mg.functional.meta_grad(loss_fn, theta(), SUPPORT, QUERY, inner_opt=RULES["sgd"](), steps=K,
                                    estimator=make())
    assert len([w for w in caught if "exceeds" in str(w.message)]) == 1
    assert_close(g, hand_unrolled("sgd"))


@pytest.mark.parametrize("estimator", [mg.Checkpointed, mg.Full])
def test_torch_compile_equals_eager(estimator):
    """One graph, no graph break (fullgraph=True); aot_eager keeps it to a few seconds."""
    torch._dynamo.reset()
    fn = functools.partial(mg.functional.meta_grad, loss_fn, inner_opt=mg.optim.SGD(lr=LR), steps=K,
                           estimator=estimator())
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    assert_close(compiled(theta(), SUPPORT, QUERY), fn(theta(), SUPPORT, QUERY))


@pytest.mark.parametrize("estimator, words", [
    (lambda: mg.Binomial("auto"), "order='auto'"),
    (lambda: "binomial", "order='auto'"),
    (lambda: mg.Binomial(2), "monitor=False"),
    (lambda: mg.Implicit(reg=20.0), "Implicit"),
    (lambda: "implicit", "Implicit"),
    (lambda: mg.Binomial(2, max_memory="1GiB", monitor=False), "max_memory"),
])
def test_estimators_that_read_norms_back_are_refused_under_vmap_and_run_when_called_directly(estimator, words):
    """Binomial's auto order and its monitoring read level norms back as Python floats, and
    Implicit's solver its residuals: refused under torch.func.vmap with what to do, and run when
    meta_grad is called directly."""
    _, _, stacked_s, stacked_q = tasks()

    def call(support, query):
        return mg.functional.meta_grad(loss_fn, theta(), support, query, inner_opt=RULES["sgd"](), steps=K,
                                       estimator=estimator())

    with pytest.raises(ValueError, match="estimator: ") as info:
        torch.func.vmap(call)(stacked_s, stacked_q)
    assert words in str(info.value)
    got = call(SUPPORT, QUERY)
    assert all(torch.isfinite(t).all() for t in got.values())


def test_binomial_auto_called_directly_equals_full_where_it_expands_every_level():
    exact = mg.functional.meta_grad(loss_fn, theta(), SUPPORT, QUERY, inner_opt=RULES["sgd"](), steps=K,
                                    estimator=mg.Full())
    got = mg.functional.meta_grad(loss_fn, theta(), SUPPORT, QUERY, inner_opt=RULES["sgd"](), steps=K,
                                  estimator=mg.Binomial("auto", rtol=1e-14, max_order=K))
    assert_close(got, exact)


class _Proximal(mg.Checkpointed):
    """An estimator of the user's whose inner loop adds a proximal term."""

    proximal = 0.5


class _Differentiable(mg.Checkpointed):
    """An estimator of the user's that asks for a differentiable trajectory."""

    differentiable = True


class _PureAnyway(mg.Binomial):
    """An estimator of the user's that declares itself runnable by a pure function."""

    def why_not_pure(self):
        return None


def test_what_a_pure_function_refuses_is_what_the_estimator_says():
    """meta_grad asks the estimator (``Estimator.why_not_pure``), it tests no class: a user's
    subclass is refused for what it declares, and runs where it declares nothing."""
    assert mg.Full().why_not_pure() is None and mg.Checkpointed().why_not_pure() is None
    for estimator, words in ((_Proximal(), "proximal term"), (_Differentiable(), "differentiable=True")):
        with pytest.raises(ValueError, match="estimator: ") as info:
            mg.functional.meta_grad(loss_fn, theta(), SUPPORT, QUERY, inner_opt=RULES["sgd"](), steps=K,
                                    estimator=estimator)
        assert words in str(info.value)
    got = mg.functional.meta_grad(loss_fn, theta(), SUPPORT, QUERY, inner_opt=RULES["sgd"](), steps=K,
                                  estimator=_PureAnyway(K))  # monitored, run eagerly: allowed here
    assert_close(got, mg.functional.meta_grad(loss_fn, theta(), SUPPORT, QUERY, inner_opt=RULES["sgd"](),
                                              steps=K, estimator=mg.Full()))


def test_monitored_binomial_really_fails_under_vmap():
    """Why monitor=True is refused: the level norms are Python floats, read with .item()."""
    from metagrad.pure import PureTrajectory

    def monitored(support, query):
        trajectory = PureTrajectory(lambda phi, eta: loss_fn(phi, support), theta(), mg.optim.SGD(lr=LR), K)
        v = torch.func.grad(lambda phi: loss_fn(phi, query))(trajectory.current)
        return mg.Binomial(2).backward(trajectory, K, dict(v))[0]

    _, _, stacked_s, stacked_q = tasks()
    with pytest.raises(RuntimeError):
        torch.func.vmap(monitored)(stacked_s, stacked_q)


def test_bad_steps_raise():
    with pytest.raises(TypeError, match="steps"):
        mg.functional.meta_grad(loss_fn, theta(), SUPPORT, QUERY, inner_opt=RULES["sgd"](), steps=2.0)


def test_a_loss_fn_that_takes_other_arguments_than_it_is_called_with_is_named():
    """``meta=`` makes the call ``loss_fn(params, batch, meta)``: a two-argument loss is refused
    with its signature and what to add, before any step; so is a third argument without ``meta``,
    one argument, and a fourth without a default value."""
    with pytest.raises(TypeError, match=r"loss_fn: it is called as loss_fn\(params, batch, meta\), since meta= "
                                        r"is given, but its signature is loss_fn\(params, data\)\. Add a third"):
        mg.functional.meta_grad(loss_fn, theta(), SUPPORT, QUERY, inner_opt=RULES["sgd"](), steps=K,
                                meta={"wd": torch.tensor(0.1, dtype=DT)})
    with pytest.raises(TypeError, match=r"loss_fn: it is called as loss_fn\(params, batch\), without meta=.*"
                                        r"Pass meta="):
        mg.functional.meta_grad(lambda p, b, m: loss_fn(p, b), theta(), SUPPORT, QUERY, inner_opt=RULES["sgd"](),
                                steps=K)
    with pytest.raises(TypeError, match=r"signature is <lambda>\(params\)\. It takes the fast weights by name "
                                        r"\(params\), one batch .*: def loss_fn\(params, batch\)\."):
        mg.functional.meta_grad(lambda params: params["0.weight"].sum(), theta(), SUPPORT, QUERY,
                                inner_opt=RULES["sgd"](), steps=K)
    with pytest.raises(TypeError, match=r"signature is <lambda>\(p, b, m, scale\)\. Give the arguments after the "
                                        r"first 3 default values"):
        mg.functional.meta_grad(lambda p, b, m, scale: loss_fn(p, b), theta(), SUPPORT, QUERY, inner_opt=RULES["sgd"](),
                                steps=K, meta={"wd": torch.tensor(0.1, dtype=DT)})


@pytest.mark.parametrize("estimator", [mg.Full(), mg.Checkpointed()], ids=repr)
def test_a_batchnorm_that_writes_its_running_statistics_is_named_with_what_to_do(estimator):
    """A BatchNorm in training mode writes its running statistics in place, which torch.func's
    transforms refuse (torch's error names a captured tensor): said with the ways out, and the
    same net built with ``track_running_stats=False`` runs."""
    def net(track):
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6, track_running_stats=track), nn.Tanh(),
                             nn.Linear(6, 1)).to(DT)

    def loss_of(model):
        return lambda params, data: mse(functional_call(model, params, (data[0],)), data[1])

    for track in (True, False):
        model = net(track)
        params = {n: p.detach() for n, p in model.named_parameters()}
        call = functools.partial(mg.functional.meta_grad, loss_of(model), params, SUPPORT, QUERY,
                                 inner_opt=RULES["sgd"](), steps=K, estimator=estimator)
        if track:
            with pytest.raises(ValueError, match=r"loss_fn: .* cannot write in place to a tensor made outside it .* "
                                                 r"A BatchNorm in training mode .* track_running_stats=False"):
                call()
        else:
            assert set(call()) == set(params)


@pytest.mark.parametrize("estimator", [mg.Full(), mg.Checkpointed()], ids=repr)
def test_activation_checkpointing_in_the_model_is_named_with_what_to_do(estimator):
    """torch.utils.checkpoint in the model's forward installs saved-tensor hooks, which torch.func's
    transforms refuse ("don't yet support saved tensor hooks"): said with the way out, a
    MetaGradient block, which runs the checkpointed model as it is."""
    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(2, 6, dtype=DT), nn.Linear(6, 1, dtype=DT)

        def forward(self, x):
            return self.head(torch.utils.checkpoint.checkpoint(lambda h: torch.tanh(self.body(h)), x,
                                                               use_reentrant=False))

    model = Checkpointed()
    params = {n: p.detach() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"loss_fn: .* do not run saved-tensor hooks .*\(torch\.utils\.checkpoint\).*"
                                         r"MetaGradient block"):
        mg.functional.meta_grad(lambda p, data: mse(functional_call(model, p, (data[0],)), data[1]), params,
                                SUPPORT, QUERY, inner_opt=RULES["sgd"](), steps=K, estimator=estimator)


@pytest.mark.parametrize("estimator", [mg.Full(), mg.Checkpointed()], ids=repr)
def test_a_loss_fn_that_returns_per_example_losses_is_refused_with_what_to_do(estimator):
    def per_example(params, data):
        x, y = data
        return (functional_call(MODEL, params, (x,)) - y) ** 2

    with pytest.raises(ValueError, match=r"loss_fn: must return a scalar \(0-dim\) tensor loss, got shape "
                                         r"\(8, 1\); reduce it with \.mean\(\) or \.sum\(\)"):
        mg.functional.meta_grad(per_example, theta(), SUPPORT, QUERY, inner_opt=RULES["sgd"](), steps=K,
                                estimator=estimator)


def test_mse_loss_works_under_vmap_with_chunk_size_1():
    """F.mse_loss under vmap of meta_grad: Checkpointed (no inner vmap) and Binomial with
    chunk_size=1 (one product at a time) equal the per-task loop."""
    def mse_loss_fn(params, data):
        x, y = data
        return F.mse_loss(functional_call(MODEL, params, (x,)), y)

    supports, queries, stacked_s, stacked_q = tasks()
    for estimator in (mg.Checkpointed(), mg.Binomial(2, chunk_size=1, monitor=False)):
        fn = functools.partial(mg.functional.meta_grad, mse_loss_fn, inner_opt=RULES["sgd"](),
                               steps=K, estimator=estimator)
        batched = torch.func.vmap(fn, in_dims=(None, 0, 0))(theta(), stacked_s, stacked_q)
        for i in range(3):
            assert_close({n: t[i] for n, t in batched.items()}, fn(theta(), supports[i], queries[i]))


def _smallest_budget(error: ValueError) -> int:
    found = re.search(r"smallest budget that works here is (\d+) bytes", str(error))
    assert found, str(error)
    return int(found.group(1))


@pytest.mark.parametrize("tasks_", [None, 2])
def test_a_memory_budget_runs_when_called_directly_and_gives_the_same_gradient(tasks_):
    """Binomial(max_memory=...) measures one step's graph of the pure body (as the context
    manager measures a rebuilt one) and plans its chunk size: exact at order K (float64, against
    the hand-written unroll), whatever chunk the budget gives; a budget below one product is
    refused with the smallest that works, and that one runs one product at a time."""
    if tasks_ is None:
        support, query, expected = SUPPORT, QUERY, [hand_unrolled("sgd")]
    else:
        supports, queries, support, query = tasks(tasks_)
        expected = [hand_unrolled("sgd", supports[i], queries[i]) for i in range(tasks_)]
    mean = {n: sum(e[n] for e in expected) / len(expected) for n in expected[0]}

    def call(budget):
        info: dict = {}
        g = mg.functional.meta_grad(loss_fn, theta(), support, query, inner_opt=RULES["sgd"](), steps=K,
                                    estimator=mg.Binomial(K, max_memory=budget), tasks=tasks_, info=info)
        return g, info

    g, info = call("1GiB")
    assert info["chunk_size"] == K and info["step_graph_bytes"] > 0, info  # a whole level fits
    assert_close(g, mean)
    with pytest.raises(ValueError, match=r"Binomial\(max_memory\): got 1000B") as refused:
        call(1000)
    g, info = call(_smallest_budget(refused.value))
    assert info["chunk_size"] == 1, info
    assert_close(g, mean)


def test_a_memory_budget_holds_the_tensors_a_functional_call_allocates():
    """Every byte the CPU allocator hands out during a whole meta_grad call (the inner loop
    with its stored iterates, and backward), from the profiler's records: within the budget."""
    from benchmarks.budget import tensor_peak

    torch.manual_seed(0)
    sizes = [8, 64, 64, 1]
    params = {}
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        params[f"w{i}"] = torch.randn(b, a, dtype=DT) / a ** 0.5
        params[f"b{i}"] = torch.zeros(b, dtype=DT)

    def mlp_loss(p, data):
        h = data[0]
        for i in range(len(sizes) - 1):
            h = h @ p[f"w{i}"].T + p[f"b{i}"]
            h = torch.tanh(h) if i < len(sizes) - 2 else h
        return ((h - data[1]) ** 2).mean()

    data = (torch.randn(16, 8, dtype=DT), torch.randn(16, 1, dtype=DT))
    budget, info = 6 * 2**20, {}
    peak = tensor_peak(lambda: mg.functional.meta_grad(
        mlp_loss, params, data, data, inner_opt=mg.optim.SGD(lr=0.01), steps=40,
        estimator=mg.Binomial(2, max_memory=budget, monitor=False), info=info))
    assert 1 <= info["chunk_size"] < 39, info  # neither one product at a time nor a whole level
    assert info["planned_peak_bytes"] <= budget
    assert peak <= budget, (peak, info)


def test_both_trajectories_have_every_member_estimators_read():
    """``TrajectoryView`` is what an estimator reads; the context manager's ``Trajectory`` and
    this face's ``PureTrajectory`` both offer every member of it (methods with the protocol's
    parameters first), so an estimator written against it runs in both."""
    import inspect

    from metagrad.estimators.base import TrajectoryView
    from metagrad.functional import TaskLoss
    from metagrad.pure import PureTrajectory
    from metagrad.trajectory import Trajectory

    model = make_model()
    start = {n: p.detach() for n, p in model.named_parameters()}
    trajectories = [Trajectory(model, start, RULES["sgd"](), differentiable=False, keep=None),
                    PureTrajectory(TaskLoss(loss_fn, None, False, None)(SUPPORT), start, RULES["sgd"](), K)]
    members = {n: v for n, v in vars(TrajectoryView).items() if not n.startswith("_")}
    assert {"length", "theta", "meta", "tasks", "runs", "vjp", "sweep", "batched_vjp", "iterate",
            "fixed_point", "restore", "verify", "graph_bytes"} <= set(members)
    for trajectory in trajectories:
        for name, declared in members.items():
            assert hasattr(trajectory, name), (type(trajectory).__name__, name)
            if isinstance(declared, property):
                continue
            wanted = list(inspect.signature(declared).parameters)[1:]  # without self
            got = list(inspect.signature(getattr(trajectory, name)).parameters)
            assert got[:len(wanted)] == wanted, (type(trajectory).__name__, name, got, wanted)


def test_the_runs_of_a_sweep_follow_the_size_of_an_iterate():
    """A sweep's runs of steps (one compiled call each) span at most ``RUN_BYTES`` of fast
    weights, in both faces: a small model's sweeps take the longest runs, a large one's single
    steps (a longer run only compiles longer there)."""
    from metagrad.functional import TaskLoss
    from metagrad.pure import RUNS, PureTrajectory
    from metagrad.tape import RUN_BYTES
    from metagrad.trajectory import SWEEP, Trajectory

    small = make_model()
    large = nn.Linear(2, RUN_BYTES // 8 // 2 + 1).to(DT)  # one iterate: just over RUN_BYTES / 2
    for model, runs in ((small, RUNS), (large, (1,))):
        start = {n: p.detach() for n, p in model.named_parameters()}

        def loss(params, data):
            return functional_call(model, params, (data[0],)).pow(2).mean()

        pure = PureTrajectory(TaskLoss(loss, None, False, None)(SUPPORT), start, RULES["sgd"](), 1)
        assert pure.runs == runs
        context = Trajectory(model, start, RULES["sgd"](), differentiable=False, keep=None)
        assert context.runs == ((SWEEP, 1) if runs == RUNS else (1,))


def test_a_compiled_functional_sweep_is_not_cut_by_a_replay_check_it_does_not_run():
    """The functional face checks no replay (its steps are pure), so Checkpointed's backward
    asks for the longest runs (K = 8: one run, one compiled call), where the context
    manager's sweeps stop at each batch of replay checks (here every 5 steps: 4 tasks' iterates
    of 26 KB); equal to the hand-unrolled loop of each task."""
    from metagrad import pure_compiled

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 200), nn.Tanh(), nn.Linear(200, 1)).to(DT)
    start = {n: p.detach() for n, p in model.named_parameters()}

    def loss(params, data):
        return mse(functional_call(model, params, (data[0],)), data[1])

    from metagrad.pure import PureTrajectory

    calls = []
    sweep = PureTrajectory.sweep

    def counted(self, first, last, *args, **kwargs):  # the runs asked for
        calls.append(last - first)
        return sweep(self, first, last, *args, **kwargs)

    torch._dynamo.reset()
    support, query = batch(3, 4 * 8), batch(4, 4 * 8)
    support, query = [t.reshape(4, 8, -1) for t in support], [t.reshape(4, 8, -1) for t in query]
    steps, lr = 8, 0.05
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PureTrajectory, "sweep", counted)
        # (taken eagerly: what is asked for is the point here, the compiled pieces are tested above)
        patch.setattr(pure_compiled.Pieces, "sweep", lambda self, *args: None)
        patch.setattr(pure_compiled.Pieces, "run", lambda self, *args: None)
        got = mg.functional.meta_grad(loss, start, tuple(support), tuple(query), inner_opt=mg.optim.SGD(lr=lr),
                                      steps=steps, estimator=mg.Checkpointed(), tasks=4,
                                      compile={"backend": "aot_eager"})
    assert calls == [8]
    leaves = {n: t.clone().requires_grad_() for n, t in start.items()}
    total = 0
    for t in range(4):
        phi = dict(leaves)
        for _ in range(steps):
            grads = torch.autograd.grad(loss(phi, (support[0][t], support[1][t])), list(phi.values()), create_graph=True)
            phi = {n: p - lr * g for (n, p), g in zip(phi.items(), grads)}
        total = total + loss(phi, (query[0][t], query[1][t])) / 4
    want = torch.autograd.grad(total, list(leaves.values()))
    for (n, g), w in zip(got.items(), want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
