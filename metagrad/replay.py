"""Replaying an inner step exactly, and checking that it was (MATH.md, "Replaying a step").

Checkpointed, Truncated and Binomial call the user's closure again during backward, at a
stored iterate φ_m. They are right only if the rebuilt step is the step that was taken. Three
things make that true for the loops people write (:func:`~metagrad.frozen.freeze`,
:class:`~metagrad.generators.RandomState`, :attr:`Frozen.key`, re-exported here), and one makes it
checkable:

- **Frozen closures.** Each step's closure is called again with the values it captured bound
  as they were at the step (its cells, the globals it reads, its defaults, a partial's
  arguments).
- **Random numbers.** A closure that consumed random numbers is replayed with the generator
  states it started from: torch's, and Python's, NumPy's or its own generator objects where its
  code reaches them (:mod:`metagrad.generators`).
- **Batching.** Frozen closures that differ only in the tensors they capture still go into one
  vmapped call.
- **The check.** The stored next iterate is the truth: every rebuilt step's ``Φ_m(φ_m)`` is
  compared with the stored ``φ_{m+1}``, and its loss with the recorded loss
  (:func:`check_step`). A mismatch beyond rounding raises :class:`ReplayError`.
- **What the closure reads without capturing it.** A value it reads through a captured
  object, a method it calls on one, or a helper's globals (:mod:`metagrad.reads`) is set back to
  its value at the step for the rebuild (:meth:`Frozen.replaying`): it can change the
  meta-parameters' gradient without changing the step (where it scales a term whose η is
  zero), which the comparison of iterates cannot see. With meta-parameters, a rebuilt step
  that read one that could not be set back raises :class:`ReplayError` whatever its iterate
  (:func:`check_reads`).
- **The η side.** Where a changed value the code reading does not find enters a term whose η
  is small or zero, the step agrees and η's gradient does not. Each step taken eagerly keeps a
  fingerprint of its loss's gradient in η (:class:`EtaProbes`), and every rebuild must agree
  with it (:func:`check_norms`, :func:`check_eta`).

What a frozen closure cannot freeze, and a rebuild cannot set back, is what the check is for:
state read in a way :mod:`metagrad.reads` does not find (``getattr(obj, name)``, deeper than it
looks), an iterator (``next(it)`` inside the closure), a generator object passed explicitly,
Python state inside an update rule (torchopt's ``sgd(dampening>0)`` keeps a first-call flag), a
buffer a forward hook writes at every call (spectral norm's power iteration in training mode),
or a non-deterministic kernel. Where the error can see the cause it names it: a value the
closure reads through the objects it captures (:attr:`Frozen.reads`) that changed since the step
and could not be set back (a tensor changed in place), the
buffers a rebuild wrote to, another thread's draws, a step that ran compiled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional, Union

import torch

from .errors import ReplayError
from .frozen import Frozen, freeze
from .generators import RandomState
from .numerics import real_view

__all__ = ["ReplayError", "Frozen", "freeze", "RandomState", "check_step", "check_norms", "check_losses", "check_reads",
           "step_norms", "EtaProbes", "EtaRows", "check_eta", "largest_norms",
           "many_fingerprints", "EtaRecords"]


# ------------------------------------------------------------------------ the check
#: One parameter's rows: a tensor per row, or one tensor with a leading dimension over the rows.
Rows = Union[Sequence[torch.Tensor], torch.Tensor]


def step_norms(rebuilt: Sequence[Rows], stored: Sequence[Rows], start: Sequence[Rows]) -> torch.Tensor:
    """The norms the replay check compares, ``[3, rows]``: for each row (a step),
    ``‖Φ_m(φ_m) − φ_{m+1}‖``, ``‖φ_{m+1} − φ_m‖`` and ``‖φ_{m+1}‖`` over all its fast weights, in
    float32 or wider (a half-precision sum of squares overflows).

    ``rebuilt``, ``stored`` and ``start`` give one sequence per parameter (in one order) of one
    tensor per row, or for every parameter a tensor with a leading dimension over the rows (all
    three). The same body runs eagerly (:func:`check_step`) and inside a compiled sweep or
    product (:mod:`metagrad.compiled`), whose call returns the norms, so that the check reads a
    few numbers back instead of the rebuilt iterates."""
    count = len(rebuilt[0])
    if not isinstance(rebuilt[0], torch.Tensor):  # one stack per parameter, one concatenation
        table = torch.cat([real_view(torch.stack([*a, *b, *c])).reshape(3, count, -1)
                           for a, b, c in zip(rebuilt, stored, start)], 2)
        new, old, first = table.to(torch.promote_types(table.dtype, torch.float32)).unbind(0)
        return torch.stack([new - old, old - first, old]).norm(dim=2)
    # Rows along a first dimension (a compiled sweep's): sums of squares, no copy.
    total: Optional[torch.Tensor] = None
    for a, b, c in zip(rebuilt, stored, start):
        new, old, first = (real_view(torch.as_tensor(t)).reshape(count, -1) for t in (a, b, c))
        wide = torch.promote_types(new.dtype, torch.float32)
        part = torch.stack([(new - old).to(wide).pow(2).sum(1), (old - first).to(wide).pow(2).sum(1),
                            old.to(wide).pow(2).sum(1)])
        total = part if total is None else total + part
    assert total is not None
    return total.sqrt()


def check_step(steps: Sequence[int], rebuilt: Sequence[Sequence[torch.Tensor]],
               stored: Sequence[Sequence[torch.Tensor]], start: Sequence[Sequence[torch.Tensor]], rtol: float, *,
               losses: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
               closures: Optional[Sequence[Optional[Frozen]]] = None,
               raising: bool = True, recomputed_from: Optional[int] = None) -> list[int]:
    """Raise :class:`ReplayError` unless each rebuilt ``Φ_m(φ_m)`` equals the stored ``φ_{m+1}``.

    ``rebuilt``, ``stored`` and ``start`` give one sequence per parameter (in one order) of one
    tensor per step of ``steps`` (a tensor with a leading dimension over the steps will do);
    ``closures`` are the rows' frozen closures, for the error's hint. The test is
    :func:`check_norms`' on their :func:`step_norms`. With ``raising=False`` it returns the rows
    that fail instead of raising (an empty list when all pass)."""
    with torch.no_grad():
        norms = step_norms(rebuilt, stored, start)
    return check_norms(steps, norms, rtol, dtype=stored[0][0].dtype, losses=losses, closures=closures,
                       raising=raising, recomputed_from=recomputed_from)


class EtaProbes:
    """The η side of the replay check: a short fingerprint of ``∂ℓ_m/∂η``, the gradient of a
    step's loss in each meta-parameter, kept when the step is taken and compared with the
    rebuilt step's (:func:`check_norms`).

    The comparison of iterates sees a changed value only as far as it changes the step; one
    that scales a term whose η is small or zero (``η·c·R(φ)``) moves the step by ``η·Δc`` and
    ``B_m = ∂Φ_m/∂η`` by ``Δc``, so the step agrees to the tolerance while η's gradient is wrong.
    ``∂ℓ_m/∂η = c·R(φ_m)`` moves by ``Δc`` too, whatever η is. For each η the fingerprint is
    ``[‖g‖, ⟨r₁, g⟩, ⟨r₂, g⟩]`` with ``r₁, r₂`` fixed ±1 vectors of η's shape (drawn once per block
    from a generator of their own, not the user's), so a step keeps three numbers per η."""

    def __init__(self) -> None:
        self._probes: dict[int, torch.Tensor] = {}
        self._generator: Optional[torch.Generator] = None  # made when first needed (a block with η)

    def probes(self, index: int, flat: torch.Tensor) -> torch.Tensor:
        """The two ±1 vectors of η number ``index`` as the columns of a ``[numel, 2]`` matrix, in
        the dtype and on the device of ``flat`` (a gradient, ``[rows, numel]``)."""
        found = self._probes.get(index)
        if found is None or found.shape[0] != flat.shape[1] or found.dtype != flat.dtype or found.device != flat.device:
            if self._generator is None:
                self._generator = torch.Generator().manual_seed(0x6D67)
            signs = torch.randint(0, 2, (flat.shape[1], 2), generator=self._generator).mul_(2).sub_(1)
            found = self._probes[index] = signs.to(device=flat.device, dtype=flat.dtype)
        return found

    def fingerprint(self, grads: Sequence[Optional[torch.Tensor]], like: Sequence[torch.Tensor],
                    rows: Optional[int] = None) -> torch.Tensor:
        """``[n, 3]`` (or ``[rows, n, 3]`` for gradients with a leading dimension over ``rows``),
        float64: each η's ``[‖g‖, ⟨r₁, g⟩, ⟨r₂, g⟩]``, zeros for ``None`` (no gradient: an η the loss
        does not read); ``like``: the η."""
        count = 1 if rows is None else rows
        parts: list[Optional[torch.Tensor]] = []
        zero: Optional[torch.Tensor] = None
        for i, g in enumerate(grads):
            if g is None:
                parts.append(None)
                continue
            flat = real_view(g.detach()).reshape(count, -1)
            if flat.dtype not in (torch.float32, torch.float64):  # half precision: sums in float32
                flat = flat.float()
            parts.append(torch.cat([flat.norm(dim=1, keepdim=True), flat @ self.probes(i, flat)], 1))
            zero = parts[-1]
        if zero is None:  # no η has a gradient
            device = like[0].device if like else torch.device("cpu")
            return torch.zeros((count, len(grads), 3) if rows is not None else (len(grads), 3),
                               dtype=torch.float64, device=device)
        table = torch.stack([zero.new_zeros(count, 3) if p is None else p for p in parts], 1).double()
        return table if rows is not None else table[0]


def largest_norms(fingerprints: Iterable[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """The largest ‖∂ℓ/∂η‖ per η over steps' fingerprints (:class:`EtaProbes`; ``None`` for a
    step without one): the scale of their rounding in the check; ``None`` where none has one."""
    rows = [f[:, 0] for f in fingerprints if f is not None]
    width = max((len(r) for r in rows), default=0)
    if not rows:
        return None
    return torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows]).amax(0)


def many_fingerprints(probes: "EtaProbes", rows: Sequence[Optional[Sequence[Optional[torch.Tensor]]]],
                      like: Sequence[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """:meth:`EtaProbes.fingerprint` of many steps' ``∂ℓ/∂η`` (a list per step, ``None`` for a step
    without), in one call per η: each η's gradients stacked over the steps. Fingerprints taken a
    step at a time would make many small tensors, whose garbage collection costs more than the
    arithmetic."""
    present = [r for r in rows if r is not None]
    if not present:
        return [None] * len(rows)
    width = max(len(r) for r in present)
    stacked: list[Optional[torch.Tensor]] = []
    for i in range(width):
        column = [r[i] if i < len(r) else None for r in present]
        first = next((g for g in column if g is not None), None)
        stacked.append(None if first is None else torch.stack(
            [first.new_zeros(first.shape) if g is None else g.detach() for g in column]))
    table = iter(probes.fingerprint(stacked, like[:width], rows=len(present)).unbind(0))
    return [None if r is None else next(table)[:len(r)] for r in rows]


class EtaRecords:
    """One trajectory's fingerprints of ``∂ℓ/∂η`` (the η side of the replay check): the probes
    (:class:`EtaProbes`), the steps whose ``∂ℓ/∂η`` wait for their fingerprint, taken
    :attr:`BATCH` steps at a time (or sooner where they hold more than :attr:`NUMEL` numbers:
    :func:`many_fingerprints`), and the scale of their rounding. ``meta`` gives the η now."""

    BATCH, NUMEL = 16, 1 << 20

    def __init__(self, meta: Callable[[], Sequence[torch.Tensor]]) -> None:
        self.probes = EtaProbes()
        self._meta = meta
        self._pending: list[tuple[Any, list[Optional[torch.Tensor]]]] = []
        self._scale: tuple[int, Optional[torch.Tensor]] = (-1, None)

    def keep(self, step: Any, grads: Sequence[Optional[torch.Tensor]]) -> None:
        """Queue ``grads``, the ``∂ℓ/∂η`` of ``step`` (a :class:`~metagrad.step.StepRecord`), for
        its fingerprint (``step.eta_grad``)."""
        self._pending.append((step, [None if g is None else g.detach() for g in grads]))
        if len(self._pending) >= self.BATCH or sum(
                g.numel() for _, row in self._pending for g in row if g is not None) > self.NUMEL:
            self.flush()

    def flush(self) -> None:
        """Take the fingerprints queued; before anything reads one."""
        if self._pending:
            pending, self._pending = self._pending, []
            for (step, _), found in zip(pending, self.fingerprints([row for _, row in pending])):
                step.eta_grad = found
            self._scale = (-1, None)

    def fingerprints(self, rows: Sequence[Optional[Sequence[Optional[torch.Tensor]]]]) -> list[Optional[torch.Tensor]]:
        """:func:`many_fingerprints` of ``rows`` (rebuilt steps' ``∂ℓ/∂η``, ``None`` for none)."""
        return many_fingerprints(self.probes, rows, self._meta())

    def scale(self, steps: Iterable[Any], length: int) -> Optional[torch.Tensor]:
        """The largest ‖∂ℓ/∂η‖ the ``steps`` recorded, per η (:func:`largest_norms`), found once per
        ``length`` of the trajectory."""
        self.flush()
        if self._scale[0] != length:
            self._scale = (length, largest_norms(step.eta_grad for step in steps))
        return self._scale[1]


#: The η side of :func:`check_norms` for its rows: (rebuilt fingerprints, the recorded ones
#: (``None`` where a step kept none), the largest ‖∂ℓ/∂η‖ of the block per η: the scale of rounding).
EtaRows = tuple[Sequence[Optional[torch.Tensor]], Sequence[Optional[torch.Tensor]], Optional[torch.Tensor]]


def _eta_disagreeing(eta: EtaRows, rtol: float, eps: float, rows: Sequence[int]) -> dict[int, tuple[int, float, float]]:
    """The ``rows`` whose rebuilt fingerprint differs from the recorded one beyond rounding, each
    with the first η that does: ``row → (η index, ‖Δ‖ found, bound)``. The bound is
    ``rtol·max(‖g‖, ‖g′‖) + 16·ε·G`` for each of the three numbers, G the block's largest ‖∂ℓ/∂η‖
    for that η; rows where either fingerprint is missing agree."""
    rebuilt, recorded, scale = eta
    big = [] if scale is None else scale.double().tolist()
    pairs: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for row in rows:
        new_row, old_row = rebuilt[row], recorded[row]
        if new_row is not None and old_row is not None:
            pairs.append((row, new_row, old_row))
    if not pairs:
        return {}
    with torch.no_grad():  # one transfer for every row (the fingerprints may be on a GPU)
        values = iter(torch.cat([t.reshape(-1) for _, new, old in pairs for t in (new, old)]).tolist())
    found = {}
    for row, new_row, old_row in pairs:
        new = [[next(values) for _ in range(3)] for _ in range(len(new_row))]
        old = [[next(values) for _ in range(3)] for _ in range(len(old_row))]
        for i in range(min(len(new), len(old))):
            if not all(math.isfinite(v) for v in old[i]):
                continue  # the step taken was not finite (check_finite=False)
            bound = rtol * max(old[i][0], new[i][0]) + 16 * eps * max(big[i] if i < len(big) else 0.0, old[i][0])
            worst = max(abs(a - b) for a, b in zip(new[i], old[i]))
            if not worst <= bound:  # NaN fails too
                found[row] = (i, worst, bound)
                break
    return found


def check_norms(steps: Sequence[int], norms: torch.Tensor, rtol: float, *, dtype: torch.dtype,
                losses: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                closures: Optional[Sequence[Optional[Frozen]]] = None,
                raising: bool = True, recomputed_from: Optional[int] = None,
                meta: Sequence[str] = (), eta: Optional[EtaRows] = None) -> list[int]:
    """The replay check of the rows of ``steps`` from their :func:`step_norms` (``[3, rows]``)
    and ``losses`` (rebuilt, recorded). With meta-parameters (``meta``: their names), the rows'
    ``closures`` must also have read nothing that changed since their steps
    (:func:`check_reads`), and the gradient of its loss in each η must agree with the recorded
    one (``eta``: :class:`EtaProbes`' fingerprints). The test, for each row::

        ‖Φ_m(φ_m) − φ_{m+1}‖ ≤ rtol·‖φ_{m+1} − φ_m‖ + 16·ε·‖φ_{m+1}‖,
        |L_m(rebuilt) − L_m(recorded)| ≤ rtol·|L_m(recorded)| + 16·ε·|L_m(recorded)|

    with ε the machine epsilon of ``dtype``, the fast weights': the rebuilt step must agree with the step
    taken to a small fraction of the step's own length, and to rounding of the fast weights
    themselves. Raises :class:`ReplayError` for the first row that fails, or with
    ``raising=False`` returns the rows that fail. ``recomputed_from``: the rows' iterates φ_m
    were recomputed forward from the snapshot at this step
    (:meth:`metagrad.trajectory.Trajectory.restore`), so a mismatch may come from any step
    since, and the error says so.
    """
    eps = torch.finfo(dtype).eps
    with torch.no_grad():
        table = norms
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
    eta_failed: dict[int, tuple[int, float, float]] = {}
    if eta is not None:
        mismatched = {row for row, _ in failed}
        eta_failed = _eta_disagreeing(eta, rtol, eps, [row for row in range(len(mismatch)) if row not in mismatched])
        failed = sorted(failed + [(row, found[2]) for row, found in eta_failed.items()])
    if meta and closures is not None:  # the rows whose iterates agree (a mismatch's error names the reads)
        mismatched = {row for row, _ in failed}
        check_reads([m for row, m in enumerate(steps) if row not in mismatched],
                    [c for row, c in enumerate(closures) if row not in mismatched], meta_reason(meta))
    if not failed or not raising:
        return [row for row, _ in failed]
    row, bound = failed[0]
    which = steps[row]
    if row in eta_failed:
        index, worst, bound = eta_failed[row]
        name = meta[index] if index < len(meta) else f"meta-parameter {index}"
        found = _eta_found(name, worst, bound) + (
            f" (‖Φ(φ_{which}) − φ_{which + 1}‖ = {mismatch[row]:.3g} against a step of length {length[row]:.3g})")
        raise _mismatch(which, found + _since(recomputed_from, which),
                        None if closures is None else closures[row])
    found = (f"‖Φ(φ_{which}) − φ_{which + 1}‖ = {mismatch[row]:.3g} against a step of length "
             f"{length[row]:.3g} (tolerance {bound:.3g})")
    if losses is not None:
        found += f"; rebuilt loss {values[3][row]:.10g}, recorded {values[4][row]:.10g}"
    raise _mismatch(which, found + _since(recomputed_from, which), None if closures is None else closures[row])


def check_eta(steps: Sequence[int], eta: EtaRows, rtol: float, *, dtype: torch.dtype, meta: Sequence[str],
              closures: Sequence[Optional[Frozen]], recomputed_from: Optional[int] = None) -> None:
    """Raise :class:`ReplayError` for the first of ``steps`` whose rebuilt ``∂ℓ/∂η`` differs from
    the recorded one (the η side of :func:`check_norms`, for steps recomputed forward from a
    snapshot, whose iterates :func:`check_losses` and :func:`check_step` compare)."""
    found = _eta_disagreeing(eta, rtol, torch.finfo(dtype).eps, range(len(steps)))
    if found:
        row = min(found)
        index, worst, bound = found[row]
        name = meta[index] if index < len(meta) else f"meta-parameter {index}"
        raise _mismatch(steps[row], _eta_found(name, worst, bound) + _since(recomputed_from, steps[row]),
                        closures[row])


def _eta_found(name: str, worst: float, bound: float) -> str:
    return (f"the gradient of its loss in the meta-parameter {name} differs from the step taken's by "
            f"{worst:.3g} (tolerance {bound:.3g}) while the step itself agrees: a value the loss reads "
            f"changed since, in a term whose weight in the step is small or zero, so that only this "
            f"gradient shows it")


def check_reads(steps: Sequence[int], closures: Sequence[Optional[Frozen]], reason: str, *,
                captured: bool = False) -> None:
    """Raise :class:`ReplayError` for the first of ``steps`` whose rebuilt closure read values
    that changed since the step was taken and could not be set back for the rebuild
    (:meth:`Frozen.unreplayable`: a tensor changed in place, reached through an object it
    captures or a global of a function it calls; with ``captured``, before the rebuild, also a
    tensor it captures, :meth:`Frozen.modified`), where the comparison of iterates cannot vouch
    for the rebuild (``reason`` says why)."""
    for which, frozen in zip(steps, closures):
        if captured and frozen is not None and frozen.modified():
            raise ReplayError(
                f"inner step {which}, rebuilt during backward, captured tensors that were modified in place "
                f"since the step was taken: {frozen.modified()}. {reason} Give each step its own tensor (x = x * "
                "2, not x.mul_(2)), or leave it as it is until the backward has run.")
        changed = [] if frozen is None else frozen.unreplayable()
        if changed:
            listed = _listed(changed)
            raise ReplayError(
                f"inner step {which}, rebuilt during backward, read values that changed since the step was "
                f"taken and cannot be set back for the rebuild: {listed}. {reason} Give each step its own "
                "tensor (mask = mask * 2, not mask.mul_(2)), or capture it in the closure itself (mask = "
                "cfg.mask; meta.step(lambda f: loss(f) + wd * (mask * penalty(f)).sum())), or use "
                "estimator=mg.Full(), which without compile=True does not rebuild steps.")


def _listed(changed: Sequence[tuple[str, Any, Any]]) -> str:
    """``(name, value at the step, value now)`` reads, in words for an error."""
    return ", ".join(f"{name} was {then!r} at this step and is {now!r} now" for name, then, now in changed)


def meta_reason(meta: Sequence[str]) -> str:
    """Why :func:`check_reads` holds where a block has meta-parameters ``meta`` (their names)."""
    return (f"The block has meta-parameters ({', '.join(meta)}), whose gradient depends on such a value even "
            "where the rebuilt step agrees with the stored one (a term whose η is zero, such as a learned "
            "weight initialized at zero, leaves the step unchanged but not its gradient), so it is not "
            "computed with values other than the step's.")


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
    if frozen is None:  # every record without a frozen closure is a step taken from a given loss
        return ReplayError(text + (
            " The step was taken from a given loss (meta.step_from_loss, an adapter's step(loss)): its "
            "gradient's graph was kept, and the update rule, run on that gradient again for the product, "
            "gave another step. The rule keeps Python state that changes from call to call (such as "
            "torchopt.sgd(dampening>0)'s first-call flag). Use a rule whose state is all in the optimizer "
            "state it returns (dampening=0, or mg.optim.Momentum with dampening), or estimator=mg.Full(), "
            "which differentiates the steps as they were taken."))
    if causes:
        text += " " + " ".join(causes)
    else:
        hint = ""
        if frozen is not None and frozen.modified():
            hint = (f" The closure's captured tensors {frozen.modified()} were modified in place after "
                    "this step: give each step its own tensor instead (x = x + noise, not x.add_(noise)).")
        text += (
            " The closure or the update rule read something that changed since that step: state read "
            "through an object or a function the closure calls in a way metagrad does not follow "
            "(getattr(cfg, name), d.get(key), deeper than three calls), an iterator (next(it) inside "
            "the closure), data changed in place, random numbers from a generator metagrad does not "
            "replay (torch's, Python's random, NumPy's global one and the generator objects that the "
            "closure, the functions it calls, the model's forward or the update rule hold are replayed; "
            "not one made inside the closure, such as np.random.default_rng(), or reached through a "
            "container), a non-deterministic kernel, or Python state in the update rule (such as "
            f"torchopt.sgd(dampening>0)'s first-call flag).{hint} To fix it, compute each step's "
            "data outside the closure and capture it (xb, yb = next(it); meta.step(lambda f: "
            "loss(f(xb), yb))), or use estimator=mg.Full(), which without compile=True does not rebuild steps.")
    if frozen is not None and frozen.compiled is not None:
        what = ("its step product was computed by a function compiled with compile=True, traced "
                "from the closure once" if frozen.compiled == "product" else
                "its gradient was computed by a call compiled with compile=True")
        if frozen.unreplayable():  # named above, with the fix
            text += f" (Inner step {which} ran compiled: {what}; the same fix applies.)"
        else:
            text += (
                f" Inner step {which} ran compiled: {what}. Python values the closure reads are "
                "constants of a compiled function; metagrad compiles again when a number it reads "
                "through a captured object (cfg.temp), a method it calls on one, a helper's globals or "
                "a module's attributes changes, but a value read any other way (deeper than metagrad "
                "looks, a large container) stays as it was traced. Read such values "
                "into a local before meta.step (temp = cfg.temp; meta.step(lambda f: loss(f) * temp)) "
                "or hold them in a tensor, or pass compile=False.")
    elif not causes:
        text += (" MetaGradient(check_replay=<float>) sets the relative tolerance; check_replay=False "
                 "skips this check, and then nothing verifies the rebuilt steps.")
    return ReplayError(text)


def _causes(frozen: Frozen) -> list[str]:
    """What is known to differ between the step taken and its rebuild, each with its fix."""
    causes = []
    changed = frozen.unreplayable()
    if changed:
        listed = _listed(changed)
        causes.append(
            f"The closure reads values through an object it captures, which are not frozen with the "
            f"step: {listed}. Read each into a local before meta.step, so that each step keeps its "
            f"own (temp = cfg.temp; meta.step(lambda f: loss(f) * temp)), or use estimator=mg.Full(), "
            f"which without compile=True does not rebuild steps.")
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
            "of its own and capture them; or use estimator=mg.Full(), which without compile=True does not rebuild steps.")
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
                 "estimator=mg.Full(), which without compile=True does not rebuild steps.")
    return text


def refuse_twice(step: int, what: str, argument: str = "closure") -> None:
    """Raise :class:`ReplayError` for a step whose loss came through ``what``, a node whose
    backward cannot be differentiated again: the second derivatives the estimator needs there
    cannot be taken (torch raises, or drops them or takes them wrongly and the answer is silently
    wrong). ``what`` names the fix where it knows one (its wording picks the fix). ``argument``: what
    gave the loss (``"loss"`` for a step taken from a loss tensor, whose graph was kept)."""
    if "torch.compile" in what:
        fix = ("Pass the closure and the model uncompiled (for model = torch.compile(net), the module it "
               "wraps: model._orig_mod), and MetaGradient(compile=True) for compiled inner steps")
    elif "attention" in what:  # metagrad builds the steps it takes from a closure with the math kernel
        fix = ("Take the step from a closure (meta.step(closure), diffopt.step(closure=...)), whose graphs "
               "metagrad builds with attention's math kernel, or build the loss inside `with "
               "torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):`")
    elif "no derivative in torch" in what or "derivative in torch is wrong" in what:
        fix = "Compute it in the form named, which can be differentiated twice"
    elif "torch.func takes otherwise" in what:  # (meta_grad: every product is torch.func's)
        fix = ("Define the function without torch.jit.script, or write the inner loop in a MetaGradient "
               "block, whose steps autograd differentiates")
    else:
        fix = ("Give the function a backward that can itself be differentiated (drop "
               "@once_differentiable and write the backward with differentiable torch ops), or "
               "compute the loss without it")
    raise ReplayError(
        f"{argument}: the inner loss at step {step} comes through {what}, so the second derivatives "
        "this estimator needs through it cannot be taken (torch raises, or drops them and the "
        f"meta-gradient is silently wrong). {fix}, or use estimator=mg.FirstOrder(), "
        "which needs no second derivative."
    )
