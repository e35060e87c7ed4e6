"""Entry point of a distributed job: build the per-sample plan, pick the backend, run it."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..sampling import fresh_scheduler, init_latents, model_dtype
from .config import RuntimeConfig
from .coordinator import Coordinator, RunResult
from .jobs import WorkerSpec
from .pool import LocalPool
from .rule import Trajectory
from .worker import StepWorker, encode_all


def worker_spec(cfg: Any, prompts: list[str], labels: list[str], guidance: float) -> WorkerSpec:
    """The :class:`WorkerSpec` of a :class:`~specdist.config.GenerateConfig` job."""
    rt: RuntimeConfig = cfg.runtime
    return WorkerSpec(
        model=cfg.model, device=cfg.device, dtype=cfg.dtype, scheduler=cfg.scheduler,
        scheduler_config=dict(cfg.scheduler_config),
        prompts=tuple(prompts), labels=tuple(labels), guidance=guidance, seed=cfg.seed, steps=cfg.steps,
        method=cfg.method, cache=dataclasses.asdict(cfg.cache), peer=dataclasses.asdict(cfg.peer),
        threads=rt.threads_per_worker, emulate_step_s=rt.emulate_step_s,
        attention_backend=cfg.attention_backend, offload=cfg.offload,
    )


def build_trajectories(cfg: Any, adapter: Any, scheduler: Any, noise: torch.Tensor, dtype: torch.dtype) -> list[Trajectory]:
    """One latency-mode :class:`Trajectory` per sample (``noise[i]``), drafted on the CPU."""
    trajs = []
    for i in range(noise.shape[0]):
        sched = fresh_scheduler(scheduler)
        adapter.set_timesteps(sched, cfg.steps, tuple(noise.shape[1:]), torch.device("cpu"))
        latents = init_latents(sched, noise[i:i + 1], torch.device("cpu"))
        trajs.append(Trajectory(sched, latents, cfg.cache, cfg.runtime.lookahead,
                                adaptive=cfg.runtime.adaptive_lookahead, dtype=dtype,
                                speculate=cfg.method == "speca"))
    return trajs


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch CPU threads, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def coordinate(pool: Any, cfg: Any, plan: Any, progress: bool) -> RunResult:
    """Run ``plan`` (trajectories, or the initial noise in throughput mode) on ``pool``."""
    coord = Coordinator(pool, job_timeout_s=cfg.runtime.job_timeout_s, progress=progress)
    if cfg.runtime.mode == "latency":
        return coord.run_latency(plan)
    return coord.run_throughput(plan)


def run_distributed(cfg: Any, bundle: Any, noise: torch.Tensor, prompts: list[str], labels: list[str],
                    guidance: float, *, progress: bool = True, log: Callable[[str], None] = print,
                    on_workers: Callable[[list[int]], None] | None = None, cond: Any = None) -> RunResult:
    """Run the job of ``cfg`` (``runtime.backend`` local, ray or torchrun rank 0) on ``noise``.

    ``cond``: the job's encoded conditioning (all samples; encoded here when ``None``). Workers get
    it from here and load only the transformer. ``on_workers(pids)`` is called once the workers
    are up (tests use it to kill one).
    """
    rt: RuntimeConfig = cfg.runtime
    spec = worker_spec(cfg, prompts, labels, guidance)
    cond = encode_all(bundle, spec) if cond is None else cond
    dtype = model_dtype(bundle.transformer)
    plan = build_trajectories(cfg, bundle.adapter, bundle.scheduler, noise, dtype) if rt.mode == "latency" else noise
    if rt.backend == "local":
        if rt.mode == "latency":  # step jobs share the model
            workers = [StepWorker(bundle.transformer, bundle.adapter, bundle.scheduler, cond, spec)] * rt.workers
        else:  # a generation hooks its model: one copy per thread
            workers = [StepWorker(copy.deepcopy(bundle.transformer), bundle.adapter, bundle.scheduler, cond, spec)
                       for _ in range(rt.workers)]
        pool = LocalPool(workers)
        if on_workers is not None:
            on_workers([os.getpid()] * rt.workers)
        try:
            with torch_threads(rt.threads_per_worker):
                result = coordinate(pool, cfg, plan, progress)
        finally:
            pool.close()
        result.stats.extra.update(pool=dataclasses.asdict(pool.stats))
        return result
    if rt.backend == "ray":
        from .ray_backend import run_on_ray

        return run_on_ray(cfg, spec, plan, progress=progress, log=log, on_workers=on_workers, cond=cond.to("cpu"))
    if rt.backend == "torchrun":
        from .torchrun_backend import run_on_torchrun

        return run_on_torchrun(cfg, spec, plan, progress=progress, log=log, cond=cond.to("cpu"))
    raise ValueError(f"run_distributed: backend {rt.backend!r} is not a distributed backend")
