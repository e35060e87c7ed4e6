"""GPU telemetry: the no-GPU path, and the sampling logic against a fake NVML."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from specdist.metrics import GpuTelemetry, gpu_inventory

MIB = 1024 * 1024


class DriverNotLoaded(Exception):
    """Stands in for pynvml.NVMLError_DriverNotLoaded (matched by class name)."""


DriverNotLoaded.__name__ = "NVMLError_DriverNotLoaded"


class BrokenNvml:
    """An NVML whose init fails as on a machine without a loaded driver."""

    def nvmlInit(self) -> None:
        raise DriverNotLoaded("Driver Not Loaded")


class FakeNvml:
    """Two GPUs; memory used on GPU 0 rises by 100 MiB on each query, utilisation alternates 0/100."""

    def __init__(self) -> None:
        self.calls = 0
        self.open = 0

    def nvmlInit(self) -> None:
        self.open += 1

    def nvmlShutdown(self) -> None:
        self.open -= 1

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return f"Fake GPU {h}".encode()

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-{h}"

    def nvmlSystemGetDriverVersion(self) -> str:
        return "999.1"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        if h == 0:
            self.calls += 1
            return SimpleNamespace(total=1000 * MIB, used=100 * self.calls * MIB)
        return SimpleNamespace(total=2000 * MIB, used=50 * MIB)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        if h == 1:
            raise RuntimeError("Not Supported")
        return SimpleNamespace(gpu=100 if self.calls % 2 else 0)


@pytest.fixture(autouse=True)
def _all_gpus_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_unavailable_summary_has_reason_and_exits_promptly() -> None:
    t0 = time.perf_counter()
    with GpuTelemetry(interval_s=0.05, nvml=BrokenNvml()) as tel:
        pass
    assert time.perf_counter() - t0 < 1.0
    assert tel.summary() == {"available": False, "reason": "NVML: driver not loaded", "gpus": []}
    inv = gpu_inventory(nvml=BrokenNvml())
    assert inv == {"available": False, "reason": "NVML: driver not loaded", "gpus": []}


def test_real_nvml_never_raises() -> None:
    """On this machine (GPU or not) both entry points return a JSON-ready answer quickly."""
    t0 = time.perf_counter()
    with GpuTelemetry(interval_s=0.01) as tel:
        time.sleep(0.03)
    summary, inv = tel.summary(), gpu_inventory()
    assert time.perf_counter() - t0 < 5.0
    json.dumps([summary, inv], allow_nan=False)
    for out in (summary, inv):
        if out["available"]:
            assert out["gpus"] and all(g["memory_total_mib"] > 0 for g in out["gpus"])
        else:
            assert out["gpus"] == [] and out["reason"] and "\n" not in out["reason"]


def test_fake_gpu_peak_mean_and_thread_stop() -> None:
    nvml = FakeNvml()
    before = set(threading.enumerate())
    with GpuTelemetry(interval_s=0.01, nvml=nvml) as tel:
        time.sleep(0.15)
        assert any(t.name == "specdist-gpu-telemetry" for t in threading.enumerate())
    assert set(threading.enumerate()) <= before  # sampler joined
    assert nvml.open == 0  # nvmlShutdown balanced nvmlInit
    s = tel.summary()
    json.dumps(s, allow_nan=False)
    g0, g1 = s["gpus"]
    assert s["available"] and s["sampler_joined"] and g0["name"] == "Fake GPU 0"
    n = g0["samples"]
    assert n >= 3  # first sample, some periodic ones, last sample
    # GPU 0: used = 100, 200, ... over samples after the one query made at start (total memory)
    assert g0["memory_used_peak_mib"] == pytest.approx(100 * nvml.calls)
    assert g0["memory_used_mean_mib"] == pytest.approx(100 * (nvml.calls + 1) / 2 + 50, abs=0.1)
    assert g0["util_peak_pct"] == 100.0 and 0.0 < g0["util_mean_pct"] < 100.0
    assert g1["memory_used_peak_mib"] == g1["memory_used_mean_mib"] == 50.0
    assert g1["util_mean_pct"] is None and g1["memory_total_mib"] == 2000.0


def test_thread_stops_when_block_raises() -> None:
    nvml = FakeNvml()
    with pytest.raises(KeyError):
        with GpuTelemetry(interval_s=0.01, nvml=nvml) as tel:
            raise KeyError("boom")
    assert not any(t.name == "specdist-gpu-telemetry" and t.is_alive() for t in threading.enumerate())
    assert tel.summary()["sampler_joined"] and nvml.open == 0


def test_fake_inventory_and_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    inv = gpu_inventory(nvml=FakeNvml())
    assert inv["available"] and inv["driver_version"] == "999.1"
    assert [g["name"] for g in inv["gpus"]] == ["Fake GPU 0", "Fake GPU 1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    inv = gpu_inventory(nvml=FakeNvml())
    assert [g["index"] for g in inv["gpus"]] == [1] and inv["gpus"][0]["memory_total_mib"] == 2000.0


def test_bad_interval_and_reuse() -> None:
    with pytest.raises(ValueError):
        GpuTelemetry(interval_s=0)
    tel = GpuTelemetry(interval_s=0.01, nvml=BrokenNvml())
    with tel:
        pass
    with pytest.raises(RuntimeError):
        tel.__enter__()
