"""``MetaGradient(compile=...)`` and ``meta_grad(compile=...)``: the argument as ``torch.compile``
receives it (:func:`compile_settings`), the defaults on each device (:func:`on_device`), and the
settings as part of a compiled function's cache key (:func:`settings_key`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

__all__ = ["MODES", "SETTINGS", "compile_settings", "on_device", "settings_key"]

#: ``torch.compile``'s modes (``torch._inductor.list_mode_options()``).
MODES = ("default", "lite", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
#: The ``torch.compile`` arguments ``MetaGradient(compile={...})`` passes on.
SETTINGS = ("mode", "options", "backend")


def compile_settings(value: Any) -> Optional[dict[str, Any]]:
    """``MetaGradient(compile=...)`` as ``torch.compile`` arguments, or ``None`` for no compiling:
    ``False`` (none), ``True`` (``{}``: torch.compile's defaults, with inductor's C++ wrapper
    on the CPU, :func:`on_device`), a mode string
    (``"reduce-overhead"``: CUDA graphs on a GPU; ``"max-autotune"`` …), or a mapping with
    some of ``mode``, ``options`` (inductor options) and ``backend``."""
    accepted = (f"True, False, a torch.compile mode ({', '.join(repr(m) for m in MODES)}), or a dict with "
                f"some of {', '.join(repr(k) for k in SETTINGS)}")
    if isinstance(value, bool):
        return {} if value else None
    if isinstance(value, str):
        if value not in MODES:
            raise ValueError(f"compile: unknown torch.compile mode {value!r}; expected {accepted}.")
        return {"mode": value}
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in SETTINGS]
        if unknown:
            raise ValueError(f"compile: unknown torch.compile argument(s) {unknown}; expected {accepted}.")
        settings = dict(value)
        if "mode" in settings and settings["mode"] not in MODES:
            raise ValueError(f"compile: unknown torch.compile mode {settings['mode']!r}; expected {accepted}.")
        if settings.get("mode") is not None and settings.get("options") is not None:
            raise ValueError("compile: give a mode or options, not both (torch.compile takes one of them); "
                             f"got {settings!r}.")
        if settings.get("options") is not None and not isinstance(settings["options"], Mapping):
            raise TypeError(f"compile: options must be a dict of inductor options, got "
                            f"{type(settings['options']).__name__}.")
        return settings
    raise TypeError(f"compile: expected {accepted}; got {type(value).__name__} {value!r}.")


def on_device(settings: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The ``torch.compile`` arguments used for tensors on ``device``: ``settings`` as given,
    except ``compile=True`` (torch.compile's defaults) on the CPU, which turns inductor's C++
    wrapper on (``options={"cpp_wrapper": True}``): the compiled code then calls its kernels
    from C++ instead of from a generated Python function, which on the small graphs of a
    meta-learning step is much of their time. Measured (``benchmarks/compiled.py``'s loop, one
    thread, 2-core AMD EPYC): 9–16% faster per call on the sinusoid, and a cold first call no
    slower. ``compile={"options": {}}`` keeps torch.compile's own defaults."""
    if not settings and device.type == "cpu":
        return {"options": {"cpp_wrapper": True}}
    return dict(settings)


def settings_key(settings: Mapping[str, Any]) -> tuple[Any, ...]:
    """The compile settings as part of a cache key (options by value, a backend by name or identity)."""
    backend = settings.get("backend")
    return (settings.get("mode"), repr(sorted((settings.get("options") or {}).items())),
            backend if isinstance(backend, (str, type(None))) else id(backend))
