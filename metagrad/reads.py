"""What a closure reads that freezing it does not keep (MATH.md, "Replaying a step").

A frozen closure (:mod:`metagrad.frozen`) holds the values it captures as they were at its step.
Some of what its code reads is not among them: numbers, small containers of numbers and tensors
reached through the attributes of a captured object (``cfg.temp``), through the methods it calls
on one (``self.penalty(f)`` reading ``self.scale``), or as globals of the functions it calls
(a helper reading ``REG_SCALE``). They are found here by reading the code's names
(:func:`attribute_reads`, :func:`indirect_reads`), kept with their values at the step, and
looked up again when the step is rebuilt (:func:`follow`): a compiled step product is keyed on
them, and the replay check names, or with meta-parameters refuses, the ones that changed.
"""

from __future__ import annotations

import dis
import functools
import sys
import sysconfig
import types
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import torch

__all__ = ["MAX_READS", "MISSING", "SCALARS", "Described", "TensorRead", "attribute_reads", "cell_contents", "follow",
           "global_names", "imported_modules", "indirect_reads", "library", "loaded_globals", "locate", "methods_called",
           "model_reads", "modules_reached", "read_names", "rule_reads"]


@functools.lru_cache(maxsize=1024)
def global_names(code: types.CodeType) -> tuple[str, ...]:
    """Every name the code, and code nested in it (comprehensions, inner functions), may read
    as a global. Attribute names are included too; they are looked up and skipped if absent."""
    names = dict.fromkeys(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(dict.fromkeys(global_names(const)))
    return tuple(names)


@functools.lru_cache(maxsize=1024)
def loaded_globals(code: types.CodeType) -> tuple[str, ...]:
    """The names the code, and code nested in it, loads as globals: not the attribute names its
    ``co_names`` also holds (``f.params`` beside a global ``params``), which a frozen closure must
    not capture (a tensor it captured by mistake would be taken for where it reads a
    meta-parameter)."""
    return tuple(dict.fromkeys(i.argval for i in _instructions(code) if i.opname in _GLOBAL_LOADS))


#: The instructions that read a global (``LOAD_NAME`` in code run at module level,
#: ``LOAD_FROM_DICT_OR_GLOBALS`` in a class body inside a function, Python ≥ 3.12).
_GLOBAL_LOADS = frozenset(("LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"))


@functools.lru_cache(maxsize=1024)
def read_names(code: types.CodeType) -> frozenset[str]:
    """:func:`global_names` less the attributes and globals the code (or code nested in it)
    assigns or deletes (``log.calls += 1``, ``global N; N += 1``): state the code changes
    itself, a counter or a log, which a rebuild changes again, is not a value it was given."""
    written = {i.argval for i in _instructions(code) if i.opname in _WRITES}
    return frozenset(global_names(code)) - written


@functools.lru_cache(maxsize=1024)
def imported_modules(code: types.CodeType) -> tuple[str, ...]:
    """The modules the code, and code nested in it, imports as it runs (``import numpy`` inside a
    function; ``from random import gauss``): what it reads as a global is not all it reaches."""
    return tuple(dict.fromkeys(i.argval for i in _instructions(code) if i.opname == "IMPORT_NAME"))


def _instructions(code: types.CodeType) -> Iterator[dis.Instruction]:
    """The instructions of ``code`` and of the code nested in it (comprehensions, inner functions)."""
    todo = [code]
    while todo:
        current = todo.pop()
        yield from dis.get_instructions(current)
        todo += [const for const in current.co_consts if isinstance(const, types.CodeType)]


#: The instructions that assign or delete an attribute or a global.
_WRITES = frozenset(("STORE_ATTR", "DELETE_ATTR", "STORE_GLOBAL", "DELETE_GLOBAL"))


#: At most this many attribute reads are kept per frozen closure, and objects are followed
#: this many attributes deep (``self.cfg.temp``).
MAX_READS = 32
_MAX_DEPTH = 3
#: Containers of numbers longer than this are not looked into.
_MAX_ITEMS = 16
SCALARS = (bool, int, float, complex, str, bytes, type(None))


def attribute_reads(roots: list[tuple[str, Any]], attributes: frozenset[str]
                     ) -> list[tuple[str, Any, tuple[Any, ...], Any]]:
    """The numbers and strings reachable from ``roots`` through attributes whose names the code
    reads (``attributes``): instance attributes (a module's submodules too), and the attributes of
    a captured class or Python module. Properties and other descriptors are not called."""
    reads: list[tuple[str, Any, tuple[Any, ...], Any]] = []
    seen: set[int] = set()

    def visit(name: str, root: Any, path: tuple[str, ...], value: Any, depth: int) -> None:
        if len(reads) >= MAX_READS or id(value) in seen:
            return
        fields = _fields(value)
        if fields is None:
            return
        seen.add(id(value))
        for attribute in attributes:
            if attribute not in fields:
                owner = _class_attribute(value, attribute)
                if owner is not None:  # a number the object's class holds (read through the object)
                    visit(f"{name}.{attribute}", owner, (), owner, depth)
                continue
            found = fields[attribute]
            if isinstance(found, SCALARS):
                reads.append((f"{name}.{attribute}", root, (*path, attribute), found))
                if len(reads) >= MAX_READS:
                    return
            elif isinstance(found, torch.Tensor):  # by identity and version (not frozen: shared)
                reads.append((f"{name}.{attribute}", root, (*path, attribute), TensorRead(found)))
                if len(reads) >= MAX_READS:
                    return
            elif type(found) in (list, tuple, dict) and len(found) <= _MAX_ITEMS:
                # A small container of numbers (an annealed coefficient in a list or dict): each.
                items = found.items() if type(found) is dict else enumerate(found)
                for key, item in items:
                    if isinstance(item, SCALARS) and len(reads) < MAX_READS:
                        reads.append((f"{name}.{attribute}[{key!r}]", root, (*path, attribute, _Item(key)), item))
            elif depth < _MAX_DEPTH and not isinstance(value, (type, types.ModuleType)):
                visit(f"{name}.{attribute}", root, (*path, attribute), found, depth + 1)

    for name, value in roots:
        visit(name, value, (), value, 1)
    return reads


def _class_attribute(value: Any, attribute: str) -> Optional[type]:
    """The class (outside library code) in whose ``__dict__`` an object that is not itself a
    class finds ``attribute`` as a number or a string, or ``None``."""
    if isinstance(value, (type, types.ModuleType, _Namespace)) or library(type(value)):
        return None
    key = (type(value), attribute)
    if key not in _OWNERS:
        if len(_OWNERS) >= 4096:
            _OWNERS.clear()
        _OWNERS[key] = next((klass for klass in type(value).__mro__ if attribute in klass.__dict__), None)
    owner = _OWNERS[key]
    if owner is None or library(owner) or not isinstance(owner.__dict__.get(attribute), SCALARS):
        return None
    return owner


#: The class in whose ``__dict__`` an object's class finds an attribute (or ``None``), by class and name.
_OWNERS: dict[Any, Optional[type]] = {}


def indirect_reads(roots: list[tuple[str, Any]], attributes: frozenset[str], room: int
                   ) -> list[tuple[str, Any, tuple[Any, ...], Any]]:
    """What the code reads a call away, which freezing does not keep: the attributes that the
    methods it calls on a captured object read from that object (``cfg.penalty(f)`` reading
    ``cfg.scale``; a captured module's ``forward``, a callable object's ``__call__``), and what a
    function it calls reads from its own globals (``REG_SCALE``, ``CFG.scale``) and from the
    values it captures, with the functions and objects those lead to in turn,
    :data:`_HELPER_DEPTH` calls deep. ``roots`` are the values the code holds, ``attributes``
    the names it reads. Library code (torch, metagrad, ...) is not looked into. At most
    ``room`` of them."""
    reads: list[tuple[str, Any, tuple[Any, ...], Any]] = []
    todo = [(name, value, attributes, 1) for name, value in roots]
    seen: set[Any] = set()
    while todo and len(reads) < room:
        name, value, names, depth = todo.pop()
        if depth > _HELPER_DEPTH or (id(value), names) in seen:
            continue
        seen.add((id(value), names))
        if type(value) is types.FunctionType:
            if library(value):
                continue
            code_names = read_names(value.__code__)
            held = [(cell, cell_contents(content)) for cell, content in zip(value.__code__.co_freevars, value.__closure__ or ())]
            namespace = value.__globals__
            reads += attribute_reads([(value.__module__ or "<globals>", _Namespace(namespace)), *held], code_names)
            todo += [(n, namespace[n], code_names, depth + 1) for n in code_names
                     if type(namespace.get(n)) is types.FunctionType]
            todo += [(n, v, code_names, depth + 1) for n, v in held if not isinstance(v, _LEAVES)]
        elif isinstance(value, types.ModuleType):  # a user's module: the functions named on it
            if not _library_module(value.__name__):
                todo += [(n, value.__dict__[n], names, depth + 1) for n in names
                         if type(value.__dict__.get(n)) is types.FunctionType]
        elif (not isinstance(value, _LEAVES + (type,)) and not library(type(value))
              and _fields(value) is not None):
            for method in methods_called(type(value), names):
                method_names = read_names(method.__code__)
                reads += attribute_reads([(name, value)], method_names)
                todo.append((f"{name}.{method.__name__}", method, method_names, depth))
                todo.append((name, value, method_names, depth + 1))  # the methods it calls on the object
    return reads[:room]


def rule_reads(rule: Any, memo: dict[Any, Any]) -> list[tuple[str, Any, tuple[Any, ...], Any]]:
    """What an update rule of the user's reads that its frozen copy at a step does not hold
    (:class:`metagrad.step.RuleFreezer` keeps its own attributes as they were): the globals its
    step and the functions it calls read (a scale a schedule sets, ``SCALE``), and the numbers of
    objects it holds (``self.cfg.scale``), with their values now (:func:`indirect_reads`).
    ``[]`` for a rule of library code (:mod:`metagrad.optim`'s). Where they are is found once per
    rule object in a block (``memo``, the block's); their values at every step."""
    if library(type(rule)):
        return []
    key = ("reads", id(rule))
    where = memo.get(key, (None, None))[1]  # (the rule is held with it: its id stays its own)
    if where is None:
        step = getattr(type(rule), "step", None)
        names = read_names(step.__code__) if type(step) is types.FunctionType else frozenset()
        found = indirect_reads([("inner_opt", rule)], names | {"step"}, MAX_READS)
        found = [read for read in found if not (read[1] is rule and len(read[2]) == 1)]  # (its own: frozen)
        memo[key] = (rule, [read[:3] for read in found])
        return found
    return [(name, root, path, _as_read(follow(root, path))) for name, root, path in where]


def model_reads(module: torch.nn.Module, memo: dict[Any, Any]) -> list[tuple[str, Any, tuple[Any, ...], Any]]:
    """What the forward of the module's own classes reads besides the fast weights, which a step's
    closure reaches through the model it is given rather than by capturing it: numbers of the
    modules (``self.temp``, annealed between steps) and the globals of their forward and the
    functions it calls (:func:`indirect_reads`), with their values now. Where they are is found
    once per block (``memo``, the block's); their values at every step. ``[]`` for a model of
    library modules only."""
    where = memo.get("model reads")
    if where is None:
        roots = [(name or "model", sub) for name, sub in module.named_modules() if not library(type(sub))]
        found = indirect_reads(roots, frozenset(), MAX_READS) if roots else []
        memo["model reads"] = [read[:3] for read in found]
        return found
    return [(name, root, path, _as_read(follow(root, path))) for name, root, path in where]


def _as_read(value: Any) -> Any:
    """A value read now as :func:`attribute_reads` keeps it (a tensor by identity and version)."""
    return TensorRead(value) if isinstance(value, torch.Tensor) else value


def modules_reached(roots: list[tuple[str, Any]]) -> list[tuple[str, torch.nn.Module]]:
    """The modules among ``roots`` (name, value) and among what the user's functions there hold
    in their cells and read as globals, :data:`_HELPER_DEPTH` calls deep, with the names they are
    held under (a learned loss that a helper the closure calls applies): for naming what
    discovery finds behind them."""
    found: list[tuple[str, torch.nn.Module]] = []
    todo = [(name, value, 1) for name, value in roots]
    seen: set[int] = set()
    while todo:
        name, value, depth = todo.pop()
        if id(value) in seen or depth > _HELPER_DEPTH + 1:
            continue
        seen.add(id(value))
        if isinstance(value, torch.nn.Module):
            found.append((name, value))
        elif type(value) is types.FunctionType and not library(value):
            code = value.__code__
            todo += [(n, cell_contents(c), depth + 1) for n, c in zip(code.co_freevars, value.__closure__ or ())]
            todo += [(n, value.__globals__[n], depth + 1) for n in loaded_globals(code) if n in value.__globals__]
    return found


def cell_contents(cell: Any, empty: Any = None) -> Any:
    """What a closure's cell holds, or ``empty`` for a cell not yet assigned."""
    try:
        return cell.cell_contents
    except ValueError:
        return empty


def methods_called(cls: Any, attributes: frozenset[str]) -> tuple[types.FunctionType, ...]:
    """:func:`_find_methods`, found once per class and names."""
    key = (cls, attributes)
    found = _METHODS.get(key)
    if found is None:
        if len(_METHODS) >= 1024:
            _METHODS.clear()
        found = _METHODS[key] = _find_methods(cls, attributes)
    return found


#: The methods :func:`_find_methods` found, per class and names read.
_METHODS: dict[Any, tuple[types.FunctionType, ...]] = {}


def _find_methods(cls: Any, attributes: frozenset[str]) -> tuple[types.FunctionType, ...]:
    """The methods of class ``cls``, outside library code, that the code may call on one of its
    objects: those it names (a property's getter too), and ``forward`` (a module) or
    ``__call__`` (another object)."""
    names = set(attributes) | {"forward" if issubclass(cls, torch.nn.Module) else "__call__"}
    found = []
    for name in sorted(names):
        for klass in cls.__mro__:
            if name in klass.__dict__:
                method = klass.__dict__[name]
                if isinstance(method, property):  # its getter reads the object like a method
                    method = method.fget
                if type(method) is types.FunctionType and not library(method):
                    found.append(method)
                break
    return tuple(found)


def library(function: Any) -> bool:
    """Whether a function or class is library code, not looked into: torch's, metagrad's, the
    standard library's or an installed package's (the user's own code lives elsewhere, an
    editable install of their package included)."""
    return _library_module(getattr(function, "__module__", None) or "")


@functools.lru_cache(maxsize=1024)
def _library_module(name: str) -> bool:
    if name.split(".")[0] in _LIBRARIES:
        return True
    path = getattr(sys.modules.get(name), "__file__", None)
    return path is not None and path.startswith(_LIBRARY_PATHS)


_LIBRARY_PATHS = tuple({sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")})


class _Namespace:
    """A function's globals, looked at as the attributes of an object (:func:`_fields`)."""

    __slots__ = ("namespace",)

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace


#: How many calls deep :func:`indirect_reads` follows helper functions, and the top-level
#: packages whose functions it does not look into.
_HELPER_DEPTH = 3
_LIBRARIES = frozenset(("torch", "metagrad", "numpy", "functools", "builtins", "typing", "math"))


#: Values :func:`attribute_reads` does not look into.
_LEAVES = (torch.Tensor, types.FunctionType, types.BuiltinFunctionType, *SCALARS)


def _fields(value: Any) -> Optional[Mapping[str, Any]]:
    """The attributes of ``value`` that :func:`attribute_reads` looks at, or ``None``."""
    if isinstance(value, _LEAVES):
        return None
    if type(value) is _Namespace:
        return value.namespace
    if isinstance(value, torch.nn.Module):
        return _ModuleFields(value)
    try:
        fields = getattr(value, "__dict__", None)
    except Exception:  # an object whose __getattr__ raises for what it does not have
        return None
    return fields if isinstance(fields, Mapping) else None


class _ModuleFields(Mapping):
    """A module's plain attributes, submodules, parameters and buffers (``self.temperature``,
    ``self.head``, ``self.mask``). Only the plain attributes can be set back
    (:func:`locate`): a parameter or buffer reassigned or changed in place since its step is
    named instead."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.held = (vars(module), module._modules, module._parameters, module._buffers)

    def __getitem__(self, name: str) -> Any:
        for mapping in self.held:
            if name in mapping:
                return mapping[name]
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        plain, modules, parameters, buffers = self.held
        return name in plain or name in modules or name in parameters or name in buffers

    def __iter__(self) -> Any:
        return iter({name: None for mapping in self.held for name in mapping})

    def __len__(self) -> int:
        return len(list(iter(self)))


class _Missing:
    def __repr__(self) -> str:
        return "<no such attribute>"


MISSING = _Missing()


def follow(root: Any, path: tuple[Any, ...]) -> Any:
    value = root
    for attribute in path:
        if type(attribute) is _Item:  # an entry of a list, tuple or dict
            try:
                value = value[attribute.key]
            except (LookupError, TypeError):
                return MISSING
            continue
        fields = _fields(value)
        if fields is None or attribute not in fields:
            return MISSING
        value = fields[attribute]
    return value


def locate(root: Any, path: tuple[Any, ...]) -> Optional[tuple[Any, Any]]:
    """Where the value at ``path`` from ``root`` is held, as ``(container, key)`` that
    ``container[key] = value`` sets: an object's ``__dict__``, a function's globals, a list or a
    dict; ``None`` where it cannot be set that way (a tuple's entry, a module's submodule or
    parameter, a path that no longer leads anywhere)."""
    holder = follow(root, path[:-1])
    last = path[-1]
    if type(last) is _Item:
        if type(holder) is list and not -len(holder) <= last.key < len(holder):
            return None  # the list shrank: no entry to set back
        return (holder, last.key) if type(holder) in (list, dict) else None
    if type(holder) is _Namespace:
        return holder.namespace, last
    if isinstance(holder, type) and last in holder.__dict__ and not library(holder):
        return _ClassAttributes(holder), last
    fields = None if isinstance(holder, _LEAVES) else getattr(holder, "__dict__", None)
    if type(fields) is not dict or (isinstance(holder, torch.nn.Module) and last not in fields):
        return None
    return fields, last


class _ClassAttributes:
    """A class's attributes, set as ``container[key] = value`` (:func:`locate`)."""

    __slots__ = ("cls",)

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self.cls, key, value)


class TensorRead:
    """A tensor read through an object or a helper's globals, as it was at the step."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.version = tensor, tensor._version

    def same(self, now: Any) -> bool:
        """Whether ``now`` holds what the step read: the same tensor, not changed in place since,
        or another one equal to it (the step's is kept, so that one is compared)."""
        if self.tensor._version != self.version:  # the step's tensor itself changed in place
            return False
        if now is self.tensor:
            return True
        return (isinstance(now, torch.Tensor) and now.shape == self.tensor.shape and now.dtype == self.tensor.dtype
                and now.device == self.tensor.device and bool(torch.equal(now, self.tensor)))


class Described:
    """A value shown in an error by a description (``repr`` is the description)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


class _Item:
    """A step of a read's path that is an entry of a container, not an attribute."""

    __slots__ = ("key",)

    def __init__(self, key: Any) -> None:
        self.key = key
