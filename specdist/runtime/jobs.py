"""What travels between the coordinator and the workers: jobs, results, and the worker set-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

STEP, DRAFT, GENERATION = "step", "draft", "generation"
DONE, CANCELLED, FAILED = "done", "cancelled", "failed"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
           "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Job:
    """One unit of work; the tensor that goes with it (model input or initial noise) travels apart.

    ``kind`` ``step``: one full model call for sample ``sample`` at ``step`` (latency mode; its
    tensors: the model input; ``meta["record"]`` ``measure`` / ``record`` also returns the branch
    sizes / the recorded block-level features of the cached region from ``meta["start"]``);
    ``draft``: one speculative call (tensors: the model input, then the forecast features laid out
    as ``meta["layout"]``); ``generation``: a whole generation of sample ``sample`` with the
    engine's method (throughput; tensors: the initial noise).
    """

    id: int
    kind: str
    sample: int
    step: int = 0
    timestep: float = 0.0
    timestep_dtype: str = "float32"
    window: int = 0  # the coordinator's window id (stale results are recognised by it)
    meta: dict[str, Any] = field(default_factory=dict)

    def timestep_tensor(self) -> torch.Tensor:
        """The scheduler timestep as the scheduler holds it (exact: int or float32 values)."""
        return torch.tensor(self.timestep, dtype=_DTYPES[self.timestep_dtype])


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"`` (for :class:`Job`)."""
    return str(dtype).removeprefix("torch.")


@dataclass
class JobResult:
    """What a worker returns for a job."""

    job: Job
    status: str  # done | cancelled | failed
    output: torch.Tensor | None = None
    worker: int = -1
    compute_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    features: tuple[torch.Tensor, ...] = ()  # a recording step job's features (meta["layout"])


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to rebuild the job's model and inputs by itself (plain data)."""

    model: str
    device: str
    dtype: str
    scheduler: str | None
    scheduler_config: dict[str, Any]
    prompts: tuple[str, ...]
    labels: tuple[str, ...]
    guidance: float
    seed: int
    steps: int
    method: str
    cache: dict[str, Any]
    peer: dict[str, Any]
    threads: int = 1
    emulate_step_s: float = 0.0
    emulate_draft_s: float = 0.0
    calibration: dict[str, Any] | None = None  # speca's quality-target calibration (Calibration.to_json)
    attention_backend: str = "auto"
    offload: str = "none"
