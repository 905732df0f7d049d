"""``MetaGradient(compile=True)``: compiled inner steps and step products (metagrad.compiled).

Every estimator with ``compile=True`` must give what it gives eagerly (1e-10 in float64, 1e-6
in float32), for θ and for every kind of meta-parameter; Checkpointed with ``compile=True`` is
also checked against a hand-unrolled autograd loop. What cannot be compiled runs eagerly with
one warning, and the replay check still covers compiled products.

Compiling costs seconds per function, so one small model and one shape are shared by the
tests (the compiled functions are cached across them, as across a user's tasks).
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import metagrad as mg
import metagrad.compiled as compiled_cache
from metagrad.numerics import at_precision, relative_tolerance

try:
    from reference import NoisySGD
except ImportError:  # collected as a package (pytest --import-mode=importlib, python -m pytest from elsewhere)
    from tests.reference import NoisySGD

DT = torch.float64
HIDDEN = 8
SHOTS = 6
#: ``compile=`` for the tests of what metagrad does around torch.compile (what is traced, guarded,
#: cached, compiled again, run eagerly): TorchDynamo and AOTAutograd as ``compile=True`` runs them,
#: without inductor's code generation (a C++ compile per graph, most of a cold test's time). The
#: compiled numbers themselves are tested with ``compile=True``.
TRACED = {"backend": "aot_eager"}


def make_model(dtype: torch.dtype = DT, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(1, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1)).to(dtype)


def tasks(count: int, steps: int, seed: int, dtype: torch.dtype = DT) -> list[tuple[list, torch.Tensor, torch.Tensor]]:
    """Per task: the mini-batches of its inner steps, and a query."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        batches = []
        for _ in range(steps):
            x = torch.rand(SHOTS, 1, generator=g, dtype=dtype) * 4 - 2
            batches.append((x, torch.sin(x)))
        xq = torch.rand(SHOTS, 1, generator=g, dtype=dtype) * 4 - 2
        out.append((batches, xq, torch.sin(xq)))
    return out


def meta_gradient(model: torch.nn.Module, estimator: mg.Estimator, rule, compile: bool, task,
                  lam: torch.Tensor | None = None, adapt=None, random: bool = False,
                  infos: list | None = None) -> torch.Tensor:
    """One meta-gradient from the context manager: the loop a user writes. With ``compile``,
    also checks that the inner steps after the first ran compiled, and the products if the
    estimator computes any (none of either for a closure that draws ``random`` numbers).
    ``infos`` receives the block's ``meta.info``."""
    batches, xq, yq = task
    extra = [] if lam is None else [lam]
    for p in [*model.parameters(), *extra]:
        p.grad = None
    with mg.MetaGradient(model, rule, estimator=estimator, compile=compile, adapt=adapt) as meta:
        for x, y in batches:
            if lam is None:
                meta.step(lambda f: ((f(x) - y) ** 2).mean())
            else:
                meta.step(lambda f: ((f(x) - y) ** 2).mean() + lam * sum((w ** 2).sum() for w in f.parameters()))
        ((meta.fmodel(xq) - yq) ** 2).mean().backward()
    if infos is not None:
        infos.append(meta.info)
    if compile:
        counts = meta.info["compiled"]
        assert counts["estimator"] == repr(estimator.under_compile()), counts
        if random:
            assert {k: counts[k] for k in ("inner_steps", "products", "sweeps")} == \
                {"inner_steps": 0, "products": 0, "sweeps": 0}, counts
            return torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert counts["inner_steps"] == len(batches) - 1, counts
        if meta.info.get("hessian_vector_products") and not isinstance(estimator, mg.Implicit):
            assert counts["products"] > 0, counts
    grads = [p.grad for p in [*model.parameters(), *extra]]
    return torch.cat([torch.zeros(1, dtype=xq.dtype) if g is None else g.reshape(-1) for g in grads])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


ESTIMATORS = [mg.Checkpointed(), mg.Truncated(steps=2), mg.FirstOrder(), mg.Binomial(order=2, monitor=False),
              mg.Binomial(order=2, block=2, monitor=False), mg.Binomial(order="auto"), mg.Implicit(reg=5.0)]


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_every_estimator_equals_its_eager_self_float64(estimator):
    model = make_model()
    lam = torch.tensor(0.01, dtype=DT, requires_grad=True)  # a captured meta-parameter
    rule = mg.optim.SGD(lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mg.MetaGradientWarning)
        for task in tasks(2, 4, seed=1):
            eager = meta_gradient(model, estimator, rule, False, task, lam)
            compiled = meta_gradient(model, estimator, rule, True, task, lam)
            assert relative(compiled, eager) < 1e-10


@pytest.mark.parametrize("rule", [mg.optim.Momentum(lr=0.05, momentum=0.9), mg.optim.Adam(lr=0.01)], ids=repr)
def test_stateful_rules_carry_the_state_adjoint(rule):
    model = make_model()
    for task in tasks(2, 4, seed=2):
        eager = meta_gradient(model, mg.Checkpointed(), rule, False, task)
        compiled = meta_gradient(model, mg.Checkpointed(), rule, True, task)
        assert relative(compiled, eager) < 1e-10


def test_anil_and_learned_step_sizes():
    """Parameters outside adapt= and step sizes that require grad are meta-parameters."""
    model = make_model()
    head = [n for n, _ in model.named_parameters() if n.startswith("2.")]
    lr = {n: torch.full_like(p, 0.05).requires_grad_() for n, p in model.named_parameters() if n in head}
    for estimator in (mg.Checkpointed(), mg.Binomial(order=2, monitor=False)):
        results = []
        for compile in (False, True):
            for t in lr.values():
                t.grad = None
            g = meta_gradient(model, estimator, mg.optim.SGD(lr=lr), compile, tasks(1, 3, seed=3)[0], adapt=head)
            results.append(torch.cat([g, *[t.grad.reshape(-1) for t in lr.values()]]))
        assert relative(results[1], results[0]) < 1e-10


@settings(max_examples=5, deadline=None)
# The step size is a constant of the compiled step (the cache is keyed on it), so a few values
# are drawn from, not a continuum: each new value would compile again.
@given(steps=st.integers(1, 5), lr=st.sampled_from([0.02, 0.1, 0.2]), seed=st.integers(0, 2**16))
def test_checkpointed_compiled_equals_a_hand_unrolled_loop(steps, lr, seed):
    model = make_model()
    task = tasks(1, steps, seed)[0]
    got = meta_gradient(model, mg.Checkpointed(), mg.optim.SGD(lr=lr), True, task)
    # The reference: a plain autograd unroll with create_graph=True, written here.
    theta = list(model.parameters())
    phi = list(theta)

    def forward(params, x):
        return torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, params[0], params[1])),
                                          params[2], params[3])

    batches, xq, yq = task
    for x, y in batches:
        loss = ((forward(phi, x) - y) ** 2).mean()
        grads = torch.autograd.grad(loss, phi, create_graph=True)
        phi = [p - lr * g for p, g in zip(phi, grads)]
    want = torch.autograd.grad(((forward(phi, xq) - yq) ** 2).mean(), theta)
    assert relative(got, torch.cat([g.reshape(-1) for g in want])) < 1e-10


def test_checkpointed_sweeps_runs_of_steps_in_one_compiled_call():
    """Checkpointed's backward with compile=True pulls the vector back through runs of
    ``SWEEP`` steps in one call each (K = 13: three runs of 4, then one product), the momentum
    buffer's adjoint and a captured η carried through each run; against a hand-written float64
    unroll."""
    model = make_model()
    lam = torch.tensor(0.03, dtype=DT, requires_grad=True)
    lr, mu = 0.05, 0.9
    task = tasks(1, 13, seed=21)[0]
    batches, xq, yq = task
    for p in [*model.parameters(), lam]:
        p.grad = None
    with mg.MetaGradient(model, mg.optim.Momentum(lr=lr, momentum=mu), estimator=mg.Checkpointed(),
                         compile=TRACED) as meta:
        for x, y in batches:
            meta.step(lambda f: ((f(x) - y) ** 2).mean() + lam * sum((w ** 2).sum() for w in f.parameters()))
        ((meta.fmodel(xq) - yq) ** 2).mean().backward()
    runs = 13 // mg.estimators.base.SWEEP
    assert meta.info["compiled"]["sweeps"] == runs and meta.info["compiled"]["products"] == 13, meta.info["compiled"]
    got = torch.cat([*(p.grad.reshape(-1) for p in model.parameters()), lam.grad.reshape(-1)])
    assert relative(got, hand_unroll_with_momentum(model, task, lam, lr, mu)) < 1e-10


def hand_unroll_with_momentum(model: torch.nn.Module, task, lam: torch.Tensor, lr: float = 0.05,
                              mu: float = 0.9) -> torch.Tensor:
    """∇ of the query loss in (θ, λ) by autograd through a hand-written unroll of
    ``torch.optim.SGD(momentum=mu)`` on the inner loss MSE + λ·Σ‖w‖² (:func:`meta_gradient`'s
    closure with ``lam``)."""
    batches, xq, yq = task
    theta = list(model.parameters())
    phi, buffer = list(theta), None

    def forward(params, x):
        return torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, params[0], params[1])),
                                          params[2], params[3])

    for x, y in batches:
        loss = ((forward(phi, x) - y) ** 2).mean() + lam * sum((w ** 2).sum() for w in phi)
        grads = torch.autograd.grad(loss, phi, create_graph=True)
        buffer = list(grads) if buffer is None else [mu * b + g for b, g in zip(buffer, grads)]
        phi = [p - lr * b for p, b in zip(phi, buffer)]
    want = torch.autograd.grad(((forward(phi, xq) - yq) ** 2).mean(), [*theta, lam])
    return torch.cat([g.reshape(-1) for g in want])


def test_truncated_sweeps_its_last_steps_with_the_state_held_constant():
    """Truncated(9) with momentum: its last 9 steps in two compiled runs of 4 and one product,
    the momentum buffer held constant (MATH.md's table), equal to eager Truncated(9)."""
    model = make_model()
    rule = mg.optim.Momentum(lr=0.05, momentum=0.9)
    task = tasks(1, 11, seed=23)[0]
    eager = meta_gradient(model, mg.Truncated(steps=9), rule, False, task)
    batches, xq, yq = task
    for p in model.parameters():
        p.grad = None
    with mg.MetaGradient(model, rule, estimator=mg.Truncated(steps=9), compile=True) as meta:
        for x, y in batches:
            meta.step(lambda f: ((f(x) - y) ** 2).mean())
        ((meta.fmodel(xq) - yq) ** 2).mean().backward()
    assert meta.info["compiled"]["sweeps"] == 9 // mg.estimators.base.SWEEP, meta.info["compiled"]
    compiled = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert relative(compiled, eager) < 1e-10


@pytest.mark.parametrize("changed", [2, 4, 5])
def test_the_replay_check_covers_steps_of_a_compiled_sweep(changed):
    """Every step of a run of 2 … 5 (SWEEP = 4) is checked inside the compiled sweep's call, the
    last one against φ_K, the iterate after the run."""
    model = make_model()
    batches, xq, yq = tasks(1, 6, seed=9)[0]
    with pytest.raises(mg.ReplayError, match=f"step {changed}") as error:
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.05), estimator=mg.Checkpointed(), compile=True) as meta:
            for x, y in batches:
                meta.step(lambda f: ((f(x) - y) ** 2).mean())
            batches[changed][0].mul_(3.0)  # a captured mini-batch changed in place after its step
            ((meta.fmodel(xq) - yq) ** 2).mean().backward()
    assert "ran compiled" in str(error.value)


def test_float32_equals_eager_to_1e_6():
    model = make_model(torch.float32)
    for estimator in (mg.Checkpointed(), mg.Binomial(order=2, monitor=False)):
        for task in tasks(2, 4, seed=4, dtype=torch.float32):
            eager = meta_gradient(model, estimator, mg.optim.SGD(lr=0.05), False, task)
            compiled = meta_gradient(model, estimator, mg.optim.SGD(lr=0.05), True, task)
            assert relative(compiled, eager) < 1e-6


def test_new_tasks_of_the_same_shapes_do_not_recompile():
    model = make_model()
    rule = mg.optim.SGD(lr=0.05)
    meta_gradient(model, mg.Checkpointed(), rule, True, tasks(1, 3, seed=5)[0])  # compiles
    entries = len(compiled_cache._CACHE)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for task in tasks(3, 3, seed=6):  # new data, a new rule object with the same lr
            meta_gradient(model, mg.Checkpointed(), mg.optim.SGD(lr=0.05), True, task)
    assert len(compiled_cache._CACHE) == entries  # nothing new is kept per task


def test_a_new_loss_module_per_task_does_not_recompile():
    """Written as users write it: a new ``nn.MSELoss()`` per task, a new lambda per step. A
    module without state is keyed by its type and settings, so the compiled step and product
    of the first task are found again; one with other settings compiles its own."""
    model = make_model()
    rule = mg.optim.SGD(lr=0.05)

    def run(task, criterion):
        batches, xq, yq = task
        model.zero_grad()
        with mg.MetaGradient(model, rule, estimator=mg.Checkpointed(), compile=True) as meta:
            for x, y in batches:
                meta.step(lambda f: criterion(f(x), y))
            criterion(meta.fmodel(xq), yq).backward()
        return meta.info["compiled"]

    run(tasks(1, 3, seed=11)[0], torch.nn.MSELoss())  # compiles
    entries = len(compiled_cache._CACHE)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for task in tasks(3, 3, seed=12):
            counts = run(task, torch.nn.MSELoss())
            assert counts["inner_steps"] == 2 and counts["products"] > 0, counts
    assert len(compiled_cache._CACHE) == entries
    run(tasks(1, 3, seed=13)[0], torch.nn.MSELoss(reduction="sum"))  # other settings: its own entries
    assert len(compiled_cache._CACHE) > entries


def test_a_closure_that_cannot_be_compiled_runs_eagerly_with_one_warning(capsys):
    model = make_model()
    batches, xq, yq = tasks(1, 3, seed=7)[0]

    def run(compile: bool) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.05), estimator=mg.Checkpointed(), compile=compile) as meta:
            for x, y in batches:
                def closure(f, x=x, y=y):
                    loss = ((f(x) - y) ** 2).mean()
                    print(f"inner loss {float(loss):.3f}")  # a Python side effect on a tensor value
                    return loss
                meta.step(closure)
            ((meta.fmodel(xq) - yq) ** 2).mean().backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    eager = run(False)
    with pytest.warns(mg.MetaGradientWarning, match="compile=True") as record:
        compiled = run(True)
    messages = [str(w.message) for w in record if "compile=True" in str(w.message)]

    assert len(messages) == 1
    assert relative(compiled, eager) < 1e-10
    assert "inner loss" in capsys.readouterr().out


def test_dropout_steps_are_replayed_eagerly():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, HIDDEN), torch.nn.Tanh(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(HIDDEN, 1)).to(DT)
    task = tasks(1, 3, seed=8)[0]
    results = []
    for compile in (False, True):
        torch.manual_seed(1)
        results.append(meta_gradient(model, mg.Checkpointed(), mg.optim.SGD(lr=0.05), compile, task, random=True))
    assert relative(results[1], results[0]) < 1e-10


def test_numpy_draws_in_the_closure_and_a_noisy_rule_are_replayed_under_compile():
    """A closure that draws from NumPy's global generator and a rule that draws from torch's
    (σ learned from zero, where no rebuilt step's value shows a draw not replayed): compiled
    Checkpointed equals eager Full, for θ and σ."""
    np = pytest.importorskip("numpy")
    model = make_model(seed=3)
    task = tasks(1, 3, seed=9)[0]
    batches, xq, yq = task
    results = []
    for estimator, compile in ((mg.Full(), False), (mg.Checkpointed(), TRACED)):
        for p in model.parameters():
            p.grad = None
        sigma = torch.zeros((), dtype=DT, requires_grad=True)
        torch.manual_seed(4)
        np.random.seed(5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mg.MetaGradientWarning)  # (a closure that draws runs eagerly)
            with mg.MetaGradient(model, NoisySGD(0.05, sigma), estimator=estimator, compile=compile) as meta:
                for x, y in batches:
                    meta.step(lambda f: F.mse_loss(f(x + torch.from_numpy(0.1 * np.random.standard_normal(tuple(x.shape)))), y))
                F.mse_loss(meta.fmodel(xq), yq).backward()
        results.append(torch.cat([sigma.grad.reshape(1), *(p.grad.reshape(-1) for p in model.parameters())]))
    assert relative(results[1], results[0]) < 1e-10


def test_a_closure_that_cannot_be_compiled_keeps_the_random_numbers_of_a_later_step():
    """A closure that cannot be compiled (a branch on a tensor's value) runs eagerly after its
    compiled call is refused; a later step of it that draws random numbers (dropout, the model
    put in training mode after two steps in eval mode) keeps its generator states, so that its
    replay draws the same numbers: the meta-gradient equals eager's, with no replay error."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, HIDDEN), torch.nn.Tanh(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(HIDDEN, 1)).to(DT)
    batches, xq, yq = tasks(1, 4, seed=15)[0]

    def run(compile: bool) -> torch.Tensor:
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.05), estimator=mg.Checkpointed(), compile=compile) as meta:
            for k, (x, y) in enumerate(batches):
                model.train(k >= 2)

                def closure(f, x=x, y=y):
                    loss = ((f(x) - y) ** 2).mean()
                    return loss if loss > 0 else -loss  # a branch on a tensor's value: no compiled graph
                meta.step(closure)
            model.eval()
            ((meta.fmodel(xq) - yq) ** 2).mean().backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    eager = run(False)
    with pytest.warns(mg.MetaGradientWarning, match="compile=True"):
        compiled = run(True)
    assert relative(compiled, eager) < 1e-10


def test_the_replay_check_covers_compiled_products():
    model = make_model()
    batches, xq, yq = tasks(1, 3, seed=9)[0]
    with pytest.raises(mg.ReplayError, match="step"):
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.05), estimator=mg.Checkpointed(), compile=True) as meta:
            for x, y in batches:
                meta.step(lambda f: ((f(x) - y) ** 2).mean())
            batches[0][0].mul_(3.0)  # a captured mini-batch changed in place after its step
            ((meta.fmodel(xq) - yq) ** 2).mean().backward()


@pytest.mark.parametrize("changed", [0, 2])
def test_the_replay_check_covers_compiled_rows(changed):
    """Binomial's levels are vmapped compiled products whose replay norms come from the same
    call: a rebuilt step that is not the step taken still raises, naming it."""
    model = make_model()
    batches, xq, yq = tasks(1, 4, seed=9)[0]
    with pytest.raises(mg.ReplayError, match=f"step {changed}") as error:
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.05), estimator=mg.Binomial(order=4, monitor=False),
                             compile=True) as meta:
            for x, y in batches:
                meta.step(lambda f: ((f(x) - y) ** 2).mean())
            batches[changed][0].mul_(3.0)  # a captured mini-batch changed in place after its step
            ((meta.fmodel(xq) - yq) ** 2).mean().backward()
    assert "ran compiled" in str(error.value)


def test_full_with_compile_runs_the_exact_compiled_path_and_says_so():
    """Full with compile=True: its iterates stored and pulled back by compiled sweeps, no
    warning; the meta-gradient of θ and of a captured η equals a hand-written unroll's, and
    meta.info names the path that ran."""
    model = make_model()
    rule = mg.optim.Momentum(lr=0.05, momentum=0.9)
    lam = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    task = tasks(1, 9, seed=10)[0]
    infos: list = []
    compiled = meta_gradient(model, mg.Full(), rule, True, task, lam=lam, infos=infos)
    assert relative(compiled, hand_unroll_with_momentum(model, task, lam)) < 1e-10
    [info] = infos
    assert info["estimator"] == "Full()"
    assert info["compiled"]["estimator"] == "Checkpointed()"
    assert info["compiled"]["sweeps"] == 2 and info["compiled"]["inner_steps"] == 8, info


def test_full_with_compile_refuses_a_second_derivative_and_says_how():
    model = make_model()
    batches, xq, yq = tasks(1, 3, seed=14)[0]
    with mg.MetaGradient(model, mg.optim.SGD(lr=0.05), estimator=mg.Full(), compile=True) as meta:
        for x, y in batches:
            meta.step(lambda f: ((f(x) - y) ** 2).mean())
        loss = ((meta.fmodel(xq) - yq) ** 2).mean()
        with pytest.raises(RuntimeError, match=r"running for Full\(\) under compile=.*compile=False runs Full"):
            torch.autograd.grad(loss, list(model.parameters()), create_graph=True)


@pytest.mark.parametrize("value,error,match", [
    ("yes", ValueError, "compile: unknown torch.compile mode 'yes'; expected True, False, a torch.compile mode"),
    (1, TypeError, "compile: expected True, False, a torch.compile mode .* got int 1"),
    ({"fullgraph": False}, ValueError, r"compile: unknown torch.compile argument\(s\) \['fullgraph'\]"),
    ({"mode": "fast"}, ValueError, "compile: unknown torch.compile mode 'fast'"),
    ({"mode": "max-autotune", "options": {"epilogue_fusion": True}}, ValueError, "give a mode or options, not both"),
    ({"options": "fast"}, TypeError, "compile: options must be a dict of inductor options, got str"),
])
def test_compile_takes_what_torch_compile_takes(value, error, match):
    with pytest.raises(error, match=match):
        mg.MetaGradient(make_model(), mg.optim.SGD(lr=0.1), compile=value)


@pytest.mark.parametrize("value,expected", [
    ("reduce-overhead", {"mode": "reduce-overhead"}),
    ({"options": {"epilogue_fusion": False}}, {"options": {"epilogue_fusion": False}}),
    (True, {"mode": None, "options": {"cpp_wrapper": True}}),  # on the CPU: inductor's C++ wrapper
    ({"options": {}}, {"mode": None, "options": {}}),  # torch.compile's own defaults
], ids=repr)
def test_compile_settings_are_passed_on_and_give_the_same_meta_gradient(value, expected, monkeypatch):
    """A torch.compile mode or inductor options reach every compiled call (on the CPU,
    "reduce-overhead" has no CUDA graphs to capture; compile=True turns the C++ wrapper on) and
    give eager's meta-gradient."""
    seen: list[dict] = []
    real = torch.compile

    def spy(function, **kwargs):
        seen.append(kwargs)
        return real(function, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    monkeypatch.setattr(compiled_cache, "_CACHE", collections.OrderedDict())  # compile here, not from the cache
    model = make_model()
    task = tasks(1, 3, seed=31)[0]
    eager = meta_gradient(model, mg.Checkpointed(), mg.optim.SGD(lr=0.05), False, task)
    compiled = meta_gradient(model, mg.Checkpointed(), mg.optim.SGD(lr=0.05), value, task)
    assert relative(compiled, eager) < 1e-10
    assert seen and all({k: kw.get(k) for k in expected} == expected for kw in seen), seen


def test_a_user_training_loop_with_compile_matches_eager():
    """The ordinary pattern: a real outer optimizer over tasks, the same run with and without compile."""
    finals = []
    for compile in (False, True):
        model = make_model(seed=11)
        outer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for task in tasks(4, 3, seed=12):
            outer.zero_grad()
            batches, xq, yq = task
            with mg.MetaGradient(model, mg.optim.SGD(lr=0.05), estimator="checkpointed", compile=compile) as meta:
                for x, y in batches:
                    meta.step(lambda f: ((f(x) - y) ** 2).mean())
                ((meta.fmodel(xq) - yq) ** 2).mean().backward()
            outer.step()
        finals.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert relative(finals[1], finals[0]) < 1e-10


def test_a_closure_the_user_compiled_still_raises_for_second_order_estimators():
    """A torch.compile'd inner loss has no second derivative: compile=True changes nothing there."""
    model = make_model()
    batches, xq, yq = tasks(1, 2, seed=13)[0]
    loss = torch.compile(lambda out, y: ((out - y) ** 2).mean())
    with pytest.raises(mg.ReplayError, match="compile"):
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.05), estimator=mg.Checkpointed(), compile=True) as meta:
            for x, y in batches:
                meta.step(lambda f: loss(f(x), y))
            ((meta.fmodel(xq) - yq) ** 2).mean().backward()


def test_a_model_the_user_compiled_is_refused_naming_the_module_it_wraps():
    """``torch.compile(model)`` passed to the block: its forward's backward has no second
    derivative; the error names ``model._orig_mod`` and ``compile=True``, and leaves ``.grad`` as it was."""
    model = make_model()
    batches, xq, yq = tasks(1, 2, seed=13)[0]
    compiled = torch.compile(model)
    with pytest.raises(mg.ReplayError, match=r"model._orig_mod\), and MetaGradient\(compile=True\)"):
        with mg.MetaGradient(compiled, mg.optim.SGD(lr=0.05), estimator=mg.Checkpointed()) as meta:
            for x, y in batches:
                meta.step(lambda f: ((f(x) - y) ** 2).mean())
            ((meta.fmodel(xq) - yq) ** 2).mean().backward()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("estimator", [mg.Checkpointed(snapshots="sqrt"),
                                       mg.Binomial(order=2, block=2, snapshots=True, monitor=False)], ids=repr)
def test_snapshots_with_compiled_products(estimator):
    """Recomputed segments feed compiled products like stored ones."""
    model = make_model()
    for task in tasks(2, 6, seed=14):
        eager = meta_gradient(model, estimator, mg.optim.SGD(lr=0.05), False, task)
        compiled = meta_gradient(model, estimator, mg.optim.SGD(lr=0.05), True, task)
        assert relative(compiled, eager) < 1e-10


class Tied(torch.nn.Module):
    """One layer used twice, a BatchNorm in training mode, and a buffer the forward reads."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(4, 4)
        self.norm = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 1)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x))
        h = torch.tanh(self.inner(self.norm(h)))  # the same layer again
        return self.head(h) * self.scale


@pytest.mark.parametrize("estimator", [mg.Checkpointed(), mg.Binomial(order=2, monitor=False)], ids=repr)
def test_shared_layers_batchnorm_and_buffers(estimator):
    torch.manual_seed(0)
    model = Tied().to(DT)
    g = torch.Generator().manual_seed(15)
    batches = [(torch.randn(8, 4, generator=g, dtype=DT), torch.randn(8, 1, generator=g, dtype=DT)) for _ in range(3)]
    xq, yq = torch.randn(8, 4, generator=g, dtype=DT), torch.randn(8, 1, generator=g, dtype=DT)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    results = []
    for compile in (False, True):
        model.zero_grad(set_to_none=True)
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=estimator, compile=compile) as meta:
            for x, y in batches:
                meta.step(lambda f: ((f(x) - y) ** 2).mean())
            ((meta.fmodel(xq) - yq) ** 2).mean().backward()
        results.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert relative(results[1], results[0]) < 1e-10
    assert all(p is model.get_parameter(n) and torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert model.norm.num_batches_tracked.item() == 0  # buffers never written


def test_torchopt_rules_compile_or_fall_back_with_one_warning():
    """torchopt's sgd compiles; its adam updates its state in place, which a compiled vjp cannot
    trace: the products run eagerly, with one warning naming the rule, and the same answer."""
    torchopt = pytest.importorskip("torchopt")
    model = make_model()
    task = tasks(1, 3, seed=16)[0]
    for rule in (torchopt.sgd(lr=0.05), torchopt.sgd(lr=0.05, momentum=0.9)):
        assert relative(meta_gradient(model, mg.Checkpointed(), rule, True, task),
                        meta_gradient(model, mg.Checkpointed(), rule, False, task)) < 1e-10
    rule = torchopt.adam(lr=0.01)
    eager = meta_gradient(model, mg.Checkpointed(), rule, False, task)
    with pytest.warns(mg.MetaGradientWarning, match="step products of this closure with the update rule") as record:
        model.zero_grad(set_to_none=True)
        batches, xq, yq = task
        with mg.MetaGradient(model, rule, estimator=mg.Checkpointed(), compile=True) as meta:
            for x, y in batches:
                meta.step(lambda f: ((f(x) - y) ** 2).mean())
            ((meta.fmodel(xq) - yq) ** 2).mean().backward()
    assert len([w for w in record if "compile=True" in str(w.message)]) == 1
    compiled = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert relative(compiled, eager) < 1e-10


@pytest.fixture
def traced_not_compiled(monkeypatch):
    """``torch.compile`` as the identity: the step products are still the graphs traced once by
    ``make_fx`` (where a Python value is a constant), and the process-wide cache still keys them,
    but nothing is compiled (seconds saved). The entries added are dropped afterwards."""
    monkeypatch.setattr(torch, "compile", lambda function, **options: function)
    before = set(compiled_cache._CACHE)
    yield
    for key in set(compiled_cache._CACHE) - before:
        del compiled_cache._CACHE[key]


class Scaled(torch.nn.Module):
    """The sinusoid MLP with a LeakyReLU, whose slope is a Python float its forward reads."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(1, HIDDEN), torch.nn.LeakyReLU(0.1),
                                       torch.nn.Linear(HIDDEN, 1)).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_numbers_read_through_objects_key_the_compiled_products(traced_not_compiled):
    """A number the closure reads through an object it captures (``cfg.temp``), and one a module's
    forward reads (LeakyReLU's slope), changed between blocks: each block's compiled products
    are traced with its own values and equal a hand-unrolled loop. Changed between steps of one
    block, each step is rebuilt with the value it read (eagerly, alone)."""
    class Config:
        temp = 1.0

    cfg = Config()
    model = Scaled()
    batches, xq, yq = tasks(1, 3, seed=17)[0]
    lr = 0.05

    def run() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with mg.MetaGradient(model, mg.optim.SGD(lr=lr), estimator=mg.Checkpointed(), compile=True) as meta:
            for x, y in batches:
                meta.step(lambda f: ((f(x) - y) ** 2).mean() * cfg.temp)
            ((meta.fmodel(xq) - yq) ** 2).mean().backward()
        assert meta.info["compiled"]["products"] > 0
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    def unrolled() -> torch.Tensor:
        theta = list(model.parameters())
        slope = model.net[1].negative_slope

        def forward(params, x):
            hidden = torch.nn.functional.leaky_relu(torch.nn.functional.linear(x, params[0], params[1]), slope)
            return torch.nn.functional.linear(hidden, params[2], params[3])

        phi = list(theta)
        for x, y in batches:
            grads = torch.autograd.grad(((forward(phi, x) - y) ** 2).mean() * cfg.temp, phi, create_graph=True)
            phi = [p - lr * g for p, g in zip(phi, grads)]
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(((forward(phi, xq) - yq) ** 2).mean(), theta)])

    for temp, slope in ((1.0, 0.1), (3.0, 0.1), (3.0, 0.6)):
        cfg.temp, model.net[1].negative_slope = temp, slope
        assert relative(run(), unrolled()) < 1e-10

    # Changed between the steps of one block: each step is rebuilt (alone, eagerly) with the
    # temperature it read, as a hand-written loop with each step's own takes it.
    model.zero_grad(set_to_none=True)
    with mg.MetaGradient(model, mg.optim.SGD(lr=lr), estimator=mg.Checkpointed(), compile=True) as meta:
        for k, (x, y) in enumerate(batches):
            cfg.temp = 1.0 + k
            meta.step(lambda f: ((f(x) - y) ** 2).mean() * cfg.temp)
        ((meta.fmodel(xq) - yq) ** 2).mean().backward()
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    theta = list(model.parameters())
    slope = model.net[1].negative_slope
    phi = list(theta)
    for k, (x, y) in enumerate(batches):
        hidden = torch.nn.functional.leaky_relu(torch.nn.functional.linear(x, phi[0], phi[1]), slope)
        loss = ((torch.nn.functional.linear(hidden, phi[2], phi[3]) - y) ** 2).mean() * (1.0 + k)
        phi = [p - lr * g for p, g in zip(phi, torch.autograd.grad(loss, phi, create_graph=True))]
    hidden = torch.nn.functional.leaky_relu(torch.nn.functional.linear(xq, phi[0], phi[1]), slope)
    query = ((torch.nn.functional.linear(hidden, phi[2], phi[3]) - yq) ** 2).mean()
    assert relative(got, torch.cat([g.reshape(-1) for g in torch.autograd.grad(query, theta)])) < 1e-10


def test_a_block_over_tasks_compiles_each_piece_once():
    """tasks=3 with compile=True on a net with dimensions of size 1 (a [H, 1] weight), whose
    first iterate (θ expanded over the tasks, then updated) and query gradient could come with
    any stride there: the compiled inner step and the compiled sweep each hold one compiled
    graph, not one for the first call and another for the rest."""
    model = torch.nn.Sequential(torch.nn.Linear(1, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1)).to(DT)
    g = torch.Generator().manual_seed(32)
    xs = torch.rand(3, 6, SHOTS, 1, generator=g, dtype=DT) * 4 - 2
    before = set(compiled_cache._CACHE)
    with mg.MetaGradient(model, mg.optim.SGD(lr=0.05), estimator=mg.Checkpointed(), compile=TRACED, tasks=3) as meta:
        for x in xs.unbind(1):
            meta.step(lambda f, x, y: ((f(x) - y) ** 2).mean(), x, torch.sin(x))
        ((meta.fmodel(xs[:, 0]) - torch.sin(xs[:, 0])) ** 2).mean().backward()
    assert meta.info["compiled"]["inner_steps"] == 6 and meta.info["compiled"]["sweeps"] == 1, meta.info
    new = [compiled_cache._CACHE[key] for key in set(compiled_cache._CACHE) - before]
    assert new, "the block compiled nothing new (the net's shapes are this test's own)"
    for function in new:
        entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(function._torchdynamo_orig_callable)
        assert len(entries) == 1, (function, len(entries))


def test_a_block_over_tasks_compiles_and_equals_eager():
    """tasks=3 with compile=True: the inner steps (a vmap over tasks inside the compiled
    gradient) and the sweep run compiled, the meta-gradient and the T losses each step returns
    equal eager's."""
    model = make_model()
    g = torch.Generator().manual_seed(31)
    xs = torch.rand(3, 6, SHOTS, 1, generator=g, dtype=DT) * 4 - 2
    xq = torch.rand(3, SHOTS, 1, generator=g, dtype=DT) * 4 - 2

    def run(compile: bool):
        model.zero_grad(set_to_none=True)
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.05), estimator=mg.Checkpointed(), compile=compile,
                             tasks=3) as meta:
            losses = [meta.step(lambda f, x, y: ((f(x) - y) ** 2).mean(), x, torch.sin(x)) for x in xs.unbind(1)]
            ((meta.fmodel(xq) - torch.sin(xq)) ** 2).mean().backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()]), torch.stack(losses), meta.info

    eager, eager_losses, _ = run(False)
    compiled, compiled_losses, info = run(True)
    assert info["compiled"]["inner_steps"] == 6 and info["compiled"]["sweeps"] == 1, info
    assert compiled_losses.shape == (6, 3)
    assert relative(compiled, eager) < 1e-10 and relative(compiled_losses, eager_losses) < 1e-10


def test_a_block_over_tasks_finds_every_kind_of_meta_parameter_from_its_first_task():
    """tasks=3 with compile=True: the closure's first step finds η from the first task's loss
    alone (trajectory._first_task_seen) and is itself a compiled call. Every kind of η is found as a block
    per task finds it: a module parameter not adapted (the body, adapt= names the head), a
    captured leaf (a weight decay), a captured tensor computed from another (a hypernetwork's
    scale, whose parameters get the gradient), and support inputs that require grad, passed as
    the batch (dataset distillation), reached through each task's slice of them; those slices,
    a new tensor that requires grad at every step, share one compiled inner step. Float64,
    against the same block run eagerly."""
    torch.manual_seed(41)
    model = torch.nn.Sequential(torch.nn.Linear(1, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1)).to(DT)
    hyper = torch.nn.Linear(2, 1).to(DT)
    lam = torch.tensor(0.02, dtype=DT, requires_grad=True)
    g = torch.Generator().manual_seed(42)
    xs = (torch.rand(3, 4, SHOTS, 1, generator=g, dtype=DT) * 4 - 2).requires_grad_()
    xq = torch.rand(3, SHOTS, 1, generator=g, dtype=DT) * 4 - 2
    z = torch.rand(2, generator=g, dtype=DT)
    learned = [*model.parameters(), *hyper.parameters(), lam, xs]

    def loss(f, x, scale):
        return scale * F.mse_loss(f(x), torch.sin(x.detach())) + lam * sum((w ** 2).sum() for w in f.parameters())

    def grads():
        out = torch.cat([t.grad.reshape(-1) for t in learned])
        for t in learned:
            t.grad = None
        return out

    def over_tasks(compile: bool):
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed(), compile=compile, tasks=3,
                             adapt=["2.weight", "2.bias"]) as meta:
            scale = torch.sigmoid(hyper(z)).squeeze()  # computed: its graph reaches hyper's parameters
            for k in range(4):  # each step's slice of xs is a captured tensor of its own
                meta.step(lambda f, x: loss(f, x, scale), xs[:, k])
            F.mse_loss(meta.fmodel(xq), torch.sin(xq), reduction="none").mean(dim=(1, 2)).sum().backward()
        return grads(), meta.info

    eager, eager_info = over_tasks(False)
    before = {key for key in compiled_cache._CACHE if key[0] == "inner"}
    compiled, info = over_tasks(True)
    assert info["compiled"]["inner_steps"] == 4, info  # the first step too
    # A new slice of xs (a tensor that requires grad) at every step: one compiled inner step.
    assert len({key for key in compiled_cache._CACHE if key[0] == "inner"} - before) == 1
    assert info["meta_parameters"] == eager_info["meta_parameters"]
    assert {"0.weight", "0.bias", "scale (captured by the closure)"} <= set(info["meta_parameters"])
    assert info["meta_parameters"].count("batch[0] (captured by the closure)") == 4
    assert relative(compiled, eager) < 1e-10
    for t in range(3):
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed(),
                             adapt=["2.weight", "2.bias"]) as meta:
            scale = torch.sigmoid(hyper(z)).squeeze()
            for k in range(4):
                meta.step(lambda f: loss(f, xs[t, k], scale))
            F.mse_loss(meta.fmodel(xq[t]), torch.sin(xq[t])).backward()
    separate = grads()
    assert relative(compiled, separate) < 1e-10


def test_a_block_over_tasks_whose_closure_draws_random_numbers_steps_eagerly_from_its_own_states():
    """tasks=3, compile=True, dropout in training mode: the first task's probe of the first step
    draws random numbers, so the generator states are put back and every step runs eagerly
    from the states it started from: the same meta-gradient, losses and generator state after
    the block as the same block without compile."""
    torch.manual_seed(43)
    model = torch.nn.Sequential(torch.nn.Linear(1, HIDDEN), torch.nn.Tanh(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(HIDDEN, 1)).to(DT)
    g = torch.Generator().manual_seed(44)
    xs = torch.rand(3, 3, SHOTS, 1, generator=g, dtype=DT) * 4 - 2
    xq = torch.rand(3, SHOTS, 1, generator=g, dtype=DT) * 4 - 2

    def run(compile: bool):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(45)
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed(), compile=compile,
                             tasks=3) as meta:
            losses = [meta.step(lambda f, x: F.mse_loss(f(x), torch.sin(x)), x) for x in xs.unbind(1)]
            F.mse_loss(meta.fmodel(xq), torch.sin(xq)).backward()
        after = torch.rand(4)
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()]), torch.stack(losses), after, meta.info

    eager, eager_losses, eager_after, _ = run(False)
    compiled, compiled_losses, compiled_after, info = run(True)
    assert info["compiled"]["inner_steps"] == 0, info
    assert relative(compiled, eager) < 1e-10 and relative(compiled_losses, eager_losses) < 1e-10
    assert torch.equal(compiled_after, eager_after)


def test_step_sizes_and_captured_tensors_computed_anew_each_block_reuse_the_compiled_functions():
    """The ordinary outer loop with compile=True: a learned step size computed for each block
    (``SGD(lr=log_lr.exp())``) and a captured scale computed by a hypernetwork for each block,
    both new tensors every block, updated by an outer Adam between blocks. The compiled step
    products take the rule's tensors and the captured ones as inputs, so later blocks compile
    nothing new and use their own values: every block's gradients (θ, the hypernetwork, log α)
    equal the same loop run eagerly, float64."""
    def run(compile: bool):
        torch.manual_seed(51)
        model = torch.nn.Sequential(torch.nn.Linear(1, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1)).to(DT)
        hyper = torch.nn.Linear(2, 1).to(DT)
        log_lr = torch.tensor(-2.0, dtype=DT, requires_grad=True)
        learned = [*model.parameters(), *hyper.parameters(), log_lr]
        outer = torch.optim.Adam(learned, lr=0.05)
        g = torch.Generator().manual_seed(52)
        out, entries = [], []
        for _ in range(3):
            x = torch.rand(SHOTS, 1, generator=g, dtype=DT) * 4 - 2
            z = torch.rand(2, generator=g, dtype=DT)
            outer.zero_grad()
            with mg.MetaGradient(model, mg.optim.SGD(lr=log_lr.exp()), estimator=mg.Checkpointed(),
                                 compile=compile) as meta:
                scale = torch.sigmoid(hyper(z)).squeeze()
                for _ in range(3):
                    meta.step(lambda f: scale * F.mse_loss(f(x), torch.sin(x)))
                F.mse_loss(meta.fmodel(x), torch.sin(x)).backward()
            out.append(torch.cat([t.grad.reshape(-1) for t in learned]))
            entries.append(set(compiled_cache._CACHE))
            outer.step()
        return out, entries, meta.info

    eager, _, _ = run(False)
    compiled, entries, info = run(True)
    assert info["compiled"]["products"] == 3 and info["compiled"]["inner_steps"] == 2, info
    assert entries[1] == entries[0] and entries[2] == entries[0]  # later blocks compile nothing new
    for got, want in zip(compiled, eager):
        assert relative(got, want) < 1e-10


def _step_size_blocks(compile, rule_of, estimator, schedule=None, blocks: int = 3):
    """Blocks whose update rule ``rule_of(block)`` has a Python float step size of another value
    each block; ``schedule(k)``, when given, sets ``rule.lr`` before step k. Per block: θ's
    gradient and the compiled cache's keys after it; and the last block's meta.info."""
    torch.manual_seed(71)
    model = torch.nn.Sequential(torch.nn.Linear(1, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1)).to(DT)
    g = torch.Generator().manual_seed(72)
    out, entries = [], []
    for block in range(blocks):
        x = torch.rand(SHOTS, 1, generator=g, dtype=DT) * 4 - 2
        rule = rule_of(block)
        with mg.MetaGradient(model, rule, estimator=estimator, compile=compile) as meta:
            for k in range(5):
                if schedule is not None:
                    rule.lr = schedule(block, k)
                meta.step(lambda f: F.mse_loss(f(x), torch.sin(x)))
            F.mse_loss(meta.fmodel(x), torch.sin(x)).backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        model.zero_grad()
        entries.append(set(compiled_cache._CACHE))
    return out, entries, meta.info


@pytest.mark.parametrize("pattern,estimator", [
    ("a step size per block", mg.Checkpointed()),  # (per-parameter floats: tests/test_functional_tasks.py)
    ("a schedule over the steps", mg.Checkpointed()),
    ("a step size per block", mg.Binomial(order=2, monitor=False)),  # its products vmapped over steps
], ids=lambda value: repr(value) if isinstance(value, mg.Estimator) else value)
def test_a_float_step_size_changed_between_blocks_or_steps_compiles_nothing_new(pattern, estimator):
    """An inner learning rate that is a Python float of another value each block (annealed,
    searched), or set by a schedule before each step: the compiled step
    products take it as an input, so only the first block compiles, and every block's θ
    gradient equals the same loop run eagerly (float64)."""
    rule_of = {
        "a step size per block": lambda b: mg.optim.SGD(lr=0.05 + 0.01 * b),
        "a schedule over the steps": lambda b: mg.optim.Momentum(lr=0.05, momentum=0.5),
    }[pattern]
    schedule = (lambda b, k: 0.06 * 0.8 ** k + 0.001 * b) if pattern == "a schedule over the steps" else None
    eager, _, _ = _step_size_blocks(False, rule_of, estimator, schedule)
    got, entries, info = _step_size_blocks(TRACED, rule_of, estimator, schedule)
    assert info["compiled"]["products"] == info.get("hessian_vector_products", 5), info  # every one compiled
    assert entries[1] == entries[0] and entries[2] == entries[0]  # later blocks compile nothing new
    for a, b in zip(got, eager):
        assert relative(a, b) < 1e-10


class _BranchesOnLr:
    """A user's update rule whose step branches on its float step size (a clipped step for
    large ones): a compiled product cannot take the step size as a tensor, so it is a
    constant of the graph again."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def init(self, params):
        return {}

    def step(self, params, grads, state):
        if self.lr > 0.1:
            grads = {n: g.clamp(-1, 1) for n, g in grads.items()}
        return {n: p - self.lr * grads[n] if n in grads else p for n, p in params.items()}, state


def test_a_rule_that_branches_on_its_float_step_size_still_compiles_with_it_as_a_constant():
    """No warning (warnings are errors here), every product compiled after the first block,
    the same θ gradient as eagerly, one block each side of the branch."""
    def run(compile):
        return _step_size_blocks(compile, lambda b: _BranchesOnLr(0.05 + 0.1 * b), mg.Checkpointed(), blocks=3)

    eager, _, _ = run(False)
    got, _, info = run(TRACED)
    assert info["compiled"]["products"] == 5, info
    for a, b in zip(got, eager):
        assert relative(a, b) < 1e-10


class _Projected(torch.nn.Module):
    """A net whose forward reads a plain tensor attribute (a fixed random projection, not a
    buffer): a traced graph holds it as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.randn(1, 3, dtype=DT)
        self.body = torch.nn.Sequential(torch.nn.Linear(3, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1)).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x @ self.proj)


def _fresh_model_blocks(make, compile: bool, blocks: int = 3, hook_at: int = -1):
    """Dataset distillation's loop: a new model (θ fixed) for every block, learned inputs; per
    block the inputs' gradient, the compiled cache's keys after it, and a weak reference to the
    block's model. ``hook_at``: that block's model gets a forward hook that scales its output."""
    import weakref

    g = torch.Generator().manual_seed(61)
    images = (torch.rand(SHOTS, 1, generator=g, dtype=DT) * 4 - 2).requires_grad_()
    x = torch.rand(SHOTS, 1, generator=g, dtype=DT) * 4 - 2
    out, keys, refs = [], [], []
    for block in range(blocks):
        torch.manual_seed(62 + block)
        model = make().requires_grad_(False)
        if block == hook_at:
            model.register_forward_hook(lambda module, args, output: 2.0 * output)
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed(), compile=compile) as meta:
            for _ in range(3):
                meta.step(lambda f: F.mse_loss(f(images), torch.sin(images.detach())))
            F.mse_loss(meta.fmodel(x), torch.sin(x)).backward()
        out.append(images.grad.clone())
        images.grad = None
        keys.append(set(compiled_cache._CACHE))
        refs.append(weakref.ref(model))
        del model, meta
    return out, keys, refs


def test_a_new_model_for_every_block_finds_the_compiled_functions_and_is_freed():
    """compile=True with a fresh initialization for every block (θ fixed, learned inputs): the
    model is an argument of the compiled calls and the cache keys its structure, so later blocks
    compile nothing new, the cache keeps no model alive, and every block's gradient is eager's."""
    import gc

    def make():
        return torch.nn.Sequential(torch.nn.Linear(1, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1)).to(DT)

    eager, _, _ = _fresh_model_blocks(make, compile=False)
    compiled, keys, refs = _fresh_model_blocks(make, compile=True)
    assert keys[1] == keys[0] and keys[2] == keys[0]
    gc.collect()
    assert [ref() is None for ref in refs] == [True, True, True]
    for got, want in zip(compiled, eager):
        assert relative(got, want) < 1e-10


def test_a_new_model_whose_forward_reads_other_values_is_compiled_for_them():
    """A new model per block whose forward reads a plain tensor attribute (another random
    projection each time), and one block's model with a forward hook: what a traced graph
    holds as constants is part of the cache key, so no block computes with another's; every
    block's gradient is eager's (float64)."""
    eager, _, _ = _fresh_model_blocks(_Projected, compile=False, hook_at=1)
    compiled, keys, _ = _fresh_model_blocks(_Projected, compile=True, hook_at=1)
    assert keys[1] != keys[0] and keys[2] != keys[1]
    for got, want in zip(compiled, eager):
        assert relative(got, want) < 1e-10


# A coefficient a helper reads from its globals, multiplying a term whose learned weight λ is
# zero: the step does not see it, λ's gradient does. Changed between blocks, the compiled step
# product must not keep the value (or the tensor) it was traced with.
_COEFFICIENT = 1.0
_MASK = torch.ones(HIDDEN, 1, dtype=DT)


def _term_coefficient(f):
    return _COEFFICIENT * sum((w ** 2).sum() for w in f.parameters())


def _term_mask(f):
    return (_MASK * f.params["0.weight"] ** 2).sum()


def _zero_weight_gradient(term, compile):
    model = make_model()
    lam = torch.zeros((), dtype=DT, requires_grad=True)
    (batches, xq, yq), = tasks(1, 3, seed=7)
    with mg.MetaGradient(model, mg.optim.SGD(lr=0.05), estimator=mg.Checkpointed(), compile=compile) as meta:
        for x, y in batches:
            meta.step(lambda f: ((f(x) - y) ** 2).mean() + lam * term(f))
        ((meta.fmodel(xq) - yq) ** 2).mean().backward()
    return lam.grad


def test_a_helpers_global_changed_between_blocks_is_not_kept_by_a_compiled_product():
    global _COEFFICIENT, _MASK
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", mg.MetaGradientWarning)
            for value in (1.0, 5.0, 1.0):  # a float: keyed, each value its own compiled product
                _COEFFICIENT = value
                torch.testing.assert_close(_zero_weight_gradient(_term_coefficient, TRACED),
                                           _zero_weight_gradient(_term_coefficient, False), rtol=1e-10, atol=1e-12)
            ours = [str(w.message) for w in caught if issubclass(w.category, mg.MetaGradientWarning)]
            assert not ours, ours
            for value in (1.0, 5.0):  # a tensor: its products run eagerly, with one warning
                _MASK = torch.full((HIDDEN, 1), value, dtype=DT)
                torch.testing.assert_close(_zero_weight_gradient(_term_mask, TRACED),
                                           _zero_weight_gradient(_term_mask, False), rtol=1e-10, atol=1e-12)
        warned = [str(w.message) for w in caught if issubclass(w.category, mg.MetaGradientWarning)]
        assert len(warned) == 1 and "reads a tensor that is not among its inputs" in warned[0], warned
    finally:
        _COEFFICIENT, _MASK = 1.0, torch.ones(HIDDEN, 1, dtype=DT)


def test_binomial_levels_blocks_and_chunks_compile_each_row_count_once():
    """Binomial's vmapped products take as many rows as a level, block or chunk holds, and the
    numbers differ: each has a compiled function of its own, so none is compiled again for
    another (TorchDynamo recompiled one function per number of rows and, past its recompile
    limit, refused the next: after a few estimators in one process the products ran eagerly)."""
    model = make_model()
    task = tasks(1, 5, seed=21)[0]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for estimator in (mg.Binomial(order=3, monitor=False), mg.Binomial(order=2, block=3, monitor=False),
                          mg.Binomial(order=3, chunk_size=2, monitor=False)):
            eager = meta_gradient(model, estimator, mg.optim.SGD(lr=0.05), False, task)
            compiled = meta_gradient(model, estimator, mg.optim.SGD(lr=0.05), True, task)
            assert relative(compiled, eager) < 1e-10


def test_the_recompile_limit_is_named_where_it_stops_compiling():
    """A piece refused because TorchDynamo reached its recompile limit says so, not that the
    closure has side effects torch.compile cannot trace. (The refusal itself, not a run at a
    lowered limit: TorchDynamo keeps frames that hit it skipped for the rest of the process.)"""
    messages: list[str] = []
    compiler = compiled_cache.Compiler(messages.append)
    error = torch._dynamo.exc.FailOnRecompileLimitHit("Hard failure due to fullgraph=True")
    compiler.refuse(("test piece",), ("test closure", id(messages)), error)
    assert len(messages) == 1 and "recompile_limit" in messages[0] and "side effects" not in messages[0], messages


def test_a_loop_under_autocast_passes_the_replay_check():
    """Inner steps taken under ``torch.autocast`` (bfloat16 here, float16 with AMP on a GPU):
    the compiled rebuild rounds to bfloat16 in other places than the eager step did, so the
    default replay tolerance follows the precision the steps computed in (it stayed float32's
    and raised ReplayError on a correct loop). A tolerance the user gives is kept."""
    model = make_model(torch.float32, seed=3)
    g = torch.Generator().manual_seed(29)
    x, y, xq, yq = (torch.randn(16, 1, generator=g) for _ in range(4))

    def run(compile: bool) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.3), estimator=mg.Checkpointed(), compile=compile) as meta:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                for _ in range(5):
                    meta.step(lambda f: F.mse_loss(f(x).float(), y))
                loss = F.mse_loss(meta.fmodel(xq).float(), yq)
            loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    assert relative(run(True), run(False)) < 0.3  # bfloat16 rounding in other places, through a double backward
    default = relative_tolerance(True, torch.float32, torch.device("cpu"))
    assert at_precision(default, torch.bfloat16, torch.device("cpu")) == 1e-1
    assert at_precision(relative_tolerance(1e-4, torch.float32, torch.device("cpu")), torch.bfloat16,
                        torch.device("cpu")) == 1e-4
