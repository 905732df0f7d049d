"""Freezing a closure at its inner step, and the generator states it drew from (MATH.md,
"Replaying a step").

Checkpointed, Truncated and Binomial call the user's closure again during backward, at a
stored iterate φ_m, and :mod:`metagrad.replay` checks that the rebuilt step is the step taken.
What makes it so for the loops people write is kept here:

- **Frozen closures.** :func:`freeze` copies a closure with the values it captures bound as
  they were at the step: the cells of a nested function, the globals its code reads (a
  script's or notebook's top-level loop variables), its defaults, the arguments of a
  ``functools.partial``, and shallow copies of small tuples, lists and dicts among them.
  ``for xb, yb in batches: meta.step(lambda f: loss(f(xb), yb))`` then rebuilds every step with
  its own batch. Tensors are not copied: a tensor changed in place after its step is caught by
  the replay check, and named in its error (:meth:`Frozen.modified`). A list or dict that the
  step's own call wrote to (a forward hook's stored activations) is not a copy in a rebuild
  but the object itself, holding what it held when the step began (:meth:`Frozen.taken`).
- **Random numbers.** A closure that consumed random numbers (dropout, augmentation) is replayed
  with the generator states it started from, torch's and the other generators its code reaches
  (Python's ``random``, NumPy's, a generator object of its own: :meth:`Frozen.generators`), as
  ``torch.utils.checkpoint(preserve_rng_state=True)`` does; the caller's generators are left as
  they were (:class:`metagrad.generators.RandomState`). Such steps are rebuilt one at a time,
  never under ``torch.func.vmap``.
- **Batching.** Frozen closures that differ only in the tensors they capture, with equal shapes
  and dtypes (a mini-batch loop), share a :attr:`Frozen.key`; :meth:`Frozen.with_tensors` puts
  batched tensors in their place, so their steps still go into one vmapped call.

A frozen closure also keeps what the replay error names when a rebuild differs: the numbers it
reads through the objects it captures (:attr:`Frozen.reads`), the buffers a rebuild wrote to
(:attr:`Frozen.written`), the generator states a rebuild ran with (:attr:`Frozen.replayed`),
and whether it ran compiled (:attr:`Frozen.compiled`).
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ContextManager, Optional

import torch
from torch.utils import _pytree as pytree

from .fmodel import FunctionalModel
from .generators import REPLAYING, RandomState, Source, generators_reached, merged
from .reads import (MAX_READS, MISSING, Described, TensorRead, attribute_reads, cell_contents, follow,
                    indirect_reads, loaded_globals, locate, modules_reached, read_names)

__all__ = ["Frozen", "freeze", "reads_changed", "replaying_reads"]

#: Containers captured by a closure are copied (and their tensors batched) up to this many
#: leaves; larger ones are kept by reference, and the replay check guards them.
_MAX_LEAVES = 64


# ------------------------------------------------------------------ frozen closures
class Frozen:
    """A closure with the values it captured at one inner step.

    Calling it calls a copy of the user's function whose cells, globals, defaults (or a
    partial's arguments) hold what they held at the step. ``key`` is equal for two frozen
    closures that compute the same function up to the tensors they capture;
    :meth:`with_tensors` substitutes those tensors (for ``torch.func.vmap``).
    """

    __slots__ = ("_build", "_values", "_specs", "key", "_structure", "tensors", "versions", "names", "source",
                 "reads", "compiled", "written", "replayed", "inner", "_containers", "_live", "_seen", "_wrapped",
                 "_sources", "_find")

    def __init__(self, build: Callable[[list[Any]], Callable[..., Any]], values: list[Any],
                 names: list[str], identity: tuple[Any, ...], source: Callable[..., Any], *,
                 attributes: frozenset[str] = frozenset(), bound: Any = None, known: tuple[Any, ...] = ()) -> None:
        # known: the keys of the first values, computed already (Frozen.around).
        self._build = build
        self.source = source
        #: How a rebuild of this step was computed by a compiled call (``compile=True``):
        #: ``"product"`` (the step product), ``"inner"`` (the step's gradient when it was
        #: taken), or ``None``. Set by :mod:`metagrad.compiled`, read by the replay error.
        self.compiled: Optional[str] = None
        #: ``(module, buffer names)`` a rebuild of this step wrote to in place, if any.
        self.written: Optional[tuple[torch.nn.Module, list[str]]] = None
        #: The generator states the last rebuild ran with (:meth:`RandomState.replay`).
        self.replayed: Optional[RandomState] = None
        #: For a ``functools.partial`` of a function: that function, frozen (its captured tensors).
        self.inner: Optional[Frozen] = None
        self._wrapped: Optional[Frozen] = None  # (the one :meth:`around` wraps: told of the step too)
        #: The generators besides torch's default ones that its code reaches, and how to find them
        #: (:meth:`generators`; set by :func:`freeze`).
        self._sources: Optional[tuple[Source, ...]] = None
        self._find: Optional[Callable[[], tuple[Source, ...]]] = None
        flat: list[Any] = []
        specs: list[Any] = []
        leaf_names: list[str] = []
        #: The lists and dicts copied, by their slot in ``specs``: (the captured object, its leaves
        #: and structure when frozen), for :meth:`taken` to find those the step's own call wrote.
        self._containers: dict[int, tuple[Any, list[Any], Any]] = {}
        #: The slots of those the step's call wrote: a rebuild hands it the object itself (:func:`_live`).
        self._live: frozenset[int] = frozenset()
        self._seen = False
        for name, value in zip(names, values):
            if isinstance(value, (tuple, list, dict)) and not isinstance(value, torch.Size):
                leaves, spec = pytree.tree_flatten(value)
                if len(leaves) <= _MAX_LEAVES:
                    if isinstance(value, (list, dict)):
                        self._containers[len(specs)] = (value, leaves, spec)
                    flat.extend(leaves)
                    specs.append((spec, len(leaves)))
                    leaf_names.extend(f"{name}[{i}]" for i in range(len(leaves)))
                    continue
            flat.append(value)
            specs.append(None)
            leaf_names.append(name)
        self._values = flat
        self._specs = specs
        #: The captured tensors, in slot order, and their version counters at the step (``None``
        #: for one the closure's own call writes to: :meth:`taken`).
        self.tensors = [(i, v) for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
        self.versions: list[Optional[int]] = [v._version for _, v in self.tensors]
        self.names = leaf_names
        #: Numbers, strings and tensors the code reads through captured objects (``cfg.temp``),
        #: through the methods it calls on them and the globals of the functions it calls
        #: (:func:`_indirect_reads`): ``(name, object, attribute path, value at the step)``. Not
        #: frozen (an object is shared), but a compiled step product is keyed on their values
        #: (:meth:`reads_key`), and the replay check names the ones that changed
        #: (:meth:`changed_reads`), and fails on them where the block has meta-parameters
        #: (:func:`metagrad.replay.check_reads`).
        roots = [(n, v) for n, v in zip(leaf_names, flat)]
        if bound is not None:
            roots.append(("self", bound))
        self.reads = attribute_reads(roots, attributes) if attributes else []
        self.reads += indirect_reads(roots, attributes, MAX_READS - len(self.reads))
        self.key = (identity, tuple(specs_key(specs)), known + tuple(
            # A tensor that requires grad is a meta-parameter: by identity, so that another one
            # is looked for again (MetaParameters.discover, metagrad.discovery); so too one it
            # reads through an object (cfg.w set anew for each step).
            ("tensor", v.shape, v.dtype, v.device, id(v) if v.requires_grad else None)
            if isinstance(v, torch.Tensor)
            else _value_key(v) for v in flat[len(known):])) + _read_meta(self.reads)
        # The key itself where no tensor it captures or reads requires grad (most steps).
        self._structure: Optional[tuple[Any, ...]] = (
            None if any(t.requires_grad for _, t in self.tensors) or len(self.key) > 3 else self.key)

    def objects(self) -> list[Any]:
        """The captured values that are not tensors (those :attr:`structure` names by identity
        among them)."""
        return [value for value in self._values if not isinstance(value, torch.Tensor)]

    def generators(self) -> tuple[Source, ...]:
        """The generators besides torch's default ones that its code reaches (Python's
        ``random``, NumPy's global one, generator objects of the user's:
        :func:`~metagrad.generators.generators_reached`), found when first asked."""
        if self._sources is None:
            self._sources = () if self._find is None else self._find()
        return self._sources

    def modules(self) -> list[tuple[str, torch.nn.Module]]:
        """The modules it captures or a function it calls holds (a learned loss, a hypernetwork),
        with their names (:func:`~metagrad.reads.modules_reached`)."""
        return modules_reached(list(zip(self.names, self._values)))

    @property
    def structure(self) -> tuple[Any, ...]:
        """:attr:`key` with each captured tensor that requires grad by its kind only, not by
        identity: what a compiled gradient of the step depends on (the captured tensors are
        inputs of the compiled call, whatever they are), so that a closure capturing a new
        tensor that requires grad at every step (each step's slice of learned inputs) finds
        the compiled function of the last. η discovery keeps :attr:`key`."""
        if self._structure is None:
            identity, specs, values = self.key[:3]
            self._structure = (identity, specs, tuple(
                value[:4] + ("requires grad",) if value[0] == "tensor" and value[4] is not None else value
                for value in values))
        return self._structure

    def around(self, wrap: Callable[..., Any], extra: list[Any], extra_names: list[str], tag: Any) -> "Frozen":
        """A frozen closure that calls ``wrap(function, extra, *args)``: ``function`` is this
        closure rebuilt from its values, ``extra`` further values frozen beside them (a step's
        batch). Its values are this one's followed by ``extra``, so tensors among either are
        found, batched and substituted alike; its key is this one's under ``tag``."""
        count = len(self._values)

        def build(values: list[Any]) -> Callable[..., Any]:
            return functools.partial(wrap, self._function(values[:count]), values[count:])

        out = Frozen(build, [*self._values, *extra], [*self.names, *extra_names],
                     (tag, self.key[0], tuple(self.key[1])), self.source, known=self.key[2])
        out._wrapped = self
        out.reads = self.reads
        out._find = self.generators
        out.key = out.key[:3] + self.key[3:]
        return out

    def with_tensors(self, replace: Mapping[int, torch.Tensor]) -> Callable[..., Any]:
        """The function with the captured values at slots ``replace`` swapped for other tensors."""
        values = list(self._values)
        for slot, tensor in replace.items():
            values[slot] = tensor
        return self._function(values)

    def taken(self) -> None:
        """Note that its step (or a rebuild of it) ran: :meth:`modified` then names the captured
        tensors changed in place after it, never one the closure's own call wrote to (a loss
        logged into a captured tensor: its version is forgotten).

        After the step itself, a captured list or dict that the step's own call changed (a forward
        hook's ``acts[name] = output``, read by the loss after the forward) is handed to a rebuild
        as the object itself, holding what it held when the step began (:func:`_live`)."""
        self.versions = [None if old is None or t._version != old else old
                         for (_, t), old in zip(self.tensors, self.versions)]
        if not self._seen:
            self._seen = True
            self._live = frozenset(slot for slot, (value, leaves, spec) in self._containers.items()
                                   if _rewritten(value, leaves, spec))
            self._containers = {slot: self._containers[slot] for slot in self._live}  # (no others held)
        for other in (self.inner, self._wrapped):
            if other is not None:
                other.taken()

    @property
    def live(self) -> bool:
        """Whether its step's own call wrote a captured list or dict (:meth:`taken`): rebuilt alone."""
        return bool(self._live) or any(other is not None and other.live for other in (self.inner, self._wrapped))

    def modified(self) -> list[str]:
        """The names of captured tensors changed in place since the step (not those its own call
        wrote to: :meth:`taken`)."""
        return [self.names[i] for (i, t), version in zip(self.tensors, self.versions)
                if version is not None and t._version != version] + (
                    [] if self.inner is None else self.inner.modified())

    def reads_key(self) -> tuple[Any, ...]:
        """The values of :attr:`reads` now (numbers by value, tensors by kind, other objects by
        identity)."""
        return tuple((name, _value_key(follow(root, path))) for name, root, path, then in self.reads
                     if type(then) is not TensorRead)

    def changed_reads(self) -> list[tuple[str, Any, Any]]:
        """``(name, value at the step, value now)`` for each of :attr:`reads` that changed (a
        tensor: another one, or the same changed in place, described in words)."""
        out = []
        for name, root, path, then in self.reads:
            now = follow(root, path)
            if _changed(then, now):
                out.append(_described(name, then, now))
        return out

    def read_changed(self) -> bool:
        """Whether any of :attr:`reads` changed since the step (:meth:`changed_reads`, without
        describing them: asked for every step's batch key)."""
        return reads_changed(self.reads)

    def replaying(self) -> ContextManager[None]:
        """For a rebuild: each of :attr:`reads` that changed since the step set back to its value
        at the step (:func:`replaying_reads`); :meth:`unreplayable` names those it cannot."""
        return replaying_reads(self.reads)

    def unreplayable(self) -> list[tuple[str, Any, Any]]:
        """:meth:`changed_reads` that :meth:`replaying` cannot set back as they were at the step."""
        out = []
        for name, root, path, then in self.reads:
            now = follow(root, path)
            if _changed(then, now) and _settable(root, path, then) is None:
                out.append(_described(name, then, now))
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call({}, *args, **kwargs)

    def call(self, replace: Mapping[int, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """Call it with the captured values at slots ``replace`` swapped for other tensors (as
        :meth:`with_tensors`), noting what a rebuild notes."""
        # A rebuild: note the generator states it replays (set by RandomState.replay on this
        # thread), and the model's buffers it writes to in place (a forward hook's update).
        self.replayed = getattr(REPLAYING, "state", None)
        model = args[0] if args and isinstance(args[0], FunctionalModel) else None
        before = None if model is None else model.buffer_versions()
        out = self.with_tensors(replace)(*args, **kwargs)
        if model is not None and before:
            after = model.buffer_versions()
            written = [name for name, version in after.items() if before.get(name) != version]
            if written:
                self.written = (model.module, written)
        return out

    def _function(self, flat: list[Any]) -> Callable[..., Any]:
        values, start, live = [], 0, []
        for slot, spec in enumerate(self._specs):
            if spec is None:
                values.append(flat[start])
                start += 1
            else:
                tree, count = spec
                copy = pytree.tree_unflatten(flat[start:start + count], tree)
                if slot in self._live:
                    live.append((self._containers[slot][0], copy))
                    copy = self._containers[slot][0]
                values.append(copy)
                start += count
        function = self._build(values)
        return function if not live else functools.partial(_live, function, live)


def reads_changed(reads: Sequence[tuple[str, Any, tuple[Any, ...], Any]]) -> bool:
    """Whether any of ``reads`` (``(name, root, path, value at the step)``) changed since."""
    return any(_changed(then, follow(root, path)) for _, root, path, then in reads)


@contextlib.contextmanager
def replaying_reads(reads: Sequence[tuple[str, Any, tuple[Any, ...], Any]]) -> Iterator[None]:
    """Each of ``reads`` (what a closure or an update rule read at its step,
    ``(name, root, path, value then)``) that changed since set back to its value at the step (a
    number, an entry of a list or dict, the tensor an attribute or a global named then), and the
    value it has now put back on exit. A tensor changed in place, or a value held where it
    cannot be set (a tuple's entry), is left as it is."""
    swaps: list[tuple[Any, Any, Any]] = []
    try:
        for _, root, path, then in reads:
            now = follow(root, path)
            slot = _settable(root, path, then) if _changed(then, now) else None
            if slot is not None:
                container, key = slot
                container[key] = then.tensor if type(then) is TensorRead else then
                swaps.append((container, key, now))
        yield
    finally:
        for container, key, now in reversed(swaps):
            if now is MISSING:
                if isinstance(container, dict):
                    container.pop(key, None)
            else:
                container[key] = now


def _rewritten(value: Any, leaves: list[Any], spec: Any) -> bool:
    """Whether a list or dict no longer holds ``leaves`` (by identity) in the structure ``spec``."""
    now, structure = pytree.tree_flatten(value)
    return structure != spec or any(a is not b for a, b in zip(now, leaves))


def _live(function: Callable[..., Any], containers: list[tuple[Any, Any]], *args: Any, **kwargs: Any) -> Any:
    """``function`` called with each list or dict of ``containers`` (``(the object, what it held at
    the step)``) holding what it held at the step, set back to what it holds now afterwards."""
    saved = [(value, list(value) if isinstance(value, list) else dict(value)) for value, _ in containers]
    try:
        for value, then in containers:
            _hold(value, then)
        return function(*args, **kwargs)
    finally:
        for value, now in saved:
            _hold(value, now)


def _hold(container: Any, contents: Any) -> None:
    container.clear()
    (container.extend if isinstance(container, list) else container.update)(contents)


def _changed(then: Any, now: Any) -> bool:
    """Whether a read's value ``now`` is not what the step read (``then``: the value, or a
    :class:`~metagrad.reads.TensorRead`)."""
    if type(then) is TensorRead:
        return not then.same(now)
    return _value_key(now) != _value_key(then)


def _settable(root: Any, path: tuple[Any, ...], then: Any) -> Optional[tuple[Any, Any]]:
    """Where a read's value at the step can be set back (:func:`~metagrad.reads.locate`), or
    ``None``: not there, or a tensor changed in place, whose values at the step are gone."""
    if type(then) is TensorRead and then.tensor._version != then.version:
        return None
    return locate(root, path)


def _described(name: str, then: Any, now: Any) -> tuple[str, Any, Any]:
    """``(name, value at the step, value now)`` for an error; tensors described in words."""
    if type(then) is not TensorRead:
        return name, then, now
    what = ("the same tensor, changed in place" if now is then.tensor else
            f"another tensor of shape {tuple(now.shape)}" if isinstance(now, torch.Tensor) else repr(now))
    return name, Described(f"a tensor of shape {tuple(then.tensor.shape)}"), Described(what)


def _read_meta(reads: list[tuple[str, Any, tuple[Any, ...], Any]]) -> tuple[tuple[int, ...], ...]:
    """The tensors that require grad among ``reads`` (:attr:`Frozen.reads`), by identity, as the
    end of a key: ``()`` for none (most closures: the key is then the structure's)."""
    found = tuple(id(then.tensor) for *_, then in reads if type(then) is TensorRead and then.tensor.requires_grad)
    return (found,) if found else ()


def specs_key(specs: list[Any]) -> list[Any]:
    return [None if spec is None else (str(spec[0]), spec[1]) for spec in specs]


def _value_key(value: Any) -> tuple[Any, ...]:
    # Numbers and strings compare by value (a loop index captured as an int); a module without
    # state (a loss module, nn.MSELoss()) by its type and settings, so that a new one per task
    # finds what was found for the last; every other object by identity, which the frozen
    # closure keeps alive.
    if isinstance(value, (bool, int, float, complex, str, bytes, type(None))):
        return ("value", type(value), value)
    if isinstance(value, torch.nn.Module):
        settings = _settings(value)
        if settings is not None:
            return ("module", type(value), settings)
    return ("object", id(value))


def _settings(module: torch.nn.Module) -> Optional[tuple[Any, ...]]:
    """The key of a module with no parameters, buffers, submodules or hooks of its own (a loss
    module; CrossEntropyLoss's ``weight=None`` is an empty buffer slot): its attributes, each
    registry or other container holding only ``None`` (or nothing) by its keys, the rest as
    :func:`_value_key` keys them. ``None`` for a module with state. One pass, in the order the
    attributes were set (two modules whose equal settings were set in another order get two
    keys: a cache miss, never a wrong hit); it runs at every inner step."""
    settings: list[tuple[str, Any]] = []
    for name, value in vars(module).items():
        kind = type(value)
        if kind in _PLAIN:  # (the common case first: a number, a string, an empty registry)
            settings.append((name, ("value", kind, value)))
        elif (kind is dict or kind is OrderedDict or kind is set) and not value:
            settings.append((name, ("empty", ())))
        elif isinstance(value, (dict, set)):
            held = value.values() if isinstance(value, dict) else value
            if any(v is not None for v in held):
                if name in _MODULE_REGISTRIES:
                    return None
                settings.append((name, ("object", id(value))))
            else:
                settings.append((name, ("empty", tuple(map(str, value)))))
        else:
            settings.append((name, _value_key(value)))
    return tuple(settings)


_PLAIN = frozenset((bool, int, float, complex, str, bytes, type(None)))

#: The registries of a module's state; a module with all of them empty is keyed by its settings
#: (:func:`_settings`).
_MODULE_REGISTRIES = ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
                      "_backward_hooks", "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                      "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_load_state_dict_pre_hooks")


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

        identity: tuple[Any, ...] = ("partial", inner.key if isinstance(inner, Frozen) else id(inner), count,
                                     tuple(keywords))
        code = getattr(inner.source if isinstance(inner, Frozen) else inner, "__code__", None)
        frozen = Frozen(build_partial, values, names, identity, closure,
                        attributes=frozenset() if code is None else read_names(code),
                        bound=getattr(closure.func, "__self__", None) if isinstance(closure.func, types.MethodType) else None)
        frozen.inner = inner if isinstance(inner, Frozen) else None
        frozen._find = lambda: merged(frozen.inner.generators() if frozen.inner is not None else
                                      generators_reached([("closure", inner)]), generators_reached(zip(names, values)))
        return frozen
    bound = getattr(closure, "__self__", None) if isinstance(closure, types.MethodType) else None
    function = closure.__func__ if isinstance(closure, types.MethodType) else closure
    if not isinstance(function, types.FunctionType):  # a callable object: kept as it is
        call = getattr(type(closure), "__call__", None)
        code = getattr(call, "__code__", None)
        frozen = Frozen(lambda values: closure, [], [], ("object", id(closure)), closure,
                        attributes=frozenset() if code is None else read_names(code), bound=closure)
        frozen._find = lambda: generators_reached([("closure", closure)])
        return frozen
    code = function.__code__
    cells = function.__closure__ or ()
    cell_values = [cell_contents(cell, _EMPTY) for cell in cells]
    namespace = function.__globals__
    globals_read = [name for name in loaded_globals(code) if name in namespace]
    defaults = list(function.__defaults__ or ())
    values = [*cell_values, *(namespace[name] for name in globals_read), *defaults]
    names = [*code.co_freevars, *globals_read, *(f"default {i}" for i in range(len(defaults)))]
    cuts = (len(cell_values), len(cell_values) + len(globals_read))
    base = {"__builtins__": namespace.get("__builtins__"), "__name__": namespace.get("__name__")}

    def build(values: list[Any]) -> Callable[..., Any]:
        frozen_cells = tuple(types.CellType() if v is _EMPTY else types.CellType(v)
                             for v in values[:cuts[0]])
        frozen_globals = {**base, **dict(zip(globals_read, values[cuts[0]:cuts[1]]))}
        copy = types.FunctionType(code, frozen_globals, function.__name__,
                                  tuple(values[cuts[1]:]) or None, frozen_cells)
        copy.__kwdefaults__ = function.__kwdefaults__
        return copy if bound is None else types.MethodType(copy, bound)

    identity = ("function", code, id(namespace), tuple(globals_read), id(bound))
    frozen = Frozen(build, values, names, identity, closure, attributes=read_names(code), bound=bound)
    frozen._find = lambda: generators_reached([*zip(names, values), ("self", bound)], read_names(code))
    return frozen


class _Empty:
    def __repr__(self) -> str:
        return "<empty cell>"


_EMPTY = _Empty()
