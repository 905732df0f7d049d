"""Peak memory of a block of code, on a GPU or on the CPU.

Usage::

    from metagrad.memory import peak_memory

    with peak_memory("cuda") as mem:
        ...  # e.g. one meta-iteration
    print(mem.peak_bytes, mem.method, mem.description)

What is measured depends on the device, and the two are not comparable:

- **CUDA** (``method="cuda_max_memory_allocated"``): the peak of
  ``torch.cuda.max_memory_allocated`` during the block minus
  ``torch.cuda.memory_allocated`` at entry, after
  ``torch.cuda.reset_peak_memory_stats``. This counts tensor memory handed out by
  PyTorch's caching allocator on that device, exactly, in bytes; it excludes the
  allocator's cached-but-free blocks, the CUDA context and workspace memory of
  libraries such as cuBLAS.
- **CPU, Linux** (``method="proc_vmhwm"``): the process's peak resident set size
  during the block minus its resident set size at entry. At entry the kernel's
  peak-RSS counter is reset by writing ``5`` to ``/proc/self/clear_refs``; at exit
  the peak is read from ``VmHWM`` in ``/proc/self/status``. This is process-level
  resident memory, not tensor memory: it includes every allocation of the process
  (Python objects, other threads, libraries), it is counted in whole pages, and it
  depends on the C allocator's caching. Memory freed before the block but kept by
  the allocator is reused without raising the RSS, so the result is the *new*
  resident memory the block needed. To make that closer to what the block itself
  allocates, the free heap memory is handed back to the OS at entry with glibc's
  ``malloc_trim(0)`` where it is available. Treat the number as an approximation,
  with a resolution of a few pages. glibc also keeps freed blocks in its heap and
  raises its mmap threshold as large blocks come and go, so over many large
  allocations the resident set can exceed the tensor memory alive at any moment
  (measured on a 2-core x86_64 CPU (AMD EPYC), torch 2.13.0: 1.26 GiB against 0.87 GiB for one batched backward at
  84×84). Starting
  the process with ``MALLOC_MMAP_THRESHOLD_=131072`` fixes the threshold: every block
  of 128 KiB or more is then mapped on allocation and returned on free, and the
  resident set follows tensor memory, at the cost of slower runs (page faults).
- **CPU, fallback** (``method="ru_maxrss"``): where ``/proc/self/clear_refs`` is
  not writable (another OS, a restricted container), the peak RSS counter cannot be
  reset. The result is then the growth of ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
  over the block: it is zero unless the block pushes the process above its
  lifetime peak, so it is a lower bound. ``description`` says so.

The device argument accepts anything ``torch.device`` accepts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from types import TracebackType
from collections.abc import Callable, Iterable
from typing import Any, Literal, Optional, Union

import torch

__all__ = ["PeakMemory", "peak_memory", "parse_bytes", "format_bytes", "saved_bytes"]

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"

_DESCRIPTIONS = {
    "cuda_max_memory_allocated": (
        "CUDA tensor memory: peak torch.cuda.max_memory_allocated during the block minus the "
        "memory allocated at entry (excludes the allocator's cache and the CUDA context)"
    ),
    "proc_vmhwm": (
        "CPU process memory: peak resident set size during the block (VmHWM, reset via "
        "/proc/self/clear_refs) minus the resident set size at entry; includes non-tensor "
        "allocations and allocator caching, page granularity, an approximation"
    ),
    "ru_maxrss": (
        "CPU process memory, fallback: growth of getrusage ru_maxrss (the lifetime peak RSS, "
        "which cannot be reset here) over the block; a lower bound, zero unless the block "
        "exceeds the process's earlier peak"
    ),
}


class PeakMemory:
    """Context manager measuring the peak memory a block needs above its entry level.

    After the block, :attr:`peak_bytes` holds the result, :attr:`method` names the
    measure used (``"cuda_max_memory_allocated"``, ``"proc_vmhwm"`` or
    ``"ru_maxrss"``) and :attr:`description` says in words what it counts. See the
    module docstring for what each measure includes.

    Args:
        device: the device whose memory is measured: ``"cpu"``, ``"cuda"``,
            ``"cuda:1"`` or a ``torch.device``. Any non-CUDA device is measured as
            CPU process memory.
        trim: on the CPU, hand free heap memory back to the OS at entry with glibc's
            ``malloc_trim(0)`` (if available), so that memory cached by the C
            allocator before the block does not hide the block's own allocations.
    """

    def __init__(self, device: Union[str, torch.device] = "cpu", *, trim: bool = True) -> None:
        self.device = torch.device(device)
        self.trim = trim
        self.peak_bytes: Optional[int] = None
        self.method: str = self._choose_method()
        self._entry_bytes = 0

    @property
    def description(self) -> str:
        """What :attr:`peak_bytes` counts, in words."""
        return _DESCRIPTIONS[self.method]

    @property
    def peak_mib(self) -> Optional[float]:
        """:attr:`peak_bytes` in MiB (``None`` before the block has ended)."""
        return None if self.peak_bytes is None else self.peak_bytes / 2**20

    def __enter__(self) -> "PeakMemory":
        self.peak_bytes = None
        if self.method == "cuda_max_memory_allocated":
            # Work queued before the block must not be attributed to it.
            torch.cuda.synchronize(self.device)
            self._entry_bytes = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method == "proc_vmhwm":
            if self.trim:
                _malloc_trim()
            with open(_CLEAR_REFS, "w") as handle:
                handle.write("5")  # resets VmHWM to the current VmRSS
            self._entry_bytes = _status_bytes("VmRSS")
        else:
            if self.trim:
                _malloc_trim()
            self._entry_bytes = _ru_maxrss_bytes()
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> Literal[False]:
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "proc_vmhwm":
            peak = _status_bytes("VmHWM")
        else:
            peak = _ru_maxrss_bytes()
        self.peak_bytes = max(0, peak - self._entry_bytes)
        return False

    def _choose_method(self) -> str:
        if self.device.type == "cuda":
            return "cuda_max_memory_allocated"
        return "proc_vmhwm" if _clear_refs_writable() else "ru_maxrss"

    def __repr__(self) -> str:
        return f"PeakMemory(device={str(self.device)!r}, method={self.method!r}, peak_bytes={self.peak_bytes})"


def peak_memory(device: Union[str, torch.device] = "cpu", *, trim: bool = True) -> PeakMemory:
    """Return a :class:`PeakMemory` context manager for ``device`` (see its docstring)."""
    return PeakMemory(device, trim=trim)


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Union[int, str], argument: str) -> int:
    """A memory size in bytes, from an integer or a string such as ``"2GiB"``, ``"500MB"``
    or ``"1.5 GiB"`` (KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024; the unit is
    case-insensitive). ``argument`` names the argument in the error message."""
    accepted = "an integer number of bytes > 0, or a string such as '2GiB', '500MB' or '1.5 GiB'"
    if isinstance(value, int) and not isinstance(value, bool):
        if value > 0:
            return value
        raise ValueError(f"{argument}: expected {accepted}, got {value!r}.")
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number):] or "b"
        try:
            size = float(number) * _UNITS[unit]
        except (KeyError, ValueError):
            size = -1.0
        if size >= 1:
            return int(size)
        raise ValueError(f"{argument}: expected {accepted}, got {value!r}. Units: B, KB, MB, "
                         "GB, TB, KiB, MiB, GiB, TiB.")
    raise TypeError(f"{argument}: expected {accepted}, got {type(value).__name__} {value!r}.")


def format_bytes(size: int) -> str:
    """``size`` bytes as :func:`parse_bytes` reads them back: in the largest binary unit that
    divides it (``"2GiB"``, ``"500MiB"``), else in bytes (``"1000B"``)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"


def _clear_refs_writable() -> bool:
    """Whether the kernel's peak-RSS counter can be reset (Linux with /proc, not restricted)."""
    try:
        with open(_CLEAR_REFS, "w") as handle:
            handle.write("5")
        with open(_STATUS) as handle:
            return "VmHWM:" in handle.read()
    except OSError:
        return False


def _status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in bytes."""
    with open(_STATUS) as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{_STATUS} has no {field} field.")


def _ru_maxrss_bytes() -> int:
    """The process's lifetime peak RSS from ``getrusage``, in bytes."""
    import resource  # POSIX only; imported here so the module loads everywhere

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _malloc_trim() -> None:
    """Return free heap memory to the OS (glibc only; silently does nothing elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def saved_bytes(run: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """The bytes of the tensors autograd saves for backward while ``run()`` builds its graph,
    each storage counted once, those of ``exclude`` (the inputs) not counted. The graph is freed
    on return: what ``run`` returns is dropped. A step's graph size
    (:meth:`metagrad.products.Products.graph_bytes`, :meth:`metagrad.pure.PureTrajectory.graph_bytes`)."""
    seen: dict[int, int] = {id(t.untyped_storage()): 0 for t in exclude}
    held: list[list[torch.Tensor]] = []

    def pack(t: torch.Tensor) -> list[torch.Tensor]:
        storage = t.untyped_storage()
        seen.setdefault(id(storage), storage.nbytes())
        held.append([t])
        return held[-1]

    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box[0]):
            run()
    finally:
        # A saved output held by the hook holds its own graph in a cycle that garbage
        # collection cannot see; emptying the boxes frees the graphs.
        for box in held:
            box.clear()
    return sum(seen.values())
