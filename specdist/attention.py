"""The attention backend of a transformer, chosen in one place for every path that runs a model.

specdist never brings its own attention kernels: it sets one of diffusers' registered backends
with ``ModelMixin.set_attention_backend`` (diffusers 0.42, ``models/attention_dispatch.py``).
:func:`apply_attention_backend` is called by :func:`specdist.loading.load_model` (the
single-process engine, ``specdist generate``/``bench``, and every distributed worker, which loads
its model through it) and by :func:`specdist.enable` for a user's own pipeline, so the same
name means the same kernel everywhere.

Names (``attention_backend``): ``native`` (PyTorch SDPA, diffusers' default), ``flash``
(flash-attn 2), ``flash_varlen`` (flash-attn 2 varlen: takes a key padding mask), ``flash3``
(flash-attn 3, diffusers' ``_flash_3``), ``sage`` / ``sage_varlen`` (SageAttention: INT8 QK,
*lossy*), ``xformers``, and ``auto``. What makes a backend unusable, checked before anything is
set (one clear line names the reason and what is usable here):

* the package (diffusers' own check, ``_check_attention_backend_requirements``: flash-attn ≥ 2.6.3,
  sageattention ≥ 2.1.1, xformers ≥ 0.0.29, FA3 from source);
* the device: every backend but ``native`` needs CUDA (flash-attn 2 and sage: compute capability
  ≥ 8.0, flash-attn 3 ≥ 9.0); flash and sage need bf16/fp16 weights;
* the model (its adapter's ``attention_mask`` fact): HunyuanVideo passes a key padding mask to
  every attention call, which ``flash``, ``flash3`` and ``sage`` refuse and which ``xformers``
  expands to a dense ``[batch, heads, tokens, tokens]`` bias (hundreds of GB at 720p), so
  HunyuanVideo takes ``flash_varlen``, ``sage_varlen`` or ``native``;
* models whose attention processors do not go through the dispatcher (DiT and PixArt:
  ``AttnProcessor2_0`` calls SDPA itself) run ``native`` only;
* context parallelism (``context_parallel=True``): diffusers' registry says which backends
  support it (``native``, ``flash``, ``sage``, not ``flash_varlen``/``flash3``/``xformers``);
  diffusers itself also refuses the pair in ``set_attention_backend``/``enable_parallelism``.

``auto`` takes the first usable of ``flash3, flash, xformers, native`` (masked models:
``flash_varlen, native``) — exact backends only; the lossy ``sage`` is used only when named. The
record it returns (``report.json`` → ``attention``) names what was set, how many attention
processors dispatch through it, and for ``auto`` why each better backend was skipped.

``set_attention_backend`` also sets diffusers' process-wide default backend (its own global), the
same value as the model's, so one process should run models on one backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: `import specdist` (configs, CLI) stays light
    import torch
    from torch import nn

ATTENTION_BACKENDS = ("auto", "native", "flash", "flash_varlen", "flash3", "sage", "sage_varlen", "xformers")
"""Allowed ``attention_backend`` values."""
_DIFFUSERS_NAME = {"flash3": "_flash_3"}
_NEEDS_CUDA = {"flash", "flash_varlen", "flash3", "sage", "sage_varlen", "xformers"}
_HALF_ONLY = {"flash", "flash_varlen", "flash3", "sage", "sage_varlen"}
_MIN_CAPABILITY = {"flash": (8, 0), "flash_varlen": (8, 0), "flash3": (9, 0), "sage": (8, 0), "sage_varlen": (8, 0)}
_NO_MASK = {"flash", "flash3", "sage"}
_DENSE_MASK = {"xformers"}
AUTO_ORDER = ("flash3", "flash", "xformers", "native")
AUTO_ORDER_MASKED = ("flash_varlen", "native")


def diffusers_name(backend: str) -> str:
    """diffusers' ``AttentionBackendName`` value of a specdist backend name."""
    return _DIFFUSERS_NAME.get(backend, backend)


def _processors(model: nn.Module) -> tuple[int, int]:
    """(attention processors that dispatch through diffusers' registry, ones that call SDPA themselves)."""
    dispatch = fixed = 0
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is None:
            continue
        if hasattr(processor, "_attention_backend"):
            dispatch += 1
        else:
            fixed += 1
    return dispatch, fixed


def unavailable(backend: str, model: nn.Module, adapter: Any, device: torch.device, dtype: torch.dtype,
                context_parallel: bool = False) -> str | None:
    """Why ``backend`` cannot run ``model`` (on ``device`` in ``dtype``) here, or ``None`` when it can."""
    import torch
    from diffusers.models.attention_dispatch import (AttentionBackendName, _AttentionBackendRegistry,
                                                     _check_attention_backend_requirements)

    if backend not in ATTENTION_BACKENDS or backend == "auto":
        return f"unknown backend (allowed: {', '.join(ATTENTION_BACKENDS)})"
    name = AttentionBackendName(diffusers_name(backend))
    dispatch, _ = _processors(model)
    if backend != "native" and dispatch == 0:
        return (f"{adapter.model_class}'s attention processors call SDPA themselves and do not go through "
                f"diffusers' attention dispatcher; only 'native' applies")
    masked = getattr(adapter, "attention_mask", False)
    if masked and backend in _NO_MASK:
        return (f"{adapter.model_class} passes an attention mask, which diffusers' {name.value!r} backend does not "
                f"take (use flash_varlen, sage_varlen or native)")
    if masked and backend in _DENSE_MASK:
        return (f"{adapter.model_class} passes an attention mask, which diffusers' xformers backend expands to a "
                f"dense [batch, heads, tokens, tokens] bias (use flash_varlen or native)")
    if context_parallel and not _AttentionBackendRegistry._is_context_parallel_available(name):
        return "does not support context parallelism in diffusers"
    try:
        _check_attention_backend_requirements(name)
    except RuntimeError as err:
        return str(err).strip().splitlines()[0].rstrip(".")
    if backend in _NEEDS_CUDA and device.type != "cuda":
        return f"needs a CUDA device (the model runs on {device.type})"
    if backend in _MIN_CAPABILITY and torch.cuda.get_device_capability(device) < _MIN_CAPABILITY[backend]:
        need = ".".join(map(str, _MIN_CAPABILITY[backend]))
        have = ".".join(map(str, torch.cuda.get_device_capability(device)))
        return f"needs compute capability >= {need} (this GPU: {have})"
    if backend in _HALF_ONLY and dtype not in (torch.bfloat16, torch.float16):
        return f"needs bfloat16 or float16 weights (the model is {str(dtype).removeprefix('torch.')}; set dtype)"
    return None


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers warns that attention backends are experimental on every call; silence that one call."""
    from diffusers.utils import logging as dlogging

    before = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(before)


def apply_attention_backend(model: nn.Module, adapter: Any, backend: str = "auto", *,
                            context_parallel: bool = False, key: str = "attention_backend") -> dict[str, Any]:
    """Set ``backend`` (or, for ``auto``, the best usable one) on ``model`` through diffusers'
    ``set_attention_backend``; returns what was set (see the module doc).

    Raises:
        ConfigError: the backend is unknown or cannot run here (one line naming ``key``, the reason
            and the usable backends).
    """
    from .sampling import model_device, model_dtype

    device, dtype = model_device(model), model_dtype(model)
    dispatch, fixed = _processors(model)
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"invalid value for '{key}': {backend!r} (allowed: one of {list(ATTENTION_BACKENDS)})")
    skipped: dict[str, str] = {}
    if backend == "auto" and dispatch == 0:  # nothing dispatches: SDPA in the model's own processors
        chosen = "native"
    elif backend == "auto":
        order = AUTO_ORDER_MASKED if getattr(adapter, "attention_mask", False) else AUTO_ORDER
        chosen = "native"
        for candidate in order:
            reason = unavailable(candidate, model, adapter, device, dtype, context_parallel)
            if reason is None:
                chosen = candidate
                break
            skipped[candidate] = reason
    else:
        reason = unavailable(backend, model, adapter, device, dtype, context_parallel)
        if reason is not None:
            usable = [b for b in ATTENTION_BACKENDS[1:]
                      if unavailable(b, model, adapter, device, dtype, context_parallel) is None]
            raise ConfigError(f"invalid value for '{key}': {backend!r} ({reason}; usable here: {', '.join(usable)})")
        chosen = backend
    if dispatch:
        try:
            with _quiet_diffusers():
                model.set_attention_backend(diffusers_name(chosen))
        except (RuntimeError, ValueError) as err:
            raise ConfigError(f"invalid value for '{key}': {chosen!r} (diffusers refused it: "
                              f"{str(err).strip().splitlines()[0]})") from None
    set_on = {getattr(p._attention_backend, "value", str(p._attention_backend))
              for p in (getattr(m, "processor", None) for m in model.modules()) if hasattr(p, "_attention_backend")}
    record = {
        "requested": backend,
        "backend": chosen,
        "diffusers_backend": diffusers_name(chosen),
        "processors_dispatched": dispatch,
        "processors_sdpa": fixed,
        "set_on_processors": sorted(set_on),
        "device": str(device),
        "context_parallel": context_parallel,
    }
    if skipped:
        record["skipped"] = skipped
    if fixed:
        record["note"] = f"{fixed} attention processor(s) of {adapter.model_class} call PyTorch SDPA themselves"
    return record
