"""Independent reference for the estimator tests, written with plain torch only.

Nothing here imports metagrad. The reference evaluates every model by hand from a
flat list of tensors (``F.linear`` and an activation for MLPs, the quadratic form for
quadratics), unrolls the inner loop itself, and evaluates the formulas of MATH.md
with dense matrices:

- :func:`unroll`: a hand-unrolled inner loop of gradient descent with
  ``create_graph=True``; its gradient is the exact meta-gradient ``g``.
- :func:`hessians`, :func:`factors`: dense ``H_k = ∇²L_tr(φ_k)`` and the factors
  ``B_k = J_kᵀ − I = −H_k D`` (``D`` the diagonal of step sizes; ``B_k = −αH_k``
  for one step size), so that ``g = (I + B_0)(I + B_1)⋯(I + B_{K−1}) v``, MATH.md (1).
- :func:`subset_sum`: MATH.md (2) by explicit enumeration of the subsets
  ``k_1 < … < k_l`` with ``itertools.combinations``.
- :func:`level_sum`, :func:`sequential_sum`: the two other forms of (2) given in
  MATH.md (the a^{(j)}_k levels, and the memory-lean e_j recursion), used only to
  check the reference against itself.
- :func:`last_factors`: ``(I + B_{K−T})⋯(I + B_{K−1}) v`` (Truncated(T)).
- :func:`blocked_subset_sum`: (2) within blocks of S steps laid from the last step
  backwards, chained exactly (the blocked binomial estimator).
- the closed-form error bounds of MATH.md ("Error bounds").

For any model written as a function of a list of tensors, and for update rules with a
state (MATH.md, "Optimizers other than plain gradient descent"):

- :class:`SGDRule`, :class:`MomentumRule`, :class:`AdamRule`, :class:`AdagradRule`:
  ``torch.optim``'s SGD, SGD(momentum), Adam and Adagrad written out by hand as pure
  ``step(params, grads, state) -> (params, state)`` functions over lists.
- :func:`plain_loop`: the inner loop without any graph; its ``v = ∇L_val(φ_K)`` is what
  FirstOrder computes, and it records the state each step starts from.
- :func:`exact_meta_gradient`: the loop unrolled with ``create_graph=True`` through the
  parameters *and* the state: the exact meta-gradient.
- :func:`state_held_constant_factors`: dense ``B_k = J_kᵀ − I`` with
  ``J_k = ∂φ_{k+1}/∂φ_k`` at the recorded state ``s_k`` held constant, by
  ``torch.autograd.functional.jacobian``; :func:`last_factors` and :func:`subset_sum`
  of these are MATH.md's Truncated(T) and Binomial(L) for that rule.
- :func:`sgd_factors`: ``B_k = −D H_k`` with ``H_k`` by ``torch.autograd.functional.hessian``.
- :func:`restarted_gradient`: the gradient of the query with respect to a detached leaf
  copy of ``φ_{K−T}``, through the last T steps unrolled again from it with the state
  ``s_{K−T}`` a constant (which, for a stateful rule, lets the later states depend on
  the leaf: it equals the state-held-constant product only for SGD, or for T ≤ 1).

It also holds the small problem builders the tests share (MLPs and quadratics,
each exposing both a reference evaluation from a list of tensors and a closure for
the package's functional model), and Hypothesis strategies that draw them. The
strategies only generate data; they compute nothing the tests compare against.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

Tensor = torch.Tensor

# ----------------------------------------------------------------------------- helpers


def flat(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Split a vector into tensors of the given shapes (views, differentiable)."""
    out, start = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(vector[start:start + n].reshape(shape))
        start += n
    assert start == vector.numel()
    return out


def rel_err(actual: Tensor, expected: Tensor, scale: Optional[float] = None) -> float:
    """``‖actual − expected‖ / scale`` (norm-wise; ``scale`` defaults to ``‖expected‖``). Without
    ``scale`` both norms are taken of the vectors divided by ``expected``'s largest entry, so that
    a diverging problem's huge values (1e169: their squares overflow) still compare."""
    actual, expected = actual.double(), expected.double()
    if scale is None:
        largest = float(expected.abs().max()) if expected.numel() else 0.0
        if 0.0 < largest < math.inf:
            actual, expected = actual / largest, expected / largest
    diff = float(torch.linalg.vector_norm(actual - expected))
    denom = float(torch.linalg.vector_norm(expected)) if scale is None else float(scale)
    if denom == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / denom


# ----------------------------------------------------------------------------- problems

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "softplus": F.softplus,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
}
_MODULES: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
}


def mse(out: Tensor, target: Tensor) -> Tensor:
    return ((out - target) ** 2).mean()


class Problem:
    """An inner/outer problem seen two ways.

    Reference side: ``inner_loss(params, k)`` and ``query_loss(params)`` take a list of
    tensors (in ``names`` order). Package side: ``module()`` builds a fresh module whose
    trainable parameters are ``theta``; ``closure(k)`` is step k's closure over the
    functional model and ``package_query_loss(fmodel)`` the query loss.

    ``schedule[k]`` selects which inner loss (batch) step k uses, so the inner loss may
    change from step to step.
    """

    names: list[str]
    theta: list[Tensor]
    schedule: tuple[int, ...]

    @property
    def shapes(self) -> list[torch.Size]:
        return [t.shape for t in self.theta]

    @property
    def dim(self) -> int:
        return sum(t.numel() for t in self.theta)

    @property
    def dtype(self) -> torch.dtype:
        return self.theta[0].dtype

    def batch(self, k: int) -> int:
        return self.schedule[k % len(self.schedule)]

    def module(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def inner_loss(self, params: Sequence[Tensor], k: int) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def query_loss(self, params: Sequence[Tensor]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def closure(self, k: int) -> Callable:  # pragma: no cover
        raise NotImplementedError

    def package_query_loss(self, fmodel) -> Tensor:  # pragma: no cover
        raise NotImplementedError


def _inner_closure(x: Tensor, y: Tensor) -> Callable:
    # One closure object per step, as a user writes it; steps of the same batch
    # capture the same tensors.
    return lambda fmodel: mse(fmodel(x), y)


class MLPProblem(Problem):
    """``nn.Sequential(Linear, act, …, Linear)`` with MSE losses on small data."""

    def __init__(self, widths: Sequence[int], activation: str, seed: int, *,
                 batches: Sequence[tuple[Tensor, Tensor]], query: tuple[Tensor, Tensor],
                 schedule: Sequence[int] = (0,), dtype: torch.dtype = torch.float64) -> None:
        self.widths = tuple(widths)
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        with torch.random.fork_rng(devices=[]):  # default nn.Linear init, global RNG untouched
            torch.manual_seed(seed)
            module = self._empty_module(torch.float64)  # the same θ for every dtype
        named = list(module.named_parameters())
        self.names = [n for n, _ in named]
        self.theta = [p.detach().to(dtype).clone() for _, p in named]
        self.batches = [(x.to(dtype), y.to(dtype)) for x, y in batches]
        self.query = (query[0].to(dtype), query[1].to(dtype))
        self.schedule = tuple(schedule)
        self._closures = [_inner_closure(x, y) for x, y in self.batches]

    def _empty_module(self, dtype: torch.dtype) -> nn.Sequential:
        layers: list[nn.Module] = []
        for i in range(len(self.widths) - 1):
            layers.append(nn.Linear(self.widths[i], self.widths[i + 1], dtype=dtype))
            if i < len(self.widths) - 2:
                layers.append(_MODULES[self.activation]())
        return nn.Sequential(*layers)

    def module(self) -> nn.Module:
        module = self._empty_module(self.dtype)
        with torch.no_grad():
            for p, t in zip(module.parameters(), self.theta):
                p.copy_(t)
        return module

    def forward(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        """The network evaluated by hand: ``F.linear`` and the activation."""
        h = x
        n_layers = len(params) // 2
        for i in range(n_layers):
            h = F.linear(h, params[2 * i], params[2 * i + 1])
            if i < n_layers - 1:
                h = self.act(h)
        return h

    def inner_loss(self, params: Sequence[Tensor], k: int) -> Tensor:
        x, y = self.batches[self.batch(k)]
        return mse(self.forward(params, x), y)

    def query_loss(self, params: Sequence[Tensor]) -> Tensor:
        return mse(self.forward(params, self.query[0]), self.query[1])

    def closure(self, k: int) -> Callable:
        return self._closures[self.batch(k)]

    def package_query_loss(self, fmodel) -> Tensor:
        return mse(fmodel(self.query[0]), self.query[1])

    def __repr__(self) -> str:
        return (f"MLPProblem(widths={self.widths}, activation={self.activation!r}, "
                f"batches={len(self.batches)}, schedule={self.schedule}, dtype={self.dtype})")


class QuadraticModel(nn.Module):
    """A module holding one parameter vector φ; calling it returns φ."""

    def __init__(self, phi: Tensor) -> None:
        super().__init__()
        self.phi = nn.Parameter(phi.detach().clone())

    def forward(self) -> Tensor:
        return self.phi


def quadratic(phi: Tensor, A: Tensor, b: Tensor) -> Tensor:
    """``½ φᵀAφ − bᵀφ``."""
    return 0.5 * phi @ (A @ phi) - b @ phi


def _quadratic_closure(A: Tensor, b: Tensor) -> Callable:
    return lambda fmodel: quadratic(fmodel(), A, b)


class QuadraticProblem(Problem):
    """``L_tr(φ) = ½φᵀA_kφ − b_kᵀφ`` (``A_k = As[schedule[k]]``, symmetric), and a
    smooth query loss ``½‖Mφ − c‖² + w·Σ log cosh(φ)``; every ``H_k = A_k``."""

    def __init__(self, theta: Tensor, As: Sequence[Tensor], bs: Sequence[Tensor], *,
                 M: Tensor, c: Tensor, w: float = 0.0, schedule: Sequence[int] = (0,)) -> None:
        self.names = ["phi"]
        self.theta = [theta.detach().clone()]
        self.As = [0.5 * (A + A.T) for A in As]
        self.bs = list(bs)
        self.M, self.c, self.w = M, c, float(w)
        self.schedule = tuple(schedule)
        self._closures = [_quadratic_closure(A, b) for A, b in zip(self.As, self.bs)]

    def module(self) -> nn.Module:
        return QuadraticModel(self.theta[0])

    def inner_loss(self, params: Sequence[Tensor], k: int) -> Tensor:
        i = self.batch(k)
        return quadratic(params[0], self.As[i], self.bs[i])

    def _query(self, phi: Tensor) -> Tensor:
        r = self.M @ phi - self.c
        out = 0.5 * r @ r
        if self.w:
            out = out + self.w * (torch.logaddexp(phi, -phi) - math.log(2)).sum()  # log cosh
        return out

    def query_loss(self, params: Sequence[Tensor]) -> Tensor:
        return self._query(params[0])

    def closure(self, k: int) -> Callable:
        return self._closures[self.batch(k)]

    def package_query_loss(self, fmodel) -> Tensor:
        return self._query(fmodel())

    def ell(self) -> float:
        """``ℓ = max_k ‖A_k‖₂`` (largest |eigenvalue|)."""
        return max(float(torch.linalg.eigvalsh(A).abs().max()) for A in self.As)

    def __repr__(self) -> str:
        return f"QuadraticProblem(d={self.dim}, inner losses={len(self.As)}, schedule={self.schedule})"


def random_symmetric(d: int, generator: torch.Generator, *, psd: bool,
                     dtype: torch.dtype = torch.float64) -> Tensor:
    """A random symmetric matrix with spectral norm 1 (PSD, rank ≥ 1, if ``psd``)."""
    if psd:
        rank = int(torch.randint(1, d + 1, (), generator=generator))
        R = torch.randn(d, rank, generator=generator, dtype=dtype)
        A = R @ R.T
    else:
        R = torch.randn(d, d, generator=generator, dtype=dtype)
        A = 0.5 * (R + R.T)
    return A / torch.linalg.eigvalsh(A).abs().max()


# ----------------------------------------------------------------------------- step sizes


@dataclass
class StepSizes:
    """Step sizes in both forms: ``package`` for ``SGD(lr=…)``, ``per_param`` for the
    reference (one tensor per parameter, broadcast to its shape)."""

    package: Union[float, dict[str, Union[float, Tensor]]]
    per_param: list[Tensor]

    @property
    def diagonal(self) -> Tensor:
        """The diagonal D of ``φ_{k+1} = φ_k − D ∇L_tr(φ_k)``, flattened."""
        return flat(self.per_param)

    @property
    def max(self) -> float:
        return float(self.diagonal.max())


def step_sizes(problem: Problem, alpha: float, modes: Optional[Sequence[str]] = None,
               seed: int = 0) -> StepSizes:
    """One step size ``alpha`` (``modes=None``), or per-parameter step sizes.

    ``modes[i]`` picks the form of parameter i's entry: ``"float"`` (a float),
    ``"scalar"`` (a 0-dim tensor), ``"full"`` (a tensor of the parameter's shape) or
    ``"rows"`` (shape ``(n, 1, …)``, broadcast) or ``"zero"`` (the float 0.0). The
    other values lie in ``alpha·[0.1, 1]``.
    """
    dtype = problem.dtype
    if modes is None:
        return StepSizes(float(alpha), [torch.full(s, float(alpha), dtype=dtype) for s in problem.shapes])
    g = torch.Generator().manual_seed(seed)
    package: dict[str, Union[float, Tensor]] = {}
    per_param = []
    assert len(modes) == len(problem.names), (modes, problem.names)
    for name, shape, mode in zip(problem.names, problem.shapes, modes):
        if mode == "rows" and len(shape) == 0:
            mode = "full"
        if mode == "zero":  # a parameter the inner loop leaves alone
            value: Union[float, Tensor] = 0.0
            per_param.append(torch.zeros(shape, dtype=dtype))
        elif mode == "float":
            value = alpha * (0.1 + 0.9 * float(torch.rand((), generator=g)))
            per_param.append(torch.full(shape, value, dtype=dtype))
        else:
            lr_shape = {"scalar": (), "full": tuple(shape),
                        "rows": (shape[0],) + (1,) * (len(shape) - 1) if len(shape) else ()}[mode]
            value = alpha * (0.1 + 0.9 * torch.rand(lr_shape, generator=g, dtype=torch.float64))
            value = value.to(dtype)
            per_param.append(value.expand(shape).clone())
        package[name] = value
    return StepSizes(package, per_param)


# ----------------------------------------------------------------------------- reference


@dataclass
class Unrolled:
    """The reference inner loop: iterates ``φ_0 … φ_K``, ``v = ∇L_val(φ_K)`` and the
    exact meta-gradient ``g``, all flattened."""

    iterates: list[Tensor]
    v: Tensor
    g: Tensor
    problem: Problem = field(repr=False)
    lr: StepSizes = field(repr=False)

    @property
    def K(self) -> int:
        return len(self.iterates) - 1


def unroll(problem: Problem, K: int, lr: StepSizes) -> Unrolled:
    """Hand-unrolled gradient descent with ``create_graph=True``; exact ``g`` by autograd."""
    theta = [t.detach().clone().requires_grad_() for t in problem.theta]
    params = list(theta)
    iterates = [flat(params).detach()]
    for k in range(K):
        loss = problem.inner_loss(params, k)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        params = [p - a * gr for p, a, gr in zip(params, lr.per_param, grads)]
        iterates.append(flat(params).detach())
    g = torch.autograd.grad(problem.query_loss(params), theta)
    final = [p.detach().clone().requires_grad_() for p in params]
    v = torch.autograd.grad(problem.query_loss(final), final)
    return Unrolled(iterates, flat(v).detach(), flat(g).detach(), problem, lr)


def hessians(run: Unrolled) -> list[Tensor]:
    """Dense ``H_k = ∇²L_tr^{(k)}(φ_k)`` for k = 0 … K−1, row by row with a double
    backward (one ``torch.autograd.grad`` per unit vector)."""
    problem, out = run.problem, []
    for k in range(run.K):
        x = run.iterates[k].clone().requires_grad_()
        (grad,) = torch.autograd.grad(problem.inner_loss(unflat(x, problem.shapes), k), x,
                                      create_graph=True)
        eye = torch.eye(x.numel(), dtype=x.dtype)
        rows = [torch.autograd.grad(grad, x, e, retain_graph=True, allow_unused=True)[0]
                for e in eye]
        H = torch.stack([torch.zeros_like(x) if r is None else r for r in rows])
        out.append(0.5 * (H + H.T))
    return out


def factors(run: Unrolled, Hs: Optional[Sequence[Tensor]] = None) -> list[Tensor]:
    """``B_k = J_kᵀ − I = −H_k D`` (``J_k = I − D H_k`` for the SGD step)."""
    Hs = hessians(run) if Hs is None else Hs
    D = run.lr.diagonal
    return [-(H * D.unsqueeze(0)) for H in Hs]


def last_factors(Bs: Sequence[Tensor], v: Tensor, T: int) -> Tensor:
    """``(I + B_{K−T})(I + B_{K−T+1})⋯(I + B_{K−1}) v``; T = K is MATH.md (1)."""
    K = len(Bs)
    u = v.clone()
    for m in reversed(range(K - T, K)):
        u = u + Bs[m] @ u
    return u


def dense_product(Bs: Sequence[Tensor]) -> Tensor:
    """The matrix ``(I + B_0)(I + B_1)⋯(I + B_{K−1})``, leftmost factor first step."""
    d = Bs[0].shape[0] if Bs else 0
    P = torch.eye(d, dtype=Bs[0].dtype) if Bs else None
    for B in Bs:
        P = P @ (torch.eye(d, dtype=B.dtype) + B)
    return P


def subset_sum(Bs: Sequence[Tensor], v: Tensor, L: int) -> tuple[Tensor, float]:
    """MATH.md (2) by enumeration: ``v + Σ_{l≤L} Σ_{k_1<…<k_l} B_{k_1}⋯B_{k_l} v``.

    Returns the sum and the rounding scale ``Σ ‖term‖`` over all its terms.
    """
    total, scale = v.clone(), float(torch.linalg.vector_norm(v))
    for l in range(1, L + 1):
        for subset in itertools.combinations(range(len(Bs)), l):
            term = v
            for k in reversed(subset):  # B_{k_l} acts on v first
                term = Bs[k] @ term
            total = total + term
            scale += float(torch.linalg.vector_norm(term))
    return total, scale


def level_sum(Bs: Sequence[Tensor], v: Tensor, L: int) -> Tensor:
    """(2) by MATH.md's levels: ``a^{(1)}_k = B_k v``, ``a^{(j)}_k = B_k Σ_{k'>k} a^{(j−1)}_{k'}``."""
    K = len(Bs)
    total = v.clone()
    prev = None
    for j in range(1, L + 1):
        cur = []
        for k in range(K):
            if j == 1:
                u = v
            else:
                u = sum((prev[kk] for kk in range(k + 1, K)), torch.zeros_like(v))
            cur.append(Bs[k] @ u)
        total = total + sum(cur, torch.zeros_like(v))
        prev = cur
    return total


def sequential_sum(Bs: Sequence[Tensor], v: Tensor, L: int) -> Tensor:
    """(2) by MATH.md's memory-lean form: ``e_j ← e_j + B_m e_{j−1}``, m = K−1 … 0."""
    e = [v.clone()] + [torch.zeros_like(v) for _ in range(L)]
    for m in reversed(range(len(Bs))):
        old = [t.clone() for t in e]
        for j in range(L, 0, -1):
            e[j] = e[j] + Bs[m] @ old[j - 1]
    return sum(e, torch.zeros_like(v))


def blocked_subset_sum(Bs: Sequence[Tensor], v: Tensor, L: int, S: int) -> Tensor:
    """Blocks of S steps laid from the last step backwards (the earliest block takes the
    remainder); each block's (2) to order L applied in turn, the last block first."""
    u, last = v, len(Bs)
    while last > 0:
        first = max(0, last - S)
        u, _ = subset_sum(Bs[first:last], u, L)
        last = first
    return u


def neumann_partial_sums(A: Tensor, lam: float, b: Tensor, count: int) -> list[Tensor]:
    """``[S_{−1}, S_0, …, S_{count−1}]`` with ``S_{−1} = 0``, ``S_N = Σ_{n≤N} (−A/λ)^n b``,
    by dense products: the Neumann series of ``(I + A/λ)⁻¹ b``."""
    sums, term, total = [torch.zeros_like(b)], b.clone(), torch.zeros_like(b)
    for _ in range(count):
        total = total + term
        sums.append(total.clone())
        term = -(A @ term) / lam
    return sums


# ----------------------------------------------------------------------------- stateful rules
#
# MATH.md, "Optimizers other than plain gradient descent": one inner step is
# z_{k+1} = F(z_k) with z = (φ, state). Truncated and Binomial use the parameter block
# J_k = ∂φ_{k+1}/∂φ_k with the state s_k held constant. The rules below are torch.optim's,
# written out by hand over lists of tensors; the state is a tuple whose first entry is the
# number of steps taken (a Python int).

InnerLoss = Callable[[Sequence[Tensor], int], Tensor]
QueryLoss = Callable[[Sequence[Tensor]], Tensor]


def _per_param(lr, i: int):
    return lr[i] if isinstance(lr, (list, tuple)) else lr


class SGDRule:
    """``φ ← φ − α g`` (``lr`` a float, or one step size per parameter)."""

    def __init__(self, lr) -> None:
        self.lr = lr

    def init(self, params: Sequence[Tensor]):
        return (0,)

    def step(self, params, grads, state):
        return [p - _per_param(self.lr, i) * g for i, (p, g) in enumerate(zip(params, grads))], (state[0] + 1,)


class NoisySGD:
    """SGLD's step ``φ ← φ − α g + σ ξ`` over name→tensor dicts (an update rule of the user's, as
    ``MetaGradient`` and ``meta_grad`` take it), ``ξ`` drawn from torch's generator or, with
    ``source="numpy"``, NumPy's global one; σ may be a learned tensor. A parameter without a
    gradient is left as it is."""

    def __init__(self, lr, sigma, source: str = "torch") -> None:
        self.lr, self.sigma, self.source = lr, sigma, source

    def init(self, params):
        return {}

    def noise(self, p: Tensor) -> Tensor:
        if self.source == "numpy":
            import numpy
            return torch.from_numpy(numpy.random.standard_normal(tuple(p.shape))).to(p.dtype)
        return torch.randn_like(p)

    def step(self, params, grads, state):
        return {n: p if grads.get(n) is None else p - self.lr * grads[n] + self.sigma * self.noise(p)
                for n, p in params.items()}, state


class MomentumRule:
    """``torch.optim.SGD(lr, momentum, dampening, nesterov, weight_decay)``: with
    ``g ← g + wd·φ``, ``b ← g`` at the first step, else ``b ← μb + (1 − dampening)g``;
    ``φ ← φ − α(g + μb)`` (Nesterov) or ``φ ← φ − αb``."""

    def __init__(self, lr, momentum: float = 0.9, dampening: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.nesterov, self.weight_decay = nesterov, weight_decay

    def init(self, params):
        return (0, [torch.zeros_like(p) for p in params])

    def step(self, params, grads, state):
        count, buffers = state
        new_params, new_buffers = [], []
        for i, (p, g, b) in enumerate(zip(params, grads, buffers)):
            g = g + self.weight_decay * p if self.weight_decay else g
            b = g if count == 0 else self.momentum * b + (1 - self.dampening) * g
            direction = g + self.momentum * b if self.nesterov else b
            new_params.append(p - _per_param(self.lr, i) * direction)
            new_buffers.append(b)
        return new_params, (count + 1, new_buffers)


def _root(v):
    """√v for a sum of squares, with derivative 0 where v = 0 (a gradient entry that is exactly
    zero, such as a unit dropout removed for every example): autograd's own √ gives inf·0 = NaN
    there. Clamped below at 1e-300, whose root (1e-150) is nothing beside ε."""
    return torch.sqrt(v.clamp_min(1e-300))


class AdamRule:
    """``torch.optim.Adam(lr, betas, eps, weight_decay)`` (not AMSGrad): with t the step
    number from 1, ``m ← β1 m + (1 − β1)g``, ``v ← β2 v + (1 − β2)g²``,
    ``φ ← φ − α/(1 − β1^t) · m / (√v/√(1 − β2^t) + ε)``."""

    def __init__(self, lr, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay

    def init(self, params):
        return (0, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params])

    def step(self, params, grads, state):
        count, ms, vs = state
        beta1, beta2 = self.betas
        t = count + 1
        c1, c2 = 1 - beta1 ** t, 1 - beta2 ** t
        new_params, new_ms, new_vs = [], [], []
        for i, (p, g, m, v) in enumerate(zip(params, grads, ms, vs)):
            g = g + self.weight_decay * p if self.weight_decay else g
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            denom = _root(v) / math.sqrt(c2) + self.eps
            new_params.append(p - (_per_param(self.lr, i) / c1) * m / denom)
            new_ms.append(m)
            new_vs.append(v)
        return new_params, (t, new_ms, new_vs)


class AdagradRule:
    """``torch.optim.Adagrad(lr, eps=1e-10)`` (no lr decay, initial accumulator 0):
    ``s ← s + g²``, ``φ ← φ − α g / (√s + ε)``."""

    def __init__(self, lr, eps: float = 1e-10) -> None:
        self.lr, self.eps = lr, eps

    def init(self, params):
        return (0, [torch.zeros_like(p) for p in params])

    def step(self, params, grads, state):
        count, sums = state
        new_params, new_sums = [], []
        for i, (p, g, s) in enumerate(zip(params, grads, sums)):
            s = s + g * g
            new_params.append(p - _per_param(self.lr, i) * g / (_root(s) + self.eps))
            new_sums.append(s)
        return new_params, (count + 1, new_sums)


class TransformRule:
    """An optax-style gradient transformation (``tx.init(params)``,
    ``tx.update(grads, state, params=params, inplace=False)``, e.g. torchopt's) as a rule,
    ``φ ← φ + u``: the transformation's own arithmetic, nothing of metagrad's."""

    def __init__(self, tx) -> None:
        self.tx = tx

    def init(self, params):
        return self.tx.init(tuple(params))

    def step(self, params, grads, state):
        updates, state = self.tx.update(tuple(grads), state, params=tuple(params), inplace=False)
        return [p + u for p, u in zip(params, updates)], state


def _detached(state):
    """The state with every tensor leaf detached (a constant)."""
    return torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, state)


@dataclass
class PlainLoop:
    """The inner loop run without a graph: the iterates ``φ_0 … φ_K`` (flat), the state
    each step k starts from (``states[k]``, detached), and ``v = ∇L_val(φ_K)`` (flat)."""

    iterates: list[Tensor]
    states: list
    v: Tensor
    shapes: list[torch.Size]

    @property
    def K(self) -> int:
        return len(self.iterates) - 1


def plain_loop(theta: Sequence[Tensor], inner_loss: InnerLoss, query_loss: QueryLoss, rule,
               K: int) -> PlainLoop:
    """K steps of ``rule`` from θ, each gradient taken at a detached leaf: FirstOrder's v."""
    shapes = [t.shape for t in theta]
    params = [t.detach().clone() for t in theta]
    state = _detached(rule.init(params))
    iterates, states = [flat(params)], []
    for k in range(K):
        leaves = [p.clone().requires_grad_() for p in params]
        grads = torch.autograd.grad(inner_loss(leaves, k), leaves)
        states.append(state)
        new, state = rule.step(params, list(grads), state)
        params, state = [p.detach() for p in new], _detached(state)
        iterates.append(flat(params))
    leaves = [p.clone().requires_grad_() for p in params]
    v = flat(torch.autograd.grad(query_loss(leaves), leaves))
    return PlainLoop(iterates, states, v, shapes)


def exact_meta_gradient(theta: Sequence[Tensor], inner_loss: InnerLoss, query_loss: QueryLoss,
                        rule, K: int) -> Tensor:
    """``∇_θ L_val(φ_K(θ))`` through the parameters and the state, by plain autograd."""
    theta = [t.detach().clone().requires_grad_() for t in theta]
    params, state = list(theta), rule.init(theta)
    state = _detached(state)
    for k in range(K):
        grads = torch.autograd.grad(inner_loss(params, k), params, create_graph=True)
        params, state = rule.step(params, list(grads), state)
    return flat(torch.autograd.grad(query_loss(params), theta))


def state_held_constant_factors(loop: PlainLoop, inner_loss: InnerLoss, rule) -> list[Tensor]:
    """``B_k = J_kᵀ − I``, with ``J_k`` the dense Jacobian of
    ``φ ↦ rule.step(φ, ∇L_tr(φ), s_k)[0]`` at ``φ_k`` and the recorded ``s_k`` a constant."""
    out = []
    for k in range(loop.K):
        state = loop.states[k]

        def next_iterate(x: Tensor, k: int = k, state=state) -> Tensor:
            params = unflat(x, loop.shapes)
            (gx,) = torch.autograd.grad(inner_loss(params, k), x, create_graph=True)
            new, _ = rule.step(params, unflat(gx, loop.shapes), state)
            return flat(new)

        J = torch.autograd.functional.jacobian(next_iterate, loop.iterates[k].clone())
        out.append(J.T - torch.eye(J.shape[0], dtype=J.dtype))
    return out


def sgd_factors(loop: PlainLoop, inner_loss: InnerLoss, lr) -> list[Tensor]:
    """``B_k = −H_k D`` for plain SGD (``D`` the step sizes), ``H_k`` the dense Hessian of the
    flattened inner loss at ``φ_k`` by ``torch.autograd.functional.hessian``."""
    if isinstance(lr, (list, tuple)):
        D = flat([torch.as_tensor(a, dtype=loop.v.dtype).expand(s) for a, s in zip(lr, loop.shapes)])
    else:
        D = torch.full_like(loop.v, float(lr))
    out = []
    for k in range(loop.K):
        H = torch.autograd.functional.hessian(
            lambda x, k=k: inner_loss(unflat(x, loop.shapes), k), loop.iterates[k].clone())
        out.append(-(0.5 * (H + H.T)) * D.unsqueeze(0))
    return out


def restarted_gradient(loop: PlainLoop, inner_loss: InnerLoss, query_loss: QueryLoss, rule,
                       T: int) -> Tensor:
    """The gradient of ``L_val(φ_K)`` with respect to a detached leaf copy of ``φ_{K−T}``,
    the last T steps unrolled again from it with ``create_graph=True`` and the state
    ``s_{K−T}`` a constant. For SGD this is Truncated(T)."""
    K = loop.K
    leaf = loop.iterates[K - T].clone().requires_grad_()
    params = unflat(leaf, loop.shapes)
    state = loop.states[K - T] if T > 0 else None
    for k in range(K - T, K):
        grads = torch.autograd.grad(inner_loss(params, k), params, create_graph=True)
        params, state = rule.step(params, list(grads), state)
    return torch.autograd.grad(query_loss(params), leaf)[0]


# ----------------------------------------------------------------------------- bounds


def binomial_bound(K: int, L: int, x: float) -> float:
    """``Σ_{l=L+1}^{K} C(K,l) x^l`` with ``x = αℓ`` (times ‖v‖)."""
    return sum(math.comb(K, l) * x ** l for l in range(L + 1, K + 1))


def truncated_bound(K: int, T: int, x: float) -> float:
    """``(1+x)^K − (1+x)^T`` (times ‖v‖)."""
    return (1 + x) ** K - (1 + x) ** T


def first_order_bound(K: int, x: float) -> float:
    """``(1+x)^K − 1`` (times ‖v‖)."""
    return (1 + x) ** K - 1


def convex_bound(K: int, L: int, x: float) -> float:
    """The paper's convex bound ``C(K, L+1) x^{L+1}`` (times ‖v‖); 0 for L ≥ K."""
    return math.comb(K, L + 1) * x ** (L + 1)


# ----------------------------------------------------------------------------- builders


@dataclass(frozen=True)
class ProblemSpec:
    """Plain values from which :func:`build` makes a problem (Hypothesis draws these)."""

    kind: str  # "mlp" | "quadratic"
    seed: int
    widths: tuple[int, ...] = (1, 4, 1)
    activation: str = "tanh"
    n_points: int = 5
    n_batches: int = 1
    schedule: tuple[int, ...] = (0,)
    dim: int = 3
    psd: bool = False
    query_w: float = 0.0


def build(spec: ProblemSpec, dtype: torch.dtype = torch.float64) -> Problem:
    g = torch.Generator().manual_seed(spec.seed)
    if spec.kind == "mlp":
        d_in, d_out = spec.widths[0], spec.widths[-1]

        def data() -> tuple[Tensor, Tensor]:
            x = 4 * torch.rand(spec.n_points, d_in, generator=g, dtype=torch.float64) - 2
            y = torch.randn(spec.n_points, d_out, generator=g, dtype=torch.float64)
            return x, y

        batches = [data() for _ in range(spec.n_batches)]
        return MLPProblem(spec.widths, spec.activation, spec.seed, batches=batches, query=data(),
                          schedule=spec.schedule, dtype=dtype)
    if spec.kind == "quadratic":
        d = spec.dim
        As = [random_symmetric(d, g, psd=spec.psd) * (0.5 + 2.5 * float(torch.rand((), generator=g)))
              for _ in range(spec.n_batches)]
        bs = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(spec.n_batches)]
        theta = torch.randn(d, generator=g, dtype=torch.float64)
        M = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        c = torch.randn(d, generator=g, dtype=torch.float64)
        return QuadraticProblem(theta.to(dtype), [A.to(dtype) for A in As], [b.to(dtype) for b in bs],
                                M=M.to(dtype), c=c.to(dtype), w=spec.query_w, schedule=spec.schedule)
    raise ValueError(spec.kind)


def sinusoid_problem(seed: int = 0, n_points: int = 10, dtype: torch.dtype = torch.float64) -> MLPProblem:
    """The 1-40-40-1 ReLU sinusoid regression task of MATH.md: ``y = a·sin(x − p)``,
    ``a ∈ [0.1, 5]``, ``p ∈ [0, π]``, x uniform in [−5, 5]; ``n_points`` support and
    query points; default ``nn.Linear`` initialization under ``torch.manual_seed(seed)``."""
    g = torch.Generator().manual_seed(seed + 1)
    amplitude = 0.1 + 4.9 * float(torch.rand((), generator=g, dtype=torch.float64))
    phase = math.pi * float(torch.rand((), generator=g, dtype=torch.float64))

    def data() -> tuple[Tensor, Tensor]:
        x = 10 * torch.rand(n_points, 1, generator=g, dtype=torch.float64) - 5
        return x, amplitude * torch.sin(x - phase)

    return MLPProblem((1, 40, 40, 1), "relu", seed, batches=[data()], query=data(), dtype=dtype)


# ----------------------------------------------------------------------------- strategies


@st.composite
def problem_specs(draw, kinds: Sequence[str] = ("mlp", "quadratic"), max_K: int = 8,
                  psd: Optional[bool] = None, varying: bool = True) -> ProblemSpec:
    """A small problem: an MLP (depth 1–3, widths ≤ 8, ≤ 10 points) or a quadratic
    (d ≤ 6, A symmetric, possibly indefinite). With ``varying``, the inner loss may
    switch between up to 3 batches along the steps (schedule of length ``max_K``)."""
    kind = draw(st.sampled_from(list(kinds)))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    n_batches = draw(st.integers(1, 3)) if varying else 1
    if n_batches > 1:
        schedule = tuple(draw(st.lists(st.integers(0, n_batches - 1), min_size=max_K, max_size=max_K)))
    else:
        schedule = (0,)
    if kind == "mlp":
        # sampled_from draws uniformly, where small integers would be favoured
        depth = draw(st.sampled_from([1, 2, 3]))
        d_in = draw(st.sampled_from([1, 2, 3]))
        d_out = draw(st.sampled_from([1, 2]))
        hidden = tuple(draw(st.sampled_from(range(1, 9))) for _ in range(depth - 1))
        return ProblemSpec("mlp", seed, widths=(d_in, *hidden, d_out),
                           activation=draw(st.sampled_from(sorted(ACTIVATIONS))),
                           n_points=draw(st.sampled_from(range(1, 11))), n_batches=n_batches,
                           schedule=schedule)
    return ProblemSpec("quadratic", seed, dim=draw(st.sampled_from(range(1, 7))),
                       psd=draw(st.booleans()) if psd is None else psd,
                       n_batches=n_batches, schedule=schedule,
                       query_w=draw(st.sampled_from([0.0, 0.5])))


@st.composite
def step_size_choices(draw, lo: float = 0.01, hi: float = 0.3) -> tuple[float, Optional[tuple[str, ...]], int]:
    """``(alpha, modes, seed)`` for :func:`step_sizes`: one step size, or sometimes
    per-parameter step sizes in every accepted form."""
    alpha = draw(st.floats(lo, hi))
    if draw(st.integers(0, 2)) == 0:
        modes = tuple(draw(st.lists(st.sampled_from(["float", "scalar", "full", "rows", "full", "zero"]),
                                    min_size=8, max_size=8)))
        return alpha, modes, draw(st.integers(0, 2 ** 16))
    return alpha, None, 0


def make_step_sizes(problem: Problem, choice: tuple[float, Optional[tuple[str, ...]], int]) -> StepSizes:
    alpha, modes, seed = choice
    if modes is not None:
        modes = tuple(modes[i % len(modes)] for i in range(len(problem.names)))
    return step_sizes(problem, alpha, modes, seed)


# ----------------------------------------------------------------------------- meta-parameters η
#
# MATH.md, "Meta-parameters other than θ": one inner step is φ_{k+1} = Φ_k(φ_k, η) and the
# meta-objective F(θ, η) = L_val(φ_K, η). Everything below works on flattened φ (d numbers) and
# flattened η (e numbers), with dense matrices:
#
#   J_k = ∂Φ_k/∂φ_k (d×d), B_k = ∂Φ_k/∂η (d×e) = M_k + S_k,
#   M_k: the mixed part (one second-derivative factor), S_k: the step-size part (none),
#
# and the estimators are written as MATH.md's table defines them, term by term.


def mlp(params: Sequence[Tensor], x: Tensor, act: Callable[[Tensor], Tensor] = torch.tanh) -> Tensor:
    """``[W0, b0, W1, b1, …]`` evaluated by hand: ``F.linear`` and ``act`` between layers."""
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers):
        h = F.linear(h, params[2 * i], params[2 * i + 1])
        if i < n_layers - 1:
            h = act(h)
    return h


@dataclass
class EtaProblem:
    """An inner loop with meta-parameters η besides θ, as plain functions of lists of tensors.

    ``inner_loss(φ, η, k)`` and ``query_loss(φ, η)`` take lists; ``rule(η)`` returns an update
    rule over lists (:class:`SGDRule`, :class:`MomentumRule`, :class:`AdamRule`) whose step sizes
    may be built from η (Meta-SGD). ``step_sizes(η)``, for plain SGD only, returns one step-size
    tensor per fast weight, broadcastable to its shape (the D of ``Φ = φ − D ∇L_tr``)."""

    theta: list[Tensor]
    eta: list[Tensor]
    inner_loss: Callable
    query_loss: Callable
    rule: Callable
    step_sizes: Optional[Callable] = None

    @property
    def shapes(self) -> list[torch.Size]:
        return [t.shape for t in self.theta]

    @property
    def eta_shapes(self) -> list[torch.Size]:
        return [t.shape for t in self.eta]


@dataclass
class EtaLoop:
    """The inner loop run without a graph: iterates ``φ_0 … φ_K`` (flat), the state each step
    starts from, the inner gradients ``∇_φ L_tr(φ_k, η)`` (flat, without any proximal term),
    ``v = ∇_φ L_val(φ_K)`` and ``∂_η L_val(φ_K, η)`` (flat), and η (flat)."""

    iterates: list[Tensor]
    states: list
    grads: list[Tensor]
    v: Tensor
    dval: Tensor
    eta: Tensor
    problem: EtaProblem = field(repr=False)

    @property
    def K(self) -> int:
        return len(self.iterates) - 1


def _grad_or_zero(grads, like):
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


def eta_loop(problem: EtaProblem, K: int, proximal: Optional[float] = None) -> EtaLoop:
    """K steps of ``problem.rule(η)`` from θ; with ``proximal`` = λ every step's gradient gets
    ``λ(φ − θ)`` added (the proximal inner problem of Implicit)."""
    eta = [e.detach().clone() for e in problem.eta]
    rule = problem.rule(eta)
    theta = [t.detach().clone() for t in problem.theta]
    params = list(theta)
    state = _detached(rule.init(params))
    iterates, states, inner_grads = [flat(params)], [], []
    for k in range(K):
        leaves = [p.clone().requires_grad_() for p in params]
        # A parameter the inner loss does not use has zero gradient (for SGD the same as the
        # skipped update torch.optim and metagrad make).
        grads = _grad_or_zero(torch.autograd.grad(problem.inner_loss(leaves, eta, k), leaves,
                                                  allow_unused=True), leaves)
        inner_grads.append(flat(grads))
        if proximal is not None:
            grads = [g + proximal * (p - t) for g, p, t in zip(grads, params, theta)]
        states.append(state)
        new, state = rule.step(params, grads, state)
        params, state = [p.detach() for p in new], _detached(state)
        iterates.append(flat(params))
    leaves = [p.clone().requires_grad_() for p in params]
    eta_leaves = [e.clone().requires_grad_() for e in eta]
    out = torch.autograd.grad(problem.query_loss(leaves, eta_leaves), leaves + eta_leaves,
                              allow_unused=True)
    out = _grad_or_zero(out, leaves + eta_leaves)
    return EtaLoop(iterates, states, inner_grads, flat(out[:len(leaves)]), flat(out[len(leaves):]),
                   flat(eta), problem)


@dataclass
class EtaFactors:
    """Per step k: ``J_k`` (d×d), the mixed part ``M_k`` and the step-size part ``S_k`` of
    ``B_k`` (d×e each)."""

    J: list[Tensor]
    M: list[Tensor]
    S: list[Tensor]

    @property
    def K(self) -> int:
        return len(self.J)


def sgd_eta_factors(loop: EtaLoop) -> EtaFactors:
    """For plain SGD, written out: ``J_k = I − D H_k``, ``M_k = −D ∂_η∇_φ L_tr(φ_k, η)``,
    ``S_k = −diag(∇_φ L_tr(φ_k)) ∂D/∂η``, with ``D = diag(α(η))`` (``problem.step_sizes``) and
    the dense Hessian and mixed derivative by ``torch.autograd.functional`` (vectorized)."""
    problem = loop.problem
    shapes, eta_shapes = problem.shapes, problem.eta_shapes
    assert problem.step_sizes is not None

    def diagonal(y: Tensor) -> Tensor:
        lrs = problem.step_sizes(unflat(y, eta_shapes))
        return flat([torch.as_tensor(a, dtype=y.dtype).expand(s) for a, s in zip(lrs, shapes)])

    D = diagonal(loop.eta)
    dD = torch.autograd.functional.jacobian(diagonal, loop.eta.clone(), vectorize=True)
    eye = torch.eye(D.numel(), dtype=D.dtype)
    Js, Ms, Ss = [], [], []
    for k in range(loop.K):
        x = loop.iterates[k].clone()

        def loss(x: Tensor, y: Tensor, k: int = k) -> Tensor:
            return problem.inner_loss(unflat(x, shapes), unflat(y, eta_shapes), k)

        def gradient(y: Tensor, k: int = k) -> Tensor:
            xl = x.clone().requires_grad_()
            (g,) = torch.autograd.grad(loss(xl, y), xl, create_graph=True)
            return g

        H = torch.autograd.functional.hessian(lambda x: loss(x, loop.eta), x, vectorize=True)
        H = 0.5 * (H + H.T)
        mixed = torch.autograd.functional.jacobian(gradient, loop.eta.clone(), vectorize=True)
        Js.append(eye - D.unsqueeze(1) * H)
        Ms.append(-D.unsqueeze(1) * mixed)
        Ss.append(-loop.grads[k].unsqueeze(1) * dD)
    return EtaFactors(Js, Ms, Ss)


def rule_eta_factors(loop: EtaLoop) -> EtaFactors:
    """For any rule, with the state ``s_k`` the step started from held constant (MATH.md,
    "Optimizers other than plain gradient descent"): ``J_k`` and ``B_k`` the dense Jacobians of
    ``(φ, η) ↦ rule(η).step(φ, ∇_φ L_tr(φ, η), s_k)``, ``S_k`` that of
    ``η ↦ rule(η).step(φ_k, g_k, s_k)`` with the gradient ``g_k`` a constant, ``M_k = B_k − S_k``."""
    problem = loop.problem
    shapes, eta_shapes = problem.shapes, problem.eta_shapes
    Js, Ms, Ss = [], [], []
    for k in range(loop.K):
        state = loop.states[k]

        def step(x: Tensor, y: Tensor, k: int = k, state=state) -> Tensor:
            params, eta = unflat(x, shapes), unflat(y, eta_shapes)
            (g,) = torch.autograd.grad(problem.inner_loss(params, eta, k), x, create_graph=True)
            new, _ = problem.rule(eta).step(params, unflat(g, shapes), state)
            return flat(new)

        def constant_gradient(y: Tensor, k: int = k, state=state) -> Tensor:
            params = unflat(loop.iterates[k], shapes)
            new, _ = problem.rule(unflat(y, eta_shapes)).step(params, unflat(loop.grads[k], shapes), state)
            return flat(new)

        J, B = torch.autograd.functional.jacobian(step, (loop.iterates[k].clone(), loop.eta.clone()))
        S = torch.autograd.functional.jacobian(constant_gradient, loop.eta.clone())
        Js.append(J)
        Ms.append(B - S)
        Ss.append(S)
    return EtaFactors(Js, Ms, Ss)


def eta_truncated(f: EtaFactors, v: Tensor, dval: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """Truncated(T) for θ and η: ``a_K = v``, ``a_k = J_kᵀ a_{k+1}`` for k ≥ K−T, then
    ``∂_η L_val + Σ_{k≥K−T} B_kᵀ a_{k+1} + Σ_{k<K−T} S_kᵀ a_{K−T}``; T = K is (3), exact."""
    K = f.K
    a, eta = v.clone(), dval.clone()
    for k in reversed(range(K - T, K)):
        eta = eta + (f.M[k] + f.S[k]).T @ a
        a = f.J[k].T @ a
    for k in range(K - T):
        eta = eta + f.S[k].T @ a
    return a, eta


def eta_exact(f: EtaFactors, v: Tensor, dval: Tensor) -> tuple[Tensor, Tensor]:
    """(3): the exact θ- and η-gradients by the adjoints ``a_k``."""
    return eta_truncated(f, v, dval, f.K)


def eta_expansion(f: EtaFactors, u: Tensor, first: int, last: int, order: int) -> Tensor:
    """The terms of ``J_firstᵀ J_{first+1}ᵀ ⋯ J_{last−1}ᵀ u`` with at most ``order`` factors
    ``A_j = J_jᵀ − I`` (``−H_j D`` for SGD), by explicit enumeration of the subsets
    ``j_1 < … < j_l`` (MATH.md (2)); the empty product (first ≥ last) is ``u``."""
    if order < 0:
        return torch.zeros_like(u)
    eye = torch.eye(u.numel(), dtype=u.dtype)
    total = u.clone()
    for l in range(1, order + 1):
        for subset in itertools.combinations(range(first, last), l):
            term = u
            for j in reversed(subset):  # the latest step's factor acts on u first
                term = (f.J[j].T - eye) @ term
            total = total + term
    return total


def eta_blocked(f: EtaFactors, v: Tensor, dval: Tensor,
                blocks: Sequence[tuple[int, int, int]]) -> tuple[Tensor, Tensor]:
    """Binomial with blocks ``(first, last, order)`` tiling 0 … K−1 (one block (0, K, L) is
    Binomial(L)): within a block, ``â_{k+1}`` is the expansion of the block's remaining factors
    applied to the vector ``u`` entering the block from the later one; the η-gradient is
    ``∂_η L_val + Σ_k [M_kᵀ â^{(≤L−1)}_{k+1} + S_kᵀ â^{(≤L)}_{k+1}]`` and the vector leaving
    the block, toward θ, is its expansion to order L."""
    blocks = sorted(blocks, key=lambda b: b[0])
    edges = [0] + [b[1] for b in blocks]
    assert [b[0] for b in blocks] == edges[:-1] and edges[-1] == f.K, blocks  # they tile 0 … K−1
    blocks = blocks[::-1]  # the last block first
    u, eta = v.clone(), dval.clone()
    for first, last, order in blocks:
        for k in range(first, last):
            eta = eta + f.M[k].T @ eta_expansion(f, u, k + 1, last, order - 1)
            eta = eta + f.S[k].T @ eta_expansion(f, u, k + 1, last, order)
        u = eta_expansion(f, u, first, last, order)
    return u, eta


def eta_blocks(K: int, size: int, order: int) -> list[tuple[int, int, int]]:
    """Blocks of ``size`` steps laid from the last step backwards, each expanded to
    ``min(order, its length)``."""
    out, last = [], K
    while last > 0:
        first = max(0, last - size)
        out.append((first, last, min(order, last - first)))
        last = first
    return out


def eta_implicit(loop: EtaLoop, reg: float) -> tuple[Tensor, Tensor, float]:
    """Implicit(λ) at the final iterate of a proximal loop (:func:`eta_loop` with
    ``proximal=λ``): ``x = (I + H*/λ)⁻¹ v`` with ``H* = ∇²_φ L_tr(φ_K, η)`` (the last step's
    loss, without the proximal term), and ``∂_η L_val − (1/λ)(∂_η ∇_φ L_tr(φ_K, η))ᵀ x``.
    Also returns the smallest eigenvalue of ``I + H*/λ``."""
    problem = loop.problem
    shapes, eta_shapes = problem.shapes, problem.eta_shapes
    x_K = loop.iterates[-1].clone()
    k = loop.K - 1

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return problem.inner_loss(unflat(x, shapes), unflat(y, eta_shapes), k)

    def gradient(y: Tensor) -> Tensor:
        xl = x_K.clone().requires_grad_()
        (g,) = torch.autograd.grad(loss(xl, y), xl, create_graph=True)
        return g

    H = torch.autograd.functional.hessian(lambda x: loss(x, loop.eta), x_K)
    H = 0.5 * (H + H.T)
    A = torch.eye(H.shape[0], dtype=H.dtype) + H / reg
    x = torch.linalg.solve(A, loop.v)
    mixed = torch.autograd.functional.jacobian(gradient, loop.eta.clone())
    return x, loop.dval - mixed.T @ x / reg, float(torch.linalg.eigvalsh(A).min())


def eta_unrolled(problem: EtaProblem, K: int) -> tuple[Tensor, Tensor]:
    """``∇_θ F`` and ``∇_η F`` by plain autograd through the loop unrolled with
    ``create_graph=True`` (through φ, the state and η)."""
    theta = [t.detach().clone().requires_grad_() for t in problem.theta]
    eta = [e.detach().clone().requires_grad_() for e in problem.eta]
    rule = problem.rule(eta)
    params, state = list(theta), _detached(rule.init(theta))
    for k in range(K):
        grads = torch.autograd.grad(problem.inner_loss(params, eta, k), params, create_graph=True)
        params, state = rule.step(params, list(grads), state)
    out = torch.autograd.grad(problem.query_loss(params, eta), theta + eta, allow_unused=True)
    out = _grad_or_zero(out, theta + eta)
    return flat(out[:len(theta)]), flat(out[len(theta):])


def eta_objective(problem: EtaProblem, K: int, eta: Sequence[Tensor]) -> float:
    """``F(θ, η) = L_val(φ_K(θ, η), η)`` at the given η, without any graph (for finite
    differences)."""
    eta = [e.detach() for e in eta]
    rule = problem.rule(eta)
    params = [t.detach().clone() for t in problem.theta]
    state = _detached(rule.init(params))
    for k in range(K):
        leaves = [p.clone().requires_grad_() for p in params]
        grads = torch.autograd.grad(problem.inner_loss(leaves, eta, k), leaves)
        new, state = rule.step(params, list(grads), state)
        params, state = [p.detach() for p in new], _detached(state)
    with torch.no_grad():
        return float(problem.query_loss(params, eta))


def central_difference(f: Callable[[float], float], x: float, h: float) -> float:
    """``(f(x+h) − f(x−h)) / 2h`` with one Richardson step (error O(h⁴))."""
    d1 = (f(x + h) - f(x - h)) / (2 * h)
    d2 = (f(x + h / 2) - f(x - h / 2)) / h
    return (4 * d2 - d1) / 3


class Functional:
    """``module`` called at ``params`` (name → tensor) with ``torch.func.functional_call``;
    ``f.params`` are those tensors. The module's other parameters are its own."""

    def __init__(self, module: nn.Module, params: dict) -> None:
        self.module, self.params = module, dict(params)

    def __call__(self, *args):
        return torch.func.functional_call(self.module, self.params, args)


def functional_unroll(module: nn.Module, names: Sequence[str], closures: Sequence[Callable],
                      query: Callable, rule, wrt: Sequence[Tensor]) -> list[Optional[Tensor]]:
    """A hand-unrolled inner loop from the module's own parameters ``names`` (θ): step k takes
    the gradient of ``closures[k](Functional(module, φ_k))`` with ``create_graph=True`` and
    applies ``rule`` (over lists); returns ``autograd.grad(query(Functional(module, φ_K)), wrt)``
    (``None`` where unused)."""
    named = dict(module.named_parameters())
    params = [named[n] for n in names]
    state = rule.init(params)
    for closure in closures:
        loss = closure(Functional(module, dict(zip(names, params))))
        grads = torch.autograd.grad(loss, params, create_graph=True)
        params, state = rule.step(params, list(grads), state)
    out = query(Functional(module, dict(zip(names, params))))
    return list(torch.autograd.grad(out, list(wrt), allow_unused=True))
