"""No estimator leaks: 200 meta-iterations leave no tensor and no graph behind.

Counting live tensors (``gc``) is exact and independent of the allocator's caching,
which makes process memory a poor leak detector at this size. The bound: after the
first (warm-up) iterations, the number of live tensors must not grow at all.
"""

import gc
import warnings

import pytest
import torch
import torch.nn.functional as F

import metagrad as mg

ESTIMATORS = [mg.Full(), mg.Checkpointed(), mg.FirstOrder(), mg.Truncated(2), mg.Binomial(2),
              mg.Binomial(2, monitor=False), mg.Binomial("auto"), mg.Binomial(2, block=2),
              mg.Binomial(2, chunk_size=1), mg.Binomial(2, max_memory="1MiB"),
              mg.Implicit(reg=5.0, max_iter=5, tol=1e-3)]


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_two_hundred_meta_iterations_leak_nothing(estimator):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    outer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.linspace(-2, 2, 10).unsqueeze(1)
    y = torch.sin(x)

    def meta_iteration():
        outer.zero_grad()
        with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=0.05), estimator=estimator) as meta:
            for _ in range(4):
                meta.step(lambda f: F.mse_loss(f(x), y))
            F.mse_loss(meta.fmodel(x), y).backward()
        outer.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mg.MetaGradientWarning)  # Implicit's loose tol
        for _ in range(3):
            meta_iteration()
        before = live_tensors()
        for _ in range(200):
            meta_iteration()
        after = live_tensors()
    assert after <= before, f"{after - before} tensors more after 200 meta-iterations"


def test_a_compiled_block_keeps_no_captured_tensor_alive():
    """compile=True: the compiled functions cached for the next blocks keep the captured objects
    their key names by identity, not the captured tensors (inputs of every call): a scale
    computed by a hypernetwork for each block, with its graph, is freed with its block."""
    import weakref

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    hyper = torch.nn.Linear(2, 1)
    z, x = torch.rand(2), torch.rand(6, 1)
    def block():
        with mg.MetaGradient(model, mg.optim.SGD(lr=0.1), estimator=mg.Checkpointed(), compile=True) as meta:
            scale = torch.sigmoid(hyper(z)).squeeze()
            for _ in range(3):
                meta.step(lambda f: scale * F.mse_loss(f(x), torch.sin(x)))
            F.mse_loss(meta.fmodel(x), torch.sin(x)).backward()
        assert meta.info["compiled"]["products"] == 3, meta.info
        return weakref.ref(scale)

    refs = [block(), block()]
    gc.collect()
    assert [ref() is None for ref in refs] == [True, True]
