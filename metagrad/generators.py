"""The random generators an inner step draws from, and replaying them (MATH.md, "Replaying a step").

A closure that draws random numbers (dropout, augmentation, noise) is rebuilt during backward
with the generator states it started from, as ``torch.utils.checkpoint(preserve_rng_state=True)``
does, and the caller's generators are left as they were (:class:`RandomState`):

- torch's default generators, the CPU one and the model's CUDA device's, for every step;
- the other generators the step's code reaches (:func:`generators_reached`): Python's
  ``random`` module, NumPy's global generator (``np.random.normal``), and generator objects of
  the user's (``random.Random``, ``numpy.random.Generator`` or ``RandomState``,
  ``torch.Generator``) that the closure holds, or that the functions it calls, the methods of
  the objects it holds and the forward of the model's own module classes read, a few calls
  deep. They are found from the code and the values it holds, so a step that reaches none
  pays nothing for them; one reached in a way not followed here is not replayed, and the
  replay check then says the rebuilt step is not the step taken.

torch's default generators are one per process, shared by every thread: a step whose draws
another thread interleaved with cannot be replayed, and nothing here can prevent it. What shows
it is kept: a replay that does not end at the states the step ended at, and the threads whose
inner steps overlapped.
"""

from __future__ import annotations

import random
import sys
import threading
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .reads import cell_contents, imported_modules, library, loaded_globals, methods_called, read_names

__all__ = ["RandomState", "Source", "generators_reached", "merged", "rule_draws", "rule_sources", "step_sources"]


# ------------------------------------------------------------------ generators besides torch's
class Source:
    """A generator other than torch's default ones that a step may draw from: how to read, set
    and compare its state. ``name`` says where the step reaches it, for errors."""

    __slots__ = ("name", "generator", "kind")

    def __init__(self, name: str, generator: Any, kind: str) -> None:
        self.name = name
        self.generator = generator
        self.kind = kind  # "python", "numpy" (a RandomState), "numpy.Generator" or "torch"

    def __repr__(self) -> str:
        return f"Source({self.name!r})"

    def get(self) -> Any:
        if self.kind == "python":
            return self.generator.getstate()
        if self.kind == "numpy":
            return self.generator.get_state(legacy=False)
        if self.kind == "numpy.Generator":
            return self.generator.bit_generator.state
        return self.generator.get_state()

    def set(self, state: Any) -> None:
        if self.kind == "python":
            self.generator.setstate(state)
        elif self.kind == "numpy":
            self.generator.set_state(state)
        elif self.kind == "numpy.Generator":
            self.generator.bit_generator.state = state
        else:
            self.generator.set_state(state)


#: The generator behind Python's ``random.random()``, ``random.gauss()``, ... (the module's own instance).
_PYTHON: random.Random = getattr(random, "_inst")


def _source(name: str, value: Any, names: Optional[frozenset[str]] = None) -> Optional[Source]:
    """The generator ``value`` is, or draws from (a bound method such as ``random.random`` or
    ``np.random.normal``; the ``random`` module, the ``numpy`` module where the code reads its
    ``random``, ``numpy.random``), or ``None``. ``names``: what the code holding it reads."""
    if isinstance(value, types.ModuleType):
        if value.__name__ == "random":
            return Source("Python's random module", _PYTHON, "python")
        if value.__name__ == "numpy.random" or (value.__name__ == "numpy" and (names is None or "random" in names)):
            return Source("NumPy's global generator (np.random)", value.random.mtrand._rand
                          if value.__name__ == "numpy" else value.mtrand._rand, "numpy")
        return None
    owner = getattr(value, "__self__", None) if isinstance(value, (types.MethodType, types.BuiltinMethodType)) else None
    target = value if owner is None else owner
    if isinstance(target, random.Random):
        if isinstance(target, random.SystemRandom):  # (the OS's entropy: nothing to replay)
            return None
        if target is _PYTHON:
            return Source("Python's random module", target, "python")
        return Source(name, target, "python")
    if isinstance(target, torch.Generator):
        return None if target is torch.default_generator else Source(name, target, "torch")
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if isinstance(target, numpy.random.RandomState):
            return Source("NumPy's global generator (np.random)" if target is numpy.random.mtrand._rand else name,
                          target, "numpy")
        if isinstance(target, numpy.random.Generator):
            return Source(name, target, "numpy.Generator")
    return None


#: How many calls deep :func:`generators_reached` follows the user's functions and methods.
_DEPTH = 3


def generators_reached(roots: Iterable[tuple[str, Any]], names: Optional[frozenset[str]] = None
                       ) -> tuple[Source, ...]:
    """The generators besides torch's default ones that code holding ``roots`` (name, value)
    may draw from: those among the values; those that the user's functions among them read as
    globals or hold in their cells; and those that the user's objects among them (modules
    included) reach through the methods the code calls on them (``forward``, ``__call__``, the
    methods it names, and those these call on the object) and the attributes those read
    (``self.rng``), :data:`_DEPTH` calls deep. ``names``: the names the code holding ``roots``
    reads (NumPy's global generator is reached through the ``numpy`` module only by code that
    reads ``.random``: ``np.sqrt`` draws nothing); ``None``, unknown. Library code (torch,
    NumPy, ...) is not looked into, and neither are containers nor classes. A block runs it once
    per closure structure (:func:`step_sources`) and update rule (:func:`rule_sources`)."""
    found: dict[int, Source] = {}
    todo = [(name, value, 1, names) for name, value in roots]
    seen: set[Any] = set()
    while todo:
        name, value, depth, read = todo.pop()
        kind = type(value)
        what = _KINDS.get(kind)
        if what is None:
            what = _kind(kind)
        # (an object or a module is looked at again by code that reads other names of it)
        key = (id(value), read) if what == "object" or kind is types.ModuleType else id(value)
        if what == "library" or key in seen:
            continue
        seen.add(key)
        source = _source(name, value, read)
        if source is not None:
            found.setdefault(id(source.generator), source)
        elif depth > _DEPTH:
            continue
        elif kind is types.FunctionType:
            if not library(value):
                todo += _held(value, name, depth)
        elif kind is types.MethodType:
            todo += [(name, value.__func__, depth, read), (name, value.__self__, depth, read)]
        elif what == "object":  # an object of the user's class
            fields = getattr(value, "__dict__", None)
            for method in methods_called(kind, read or frozenset()):
                method_names = read_names(method.__code__)
                todo += _held(method, f"{name}.{method.__name__}", depth)
                todo.append((name, value, depth + 1, method_names))  # the methods it calls on the object
                if fields is not None:
                    todo += [(f"{name}.{n}", fields[n], depth + 1, method_names) for n in method_names if n in fields]
    return tuple(found.values())


def merged(*groups: tuple[Source, ...]) -> tuple[Source, ...]:
    """The generators of ``groups``, each once."""
    found: dict[int, Source] = {}
    for group in groups:
        for source in group:
            found.setdefault(id(source.generator), source)
    return tuple(found.values())


def step_sources(memo: dict[Any, Any], frozen: Any, module: torch.nn.Module) -> tuple[Source, ...]:
    """The generators a step of the frozen closure ``frozen`` may draw from: those its code
    reaches (:meth:`~metagrad.frozen.Frozen.generators`) and those the forward of ``module``'s
    own classes reaches. Found at the first step of each closure structure (``frozen.key``) of a
    block, ``memo`` being the block's: the values a structure holds are the same objects for
    the block's life, and the walk through the user's code costs more than a step's other
    bookkeeping (a trainer object's methods)."""
    sources: Optional[tuple[Source, ...]] = memo.get(frozen.key, (None, None))[1]
    if sources is None:
        model = memo.get(None)
        if model is None:
            model = memo[None] = generators_reached(module.named_modules())
        sources = merged(frozen.generators(), model)
        memo[frozen.key] = (frozen, sources)  # (held with it: the ids in its key stay their objects')
    return sources


def rule_sources(memo: dict[Any, Any], rule: Any) -> tuple[Source, ...]:
    """The generators besides torch's default ones that an update rule's ``step`` reaches (a
    noisy rule of the user's drawing from NumPy), found once per rule object in a block
    (``memo``, the block's)."""
    key = ("rule", id(rule))
    found: Optional[tuple[Source, ...]] = memo.get(key, (None, None))[1]  # (held with the rule: its id stays its own)
    if found is None:
        found = generators_reached([("rule", rule)], frozenset(("step",)))
        memo[key] = (rule, found)
    return found


def _kind(kind: type) -> str:
    """How :func:`generators_reached` treats a value of type ``kind``: ``"library"`` (not looked
    into: a tensor, a number, a torch module, a container), ``"object"`` (the user's class),
    or ``"look"`` (a function, a method, a Python module, a generator); found once per type."""
    if len(_KINDS) >= 4096:
        _KINDS.clear()
    numpy = sys.modules.get("numpy")
    generators: tuple[type, ...] = (random.Random, torch.Generator) + (
        () if numpy is None else (numpy.random.RandomState, numpy.random.Generator))
    if kind in (types.FunctionType, types.MethodType, types.BuiltinMethodType, types.ModuleType) or \
            issubclass(kind, generators):
        what = "look"
    else:
        what = "library" if issubclass(kind, type) or library(kind) else "object"
    _KINDS[kind] = what
    return what


_KINDS: dict[type, str] = {}


def _held(function: types.FunctionType, name: str, depth: int) -> list[tuple[str, Any, int, frozenset[str]]]:
    """What a user's function holds in its cells, reads as globals and imports as it runs (a
    module imported inside it: ``import numpy``), one call deeper, with the names its code reads."""
    code = function.__code__
    names = read_names(code)
    cells = [(n, cell_contents(c)) for n, c in zip(code.co_freevars, function.__closure__ or ())]
    namespace = function.__globals__
    return [(n, v, depth + 1, names) for n, v in cells] + [
        (n, namespace[n], depth + 1, names) for n in loaded_globals(code) if n in namespace] + [
        (n, sys.modules[n], depth + 1, names) for n in imported_modules(code) if n in sys.modules]


def _equal(a: Any, b: Any) -> bool:
    """Whether two generator states are equal (tuples, dicts, NumPy arrays, torch byte tensors)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and _same(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if hasattr(a, "tobytes") and hasattr(a, "shape"):  # a NumPy array
        return hasattr(b, "tobytes") and a.shape == b.shape and a.tobytes() == b.tobytes()
    return bool(a == b)


# ------------------------------------------------------------------- the states of one step
#: The inner steps being taken now, per thread: ``thread id -> [start, end]`` in the order of
#: :data:`_CLOCK` (``end`` is ``None`` while the step runs). Two steps that overlap in time, in
#: two threads, draw from the one process-wide generator in an order nothing fixes.
_WINDOWS: dict[int, list[Any]] = {}
_CLOCK = [0]
_WINDOWS_LOCK = threading.Lock()
#: The generator states being replayed on this thread (``state``), for :class:`~metagrad.frozen.Frozen`.
REPLAYING = threading.local()


@dataclass
class RandomState:
    """The generator states a step's closure started from: CPU, a CUDA device if used, and the
    :class:`Source` generators its code reaches.

    torch's default generators are one per process, shared by every thread: a step whose
    random numbers another thread drew from in the middle cannot be replayed. So the state also
    keeps what shows that happened: the states the step ended at (:meth:`changed`), the threads
    that took inner steps at the same time (:attr:`others`), and whether a replay ended at
    other states than the step did (:attr:`foreign`)."""

    cpu: torch.Tensor
    cuda: Optional[tuple[int, torch.Tensor]] = None
    #: The states when the step's closure returned (CPU, CUDA or ``None``, the sources').
    end: Optional[tuple[torch.Tensor, Optional[torch.Tensor], tuple[Any, ...]]] = None
    #: The names of other threads that took inner steps while this one ran.
    others: tuple[str, ...] = ()
    #: A replay from :attr:`cpu` ended at other states than :attr:`end`: something else drew
    #: from the generator while the step (or the replay) ran.
    foreign: bool = False
    thread: int = 0
    start: int = 0
    #: The other generators the step's code reaches, and their states when it started.
    sources: tuple[Source, ...] = ()
    states: tuple[Any, ...] = ()

    @staticmethod
    def capture(device: torch.device, sources: tuple[Source, ...] = ()) -> "RandomState":
        cuda = _cuda(device)
        thread = threading.get_ident()
        with _WINDOWS_LOCK:
            _CLOCK[0] += 1
            start = _CLOCK[0]
            _WINDOWS[thread] = [start, None]
        if not sources:  # (the common case)
            return RandomState(torch.get_rng_state(), cuda, thread=thread, start=start)
        return RandomState(torch.get_rng_state(), cuda, thread=thread, start=start, sources=sources,
                           states=tuple(source.get() for source in sources))

    def changed(self) -> bool:
        """Whether any generator has moved since :meth:`capture` (the closure drew numbers).
        Called when the closure returned: it keeps the states the step ended at, and the
        threads whose steps overlapped this one."""
        cpu = torch.get_rng_state()
        cuda = None if self.cuda is None else torch.cuda.get_rng_state(self.cuda[0])
        ends = tuple(source.get() for source in self.sources) if self.sources else ()
        self.end = (cpu, cuda, ends)
        self.others = _overlapping(self.thread, self.start)
        if not _same(self.cpu, cpu) or (ends and not all(_equal(a, b) for a, b in zip(self.states, ends))):
            return True
        return self.cuda is not None and cuda is not None and not _same(self.cuda[1], cuda)

    def ended(self) -> Optional[tuple[torch.Tensor, Optional[tuple[int, torch.Tensor]]]]:
        """The CPU and CUDA states the step's closure ended at (read by :meth:`changed`), as
        :func:`rule_draws` takes them, or ``None`` before."""
        if self.end is None:
            return None
        return self.end[0], None if self.cuda is None or self.end[1] is None else (self.cuda[0], self.end[1])

    def restore(self) -> None:
        """Put the generators back to these states."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda[1], self.cuda[0])
        for source, state in zip(self.sources, self.states):
            source.set(state)

    def replay(self) -> Any:
        """A context in which the generators start from these states; the caller's states are
        restored on exit."""
        return _Replaying(self)


def rule_draws(device: torch.device, then: Optional[tuple[Any, ...]], sources: tuple[Source, ...],
               run: Callable[[], Any]) -> tuple[Any, Optional[RandomState]]:
    """``run()`` (an update rule's step), and the generator states it started from if it drew
    random numbers (a noisy update: SGLD, perturbed gradient descent), as a :class:`RandomState`
    its rebuilds replay; else ``None``. ``then``: the CPU and CUDA states it starts from where
    known already (the states the step's closure ended at, :attr:`RandomState.end`), else
    read here; ``sources``: the other generators the rule's code reaches."""
    cpu, cuda = (torch.get_rng_state(), _cuda(device)) if then is None else (then[0], then[1])
    states = tuple(source.get() for source in sources) if sources else ()
    out = run()
    now_cuda = None if cuda is None else torch.cuda.get_rng_state(cuda[0])
    now = torch.get_rng_state()
    if _same(cpu, now) and (cuda is None or now_cuda is None or _same(cuda[1], now_cuda)) and (
            not sources or all(_equal(a, source.get()) for a, source in zip(states, sources))):
        return out, None
    state = RandomState(cpu, cuda, sources=sources, states=states, thread=threading.get_ident())
    state.end = (now, now_cuda, tuple(source.get() for source in sources))
    return out, state


def _cuda(device: torch.device) -> Optional[tuple[int, torch.Tensor]]:
    """The model's CUDA device and its generator's state, where the model is on one."""
    if device.type != "cuda" or not torch.cuda.is_initialized():
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    return index, torch.cuda.get_rng_state(index)


def _same(state: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether two generator states (byte tensors on the CPU) are equal, compared as bytes:
    a third of ``torch.equal``'s time, once per inner step."""
    return state.numpy().tobytes() == other.numpy().tobytes()


def _overlapping(thread: int, start: int) -> tuple[str, ...]:
    """The names of the live threads, other than ``thread``, whose last inner step overlapped
    the one that started at ``start`` (and ends now)."""
    with _WINDOWS_LOCK:
        _CLOCK[0] += 1
        if thread in _WINDOWS and _WINDOWS[thread][0] == start:
            _WINDOWS[thread][1] = _CLOCK[0]
        others = [ident for ident, (_, end) in _WINDOWS.items()
                  if ident != thread and (end is None or end >= start)]
        if not others and len(_WINDOWS) <= 64:
            return ()
        alive = {t.ident: t.name for t in threading.enumerate()}
        for ident in [i for i in _WINDOWS if i not in alive]:  # threads that have ended
            del _WINDOWS[ident]
    return tuple(alive[i] for i in others if i in alive)


class _Replaying:
    def __init__(self, state: RandomState) -> None:
        self.state = state
        self.fork: Any = None
        self.outer: Any = None
        self.callers: tuple[Any, ...] = ()

    def __enter__(self) -> None:
        devices = [] if self.state.cuda is None else [self.state.cuda[0]]
        self.fork = torch.random.fork_rng(devices=devices)
        self.fork.__enter__()
        self.callers = tuple(source.get() for source in self.state.sources)
        self.state.restore()
        self.outer = getattr(REPLAYING, "state", None)
        REPLAYING.state = self.state

    def __exit__(self, *exc: Any) -> None:
        REPLAYING.state = self.outer
        end = self.state.end
        if exc[0] is None and end is not None:
            # The replay drew what the step drew from the same start: it ends where the step
            # ended, unless something else drew from the generator during one of them.
            moved = not _same(torch.get_rng_state(), end[0])
            if end[1] is not None and self.state.cuda is not None:
                moved = moved or not _same(torch.cuda.get_rng_state(self.state.cuda[0]), end[1])
            moved = moved or not all(_equal(source.get(), state) for source, state in zip(self.state.sources, end[2]))
            self.state.foreign = self.state.foreign or moved
        for source, state in zip(self.state.sources, self.callers):
            source.set(state)
        self.fork.__exit__(*exc)
