"""A block over T tasks at once (``MetaGradient(tasks=T)``, metagrad/tasks.py).

The reference is independent of the package: a hand-written float64 autograd unroll of each
task's inner loop, the meta-gradient of the sum of the tasks' query losses. For the approximate
estimators (Truncated, FirstOrder, Binomial) the definition is "what T separate one-task blocks
give, summed", so they are compared with T separate blocks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import metagrad as mg

try:
    from reference import NoisySGD
except ImportError:  # collected as a package (pytest --import-mode=importlib, python -m pytest from elsewhere)
    from tests.reference import NoisySGD

DT = torch.float64
HIDDEN = 6


def make_model(seed: int = 0, norm: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(1, HIDDEN), *([torch.nn.BatchNorm1d(HIDDEN)] if norm else []), torch.nn.Tanh(),
              torch.nn.Linear(HIDDEN, 1)]
    return torch.nn.Sequential(*layers).to(DT)


def data(tasks: int, steps: int, seed: int, shots: int = 5):
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(tasks, steps, shots, 1, generator=g, dtype=DT) * 4 - 2
    xq = torch.rand(tasks, shots, 1, generator=g, dtype=DT) * 4 - 2
    return xs, torch.sin(xs), xq, torch.sin(xq)


def inner_loss(f, x, y, lam):
    return F.mse_loss(f(x), y) + lam * sum((w ** 2).sum() for w in f.parameters())


def flat(tensors) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=DT) if t is None else t.reshape(-1) for t in tensors])


def take_grads(leaves) -> torch.Tensor:
    out = flat([t.grad for t in leaves])
    for t in leaves:
        t.grad = None
    return out


def block_over_tasks(model, estimator, rule, batches, lam, infos=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop a user writes with tasks=T; the query loss is the sum of the tasks' own. The
    block's meta.info is appended to ``infos`` when given."""
    xs, ys, xq, yq = batches
    with mg.MetaGradient(model, rule, estimator=estimator, tasks=xs.shape[0], **kwargs) as meta:
        for k in range(xs.shape[1]):
            losses = meta.step(lambda f, x, y: inner_loss(f, x, y, lam), xs[:, k], ys[:, k])
        out = meta.fmodel(xq)
        F.mse_loss(out, yq, reduction="none").mean(dim=(1, 2)).sum().backward()
    if infos is not None:
        infos.append(meta.info)
    return take_grads([*model.parameters(), lam]), losses


def separate_blocks(model, estimator, rule, batches, lam, infos=None, **kwargs) -> torch.Tensor:
    """A block per task; each block's meta.info is appended to ``infos`` when given."""
    xs, ys, xq, yq = batches
    for t in range(xs.shape[0]):
        with mg.MetaGradient(model, rule, estimator=estimator, **kwargs) as meta:
            for k in range(xs.shape[1]):
                meta.step(lambda f: inner_loss(f, xs[t, k], ys[t, k], lam))
            F.mse_loss(meta.fmodel(xq[t]), yq[t]).backward()
        if infos is not None:
            infos.append(meta.info)
    return take_grads([*model.parameters(), lam])


def hand_unroll(model, lr: float, batches, lam) -> torch.Tensor:
    """Σ_t ∇_(θ, λ) L_query(φ_K^t): each task's SGD unroll written out with create_graph=True."""
    xs, ys, xq, yq = batches
    theta = list(model.parameters())

    def forward(w, x):
        return F.linear(torch.tanh(F.linear(x, w[0], w[1])), w[2], w[3])

    total = 0
    for t in range(xs.shape[0]):
        phi = theta
        for k in range(xs.shape[1]):
            loss = F.mse_loss(forward(phi, xs[t, k]), ys[t, k]) + lam * sum((w ** 2).sum() for w in phi)
            grads = torch.autograd.grad(loss, phi, create_graph=True)
            phi = [w - lr * g for w, g in zip(phi, grads)]
        total = total + F.mse_loss(forward(phi, xq[t]), yq[t])
    return flat(torch.autograd.grad(total, [*theta, lam]))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


EXACT = [mg.Full(), mg.Checkpointed(), mg.Checkpointed(snapshots=2)]
APPROXIMATE = [mg.Truncated(steps=2), mg.FirstOrder(), mg.Binomial(order=2, monitor=False), mg.Binomial(order=2, block=2)]


@settings(max_examples=6, deadline=None)
@given(tasks=st.integers(1, 3), steps=st.integers(1, 4), lr=st.floats(0.02, 0.3), seed=st.integers(0, 2**16))
def test_exact_estimators_over_tasks_equal_a_hand_written_unroll_of_each_task(tasks, steps, lr, seed):
    model = make_model(seed % 7)
    lam = torch.tensor(0.05, dtype=DT, requires_grad=True)
    batches = data(tasks, steps, seed)
    want = hand_unroll(model, lr, batches, lam)
    for estimator in EXACT:
        got, losses = block_over_tasks(model, estimator, mg.optim.SGD(lr=lr), batches, lam)
        assert relative(got, want) < 1e-10, estimator
        assert losses.shape == (tasks,)


@pytest.mark.filterwarnings("ignore:FirstOrder:metagrad.MetaGradientWarning")
@pytest.mark.parametrize("estimator", APPROXIMATE, ids=repr)
def test_approximate_estimators_over_tasks_equal_separate_blocks(estimator):
    model = make_model(1)
    lam = torch.tensor(0.05, dtype=DT, requires_grad=True)
    batches = data(3, 4, seed=5)
    got, _ = block_over_tasks(model, estimator, mg.optim.SGD(lr=0.1), batches, lam)
    want = separate_blocks(model, estimator, mg.optim.SGD(lr=0.1), batches, lam)
    assert relative(got, want) < 1e-10


@pytest.mark.parametrize("rule", [mg.optim.Momentum(lr=0.1, momentum=0.9), mg.optim.Adam(lr=0.02),
                                  mg.optim.SGD(lr=torch.full((1,), 0.1, dtype=DT, requires_grad=True))],
                         ids=["momentum", "adam", "learned step size"])
@pytest.mark.parametrize("estimator", [mg.Full(), mg.Checkpointed(), mg.Binomial(order=2, monitor=False)], ids=repr)
def test_stateful_rules_and_learned_step_sizes_over_tasks_equal_separate_blocks(rule, estimator):
    model = make_model(2)
    lam = torch.tensor(0.05, dtype=DT, requires_grad=True)
    batches = data(3, 4, seed=6)
    step_sizes = [t for t in vars(rule).values() if isinstance(t, torch.Tensor)]
    got, _ = block_over_tasks(model, estimator, rule, batches, lam)
    got_lr = take_grads(step_sizes) if step_sizes else None
    want = separate_blocks(model, estimator, rule, batches, lam)
    assert relative(got, want) < 1e-10
    if step_sizes:
        assert relative(got_lr, take_grads(step_sizes)) < 1e-10


def test_batch_norm_in_training_mode_normalizes_each_task_by_its_own_batch():
    model = make_model(3, norm=True)
    lam = torch.tensor(0.05, dtype=DT, requires_grad=True)
    batches = data(3, 3, seed=7)
    before = model[1].running_mean.clone()
    got, _ = block_over_tasks(model, mg.Checkpointed(), mg.optim.SGD(lr=0.1), batches, lam)
    want = separate_blocks(model, mg.Checkpointed(), mg.optim.SGD(lr=0.1), batches, lam)
    assert relative(got, want) < 1e-10
    assert torch.equal(model[1].running_mean, before)  # the buffer policy: nothing written


def test_adapt_a_head_over_tasks_equals_separate_blocks():
    model = make_model(4)
    lam = torch.tensor(0.05, dtype=DT, requires_grad=True)
    batches = data(2, 3, seed=8)
    got, _ = block_over_tasks(model, mg.Checkpointed(), mg.optim.SGD(lr=0.1), batches, lam, adapt=model[2])
    want = separate_blocks(model, mg.Checkpointed(), mg.optim.SGD(lr=0.1), batches, lam, adapt=model[2])
    assert relative(got, want) < 1e-10


def test_the_loop_a_user_writes_with_a_real_outer_optimizer():
    """The README's pattern: a meta-batch of 4 tasks in one block, the query loss a plain
    F.mse_loss over every task's points (the mean over tasks), torch.optim.Adam outside; the
    meta-gradient equals the mean of 4 one-task blocks', and the outer loop lowers the loss."""
    model = make_model(5)
    outer = torch.optim.Adam(model.parameters(), lr=0.01)
    xs, ys, xq, yq = data(4, 3, seed=9)
    first = None
    for _ in range(15):
        outer.zero_grad()
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed(), tasks=4) as meta:
            for k in range(3):
                meta.step(lambda f, x, y: F.mse_loss(f(x), y), xs[:, k], ys[:, k])
            out = meta.fmodel(xq)
            assert out.shape == (4, 5, 1) and meta.fmodel.params["0.weight"].shape == (4, HIDDEN, 1)
            loss = F.mse_loss(out, yq)
            loss.backward()
        if first is None:
            first = float(loss.detach())
            got = flat([p.grad for p in model.parameters()])
            model.zero_grad()
            for t in range(4):
                with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed()) as meta:
                    for k in range(3):
                        meta.step(lambda f: F.mse_loss(f(xs[t, k]), ys[t, k]))
                    (F.mse_loss(meta.fmodel(xq[t]), yq[t]) / 4).backward()
            assert relative(got, flat([p.grad for p in model.parameters()])) < 1e-10
        outer.step()
    assert float(loss.detach()) < first


def test_a_batch_passed_to_step_reaches_the_closure_with_tasks_unset():
    model = make_model(6)
    lam = torch.tensor(0.05, dtype=DT, requires_grad=True)
    xs, ys, xq, yq = data(1, 3, seed=10)
    with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed()) as meta:
        for k in range(3):
            loss = meta.step(inner_loss, xs[0, k], ys[0, k], lam)
        F.mse_loss(meta.fmodel(xq[0]), yq[0]).backward()
    assert loss.dim() == 0
    got = take_grads([*model.parameters(), lam])
    assert relative(got, hand_unroll(model, 0.1, (xs, ys, xq, yq), lam)) < 1e-10


# ------------------------------------------------------------------------------ errors
def test_a_batch_tensor_without_the_task_dimension_is_refused_and_nothing_is_lost():
    model = make_model(7)
    xs, ys, _, _ = data(3, 2, seed=11)
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"batch: in a block over tasks=3 .* tensor 1 has shape \(5, 1\)"):
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), tasks=3) as meta:
            meta.step(lambda f, x, y: F.mse_loss(f(x), y), xs[:, 0], ys[0, 0])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(p.grad is None for p in model.parameters())


def test_the_one_task_closure_over_stacked_data_warns_that_every_task_gets_all_of_it():
    """The one-task loop's closure moved to tasks=T with the data stacked but not passed after it
    (``lambda f: loss(f(x_s), y_s)``): each task is given all of the captured data, so every task
    takes the same step (the block runs, as documented). It warns once, naming the tensors; passed
    after the closure, the tasks' own slices, it does not."""
    model = make_model(12)
    xs, ys, xq, yq = data(3, 2, seed=12)
    x0, y0 = xs[:, 0], ys[:, 0]
    said = (r"tasks=3 was given no batch after the closure, and the closure captures x0 \(3, 5, 1\), "
            r"y0 \(3, 5, 1\).* each task's step is taken on every task's data")
    with pytest.warns(mg.MetaGradientWarning, match=said) as caught:
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed(), tasks=3) as meta:
            for _ in range(2):
                meta.step(lambda f: F.mse_loss(f(x0), y0))
            params = meta.fmodel.params
            assert all(torch.allclose(t[0], t[2], rtol=1e-12, atol=1e-14) for t in params.values())  # the same step
            F.mse_loss(meta.fmodel(xq), yq).backward()
    assert len([w for w in caught if issubclass(w.category, mg.MetaGradientWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", mg.MetaGradientWarning)
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed(), tasks=3) as meta:
            for _ in range(2):
                meta.step(lambda f, x, y: F.mse_loss(f(x), y), x0, y0)
            first = meta.fmodel.params["0.weight"]
            assert (first[0] - first[2]).abs().max() > 1e-6  # each task its own step


@pytest.mark.parametrize("tasks, closure, passed, text", [
    (2, lambda f: F.mse_loss(f(torch.zeros(5, 1, dtype=DT)), torch.zeros(5, 1, dtype=DT)), True,
     r"here with the 2 batch value\(s\) passed after the closure \(each task's slices\), but its signature is "
     r".*<lambda>\(f\)\. Take them as arguments after fmodel"),
    (2, lambda f, x, y: F.mse_loss(f(x), y), False,
     r"here with no batch values \(none passed after the closure\), but its signature is .*<lambda>\(f, x, y\)\. "
     r"Pass its batch after the closure, meta.step\(closure, x_s, y_s\), each tensor with a first dimension of 2"),
    (None, lambda f, x: F.mse_loss(f(x), x.sum(1, keepdim=True)), False,
     r"here with no batch values .*<lambda>\(f, x\)\. Pass its batch after the closure, meta.step\(closure, x_s, y_s\)\.$"),
], ids=["tasks, too many", "tasks, too few", "one task, too few"])
def test_a_closure_whose_signature_does_not_take_the_batch_is_named_with_the_call(tasks, closure, passed, text):
    """``meta.step(closure, *batch)`` calls ``closure(fmodel, *batch)``: a closure that cannot take
    what is passed is named with its signature and the call to write (not Python's "takes 1
    positional argument but 3 were given"), and the model is left as it was."""
    model = make_model(8)
    xs, ys, _, _ = data(2, 1, seed=12)
    params = [p.detach().clone() for p in model.parameters()]
    batch = (xs[:, 0], ys[:, 0]) if passed else ()
    with pytest.raises(TypeError, match="closure: meta.step calls closure\\(fmodel, \\*batch\\), " + text):
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed(), tasks=tasks) as meta:
            meta.step(closure, *batch)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(p.grad is None for p in model.parameters())


def test_a_type_error_inside_the_closure_is_the_closures_own():
    model = make_model(8)
    xs, ys, _, _ = data(2, 1, seed=12)
    with pytest.raises(TypeError, match="unsupported operand"):
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), tasks=2) as meta:
            meta.step(lambda f, x, y: F.mse_loss(f(x), y) + (None + 1), xs[:, 0], ys[:, 0])


def _branches_on_item(f, x, y):
    loss = F.mse_loss(f(x), y)
    if loss.item() > 100:  # a Python branch on a tensor's value
        loss = loss / 2
    return loss


def _reads_numpy(f, x, y):
    return F.mse_loss(f(x), y) * float(x.numpy().std())  # a NumPy value of the batch (torch's says "storage")


@pytest.mark.parametrize("closure", [_branches_on_item, _reads_numpy], ids=["item", "numpy"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compile=True"])
def test_a_closure_that_cannot_run_under_vmap_is_named_with_what_to_do(compile, closure):
    """The error alone: with compile=True, no warning that the step could not be compiled comes
    before it (warnings are errors here)."""
    model = make_model(8)
    xs, ys, _, _ = data(2, 1, seed=12)

    with pytest.raises(ValueError, match=r"closure: a block over tasks=2 .* torch.func.vmap, and it cannot run "
                                         r"there: [^\n]*\. Rewrite .*\.numpy\(\).*MetaGradient without tasks="):
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed(), tasks=2,
                             compile=compile) as meta:
            meta.step(closure, xs[:, 0], ys[:, 0])


def test_a_derivative_in_the_input_inside_the_closure_over_tasks():
    """A gradient penalty in the inner loss: ``torch.func.grad`` inside the closure runs under
    the block's vmap (eager and compiled) and equals each task's hand-written unroll; the
    autograd form, which makes a leaf (``requires_grad_``, which torch.func refuses), is named
    with that fix, and the model is left as it was."""
    model = make_model(10)
    xs, ys, xq, yq = data(2, 3, seed=14)
    lam = torch.tensor(0.2, dtype=DT, requires_grad=True)

    def penalized(f, x, y):
        gx = torch.func.grad(lambda xi: f(xi).sum())(x)
        return F.mse_loss(f(x), y) + lam * (gx ** 2).mean()

    theta = list(model.parameters())

    def forward(w, x):
        return F.linear(torch.tanh(F.linear(x, w[0], w[1])), w[2], w[3])

    total = 0
    for t in range(2):
        phi = theta
        for k in range(3):
            xi = xs[t, k].clone().requires_grad_()
            out = forward(phi, xi)
            gx, = torch.autograd.grad(out.sum(), xi, create_graph=True)
            grads = torch.autograd.grad(F.mse_loss(out, ys[t, k]) + lam * (gx ** 2).mean(), phi, create_graph=True)
            phi = [w - 0.1 * g for w, g in zip(phi, grads)]
        total = total + F.mse_loss(forward(phi, xq[t]), yq[t])
    want = flat(torch.autograd.grad(total, [*theta, lam]))
    for compile in (False, {"backend": "aot_eager"}):
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed(), tasks=2, compile=compile) as meta:
            for k in range(3):
                meta.step(penalized, xs[:, k], ys[:, k])
            F.mse_loss(meta.fmodel(xq), yq, reduction="none").mean(dim=(1, 2)).sum().backward()
        assert relative(take_grads([*model.parameters(), lam]), want) < 1e-10

    def made_leaf(f, x, y):
        xi = x.clone().requires_grad_()
        gx, = torch.autograd.grad(f(xi).sum(), xi, create_graph=True)
        return F.mse_loss(f(x), y) + lam * (gx ** 2).mean()

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"tasks=2 .* torch.func.grad, not requires_grad_"):
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed(), tasks=2) as meta:
            meta.step(made_leaf, xs[:, 0], ys[:, 0])
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("compile", [False, {"backend": "aot_eager"}], ids=["eager", "compiled"])
@pytest.mark.parametrize("estimator", EXACT[:2], ids=repr)
def test_inner_steps_over_tasks_taken_under_no_grad(estimator, compile):
    """The steps of a block over tasks written inside ``torch.no_grad()``: the tasks' losses
    were summed there without a graph ("the loss at step 0 does not depend on the fast
    weights"); now as outside, equal to each task's hand-written unroll."""
    model = make_model(11)
    batches = data(2, 3, seed=15)
    xs, ys, xq, yq = batches
    lam = torch.tensor(0.01, dtype=DT, requires_grad=True)
    with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=estimator, tasks=2, compile=compile) as meta:
        with torch.no_grad():
            for k in range(3):
                meta.step(lambda f, x, y: inner_loss(f, x, y, lam), xs[:, k], ys[:, k])
        F.mse_loss(meta.fmodel(xq), yq, reduction="none").mean(dim=(1, 2)).sum().backward()
    assert relative(take_grads([*model.parameters(), lam]), hand_unroll(model, 0.1, batches, lam)) < 1e-10


def test_a_closure_must_return_each_task_a_scalar():
    model = make_model(9)
    xs, ys, _, _ = data(2, 1, seed=13)
    with pytest.raises(ValueError, match=r"closure: .* returned a tensor of shape \(5, 1\)"):
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), tasks=2) as meta:
            meta.step(lambda f, x, y: (f(x) - y) ** 2, xs[:, 0], ys[:, 0])


def test_fmodel_needs_the_task_dimension():
    model = make_model(10)
    xs, ys, xq, _ = data(2, 1, seed=14)
    with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), tasks=2) as meta:
        meta.step(lambda f, x, y: F.mse_loss(f(x), y), xs[:, 0], ys[:, 0])
        with pytest.raises(ValueError, match=r"meta.fmodel: a block over tasks=2 .* shape \(5, 1\)"):
            meta.fmodel(xq[0])


@pytest.mark.parametrize("learned", [True, False], ids=["with a learned weight decay", "without η"])
def test_binomial_auto_over_tasks_chooses_each_tasks_order_as_separate_blocks_do(learned):
    """Binomial(order="auto") over tasks: each task chooses its own order and fallback from its
    own level norms, so θ's and η's gradients equal separate blocks', meta.info lists each task's
    order, convergence and fallback, and the fallback's warning names the task. Without η the
    levels of every task are taken in one pass (fewer products than a pass per task)."""
    model = make_model(3)
    lam = torch.tensor(0.05, dtype=DT, requires_grad=learned)
    xs, ys, xq, yq = data(3, 6, seed=31)
    xs, ys = xs.clone(), ys.clone()
    xs[1:] *= 4.0  # tasks 1 and 2: larger inputs, a larger K·α·‖H‖, a diverging series
    ys[1:] *= 3.0
    estimator, rule, block, infos = mg.Binomial(order="auto", rtol=1e-4), mg.optim.SGD(lr=0.1), [], []
    with pytest.warns(mg.MetaGradientWarning, match="for task [12] of the block, the level norms grew"):
        got, _ = block_over_tasks(model, estimator, rule, (xs, ys, xq, yq), lam, infos=block)
    with pytest.warns(mg.MetaGradientWarning, match="Falling back"):
        want = separate_blocks(model, estimator, rule, (xs, ys, xq, yq), lam, infos=infos)
    info = block[0]
    assert relative(got, want) < 1e-10
    for key in ("order", "converged", "fallback"):
        assert info[key] == [one[key] for one in infos], key
    assert info["fallback"][0] is None and info["fallback"][1] is not None  # the tasks chose differently
    assert info["tasks"] == 3 and info["steps"] == 6
    separate = sum(one["hessian_vector_products"] for one in infos)
    assert info["hessian_vector_products"] < separate


@pytest.mark.parametrize("learned_lr", [False, True], ids=["a learned weight decay", "and a learned step size"])
@pytest.mark.parametrize("lr,rtol,orders", [(0.02, 1e-2, [4, 4, 6]), (0.05, 1e-2, [5, 6, 2])],
                         ids=["two orders", "two orders and a fallback"])
def test_binomial_auto_over_tasks_with_eta_takes_each_tasks_terms_at_its_order(lr, rtol, orders, learned_lr):
    """With η (a learned weight decay, and a learned step size) the tasks that stopped at
    different orders get η's terms each at its own order (a task that fell back gets its
    fallback's): θ's, λ's and α's gradients equal separate blocks', with fewer products than a
    pass per task (one pass where no task fell back)."""
    model = make_model(3)
    lam = torch.tensor(0.05, dtype=DT, requires_grad=True)
    xs, ys, xq, yq = data(3, 6, seed=31)
    xs, ys = xs.clone(), ys.clone()
    for t, scale in enumerate([0.3, 1.0, 4.0]):  # a larger K·α·‖H‖ for each next task
        xs[t] *= scale
    ys[1:] *= 3.0
    step = torch.tensor(lr, dtype=DT, requires_grad=True) if learned_lr else lr
    estimator, rule, block, infos = mg.Binomial(order="auto", rtol=rtol), mg.optim.SGD(lr=step), [], []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Binomial.order='auto'.: for task 2 of the block", mg.MetaGradientWarning)
        warnings.filterwarnings("ignore", "Binomial.order='auto'.: the level norms grew", mg.MetaGradientWarning)
        got, _ = block_over_tasks(model, estimator, rule, (xs, ys, xq, yq), lam, infos=block)
        got_lr = take_grads([step]) if learned_lr else None
        want = separate_blocks(model, estimator, rule, (xs, ys, xq, yq), lam, infos=infos)
    info = block[0]
    assert info["order"] == [one["order"] for one in infos] == orders
    assert relative(got, want) < 1e-10
    if learned_lr:
        assert relative(got_lr, take_grads([step])) < 1e-10
    assert info["hessian_vector_products"] < sum(one["hessian_vector_products"] for one in infos)


def test_a_monitored_fixed_order_over_tasks_judges_each_task_on_its_own_levels():
    """Binomial(order=2) (monitor=True, the default) over tasks: each task's level norms and
    error estimate are its own, as its own block's, so a task whose series is far off warns
    (naming the task) even where another task's larger, converging levels would hide it in
    norms taken over every task's rows. meta.info lists each task's report under the keys the
    monitor sets; the gradients equal separate blocks'."""
    model = make_model(3)
    lam = torch.tensor(0.05, dtype=DT, requires_grad=True)
    xs, ys, xq, yq = data(2, 6, seed=31)
    xs, ys = xs.clone(), ys.clone()
    xs[0] *= 0.3  # task 0: a small K·α·‖H‖ (error estimate 0.18 on its own)
    xs[1] *= 4.0  # task 1: a large one (error estimate 1.05, above WARN_ESTIMATE = 0.4)
    ys[1] *= 3.0
    weight = torch.tensor([1.0, 1e-3], dtype=DT)  # task 1's query loss counts little
    estimator, rule = mg.Binomial(order=2), mg.optim.SGD(lr=0.02)
    infos, want = [], 0
    for t in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with mg.MetaGradient(model, rule, estimator=estimator) as meta:
                for k in range(6):
                    meta.step(lambda f: inner_loss(f, xs[t, k], ys[t, k], lam))
                (weight[t] * F.mse_loss(meta.fmodel(xq[t]), yq[t])).backward()
        assert len(caught) == t  # task 0 converges; task 1 warns
        infos.append(meta.info)
    want = take_grads([*model.parameters(), lam])
    with pytest.warns(mg.MetaGradientWarning, match="not converging at order 2 for task 1 of the block") as caught:
        with mg.MetaGradient(model, rule, estimator=estimator, tasks=2) as meta:
            for k in range(6):
                meta.step(lambda f, x, y: inner_loss(f, x, y, lam), xs[:, k], ys[:, k])
            (F.mse_loss(meta.fmodel(xq), yq, reduction="none").mean(dim=(1, 2)) * weight).sum().backward()
    assert len(caught) == 1
    assert relative(take_grads([*model.parameters(), lam]), want) < 1e-10
    info = meta.info
    assert info["tasks"] == 2 and info["order"] == 2 and info["steps"] == 6
    assert info["warned"] == [False, True] and info["diverged"] == [False, False]
    for t, one in enumerate(infos):
        assert info["error_estimate"][t] == pytest.approx(one["error_estimate"], rel=1e-8)
        assert info["level_norms"][t] == pytest.approx(one["level_norms"], rel=1e-8)


def scaled_tasks(scales):
    """4 tasks of K = 8 steps, task t's inputs scaled by ``scales[t]`` (a larger K·α·‖H‖ for a
    larger scale) and every target by 3."""
    xs, ys, xq, yq = data(4, 8, seed=31)
    xs, ys = xs.clone(), ys.clone()
    for t, scale in enumerate(scales):
        xs[t] *= scale
    return xs, ys * 3.0, xq, yq


@pytest.mark.parametrize("learned_lr", [False, True], ids=["a learned weight decay", "and a learned step size"])
def test_binomial_auto_over_tasks_falls_back_for_every_failed_task_at_once(learned_lr):
    """Every task's series fails (K = 8, a large K·α·‖H‖) and each falls back to the blocked
    expansion, choosing its own blocks (task 0 two blocks of 4 steps, the others four of 2): the
    failed tasks try their blocks together, the tasks trying the same block in one pass. Each
    task's blocks, orders and report, and θ's, λ's and α's gradients, equal separate blocks',
    with fewer products; every task's fallback warns, naming it."""
    model = make_model(3)
    lam = torch.tensor(0.05, dtype=DT, requires_grad=True)
    xs, ys, xq, yq = scaled_tasks([1.0, 3.0, 4.0, 6.0])
    step = torch.tensor(0.1, dtype=DT, requires_grad=True) if learned_lr else 0.1
    estimator, rule, block, infos = mg.Binomial(order="auto", rtol=1e-4), mg.optim.SGD(lr=step), [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, _ = block_over_tasks(model, estimator, rule, (xs, ys, xq, yq), lam, infos=block)
    assert sorted(int(str(w.message).split("for task ")[1][0]) for w in caught) == [0, 1, 2, 3]
    got_lr = take_grads([step]) if learned_lr else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = separate_blocks(model, estimator, rule, (xs, ys, xq, yq), lam, infos=infos)
    info = block[0]
    assert info["blocks"] == [one["blocks"] for one in infos]
    assert info["blocks"][0] == [(0, 4), (4, 8)] and info["blocks"][1] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    for key in ("orders", "fallback", "depth", "converged"):
        assert info[key] == [one[key] for one in infos], key
    assert info["error_estimate"] == pytest.approx([one["error_estimate"] for one in infos], rel=1e-8)
    assert relative(got, want) < 1e-10
    if learned_lr:
        assert relative(got_lr, take_grads([step])) < 1e-10
    # Tasks 1–3 try the same blocks: their attempts are shared (fewer products than two separate
    # blocks take; a fallback per task took more than all four's fallbacks).
    assert info["hessian_vector_products"] < infos[0]["hessian_vector_products"] + infos[1]["hessian_vector_products"]


@pytest.mark.parametrize("learned_lr", [False, True], ids=["a learned weight decay", "and a learned step size"])
@pytest.mark.parametrize("block", [3, "auto"], ids=["block=3", "block='auto'"])
def test_binomial_auto_with_blocks_over_tasks_takes_every_tasks_blocks_at_once(block, learned_lr):
    """order='auto' with blocks over 4 tasks: with block=3 tasks 0–1 keep their blocks and tasks
    2–3 fail one and fall back; with block='auto' tasks 0–1 choose blocks of 4 steps and tasks
    2–3 of 2. The tasks take their blocks together (those trying the same block in one pass):
    each task's blocks, orders and fallback, and θ's, λ's and α's gradients, equal separate
    blocks', with fewer products."""
    model = make_model(3)
    lam = torch.tensor(0.05, dtype=DT, requires_grad=True)
    xs, ys, xq, yq = scaled_tasks([0.3, 1.0, 3.0, 6.0])
    step = torch.tensor(0.1, dtype=DT, requires_grad=True) if learned_lr else 0.1
    estimator, rule, blocked, infos = mg.Binomial(order="auto", rtol=1e-4, block=block), mg.optim.SGD(lr=step), [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, _ = block_over_tasks(model, estimator, rule, (xs, ys, xq, yq), lam, infos=blocked)
        got_lr = take_grads([step]) if learned_lr else None
        want = separate_blocks(model, estimator, rule, (xs, ys, xq, yq), lam, infos=infos)
    info = blocked[0]
    for key in ("blocks", "orders", "fallback", "converged"):
        assert info[key] == [one[key] for one in infos], key
    fell = [one["fallback"] is not None for one in infos]
    assert fell == ([False, False, True, True] if block == 3 else [False] * 4)
    assert relative(got, want) < 1e-10
    if learned_lr:
        assert relative(got_lr, take_grads([step])) < 1e-10
    assert info["hessian_vector_products"] < sum(one["hessian_vector_products"] for one in infos)


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_implicit_over_tasks_solves_each_task_on_its_own(solver):
    """Implicit over tasks: each task's linear system is solved as on its own (its own step
    lengths and stop), so θ's and η's gradients equal separate blocks', and meta.info lists each
    task's iterations, residual and convergence."""
    model = make_model(15)
    lam = torch.tensor(0.05, dtype=DT, requires_grad=True)
    batches = data(3, 6, seed=20)
    estimator = mg.Implicit(reg=20.0, solver=solver, tol=1e-8)
    block, infos = [], []
    got, _ = block_over_tasks(model, estimator, mg.optim.SGD(lr=0.04), batches, lam, infos=block)
    want = separate_blocks(model, estimator, mg.optim.SGD(lr=0.04), batches, lam, infos=infos)
    assert relative(got, want) < 1e-10
    # Each solve stops clearly below the tolerance (1e-8; residuals 8e-10 to 7.5e-9 on the
    # machines measured): rounding on another CPU cannot move a stop by an iteration.
    assert all(info["residual"] < 0.9e-8 for info in infos)
    assert block[0]["iterations"] == [info["iterations"] for info in infos]
    assert block[0]["converged"] == [True, True, True]
    for got_residual, info in zip(block[0]["residual"], infos):
        assert abs(got_residual - info["residual"]) <= 1e-6 * max(info["residual"], 1e-12)


def test_implicit_over_tasks_names_the_tasks_whose_solve_stopped_short():
    model = make_model(16)
    lam = torch.tensor(0.05, dtype=DT, requires_grad=True)
    with pytest.warns(mg.MetaGradientWarning, match=r"Implicit: the cg solve stopped \(tasks \[0, 1\]\) at relative residual"):
        block_over_tasks(model, mg.Implicit(reg=20.0, max_iter=1, tol=1e-12), mg.optim.SGD(lr=0.04),
                         data(2, 3, seed=21), lam)


@pytest.mark.parametrize("value,error", [(0, ValueError), ("2", TypeError), (2.0, TypeError), (True, TypeError)])
def test_tasks_must_be_a_positive_integer(value, error):
    with pytest.raises(error, match="tasks: expected an integer >= 1 or None"):
        mg.MetaGradient(make_model(), mg.optim.SGD(lr=0.1), tasks=value)


class _NormalizedStep:
    """A user rule that divides by the gradient's norm over the whole tensor: over stacked
    tasks it would mix them."""

    def init(self, params):
        return {}

    def step(self, params, grads, state):
        return {n: p - 0.1 * grads[n] / grads[n].norm() for n, p in params.items()}, state


class _PlainStep:
    def init(self, params):
        return {}

    def step(self, params, grads, state):
        return {n: p - 0.1 * grads[n] for n, p in params.items()}, state


def test_a_rule_that_mixes_the_tasks_is_refused_and_an_elementwise_one_runs():
    model = make_model(11)
    lam = torch.tensor(0.05, dtype=DT, requires_grad=True)
    batches = data(2, 2, seed=15)
    with pytest.raises(ValueError, match="inner_opt: a block over tasks=2 .* _NormalizedStep's step .* mixes the tasks"):
        block_over_tasks(model, mg.Checkpointed(), _NormalizedStep(), batches, lam)
    got, _ = block_over_tasks(model, mg.Checkpointed(), _PlainStep(), batches, lam)
    assert relative(got, hand_unroll(model, 0.1, batches, lam)) < 1e-10


def test_a_rule_that_draws_random_numbers_over_tasks_is_refused_naming_the_one_task_block():
    """vmap refuses random operations, so a noisy rule cannot be checked task by task: the error
    says the rule draws and that a block per task replays its draws (not torch's words alone)."""
    model = make_model(11)
    lam = torch.tensor(0.05, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match="inner_opt: NoisySGD's step draws random numbers .* without tasks="):
        block_over_tasks(model, mg.Checkpointed(), NoisySGD(0.1, 0.01), data(2, 2, seed=15), lam)
    assert all(p.grad is None for p in model.parameters()) and lam.grad is None


def test_a_task_batch_changed_in_place_after_its_step_is_caught_by_the_replay_check():
    model = make_model(12)
    xs, ys, xq, yq = data(3, 3, seed=16)
    with pytest.raises(mg.ReplayError, match="step"):
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed(), tasks=3) as meta:
            for k in range(3):
                meta.step(lambda f, x, y: F.mse_loss(f(x), y), xs[:, k], ys[:, k])
            xs[1, 0].mul_(3.0)  # one task's first mini-batch, after its step
            F.mse_loss(meta.fmodel(xq), yq).backward()
    assert all(p.grad is None for p in model.parameters())


def test_one_tasks_adapted_model_and_what_needs_one_task():
    model = make_model(13)
    xs, ys, xq, yq = data(3, 2, seed=17)
    with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed(), tasks=3) as meta:
        for k in range(2):
            meta.step(lambda f, x, y: F.mse_loss(f(x), y), xs[:, k], ys[:, k])
        adapted = meta.fmodel.task(1).to_module()
        torch.testing.assert_close(adapted(xq[1]), meta.fmodel(xq)[1].detach(), rtol=1e-12, atol=1e-12)
        for what in ("state_dict", "to_module"):
            with pytest.raises(ValueError, match=rf"{what}: meta.fmodel holds the fast weights of tasks=3.*task\(t\)"):
                getattr(meta.fmodel, what)()
        with pytest.raises(IndexError, match=r"index: expected an integer in \[0, 3\)"):
            meta.fmodel.task(3)
        w = meta.fast_weights()
        loss = torch.func.vmap(lambda p, x, y: F.mse_loss(torch.func.functional_call(model, p, (x,)), y))(w, xs[:, 0], ys[:, 0]).mean()
        with pytest.raises(ValueError, match="step_from_loss: a block over tasks=3 .* Use meta.step"):
            meta.step_from_loss(loss, w)


def test_torchopt_rules_over_tasks_equal_separate_blocks_and_one_that_mixes_tasks_is_refused():
    torchopt = pytest.importorskip("torchopt")
    model = make_model(14)
    lam = torch.tensor(0.05, dtype=DT, requires_grad=True)
    batches = data(3, 3, seed=18)
    rule = torchopt.sgd(lr=0.1, momentum=0.9)
    got, _ = block_over_tasks(model, mg.Checkpointed(), rule, batches, lam)
    assert relative(got, separate_blocks(model, mg.Checkpointed(), rule, batches, lam)) < 1e-10
    clipped = torchopt.chain(torchopt.clip_grad_norm(0.5), torchopt.sgd(lr=0.1))  # a norm over all tasks
    with pytest.raises(ValueError, match="inner_opt: a block over tasks=3 needs an update rule that acts on each task"):
        block_over_tasks(model, mg.Checkpointed(), clipped, batches, lam)


def test_dropout_over_tasks_is_replayed_exactly():
    """Dropout inside a block over tasks (each task its own mask, vmap's randomness="different"):
    Checkpointed and Binomial(K) rebuild each step with the generator states it ran with, and
    equal Full's unroll of the same steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Dropout(0.3), torch.nn.Tanh(),
                                torch.nn.Linear(16, 1)).to(DT)
    xs, ys, xq, yq = data(3, 4, seed=19)
    grads = []
    for estimator in (mg.Full(), mg.Checkpointed(), mg.Checkpointed(snapshots=2), mg.Binomial(order=4, monitor=False)):
        model.zero_grad()
        torch.manual_seed(5)
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=estimator, tasks=3) as meta:
            for k in range(4):
                meta.step(lambda f, x, y: F.mse_loss(f(x), y), xs[:, k], ys[:, k])
            model.eval()
            query = meta.fmodel(xq)
            model.train()
            F.mse_loss(query, yq).backward()
        grads.append(flat([p.grad for p in model.parameters()]))
    for got in grads[1:]:
        assert relative(got, grads[0]) < 1e-10


def test_implicit_over_tasks_names_the_tasks_that_stopped_short_beside_the_one_that_diverged():
    """The Neumann series diverges for one task (‖H‖/λ = 1.12) and converges too slowly for the
    other's tolerance (0.90: about 4e-10 after 200 terms, against tol=1e-12): the one warning
    names both, where it named the diverging task only."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 12, 3, generator=g, dtype=DT), torch.randn(2, 3, 12, 1, generator=g, dtype=DT)
    xq, yq = torch.randn(2, 12, 3, generator=g, dtype=DT), torch.randn(2, 12, 1, generator=g, dtype=DT)
    w = torch.rand(12, generator=torch.Generator().manual_seed(4), dtype=DT) + 0.5
    model = torch.nn.Linear(3, 1, bias=False).to(DT)
    reg = 1.6  # H* of each task: that of its last step's loss (a quadratic), the data's and the decay's
    ratios = [float(torch.linalg.eigvalsh(x[t, 2].T @ torch.diag(w) @ x[t, 2] / 12).max() + 0.3) / reg for t in (0, 1)]
    assert 0.85 < ratios[0] < 0.95 and ratios[1] > 1.05, ratios
    estimator = mg.Implicit(reg=reg, solver="neumann", max_iter=200, tol=1e-12)
    with pytest.warns(mg.MetaGradientWarning, match=r"diverging \(tasks \[1\]\).*Tasks \[0\] stopped above tol=1e-12"):
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.3), estimator=estimator, tasks=2) as meta:
            for k in range(3):
                meta.step(lambda f, a, b: 0.5 * (w * ((f(a) - b) ** 2).squeeze(-1)).mean()
                          + 0.15 * (f.params["weight"] ** 2).sum(), x[:, k], y[:, k])
            F.mse_loss(meta.fmodel(xq), yq).backward()
