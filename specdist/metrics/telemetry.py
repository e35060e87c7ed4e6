"""GPU telemetry from NVML (``pynvml``, package ``nvidia-ml-py``) that never fails on a CPU machine.

:class:`GpuTelemetry` samples every visible GPU in a daemon thread while a block of code runs and
summarises peak/mean memory used and utilisation; :func:`gpu_inventory` describes the GPUs for
``specdist info``. Without NVML (no driver, no GPU, no ``pynvml``) both return
``{"available": False, "reason": "<one line>", "gpus": []}`` instead of raising.

NVML memory "used" is device-wide: it includes other processes on the same GPU and the CUDA
context. ``torch.cuda.max_memory_allocated`` (this process's tensors only) is recorded next to it
when CUDA is available. GPUs are those named by ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs) when
it is set, else all GPUs NVML sees.
"""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType
from typing import Any

import torch

__all__ = ["GpuTelemetry", "gpu_inventory"]

_MIB = 1024 * 1024


def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _one_line(err: BaseException) -> str:
    """One-line reason for an NVML failure, with a hint for the two common no-GPU cases."""
    kind = type(err).__name__
    if kind == "NVMLError_LibraryNotFound":
        return "NVML: library not found (no NVIDIA driver on this machine)"
    if kind == "NVMLError_DriverNotLoaded":
        return "NVML: driver not loaded"
    msg = " ".join(str(err).split()) or kind
    return f"NVML: {msg[:200]}"


def _load_nvml() -> tuple[Any | None, str | None]:
    """Import pynvml; returns ``(module, None)`` or ``(None, reason)``."""
    try:
        import pynvml
    except Exception as err:  # ImportError, or a broken install
        return None, f"pynvml not importable ({type(err).__name__}); install nvidia-ml-py"
    return pynvml, None


def _open_devices(nvml: Any) -> tuple[list[tuple[int, Any]], str | None]:
    """``nvmlInit`` and the handles of the visible GPUs; ``([], reason)`` on failure (NVML left shut)."""
    try:
        nvml.nvmlInit()
    except Exception as err:
        return [], _one_line(err)
    try:
        count = int(nvml.nvmlDeviceGetCount())
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        handles: list[tuple[int, Any]] = []
        if visible is None or not visible.strip():
            handles = [(i, nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
        else:
            for tok in (s.strip() for s in visible.split(",")):
                if tok.isdigit() and int(tok) < count:
                    handles.append((int(tok), nvml.nvmlDeviceGetHandleByIndex(int(tok))))
                elif tok.startswith(("GPU-", "MIG-")):
                    h = nvml.nvmlDeviceGetHandleByUUID(tok)
                    handles.append((int(nvml.nvmlDeviceGetIndex(h)), h))
                else:
                    break  # CUDA stops at the first invalid entry
        if not handles:
            nvml.nvmlShutdown()
            return [], "NVML: no GPUs visible" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible else "")
        return handles, None
    except Exception as err:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
        return [], _one_line(err)


def _torch_cuda_memory() -> dict[str, float] | None:
    if not torch.cuda.is_available():
        return None
    try:
        return {
            "max_memory_allocated_mib": round(torch.cuda.max_memory_allocated() / _MIB, 1),
            "max_memory_reserved_mib": round(torch.cuda.max_memory_reserved() / _MIB, 1),
        }
    except Exception:
        return None


def gpu_inventory(nvml: Any | None = None) -> dict[str, Any]:
    """Driver version and per-GPU name / total memory, JSON-ready; never raises.

    Returns ``{"available": True, "driver_version", "gpus": [{"index", "name", "uuid",
    "memory_total_mib"}]}`` or ``{"available": False, "reason", "gpus": []}``. ``nvml`` replaces
    the ``pynvml`` module (for tests).
    """
    reason: str | None = None
    if nvml is None:
        nvml, reason = _load_nvml()
    if nvml is None:
        return {"available": False, "reason": reason, "gpus": []}
    handles, reason = _open_devices(nvml)
    if reason is not None:
        return {"available": False, "reason": reason, "gpus": []}
    try:
        gpus = []
        for index, h in handles:
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append({"index": index, "name": _text(nvml.nvmlDeviceGetName(h)),
                         "uuid": _text(nvml.nvmlDeviceGetUUID(h)),
                         "memory_total_mib": round(int(mem.total) / _MIB, 1)})
        return {"available": True, "driver_version": _text(nvml.nvmlSystemGetDriverVersion()), "gpus": gpus}
    except Exception as err:
        return {"available": False, "reason": _one_line(err), "gpus": []}
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


class _Stats:
    """Running peak/mean of memory used and utilisation for one GPU (guarded by the owner's lock)."""

    def __init__(self, index: int, name: str, total_mib: float) -> None:
        self.index, self.name, self.total_mib = index, name, total_mib
        self.n_mem = self.n_util = 0
        self.mem_sum = self.mem_peak = 0.0
        self.util_sum = self.util_peak = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "name": self.name, "memory_total_mib": self.total_mib,
            "samples": self.n_mem,
            "memory_used_peak_mib": round(self.mem_peak, 1) if self.n_mem else None,
            "memory_used_mean_mib": round(self.mem_sum / self.n_mem, 1) if self.n_mem else None,
            "util_peak_pct": round(self.util_peak, 1) if self.n_util else None,
            "util_mean_pct": round(self.util_sum / self.n_util, 1) if self.n_util else None,
        }


class GpuTelemetry:
    """Context manager sampling NVML every ``interval_s`` seconds in a daemon thread.

    Use ``with GpuTelemetry() as tel: ...`` then ``tel.summary()`` (valid during and after the
    block). Without NVML nothing is sampled and :meth:`summary` reports why. The thread is stopped
    and joined (with a timeout) on exit, also when the block raises; exceptions are not swallowed.
    On CUDA machines the torch peak-memory counters are reset on entry and read on exit.
    """

    def __init__(self, interval_s: float = 0.2, *, nvml: Any | None = None) -> None:
        """``interval_s``: sampling period (> 0). ``nvml``: replaces the ``pynvml`` module (for tests)."""
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self._nvml = nvml
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handles: list[tuple[int, Any]] = []
        self._stats: list[_Stats] = []
        self._reason: str | None = "not started"
        self._errors = 0
        self._t0 = self._t1 = 0.0
        self._torch: dict[str, float] | None = None
        self._joined = True

    def __enter__(self) -> GpuTelemetry:
        """Open NVML, take a first sample and start the sampling thread (if NVML is available)."""
        if self._t0:
            raise RuntimeError("a GpuTelemetry can be entered only once; create a new one")
        self._t0 = time.perf_counter()
        if torch.cuda.is_available():
            try:
                torch.cuda.reset_peak_memory_stats()
            except Exception:
                pass
        nvml, reason = (self._nvml, None) if self._nvml is not None else _load_nvml()
        if nvml is None:
            self._reason = reason
            return self
        self._nvml = nvml
        self._handles, self._reason = _open_devices(nvml)
        if self._reason is not None:
            return self
        try:
            for index, h in self._handles:
                total = round(int(nvml.nvmlDeviceGetMemoryInfo(h).total) / _MIB, 1)
                self._stats.append(_Stats(index, _text(nvml.nvmlDeviceGetName(h)), total))
        except Exception as err:
            self._reason = _one_line(err)
            self._shutdown()
            return self
        self._sample()
        self._joined = False
        self._thread = threading.Thread(target=self._run, name="specdist-gpu-telemetry", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Stop and join the thread, take a last sample, read torch peak memory, close NVML."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(2.0, 5 * self.interval_s))
            self._joined = not self._thread.is_alive()
        if self._reason is None:
            self._sample()
            self._shutdown()
        self._t1 = time.perf_counter()
        self._torch = _torch_cuda_memory()

    def _shutdown(self) -> None:
        try:
            if self._nvml is not None:
                self._nvml.nvmlShutdown()
        except Exception:
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        nvml = self._nvml
        if nvml is None:
            return
        for (_, h), st in zip(self._handles, self._stats):
            try:
                used = int(nvml.nvmlDeviceGetMemoryInfo(h).used) / _MIB
            except Exception:
                with self._lock:
                    self._errors += 1
                continue
            try:
                util: float | None = float(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except Exception:  # e.g. not supported under MIG
                util = None
            with self._lock:
                st.n_mem += 1
                st.mem_sum += used
                st.mem_peak = max(st.mem_peak, used)
                if util is not None:
                    st.n_util += 1
                    st.util_sum += util
                    st.util_peak = max(st.util_peak, util)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: ``available``, ``reason`` (only when unavailable), ``gpus`` and extras.

        Available: ``{"available": True, "interval_s", "duration_s", "sampler_errors",
        "sampler_joined", "gpus": [{"index", "name", "memory_total_mib", "samples",
        "memory_used_peak_mib", "memory_used_mean_mib", "util_peak_pct", "util_mean_pct"}],
        "torch_cuda": {...} | None}``.
        """
        if self._reason is not None:
            out: dict[str, Any] = {"available": False, "reason": self._reason, "gpus": []}
            if self._torch is not None:
                out["torch_cuda"] = self._torch
            return out
        end = self._t1 if self._t1 else time.perf_counter()
        with self._lock:
            gpus = [st.as_dict() for st in self._stats]
            errors = self._errors
        return {
            "available": True,
            "interval_s": self.interval_s,
            "duration_s": round(end - self._t0, 3),
            "sampler_errors": errors,
            "sampler_joined": self._joined,
            "gpus": gpus,
            "torch_cuda": self._torch if self._t1 else _torch_cuda_memory(),
        }
