"""Attention in the inner loop: ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention`` and
``nn.TransformerEncoderLayer``.

PyTorch runs attention by a fused kernel (flash attention, on the CPU too) whose backward has no
derivative, so a hand-written MAML through it raises. metagrad builds every step it takes and
rebuilds with attention's math kernel (``metagrad.step.math_attention``): each estimator is tested
in float64 against a hand-unrolled loop whose attention is written out (softmax(QKᵀ/√d)V), and a
loss built outside metagrad with the fused kernel (``meta.step_from_loss``) is refused with what
to do.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import metagrad as mg

DTYPE = torch.float64


class Attend(nn.Module):
    """x → one head of self-attention by ``F.scaled_dot_product_attention`` → mean over the
    sequence → linear: the computation :func:`by_hand` writes out."""

    def __init__(self, d_in: int, d: int, generator: torch.Generator) -> None:
        super().__init__()
        def weight(*shape):
            return nn.Parameter(torch.randn(*shape, generator=generator, dtype=DTYPE) / math.sqrt(shape[-1]))
        self.q, self.k, self.v = weight(d, d_in), weight(d, d_in), weight(d, d_in)
        self.head = weight(1, d)

    def forward(self, x):
        # [batch, heads = 1, length, d]: the layout the fused kernels take
        q, k, v = (F.linear(x, w).unsqueeze(1) for w in (self.q, self.k, self.v))
        return F.linear(F.scaled_dot_product_attention(q, k, v).squeeze(1).mean(-2), self.head)


def by_hand(params, x):
    """:class:`Attend`'s forward with the attention written out (no scaled_dot_product_attention)."""
    wq, wk, wv, head = params
    q, k, v = x @ wq.T, x @ wk.T, x @ wv.T
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v).mean(-2) @ head.T


def hand_unroll(theta, x, y, xq, yq, K, lr):
    """The exact meta-gradient: K steps of SGD unrolled with create_graph=True."""
    theta = [t.detach().requires_grad_() for t in theta]
    phi = theta
    for _ in range(K):
        grads = torch.autograd.grad(F.mse_loss(by_hand(phi, x), y), phi, create_graph=True)
        phi = [p - lr * g for p, g in zip(phi, grads)]
    return torch.autograd.grad(F.mse_loss(by_hand(phi, xq), yq), theta)


def problem(seed, n=6, length=4, d_in=3, d=5):
    g = torch.Generator().manual_seed(seed)
    model = Attend(d_in, d, g)
    data = [torch.randn(n, length, d_in, generator=g, dtype=DTYPE), torch.randn(n, 1, generator=g, dtype=DTYPE),
            torch.randn(n - 1, length, d_in, generator=g, dtype=DTYPE), torch.randn(n - 1, 1, generator=g, dtype=DTYPE)]
    return model, data


def fused_attention_is_chosen():
    """Whether this torch runs scaled_dot_product_attention by a kernel whose backward has no
    derivative (on the CPU: flash attention): what makes the tests below mean something."""
    q = torch.randn(1, 2, 3, 4, dtype=DTYPE, requires_grad=True)
    (g,) = torch.autograd.grad(F.scaled_dot_product_attention(q, q, q).sum(), q, create_graph=True)
    try:
        g.sum().backward()
    except RuntimeError:
        return True
    return False


def meta_gradient(model, data, K, lr, estimator, **options):
    x, y, xq, yq = data
    with mg.MetaGradient(model, mg.optim.SGD(lr=lr), estimator=estimator, **options) as meta:
        for _ in range(K):
            meta.step(lambda f: F.mse_loss(f(x), y))
        F.mse_loss(meta.fmodel(xq), yq).backward()
    return [p.grad for p in model.parameters()]


def close(got, want, tol=1e-10):
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= tol * (1 + w.abs().max()), ((g - w).abs().max(), w.abs().max())


def test_a_hand_written_maml_through_fused_attention_raises():
    """Why metagrad chooses the kernel: the plain create_graph unroll through the default one raises."""
    if not fused_attention_is_chosen():
        pytest.skip("this torch's default attention kernel can be differentiated twice")
    model, (x, y, xq, yq) = problem(0)
    theta = list(model.parameters())
    grads = torch.autograd.grad(F.mse_loss(model(x), y), theta, create_graph=True)
    phi = {n: p - 0.1 * g for (n, p), g in zip(model.named_parameters(), grads)}
    with pytest.raises(RuntimeError, match="derivative for"):
        F.mse_loss(torch.func.functional_call(model, phi, (xq,)), yq).backward()




@settings(max_examples=4)
@given(seed=st.integers(0, 2**16), K=st.integers(1, 4), lr=st.floats(0.05, 0.3))
def test_every_exact_estimator_through_attention_equals_a_hand_unroll(seed, K, lr):
    model, data = problem(seed)
    want = hand_unroll(list(model.parameters()), *data, K, lr)
    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    for estimator in [mg.Full(), mg.Checkpointed(), mg.Checkpointed(snapshots=2), mg.Truncated(K),
                      mg.Binomial(order=K), mg.Binomial(order=K, chunk_size=1)]:
        model.zero_grad()
        close(meta_gradient(model, data, K, lr, estimator), want)
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == flags


def test_attention_under_compile_equals_a_hand_unroll():
    model, data = problem(1)
    want = hand_unroll(list(model.parameters()), *data, 3, 0.1)
    close(meta_gradient(model, data, 3, 0.1, mg.Checkpointed(), compile=True), want, tol=1e-9)


def test_attention_in_a_block_over_tasks_equals_each_tasks_hand_unroll():
    model, (x, y, xq, yq) = problem(2)
    other = [t.flip(0) for t in (x, y, xq, yq)]
    theta = list(model.parameters())
    want = [a + b for a, b in zip(hand_unroll(theta, x, y, xq, yq, 3, 0.1), hand_unroll(theta, *other, 3, 0.1))]
    stacked = [torch.stack([a, b]) for a, b in zip((x, y, xq, yq), other)]
    with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed(), tasks=2) as meta:
        for _ in range(3):
            meta.step(lambda f, a, b: F.mse_loss(f(a), b), stacked[0], stacked[1])
        (2 * F.mse_loss(meta.fmodel(stacked[2]), stacked[3])).backward()
    close([p.grad for p in model.parameters()], want)


@pytest.mark.parametrize("estimator", [mg.Full(), mg.Checkpointed(), mg.Binomial(order=3)], ids=repr)
def test_the_functional_face_through_attention_equals_a_hand_unroll(estimator):
    model, (x, y, xq, yq) = problem(3)
    names = [n for n, _ in model.named_parameters()]
    want = hand_unroll(list(model.parameters()), x, y, xq, yq, 3, 0.1)

    def loss_fn(params, batch):
        return F.mse_loss(torch.func.functional_call(model, params, (batch[0],)), batch[1])

    got = mg.functional.meta_grad(loss_fn, {n: p.detach() for n, p in model.named_parameters()}, (x, y), (xq, yq),
                                  inner_opt=mg.optim.SGD(lr=0.1), steps=3, estimator=estimator)
    close([got[n] for n in names], want)


@pytest.mark.parametrize("estimator", [mg.Full(), mg.Checkpointed(), mg.Truncated(2), mg.Binomial(order=2)],
                         ids=repr)
def test_a_loss_built_with_fused_attention_outside_metagrad_is_refused(estimator):
    if not fused_attention_is_chosen():
        pytest.skip("this torch's default attention kernel can be differentiated twice")
    model, (x, y, xq, yq) = problem(4)
    with pytest.raises(mg.ReplayError, match=r"(?s)loss: .*fused attention kernel.*SDPBackend.MATH"):
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=estimator) as meta:
            for _ in range(3):
                w = meta.fast_weights()
                meta.step_from_loss(F.mse_loss(torch.func.functional_call(model, w, (x,)), y), w)
            F.mse_loss(meta.fmodel(xq), yq).backward()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("estimator", [mg.Full(), mg.Checkpointed()], ids=repr)
def test_a_loss_built_with_the_math_kernel_outside_metagrad_is_exact(estimator):
    model, (x, y, xq, yq) = problem(5)
    want = hand_unroll(list(model.parameters()), x, y, xq, yq, 3, 0.1)
    with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=estimator) as meta:
        for _ in range(3):
            w = meta.fast_weights()
            with sdpa_kernel(SDPBackend.MATH):
                loss = F.mse_loss(torch.func.functional_call(model, w, (x,)), y)
            meta.step_from_loss(loss, w)
        F.mse_loss(meta.fmodel(xq), yq).backward()
    close([p.grad for p in model.parameters()], want)


def test_first_order_takes_a_loss_built_with_fused_attention():
    """FirstOrder differentiates no step twice: nothing to refuse."""
    model, (x, y, xq, yq) = problem(6)
    with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=mg.FirstOrder()) as meta:
        for _ in range(2):
            w = meta.fast_weights()
            meta.step_from_loss(F.mse_loss(torch.func.functional_call(model, w, (x,)), y), w)
        F.mse_loss(meta.fmodel(xq), yq).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_transformer_meta_trained_as_users_write_it():
    """The ordinary loop: nn.TransformerEncoderLayer with dropout in training mode, torch.optim.Adam
    outside, a meta-batch of tasks. Checkpointed (which replays each step's dropout) equals Full,
    which rebuilds nothing, step for step of the outer loop."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 8), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True,
                                                                           dtype=DTYPE),
                             nn.Flatten(), nn.Linear(32, 1)).to(DTYPE)

    g = torch.Generator().manual_seed(7)
    tasks = [[torch.randn(5, 4, 3, generator=g, dtype=DTYPE), torch.randn(5, 1, generator=g, dtype=DTYPE)]
             for _ in range(4)]
    results = []
    for estimator in (mg.Full(), mg.Checkpointed()):
        model = build()
        outer = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(1)  # the dropout masks
        for _ in range(2):
            outer.zero_grad()
            for x, y in tasks:
                with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.05), estimator=estimator) as meta:
                    for _ in range(3):
                        meta.step(lambda f: F.mse_loss(f(x[:3]), y[:3]))
                    F.mse_loss(meta.fmodel(x[3:]), y[3:]).backward()
            outer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    close(results[1], results[0])


@pytest.mark.parametrize("estimator", [mg.Full(), mg.Checkpointed(), mg.Binomial(order=3)], ids=repr)
def test_higher_style_steps_from_losses_through_attention_equal_a_hand_unroll(estimator):
    """higher's loop as written (diffopt.step(loss), the loss from fmodel): the adapter's fmodel
    runs attention's math kernel, so the loss it builds can be differentiated twice."""
    from metagrad.adapters import higher
    model, (x, y, xq, yq) = problem(7)
    want = hand_unroll(list(model.parameters()), x, y, xq, yq, 3, 0.1)
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), copy_initial_weights=False,
                              estimator=estimator) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(x), y))
        F.mse_loss(fmodel(xq), yq).backward()
    close([p.grad for p in model.parameters()], want)


@pytest.mark.parametrize("estimator", [mg.Full(), mg.Checkpointed()], ids=repr)
def test_torchopt_object_style_through_attention_equals_a_hand_unroll(estimator):
    """torchopt's object style builds each inner loss by calling the module itself: the adapter's
    hooks run its forward with attention's math kernel, and put the switches back after."""
    pytest.importorskip("torchopt")
    from metagrad.adapters import torchopt as mg_torchopt
    model, (x, y, xq, yq) = problem(8)
    want = hand_unroll(list(model.parameters()), x, y, xq, yq, 3, 0.1)
    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    theta = list(model.parameters())  # the module holds the fast weights during the loop
    inner_opt = mg_torchopt.MetaSGD(model, lr=0.1, estimator=estimator)
    for _ in range(3):
        inner_opt.step(F.mse_loss(model(x), y))
    F.mse_loss(model(xq), yq).backward()
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == flags
    inner_opt.close()
    close([p.grad for p in theta], want)


def test_the_attention_switches_are_put_back_when_a_step_raises():
    model, (x, y, xq, yq) = problem(9)
    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled(),
              torch.backends.cuda.mem_efficient_sdp_enabled())

    def failing(f):
        f(x)
        raise KeyError("a closure that fails after its forward")

    with pytest.raises(KeyError):
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed()) as meta:
            meta.step(lambda f: F.mse_loss(f(x), y))
            meta.step(failing)
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled()) == before
    assert all(p.grad is None for p in model.parameters())


def test_the_functional_face_through_attention_under_torch_compile():
    """The user compiles the meta-gradient: the math kernel is selected in the traced graph."""
    model, (x, y, xq, yq) = problem(10)
    names = [n for n, _ in model.named_parameters()]
    want = hand_unroll(list(model.parameters()), x, y, xq, yq, 2, 0.1)

    def loss_fn(params, batch):
        return F.mse_loss(torch.func.functional_call(model, params, (batch[0],)), batch[1])

    def meta_gradient(params, support, query):
        return mg.functional.meta_grad(loss_fn, params, support, query, inner_opt=mg.optim.SGD(lr=0.1), steps=2,
                                       estimator=mg.Checkpointed())

    got = torch.compile(meta_gradient)({n: p.detach() for n, p in model.named_parameters()}, (x, y), (xq, yq))
    close([got[n] for n in names], want, tol=1e-9)
