"""A reference worker: holds the full model and runs jobs, cancellable between blocks.

Every backend wraps one :class:`StepWorker` per worker (a thread, a Ray actor or a torchrun rank).
A diffusers ``ModelHook`` on each block checks the job's cancel flag before the block runs, so a
cancelled job stops mid-forward (PipeInfer's early cancellation); with ``emulate_step_s`` the same
hook also waits ``emulate_step_s / blocks`` per block, so an emulated step is cancellable too.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ..models.base import Conditioning, ModelAdapter
from ..sampling import model_device, model_dtype
from .jobs import CANCELLED, DONE, GENERATION, Job, JobResult, WorkerSpec

_HOOK = "specdist_runtime_cancel"


def encode_all(bundle: Any, spec: WorkerSpec) -> Conditioning:
    """Conditioning of every sample of the job, encoded in one batch (the same on every worker)."""
    n = max(len(spec.prompts), len(spec.labels), 1)
    return bundle.encode(list(spec.prompts) or [""] * n, list(spec.labels), spec.guidance, spec.seed)


def load_worker_model(spec: WorkerSpec, components: str = "transformer") -> Any:
    """The job's model as a worker loads it (:func:`specdist.loading.load_model` with the job's
    device, dtype, sampler, attention backend and offload; ``components="transformer"``: no text
    encoders, no VAE), with the worker's torch thread count set."""
    from ..loading import load_model

    torch.set_num_threads(spec.threads)
    return load_model(spec.model, device=spec.device, dtype=spec.dtype, scheduler=spec.scheduler,
                      scheduler_config=dict(spec.scheduler_config), attention_backend=spec.attention_backend,
                      offload=spec.offload, components=components)


class JobCancelled(Exception):
    """Raised inside a forward pass whose job was cancelled."""


class _CancelHook(ModelHook):
    """Before each block: stop if this thread's job was cancelled; wait the emulated block time."""

    def __init__(self, state: threading.local, block_wait_s: float) -> None:
        super().__init__()
        self.state, self.block_wait_s = state, block_wait_s

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any):
        flag: threading.Event | None = getattr(self.state, "flag", None)
        if flag is not None:
            if flag.is_set():
                raise JobCancelled()
            if self.block_wait_s > 0 and getattr(self.state, "emulate", False) and flag.wait(self.block_wait_s):
                raise JobCancelled()
        return args, kwargs


class StepWorker:
    """Runs jobs on one model (thread-safe: each calling thread has its own job state).

    Args:
        model, adapter, scheduler: the loaded model (see :func:`specdist.loading.load_model`).
        cond: conditioning of *all* samples of the job (a job selects its sample's row).
        spec: the job description (method, steps, cache and peer configs, emulation).
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, scheduler: Any, cond: Conditioning,
                 spec: WorkerSpec) -> None:
        self.model, self.adapter, self.scheduler, self.spec = model, adapter, scheduler, spec
        self.device = model_device(model)
        dtype = model_dtype(model)
        self.cond = cond.to(self.device, dtype)
        self.state = threading.local()
        blocks = adapter.blocks(model)
        wait = spec.emulate_step_s / max(len(blocks), 1)
        for block in blocks:
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_CancelHook(self.state, wait), _HOOK)
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
        self._blocks = blocks

    @classmethod
    def from_spec(cls, spec: WorkerSpec, cond: Conditioning | None = None) -> "StepWorker":
        """Load the model from ``spec`` (what a remote worker does): with the job's encoded ``cond``
        only the transformer and scheduler (no text encoder, no VAE); without it, the whole model,
        to encode the inputs itself. Attention backend and offload as the job asks."""
        bundle = load_worker_model(spec, "all" if cond is None else "transformer")
        cond = encode_all(bundle, spec) if cond is None else cond
        return cls(bundle.transformer, bundle.adapter, bundle.scheduler, cond, spec)

    def close(self) -> None:
        """Remove the hooks from the model."""
        for block in self._blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(_HOOK)
        HookRegistry.check_if_exists_or_initialize(self.model).invalidate_child_registries_cache()

    def run(self, job: Job, tensor: torch.Tensor, flag: threading.Event, worker: int = -1) -> JobResult:
        """Run ``job`` on ``tensor`` (a step's model input, or a generation's initial noise).

        Returns a ``cancelled`` result when ``flag`` is set before or during the forward pass.
        """
        start = time.perf_counter()
        self.state.flag = flag
        try:
            if job.kind == GENERATION:
                out, meta = self._generation(job, tensor)
            else:
                self.state.emulate = True
                out, meta = self._step(job, tensor), {}
            return JobResult(job, DONE, out, worker, time.perf_counter() - start, meta)
        except JobCancelled:
            return JobResult(job, CANCELLED, None, worker, time.perf_counter() - start)
        finally:
            self.state.flag = None
            self.state.emulate = False

    def _step(self, job: Job, x_in: torch.Tensor) -> torch.Tensor:
        cond = self.cond.select(torch.tensor([job.sample]))
        with torch.inference_mode():
            out = self.adapter.predict(self.model, x_in.to(self.device), job.timestep_tensor(), cond)
        return out.float().cpu()

    def _generation(self, job: Job, noise: torch.Tensor) -> tuple[torch.Tensor, dict]:
        from ..engine.config import CacheConfig, PeerConfig
        from ..methods import run_method

        spec = self.spec
        result = run_method(spec.method, self.model, self.adapter, self.scheduler,
                            self.cond.select(torch.tensor([job.sample])), noise, spec.steps,
                            cache=CacheConfig(**spec.cache), peer=PeerConfig(**spec.peer), progress=False)
        if spec.emulate_step_s > 0:  # the emulated cost of the full-model evaluations this run made
            flag = self.state.flag
            if flag.wait(spec.emulate_step_s * result.nfe):
                raise JobCancelled()
        stats = getattr(result, "stats", None)
        meta = {"nfe": result.nfe, "wall_s": result.wall_s,
                "decisions": "".join(stats.decisions[0]) if stats is not None else "F" * spec.steps}
        return result.latents, meta
