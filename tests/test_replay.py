"""metagrad.replay: frozen closures, the replay check's switch, and the vmapped check's fallback.

The user patterns themselves (mini-batch loops, dropout, iterators, ...) are in
tests/test_user_patterns.py; here are the pieces they rest on.
"""

from __future__ import annotations

import functools
import threading

import pytest
import torch
import torch.nn.functional as F

import metagrad as mg
from metagrad import batched, replay

DT = torch.float64
K = 4


def make_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(DT)


def batches(count: int = K) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, generator=generator, dtype=DT), torch.randn(6, 2, generator=generator, dtype=DT))
            for _ in range(count)]


QUERY = (torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=DT),
         torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=DT))


def reference(net: torch.nn.Module, data, lr: torch.Tensor, log_wd: torch.Tensor) -> list[torch.Tensor]:
    """A hand-unrolled loop: the gradient of the query w.r.t. θ, lr and log_wd."""
    params = dict(net.named_parameters())
    for x, y in data:
        loss = F.mse_loss(torch.func.functional_call(net, params, (x,)), y) + log_wd.exp() * sum(
            (p ** 2).sum() for p in params.values())
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
    query = F.mse_loss(torch.func.functional_call(net, params, (QUERY[0],)), QUERY[1])
    return list(torch.autograd.grad(query, [*net.parameters(), lr, log_wd]))


def metagrad_run(net, data, lr, log_wd, estimator, **kwargs) -> list[torch.Tensor]:
    for t in [*net.parameters(), lr, log_wd]:
        t.grad = None
    with mg.MetaGradient(net, mg.optim.SGD(lr=lr), estimator=estimator, **kwargs) as meta:
        for x, y in data:
            meta.step(lambda f: F.mse_loss(f(x), y) + log_wd.exp() * sum((p ** 2).sum() for p in f.params.values()))
        F.mse_loss(meta.fmodel(QUERY[0]), QUERY[1]).backward()
    return [t.grad.clone() for t in [*net.parameters(), lr, log_wd]]


def assert_close_all(got, expected) -> None:
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_vmapped_rows_that_miss_the_tolerance_are_rebuilt_alone(monkeypatch):
    """A batched call whose rows fail the check (as a batched kernel's rounding can make them
    fail) recomputes those rows one at a time; the θ- and η-gradients stay exact."""
    net, data = make_net(), batches()
    lr = torch.tensor(0.2, dtype=DT, requires_grad=True)
    log_wd = torch.tensor(-2.0, dtype=DT, requires_grad=True)
    expected = reference(net, data, lr, log_wd)
    real = batched.check_norms
    flagged: list[int] = []

    def strict_under_vmap(*args, **kwargs):
        if kwargs.get("raising", True):
            return real(*args, **kwargs)
        steps = args[0]
        rows = list(range(len(steps)))[::2]  # every other row "fails"
        flagged.extend(steps[i] for i in rows)
        return rows

    monkeypatch.setattr(batched, "check_norms", strict_under_vmap)
    got = metagrad_run(net, data, lr, log_wd, mg.Binomial(order=K))
    assert flagged  # the vmapped path ran and some rows were redone alone
    assert_close_all(got, expected)


def test_a_real_mismatch_in_a_vmapped_row_still_raises():
    net, data = make_net(), batches()
    lr = torch.tensor(0.2, dtype=DT, requires_grad=True)
    x = data[0][0].clone()
    with pytest.raises(mg.ReplayError, match="in place"):
        with mg.MetaGradient(net, mg.optim.SGD(lr=lr), estimator=mg.Binomial(order=K)) as meta:
            for _ in range(K):
                meta.step(lambda f: F.mse_loss(f(x), data[0][1]))
                x.add_(0.5)
            F.mse_loss(meta.fmodel(QUERY[0]), QUERY[1]).backward()


@pytest.mark.parametrize("value", ["yes", 0, -1e-3, float("nan"), None])
def test_check_replay_rejects_what_it_cannot_use(value):
    with pytest.raises(ValueError, match="check_replay"):
        mg.MetaGradient(make_net(), mg.optim.SGD(lr=0.1), estimator="checkpointed", check_replay=value)


def test_check_replay_sets_the_tolerance_and_false_turns_it_off():
    """With the check off, an iterator read inside the closure is rebuilt with other batches
    and nothing says so (the documented cost of check_replay=False); with a tolerance it raises."""
    net = make_net()
    data = batches(2 * K)

    def run(check):
        it = iter(data)

        def closure(f):
            x, y = next(it)
            return F.mse_loss(f(x), y)

        with mg.MetaGradient(net, mg.optim.SGD(lr=0.2), estimator="checkpointed", check_replay=check) as meta:
            for _ in range(K):
                meta.step(closure)
            F.mse_loss(meta.fmodel(QUERY[0]), QUERY[1]).backward()

    with pytest.raises(mg.ReplayError):
        run(1e-4)
    run(False)


def test_frozen_closure_keeps_the_values_a_loop_variable_had():
    values = []
    frozen = []
    for i in range(3):
        frozen.append(replay.freeze(lambda: values.append(i) or i))
    assert [f() for f in frozen] == [0, 1, 2]


def test_frozen_partial_and_defaults_and_method():
    class Holder:
        def __init__(self) -> None:
            self.scale = 2.0

        def loss(self, x):
            return self.scale * x

    tensor = torch.ones(2)
    part = replay.freeze(functools.partial(torch.add, tensor, other=torch.ones(2)))
    torch.testing.assert_close(part(), torch.full((2,), 2.0))
    holder = Holder()
    method = replay.freeze(holder.loss)
    holder.scale = 3.0  # state read through an object is not frozen: the check guards it
    assert float(method(torch.ones(()))) == 3.0
    a = torch.zeros(3)

    def make(t):
        return lambda f, t=t: t + f

    first, second = replay.freeze(make(a)), replay.freeze(make(torch.ones(3)))
    assert first.key == second.key  # same code, tensors of one shape: batchable together
    assert first.tensors[0][1] is a
    assert replay.freeze(make(torch.ones(4))).key != first.key  # another shape


def test_frozen_key_separates_tensors_that_require_grad():
    """A tensor that requires grad is a meta-parameter: another one makes another closure."""
    u, w = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    assert replay.freeze(lambda f: f + u).key != replay.freeze(lambda f: f + w).key


@pytest.mark.parametrize("make_estimator", [mg.Checkpointed, lambda: mg.Truncated(3)],
                         ids=["checkpointed", "truncated-K"])
def test_steps_taken_under_autocast_are_rebuilt_under_it(make_estimator):
    """An inner loop inside ``torch.autocast`` (mixed precision) and a backward outside it: the
    rebuilt steps run under the autocast they were taken in, and give the unrolled gradient.
    (Binomial is left out: its products ``(J − I)u`` are differences of nearly equal vectors,
    which bfloat16 cannot resolve; it is replayed the same way.)"""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    data = [(x.float(), y.float()) for x, y in batches(3)]
    xq, yq = QUERY[0].float(), QUERY[1].float()

    params = dict(net.named_parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for x, y in data:
            loss = F.mse_loss(torch.func.functional_call(net, params, (x,)).float(), y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {n: p - 0.1 * g for (n, p), g in zip(params.items(), grads)}
    expected = torch.autograd.grad(F.mse_loss(torch.func.functional_call(net, params, (xq,)), yq),
                                   list(net.parameters()))

    with mg.MetaGradient(net, mg.optim.SGD(lr=0.1), estimator=make_estimator()) as meta:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for x, y in data:
                meta.step(lambda f: F.mse_loss(f(x).float(), y))
        F.mse_loss(meta.fmodel(xq), yq).backward()
    for p, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------- what a replay error names (issue 21)
def unrolled(net: torch.nn.Module, data, lr: float, loss_of) -> list[torch.Tensor]:
    """A hand-unrolled loop: the query's gradient w.r.t. θ, with ``loss_of(params, x, y)``."""
    params = dict(net.named_parameters())
    for x, y in data:
        grads = torch.autograd.grad(loss_of(params, x, y), list(params.values()), create_graph=True)
        params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
    return list(torch.autograd.grad(loss_of(params, *QUERY), list(net.parameters())))


def test_a_number_read_through_a_captured_object_is_read_as_the_step_read_it():
    """``cfg.temp`` changed between steps: objects are not frozen, but the number the closure
    reads through one is noted at each step and set back for the step's rebuild (then put
    back): the meta-gradient is the hand-written unroll's, with each step's own temperature."""
    class Config:
        temp = 0.0

    cfg = Config()
    net, data = make_net(), batches(3)
    with mg.MetaGradient(net, mg.optim.SGD(lr=0.2), estimator=mg.Checkpointed()) as meta:
        for k, (x, y) in enumerate(data):
            cfg.temp = 1.0 + k
            meta.step(lambda f: F.mse_loss(f(x), y) * cfg.temp)
        F.mse_loss(meta.fmodel(QUERY[0]), QUERY[1]).backward()
    assert cfg.temp == 3.0  # put back after the rebuilds
    theta = dict(net.named_parameters())
    phi = dict(theta)
    for k, (x, y) in enumerate(data):
        loss = F.mse_loss(torch.func.functional_call(net, phi, (x,)), y) * (1.0 + k)
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
        phi = {n: p - 0.2 * g for (n, p), g in zip(phi.items(), grads)}
    expected = torch.autograd.grad(F.mse_loss(torch.func.functional_call(net, phi, (QUERY[0],)), QUERY[1]),
                                   list(theta.values()))
    for p, g in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_a_frozen_closure_sees_attributes_of_captured_objects_and_modules():
    class Inner:
        def __init__(self) -> None:
            self.temp = 0.5

    class Outer:
        def __init__(self) -> None:
            self.inner = Inner()
            self.name = "x"

    outer = Outer()
    frozen = replay.freeze(lambda f: f * outer.inner.temp)
    assert [(name, value) for name, _, _, value in frozen.reads] == [("outer.inner.temp", 0.5)]
    before = frozen.reads_key()
    outer.inner.temp = 0.25
    assert frozen.reads_key() != before
    assert frozen.changed_reads() == [("outer.inner.temp", 0.5, 0.25)]
    module = torch.nn.LeakyReLU(0.1)
    assert [name for name, *_ in replay.freeze(lambda f: f * module.negative_slope).reads] == [
        "module.negative_slope"]


def spectral_net(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 5).to(DT)
    layer = (torch.nn.utils.spectral_norm(layer) if kind == "hook"
             else torch.nn.utils.parametrizations.spectral_norm(layer))
    return torch.nn.Sequential(layer, torch.nn.Tanh(), torch.nn.Linear(5, 2).to(DT))


def spectral_loss(net: torch.nn.Module):
    """The loss of ``net`` at given parameters, spectral norm with u and v held as they are."""
    first = [n for n, _ in net.named_parameters() if n.startswith("0.") and "bias" not in n][0]
    buffers = dict(net.named_buffers())
    u, v = [t for n, t in buffers.items() if n.endswith("u")][0], [t for n, t in buffers.items() if n.endswith("v")][0]

    def loss(params, x, y):
        weight = params[first]
        weight = weight / torch.dot(u, torch.mv(weight, v))
        hidden = torch.tanh(F.linear(x, weight, params["0.bias"]))
        return F.mse_loss(F.linear(hidden, params["2.weight"], params["2.bias"]), y)

    return loss


@pytest.mark.parametrize("kind", ["hook", "parametrizations"])
def test_spectral_norm_in_training_mode_is_named_and_eval_mode_is_exact(kind):
    """spectral_norm's power iteration writes u and v at every call in training mode, so no rebuilt
    step is the step taken: the error names the buffers, the layer and eval mode. In eval mode
    (u and v held) every estimator that rebuilds steps gives the hand-unrolled gradient."""
    data = batches(3)
    net = spectral_net(kind)
    with pytest.raises(mg.ReplayError) as error:
        with mg.MetaGradient(net, mg.optim.SGD(lr=0.2), estimator=mg.Checkpointed()) as meta:
            for x, y in data:
                meta.step(lambda f: F.mse_loss(f(x), y))
            F.mse_loss(meta.fmodel(QUERY[0]), QUERY[1]).backward()
    message = str(error.value)
    buffers = ["0.weight_u", "0.weight_v"] if kind == "hook" else [
        "0.parametrizations.weight.0._u", "0.parametrizations.weight.0._v"]
    assert str(buffers) in message
    assert ("torch.nn.utils.spectral_norm on '0'" if kind == "hook"
            else "torch.nn.utils.parametrizations.spectral_norm on '0'") in message
    assert "model.get_submodule('0').eval()" in message and "check_replay=False" not in message

    for estimator in (mg.Checkpointed(), mg.Binomial(order=3)):
        net = spectral_net(kind)
        net[0].eval()
        expected = unrolled(net, data, 0.2, spectral_loss(net))
        net.zero_grad(set_to_none=True)
        with mg.MetaGradient(net, mg.optim.SGD(lr=0.2), estimator=estimator) as meta:
            for x, y in data:
                meta.step(lambda f: F.mse_loss(f(x), y))
            F.mse_loss(meta.fmodel(QUERY[0]), QUERY[1]).backward()
        assert_close_all([p.grad for p in net.parameters()], expected)


def dropout_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                               torch.nn.Linear(8, 2)).to(DT)


def test_random_state_sees_draws_that_are_not_the_steps_own():
    """The conditions the replay error reads, in one thread: a replay that draws what the step
    drew ends where the step ended; one that draws more does not; no other thread is named."""
    state = replay.RandomState.capture(torch.device("cpu"))
    drawn = torch.rand(3)
    assert state.changed() and state.others == ()
    with state.replay():
        assert torch.equal(torch.rand(3), drawn)
    assert not state.foreign
    with state.replay():
        torch.rand(4)  # another count of numbers: not the step's draws
    assert state.foreign


def test_generators_reached_are_those_the_code_draws_from():
    """metagrad.generators finds the generators besides torch's default ones from the closure's
    code: Python's random module, NumPy's global generator where the code reads ``.random``
    (not ``np.sqrt``, which draws nothing: capturing NumPy's state would cost every step),
    generator objects held or read through a helper, modules a helper imports as it runs; none
    for the OS's entropy or a closure that draws from nothing; and the caller's states are put
    back after a replay."""
    import random

    import numpy as np

    from metagrad.frozen import freeze
    from metagrad.generators import RandomState

    x = torch.randn(3, dtype=DT)
    own = np.random.default_rng(1)

    def helper(a):
        return a * own.random()

    def kinds(closure):
        return sorted(source.kind for source in freeze(closure).generators())

    assert kinds(lambda f: f(x).sum() * np.sqrt(2.0) * np.pi) == []
    assert kinds(lambda f: f(x).sum()) == []
    assert kinds(lambda f: f(x).sum() * np.random.rand()) == ["numpy"]
    assert kinds(lambda f: f(x).sum() * random.random()) == ["python"]
    assert kinds(lambda f: f(helper(x)).sum()) == ["numpy.Generator"]

    def imports_numpy(a):  # (a module imported as the function runs is reached too)
        import numpy
        return a * numpy.random.rand()

    def imports_gauss(a):
        from random import gauss
        return a * gauss(0.0, 1.0)

    def imports_numpy_for_math(a):
        import numpy
        return a * numpy.sqrt(2.0)

    assert kinds(lambda f: f(imports_numpy(x)).sum()) == ["numpy"]
    assert kinds(lambda f: f(imports_gauss(x)).sum()) == ["python"]
    assert kinds(lambda f: f(imports_numpy_for_math(x)).sum()) == []
    assert kinds(lambda f: f(x).sum() * random.SystemRandom().random()) == ["python"]  # (the module)
    system = random.SystemRandom()
    assert kinds(lambda f: f(x).sum() * system.random()) == []

    sources = freeze(lambda f: f(x).sum() * random.random() * np.random.rand() * helper(x).sum()).generators()
    random.seed(0)
    np.random.seed(0)
    state = RandomState.capture(torch.device("cpu"), sources)
    drawn = (random.random(), np.random.rand(), own.random())
    assert state.changed()
    after = (random.getstate(), np.random.get_state()[1].copy(), own.bit_generator.state)
    with state.replay():
        assert (random.random(), np.random.rand(), own.random()) == drawn
    assert not state.foreign
    assert random.getstate() == after[0] and (np.random.get_state()[1] == after[1]).all()
    assert own.bit_generator.state == after[2]


def test_a_thread_drawing_during_another_threads_step_is_named():
    """Two threads, each with its own model and block, dropout on. The events make thread B draw
    its dropout mask while thread A's step is open (what happens by chance in 12–28% of blocks
    when both run freely): A's step then drew other numbers than its replay does, and the error
    says so, names B and the fixes. B's block, whose draws nothing interleaved, passes the check."""
    data = batches(2)
    net_a, net_b = dropout_net(0), dropout_net(1)  # (seeding draws nothing during the steps)
    a_open, b_drew, a_done = threading.Event(), threading.Event(), threading.Event()
    b_result: dict[str, object] = {}

    def b_closure(f):
        a_open.wait(30)
        loss = F.mse_loss(f(data[1][0]), data[1][1])  # draws a dropout mask
        b_drew.set()
        return loss

    def b_block():
        net = net_b
        try:
            with mg.MetaGradient(net, mg.optim.SGD(lr=0.2), estimator=mg.Checkpointed()) as meta:
                meta.step(b_closure)
                a_done.wait(30)  # A's block has ended: nothing else draws now
                F.mse_loss(meta.fmodel(QUERY[0]), QUERY[1]).backward()
            b_result["grads"] = [p.grad for p in net.parameters()]
        except Exception as error:  # pragma: no cover - reported by the assertion below
            b_result["error"] = error

    def a_closure(f):
        a_open.set()
        b_drew.wait(30)
        return F.mse_loss(f(data[0][0]), data[0][1])

    other = threading.Thread(target=b_block, name="metagrad-test-B")
    torch.manual_seed(5)
    other.start()
    try:
        with pytest.raises(mg.ReplayError) as error:
            with mg.MetaGradient(net_a, mg.optim.SGD(lr=0.2), estimator=mg.Checkpointed()) as meta:
                meta.step(a_closure)
                F.mse_loss(meta.fmodel(QUERY[0]), QUERY[1]).backward()
    finally:
        a_done.set()
        other.join(60)
    message = str(error.value)
    assert "metagrad-test-B" in message and "thread" in message
    assert "torch.Generator" in message and "mg.Full()" in message and "check_replay=False" not in message
    assert "error" not in b_result and all(torch.isfinite(g).all() for g in b_result["grads"])


def test_a_mismatch_on_a_step_that_ran_compiled_says_so():
    """A step product computed by a compiled function holds the Python values it was traced with:
    a mismatch there names compile=True and its fixes, and does not offer check_replay=False."""
    helper = {"temp": 1.0}  # read through a call: not a number the frozen closure can see
    frozen = replay.freeze(lambda f: f * helper.get("temp"))
    frozen.compiled = "product"
    start, stored = torch.zeros(1, 2, dtype=DT), torch.ones(1, 2, dtype=DT)
    with pytest.raises(mg.ReplayError) as error:
        replay.check_step([3], [2 * stored], [stored], [start], 1e-7, closures=[frozen])
    message = str(error.value)
    assert "Inner step 3 ran compiled" in message and "compile=False" in message
    assert "temp = cfg.temp" in message and "check_replay=False" not in message
    frozen.compiled = None  # the same mismatch, eager: the generic causes and the tolerance
    with pytest.raises(mg.ReplayError, match="check_replay=False skips this check"):
        replay.check_step([3], [2 * stored], [stored], [start], 1e-7, closures=[frozen])


def test_a_loss_module_is_keyed_by_its_settings_and_one_with_state_by_identity():
    """A new ``nn.MSELoss()`` per task finds what the last one found (its key is its type and
    settings); other settings, a hook or a weight make another key."""
    from metagrad.frozen import _value_key

    assert _value_key(torch.nn.MSELoss()) == _value_key(torch.nn.MSELoss())
    assert _value_key(torch.nn.MSELoss()) != _value_key(torch.nn.MSELoss(reduction="sum"))
    assert _value_key(torch.nn.CrossEntropyLoss(label_smoothing=0.1)) != _value_key(torch.nn.CrossEntropyLoss())
    hooked = torch.nn.MSELoss()
    hooked.register_forward_hook(lambda *args: None)
    weighted = torch.nn.CrossEntropyLoss(weight=torch.ones(3))
    assert _value_key(hooked) == ("object", id(hooked))
    assert _value_key(weighted) == ("object", id(weighted))
