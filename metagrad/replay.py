"""Replaying an inner step exactly, and checking that it was (MATH.md, "Replaying a step").

Checkpointed, Truncated and Binomial call the user's closure again during backward, at a
stored iterate φ_m. They are right only if the rebuilt step is the step that was taken. Three
things make that true for the loops people write, and one makes it checkable:

- **Frozen closures.** :func:`freeze` copies a closure with the values it captures bound as
  they were at the step: the cells of a nested function, the globals its code reads (a
  script's or notebook's top-level loop variables), its defaults, the arguments of a
  ``functools.partial``, and shallow copies of small tuples, lists and dicts among them.
  ``for xb, yb in batches: meta.step(lambda f: loss(f(xb), yb))`` then rebuilds every step with
  its own batch. Tensors are not copied: a tensor changed in place after its step is caught by
  the check below, and named in its error.
- **Random numbers.** A closure that consumed random numbers (dropout, augmentation) is replayed
  with the generator states it started from, CPU and the model's CUDA device, as
  ``torch.utils.checkpoint(preserve_rng_state=True)`` does; the caller's generators are left as
  they were. Such steps are rebuilt one at a time, never under ``torch.func.vmap``. torch's
  default generators are one per process: a step whose draws another thread interleaved with
  cannot be replayed, and nothing here can prevent it. What shows it is kept: a replay that
  does not end at the state the step ended at, and the threads whose inner steps overlapped.
- **Batching.** Frozen closures that differ only in the tensors they capture, with equal shapes
  and dtypes (a mini-batch loop), share a :attr:`Frozen.key`; :meth:`Frozen.with_tensors` puts
  batched tensors in their place, so their steps still go into one vmapped call.
- **The check.** The stored next iterate is the truth: every rebuilt step's ``Φ_m(φ_m)`` is
  compared with the stored ``φ_{m+1}``, and its loss with the recorded loss
  (:func:`check_step`). A mismatch beyond rounding raises :class:`ReplayError`.

What a frozen closure cannot freeze is what the check is for: state read through an object
(``self.batch``), an iterator (``next(it)`` inside the closure), a function the closure calls
that reads globals of its own, a generator object passed explicitly, Python state inside an
update rule (torchopt's ``sgd(dampening>0)`` keeps a first-call flag), a buffer a forward hook
writes at every call (spectral norm's power iteration in training mode), or a non-deterministic
kernel. Where the error can see the cause it names it: the numbers the closure reads through
the objects it captures (``cfg.temp``, :attr:`Frozen.reads`) that changed since the step, the
buffers a rebuild wrote to, another thread's draws, a step that ran compiled.
"""

from __future__ import annotations

import functools
import math
import threading
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils import _pytree as pytree

from .fmodel import FunctionalModel

__all__ = ["ReplayError", "Frozen", "freeze", "RandomState", "check_step", "check_losses", "tolerance"]

#: Containers captured by a closure are copied (and their tensors batched) up to this many
#: leaves; larger ones are kept by reference, and the check guards them.
_MAX_LEAVES = 64


class ReplayError(RuntimeError):
    """A step rebuilt during backward is not the step the inner loop took, or cannot be
    differentiated twice: the estimator would otherwise return a wrong meta-gradient."""


# ------------------------------------------------------------------ frozen closures
class Frozen:
    """A closure with the values it captured at one inner step.

    Calling it calls a copy of the user's function whose cells, globals, defaults (or a
    partial's arguments) hold what they held at the step. ``key`` is equal for two frozen
    closures that compute the same function up to the tensors they capture;
    :meth:`with_tensors` substitutes those tensors (for ``torch.func.vmap``).
    """

    __slots__ = ("_build", "_values", "_specs", "key", "tensors", "versions", "names", "source",
                 "reads", "compiled", "written", "replayed")

    def __init__(self, build: Callable[[list[Any]], Callable[..., Any]], values: list[Any],
                 names: list[str], identity: tuple[Any, ...], source: Callable[..., Any], *,
                 attributes: tuple[str, ...] = (), bound: Any = None) -> None:
        self._build = build
        self.source = source
        #: How a rebuild of this step was computed by a compiled call (``compile=True``):
        #: ``"product"`` (the step product), ``"inner"`` (the step's gradient when it was
        #: taken), or ``None``. Set by :mod:`metagrad.compiled`, read by the replay error.
        self.compiled: Optional[str] = None
        #: ``(module, buffer names)`` a rebuild of this step wrote to in place, if any.
        self.written: Optional[tuple[torch.nn.Module, list[str]]] = None
        #: The generator states the last rebuild ran with (:meth:`RandomState.replay`).
        self.replayed: Optional["RandomState"] = None
        flat: list[Any] = []
        specs: list[Any] = []
        leaf_names: list[str] = []
        for name, value in zip(names, values):
            if isinstance(value, (tuple, list, dict)) and not isinstance(value, torch.Size):
                leaves, spec = pytree.tree_flatten(value)
                if len(leaves) <= _MAX_LEAVES:
                    flat.extend(leaves)
                    specs.append((spec, len(leaves)))
                    leaf_names.extend(f"{name}[{i}]" for i in range(len(leaves)))
                    continue
            flat.append(value)
            specs.append(None)
            leaf_names.append(name)
        self._values = flat
        self._specs = specs
        #: The captured tensors, in slot order, and their version counters at the step.
        self.tensors = [(i, v) for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
        self.versions = [v._version for _, v in self.tensors]
        self.names = leaf_names
        #: Numbers and strings the code reads through captured objects (``cfg.temp``): ``(name,
        #: object, attribute path, value at the step)``. Not frozen (an object is shared), but
        #: a compiled step product is keyed on their values (:meth:`reads_key`) and the replay
        #: error names the ones that changed (:meth:`changed_reads`).
        roots = [(n, v) for n, v in zip(leaf_names, flat)]
        if bound is not None:
            roots.append(("self", bound))
        self.reads = _attribute_reads(roots, frozenset(attributes)) if attributes else []
        self.key = (identity, tuple(specs_key(specs)), tuple(
            # A tensor that requires grad is a meta-parameter: by identity, so that another one
            # is looked for again (Trajectory._discover).
            ("tensor", v.shape, v.dtype, v.device, id(v) if v.requires_grad else None)
            if isinstance(v, torch.Tensor)
            else _value_key(v) for v in flat))

    def with_tensors(self, replace: Mapping[int, torch.Tensor]) -> Callable[..., Any]:
        """The function with the captured values at slots ``replace`` swapped for other tensors."""
        values = list(self._values)
        for slot, tensor in replace.items():
            values[slot] = tensor
        return self._function(values)

    def modified(self) -> list[str]:
        """The names of captured tensors changed in place since the step."""
        return [self.names[i] for (i, t), version in zip(self.tensors, self.versions)
                if t._version != version]

    def reads_key(self) -> tuple[Any, ...]:
        """The values of :attr:`reads` now (numbers by value, other objects by identity)."""
        return tuple((name, _value_key(_follow(root, path))) for name, root, path, _ in self.reads)

    def changed_reads(self) -> list[tuple[str, Any, Any]]:
        """``(name, value at the step, value now)`` for each of :attr:`reads` that changed."""
        out = []
        for name, root, path, then in self.reads:
            now = _follow(root, path)
            if _value_key(now) != _value_key(then):
                out.append((name, then, now))
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A rebuild: note the generator states it replays (set by RandomState.replay on this
        # thread), and the model's buffers it writes to in place (a forward hook's update).
        self.replayed = getattr(_REPLAYING, "state", None)
        module = args[0].module if args and isinstance(args[0], FunctionalModel) else None
        before = None if module is None else _buffer_versions(module)
        out = self._function(self._values)(*args, **kwargs)
        if before is not None:
            after = _buffer_versions(module)  # type: ignore[arg-type]
            written = [name for name, version in after.items() if before.get(name) != version]
            if written:
                self.written = (module, written)  # type: ignore[assignment]
        return out

    def _function(self, flat: list[Any]) -> Callable[..., Any]:
        values, start = [], 0
        for spec in self._specs:
            if spec is None:
                values.append(flat[start])
                start += 1
            else:
                tree, count = spec
                values.append(pytree.tree_unflatten(flat[start:start + count], tree))
                start += count
        return self._build(values)


def specs_key(specs: list[Any]) -> list[Any]:
    return [None if spec is None else (str(spec[0]), spec[1]) for spec in specs]


def _value_key(value: Any) -> tuple[Any, ...]:
    # Numbers and strings compare by value (a loop index captured as an int); every other
    # object by identity, which the frozen closure keeps alive.
    if isinstance(value, (bool, int, float, complex, str, bytes, type(None))):
        return ("value", type(value), value)
    return ("object", id(value))


def freeze(closure: Callable[..., Any]) -> Frozen:
    """``closure`` with the values it captures bound as they are now (see the module docstring)."""
    if isinstance(closure, Frozen):
        return closure
    if isinstance(closure, functools.partial):
        inner = freeze(closure.func) if isinstance(closure.func, types.FunctionType) else closure.func
        names = [f"argument {i}" for i in range(len(closure.args))] + list(closure.keywords)
        values = [*closure.args, *closure.keywords.values()]
        count, keywords = len(closure.args), list(closure.keywords)

        def build_partial(values: list[Any]) -> Callable[..., Any]:
            return functools.partial(inner, *values[:count], **dict(zip(keywords, values[count:])))

        identity = ("partial", inner.key if isinstance(inner, Frozen) else id(inner), count, tuple(keywords))
        code = getattr(inner.source if isinstance(inner, Frozen) else inner, "__code__", None)
        return Frozen(build_partial, values, names, identity, closure,
                      attributes=() if code is None else _global_names(code))
    bound = getattr(closure, "__self__", None) if isinstance(closure, types.MethodType) else None
    function = closure.__func__ if isinstance(closure, types.MethodType) else closure
    if not isinstance(function, types.FunctionType):  # a callable object: kept as it is
        call = getattr(type(closure), "__call__", None)
        code = getattr(call, "__code__", None)
        return Frozen(lambda values: closure, [], [], ("object", id(closure)), closure,
                      attributes=() if code is None else _global_names(code), bound=closure)
    code = function.__code__
    cells = function.__closure__ or ()
    cell_values = [_cell_value(cell) for cell in cells]
    namespace = function.__globals__
    global_names = [name for name in _global_names(code) if name in namespace]
    defaults = list(function.__defaults__ or ())
    values = [*cell_values, *(namespace[name] for name in global_names), *defaults]
    names = [*code.co_freevars, *global_names, *(f"default {i}" for i in range(len(defaults)))]
    cuts = (len(cell_values), len(cell_values) + len(global_names))
    base = {"__builtins__": namespace.get("__builtins__"), "__name__": namespace.get("__name__")}

    def build(values: list[Any]) -> Callable[..., Any]:
        frozen_cells = tuple(types.CellType() if v is _EMPTY else types.CellType(v)
                             for v in values[:cuts[0]])
        frozen_globals = {**base, **dict(zip(global_names, values[cuts[0]:cuts[1]]))}
        copy = types.FunctionType(code, frozen_globals, function.__name__,
                                  tuple(values[cuts[1]:]) or None, frozen_cells)
        copy.__kwdefaults__ = function.__kwdefaults__
        return copy if bound is None else types.MethodType(copy, bound)

    identity = ("function", code, id(namespace), tuple(global_names), id(bound))
    return Frozen(build, values, names, identity, closure, attributes=_global_names(code), bound=bound)


class _Empty:
    def __repr__(self) -> str:
        return "<empty cell>"


_EMPTY = _Empty()


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not yet assigned
        return _EMPTY


@functools.lru_cache(maxsize=1024)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """Every name the code, and code nested in it (comprehensions, inner functions), may read
    as a global. Attribute names are included too; they are looked up and skipped if absent."""
    names = dict.fromkeys(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(dict.fromkeys(_global_names(const)))
    return tuple(names)


#: At most this many attribute reads are kept per frozen closure, and objects are followed
#: this many attributes deep (``self.cfg.temp``).
_MAX_READS = 32
_MAX_DEPTH = 3
_SCALARS = (bool, int, float, complex, str, bytes, type(None))


def _attribute_reads(roots: list[tuple[str, Any]], attributes: frozenset[str]
                     ) -> list[tuple[str, Any, tuple[str, ...], Any]]:
    """The numbers and strings reachable from ``roots`` through attributes whose names the code
    reads (``attributes``): instance attributes (a module's submodules too), and the attributes of
    a captured class or Python module. Properties and other descriptors are not called."""
    reads: list[tuple[str, Any, tuple[str, ...], Any]] = []
    seen: set[int] = set()

    def visit(name: str, root: Any, path: tuple[str, ...], value: Any, depth: int) -> None:
        if len(reads) >= _MAX_READS or id(value) in seen:
            return
        fields = _fields(value)
        if fields is None:
            return
        seen.add(id(value))
        for attribute in attributes:
            if attribute not in fields:
                continue
            found = fields[attribute]
            if isinstance(found, _SCALARS):
                reads.append((f"{name}.{attribute}", root, (*path, attribute), found))
                if len(reads) >= _MAX_READS:
                    return
            elif depth < _MAX_DEPTH and not isinstance(value, (type, types.ModuleType)):
                visit(f"{name}.{attribute}", root, (*path, attribute), found, depth + 1)

    for name, value in roots:
        visit(name, value, (), value, 1)
    return reads


def _fields(value: Any) -> Optional[Mapping[str, Any]]:
    """The attributes of ``value`` that :func:`_attribute_reads` looks at, or ``None``."""
    if isinstance(value, (torch.Tensor, types.FunctionType, types.BuiltinFunctionType, _Empty, *_SCALARS)):
        return None
    if isinstance(value, torch.nn.Module):
        return _ModuleFields(value)
    try:
        fields = getattr(value, "__dict__", None)
    except Exception:  # an object whose __getattr__ raises for what it does not have
        return None
    return fields if isinstance(fields, Mapping) else None


class _ModuleFields(Mapping):
    """A module's plain attributes and submodules (``self.temperature``, ``self.head``)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.plain, self.modules = vars(module), module._modules

    def __getitem__(self, name: str) -> Any:
        return self.plain[name] if name in self.plain else self.modules[name]

    def __contains__(self, name: object) -> bool:
        return name in self.plain or name in self.modules

    def __iter__(self) -> Any:
        return iter({**self.plain, **self.modules})

    def __len__(self) -> int:
        return len(self.plain) + len(self.modules)


class _Missing:
    def __repr__(self) -> str:
        return "<no such attribute>"


_MISSING = _Missing()


def _follow(root: Any, path: tuple[str, ...]) -> Any:
    value = root
    for attribute in path:
        fields = _fields(value)
        if fields is None or attribute not in fields:
            return _MISSING
        value = fields[attribute]
    return value


def _buffer_versions(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (id(buffer), buffer._version) for name, buffer in module.named_buffers()
            if buffer is not None}


# ------------------------------------------------------------------- random numbers
#: The inner steps being taken now, per thread: ``thread id -> [start, end]`` in the order of
#: :data:`_CLOCK` (``end`` is ``None`` while the step runs). Two steps that overlap in time, in
#: two threads, draw from the one process-wide generator in an order nothing fixes.
_WINDOWS: dict[int, list[Any]] = {}
_CLOCK = [0]
_WINDOWS_LOCK = threading.Lock()
#: The generator states being replayed on this thread (``state``), for :class:`Frozen`.
_REPLAYING = threading.local()


@dataclass
class RandomState:
    """The generator states a step's closure started from (CPU, and a CUDA device if used).

    torch's default generators are one per process, shared by every thread: a step whose
    random numbers another thread drew from in the middle cannot be replayed. So the state also
    keeps what shows that happened: the states the step ended at (:meth:`changed`), the threads
    that took inner steps at the same time (:attr:`others`), and whether a replay ended at
    other states than the step did (:attr:`foreign`)."""

    cpu: torch.Tensor
    cuda: Optional[tuple[int, torch.Tensor]] = None
    #: The states when the step's closure returned (CPU, CUDA or ``None``).
    end: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None
    #: The names of other threads that took inner steps while this one ran.
    others: tuple[str, ...] = ()
    #: A replay from :attr:`cpu` ended at other states than :attr:`end`: something else drew
    #: from the generator while the step (or the replay) ran.
    foreign: bool = False
    thread: int = 0
    start: int = 0

    @staticmethod
    def capture(device: torch.device) -> "RandomState":
        cuda = None
        if device.type == "cuda" and torch.cuda.is_initialized():
            index = torch.cuda.current_device() if device.index is None else device.index
            cuda = (index, torch.cuda.get_rng_state(index))
        thread = threading.get_ident()
        with _WINDOWS_LOCK:
            _CLOCK[0] += 1
            start = _CLOCK[0]
            _WINDOWS[thread] = [start, None]
        return RandomState(torch.get_rng_state(), cuda, thread=thread, start=start)

    def changed(self) -> bool:
        """Whether any generator has moved since :meth:`capture` (the closure drew numbers).
        Called when the closure returned: it keeps the states the step ended at, and the
        threads whose steps overlapped this one."""
        cpu = torch.get_rng_state()
        cuda = None if self.cuda is None else torch.cuda.get_rng_state(self.cuda[0])
        self.end = (cpu, cuda)
        self.others = _overlapping(self.thread, self.start)
        if not torch.equal(self.cpu, cpu):
            return True
        return cuda is not None and not torch.equal(self.cuda[1], cuda)  # type: ignore[index]

    def restore(self) -> None:
        """Put the generators back to these states."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda[1], self.cuda[0])

    def replay(self) -> Any:
        """A context in which the generators start from these states; the caller's states are
        restored on exit."""
        return _Replaying(self)


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

    def __enter__(self) -> None:
        devices = [] if self.state.cuda is None else [self.state.cuda[0]]
        self.fork = torch.random.fork_rng(devices=devices)
        self.fork.__enter__()
        self.state.restore()
        self.outer = getattr(_REPLAYING, "state", None)
        _REPLAYING.state = self.state

    def __exit__(self, *exc: Any) -> None:
        _REPLAYING.state = self.outer
        end = self.state.end
        if exc[0] is None and end is not None:
            # The replay drew what the step drew from the same start: it ends where the step
            # ended, unless something else drew from the generator during one of them.
            moved = not torch.equal(torch.get_rng_state(), end[0])
            if end[1] is not None and self.state.cuda is not None:
                moved = moved or not torch.equal(torch.cuda.get_rng_state(self.state.cuda[0]), end[1])
            self.state.foreign = self.state.foreign or moved
        self.fork.__exit__(*exc)


# ------------------------------------------------------------------------ the check
def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """The default relative tolerance of the replay check for fast weights of ``dtype``.

    A rebuilt step runs the same operations as the step taken, sometimes in other kernels
    (batched under vmap, another convolution algorithm), so it agrees to a few units of
    rounding in the gradient. A step that read other data, other random numbers or another
    flag differs by a sizeable fraction of the step itself.
    """
    if dtype == torch.float64:
        return 1e-7
    if dtype == torch.float32:
        tf32 = device.type == "cuda" and (torch.backends.cuda.matmul.allow_tf32
                                          or torch.backends.cudnn.allow_tf32)
        return 3e-2 if tf32 else 1e-3
    return 5e-2 if dtype == torch.float16 else 1e-1


def check_step(steps: Sequence[int], rebuilt: Sequence[torch.Tensor], stored: Sequence[torch.Tensor],
               start: Sequence[torch.Tensor], rtol: float, *,
               losses: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
               closures: Optional[Sequence[Optional[Frozen]]] = None,
               raising: bool = True, recomputed_from: Optional[int] = None) -> list[int]:
    """Raise :class:`ReplayError` unless each rebuilt ``Φ_m(φ_m)`` equals the stored ``φ_{m+1}``.

    The tensors hold one row per step of ``steps`` (a leading dimension); ``closures`` are the
    rows' frozen closures, for the error's hint. The test, for each row::

        ‖Φ_m(φ_m) − φ_{m+1}‖ ≤ rtol·‖φ_{m+1} − φ_m‖ + 16·ε·‖φ_{m+1}‖,
        |L_m(rebuilt) − L_m(recorded)| ≤ rtol·|L_m(recorded)| + 16·ε·|L_m(recorded)|

    with ε the dtype's machine epsilon: the rebuilt step must agree with the step taken to a
    small fraction of the step's own length, and to rounding of the fast weights themselves.
    With ``raising=False`` it returns the rows that fail instead of raising (an empty list
    when all pass). ``recomputed_from``: the rows' iterates φ_m were recomputed forward from the
    snapshot at this step (:meth:`metagrad.trajectory.Trajectory.restore`), so a mismatch may
    come from any step since, and the error says so.
    """
    eps = torch.finfo(stored[0].dtype).eps

    def rows_of(tensors: Sequence[torch.Tensor]) -> torch.Tensor:  # each row's tensors side by side
        return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], 1)

    with torch.no_grad():
        new, old, first = rows_of(rebuilt), rows_of(stored), rows_of(start)
        table = torch.stack([(new - old).norm(dim=1), (old - first).norm(dim=1), old.norm(dim=1)])
        if losses is not None:
            table = torch.cat([table, torch.stack([t.reshape(-1).to(table.dtype) for t in losses])])
        values = table.tolist()
    mismatch, length, size = values[0], values[1], values[2]
    failed = []
    for row in range(len(mismatch)):
        if not math.isfinite(size[row]) or not math.isfinite(length[row]):
            continue  # the step taken was not finite (check_finite=False): nothing to compare
        bound = rtol * length[row] + 16 * eps * size[row]
        bad = not mismatch[row] <= bound  # NaN fails too
        if losses is not None:
            bad = bad or not _loss_agrees(values[3][row], values[4][row], rtol, eps)
        if bad:
            failed.append((row, bound))
    if not failed or not raising:
        return [row for row, _ in failed]
    row, bound = failed[0]
    which = steps[row]
    found = (f"‖Φ(φ_{which}) − φ_{which + 1}‖ = {mismatch[row]:.3g} against a step of length "
             f"{length[row]:.3g} (tolerance {bound:.3g})")
    if losses is not None:
        found += f"; rebuilt loss {values[3][row]:.10g}, recorded {values[4][row]:.10g}"
    raise _mismatch(which, found + _since(recomputed_from, which), None if closures is None else closures[row])


def check_losses(steps: Sequence[int], rebuilt: torch.Tensor, recorded: torch.Tensor, rtol: float, *,
                 closures: Optional[Sequence[Optional[Frozen]]] = None,
                 recomputed_from: Optional[int] = None) -> None:
    """Raise :class:`ReplayError` unless each rebuilt loss equals the recorded one (the loss part
    of :func:`check_step`): ``|L_m(rebuilt) − L_m(recorded)| ≤ (rtol + 16·ε)·|L_m(recorded)|``.
    For steps recomputed forward from a snapshot, whose next iterates were not stored (only the
    segment's last one is, and :func:`check_step` compares it)."""
    eps = torch.finfo(recorded.dtype).eps
    with torch.no_grad():
        new, old = rebuilt.reshape(-1).tolist(), recorded.reshape(-1).tolist()
    for row, (new_loss, old_loss) in enumerate(zip(new, old)):
        if not math.isfinite(old_loss):
            continue  # the step taken was not finite (check_finite=False)
        if not _loss_agrees(new_loss, old_loss, rtol, eps):
            found = f"recomputed loss {new_loss:.10g}, recorded {old_loss:.10g}"
            raise _mismatch(steps[row], found + _since(recomputed_from, steps[row]),
                            None if closures is None else closures[row])


def _loss_agrees(new: float, old: float, rtol: float, eps: float) -> bool:
    """``|L(rebuilt) − L(recorded)| ≤ (rtol + 16·ε)·|L(recorded)|`` (NaN fails)."""
    return abs(new - old) <= (rtol + 16 * eps) * abs(old)


def _since(first: Optional[int], which: int) -> str:
    if first is None or first == which:
        return ""
    return (f" (recomputed forward from the snapshot φ_{first}: one of the inner steps {first} … "
            f"{which} differs from the step taken)")


def _mismatch(which: int, found: str, frozen: Optional[Frozen]) -> ReplayError:
    causes = [] if frozen is None else _causes(frozen)
    text = f"inner step {which}, rebuilt during backward, is not the step the inner loop took: {found}."
    if causes:
        text += " " + " ".join(causes)
    else:
        hint = ""
        if frozen is not None and frozen.modified():
            hint = (f" The closure's captured tensors {frozen.modified()} were modified in place after "
                    "this step: give each step its own tensor instead (x = x + noise, not x.add_(noise)).")
        text += (
            " The closure or the update rule read something that changed since that step: state read "
            "through an object or a function the closure calls (self.batch, a helper reading globals), "
            "an iterator (next(it) inside the closure), data changed in place, a random generator "
            "passed explicitly, a non-deterministic kernel, or Python state in the update rule (such "
            f"as torchopt.sgd(dampening>0)'s first-call flag).{hint} To fix it, compute each step's "
            "data outside the closure and capture it (xb, yb = next(it); meta.step(lambda f: "
            "loss(f(xb), yb))), or use estimator=mg.Full(), which does not rebuild steps.")
    if frozen is not None and frozen.compiled is not None:
        what = ("its step product was computed by a function compiled with compile=True, traced "
                "from the closure once" if frozen.compiled == "product" else
                "its gradient was computed by a call compiled with compile=True")
        if frozen.changed_reads():  # named above, with the fix
            text += f" (Inner step {which} ran compiled: {what}; the same fix applies.)"
        else:
            text += (
                f" Inner step {which} ran compiled: {what}. Python values the closure reads are "
                "constants of a compiled function; metagrad compiles again when a number it reads "
                "through a captured object (cfg.temp) or a module's forward reads from its attributes "
                "changes, but a value read any other way (through a function the closure calls, a "
                "helper's globals, an object's dict entry) stays as it was traced. Read such values "
                "into a local before meta.step (temp = cfg.temp; meta.step(lambda f: loss(f) * temp)) "
                "or hold them in a tensor, or pass compile=False.")
    elif not causes:
        text += (" MetaGradient(check_replay=<float>) sets the relative tolerance; check_replay=False "
                 "skips this check, and then nothing verifies the rebuilt steps.")
    return ReplayError(text)


def _causes(frozen: Frozen) -> list[str]:
    """What is known to differ between the step taken and its rebuild, each with its fix."""
    causes = []
    changed = frozen.changed_reads()
    if changed:
        listed = ", ".join(f"{name} was {then!r} at this step and is {now!r} now" for name, then, now in changed)
        causes.append(
            f"The closure reads values through an object it captures, which are not frozen with the "
            f"step: {listed}. Read each into a local before meta.step, so that each step keeps its "
            f"own (temp = cfg.temp; meta.step(lambda f: loss(f) * temp)), or use estimator=mg.Full(), "
            f"which does not rebuild steps.")
    if frozen.written is not None:
        causes.append(_written(*frozen.written))
    state = frozen.replayed
    if state is not None and (state.foreign or state.others):
        threads = (f" Other threads took inner steps at the same time: {', '.join(state.others)}."
                   if state.others else "")
        what = ("Replayed from the generator states it started from, it did not end at the states the "
                "step ended at: something else drew from torch's default generator while the step (or "
                "its replay) ran." if state.foreign else
                "It may not have drawn the numbers it drew when it was taken.")
        causes.append(
            f"The step drew random numbers (dropout, augmentation). {what}{threads} torch's default "
            "generators are one per process, shared by every thread, so a step whose draws another "
            "thread interleaves with cannot be replayed. To fix it, run the MetaGradient blocks "
            "that draw random numbers in one thread; or, in each thread, draw the step's random "
            "tensors (dropout masks, augmented batches) outside the closure from a torch.Generator "
            "of its own and capture them; or use estimator=mg.Full(), which does not rebuild steps.")
    if causes and frozen.modified():
        causes.append(f"The closure's captured tensors {frozen.modified()} were also modified in place "
                      "after this step: give each step its own tensor (x = x + noise, not x.add_(noise)).")
    return causes


def _written(module: torch.nn.Module, names: list[str]) -> str:
    """The replay error's sentence for buffers a rebuild wrote to in place: which, by what."""
    from torch.nn.utils.spectral_norm import SpectralNorm

    spectral, layers = [], []
    for name in names:
        prefix = name.rpartition(".")[0]
        owner = module.get_submodule(prefix) if prefix else module
        if any(isinstance(hook, SpectralNorm) for hook in owner._forward_pre_hooks.values()):
            spectral.append(f"torch.nn.utils.spectral_norm on '{prefix}' (its forward pre-hook runs a "
                            f"step of power iteration that updates weight_u and weight_v in place)")
            layers.append(prefix)
        elif type(owner).__name__ == "_SpectralNorm" and ".parametrizations." in f".{prefix}":
            layer, _, rest = f".{prefix}".partition(".parametrizations.")
            spectral.append(f"torch.nn.utils.parametrizations.spectral_norm on '{layer[1:]}' "
                            f"(its power iteration updates {rest.rpartition('.')[0]}'s _u and _v in place)")
            layers.append(layer[1:])
    text = (f"Rebuilding the step wrote to the model's buffers {names} in place, so each call reads "
            "other values than the one before, and no rebuilt step computes the step taken.")
    if spectral:
        text += (f" They are written by {'; '.join(dict.fromkeys(spectral))}, at every call in training "
                 "mode. Put the spectral-norm layers in eval mode for the inner loop ("
                 + "; ".join(f"model.get_submodule({name!r}).eval()" if name else "model.eval()"
                             for name in dict.fromkeys(layers))
                 + ", before the MetaGradient block): u and v are then held as they are, and every step computes the "
                 "same function. To move u and v on, run the layers in training mode outside the "
                 "MetaGradient block (a forward pass under torch.no_grad()). "
                 "torch.nn.utils.parametrizations.spectral_norm writes its _u and _v in training mode "
                 "too.")
    else:
        text += (" A forward hook or the module's forward writes them at every call: hold them fixed "
                 "during the inner loop (eval mode, or the module's own switch), or use "
                 "estimator=mg.Full(), which does not rebuild steps.")
    return text


def refuse_twice(step: int, what: str) -> None:
    """Raise :class:`ReplayError` for a step whose loss came through ``what``, a node whose
    backward cannot be differentiated again: the second derivatives the estimator needs there
    would be lost, and the answer would silently be the first-order one."""
    compiled = "torch.compile" in what
    fix = ("Pass the closure (and the model) uncompiled" if compiled else
           "Give the function a backward that can itself be differentiated (drop "
           "@once_differentiable and write the backward with differentiable torch ops), or "
           "compute the loss without it")
    raise ReplayError(
        f"closure: the inner loss at step {step} comes through {what}, so the second derivatives "
        "this estimator needs through it would be lost and the meta-gradient would silently be "
        f"the first-order one. {fix}, or use estimator=mg.FirstOrder(), which needs no second "
        "derivative."
    )


def relative_tolerance(check: Any, dtype: torch.dtype, device: torch.device) -> Optional[float]:
    """The tolerance ``MetaGradient(check_replay=...)`` asks for: ``None`` for no check."""
    if check is False:
        return None
    if check is True:
        return tolerance(dtype, device)
    if isinstance(check, (int, float)) and not isinstance(check, bool) and math.isfinite(check) and check > 0:
        return float(check)
    raise ValueError(
        f"check_replay: expected True (the default tolerance), False (no check) or a relative "
        f"tolerance > 0, got {check!r}."
    )
