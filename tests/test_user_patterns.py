"""The loops users really write, with every estimator that rebuilds steps (MATH.md, "Replaying a step").

Checkpointed, Truncated and Binomial call the user's closure again during backward. Each
pattern here is written the natural way (a mini-batch loop whose lambda captures the loop
variables, a notebook's top-level loop reading globals, ``functools.partial``, dropout, noise,
an iterator, data changed in place, torchopt's momentum, ``torch.compile``, parameters a loss
does not use) and run with

    Full (the sanity row), Checkpointed, Truncated(K), Truncated(2), Binomial(order=K)
    (vmapped), Binomial(order=K, chunk_size=1), Binomial(order=2, block=2), and with snapshots
    (iterates recomputed during backward): Checkpointed(snapshots=2),
    Binomial(order=2, block=2, snapshots=True)

against a hand-unrolled float64 loop written here with ``torch.func.functional_call`` and
``torch.autograd.grad(..., create_graph=True)`` (no metagrad inside). Each must give the
reference to 1e-10 (relative, flattened), or raise ``mg.ReplayError`` where the step taken
cannot be replayed. Truncated(2)'s reference is the same loop restarted from a detached leaf
copy of φ_{K−2}; the other eight are exact (Binomial at order K, and blocks of 2 at order 2).

Random draws: a pattern that draws (dropout, noise) seeds the generator before the reference
loop and before the metagrad loop, and both draw in the same order: one closure call per
step, then the query.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.func import functional_call

import metagrad as mg

try:
    from reference import NoisySGD
except ImportError:  # collected as a package (pytest --import-mode=importlib, python -m pytest from elsewhere)
    from tests.reference import NoisySGD

D = torch.float64
RTOL = 1e-10

#: name -> (estimator for K steps, T of a truncated reference or None for the exact one)
ESTIMATORS = {
    "Full": (lambda K: mg.Full(), None),
    "Checkpointed": (lambda K: mg.Checkpointed(), None),
    "Truncated(K)": (lambda K: mg.Truncated(K), None),
    "Truncated(2)": (lambda K: mg.Truncated(2), 2),
    "Binomial(K)": (lambda K: mg.Binomial(order=K), None),
    "Binomial(K,chunk_size=1)": (lambda K: mg.Binomial(order=K, chunk_size=1), None),
    "Binomial(2,block=2)": (lambda K: mg.Binomial(order=2, block=2), None),
    # Snapshots: φ_0 and every other iterate stored, the rest recomputed during backward.
    "Checkpointed(snapshots=2)": (lambda K: mg.Checkpointed(snapshots=2), None),
    "Binomial(2,block=2,snapshots=True)": (lambda K: mg.Binomial(order=2, block=2, snapshots=True), None),
}
ALL = list(ESTIMATORS)
REBUILDING = [name for name in ALL if name != "Full"]
#: The estimators whose rebuilt steps go through one torch.func.vmap call per level.


def estimator(name, K):
    return ESTIMATORS[name][0](K)


def restart(name):
    return ESTIMATORS[name][1]


# ------------------------------------------------------------------ the reference
class RefModel:
    """The reference's fmodel: the model at ``params`` by ``torch.func.functional_call``, with
    the fast weights as ``.params`` (as metagrad's fmodel has them)."""

    def __init__(self, model, params):
        self.model, self.params = model, params

    def __call__(self, *args, **kwargs):
        return functional_call(self.model, self.params, args, kwargs)


def functional(model, params):
    return RefModel(model, params)


class SGDRef:
    """``φ ← φ − α g``; a parameter without a gradient is left as it is."""

    def __init__(self, lr):
        self.lr = lr

    def init(self, names):
        return None

    def step(self, phi, grads, state):
        return {n: p if grads[n] is None else p - self.lr * grads[n] for n, p in phi.items()}, state


class MomentumRef:
    """torch.optim.SGD(momentum, dampening, weight_decay) by hand: ``g ← g + wd·φ``, the buffer
    ``b ← g`` at a parameter's first gradient, else ``b ← μb + (1 − d)g``; ``φ ← φ − αb``. A
    parameter whose gradient is None is skipped (no weight decay, no buffer), as torch.optim,
    higher and torchopt skip it. torchopt.sgd(lr, momentum, dampening) is this rule with wd = 0."""

    def __init__(self, lr, momentum, dampening=0.0, weight_decay=0.0):
        self.lr, self.momentum, self.dampening, self.weight_decay = lr, momentum, dampening, weight_decay

    def init(self, names):
        return {n: None for n in names}

    def step(self, phi, grads, state):
        new_phi, new_state = {}, {}
        for n, p in phi.items():
            g, b = grads[n], state[n]
            if g is None:
                new_phi[n], new_state[n] = p, b
                continue
            if self.weight_decay:
                g = g + self.weight_decay * p
            b = g if b is None else self.momentum * b + (1 - self.dampening) * g
            new_phi[n], new_state[n] = p - self.lr * b, b
        return new_phi, new_state


def hand_unrolled(model, inner, query, K, *, rule, restart_at=None):
    """``∇ query(φ_K)`` by plain autograd through K hand-unrolled steps, ``inner(fm, k)`` the
    loss of step k, with respect to θ, or with ``restart_at=T`` to a detached leaf copy of
    ``φ_{K−T}`` (Truncated(T) for SGD). None where autograd finds no path (allow_unused)."""
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    phi, leaves, state = dict(theta), theta, rule.init(names)
    for k in range(K):
        if restart_at is not None and k == K - restart_at:
            phi = {n: t.detach().clone().requires_grad_() for n, t in phi.items()}
            leaves = phi
        loss = inner(functional(model, phi), k)
        grads = torch.autograd.grad(loss, [phi[n] for n in names], create_graph=True, allow_unused=True)
        phi, state = rule.step(phi, dict(zip(names, grads)), state)
    if restart_at == 0:  # FirstOrder: the gradient at a leaf copy of φ_K
        phi = {n: t.detach().clone().requires_grad_() for n, t in phi.items()}
        leaves = phi
    grads = torch.autograd.grad(query(functional(model, phi)), [leaves[n] for n in names],
                                allow_unused=True)
    return dict(zip(names, grads))


def held_constant_truncated(model, inner, query, K, T, *, rule):
    """MATH.md's Truncated(T) for a stateful rule: ``J_{K−T}ᵀ ⋯ J_{K−1}ᵀ v`` with
    ``J_k = ∂φ_{k+1}/∂φ_k`` at the state ``s_k`` the step started from, held constant."""
    names = [n for n, _ in model.named_parameters()]
    phi = {n: p.detach().clone() for n, p in model.named_parameters()}
    state, iterates, states = rule.init(names), [], []
    for k in range(K):
        iterates.append(phi)
        states.append(state)
        leaf = {n: t.clone().requires_grad_() for n, t in phi.items()}
        grads = torch.autograd.grad(inner(functional(model, leaf), k), list(leaf.values()), allow_unused=True)
        phi, state = rule.step(phi, dict(zip(names, grads)), state)
    leaf = {n: t.clone().requires_grad_() for n, t in phi.items()}
    u = dict(zip(names, torch.autograd.grad(query(functional(model, leaf)), list(leaf.values()))))
    for k in reversed(range(K - T, K)):
        leaf = {n: t.clone().requires_grad_() for n, t in iterates[k].items()}
        grads = torch.autograd.grad(inner(functional(model, leaf), k), list(leaf.values()),
                                    create_graph=True, allow_unused=True)
        new, _ = rule.step(leaf, dict(zip(names, grads)), states[k])
        pulled = torch.autograd.grad([new[n] for n in names], list(leaf.values()),
                                     [u[n] for n in names], allow_unused=True)
        u = {n: torch.zeros_like(u[n]) if g is None else g for n, g in zip(names, pulled)}
    return u


def sgd_reference(model, inner, query, K, lr, name):
    """The reference of estimator ``name`` for SGD(lr)."""
    return hand_unrolled(model, inner, query, K, rule=SGDRef(lr), restart_at=restart(name))


def rel_err(got, expected):
    diff = torch.linalg.vector_norm(got - expected)
    scale = torch.linalg.vector_norm(expected)
    return float(diff / scale) if scale > 0 else float(diff)


def assert_matches(model, expected, names=None):
    """``.grad`` is None exactly where ``expected`` is, and equals it to RTOL (flattened)."""
    grads = dict((n, p.grad) for n, p in model.named_parameters())
    names = list(expected) if names is None else list(names)
    for n in names:
        if expected[n] is None:
            assert grads[n] is None, f"{n}: plain autograd leaves .grad None, got {grads[n]}"
        else:
            assert grads[n] is not None, f"{n}: .grad is None, the reference has a gradient"
    kept = [n for n in names if expected[n] is not None]
    got = torch.cat([grads[n].reshape(-1) for n in kept])
    want = torch.cat([expected[n].reshape(-1) for n in kept])
    assert got.dtype == D
    err = rel_err(got, want)
    assert err <= RTOL, f"relative error {err:.3g} against the hand-unrolled reference"


def assert_matches_mse_loop(model, batches, xq, yq, K, lr, name):
    """:func:`assert_matches` against the reference of estimator ``name`` for the mini-batch loop
    ``F.mse_loss(f(xb), yb)`` over ``batches`` and the query ``F.mse_loss(f(xq), yq)``."""
    expected = sgd_reference(model, lambda fm, k: F.mse_loss(fm(batches[k][0]), batches[k][1]),
                             lambda fm: F.mse_loss(fm(xq), yq), K, lr, name)
    assert_matches(model, expected)


# ------------------------------------------------------------------ problems
def mlp(d_in, width, seed, dropout=None):
    """Linear–tanh–[dropout]–Linear in float64, its initialization drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = [nn.Linear(d_in, width, dtype=D), nn.Tanh()]
        if dropout is not None:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width, 1, dtype=D))
        return nn.Sequential(*layers)


def data(seed, d_in, n, count):
    """``count`` batches ``(x, y)`` of n points and a query batch, from their own generator."""
    g = torch.Generator().manual_seed(seed + 7)
    batches = [(torch.randn(n, d_in, generator=g, dtype=D), torch.randn(n, 1, generator=g, dtype=D))
               for _ in range(count)]
    xq, yq = torch.randn(n + 1, d_in, generator=g, dtype=D), torch.randn(n + 1, 1, generator=g, dtype=D)
    return batches, xq, yq


@st.composite
def cases(draw):
    """A seed, K in 2…5, a step size, a small MLP's input size and width, the batch size."""
    return dict(seed=draw(st.integers(0, 2 ** 20)), K=draw(st.integers(2, 5)),
                lr=draw(st.floats(0.01, 0.3)), d_in=draw(st.integers(1, 3)),
                width=draw(st.integers(2, 6)), n=draw(st.integers(2, 6)))


FEW = settings(max_examples=6, deadline=None)


def loss_fn(xb, yb, fmodel):
    """A module-level loss for ``functools.partial(loss_fn, xb, yb)``."""
    return F.mse_loss(fmodel(xb), yb)


def loss_kw(fmodel, xb, yb):
    """A module-level loss for ``functools.partial(loss_kw, xb=xb, yb=yb)``."""
    return F.mse_loss(fmodel(xb), yb)


# The same loop as a script or a notebook cell runs it: top-level code, so the lambda and the
# function read ``xb, yb`` as globals of the namespace the script runs in, not as cells.
SCRIPT_LAMBDA = """
with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator) as meta:
    for xb, yb in batches:
        meta.step(lambda f: F.mse_loss(f(xb), yb))
    F.mse_loss(meta.fmodel(xq), yq).backward()
"""

SCRIPT_DEF = """
def inner_loss(f):
    return F.mse_loss(f(xb), yb)

with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator) as meta:
    for xb, yb in batches:
        meta.step(inner_loss)
    F.mse_loss(meta.fmodel(xq), yq).backward()
"""

# A helper the closure calls reads the loop variables as *its own* globals: frozen closures
# cannot see that (replay.py's docstring), so the replay check must catch it.
SCRIPT_HELPER = """
def inner_loss(f):
    return F.mse_loss(f(xb), yb)

with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator) as meta:
    for xb, yb in batches:
        meta.step(lambda f: inner_loss(f))
    F.mse_loss(meta.fmodel(xq), yq).backward()
"""


def run_script(script, model, est, lr, batches, xq, yq):
    namespace = {"mg": mg, "F": F, "model": model, "estimator": est, "lr": lr,
                 "batches": batches, "xq": xq, "yq": yq}
    exec(compile(script, "<notebook cell>", "exec"), namespace)


# ------------------------------------------------------------------ 1. mini-batch loops
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("style", ["cells", "defaults", "index", "globals-lambda", "globals-def",
                                   "partial", "partial-kw", "list"])
@FEW
@given(case=cases())
def test_minibatch_loop(style, name, case):
    K, lr = case["K"], case["lr"]
    model = mlp(case["d_in"], case["width"], case["seed"])
    batches, xq, yq = data(case["seed"], case["d_in"], case["n"], K)
    est = estimator(name, K)
    if style in ("globals-lambda", "globals-def"):
        run_script(SCRIPT_LAMBDA if style == "globals-lambda" else SCRIPT_DEF, model, est, lr,
                   batches, xq, yq)
    else:
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=est) as meta:
            if style == "cells":
                for xb, yb in batches:
                    meta.step(lambda f: F.mse_loss(f(xb), yb))
            elif style == "defaults":  # the classic late-binding fix, bound by default values
                for xb, yb in batches:
                    meta.step(lambda f, xb=xb, yb=yb: F.mse_loss(f(xb), yb))
            elif style == "index":  # a loop index into a list of batches
                for k in range(K):
                    meta.step(lambda f: F.mse_loss(f(batches[k][0]), batches[k][1]))
            elif style == "partial":
                for xb, yb in batches:
                    meta.step(functools.partial(loss_fn, xb, yb))
            elif style == "partial-kw":
                for xb, yb in batches:
                    meta.step(functools.partial(loss_kw, xb=xb, yb=yb))
            else:  # a DataLoader yields a list [x, y] per batch
                loader = [[xb, yb] for xb, yb in batches]
                for batch in loader:
                    meta.step(lambda f: F.mse_loss(f(batch[0]), batch[1]))
            F.mse_loss(meta.fmodel(xq), yq).backward()
    assert_matches_mse_loop(model, batches, xq, yq, K, lr, name)


@pytest.mark.parametrize("name", ALL)
def test_ragged_last_batch(name):
    """A DataLoader without drop_last: the last batch is smaller, so its frozen closure cannot
    share a vmapped call with the others."""
    K, lr = 4, 0.2
    model = mlp(3, 5, 14)
    g = torch.Generator().manual_seed(14)
    batches = [(torch.randn(n, 3, generator=g, dtype=D), torch.randn(n, 1, generator=g, dtype=D))
               for n in (6, 6, 6, 2)]
    xq, yq = torch.randn(4, 3, generator=g, dtype=D), torch.randn(4, 1, generator=g, dtype=D)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator(name, K)) as meta:
        for xb, yb in batches:
            meta.step(lambda f: F.mse_loss(f(xb), yb))
        F.mse_loss(meta.fmodel(xq), yq).backward()
    assert_matches_mse_loop(model, batches, xq, yq, K, lr, name)


def input_gradient_penalty(f, x, y, lam):
    """A loss with a derivative in the input inside it (a gradient penalty; a physics-informed
    residual is the same pattern): the input made a leaf inside the closure, at every call."""
    xi = x.clone().requires_grad_()
    out = f(xi)
    gx, = torch.autograd.grad(out.sum(), xi, create_graph=True)
    return F.mse_loss(out, y) + lam * (gx ** 2).mean()


@pytest.mark.parametrize("held", ["captured", "attribute"])
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_a_leaf_made_inside_the_closure_is_not_a_meta_parameter(name, compile, held):
    """The closure makes its input a leaf that requires grad (``x.clone().requires_grad_()``)
    to take a derivative in it. That leaf is new at every call, so it is no input of the inner
    loop (a backward through the unroll writes a ``.grad`` nobody holds): the rebuilt steps
    must not take it as a meta-parameter (they raised ReplayError: a rebuild's leaf is another
    one). θ and the penalty's weight λ against the hand-unrolled loop, λ captured or read
    through an object (``cfg.lam``: a leaf the closure reads, found again, so η)."""
    K, lr = 3, 0.1
    model = mlp(3, 5, 3)
    batches, xq, yq = data(3, 3, 6, K)
    lam = torch.tensor(0.3, dtype=D, requires_grad=True)
    cfg = types.SimpleNamespace(lam=lam)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator(name, K),
                         compile=compile and {"backend": "aot_eager"}) as meta:
        for xb, yb in batches:  # (rebuilt eagerly, one at a time: torch.func cannot make a leaf)
            if held == "captured":
                meta.step(lambda f: input_gradient_penalty(f, xb, yb, lam))
            else:
                meta.step(lambda f: input_gradient_penalty(f, xb, yb, cfg.lam))
        F.mse_loss(meta.fmodel(xq), yq).backward()

    def inner(fm, k):
        return input_gradient_penalty(fm, *batches[k], lam)

    expected = sgd_reference(model, inner, lambda fm: F.mse_loss(fm(xq), yq), K, lr, name)
    assert_matches(model, expected)
    if restart(name) is None:  # λ's gradient through every step (Truncated(2)'s: through the last two)
        theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        phi, leaf = dict(theta), lam.detach().clone().requires_grad_()
        for xb, yb in batches:
            loss = input_gradient_penalty(functional(model, phi), xb, yb, leaf)
            grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
            phi = {n: p - lr * g for (n, p), g in zip(phi.items(), grads)}
        want, = torch.autograd.grad(F.mse_loss(functional(model, phi)(xq), yq), leaf)
        assert rel_err(lam.grad, want) <= RTOL


@pytest.mark.parametrize("name", ALL)
def test_inner_steps_taken_under_no_grad(name):
    """The inner loop written inside ``torch.no_grad()`` (the steps only, the query outside):
    Full's unroll lost its graph there, and θ's ``.grad`` stayed None after the query's backward
    (an outer optimizer then skips θ, silently); every estimator now takes the steps as it does
    outside, equal to the hand-written unroll."""
    K, lr = 3, 0.1
    model = mlp(2, 5, 4)
    batches, xq, yq = data(4, 2, 6, K)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator(name, K)) as meta:
        with torch.no_grad():
            for xb, yb in batches:
                meta.step(lambda f: F.mse_loss(f(xb), yb))
        F.mse_loss(meta.fmodel(xq), yq).backward()
    assert_matches_mse_loop(model, batches, xq, yq, K, lr, name)


def test_inner_steps_under_inference_mode_are_refused_by_name():
    model = mlp(2, 5, 4)
    batches, _, _ = data(4, 2, 6, 1)
    with pytest.raises(ValueError, match=r"inference_mode\(\).*outside"):
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.1), estimator=mg.Full()) as meta:
            with torch.inference_mode():
                meta.step(lambda f: F.mse_loss(f(batches[0][0]), batches[0][1]))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("estimator,form", [
    (mg.Full(), "backward(retain_graph=True)"),
    *[(e, form) for e in (mg.Full(), mg.Checkpointed(), mg.FirstOrder()) for form in ("backward()", "zero_grad()")],
], ids=lambda value: repr(value) if isinstance(value, mg.Estimator) else value)
def test_a_closure_that_backpropagates_its_own_loss_is_refused(estimator, form):
    """A torch.optim closure's habit, ``loss.backward(); return loss``, inside ``meta.step``: with
    Full and ``retain_graph=True`` it added every inner gradient to θ's ``.grad`` with no error;
    without, torch's "backward through the graph a second time" came out of metagrad's own
    gradient. Refused by name, the model's ``.grad`` left as it was; so is a ``zero_grad()``
    inside the closure, which would lose the meta-gradient accumulated so far. (A rebuilding
    estimator given ``retain_graph=True`` backpropagates into its detached fast weights only, and
    its meta-gradient is the one without the call.)"""
    model = mlp(2, 5, 7)
    batches, _, _ = data(7, 2, 6, 1)
    x, y = batches[0]
    model[0].weight.grad = torch.ones_like(model[0].weight)  # (an earlier task's meta-gradient)

    def closure(f):
        loss = F.mse_loss(f(x), y)
        if form == "zero_grad()":
            model.zero_grad()
        else:
            loss.backward(retain_graph=form != "backward()")
        return loss

    with pytest.raises(ValueError, match=r"closure: it backpropagated during the inner step \(loss.backward\(\) "
                                         r"inside the closure, as a torch.optim closure does\)"):
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.1), estimator=estimator) as meta:
            for _ in range(2):
                meta.step(closure)
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")


@pytest.mark.parametrize("estimator", [mg.Full(), mg.Checkpointed(), mg.FirstOrder()], ids=repr)
@pytest.mark.parametrize("form", ["torch.optim.SGD", "torch.optim.Adam", "autograd.grad under no_grad"])
def test_an_inner_loop_that_updates_the_model_itself_is_refused(estimator, form):
    """The plain training loop moved inside a block (``opt.step()`` on ``model.parameters()``)
    instead of ``meta.step``: no inner step is recorded, each backward is the plain gradient at
    the parameters the loop changed, and the block ended with no error. Refused at the first
    backward after a write, the model's ``.grad`` left as it was; an outer step inside a block
    with no inner step, after its query's backward, is still allowed."""
    model = mlp(2, 5, 8)
    batches, xq, yq = data(8, 2, 6, 3)
    model[0].weight.grad = torch.ones_like(model[0].weight)  # (an earlier task's meta-gradient)
    with pytest.raises(RuntimeError, match=r"modified in place inside the block, before a backward that "
                                           r"reached them\. No inner step was taken with meta\.step"):
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.1), estimator=estimator):
            opt = (torch.optim.Adam if form == "torch.optim.Adam" else torch.optim.SGD)(model.parameters(), lr=0.1)
            for x, y in batches:
                if form.startswith("torch.optim"):
                    opt.zero_grad()
                    F.mse_loss(model(x), y).backward()
                    opt.step()
                else:
                    grads = torch.autograd.grad(F.mse_loss(model(x), y), list(model.parameters()))
                    with torch.no_grad():
                        for p, g in zip(model.parameters(), grads):
                            p -= 0.1 * g
            F.mse_loss(model(xq), yq).backward()
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")

    outer = torch.optim.SGD(model.parameters(), lr=0.1)  # zero inner steps, the outer step inside
    model.zero_grad()
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.1), estimator=estimator) as meta:
        F.mse_loss(meta.fmodel(xq), yq).backward()
        outer.step()


@pytest.mark.parametrize("name", ALL)
def test_reused_batch_list_written_in_place(name):
    """A loader that refills one list object each iteration (``batch[:] = ...``): the frozen
    closure copies the small list it captures, so each step keeps its own batch."""
    K, lr = 3, 0.1
    model = mlp(2, 4, 0)
    batches, xq, yq = data(0, 2, 5, K)
    batch = [None, None]
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator(name, K)) as meta:
        for xb, yb in batches:
            batch[:] = [xb, yb]
            meta.step(lambda f: F.mse_loss(f(batch[0]), batch[1]))
        F.mse_loss(meta.fmodel(xq), yq).backward()
    assert_matches_mse_loop(model, batches, xq, yq, K, lr, name)


@pytest.mark.parametrize("name", ALL)
def test_helper_reading_its_own_globals(name):
    """The lambda calls a notebook function that reads the loop variables as its globals: they
    are noted at each step (metagrad.reads) and set back for its rebuild, so every estimator
    rebuilds the steps that were taken; Full rebuilds nothing."""
    K, lr = 3, 0.1
    model = mlp(2, 4, 1)
    batches, xq, yq = data(1, 2, 5, K)
    run_script(SCRIPT_HELPER, model, estimator(name, K), lr, batches, xq, yq)
    assert_matches_mse_loop(model, batches, xq, yq, K, lr, name)


# ------------------------------------------------------------------ 2. iterators
def _iterator_in_closure(model, est, it, K, xq, yq):
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.1), estimator=est) as meta:
        def closure(f):
            xb, yb = next(it)
            return F.mse_loss(f(xb), yb)

        for _ in range(K):
            meta.step(closure)
        F.mse_loss(meta.fmodel(xq), yq).backward()


@pytest.mark.parametrize("name", ALL)
def test_iterator_read_inside_closure(name):
    """``next(it)`` inside the closure: a rebuilt step reads another batch. The loader has more
    batches than K (an epoch, or itertools.cycle), so the rebuilt step gets a real batch."""
    K = 3
    model = mlp(2, 4, 2)
    batches, xq, yq = data(2, 2, 5, K)
    it = itertools.cycle(batches)
    if name != "Full":
        with pytest.raises(mg.ReplayError) as error:
            _iterator_in_closure(model, estimator(name, K), it, K, xq, yq)
        message = str(error.value)
        assert re.search(r"inner step \d", message) and "rebuilt during backward" in message
        assert "next(it)" in message and "outside the closure" in message
        assert "mg.Full()" in message
        assert all(p.grad is None for p in model.parameters())  # nothing accumulated
        return
    _iterator_in_closure(model, estimator(name, K), it, K, xq, yq)
    assert_matches_mse_loop(model, batches, xq, yq, K, 0.1, name)


@pytest.mark.parametrize("name", REBUILDING)
def test_exhausted_iterator_read_inside_closure(name):
    """``it = iter(batches)`` with exactly K batches, read inside the closure: the rebuilt
    step's ``next(it)`` finds the iterator exhausted. This is a step that cannot be replayed,
    so the answer must be a ReplayError, not a bare StopIteration (which, raised inside
    ``map`` or a generator's caller, silently ends the caller's loop)."""
    K = 3
    model = mlp(2, 4, 3)
    batches, xq, yq = data(3, 2, 5, K)
    with pytest.raises(mg.ReplayError):
        _iterator_in_closure(model, estimator(name, K), iter(batches), K, xq, yq)


@pytest.mark.parametrize("name", ALL)
def test_iterator_read_outside_closure(name):
    """The fix the ReplayError recommends: ``next(it)`` outside, the batch captured."""
    K, lr = 4, 0.15
    model = mlp(2, 3, 4)
    batches, xq, yq = data(4, 2, 5, K)
    it = iter(batches)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator(name, K)) as meta:
        for _ in range(K):
            xb, yb = next(it)
            meta.step(lambda f: F.mse_loss(f(xb), yb))
        F.mse_loss(meta.fmodel(xq), yq).backward()
    assert_matches_mse_loop(model, batches, xq, yq, K, lr, name)


# ------------------------------------------------------------------ 3. dropout
def _dropout_run(case, name, p, query_mode):
    K, lr, seed = case["K"], case["lr"], case["seed"]
    (support,), xq, yq = data(seed, case["d_in"], case["n"], 1)
    x_s, y_s = support
    model = mlp(case["d_in"], case["width"], seed, dropout=p)
    model.train()

    def query(fm):
        if query_mode == "eval":
            model.eval()
        return F.mse_loss(fm(xq), yq)

    torch.manual_seed(seed + 1)
    expected = sgd_reference(model, lambda fm, k: F.mse_loss(fm(x_s), y_s), query, K, lr, name)
    model.train()

    torch.manual_seed(seed + 1)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator(name, K)) as meta:
        for _ in range(K):
            meta.step(lambda f: F.mse_loss(f(x_s), y_s))
        if query_mode == "eval":
            model.eval()
        F.mse_loss(meta.fmodel(xq), yq).backward()
    model.train()
    assert_matches(model, expected)


@pytest.mark.parametrize("name", ALL)
@FEW
@given(case=cases(), p=st.sampled_from([0.2, 0.5]))
def test_dropout_in_train_mode(name, case, p):
    """nn.Dropout in the model, train mode for the inner loop and the query: each rebuilt
    step replays the generator state its closure drew its mask from."""
    _dropout_run(case, name, p, "train")


EVAL_QUERY = dict(seed=5, K=3, lr=0.1, d_in=2, width=5, n=4)


@pytest.mark.parametrize("name", ALL)
def test_dropout_inner_train_query_eval(name):
    """Inner loop in train mode (dropout), ``model.eval()`` before the query: the meta-gradient
    of MATH.md is the one through the steps as taken, which Full and the reference give."""
    _dropout_run(EVAL_QUERY, name, 0.3, "eval")


# ------------------------------------------------------------------ 4. noise
@pytest.mark.parametrize("name", ALL)
@FEW
@given(case=cases(), scale=st.sampled_from([0.1, 0.3]))
def test_noise_in_closure(name, case, scale):
    """Input noise drawn inside the closure (augmentation): replayed from the step's generator
    state, so each rebuilt step sees the noise its step drew."""
    K, lr, seed = case["K"], case["lr"], case["seed"]
    batches, xq, yq = data(seed, case["d_in"], case["n"], K)
    model = mlp(case["d_in"], case["width"], seed)

    def inner(fm, k):
        xb, yb = batches[k]
        return F.mse_loss(fm(xb + scale * torch.randn_like(xb)), yb)

    torch.manual_seed(seed + 2)
    expected = sgd_reference(model, inner, lambda fm: F.mse_loss(fm(xq), yq), K, lr, name)
    torch.manual_seed(seed + 2)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator(name, K)) as meta:
        for xb, yb in batches:
            meta.step(lambda f: F.mse_loss(f(xb + scale * torch.randn_like(xb)), yb))
        F.mse_loss(meta.fmodel(xq), yq).backward()
    assert_matches(model, expected)


def test_generator_state_left_as_it_was():
    """Replaying dropout during backward leaves the caller's generator where it was: a draw after
    backward is the one the same code without metagrad's replays would make."""
    K = 3
    (support,), xq, yq = data(6, 2, 4, 1)
    x_s, y_s = support
    draws = []
    for name in ["Full", "Checkpointed", "Binomial(K)"]:
        model = mlp(2, 4, 6, dropout=0.5)
        torch.manual_seed(11)
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.1), estimator=estimator(name, K)) as meta:
            for _ in range(K):
                meta.step(lambda f: F.mse_loss(f(x_s), y_s))
            F.mse_loss(meta.fmodel(xq), yq).backward()
        draws.append(torch.rand(3, dtype=D))
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])


# ------------------------------------------------------------------ 4b. generators besides torch's
try:
    import numpy
except ImportError:  # (installed with the test dependencies; the tests below skip without it)
    numpy = None

#: Generators of the script's own, read as globals (each test puts them at fixed states).
SCRIPT_RANDOM = random.Random(0)
SCRIPT_NUMPY = None if numpy is None else numpy.random.default_rng(0)
SCRIPT_TORCH = torch.Generator()
SOURCES = ["random", "numpy", "random.Random", "numpy Generator", "torch.Generator"]
WHERE = ["closure", "helper", "model"]


def seed_generators(seed):
    random.seed(seed)
    numpy.random.seed(seed)
    SCRIPT_RANDOM.seed(seed)
    SCRIPT_NUMPY.bit_generator.state = numpy.random.default_rng(seed).bit_generator.state
    SCRIPT_TORCH.manual_seed(seed)


def generator_states():
    return (random.getstate(), numpy.random.get_state()[1].tobytes(), SCRIPT_RANDOM.getstate(),
            SCRIPT_NUMPY.bit_generator.state, SCRIPT_TORCH.get_state().numpy().tobytes())


def jittered(x, source):
    """``x`` scaled or shifted by draws from ``source`` (a helper reading the generators as globals)."""
    if source == "random":
        return x * (1 + 0.2 * random.random())
    if source == "numpy":
        return x + torch.from_numpy(0.1 * numpy.random.standard_normal(tuple(x.shape)))
    if source == "random.Random":
        return x * (1 + 0.2 * SCRIPT_RANDOM.gauss(0.0, 1.0))
    if source == "numpy Generator":
        return x + torch.from_numpy(0.1 * SCRIPT_NUMPY.standard_normal(tuple(x.shape)))
    return x + 0.1 * torch.randn(x.shape, generator=SCRIPT_TORCH, dtype=x.dtype)


def jitter_of(source):
    """A function drawing from ``source`` alone, holding a generator of its own in its cell
    where there is one (the numpy and torch generators passed in)."""
    own = {"numpy Generator": SCRIPT_NUMPY, "torch.Generator": SCRIPT_TORCH}.get(source)
    if source == "random":
        return lambda x: x * (1 + 0.2 * random.random())
    if source == "numpy":
        return lambda x: x + torch.from_numpy(0.1 * numpy.random.standard_normal(tuple(x.shape)))
    if source == "random.Random":
        return lambda x: x * (1 + 0.2 * SCRIPT_RANDOM.gauss(0.0, 1.0))
    if source == "numpy Generator":
        return lambda x: x + torch.from_numpy(0.1 * own.standard_normal(tuple(x.shape)))
    return lambda x: x + 0.1 * torch.randn(x.shape, generator=own, dtype=x.dtype)


class Jittered(nn.Module):
    """A model of the user's class whose forward draws from a generator (augmentation inside
    the model), through a method of its own that reads the jitter as an attribute."""

    def __init__(self, body, jitter):
        super().__init__()
        self.body, self.jitter = body, jitter

    def augment(self, x):
        return self.jitter(x)

    def forward(self, x):
        return self.body(self.augment(x))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("where", WHERE)
@FEW
@given(case=cases(), source=st.sampled_from(SOURCES))
def test_draws_from_python_numpy_and_own_generators_are_replayed(name, where, case, source):
    """Augmentation that draws from Python's ``random``, NumPy's global generator, or a
    ``random.Random``, NumPy ``Generator`` or ``torch.Generator`` of the user's, in the closure,
    in a helper it calls, or in the forward of the model's own class: each rebuilt step replays
    the states its step drew from, so the meta-gradient is the plain unroll's, and the caller's
    generators end where the plain unroll leaves them."""
    if numpy is None:
        pytest.skip("numpy is not installed")
    K, lr, seed = case["K"], case["lr"], case["seed"]
    batches, xq, yq = data(seed, case["d_in"], case["n"], K)
    jitter = jitter_of(source)
    body = mlp(case["d_in"], case["width"], seed)
    model = Jittered(body, jitter) if where == "model" else body
    augment = {"closure": jitter, "helper": lambda x: jittered(x, source), "model": lambda x: x}[where]

    seed_generators(seed)
    expected = sgd_reference(model, lambda fm, k: F.mse_loss(fm(augment(batches[k][0])), batches[k][1]),
                             lambda fm: F.mse_loss(fm(xq), yq), K, lr, name)
    after = generator_states()
    seed_generators(seed)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator(name, K)) as meta:
        for xb, yb in batches:
            if where == "closure":
                meta.step(lambda f: F.mse_loss(f(jitter(xb)), yb))
            elif where == "helper":
                meta.step(lambda f: F.mse_loss(f(jittered(xb, source)), yb))
            else:
                meta.step(lambda f: F.mse_loss(f(xb), yb))
        F.mse_loss(meta.fmodel(xq), yq).backward()
    assert_matches(model, expected)
    assert generator_states() == after


@pytest.mark.parametrize("name", ["Checkpointed", "Truncated(K)", "Binomial(K)"])
def test_draws_from_python_numpy_and_own_generators_over_tasks(name):
    """The same over tasks (``tasks=2``): the closure runs once for both tasks under vmap, so
    both see one draw per step, and the rebuilt steps replay it."""
    if numpy is None:
        pytest.skip("numpy is not installed")
    K, lr, T = 3, 0.2, 2
    model = mlp(2, 5, 3)
    g = torch.Generator().manual_seed(5)
    x, y, xq, yq = (torch.randn(T, 6, d, generator=g, dtype=D) for d in (2, 1, 2, 1))

    def jitter(a):
        return a * (1 + 0.2 * random.random()) + torch.from_numpy(0.1 * numpy.random.standard_normal((6, 2)))

    expected = None
    for t in range(T):  # each task's own unroll, from the same generator states: the same draws at each step
        random.seed(1)
        numpy.random.seed(2)
        one = hand_unrolled(model, lambda fm, k: F.mse_loss(fm(jitter(x[t])), y[t]),
                            lambda fm: F.mse_loss(fm(xq[t]), yq[t]) / T, K, rule=SGDRef(lr),
                            restart_at=restart(name))
        expected = one if expected is None else {n: expected[n] + one[n] for n in one}
    random.seed(1)
    numpy.random.seed(2)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator(name, K), tasks=T) as meta:
        for _ in range(K):
            meta.step(lambda f, a, b: F.mse_loss(f(jitter(a)), b), x, y)
        F.mse_loss(meta.fmodel(xq), yq).backward()
    assert_matches(model, expected)


# ------------------------------------------------------------------ 4c. an update rule that draws
EXACT = [name for name in ALL if restart(name) is None]


@pytest.mark.parametrize("name", EXACT)
@FEW
@given(case=cases(), sigma=st.sampled_from([0.0, 1e-9, 0.05]), source=st.sampled_from(["torch", "numpy"]))
def test_an_update_rule_that_draws_random_numbers_is_replayed(name, case, sigma, source):
    """A noisy update rule (SGLD, a learned SG-MCMC sampler) with a learned noise scale σ: each
    rebuilt step replays the numbers its rule drew, so θ's and σ's gradients are the plain
    unroll's. With σ = 0 (or tiny) every rebuilt step agrees with the stored one whatever it
    draws, so nothing but the replay keeps σ's gradient right (it came out 2–10 off, silently)."""
    if source == "numpy" and numpy is None:
        pytest.skip("numpy is not installed")
    K, lr, seed = case["K"], case["lr"], case["seed"]
    batches, xq, yq = data(seed, case["d_in"], case["n"], K)
    model = mlp(case["d_in"], case["width"], seed)

    def seed_all():
        torch.manual_seed(seed)
        if numpy is not None:
            numpy.random.seed(seed)

    seed_all()
    s = torch.tensor(sigma, dtype=D, requires_grad=True)
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    rule, phi = NoisySGD(lr, s, source), dict(theta)
    for xb, yb in batches:
        grads = torch.autograd.grad(F.mse_loss(functional(model, phi)(xb), yb), list(phi.values()), create_graph=True)
        phi, _ = rule.step(phi, dict(zip(phi, grads)), {})
    expected = torch.autograd.grad(F.mse_loss(functional(model, phi)(xq), yq), [s, *theta.values()])
    after = (torch.rand(4, dtype=D), None if numpy is None else numpy.random.rand())

    seed_all()
    sigma_block = torch.tensor(sigma, dtype=D, requires_grad=True)
    with mg.MetaGradient(model, inner_opt=NoisySGD(lr, sigma_block, source), estimator=estimator(name, K)) as meta:
        for xb, yb in batches:
            meta.step(lambda f: F.mse_loss(f(xb), yb))
        F.mse_loss(meta.fmodel(xq), yq).backward()
    got = torch.cat([sigma_block.grad.reshape(1), *(p.grad.reshape(-1) for p in model.parameters())])
    want = torch.cat([expected[0].reshape(1), *(g.reshape(-1) for g in expected[1:])])
    assert rel_err(got, want) <= RTOL
    assert abs(float(sigma_block.grad - expected[0])) <= RTOL * max(1.0, abs(float(expected[0])))
    assert torch.equal(torch.rand(4, dtype=D), after[0])  # the caller's generators where the unroll left them
    assert numpy is None or numpy.random.rand() == after[1]


#: A scale the loop sets before each step, read by the rule below as a global.
RULE_SCALE = 1.0


class GlobalScaledSGD:
    """SGD whose step size is ``lr`` times a scale the loop sets before each step (a schedule
    kept outside the rule): the global ``RULE_SCALE``, or ``self.cfg.scale`` of an object it
    holds; with a learned ``lr``."""

    def __init__(self, lr, cfg=None):
        self.lr, self.cfg = lr, cfg

    def init(self, params):
        return {}

    def step(self, params, grads, state):
        scale = RULE_SCALE if self.cfg is None else self.cfg.scale
        return {n: p if grads.get(n) is None else p - self.lr * scale * grads[n]
                for n, p in params.items()}, state


class _Schedule:
    scale = 1.0


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("where", ["global", "object"])
@FEW
@given(case=cases(), lr0=st.sampled_from([0.0, 0.05]))
def test_an_update_rule_that_reads_a_global_the_loop_changes_is_replayed(name, where, case, lr0):
    """A rule of the user's that reads a global the loop sets before each step: each rebuilt
    update reads the value its step read (set back for the rebuild, as a closure's reads are), so
    θ's and the learned step size's gradients are the plain unroll's. With a step size learned
    from zero every rebuilt step agreed with the stored one while the step size's gradient came
    out wrong (by the ratio of the last scale to each step's), with no error; with a nonzero one
    the replay check raised."""
    global RULE_SCALE
    K, seed = case["K"], case["seed"]
    batches, xq, yq = data(seed, case["d_in"], case["n"], K)
    model = mlp(case["d_in"], case["width"], seed)
    scales = [1.0 + 0.5 * k for k in range(K)]

    cfg = _Schedule() if where == "object" else None

    def set_scale(value):
        global RULE_SCALE
        if cfg is None:
            RULE_SCALE = value
        else:
            cfg.scale = value

    lr = torch.tensor(lr0, dtype=D, requires_grad=True)
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    rule, phi = GlobalScaledSGD(lr, cfg), dict(theta)
    for (xb, yb), scale in zip(batches, scales):
        set_scale(scale)
        grads = torch.autograd.grad(F.mse_loss(functional(model, phi)(xb), yb), list(phi.values()), create_graph=True)
        phi, _ = rule.step(phi, dict(zip(phi, grads)), {})
    expected = torch.autograd.grad(F.mse_loss(functional(model, phi)(xq), yq), [lr, *theta.values()])

    lr_block = torch.tensor(lr0, dtype=D, requires_grad=True)
    try:
        with mg.MetaGradient(model, inner_opt=GlobalScaledSGD(lr_block, cfg), estimator=estimator(name, K)) as meta:
            for (xb, yb), scale in zip(batches, scales):
                set_scale(scale)
                meta.step(lambda f: F.mse_loss(f(xb), yb))
            set_scale(7.0)  # (what the loop leaves there: not what any step read)
            F.mse_loss(meta.fmodel(xq), yq).backward()
    finally:
        RULE_SCALE = 1.0
    got = torch.cat([lr_block.grad.reshape(1), *(p.grad.reshape(-1) for p in model.parameters())])
    want = torch.cat([expected[0].reshape(1), *(g.reshape(-1) for g in expected[1:])])
    assert rel_err(got, want) <= RTOL
    assert abs(float(lr_block.grad - expected[0])) <= RTOL * max(1.0, abs(float(expected[0])))


class Tempered(nn.Module):
    """A model of the user's class whose forward divides its hidden layer by ``self.temp``, a
    number the loop anneals between inner steps."""

    def __init__(self, body):
        super().__init__()
        self.first, self.rest, self.temp = body[0], body[1:], 1.0

    def forward(self, x):
        return self.rest(self.first(x) / self.temp)


@pytest.mark.parametrize("name", ALL)
@FEW
@given(case=cases())
def test_a_model_attribute_the_loop_anneals_between_steps(name, case):
    """``model.temp`` set before each inner step (a temperature annealed inside the inner loop),
    read by the forward of the model's own class: each rebuilt step reads the value its step
    read (set back for the rebuild, as a closure's reads are), so every estimator is the plain
    unroll's; it raised ReplayError before."""
    K, lr, seed = case["K"], case["lr"], case["seed"]
    batches, xq, yq = data(seed, case["d_in"], case["n"], K)
    model = Tempered(mlp(case["d_in"], case["width"], seed))
    temps = [1.0 + 0.5 * k for k in range(K)]

    def inner(fm, k):
        model.temp = temps[k]
        xb, yb = batches[k]
        return F.mse_loss(fm(xb), yb)

    def query(fm):
        model.temp = 1.0
        return F.mse_loss(fm(xq), yq)

    expected = sgd_reference(model, inner, query, K, lr, name)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator(name, K)) as meta:
        for (xb, yb), temp in zip(batches, temps):
            model.temp = temp
            meta.step(lambda f: F.mse_loss(f(xb), yb))
        model.temp = 1.0
        F.mse_loss(meta.fmodel(xq), yq).backward()
    assert_matches(model, expected)


# ------------------------------------------------------------------ 5. data changed in place
@pytest.mark.parametrize("name", REBUILDING)
def test_data_mutated_in_place(name):
    """``x.add_(0.1)`` after each step: the closure captured one tensor whose values moved, so
    no rebuilt step but the last sees its step's data. (Full: torch's own in-place error or the
    right answer; not tested.)"""
    K = 3
    model = mlp(2, 4, 7)
    batches, xq, yq = data(7, 2, 5, 1)
    x, y = batches[0][0].clone(), batches[0][1]
    with pytest.raises(mg.ReplayError) as error:
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.1), estimator=estimator(name, K)) as meta:
            for _ in range(K):
                meta.step(lambda f: F.mse_loss(f(x), y))
                x.add_(0.1)
            F.mse_loss(meta.fmodel(xq), yq).backward()
    message = str(error.value)
    assert "['x']" in message and "in place" in message  # names the tensor and says what to do


def test_a_reused_buffer_refilled_before_the_backward_with_implicit():
    """A meta-batch whose tasks share one data buffer, refilled in place for the next task, with
    one backward at the end: Implicit rebuilds the last step's closure at φ_K, where no stored
    iterate checks it, so the rebuild would solve another task's inner problem (a small MLP's
    meta-gradient came out 61% off, silently, with its data scaled in place by 1.5). It raises,
    naming the tensor; a closure that writes into a captured tensor itself (a loss log) is not
    refused."""
    model = mlp(2, 4, 8)
    batches, xq, yq = data(8, 2, 5, 2)
    x, y = batches[0][0].clone(), batches[0][1]
    log = torch.zeros(3, dtype=D)

    def inner(f, k):
        loss = F.mse_loss(f(x), y)
        log[k] = loss.detach()
        return loss

    losses = []
    with pytest.raises(mg.ReplayError, match=r"modified in place.*\['x'\]"):
        for task in range(2):
            x.copy_(batches[task][0])
            with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.1), estimator=mg.Implicit(reg=10.0)) as meta:
                for k in range(3):
                    meta.step(functools.partial(inner, k=k))
                losses.append(F.mse_loss(meta.fmodel(xq), yq))
        sum(losses).backward()
    model.zero_grad()
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.1), estimator=mg.Implicit(reg=10.0)) as meta:
        for k in range(3):
            meta.step(functools.partial(inner, k=k))
        F.mse_loss(meta.fmodel(xq), yq).backward()  # the buffer as it was: the log is no change
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", REBUILDING)
@settings(max_examples=8, deadline=None)
@given(case=cases(), hook=st.sampled_from(["dict", "append", "replace"]), in_query=st.booleans())
def test_activations_a_forward_hook_stores_over_a_minibatch_loop(name, case, hook, in_query):
    """The hook pattern with a new mini-batch and lambda per step, drawn: a dict entry, a list the
    hook appends to, or one it clears first; read by every inner loss and maybe the query."""
    K, lr = case["K"], case["lr"]
    model = mlp(case["d_in"], case["width"], case["seed"])
    batches, xq, yq = data(case["seed"], case["d_in"], case["n"], K)
    acts = {} if hook == "dict" else []
    key = "h" if hook == "dict" else -1

    def store(module, inputs, output):  # (a hook that returns None leaves the output as it is)
        if hook == "dict":
            acts["h"] = output
        else:
            if hook == "replace":
                acts.clear()
            acts.append(output)

    model[1].register_forward_hook(store)
    inner = lambda f, k: F.mse_loss(f(batches[k][0]), batches[k][1]) + 0.2 * acts[key].pow(2).mean()  # noqa: E731
    query = (lambda f: F.mse_loss(f(xq), yq) + (0.1 * acts[key].pow(2).mean() if in_query else 0))  # noqa: E731
    expected = sgd_reference(model, inner, query, K, lr, name)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator(name, K)) as meta:
        for xb, yb in batches:
            meta.step(lambda f: F.mse_loss(f(xb), yb) + 0.2 * acts[key].pow(2).mean())
        query(meta.fmodel).backward()
    assert_matches(model, expected)


@pytest.mark.parametrize("name", ["Full", "Checkpointed", "Truncated(K)", "Binomial(K)"])
def test_activations_a_forward_hook_stores_for_the_inner_loss_over_tasks(name):
    """The same hook in a block over two tasks: each task's closure reads, under vmap, what its
    own forward stored. Binomial rebuilds such steps one at a time (its vmapped rows over steps
    and tasks raised an internal error of torch's); the others raised a ReplayError."""
    K, lr = 3, 0.2
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).to(D)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(2, 8, 2, generator=g, dtype=D), torch.randn(2, 8, 1, generator=g, dtype=D)
    acts = {}
    model[1].register_forward_hook(lambda module, inputs, output: acts.__setitem__("h", output))
    refs = [sgd_reference(model, lambda f, k, t=t: F.mse_loss(f(x[t]), y[t]) + 0.3 * acts["h"].pow(2).mean(),
                          lambda f, t=t: F.mse_loss(f(x[t]), y[t]) / 2, K, lr, name) for t in range(2)]
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator(name, K), tasks=2) as meta:
        for _ in range(K):
            meta.step(lambda f, a, b: F.mse_loss(f(a), b) + 0.3 * acts["h"].pow(2).mean(), x, y)
        F.mse_loss(meta.fmodel(x), y).backward()
    assert_matches(model, {n: refs[0][n] + refs[1][n] for n in refs[0]})


@pytest.mark.parametrize("second", ["Full", "Checkpointed", "Binomial(K)"])
def test_two_blocks_open_on_one_model_for_two_tasks(second):
    """Two blocks open at once on the same model, one task each, their steps interleaved, each
    query back-propagated on its own: θ's gradient is the sum of the two tasks' meta-gradients,
    and neither block warns that the other's backward reached θ "not through the inner loop"
    (each did, through its own block)."""
    K, lr = 3, 0.2
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).to(D)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 8, 2, generator=g, dtype=D), torch.randn(2, 8, 1, generator=g, dtype=D)
    inner = [lambda f, k, t=t: F.mse_loss(f(x[t]), y[t]) for t in range(2)]
    query = [lambda f, t=t: F.mse_loss(f(x[t]), y[t]) for t in range(2)]
    refs = [sgd_reference(model, inner[t], query[t], K, lr, "Full") for t in range(2)]
    expected = {n: refs[0][n] + refs[1][n] for n in refs[0]}
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=mg.Checkpointed()) as first, \
            mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator(second, K)) as other:
        for _ in range(K):
            first.step(lambda f: F.mse_loss(f(x[0]), y[0]))
            other.step(lambda f: F.mse_loss(f(x[1]), y[1]))
        query[0](first.fmodel).backward()
        query[1](other.fmodel).backward()
    assert_matches(model, expected)


@pytest.mark.parametrize("store", ["dict", "list"])
@pytest.mark.parametrize("name", ALL + ["Checkpointed, compile=True"])
def test_activations_a_forward_hook_stores_for_the_loss(name, store):
    """A forward hook stores a layer's output in a dict or list the closure captures
    (``acts["h"] = output``), and the inner and query losses read it after the forward (a
    feature penalty). A rebuilt step's closure was handed a copy of the dict made before the
    step, so it read the step's own activation (or none at step 0), not its own forward's: a
    ReplayError ("it raised KeyError", or "is not the step the inner loop took"). The dict
    itself, holding what it held when the step began, is now handed to the rebuild; the
    caller's dict and list are left as they were (the closure's own log of its losses too)."""
    K, lr = 3, 0.2
    compiled = name.endswith("compile=True")
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).to(D)
    g = torch.Generator().manual_seed(3)
    x, y, xq, yq = (torch.randn(8, 2, generator=g, dtype=D), torch.randn(8, 1, generator=g, dtype=D),
                    torch.randn(8, 2, generator=g, dtype=D), torch.randn(8, 1, generator=g, dtype=D))
    acts, log = ({} if store == "dict" else []), []
    keep = (lambda o: acts.__setitem__("h", o)) if store == "dict" else acts.append
    model[1].register_forward_hook(lambda module, inputs, output: keep(output))
    key = "h" if store == "dict" else -1

    def inner(f, k=None):
        loss = F.mse_loss(f(x), y) + 0.3 * acts[key].pow(2).mean()
        log.append(loss.detach())
        return loss

    def query(f):
        return F.mse_loss(f(xq), yq) + 0.1 * acts[key].pow(2).mean()

    expected = sgd_reference(model, inner, query, K, lr, "Full" if compiled else name)
    log.clear()
    acts.clear()
    kind = mg.Checkpointed() if compiled else estimator(name, K)
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=kind, compile=compiled) as meta:
        for _ in range(K):
            meta.step(inner)
        loss = query(meta.fmodel)
        logged, stored = len(log), list(acts) if store == "list" else dict(acts)
        loss.backward()
    assert_matches(model, expected)
    assert len(log) == logged  # what the rebuilds logged and stored was taken back
    pairs = [(acts[k], stored[k]) for k in stored] if store == "dict" else list(zip(acts, stored))
    assert len(acts) == len(stored) and all(a is b for a, b in pairs)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's, under vmap
@pytest.mark.parametrize("estimator", [mg.Full(), mg.Checkpointed(), mg.Binomial(3, chunk_size=1), mg.Binomial(3)],
                         ids=repr)
def test_an_adapted_sparse_embedding(estimator):
    """``nn.Embedding(sparse=True)`` gives its weight a sparse gradient, which reaches the block
    from the query: taken as the dense vector it is (Full raised torch's "reshape is not
    implemented for sparse tensors"). Binomial's vmapped rows cannot run its sparse backward:
    they are rebuilt one at a time, with a warning that names sparse=False (they raised)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 1)).to(D)
        x, xq = torch.randint(0, 10, (8, 3)), torch.randint(0, 10, (8, 3))
    y, yq = torch.randn(8, 1, dtype=D, generator=torch.Generator().manual_seed(11)), torch.zeros(8, 1, dtype=D)
    batched = isinstance(estimator, mg.Binomial) and estimator.chunk_size is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", mg.MetaGradientWarning)
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.1), estimator=estimator) as meta:
            for _ in range(3):
                meta.step(lambda f: F.mse_loss(f(x), y))
            F.mse_loss(meta.fmodel(xq), yq).backward()
    said = [str(w.message) for w in caught if issubclass(w.category, mg.MetaGradientWarning)]
    assert len(said) == (1 if batched else 0) and all("sparse=False" in w for w in said), said
    expected = sgd_reference(model, lambda fm, k: F.mse_loss(fm(x), y), lambda fm: F.mse_loss(fm(xq), yq), 3, 0.1,
                             "Full")
    for n, p in model.named_parameters():
        assert rel_err(p.grad.to_dense(), expected[n].to_dense()) <= RTOL, n


# ------------------------------------------------------------------ 6. torchopt's momentum
@pytest.mark.parametrize("name", ALL)
def test_torchopt_sgd_momentum_dampening(name):
    """``torchopt.sgd(0.1, momentum=0.9, dampening=0.5)`` keeps a first-call flag in Python: its
    first step is ``b = g``, later ones ``b = μb + (1 − d)g``, and a step rebuilt during backward
    runs the later branch. Full is exact (the rule applied by hand); a rebuilt first step is
    caught; Truncated(2) at K = 3 never rebuilds the first step and gives MATH.md's Truncated(2)
    for a stateful rule (the state held constant)."""
    torchopt = pytest.importorskip("torchopt")
    K, lr = 3, 0.1
    model = mlp(2, 4, 8)
    batches, xq, yq = data(8, 2, 5, K)

    def inner(fm, k):
        return F.mse_loss(fm(batches[k][0]), batches[k][1])

    def query(fm):
        return F.mse_loss(fm(xq), yq)

    rule = MomentumRef(lr, 0.9, dampening=0.5)

    def run():
        tx = torchopt.sgd(lr, momentum=0.9, dampening=0.5)  # a fresh flag for this inner loop
        with mg.MetaGradient(model, inner_opt=tx, estimator=estimator(name, K)) as meta:
            for xb, yb in batches:
                meta.step(lambda f: F.mse_loss(f(xb), yb))
            query(meta.fmodel).backward()

    if name == "Full":
        run()
        assert_matches(model, hand_unrolled(model, inner, query, K, rule=rule))
    elif name == "Truncated(2)":
        run()
        assert_matches(model, held_constant_truncated(model, inner, query, K, 2, rule=rule))
    else:
        # With snapshots the first step is recomputed, and the mismatch is seen in its segment.
        with pytest.raises(mg.ReplayError, match="inner steps? 0"):
            run()


# ------------------------------------------------------------------ 7. torch.compile
@pytest.fixture(scope="module")
def compiled_closure():
    """One compiled closure for the module (compiling costs seconds on this machine)."""
    (support,), xq, yq = data(9, 2, 5, 1)
    x_s, y_s = support

    def closure_fn(f):
        return F.mse_loss(f(x_s), y_s)

    return torch.compile(closure_fn), closure_fn, xq, yq


@pytest.mark.parametrize("name", ["Checkpointed", "Truncated(2)", "Binomial(K)", "Full"])
def test_compiled_closure(name, compiled_closure):
    """A ``torch.compile``'d closure: aot_autograd's backward cannot be differentiated again, so
    an estimator that took its second derivatives through it would silently return FOMAML's
    answer. What is allowed: a ReplayError (or torch's own error) naming compile, or the exact
    answer (once dynamo runs the function eagerly, e.g. after it met torch.func.vmap)."""
    compiled, plain, xq, yq = compiled_closure
    K, lr = 3, 0.1

    def query(fm):
        return F.mse_loss(fm(xq), yq)

    model = mlp(2, 4, 9)
    try:
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator(name, K)) as meta:
            for _ in range(K):
                meta.step(compiled)
            query(meta.fmodel).backward()
    except mg.ReplayError as error:
        assert "torch.compile" in str(error)
        return
    except RuntimeError as error:  # torch's own refusal (Full's double backward, donated buffers)
        assert "compile" in str(error), str(error)
        return
    expected = sgd_reference(model, lambda fm, k: plain(fm), query, K, lr, name)
    first_order = hand_unrolled(model, lambda fm, k: plain(fm), query, K, rule=SGDRef(lr), restart_at=0)
    names = list(expected)
    want = torch.cat([expected[n].reshape(-1) for n in names])
    assert rel_err(torch.cat([first_order[n].reshape(-1) for n in names]), want) > 1e-3  # distinguishable
    assert_matches(model, expected)


# ------------------------------------------------------------------ 8. parameters a loss does not use
class Heads(nn.Module):
    """A body and two heads: the inner loss uses ``body``, ``head`` and the regularized ``aux``;
    the query uses ``body`` and ``qhead``; ``unused`` is used by neither."""

    def __init__(self, seed):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.body = nn.Linear(2, 4, dtype=D)
            self.head = nn.Linear(4, 1, dtype=D)
            self.qhead = nn.Linear(4, 1, dtype=D)
            self.aux = nn.Parameter(torch.randn(3, dtype=D))
            self.unused = nn.Parameter(torch.randn(2, dtype=D))

    def forward(self, x, head="inner"):
        h = torch.tanh(self.body(x))
        return self.head(h) if head == "inner" else self.qhead(h)


def _run_heads(model, est, rule, batches, xq, yq):
    with mg.MetaGradient(model, inner_opt=rule, estimator=est) as meta:
        for xb, yb in batches:
            meta.step(lambda f: F.mse_loss(f(xb), yb) + 0.1 * f.params["aux"].square().sum())
        final = {n: t.detach().clone() for n, t in meta.fmodel.params.items()}
        F.mse_loss(meta.fmodel(xq, head="query"), yq).backward()
    return final


def _heads_reference(model, batches, xq, yq, K, rule, restart_at=None):
    def inner(fm, k):
        xb, yb = batches[k]
        return F.mse_loss(fm(xb), yb) + 0.1 * fm.params["aux"].square().sum()

    return hand_unrolled(model, inner, lambda fm: F.mse_loss(fm(xq, head="query"), yq), K,
                         rule=rule, restart_at=restart_at)


@pytest.mark.parametrize("name", ALL)
def test_unused_parameters_sgd(name):
    """Values of every parameter a path reaches, and ``.grad`` None for the one neither loss
    uses; an inner-only parameter the query does not reach is checked below."""
    K, lr = 3, 0.1
    batches, xq, yq = data(10, 2, 5, K)
    model = Heads(10)
    _run_heads(model, estimator(name, K), mg.optim.SGD(lr=lr), batches, xq, yq)
    expected = _heads_reference(model, batches, xq, yq, K, SGDRef(lr), restart(name))
    assert expected["unused"] is None and expected["aux"] is None
    assert expected["qhead.weight"] is not None and expected["head.weight"] is not None
    assert_matches(model, expected, [n for n in expected if n != "aux"])


@pytest.mark.parametrize("name", ALL)
def test_inner_only_parameter_unreached_by_query(name):
    """``aux`` enters the inner loss as its own regularizer term; the query never reaches it.
    Plain autograd leaves its ``.grad`` None."""
    K = 3
    batches, xq, yq = data(11, 2, 5, K)
    model = Heads(11)
    _run_heads(model, estimator(name, K), mg.optim.SGD(lr=0.1), batches, xq, yq)
    assert model.aux.grad is None


def test_unused_parameters_implicit():
    """Implicit(reg=1.0) with the same model: it runs, and ``.grad`` stays None for the
    parameter neither loss uses."""
    K = 3
    batches, xq, yq = data(12, 2, 5, K)
    model = Heads(12)
    _run_heads(model, mg.Implicit(reg=1.0), mg.optim.SGD(lr=0.1), batches, xq, yq)
    assert model.unused.grad is None
    assert model.qhead.weight.grad is not None and torch.isfinite(model.qhead.weight.grad).all()
    assert model.body.weight.grad is not None and torch.isfinite(model.body.weight.grad).all()


@pytest.mark.parametrize("name", ALL)
def test_unused_parameters_momentum_weight_decay(name):
    """``mg.optim.Momentum(lr=0.1, momentum=0.9, weight_decay=0.1)``: the query-only ``qhead`` has
    no inner gradient, so weight decay does not move it (φ_K = θ there), and its meta-gradient
    equals the reference's, which skips parameters whose gradient is None. Full and Checkpointed
    are exact everywhere; Truncated and Binomial hold the momentum constant (MATH.md), which does
    not touch ``qhead``'s block."""
    K = 3
    batches, xq, yq = data(13, 2, 5, K)
    model = Heads(13)
    final = _run_heads(model, estimator(name, K), mg.optim.Momentum(lr=0.1, momentum=0.9, weight_decay=0.1),
                       batches, xq, yq)
    for n in ("qhead.weight", "qhead.bias", "unused"):
        assert torch.equal(final[n], dict(model.named_parameters())[n].detach()), n
    assert not torch.equal(final["aux"], model.aux.detach())  # decayed and stepped
    expected = _heads_reference(model, batches, xq, yq, K, MomentumRef(0.1, 0.9, weight_decay=0.1))
    assert expected["unused"] is None
    assert_matches(model, expected, ["qhead.weight", "qhead.bias", "unused"])
    if name in ("Full", "Checkpointed"):
        assert_matches(model, expected, [n for n in expected if n != "aux"])


# ------------------------------------------------------ learned losses and learned optimizers
class _LearnedOptimizer:
    """A learned optimizer: a small network maps each gradient coordinate to its update."""

    def __init__(self, net):
        self.net = net

    def init(self, params):
        return {}

    def step(self, params, grads, state):
        return {n: p - 0.1 * self.net(grads[n].reshape(-1, 1)).reshape(p.shape) for n, p in params.items()}, state


@pytest.mark.parametrize("estimator, compile", [(mg.Checkpointed(), False), (mg.Binomial(3), False),
                                                (mg.Checkpointed(), True)], ids=repr)
def test_a_learned_loss_network_and_a_learned_optimizer(estimator, compile):
    """Meta-parameters held in modules: a learned inner loss (a network the closure calls on the
    predictions and targets) and a learned optimizer (a network the update rule calls on the
    gradients), both meta-trained through the block. Their gradients equal a hand unroll's, and
    ``meta.info`` names each parameter by where it is held."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(13)
        model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).to(D)
        critic = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).to(D)
        optimizer = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1)).to(D)
        x, y, xq, yq = (torch.randn(8, d, dtype=D) for d in (2, 1, 2, 1))

    def inner(out, target):
        return F.mse_loss(out, target) + F.softplus(critic(torch.cat([out, target], -1))).mean()

    with mg.MetaGradient(model, inner_opt=_LearnedOptimizer(optimizer), estimator=estimator,
                         compile=compile) as meta:
        for _ in range(3):
            meta.step(lambda f: inner(f(x), y))
        F.mse_loss(meta.fmodel(xq), yq).backward()
    theta = dict(model.named_parameters())
    phi = dict(theta)
    for _ in range(3):
        grads = torch.autograd.grad(inner(functional_call(model, phi, (x,)), y), list(phi.values()), create_graph=True)
        phi = {n: p - 0.1 * optimizer(g.reshape(-1, 1)).reshape(p.shape) for (n, p), g in zip(phi.items(), grads)}
    wrt = list(theta.values()) + list(critic.parameters()) + list(optimizer.parameters())
    want = torch.autograd.grad(F.mse_loss(functional_call(model, phi, (xq,)), yq), wrt)
    for got, expected in zip(wrt, want):
        assert rel_err(got.grad, expected) <= RTOL
    assert sorted(meta.info["meta_parameters"]) == sorted(
        [f"critic.{n} (in a module the closure calls)" for n, _ in critic.named_parameters()]
        + [f"net.{n} (update rule)" for n, _ in optimizer.named_parameters()])


# ----------------------------------------------------- the fast weights through torch.func
@pytest.mark.parametrize("estimator, compile", [(mg.Full(), False), (mg.Checkpointed(), False),
                                                (mg.Binomial(3), False), (mg.Checkpointed(), True)], ids=repr)
def test_a_closure_that_calls_functional_call_with_the_fast_weights(estimator, compile):
    """The torch.func idiom, ``functional_call(model, f.params, (x,))``, in the closure and in the
    query: ``f.params`` is a dict (torch's ``functional_call`` refused the read-only mapping it
    was), still read-only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(17)
        model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).to(D)
        x, y, xq, yq = (torch.randn(8, d, dtype=D) for d in (2, 1, 2, 1))
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.1), estimator=estimator, compile=compile) as meta:
        for _ in range(3):
            meta.step(lambda f: F.mse_loss(functional_call(model, f.params, (x,)), y))
        with pytest.raises(TypeError, match=r"f.params\) are read-only.*dict\(f.params\)"):
            meta.fmodel.params["0.weight"] = torch.zeros(5, 2, dtype=D)
        F.mse_loss(functional_call(model, meta.fmodel.params, (xq,)), yq).backward()
    expected = sgd_reference(model, lambda fm, k: F.mse_loss(fm(x), y), lambda fm: F.mse_loss(fm(xq), yq), 3, 0.1,
                             "Full")
    assert_matches(model, expected)


# ------------------------------------------- a query over every iterate (MAML++'s multi-step loss)
@pytest.mark.parametrize("name", [n for n in ALL if restart(n) is None])
def test_a_query_over_every_iterate_by_weights_at(name):
    """MAML++'s multi-step loss, ``Σ_k w_k L_q(φ_k)`` with ``meta.weights_at(k)``, an estimator
    whose order or depth is K: each φ_k is differentiated through its k steps, exactly, without
    the warning that the order exceeds K (each earlier iterate has fewer steps than the order; the
    block has K). Against a hand unroll that sums the same losses."""
    K, lr, weights = 4, 0.1, [0.1, 0.2, 0.3, 0.4, 1.0]
    model = mlp(2, 5, seed=3)
    batches, xq, yq = data(3, 2, 6, K)
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    phi, total = dict(theta), weights[0] * F.mse_loss(functional(model, theta)(xq), yq)
    for k in range(K):
        loss = F.mse_loss(functional(model, phi)(batches[k][0]), batches[k][1])
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
        phi = {n: t - lr * g for (n, t), g in zip(phi.items(), grads)}
        total = total + weights[k + 1] * F.mse_loss(functional(model, phi)(xq), yq)
    expected = dict(zip(theta, torch.autograd.grad(total, list(theta.values()))))
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator(name, K)) as meta:
        for xb, yb in batches:
            meta.step(lambda f: F.mse_loss(f(xb), yb))
        sum(w * F.mse_loss(functional_call(model, meta.weights_at(k), (xq,)), yq)
            for k, w in enumerate(weights)).backward()
    assert_matches(model, expected)


@pytest.mark.parametrize("make, text", [(lambda: mg.Binomial(order=5), "Binomial: order=5"),
                                        (lambda: mg.Truncated(5), "Truncated: steps=5")])
def test_an_order_beyond_the_steps_taken_warns_once_naming_k(make, text):
    model = mlp(2, 5, seed=3)
    batches, xq, yq = data(3, 2, 6, 3)
    with pytest.warns(mg.MetaGradientWarning, match=rf"{re.escape(text)} exceeds the number of inner steps K=3") as caught:
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.1), estimator=make()) as meta:
            for xb, yb in batches:
                meta.step(lambda f: F.mse_loss(f(xb), yb))
            F.mse_loss(meta.fmodel(xq), yq).backward()
    assert len([w for w in caught if "exceeds" in str(w.message)]) == 1
    assert_matches_mse_loop(model, batches, xq, yq, 3, 0.1, "Full")


@pytest.mark.parametrize("name", [n for n in ALL if restart(n) is None and n != "Full"])
def test_per_step_query_losses_backpropagated_one_at_a_time_do_not_warn(name):
    """MAML++'s per-step losses back-propagated as the loop goes (``L_q(φ_k).backward()`` after
    step k): θ's ``.grad`` sums them, exactly, and an order or depth of K is not said to exceed
    the k steps taken when an early backward runs (the block ends with K; warnings are errors
    here). Full keeps one graph, which a plain unroll back-propagates with retain_graph=True."""
    K, lr = 4, 0.1
    model = mlp(2, 5, seed=5)
    batches, xq, yq = data(5, 2, 6, K)
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    phi, total = dict(theta), 0
    for k in range(K):
        loss = F.mse_loss(functional(model, phi)(batches[k][0]), batches[k][1])
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
        phi = {n: t - lr * g for (n, t), g in zip(phi.items(), grads)}
        total = total + F.mse_loss(functional(model, phi)(xq), yq)
    expected = dict(zip(theta, torch.autograd.grad(total, list(theta.values()))))
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator(name, K)) as meta:
        for xb, yb in batches:
            meta.step(lambda f: F.mse_loss(f(xb), yb))
            F.mse_loss(meta.fmodel(xq), yq).backward()
    assert_matches(model, expected)


def test_an_order_beyond_k_turned_into_an_error_leaves_grad_as_it_was():
    """Under ``warnings.simplefilter("error")`` the warning said at the block's end raises there,
    and the block ends as one that raised: ``.grad`` as at entry."""
    model = mlp(2, 5, seed=3)
    batches, xq, yq = data(3, 2, 6, 2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(mg.MetaGradientWarning, match="steps=5 exceeds the number of inner steps K=2"):
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.1), estimator=mg.Truncated(5)) as meta:
            for xb, yb in batches:
                meta.step(lambda f: F.mse_loss(f(xb), yb))
            F.mse_loss(meta.fmodel(xq), yq).backward()
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


# ------------------------------------------ a penalty on θ back-propagated beside the query
@pytest.mark.parametrize("name", ["Full", "Checkpointed", "Binomial(K)"])
def test_a_penalty_on_theta_backpropagated_after_the_query_is_added_without_a_warning(name):
    """``query.backward()`` then ``(λ‖θ‖²).backward()`` in the block: θ's ``.grad`` is the
    meta-gradient plus the penalty's gradient, and the penalty's backward, which reaches θ but
    not the inner loop, is not taken for a query built from the model itself (warnings are errors
    here). The same backward before any through the inner loop still warns."""
    K, lr, lam = 3, 0.1, 1e-2
    model = mlp(2, 5, seed=4)
    batches, xq, yq = data(4, 2, 6, K)
    expected = sgd_reference(model, lambda fm, k: F.mse_loss(fm(batches[k][0]), batches[k][1]),
                             lambda fm: F.mse_loss(fm(xq), yq), K, lr, "Full")
    expected = {n: g + 2 * lam * p.detach() for (n, p), g in zip(model.named_parameters(), expected.values())}
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator(name, K)) as meta:
        for xb, yb in batches[:K]:
            meta.step(lambda f: F.mse_loss(f(xb), yb))
        F.mse_loss(meta.fmodel(xq), yq).backward()
        (lam * sum((p ** 2).sum() for p in model.parameters())).backward()
    assert_matches(model, expected)
    model.zero_grad(set_to_none=True)
    with pytest.warns(mg.MetaGradientWarning, match="not through the inner loop"):
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator(name, K)) as meta:
            for xb, yb in batches[:K]:
                meta.step(lambda f: F.mse_loss(f(xb), yb))
            F.mse_loss(model(xq), yq).backward()  # the mistaken query: the model itself


class _OldSwish(torch.autograd.Function):
    """x·σ(x) as a custom Function of the old style (forward takes ctx), its backward differentiable."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * (s + x * s * (1 - s))


class _NewSwish(torch.autograd.Function):
    """The same Function in the style torch.func runs: setup_context, and a vmap rule generated."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * torch.sigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * (s + x * s * (1 - s))


class _SwishNet(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(8)
            self.a, self.b = nn.Linear(2, 5, dtype=D), nn.Linear(5, 1, dtype=D)

    def forward(self, x):
        return self.b(self.function.apply(self.a(x)))


@pytest.mark.parametrize("style", ["old", "new"])
@pytest.mark.parametrize("name", ["Full", "Checkpointed", "Binomial(K)", "Binomial(K,chunk_size=1)"])
def test_a_custom_autograd_function_in_the_model(name, style):
    """A custom torch.autograd.Function with a differentiable backward: exact. Binomial's vmapped
    rows cannot run one of the old style (forward(ctx, ...)): they are rebuilt one at a time with a
    warning that names setup_context (they raised); one with setup_context and a vmap rule is
    batched, with no warning. meta_grad, all torch.func, refuses the old style, naming the fix."""
    K, lr = 3, 0.2
    model = _SwishNet(_OldSwish if style == "old" else _NewSwish)
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(8, 2, generator=g, dtype=D), torch.randn(8, 1, generator=g, dtype=D)
    expected = sgd_reference(model, lambda f, k: F.mse_loss(f(x), y), lambda f: F.mse_loss(f(x), y), K, lr, name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", mg.MetaGradientWarning)
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr), estimator=estimator(name, K)) as meta:
            for _ in range(K):
                meta.step(lambda f: F.mse_loss(f(x), y))
            F.mse_loss(meta.fmodel(x), y).backward()
    assert_matches(model, expected)
    said = [str(w.message) for w in caught if issubclass(w.category, mg.MetaGradientWarning)]
    assert len(said) == (1 if style == "old" and name == "Binomial(K)" else 0), said
    assert all("setup_context" in w for w in said)
    if name == "Checkpointed" and style == "old":
        params = {n: p.detach() for n, p in model.named_parameters()}
        with pytest.raises(ValueError, match=r"(?s)run a torch\.autograd\.Function only if it has a setup_context.*"
                                             r"MetaGradient block, which runs it"):
            mg.functional.meta_grad(lambda p, b: F.mse_loss(functional_call(model, p, (b[0],)), b[1]), params,
                                    (x, y), (x, y), inner_opt=mg.optim.SGD(lr=lr), steps=K, estimator=mg.Checkpointed())
