"""Describe the software and hardware environment (for ``specdist info`` and reports)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

import torch


def package_version(name: str) -> str | None:
    """Installed version of distribution ``name``, or ``None``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions, device and machine facts, JSON-ready."""
    from .metrics.telemetry import gpu_inventory

    return {
        "device": str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "diffusers": package_version("diffusers"),
        "ray": package_version("ray"),
        "specdist": package_version("specdist"),
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "gpus": gpu_inventory(),
    }
