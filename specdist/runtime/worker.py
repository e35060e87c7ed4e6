"""A reference worker: holds the full model and runs jobs, cancellable between blocks.

Every backend wraps one :class:`StepWorker` per worker (a thread, a Ray actor or a torchrun rank).
A diffusers ``ModelHook`` on each block checks the job's cancel flag before the block runs, so a
cancelled job stops mid-forward (PipeInfer's early cancellation); with ``emulate_step_s`` (full
calls) or ``emulate_draft_s`` (drafts) the same hook also waits that time spread over the blocks,
so an emulated call is cancellable too. Latency-mode step jobs may record the block-level features
of the cached region and drafts run the engine's speculative call (:class:`SpeculationHooks`,
installed on first use); both are stateless — the coordinator owns the history.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ..models.base import Conditioning, ModelAdapter
from ..engine.hooks import SpeculationHooks
from ..sampling import model_device, model_dtype
from .agree import GangAgreement, agree_flag
from .jobs import CANCELLED, DONE, DRAFT, GENERATION, Job, JobResult, WorkerSpec
from .shards import gather_shards, shard_of, sum_sizes

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
    """Before each block: stop if this thread's job was cancelled; wait the emulated block time
    (``state.block_wait_s``: a full call's or a draft's share, set per job).

    In a gang (``group``: the gang's ``ctrl`` group) the flag is agreed before every block
    (:func:`~specdist.runtime.agree.agree_flag`: the leader sees rank 0's cancel, the members do not),
    so the whole gang stops at the same block and no rank is left in a collective alone."""

    def __init__(self, state: threading.local, group: Any = None) -> None:
        super().__init__()
        self.state, self.group = state, group

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any):
        flag: threading.Event | None = getattr(self.state, "flag", None)
        if flag is not None:
            wait = getattr(self.state, "block_wait_s", 0.0)
            cancelled = flag.is_set() or (wait > 0 and flag.wait(wait))
            if self.group is not None:
                cancelled = agree_flag(cancelled, self.group)
            if cancelled:
                raise JobCancelled()
        return args, kwargs


class StepWorker:
    """Runs jobs on one model (thread-safe: each calling thread has its own job state).

    Args:
        model, adapter, scheduler: the loaded model (see :func:`specdist.loading.load_model`).
        cond: conditioning of *all* samples of the job (a job selects its sample's row).
        spec: the job description (method, steps, cache and peer configs, emulation).
        group: a gang's ``ctrl`` group when the model runs context-parallel over a gang (cancels are
            then agreed over it before every block); ``None`` for a one-device worker.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, scheduler: Any, cond: Conditioning,
                 spec: WorkerSpec, group: Any = None) -> None:
        self.model, self.adapter, self.scheduler, self.spec = model, adapter, scheduler, spec
        self.group = group
        self.device = model_device(model)
        dtype = model_dtype(model)
        self.cond = cond.to(self.device, dtype)
        self.state = threading.local()
        blocks = adapter.blocks(model)
        for block in blocks:
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_CancelHook(self.state, group), _HOOK)
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
        self._blocks = blocks
        self._hooks: SpeculationHooks | None = None  # block-level recording and drafts, made on first use
        self.steps_done: dict[int, int] = {}  # generation job id -> steps it has completed (progress bars)
        self._hooks_lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: WorkerSpec, cond: Conditioning | None = None) -> "StepWorker":
        """Load the model from ``spec`` (what a remote worker does): with the job's encoded ``cond``
        only the transformer and scheduler (no text encoder, no VAE); without it, the whole model,
        to encode the inputs itself. Attention backend and offload as the job asks."""
        bundle = load_worker_model(spec, "all" if cond is None else "transformer")
        cond = encode_all(bundle, spec) if cond is None else cond
        return cls(bundle.transformer, bundle.adapter, bundle.scheduler, cond, spec)

    def speculation_hooks(self) -> SpeculationHooks:
        """The engine's block-level hooks on this worker's model (reentrant across threads)."""
        with self._hooks_lock:
            if self._hooks is None:
                cache = self.spec.cache
                self._hooks = SpeculationHooks(self.model, self.adapter, cache.get("probe_block", -1), "block")
            return self._hooks

    def close(self) -> None:
        """Remove the hooks from the model."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        for block in self._blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(_HOOK)
        HookRegistry.check_if_exists_or_initialize(self.model).invalidate_child_registries_cache()

    def run(self, job: Job, tensors: torch.Tensor | tuple[torch.Tensor, ...], flag: threading.Event,
            worker: int = -1) -> JobResult:
        """Run ``job`` on its ``tensors`` (see :class:`~specdist.runtime.jobs.Job`; a single tensor is
        accepted for one-tensor jobs).

        Returns a ``cancelled`` result when ``flag`` is set before or during the forward pass.
        """
        tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
        start = time.perf_counter()
        self.state.flag = flag
        n_blocks = max(len(self._blocks), 1)
        try:
            features: tuple[torch.Tensor, ...] = ()
            if job.kind == GENERATION:
                out, meta = self._generation(job, tensors[0])
            elif job.kind == DRAFT:
                self.state.block_wait_s = self.spec.emulate_draft_s / n_blocks
                out, meta = self._draft(job, tensors), {}
            else:
                self.state.block_wait_s = self.spec.emulate_step_s / n_blocks
                out, features, meta = self._step(job, tensors[0])
            return JobResult(job, DONE, out, worker, time.perf_counter() - start, meta, features=features)
        except JobCancelled:
            return JobResult(job, CANCELLED, None, worker, time.perf_counter() - start)
        finally:
            self.state.flag = None
            self.state.block_wait_s = 0.0

    def _predict(self, job: Job, x_in: torch.Tensor) -> torch.Tensor:
        cond = self.cond.select(torch.tensor([job.sample]))
        with torch.inference_mode():
            return self.adapter.predict(self.model, x_in.to(self.device), job.timestep_tensor(), cond).float()

    def _step(self, job: Job, x_in: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], dict]:
        """A full call; ``meta["record"]`` ``measure`` returns the branch sizes, ``record`` the
        block-level features of the region from ``meta["start"]`` (flat, in the hooks' order). On a
        gang the sizes are summed over its shards and the features gathered from them
        (:mod:`~specdist.runtime.shards`; the layout then carries each shard's shape for the drafts)."""
        record = job.meta.get("record", "off")
        if record == "off":
            return self._predict(job, x_in).cpu(), (), {}
        hooks = self.speculation_hooks()
        plan = hooks.plan(record, start=job.meta.get("start", 0))
        try:
            out = self._predict(job, x_in).cpu()
        finally:
            hooks.plan("off")
        if record == "measure":
            guided = self.cond.uncond_kwargs is not None and self.cond.guidance_scale > 1.0
            sizes = dict(plan.sizes) if self.group is None else sum_sizes(plan.sizes, self.group)  # the gang's shards
            return out, (), {"sizes": sizes, "rows": x_in.shape[0] * (2 if guided else 1)}
        names = hooks.feature_names(job.meta.get("start", 0))
        feats = [plan.recorded[n] for n in names]
        if self.group is None:
            layout = [[n, len(f)] for n, f in zip(names, feats)]
            return out, tuple(t.float().cpu() for f in feats for t in f), {"layout": layout}
        # a gang: the whole features (every rank's shard, gathered); the layout keeps each shard's shape
        gathered, shapes = gather_shards(tuple(t for f in feats for t in f), self.group)
        layout, k = [], 0
        for n, f in zip(names, feats):
            layout.append([n, len(f), shapes[k:k + len(f)]])
            k += len(f)
        return out, gathered, {"layout": layout}

    def _draft(self, job: Job, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """A speculative call: the forecast features re-gated by every block's norms and the step's
        modulation (the engine's ``speculate`` plan, without the probe)."""
        hooks = self.speculation_hooks()
        forecast, k = {}, 1
        rank, world = (0, 1) if self.group is None else (dist.get_rank(self.group), dist.get_world_size(self.group))
        for name, n, *shard_shapes in job.meta["layout"]:
            parts = tensors[k:k + n]
            if shard_shapes:  # a gang's gathered features: this rank's shard of each forecast
                parts = tuple(shard_of(t, shape, rank, world) for t, shape in zip(parts, shard_shapes[0]))
            forecast[name] = tuple(t.to(self.device) for t in parts)
            k += n
        hooks.plan("speculate", verify=False, forecast=forecast, start=job.meta.get("start", 0))
        try:
            return self._predict(job, tensors[0]).cpu()
        finally:
            hooks.plan("off")

    def _generation(self, job: Job, noise: torch.Tensor) -> tuple[torch.Tensor, dict]:
        from ..engine.config import CacheConfig, PeerConfig
        from ..methods import run_method

        spec = self.spec
        from ..engine.calibration import Calibration

        calibration = None if spec.calibration is None else Calibration.from_json(spec.calibration)
        self.steps_done[job.id] = 0

        def done(step: int) -> None:
            self.steps_done[job.id] = step + 1

        # on a gang every data-dependent decision of the generation is agreed over its ranks
        agreement = None if self.group is None else GangAgreement(self.group)
        try:
            result = run_method(spec.method, self.model, self.adapter, self.scheduler,
                                self.cond.select(torch.tensor([job.sample])), noise, spec.steps,
                                cache=CacheConfig(**spec.cache), peer=PeerConfig(**spec.peer), progress=False,
                                calibration=calibration, on_step=done, agreement=agreement)
        finally:
            self.steps_done.pop(job.id, None)
        stats = getattr(result, "stats", None)
        wait = spec.emulate_step_s * result.nfe + spec.emulate_draft_s * (stats.spec_calls if stats is not None else 0)
        if wait > 0 and self.state.flag.wait(wait):  # the emulated cost of the calls this run made
            raise JobCancelled()
        meta = {"nfe": result.nfe, "wall_s": result.wall_s,
                "decisions": "".join(stats.decisions[0]) if stats is not None else "F" * spec.steps}
        return result.latents, meta
