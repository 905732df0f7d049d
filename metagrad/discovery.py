"""Finding the meta-parameters η, and what on an inner step's graph cannot be differentiated twice.

MATH.md, "Meta-parameters other than θ": η is every tensor that requires grad, other than the
fast weights, that an inner step depends on. It is found from the graphs autograd builds, with
no declaration: a closure's inner loss (once per closure key), and an update rule's step (a
step size that requires grad, looked at again where a step updates fast weights the rule has
not updated before). :class:`MetaParameters` keeps what was found for one inner loop, with
each η leaf's ``.grad`` as it was (restored if the block raises).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import weakref

import torch
from torch.utils import _pytree as pytree

from .frozen import Frozen
from .reads import TensorRead, cell_contents
from .update_rule import Params

__all__ = ["MetaParameters", "MetaGrads", "add_meta", "graph_inputs", "reaches", "backward_once", "once_differentiable", "register_block_outputs",
           "step_size_names", "closure_shape"]

#: One entry per meta-parameter η (:attr:`MetaParameters.tensors`): its gradient, or ``None`` for zero.
MetaGrads = list[Optional[torch.Tensor]]


@dataclass
class Seen:
    """What the first step of a closure (by :attr:`~metagrad.frozen.Frozen.key`) showed; its
    later steps take their gradient by a compiled call (``compile=True``) unless ``once``
    or ``random``."""

    #: Its loss came through a node whose backward cannot be differentiated again (a
    #: ``torch.compile``'d function, an ``@once_differentiable`` autograd.Function): which one.
    once: Optional[str]
    #: The fast weights its loss uses.
    used: tuple[str, ...]
    #: A step of it drew random numbers (its replay must be eager).
    random: bool = False
    #: Its loss's graph goes through another block's node (a nested block), whose backward runs
    #: once: nothing but the step's own backward goes through it.
    nested: bool = False
    #: Its loss reaches a leaf the closure made itself (:func:`made_leaves`), which ``torch.func``
    #: cannot make: its steps are taken and rebuilt eagerly, one at a time.
    made: bool = False
    #: Its loss reads each η only where :meth:`MetaParameters.explicit` places it (``None``: not
    #: looked at yet; :meth:`metagrad.products.Products.explicit`).
    sole: Optional[bool] = None


class MetaParameters:
    """The η of one inner loop, as found so far.

    Args:
        module: the user's module (its parameters name what is found).
        adapted: the names of the fast weights (the parameters not adapted can be η).
    """

    def __init__(self, module: torch.nn.Module, adapted: Sequence[str]) -> None:
        #: The meta-parameters, in the order found, with a description of each.
        self.tensors: list[torch.Tensor] = []
        self.names: list[str] = []
        #: Which η come from the update rule (step sizes): their part of B_k needs no second
        #: derivative (MATH.md, "Meta-parameters other than θ").
        self.rule: set[int] = set()
        #: Which η an update rule's step reaches (those of :attr:`rule`, and an η found first in a
        #: closure that a rule's step size is computed from, ``lr = log_lr.exp()``).
        self.rule_reached: set[int] = set()
        #: Each η leaf with its ``.grad`` when it was found (restored if the block raises).
        self.saved_grads: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = []
        #: Per closure key: what its first step showed (the graph is looked at once).
        self.closures: dict[Any, Seen] = {}
        self._index: dict[int, int] = {}
        self._saved_ids: set[int] = set()
        self._module = module
        self._names_by_id: Optional[dict[int, str]] = None  # looked up when first needed
        self._adapted = set(adapted)
        #: Per update rule (by id, the rule kept): whether its update reaches η of its own, and
        #: the fast weights it has updated so far (a step that updates another one looks again:
        #: its step size may be a tensor that requires grad where the others' are not).
        self._rules: dict[int, tuple[Any, bool, frozenset[str]]] = {}
        #: Per closure shape of a differentiable step: the node that cannot be differentiated twice.
        self._differentiable_seen: dict[tuple[Any, ...], Optional[str]] = {}
        #: The closure shapes whose loss may read the fast weights' history (:meth:`history_to_check`).
        self._history: set[tuple[Any, ...]] = set()

    def read(self, tensors: Optional[Sequence[torch.Tensor]] = None) -> list[torch.Tensor]:
        """The η a loss can read, for their gradient (:class:`~metagrad.replay.EtaProbes`): all but the
        update rule's (a step size is none of the loss's inputs), whose place holds an empty tensor;
        ``tensors``: the η as a rebuild holds them (:meth:`~metagrad.products.Products.partial_eta`)."""
        return [_NONE if i in self.rule else t for i, t in enumerate(self.tensors if tensors is None else tensors)]

    def leaves(self) -> bool:
        """Whether every η found so far is a leaf tensor (none is computed from another)."""
        return all(t.grad_fn is None for t in self.tensors)

    def _param_names(self) -> dict[int, str]:
        """The module's parameters' names, by the parameter's id."""
        if self._names_by_id is None:
            self._names_by_id = {id(p): n for n, p in self._module.named_parameters()}
        return self._names_by_id

    # --------------------------------------------------------------------- closures
    def discover(self, loss: torch.Tensor, params: Params, closure: Optional[Frozen],
                 met: Optional[list[bool]] = None, again: Optional[Callable[[], torch.Tensor]] = None
                 ) -> tuple[Optional[str], bool]:
        """Add the η the step's loss depends on; return the node on the loss's graph whose
        backward cannot be differentiated again (``None``: none), and whether the graph reaches
        a leaf the closure made itself (not η: :func:`made_leaves`, from ``again``, the loss
        computed once more); ``met`` gets an entry where the graph goes through another block's
        node (:func:`graph_inputs`).

        The rule: η is every tensor that requires grad, other than the fast weights, that the
        loss's graph reaches. A tensor the closure captures (a cell, a global, a default) is
        taken as it is, even when it is itself computed (``w = hypernet(z)``: the gradient then
        reaches ``hypernet`` through ``w``'s own graph); anything else is found as the leaf the
        graph ends at (a module parameter not adapted, a parameter of a module the closure
        calls). The caller looks at the graph once per closure key (its code, and the objects
        and tensor shapes it captures, tensors that require grad by identity).
        """
        names = dict(self._param_names())
        stop: dict[int, list[torch.Tensor]] = {}
        if closure is not None:
            for slot, tensor in closure.tensors:
                names.setdefault(id(tensor), f"{closure.names[slot]} (captured by the closure)")
                if tensor.requires_grad and tensor.grad_fn is not None:
                    stop.setdefault(id(tensor.grad_fn), []).append(tensor)
            for name, *_, then in closure.reads:  # (a tensor read through an object: found as a leaf)
                if type(then) is TensorRead and then.tensor.is_leaf:
                    names.setdefault(id(then.tensor), f"{name} (read by the closure)")
            for name, module in closure.modules():  # (a learned loss the closure calls)
                for suffix, parameter in module.named_parameters():
                    names.setdefault(id(parameter), f"{name}.{suffix} (in a module the closure calls)")
        for t in params.values():  # fast weights that are themselves computed (adapters)
            if t.grad_fn is not None:
                stop.setdefault(id(t.grad_fn), [])
        skip = {id(t) for t in params.values()}
        found, once = graph_inputs([loss], skip, stop, blocks=True, met=met)
        unknown = [t for t in found if t.is_leaf and id(t) not in names]  # no parameter, nothing captured
        # (not through another block: computing it again would run that block again)
        made = made_leaves(unknown, again, skip, stop) if unknown and again is not None and not met else set()
        self.add([t for t in found if id(t) not in made], rule=False, names=names)
        return once, bool(made)

    def first_step(self, loss: torch.Tensor, params: Params, closure: Optional[Frozen],
                   used: Sequence[str], again: Optional[Callable[[], torch.Tensor]] = None) -> Seen:
        """What a closure's first step in this block shows (:class:`Seen`): the η its loss
        reaches, added (:meth:`discover`; ``again``: the loss computed once more, to tell a leaf
        the closure makes from one it reads), the node that cannot be differentiated twice, and
        the fast weights ``used``; kept under the closure's key, so that its later steps look no
        further (a step taken from a loss tensor, ``closure`` ``None``, is looked at each time)."""
        met: list[bool] = []
        once, made = self.discover(loss, params, closure, met, again)
        seen = Seen(once=once, used=tuple(used), nested=bool(met), made=made)
        if closure is not None:
            self.closures[closure.key] = seen
        return seen

    def differentiable_step(self, loss: torch.Tensor, inputs: Params, rule: Any,
                            shape: Optional[tuple[Any, ...]] = None) -> Optional[str]:
        """For a step whose graph autograd differentiates itself (Full): keep the ``.grad`` of
        what the step's own graph reaches (not behind the fast weights: that is the earlier
        steps'), and of the rule's tensors that require grad; return the node that cannot be
        differentiated twice, or ``None``. A step of a closure ``shape`` seen before (its code
        and the tensors it captures) finds what that one found, and is not searched again."""
        if shape is not None and shape in self._differentiable_seen:
            return self._differentiable_seen[shape]
        stop: dict[int, list[torch.Tensor]] = {id(t.grad_fn): [] for t in inputs.values()
                                               if t.grad_fn is not None}
        found, once = graph_inputs([loss], {id(t) for t in inputs.values()}, stop)
        attributes = getattr(rule, "__dict__", {})
        self.remember_grads(found + [t for t in pytree.tree_leaves(attributes)
                                     if isinstance(t, torch.Tensor) and t.requires_grad])
        if shape is not None:
            self._differentiable_seen[shape] = once
            if found and not backward_once(loss):  # (a closure with a block inside is not run twice)
                self._history.add(shape)
        return once

    def history_to_check(self, closure: Callable[..., Any]) -> bool:
        """Whether a differentiable step of ``closure`` is to be checked for a loss that depends
        on the fast weights' history (:func:`metagrad.trajectory._loss_at`): once per closure
        shape (:func:`closure_shape`), where its first step reached tensors that require grad
        other than the fast weights."""
        if not self._history:  # (the common case: nothing to check, no shape to compute)
            return False
        shape = closure_shape(closure)
        if shape in self._history:
            self._history.discard(shape)
            return True
        return False

    # ------------------------------------------------------------------ update rules
    def rule_holds_eta(self, rule: Any, used: Sequence[str]) -> Optional[bool]:
        """Whether ``rule``'s update reaches η of its own, if known for every fast weight in
        ``used``; ``None``: not yet (a new rule, or a fast weight it has not updated before)."""
        seen = self._rules.get(id(rule))
        if seen is None or not seen[2].issuperset(used):
            return None
        return seen[1]

    def learn_rule(self, rule: Any, new_params: Params, used: Sequence[str]) -> bool:
        """Look at an update the rule just made (with grad enabled) for η of its own (a step
        size that requires grad), add them, and return whether the rule holds any."""
        found = any(t.requires_grad for t in new_params.values())
        if found:
            reached = graph_inputs(list(new_params.values()), set(), {}, blocks=True)[0]
            self.add(reached, rule=True, names=step_size_names(rule))
            self.rule_reached |= {self._index[id(t)] for t in reached}
        before = self._rules.get(id(rule), (rule, False, frozenset()))
        holds = found or before[1]
        self._rules[id(rule)] = (rule, holds, before[2] | frozenset(used))  # the rule kept: its id stays its own
        return holds

    def holds(self, rule: Any) -> bool:
        """Whether ``rule`` (seen before) holds η of its own."""
        return self._rules[id(rule)][1]

    # ----------------------------------------------------------------------- records
    def add(self, tensors: list[torch.Tensor], *, rule: bool, names: dict[int, str]) -> None:
        """Add the tensors not already η, with their descriptions (``names``, by id)."""
        for tensor in tensors:
            if id(tensor) in self._index:
                continue
            self._index[id(tensor)] = len(self.tensors)
            if rule:
                self.rule.add(len(self.tensors))
            self.tensors.append(tensor)
            self.remember_grads([tensor])
            default = f"a tensor of shape {tuple(tensor.shape)}" + (" (update rule)" if rule else "")
            self.names.append(names.get(id(tensor), default))

    def remember_grads(self, tensors: list[torch.Tensor]) -> None:
        """Keep the ``.grad`` of the leaves a backward through ``tensors`` writes (each tensor,
        or the leaves behind a computed one, such as a hypernetwork's parameters) as it is
        now, the first time each is seen: :attr:`saved_grads`, restored if the block raises."""
        for tensor in tensors:
            behind = [tensor] if tensor.is_leaf else graph_inputs([tensor], set(), {})[0]
            for leaf in behind:
                if id(leaf) not in self._saved_ids:
                    self._saved_ids.add(id(leaf))
                    self.saved_grads.append((leaf, None if leaf.grad is None else leaf.grad.clone()))

    def explicit(self, closure: Optional[Frozen]) -> Optional[dict[int, tuple[str, Any]]]:
        """Where each η sits for a rebuild under ``torch.func`` of a step of ``closure``: a slot
        of the frozen closure (``("slot", slot)``, the first that holds it), a module parameter
        not adapted (``("param", name)``), or the update rule (``("rule", None)``, whose part needs
        no rebuild). ``None`` if some η is elsewhere (reached through an object), or read by the
        loss and reached by a rule's step size too (``lr = log_lr.exp()``), which only autograd
        can follow. Whether the closure also reads one some other way is looked at by
        :meth:`metagrad.products.Products.explicit`."""
        if closure is None:
            return None
        slots: dict[int, Any] = {}
        for slot, t in closure.tensors:
            slots.setdefault(id(t), slot)
        where: dict[int, tuple[str, Any]] = {}
        for i, tensor in enumerate(self.tensors):
            name = self._param_names().get(id(tensor))
            if i in self.rule:
                where[i] = ("rule", None)
            elif i in self.rule_reached:  # found in the closure first: the loss and a rule's step both read it
                return None
            elif id(tensor) in slots:
                where[i] = ("slot", slots[id(tensor)])
            elif name is not None and name not in self._adapted:
                where[i] = ("param", name)
            else:
                return None
        return where

    def clear(self) -> None:
        """Forget the η (the trajectory was released); the saved ``.grad`` stay for a restore."""
        self.tensors = []


def made_leaves(unknown: list[torch.Tensor], again: Callable[[], torch.Tensor], skip: set[int],
                stop: dict[int, list[torch.Tensor]]) -> set[int]:
    """Which of the leaves ``unknown`` (reached by a step's loss, neither parameters nor
    captured) the closure made itself, by id: those the loss computed once more (``again``, at
    the same fast weights and generator states) does not reach. A leaf the closure makes at
    every call (``xi = x.clone().requires_grad_()``, for a derivative in the input) is no input
    of the inner loop (a backward through the unroll writes its ``.grad``, which nothing
    outside the closure holds), so it is not η; a tensor it reads (through an object, a
    module it calls) is reached again. Run for a closure's first step only, where such
    leaves are found."""
    reached = {id(t) for t in graph_inputs([again()], skip, stop, blocks=True)[0]}
    return {id(t) for t in unknown if id(t) not in reached}


def reaches(loss: torch.Tensor, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the graph of ``loss`` reaches any of ``tensors`` (leaves, or computed tensors
    whose history it does not look behind)."""
    stop = {id(t.grad_fn): [t] for t in tensors if t.grad_fn is not None}
    ids = {id(t) for t in tensors}
    return any(id(t) in ids for t in graph_inputs([loss], set(), stop)[0])


def add_meta(total: MetaGrads, more: Sequence[Optional[torch.Tensor]]) -> MetaGrads:
    """Entrywise sum of two η-gradient lists (``None`` is zero; a shorter list is padded)."""
    size = max(len(total), len(more))
    out: MetaGrads = []
    for i in range(size):
        a = total[i] if i < len(total) else None
        b = more[i] if i < len(more) else None
        out.append(b if a is None else a if b is None else a + b)
    return out



def closure_shape(closure: Callable[..., Any]) -> Optional[tuple[Any, ...]]:
    """What a differentiable step's graph search is cached on (:meth:`MetaParameters.differentiable_step`):
    the closure's code and the tensors that require grad among the values it captures (a
    ``functools.partial``'s arguments, the tensors a bound method's or a callable object's object
    holds, and that object), by identity (a new lambda per step with the same code and captures
    shares it); ``None`` (search every step) for another callable."""
    values: list[Any] = []
    if isinstance(closure, functools.partial):
        values += [*closure.args, *closure.keywords.values()]
        closure = closure.func
    owner = None
    if not isinstance(closure, (types.FunctionType, types.MethodType)):  # a callable object
        call = getattr(type(closure), "__call__", None)
        closure = types.MethodType(call, closure) if isinstance(call, types.FunctionType) else closure
    if isinstance(closure, types.MethodType):  # the object, and the tensors it holds
        bound = closure.__self__
        owner, closure = id(bound), closure.__func__
        values += list(getattr(bound, "__dict__", {}).values())
    code = getattr(closure, "__code__", None)
    if code is None:
        return None
    values += [cell_contents(cell) for cell in getattr(closure, "__closure__", None) or ()]  # (None: not filled yet)
    values += list(getattr(closure, "__defaults__", None) or ())
    return (code, owner, tuple(id(v) for v in values if isinstance(v, torch.Tensor) and v.requires_grad))


def backward_once(loss: torch.Tensor) -> bool:
    """Whether ``loss``'s graph goes through a node whose backward may run only once: another
    block's (a nested block) or one that cannot be differentiated twice (a ``torch.compile``'d
    function, whose backward does not keep its graph either). Nothing but the step's own
    backward may go through it."""
    met: list[bool] = []
    once = graph_inputs([loss], set(), {}, blocks=True, met=met)[1]
    return bool(met) or once is not None


#: The place of an η whose gradient is not taken (:meth:`MetaParameters.read`).
_NONE = torch.empty(0)


def graph_inputs(roots: list[torch.Tensor], skip: set[int], stop: dict[int, list[torch.Tensor]],
                 *, blocks: bool = False, met: Optional[list[bool]] = None) -> tuple[list[torch.Tensor], Optional[str]]:
    """The tensors requiring grad that the graph of ``roots`` reaches: the leaves (not in
    ``skip``, by id) and, where a node is the ``grad_fn`` of tensors in ``stop`` (by the node's
    id), those tensors (none, for an empty list), without looking behind them; with
    ``blocks``, also another block's fast weights (:func:`register_block_outputs`), without
    looking behind them. Also the first node found whose backward cannot be differentiated
    again (:func:`once_differentiable`), described, or ``None``. ``met`` (with ``blocks``) gets an
    entry for each node of another block found."""
    seen: set[int] = set()
    found: list[torch.Tensor] = []
    once: Optional[str] = None
    stack: list[Optional[torch.autograd.graph.Node]] = [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in stop:
            found.extend(stop[id(node)])
            continue
        if blocks and id(node) in _BLOCK_OUTPUTS:
            if met is not None:
                met.append(True)
            outputs = [t for t in (ref() for ref in _BLOCK_OUTPUTS[id(node)]) if t is not None and t.grad_fn is node]
            if outputs:
                found.extend(t for t in outputs if id(t) not in skip)
                continue
        kind = type(node)
        if kind is _ACCUMULATE:  # a leaf
            variable = getattr(node, "variable")  # an AccumulateGrad node holds its leaf
            if id(variable) not in skip:
                found.append(variable)
            continue
        if once is None:
            if kind not in _ONCE_BY_TYPE:  # a property of the node's class: looked up once
                _ONCE_BY_TYPE[kind] = once_differentiable(node)
            once = _ONCE_BY_TYPE[kind]
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found, once


#: The fast weights a block hands out (the outputs of its autograd node), by the node's id, held
#: weakly: a block opened inside another's inner loss takes them as η as they are, as it takes a
#: captured tensor, without looking behind them (what is behind is the other block's backward).
_BLOCK_OUTPUTS: dict[int, list["weakref.ref[torch.Tensor]"]] = {}


def register_block_outputs(tensors: Sequence[torch.Tensor]) -> None:
    """Note ``tensors``, the outputs of one autograd node of a block (its fast weights), for
    :func:`graph_inputs`; entries whose tensors are gone are dropped now and then."""
    node = tensors[0].grad_fn if tensors else None
    if node is None:
        return
    if len(_BLOCK_OUTPUTS) >= 256:
        for key in [k for k, refs in _BLOCK_OUTPUTS.items() if all(ref() is None for ref in refs)]:
            del _BLOCK_OUTPUTS[key]
    _BLOCK_OUTPUTS[id(node)] = [weakref.ref(t) for t in tensors]


def _leaf_node_type() -> type:
    node = torch.zeros((), requires_grad=True).expand(1).grad_fn
    assert node is not None
    return type(node.next_functions[0][0])


#: The node class of a leaf (``AccumulateGrad``).
_ACCUMULATE = _leaf_node_type()
#: :func:`once_differentiable` per node class (each autograd.Function has a class of its own).
_ONCE_BY_TYPE: dict[type, Optional[str]] = {}


#: The fused kernels of ``scaled_dot_product_attention``, as their nodes' names spell them
#: (``ScaledDotProductFlashAttentionForCpuBackward0``, ``ScaledDotProductEfficientAttentionBackward0``, ...):
#: their backward has no derivative. Its math kernel is differentiable twice.
_FUSED_ATTENTION = ("Flash", "Efficient", "Cudnn", "Fused")


#: Nodes of torch's own ops whose backward has no derivative in torch ("the derivative for
#: '_cdist_backward' is not implemented"): the op, and a form of it that has one. These are the
#: differentiable ops torch's own operator database marks ``supports_gradgrad=False`` (torch
#: 2.13, sparse ones aside), and a cuDNN RNN.
_NO_SECOND_DERIVATIVE = {
    "CdistBackward0": ("torch.cdist", "torch.cdist(a, b, compute_mode='use_mm_for_euclid_dist'), or "
                       "((a[:, None] - b[None]) ** 2).sum(-1) and its square root"),
    "PdistBackward0": ("torch.nn.functional.pdist", "the distances written out, as for cdist"),
    "EmbeddingBagBackward0": ("torch.nn.functional.embedding_bag (nn.EmbeddingBag)",
                              "F.embedding(...) and its mean or sum over the bag"),
    "HardsigmoidBackward0": ("torch.nn.functional.hardsigmoid (nn.Hardsigmoid)", "F.relu6(x + 3) / 6"),
    "MultiMarginLossBackward0": ("torch.nn.functional.multi_margin_loss", "the margins written out with relu"),
    "MultilabelMarginLossBackward0": ("torch.nn.functional.multilabel_margin_loss",
                                      "the margins written out with relu"),
    "SegmentReduceBackward0": ("torch.segment_reduce", "Tensor.index_add over the segments"),
    "CtcLossBackward0": ("torch.nn.functional.ctc_loss (nn.CTCLoss)",
                         "the CTC forward recursion over the extended labels written with torch.logsumexp"),
    "CudnnRnnBackward0": ("a cuDNN RNN (nn.LSTM, nn.GRU, nn.RNN on a GPU)", "the RNN's forward inside "
                          "`with torch.backends.cudnn.flags(enabled=False):`, in the closure"),
}


#: The code of the wrapper ``torch.autograd.function.once_differentiable`` puts around a backward.
_ONCE_CODE = torch.autograd.function.once_differentiable(lambda ctx: None).__code__


def once_differentiable(node: Any) -> Optional[str]:
    """A description of ``node`` if its backward cannot be differentiated again, else ``None``:
    a ``torch.compile``'d function (aot_autograd has no double backward), a fused attention
    kernel (flash, memory-efficient, cuDNN), torch's own ops whose backward has no derivative (``torch.cdist``, ``embedding_bag``,
    ``hardsigmoid``, ...) or a wrong one (the fused weight norm, through v), an
    ``autograd.Function`` whose backward is marked ``@once_differentiable`` (as many custom
    CUDA ops are), and a node that raises when differentiated twice (``DelayedError``, which
    torch puts where a once-differentiable backward ran with ``create_graph=True``). A metagrad
    block's own node is not one: inside a step that is differentiated twice, a block builds its
    graph with autograd (:func:`metagrad.tape.second_order`), and elsewhere its node refuses ``create_graph``."""
    name = type(node).__name__
    if name.startswith("CompiledFunction"):
        return "a torch.compile'd function (aot_autograd's backward has no double backward)"
    if name in ("DelayedError", "DelayedErrorBackward"):
        return "a once-differentiable backward (torch raises when it is differentiated twice)"
    if "Attention" in name and any(kernel in name for kernel in _FUSED_ATTENTION):
        return (f"a fused attention kernel ({name}: scaled_dot_product_attention's, which "
                "nn.MultiheadAttention and nn.Transformer* layers call), whose backward has no derivative")
    if name in _NO_SECOND_DERIVATIVE:
        op, instead = _NO_SECOND_DERIVATIVE[name]
        return f"{op}, whose backward has no derivative in torch (one that has: {instead})"
    if name == "WeightNormInterfaceBackward0" and node.next_functions[0][0] is not None:
        # torch's double backward of its fused weight norm takes the saved norms ‖v‖ as constants:
        # second derivatives through v come out wrong, with no error (those through g alone are right).
        return ("torch's fused weight norm (torch._weight_norm, which nn.utils.parametrizations.weight_norm "
                "and nn.utils.weight_norm call), whose backward's derivative in torch is wrong: it "
                "treats the norm of v as a constant (one that is right: the weight written out, "
                "g * v / v.norm(dim=1, keepdim=True) for dim=0, e.g. as a parametrization of your own "
                "registered with torch.nn.utils.parametrize.register_parametrization)")
    function = getattr(node, "_forward_cls", None)
    if function is None:
        return None
    backward = getattr(function, "backward", None)
    if getattr(backward, "__code__", None) is _ONCE_CODE:
        return (f"the autograd.Function {function.__qualname__}, whose backward is marked "
                "@once_differentiable")
    if name == "CheckpointFunctionBackward":
        return "torch.utils.checkpoint with use_reentrant=True (its backward cannot be differentiated again)"
    return None


def step_size_names(rule: Any) -> dict[int, str]:
    """Descriptions of a rule's step-size tensors (``lr``, scalar or per parameter), and of the
    parameters of modules it holds (a learned optimizer's network), by id."""
    names = {id(p): f"{attribute}.{suffix} (update rule)" for attribute, value in vars(rule).items()
             if isinstance(value, torch.nn.Module) for suffix, p in value.named_parameters()
             } if hasattr(rule, "__dict__") else {}
    lr = getattr(rule, "lr", None)
    if isinstance(lr, torch.Tensor):
        names[id(lr)] = "lr (update rule)"
    elif isinstance(lr, dict):
        names.update({id(t): f"lr[{n!r}] (update rule)" for n, t in lr.items() if isinstance(t, torch.Tensor)})
    return names
