"""Graph lifetime: estimators that rebuild step graphs free each one when its product is done.

Measured with ``torch.autograd.graph.saved_tensors_hooks``: every tensor an autograd graph
saves for backward is wrapped in a holder, and a finalizer notes when the graph drops it.
The peak of the bytes held at once is the graph memory, independent of the allocator.
Full holds K step graphs, so its peak grows with K; Checkpointed, Truncated and
``Binomial(chunk_size=1)`` rebuild one step graph at a time, so theirs does not. (Graphs built
inside ``torch.func.vmap``, Binomial's larger chunks, are not seen by these hooks.)
"""

import weakref

import pytest
import torch
import torch.nn.functional as F

import metagrad as mg


class _Holder:
    """A weak-referenceable box for one saved tensor."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class SavedBytes:
    """Peak bytes of tensors saved for backward and alive at once, inside the block."""

    def __init__(self):
        self.live = 0
        self.peak = 0

    def _pack(self, tensor):
        holder = _Holder(tensor)
        size = tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(holder, self._release, size)
        return holder

    def _release(self, size):
        self.live -= size

    @staticmethod
    def _unpack(holder):
        return holder.tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def peak_saved_bytes(estimator, steps):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    with SavedBytes() as saved:
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.01), estimator=estimator) as meta:
            for _ in range(steps):
                meta.step(lambda f: F.mse_loss(f(x), y))
            F.mse_loss(meta.fmodel(x), y).backward()
    return saved.peak


def test_full_holds_every_step_graph():
    assert peak_saved_bytes(mg.Full(), 16) > 6 * peak_saved_bytes(mg.Full(), 2)


@pytest.mark.parametrize("estimator", [mg.Checkpointed(), mg.Truncated(2), mg.FirstOrder(),
                                       mg.Binomial(2, chunk_size=1)], ids=repr)
def test_rebuilding_estimators_hold_one_step_graph_at_a_time(estimator):
    short, long = peak_saved_bytes(estimator, 2), peak_saved_bytes(estimator, 16)
    assert long <= 1.05 * short, (short, long)
    assert long < peak_saved_bytes(mg.Full(), 16) / 4
