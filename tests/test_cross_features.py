"""Features drawn together, against a hand-unrolled loop written here (no metagrad inside).

Each feature has tests of its own; these draw them at once, so that two features that each
work alone are also checked together: an update rule (SGD, momentum, Nesterov momentum, Adam,
from ``tests/reference.py``) with a fixed or a learned step size; a meta-parameter η in the
inner loss (a weight decay coefficient, per-example weights captured by the closure or passed
per task in the batch, weights computed from another tensor before the block); a mini-batch
per step captured by a new lambda; a block over tasks (``tasks=2``); ``adapt=`` (the last
layer only); a query with a direct term in η; and an exact estimator (Full, Checkpointed,
Checkpointed with snapshots, and for plain SGD Truncated(K) and Binomial(order=K)). With one
task, the context manager's draws add: the rule given as a rule of the user's own (the
reference's rule behind ``init``/``step`` over name→tensor dicts, a Python step count in its
state), steps taken from a loss the loop built (``meta.step_from_loss``), a query term on every
past iterate (``meta.weights_at(k)``), dropout in the model (each step's mask replayed from
its generator state), and noise the user's rule adds to each update (SGLD's ``σξ``, with a
learned noise scale σ, zero or not: each rebuilt update replays its draws). The same draws run
through ``mg.functional.meta_grad``.

The reference differentiates the unrolled loop with ``torch.autograd.grad(create_graph=True)``
in float64; every gradient (θ's and each η's) must match it to 1e-8, relative to the largest
of its own entries or, for a gradient that is nearly zero (Adam's first step barely depends on
the per-example weights), to 1e-6 of the largest entry of any gradient.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st
from torch.func import functional_call

import metagrad as mg

try:
    from reference import AdamRule, MomentumRule, SGDRule
except ImportError:  # collected as a package (pytest --import-mode=importlib, python -m pytest from elsewhere)
    from tests.reference import AdamRule, MomentumRule, SGDRule

D = torch.float64
N = 6  # support (and query) examples per task
RTOL = 1e-8


def model(seed: int, depth: int, dropout: bool = False) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    width = 2
    for i in range(depth):
        layers += [nn.Linear(width, 4), nn.Tanh()] + ([nn.Dropout(0.25)] if dropout and i == 0 else [])
        width = 4
    layers.append(nn.Linear(width, 1))
    net = nn.Sequential(*layers).to(D)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=generator, dtype=D))
    return net


def rules(kind: str, lr: Any) -> tuple[Any, Any]:
    """metagrad's rule and the reference's hand-written one."""
    if kind == "sgd":
        return mg.optim.SGD(lr), SGDRule(lr)
    if kind == "momentum":
        return mg.optim.Momentum(lr, 0.5), MomentumRule(lr, 0.5)
    if kind == "nesterov":
        return mg.optim.Momentum(lr, 0.5, nesterov=True), MomentumRule(lr, 0.5, nesterov=True)
    return mg.optim.Adam(lr), AdamRule(lr)


class OwnRule:
    """A rule of the user's own: the reference's rule (over lists) behind ``init``/``step`` over
    name→tensor dicts, with the state as the reference keeps it (a Python step count in it), and
    with ``sigma`` noise ``σξ`` added to each update (ξ from torch's generator: SGLD)."""

    def __init__(self, rule: Any, sigma: Optional[torch.Tensor] = None) -> None:
        self.rule, self.sigma = rule, sigma

    def init(self, params: dict[str, torch.Tensor]) -> Any:
        return self.rule.init(list(params.values()))

    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], state: Any) -> Any:
        new, state = self.rule.step(list(params.values()), [grads[n] for n in params], state)
        return dict(zip(params, noisy(new, self.sigma))), state


def noisy(new: list[torch.Tensor], sigma: Optional[torch.Tensor]) -> list[torch.Tensor]:
    return new if sigma is None else [p + sigma * torch.randn_like(p) for p in new]


def estimator(kind: str, steps: int) -> mg.Estimator:
    return {"Full": lambda: mg.Full(), "Checkpointed": lambda: mg.Checkpointed(),
            "Checkpointed(snapshots=2)": lambda: mg.Checkpointed(snapshots=2),
            "Checkpointed(snapshots=1)": lambda: mg.Checkpointed(snapshots=1),
            "Truncated(K)": lambda: mg.Truncated(steps),
            "Binomial(order=K)": lambda: mg.Binomial(order=steps, monitor=False)}[kind]()


@st.composite
def draws(draw: Any) -> dict[str, Any]:
    c = dict(seed=draw(st.integers(0, 10_000)), depth=draw(st.integers(1, 2)), K=draw(st.integers(1, 4)),
             rule=draw(st.sampled_from(["sgd", "momentum", "nesterov", "adam"])),
             learned_lr=draw(st.booleans()), lr=draw(st.sampled_from([0.05, 0.2])),
             eta=draw(st.sampled_from(["none", "weight decay", "weights", "computed weights", "weights per task"])),
             minibatch=draw(st.booleans()), tasks=draw(st.sampled_from([None, 2])), last_layer=draw(st.booleans()),
             direct=draw(st.booleans()),
             estimator=draw(st.sampled_from(["Full", "Checkpointed", "Checkpointed(snapshots=2)",
                                             "Checkpointed(snapshots=1)", "Truncated(K)", "Binomial(order=K)"])))
    if c["estimator"] in ("Truncated(K)", "Binomial(order=K)") and c["rule"] != "sgd":
        c["estimator"] = "Checkpointed"  # exact for plain SGD only (MATH.md: the state held constant)
    if c["eta"] == "weights per task" and c["tasks"] is None:
        c["eta"] = "weights"
    one_task = c["tasks"] is None  # (the forms below are drawn for one task)
    c.update(own_rule=draw(st.booleans()), from_loss=one_task and draw(st.booleans()),
             history=one_task and draw(st.booleans()), dropout=one_task and draw(st.booleans()),
             noise=one_task and draw(st.booleans()), sigma=draw(st.sampled_from([0.0, 0.02])))
    if c["noise"]:
        c["own_rule"] = True  # (the noise is the user's rule's)
    return c


class Problem:
    """One draw's model, data and η, built afresh (identical) for metagrad and the reference."""

    def __init__(self, c: dict[str, Any]) -> None:
        self.c = c
        self.net = model(c["seed"], c["depth"], c.get("dropout", False))
        self.names = [n for n, _ in self.net.named_parameters()]
        self.adapted = self.names[-2:] if c.get("last_layer") else list(self.names)
        generator = torch.Generator().manual_seed(c["seed"] + 1)
        lead = (c["tasks"],) if c["tasks"] else ()
        self.x, self.y, self.xq, self.yq = (torch.randn(*lead, N, d, generator=generator, dtype=D)
                                            for d in (2, 1, 2, 1))
        step = 0.2 if c["rule"] == "adam" else 1.0  # Adam's steps are about lr long
        self.eta = {"lr": torch.tensor(c["lr"] * step, dtype=D, requires_grad=True),
                    "wd": torch.tensor(0.05, dtype=D, requires_grad=True),
                    "w": (torch.rand(*(lead if c["eta"] == "weights per task" else ()), N, generator=generator,
                                     dtype=D) + 0.5).requires_grad_(),
                    "z": torch.randn(N, generator=generator, dtype=D, requires_grad=True),
                    "s": torch.tensor(c.get("sigma", 0.0), dtype=D, requires_grad=True)}
        self.computed = torch.nn.functional.softplus(self.eta["z"]) + 0.1  # a non-leaf η, before the block

    def lr(self) -> Any:
        return self.eta["lr"] if self.c["learned_lr"] else self.eta["lr"].item()

    def rows(self, k: int) -> slice:
        return slice(3 * (k % 2), 3 * (k % 2) + 3) if self.c["minibatch"] else slice(None)

    def inner(self, out: torch.Tensor, y: torch.Tensor, adapted: list[torch.Tensor],
              w: Optional[torch.Tensor], rows: slice) -> torch.Tensor:
        r = (out - y).squeeze(-1) ** 2
        kind = self.c["eta"]
        if kind == "weights":
            loss = (self.eta["w"][rows] * r).mean()
        elif kind == "weights per task":
            loss = (w * r).mean()
        elif kind == "computed weights":
            loss = (self.computed[rows] * r).mean()
        else:
            loss = r.mean()
        if kind == "weight decay":
            loss = loss + self.eta["wd"] * sum((p ** 2).sum() for p in adapted)
        return loss

    def history(self, query: torch.Tensor, past: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """The query with a term on each past iterate φ_0 … φ_{K−1} (``meta.weights_at(k)``)."""
        for params in past if self.c.get("history") else []:
            query = query + 0.1 * (functional_call(self.net, params, (self.xq,)) ** 2).mean()
        return query

    def direct(self, query: torch.Tensor) -> torch.Tensor:
        if not self.c["direct"]:
            return query
        return query + 0.3 * self.eta["wd"] ** 2 + 0.1 * (self.eta["w"] ** 2).sum() + 0.1 * self.eta["lr"] ** 2

    def gradients(self) -> dict[str, torch.Tensor]:
        out = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in self.net.named_parameters()}
        out.update({f"η {n}": t.grad if t.grad is not None else torch.zeros_like(t) for n, t in self.eta.items()})
        return out


def by_hand(c: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The reference: each task's loop unrolled with create_graph=True, its query's mean."""
    pb = Problem(c)
    _, rule = rules(c["rule"], pb.lr())
    theta = dict(pb.net.named_parameters())
    total = torch.zeros((), dtype=D)
    torch.manual_seed(c["seed"] + 2)  # (dropout's masks)
    for t in range(c["tasks"] or 1):
        pick = (lambda a: a[t]) if c["tasks"] else (lambda a: a)
        params = dict(theta)
        past = []
        state = rule.init([params[n] for n in pb.adapted])
        for k in range(c["K"]):
            past.append(dict(params))
            rows = pb.rows(k)
            w = pb.eta["w"][t, rows] if c["eta"] == "weights per task" else None
            adapted = [params[n] for n in pb.adapted]
            loss = pb.inner(functional_call(pb.net, params, (pick(pb.x)[rows],)), pick(pb.y)[rows], adapted, w, rows)
            grads = torch.autograd.grad(loss, adapted, create_graph=True)
            new, state = rule.step(adapted, list(grads), state)
            params.update(zip(pb.adapted, noisy(new, pb.eta["s"] if c.get("noise") else None)))
        total = total + ((functional_call(pb.net, params, (pick(pb.xq),)) - pick(pb.yq)) ** 2).mean()
    pb.direct(pb.history(total / (c["tasks"] or 1), past)).backward()
    return pb.gradients()


def with_metagrad(c: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The same loop as users write it: a new lambda per step capturing its mini-batch."""
    pb = Problem(c)
    rule, reference_rule = rules(c["rule"], pb.lr())
    rule = OwnRule(reference_rule, pb.eta["s"] if c.get("noise") else None) if c["own_rule"] else rule
    tasks = c["tasks"]
    torch.manual_seed(c["seed"] + 2)  # (dropout's masks)
    with mg.MetaGradient(pb.net, inner_opt=rule, estimator=estimator(c["estimator"], c["K"]), tasks=tasks,
                         adapt=pb.adapted if c["last_layer"] else None) as meta:
        for k in range(c["K"]):
            rows = pb.rows(k)
            if tasks:
                w = pb.eta["w"][:, rows] if c["eta"] == "weights per task" else torch.zeros(tasks, N, dtype=D)[:, rows]
                meta.step(lambda f, x, y, w: pb.inner(f(x), y, [f.params[n] for n in pb.adapted], w, rows),
                          pb.x[:, rows], pb.y[:, rows], w)
            elif c["from_loss"]:
                w = meta.fast_weights()
                meta.step_from_loss(pb.inner(functional_call(pb.net, w, (pb.x[rows],)), pb.y[rows],
                                             [w[n] for n in pb.adapted], None, rows), w)
            else:
                x, y = pb.x[rows], pb.y[rows]
                meta.step(lambda f: pb.inner(f(x), y, [f.params[n] for n in pb.adapted], None, rows))
        query = ((meta.fmodel(pb.xq) - pb.yq) ** 2).mean()
        past = [meta.weights_at(k) for k in range(c["K"])] if c["history"] else []
        pb.direct(pb.history(query, past)).backward()
    return pb.gradients()


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], c: dict[str, Any]) -> None:
    scale = max(t.abs().max().item() for t in want.values())
    for name, expected in want.items():
        size = max(expected.abs().max().item(), 1e-6 * scale)
        error = (got[name] - expected).abs().max().item()
        assert error <= RTOL * size, f"{name}: off by {error:.3g} (scale {size:.3g}) in {c}"


@settings(max_examples=80)
@given(draws())
def test_the_context_manager_with_features_drawn_together_equals_a_hand_unroll(c):
    assert_close(with_metagrad(c), by_hand(c), c)


@settings(max_examples=20)
@given(draws())
@pytest.mark.filterwarnings("ignore:meta. .* is neither read by loss_fn:metagrad.MetaGradientWarning")  # (η drawn unused)
def test_the_functional_face_with_features_drawn_together_equals_a_hand_unroll(c):
    # The functional face: one batch for every step, η passed to the loss as ``meta``; no
    # adapt= (every parameter is a fast weight), no weights computed before the call, and none
    # of the context manager's forms (its rule is metagrad's; no dropout).
    c = dict(c, minibatch=False, last_layer=False, dropout=False, noise=False,
             eta={"computed weights": "weights"}.get(c["eta"], c["eta"]))
    pb = Problem(c)
    meta = {n: t.detach() for n, t in pb.eta.items() if n not in ("z", "s")}
    rule, _ = rules(c["rule"], meta["lr"] if c["learned_lr"] else pb.lr())

    def loss_fn(params: dict[str, torch.Tensor], batch: Any, eta: dict[str, torch.Tensor]) -> torch.Tensor:
        x, y, w, rows = batch
        saved = dict(pb.eta)
        pb.eta.update(eta)  # the loss reads η from the call's argument
        try:
            return pb.inner(functional_call(pb.net, params, (x,)), y, list(params.values()), w, rows)
        finally:
            pb.eta.update(saved)

    tasks = c["tasks"]
    w = pb.eta["w"].detach() if c["eta"] == "weights per task" else torch.zeros(*((tasks,) if tasks else ()), N, dtype=D)
    theta = {n: p.detach() for n, p in pb.net.named_parameters()}
    g, g_meta = mg.functional.meta_grad(loss_fn, theta, (pb.x, pb.y, w, slice(None)), (pb.xq, pb.yq, w, slice(None)),
                                        inner_opt=rule, steps=c["K"], estimator=estimator(c["estimator"], c["K"]),
                                        meta=meta, tasks=tasks)
    got = dict(g)
    got.update({f"η {n}": t for n, t in g_meta.items()})
    assert_close(got, functional_reference(c), c)


def functional_reference(c: dict[str, Any]) -> dict[str, torch.Tensor]:
    """By hand: the functional face's loss, η read from its argument, for the steps and the query."""
    pb = Problem(c)
    meta = {n: t for n, t in pb.eta.items() if n not in ("z", "s")}
    _, rule = rules(c["rule"], meta["lr"] if c["learned_lr"] else pb.lr())
    theta = dict(pb.net.named_parameters())
    total = torch.zeros((), dtype=D)
    for t in range(c["tasks"] or 1):
        pick = (lambda a: a[t]) if c["tasks"] else (lambda a: a)
        w = pb.eta["w"][t].detach() if c["eta"] == "weights per task" else None  # data, not η
        params = dict(theta)
        state = rule.init(list(params.values()))
        for _ in range(c["K"]):
            loss = pb.inner(functional_call(pb.net, params, (pick(pb.x),)), pick(pb.y), list(params.values()), w,
                            slice(None))
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            new, state = rule.step(list(params.values()), list(grads), state)
            params = dict(zip(params, new))
        total = total + pb.inner(functional_call(pb.net, params, (pick(pb.xq),)), pick(pb.yq), list(params.values()),
                                 w, slice(None))
    grads = torch.autograd.grad(total / (c["tasks"] or 1), list(theta.values()) + list(meta.values()),
                                allow_unused=True)
    names = list(theta) + [f"η {n}" for n in meta]
    return {n: g if g is not None else torch.zeros_like(t)
            for n, g, t in zip(names, grads, list(theta.values()) + list(meta.values()))}
