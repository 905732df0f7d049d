"""Meta-batches split across processes and machines, on :mod:`torch.distributed`.

metagrad brings no engine of its own: the process group is PyTorch's (NCCL on GPUs,
gloo on CPUs, launched with ``torchrun``), and this module adds two functions::

    dist.init_process_group("nccl")                       # launched with torchrun
    for tasks in meta_batches:
        outer.zero_grad()
        for task in mg.distributed.shard(tasks):          # this rank's share, deterministic
            with mg.MetaGradient(model, inner_opt=..., estimator=...) as meta:
                ...
                (query_loss / len(tasks)).backward()      # len(tasks): the whole meta-batch
        mg.distributed.average_gradients(model)            # every rank: the meta-batch mean
        outer.step()

**The scaling convention.** Each rank divides its query losses by the size of the
*whole* meta-batch, exactly as single-process code does, so its ``.grad`` holds its
share's part of the meta-batch mean ``(1/N) Σ_i g_i``. :func:`average_gradients`
adds the parts (an all-reduce sum; it does not divide by the world size), so every
rank ends with the mean over the meta-batch, and the same code gives the same number
at 1 process, at W processes and with shares of unequal size. (DDP's convention, each
rank averaging its own share and the ranks then averaged, is exact only for equal
shares.)

Every rank must call :func:`average_gradients` once per meta-batch, a rank whose
share is empty included: it is a collective. Without an initialized process group
both functions leave single-process code unchanged.

**DistributedDataParallel is not supported.** Measured with torch 2.13.0 (gloo, two
CPU processes, a float64 MLP, Full, Checkpointed and Binomial(2)). Passing
``DistributedDataParallel(model)`` to :class:`~metagrad.MetaGradient` does deliver
the reduced meta-gradient in one configuration: the meta-gradient reaches θ through
ordinary autograd (one custom node, then the parameters' ``AccumulateGrad``), whose
hooks DDP's reducer listens to. That configuration has four conditions, and missing
any of them gives an error or a wrong gradient:

1. Every MetaGradient block's backward launches DDP's all-reduce. With several tasks
   per rank, every rank must run the same number of synchronized backwards, i.e. all
   blocks but the last in ``ddp.no_sync()``. Without it, and with shares of unequal
   size, the reductions pair up across different blocks: the rank with one task
   finished with a meta-gradient 0.09 off (largest entry) and no error. A rank with
   an empty share never reduces, and the others wait until the timeout.
2. DDP divides by the world size, so the loss must be scaled by ``W / len(tasks)``
   instead of ``1 / len(tasks)``: the single-process code no longer gives the same
   number.
3. The model must have no buffers, or DDP must be built with
   ``broadcast_buffers=False``. metagrad's buffer policy hides the running statistics
   of a normalization layer in training mode from the functional call
   (:mod:`metagrad.functional`), DDP's pre-forward buffer broadcast then finds an empty
   list and the reducer fails ``!tensors.empty() INTERNAL ASSERT FAILED at
   reducer.cpp:2305``.
4. ``find_unused_parameters`` and ``static_graph`` must stay ``False``. With
   ``find_unused_parameters=True``, Checkpointed fails with "Expected to mark a variable
   ready only once" (the steps it rebuilds inside the meta-backward call DDP's forward,
   which re-arms the reducer in the middle of its backward), and Binomial fails because
   DDP wraps outputs in an autograd Function (``_DDPSink``) that has no
   ``torch.func.vmap`` rule. With ``static_graph=True`` every estimator fails with
   ``expect_autograd_hooks_ INTERNAL ASSERT FAILED at reducer.cpp:1732``.

Even in that configuration, DDP's forward runs at every inner step and at every step
an estimator rebuilds during backward (under ``vmap`` for Binomial), each time
re-arming the reducer with no backward in between. That this is harmless is
undocumented reducer behaviour, not a contract. And DDP gains nothing here: its
overlap of communication with backward needs gradients that become ready layer by
layer, while a meta-gradient arrives at all parameters at once, from one autograd
node, at the end of each block's backward.

So use :func:`average_gradients` on the plain module. If the model is already wrapped
for other training, pass the module inside the wrapper (``ddp.module``) to
``MetaGradient`` and to :func:`average_gradients`: DDP's reducer then sees no forward
of its own and stays out of the way (checked after an ordinary DDP step, with Binomial).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, Callable, Optional, TypeVar, Union, cast

import torch
import torch.distributed as dist

__all__ = ["average_gradients", "shard"]

T = TypeVar("T")
SequenceT = TypeVar("SequenceT", bound=Sequence[Any])
ProcessGroup = Any  # torch.distributed.ProcessGroup, absent from builds without distributed

_MIB = 1 << 20


def shard(sequence: SequenceT, group: Optional[ProcessGroup] = None) -> SequenceT:
    """This rank's share of ``sequence``: a contiguous slice, the same on every call.

    With ``N = len(sequence)`` items and ``W`` ranks, rank ``r`` gets
    ``sequence[start_r:start_r + size_r]``, where the first ``N mod W`` ranks get
    ``⌈N/W⌉`` items and the others ``⌊N/W⌋``. The shares are disjoint, in order, and
    cover the sequence; they depend only on ``N``, the rank and the world size. A rank
    gets an empty share when ``N < W``; it must still call :func:`average_gradients`.

    Args:
        sequence: anything with ``len()`` and slicing: a list, tuple, ``range``, or a
            tensor (split along its first dimension).
        group: the process group; ``None`` for the default group.

    Returns:
        ``sequence[start:stop]`` for this rank. Without an initialized process group,
        ``sequence`` itself.
    """
    if not (hasattr(sequence, "__len__") and hasattr(sequence, "__getitem__")):
        raise TypeError(
            f"sequence: expected something with len() and slicing (a list, tuple, range or "
            f"tensor), got {type(sequence).__name__}. Materialize an iterator with list() first."
        )
    if not _initialized():
        return sequence
    rank, world = _rank_and_world(group, "shard")
    base, extra = divmod(len(sequence), world)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return cast(SequenceT, sequence[start:stop])  # a slice of a list, tuple, range or tensor is one


def average_gradients(
    model_or_params: Union[torch.nn.Module, torch.Tensor, Iterable[torch.Tensor]],
    group: Optional[ProcessGroup] = None,
    *,
    bucket_cap_mb: float = 25.0,
) -> None:
    """Give every rank the meta-batch mean of the meta-gradients in ``.grad``.

    Each rank's ``.grad`` holds its share's part of the mean: its query losses were
    divided by the size of the whole meta-batch, as in single-process code (see the
    module docstring). This all-reduces the parts with a sum, so afterwards every
    rank holds ``(1/N) Σ_i g_i`` over the whole meta-batch.

    First, one all-gather of a fixed-size digest of the parameters' names, shapes and
    dtypes (three integers per rank). If the ranks disagree, every rank learns it from
    the same data and raises ``ValueError`` naming the rank and the parameter (the names
    and shapes are then gathered to say which), instead of entering all-reduces of
    different sizes, which gloo answers by aborting the process.

    Then the gradients are flattened into buckets of at most ``bucket_cap_mb`` (per
    dtype and device; a larger tensor gets a bucket of its own) and each bucket is
    summed with one all-reduce, all of them in flight at once. Each bucket also carries
    one number per parameter, 1 where this rank has its ``.grad`` and 0 where not, so
    the sum says which parameters have a gradient on some rank without a collective of
    its own. A parameter with a gradient on some ranks and none on others (a rank with
    an empty share, a parameter its tasks did not use) counts as zero where it is
    missing, and every rank ends with a ``.grad`` for it. A parameter with no gradient
    on any rank keeps ``.grad = None``.

    Args:
        model_or_params: a module (its parameters that require grad, in
            ``named_parameters()`` order), or a tensor or an iterable of tensors. Every rank
            must pass the same parameters in the same order, with the same shapes and
            dtypes.
        group: the process group; ``None`` for the default group.
        bucket_cap_mb: the largest bucket, in MiB (as DDP's ``bucket_cap_mb``).

    Returns:
        ``None``. Each ``.grad`` is overwritten in place with the sum over ranks (or set,
        where it was ``None`` on this rank). Without an initialized process group, or in
        a group of one rank, nothing is changed.

    Raises:
        ValueError: the parameters differ across ranks (every rank raises, naming the
            first rank that differs from rank 0 and the parameter), or this rank is not in
            ``group``.
        TimeoutError: a collective did not complete within the process group's timeout,
            e.g. because another rank did not call ``average_gradients``. (With gloo the
            timeout raises; NCCL's watchdog may end the process instead, see
            ``TORCH_NCCL_ASYNC_ERROR_HANDLING``.)
        RuntimeError: another collective failure, such as a peer that exited, with the
            rank and the step that failed.
    """
    named = _named_parameters(model_or_params)
    if not bucket_cap_mb > 0:
        raise ValueError(f"bucket_cap_mb: expected a positive number of MiB, got {bucket_cap_mb!r}.")
    if not _initialized():
        return
    rank, world = _rank_and_world(group, "average_gradients")
    if world == 1:
        return
    for name, param in named:
        if param.grad is not None and param.grad.layout != torch.strided:
            raise TypeError(
                f"model_or_params: parameter {name!r} has a {param.grad.layout} gradient; "
                "average_gradients sums dense (strided) gradients only."
            )
    control = _control_device(group, named)
    _check_same_parameters(named, group, rank, world, control)
    if not named:
        return

    # One all-reduce per bucket, all in flight before the first wait. A bucket holds its
    # parameters' gradients (zeros where missing here), then one has-a-gradient flag each.
    buckets = _buckets([param for _, param in named], int(bucket_cap_mb * _MIB))
    with torch.no_grad():
        flats = []
        for bucket in buckets:
            values = sum(p.numel() for p in bucket)
            flat = torch.zeros(values + len(bucket), dtype=bucket[0].dtype, device=bucket[0].device)
            offset = 0
            for index, param in enumerate(bucket):
                if param.grad is not None:
                    flat[offset:offset + param.numel()].copy_(param.grad.reshape(-1))
                    flat[values + index] = 1
                offset += param.numel()
            flats.append(flat)
        works = [_collective(functools.partial(dist.all_reduce, flat, group=group, async_op=True),
                             f"launching the all-reduce of gradient bucket {i + 1} of {len(buckets)}",
                             rank, world)
                 for i, flat in enumerate(flats)]
        for i, work in enumerate(works):
            _collective(work.wait, f"the all-reduce of gradient bucket {i + 1} of {len(buckets)} "
                                   f"({flats[i].numel()} {flats[i].dtype} values)", rank, world)
        for bucket, flat in zip(buckets, flats):
            values = flat.numel() - len(bucket)
            on_some_rank = (flat[values:] != 0).tolist()
            offset = 0
            for param, present in zip(bucket, on_some_rank):
                total = flat[offset:offset + param.numel()].view(param.shape)
                offset += param.numel()
                if not present:
                    continue  # no rank has a gradient for it: .grad stays None
                if param.grad is None:
                    param.grad = total.clone()
                else:
                    param.grad.copy_(total)


# ----------------------------------------------------------------------- helpers
def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_and_world(group: Optional[ProcessGroup], caller: str) -> tuple[int, int]:
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"group: this process (global rank {dist.get_rank()}) is not a member of the group "
            f"passed to {caller}; pass a group it belongs to, or None for the default group."
        )
    return rank, dist.get_world_size(group)


def _named_parameters(
    model_or_params: Union[torch.nn.Module, torch.Tensor, Iterable[torch.Tensor]],
) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` pairs; tensors passed without names are called ``parameters[i]``."""
    if isinstance(model_or_params, torch.nn.Module):
        return [(name, p) for name, p in model_or_params.named_parameters() if p.requires_grad]
    if isinstance(model_or_params, torch.Tensor):
        model_or_params = [model_or_params]
    try:
        tensors = list(model_or_params)
    except TypeError:
        raise TypeError(
            f"model_or_params: expected an nn.Module, a tensor or an iterable of tensors, got "
            f"{type(model_or_params).__name__}."
        ) from None
    for i, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"model_or_params: item {i} is a {type(tensor).__name__}, not a tensor; pass the "
                "module, or model.parameters()."
            )
    return [(f"parameters[{i}]", tensor) for i, tensor in enumerate(tensors)]


def _control_device(group: Optional[ProcessGroup], named: Sequence[tuple[str, torch.Tensor]]) -> torch.device:
    """Where the small bookkeeping tensors live: the CPU for gloo, the parameters' device otherwise."""
    if dist.get_backend(group) == "gloo" or not named:
        return torch.device("cpu")
    return named[0][1].device


def _signature(named: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, tuple[int, ...], str]]:
    return [(name, tuple(param.shape), str(param.dtype)) for name, param in named]


def _check_same_parameters(named: Sequence[tuple[str, torch.Tensor]], group: Optional[ProcessGroup],
                           rank: int, world: int, control: torch.device) -> None:
    """Raise ``ValueError`` on every rank if the ranks' parameters differ; never hang on it.

    A fixed-size digest is gathered first, so that the collective itself cannot be
    mismatched; only when the digests differ are the full signatures gathered, which
    every rank then does, having seen the same digests.
    """
    signature = _signature(named)
    digest = hashlib.sha256(repr(signature).encode()).digest()
    mine = torch.tensor([len(signature), int.from_bytes(digest[:8], "little", signed=True),
                         int.from_bytes(digest[8:16], "little", signed=True)],
                        dtype=torch.int64, device=control)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    _collective(lambda: dist.all_gather(gathered, mine, group=group),
                "the all-gather of the parameters' names and shapes", rank, world)
    differing = [r for r in range(world) if not torch.equal(gathered[r], gathered[0])]
    if not differing:
        return
    signatures: list[Any] = [None] * world
    _collective(lambda: dist.all_gather_object(signatures, signature, group=group),
                "the all-gather of the parameters' names and shapes", rank, world)
    raise ValueError(
        f"average_gradients: the parameters differ across ranks (ranks {differing} differ from "
        f"rank 0), so their gradients cannot be summed. {_first_difference(signatures, differing[0])} "
        "Every rank must pass the same parameters, in the same order, with the same shapes and dtypes."
    )


def _first_difference(signatures: Sequence[Sequence[tuple[str, tuple[int, ...], str]]], rank: int) -> str:
    ours, reference = signatures[rank], signatures[0]

    def describe(entry: tuple[str, tuple[int, ...], str]) -> str:
        name, shape, dtype = entry
        return f"parameter {name!r} of shape {shape} and dtype {dtype}"

    for index, (theirs, ref) in enumerate(zip(ours, reference)):
        if theirs != ref:
            return (f"Rank {rank} has {describe(theirs)} where rank 0 has {describe(ref)} "
                    f"(parameter {index} in order).")
    longer, shorter = (ours, reference) if len(ours) > len(reference) else (reference, ours)
    owner = rank if longer is ours else 0
    return (f"Rank {rank} has {len(ours)} parameters and rank 0 has {len(reference)}; the first "
            f"without a counterpart is rank {owner}'s {describe(longer[len(shorter)])}.")


def _buckets(params: Sequence[torch.Tensor], cap_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive parameters of one dtype and device, at most ``cap_bytes`` a bucket."""
    buckets: list[list[torch.Tensor]] = []
    filled: list[int] = []  # bytes in each bucket
    open_bucket: dict[tuple[torch.dtype, torch.device], int] = {}  # the bucket still being filled
    for param in params:
        key = (param.dtype, param.device)
        size = param.numel() * param.element_size()
        index = open_bucket.get(key)
        if index is None or filled[index] + size > cap_bytes:
            index = open_bucket[key] = len(buckets)
            buckets.append([])
            filled.append(0)
        buckets[index].append(param)
        filled[index] += size
    return buckets


def _collective(call: Callable[[], T], what: str, rank: int, world: int) -> T:
    """Run one collective; say which one, and on which rank, if it fails."""
    try:
        return call()
    except RuntimeError as error:  # gloo and NCCL raise RuntimeError (DistBackendError) subclasses
        text = str(error)
        if "timed out" in text.lower() or "timeout" in text.lower():
            raise TimeoutError(
                f"average_gradients: {what} timed out on rank {rank} of {world}. Another rank did not "
                "reach the same collective within the process group's timeout (the timeout= of "
                "init_process_group or new_group): it may have crashed, still be computing, or have "
                "called average_gradients a different number of times. Every rank must call it once "
                f"per meta-batch, a rank with an empty share included. torch.distributed said: {text}"
            ) from error
        raise RuntimeError(
            f"average_gradients: {what} failed on rank {rank} of {world}. torch.distributed said: {text}"
        ) from error
