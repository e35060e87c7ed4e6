"""Entry point of a distributed job: build the per-sample plan, pick the backend, run it."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..engine.calibration import Calibration
from ..engine.decision import make_rule
from ..sampling import fresh_scheduler, init_latents, model_dtype
from .config import RuntimeConfig
from .coordinator import Coordinator, RunResult
from .jobs import WorkerSpec
from .layout import job_layout
from .pool import LocalPool
from .picard import PicardTrajectory
from .rule import LatencyTrajectory, Trajectory
from .worker import StepWorker, encode_all


def worker_spec(cfg: Any, prompts: list[str], labels: list[str], guidance: float,
                calibration: Calibration | None = None) -> WorkerSpec:
    """The :class:`WorkerSpec` of a :class:`~specdist.config.GenerateConfig` job (``calibration``:
    speca's, for throughput-mode generations with a quality target)."""
    rt: RuntimeConfig = cfg.runtime
    return WorkerSpec(
        model=cfg.model, device=cfg.device, dtype=cfg.dtype, scheduler=cfg.scheduler,
        scheduler_config=dict(cfg.scheduler_config),
        prompts=tuple(prompts), labels=tuple(labels), guidance=guidance, seed=cfg.seed, steps=cfg.steps,
        method=cfg.method, cache=dataclasses.asdict(cfg.cache), peer=dataclasses.asdict(cfg.peer),
        threads=rt.threads_per_worker, emulate_step_s=rt.emulate_step_s, emulate_draft_s=rt.emulate_draft_s,
        calibration=None if calibration is None else calibration.to_json(),
        attention_backend=cfg.attention_backend, offload=cfg.offload,
    )


def build_trajectories(cfg: Any, adapter: Any, scheduler: Any, noise: torch.Tensor, dtype: torch.dtype,
                       calibration: Calibration | None = None) -> list[LatencyTrajectory]:
    """One latency-mode :class:`Trajectory` per sample (``noise[i]``), its rule made by the engine's
    decision module (verifier: the reference output itself), or with ``method: picard`` one
    :class:`~specdist.runtime.picard.PicardTrajectory`; states kept on the CPU."""
    trajs = []
    for i in range(noise.shape[0]):
        sched = fresh_scheduler(scheduler)
        adapter.set_timesteps(sched, cfg.steps, tuple(noise.shape[1:]), torch.device("cpu"))
        latents = init_latents(sched, noise[i:i + 1], torch.device("cpu"))
        if cfg.method == "picard":
            p = cfg.picard
            trajs.append(PicardTrajectory(sched, latents, p.window, p.tol, p.init, dtype=dtype))
            continue
        rule = None if cfg.method == "full" else make_rule(cfg.method, cfg.cache, cfg.steps, 1, calibration=calibration,
                                                            signal="output")
        trajs.append(Trajectory(sched, latents, cfg.cache, rule, cfg.runtime.lookahead,
                                adaptive=cfg.runtime.adaptive_lookahead, dtype=dtype, reuse=cfg.runtime.reuse))
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
    return coord.run_throughput(plan, cfg.steps)


def run_distributed(cfg: Any, bundle: Any, noise: torch.Tensor, prompts: list[str], labels: list[str],
                    guidance: float, *, progress: bool = True, log: Callable[[str], None] = print,
                    on_workers: Callable[[list[int], Any], None] | None = None, cond: Any = None,
                    calibration: Calibration | None = None) -> RunResult:
    """Run the job of ``cfg`` (``runtime.backend`` local, ray or torchrun rank 0) on ``noise``.

    ``cond``: the job's encoded conditioning (all samples; encoded here when ``None``). Workers get
    it from here and load only the transformer. ``calibration``: speca's, for a quality target.
    ``on_workers(pids, actors)`` is called once the workers are up (tests use it to kill one);
    ``actors`` are the Ray actor handles on ``ray`` (see :func:`~.ray_backend.run_on_ray`), else ``None``.
    """
    rt: RuntimeConfig = cfg.runtime
    spec = worker_spec(cfg, prompts, labels, guidance, calibration)
    cond = encode_all(bundle, spec) if cond is None else cond
    dims = None
    if rt.backend in ("ray", "torchrun"):  # the layout fits (model, machine, prompts) or the run ends here, at once
        dims = job_layout(cfg, bundle, tuple(noise.shape[1:]), cond)
    dtype = model_dtype(bundle.transformer)
    plan = (build_trajectories(cfg, bundle.adapter, bundle.scheduler, noise, dtype, calibration)
            if rt.mode == "latency" else noise)
    if rt.backend == "local":
        if rt.mode == "latency":  # step jobs share the model
            workers = [StepWorker(bundle.transformer, bundle.adapter, bundle.scheduler, cond, spec)] * rt.workers
        else:  # a generation hooks its model: one copy per thread
            workers = [StepWorker(copy.deepcopy(bundle.transformer), bundle.adapter, bundle.scheduler, cond, spec)
                       for _ in range(rt.workers)]
        pool = LocalPool(workers)
        if on_workers is not None:
            on_workers([os.getpid()] * rt.workers, None)
        try:
            with torch_threads(rt.threads_per_worker):
                result = coordinate(pool, cfg, plan, progress)
        finally:
            pool.close()
        result.stats.extra.update(pool=dataclasses.asdict(pool.stats))
        return result
    if rt.backend == "ray":
        from .ray_backend import run_on_ray

        return run_on_ray(cfg, spec, plan, progress=progress, log=log, on_workers=on_workers, cond=cond.to("cpu"),
                          dims=dims)
    if rt.backend == "torchrun":
        from .torchrun_backend import run_on_torchrun

        return run_on_torchrun(cfg, spec, plan, progress=progress, log=log, cond=cond.to("cpu"), dims=dims)
    raise ValueError(f"run_distributed: backend {rt.backend!r} is not a distributed backend")
