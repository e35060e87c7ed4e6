"""The job's :class:`~specdist.runtime.parallel_dims.ParallelDims`, checked before anything starts.

:func:`job_layout` turns ``runtime.*`` and the loaded model into the layout and fails with one
line naming every degree when it cannot run: the model's heads and the sequence lengths its
context-parallel plan splits, the attention backend, and — for a Ray cluster that specdist starts
on this machine — the machine's memory and cores (:func:`~specdist.runtime.parallel_dims.check_capacity`),
so that 64 workers on 2 cores fail at once instead of at ``runtime.startup_timeout_s``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from .gang import ring_supported
from .parallel_dims import AUTO, ParallelDims, RankNeeds, check_capacity, local_resources


def _model_bytes_on_host(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cpu")


def gang_job_problem(cfg: Any) -> str | None:
    """Why the job's worker calls cannot run on a gang (``None`` when they can).

    On a gang every rank holds the whole model output (gathered at the plan's end), but block-level
    features only for its own shard of the tokens. Latency jobs that return or take them (measuring,
    recording and draft calls at ``cache.granularity: block``) gather and cut them over the gang
    (:mod:`specdist.runtime.shards`), so they run there. Throughput generations with
    specdist's caching methods decide on sharded features too; their engine agrees every
    data-dependent value over the gang (:class:`~specdist.runtime.agree.GangAgreement`: errors of
    the whole tensors, identical values on every rank), so ``fora``, ``taylorseer`` and ``speca`` run
    there — but not per-token selection (``specdiff``, ``cache.granularity=token``: each rank would
    rank its own shard's tokens), the diffusers caches (their decisions are diffusers' own, not
    agreed) or ``exact`` (its pool is the local one).
    """
    rt = cfg.runtime
    if rt.mode == "throughput" and cfg.method not in ("full", "fora", "taylorseer", "speca"):
        return (f"method={cfg.method} with runtime.mode=throughput decides inside each generation in a way that is "
                f"not agreed over a gang's ranks; on gangs use method full, fora, taylorseer or speca")
    if rt.mode == "throughput" and cfg.method != "full" and cfg.cache.granularity == "token":
        return ("cache.granularity=token with runtime.mode=throughput selects tokens per rank, each rank on its own "
                "shard (not agreed over the gang); use cache.granularity=block or output")
    return None


def job_layout(cfg: Any, bundle: Any, latent_shape: tuple[int, ...] | None = None, cond: Any = None,
               backend: str = "native") -> ParallelDims:
    """The layout of ``cfg.runtime`` for ``bundle``'s model; raises :class:`ConfigError` when it does not fit.

    Gangs (``gang_size > 1``) run on the torchrun and ray pools (:mod:`specdist.runtime.torchrun_backend`,
    :mod:`specdist.runtime.ray_gangs`) for the jobs whose every branch depends only on the gathered
    model output (:func:`gang_job_problem`); the local pool (threads in one process) cannot hold a
    gang, which the config refuses (:class:`~specdist.runtime.config.RuntimeConfig`).
    """
    rt = cfg.runtime
    model, adapter = bundle.transformer, bundle.adapter
    g = rt.gang_size
    if g == AUTO:  # the efficiency model is GPU-measured; without an accelerator a worker stays one rank
        if torch.accelerator.device_count() > 0:
            raise ConfigError("runtime.gang_size=auto on GPUs is not resolved yet (the emulated split of "
                              "specdist.runtime.gang_cost is not wired to the pools); set runtime.gang_size to a number")
        g = 1
    heads = adapter.attention_heads(model) if hasattr(model, "config") else None
    dims = ParallelDims.from_runtime(rt, gang_size=g, heads=heads, ring_supported=ring_supported(backend))
    if dims.gang_size > 1:
        lengths = adapter.context_parallel_lengths(model, latent_shape, cond) if latent_shape is not None else {}
        dims.check_model(heads=heads, lengths=lengths, ring_supported=ring_supported(backend), backend=backend,
                         unsupported=adapter.context_parallel_unsupported(model))
        problem = gang_job_problem(cfg)
        if problem:
            raise ConfigError(f"runtime.gang_size={dims.gang_size}: {problem}")
    if rt.backend == "ray" and not rt.ray_address:  # a local cluster on this machine
        needs = RankNeeds(memory_bytes=RankNeeds().memory_bytes + _model_bytes_on_host(model))
        check_capacity(dims, local_resources(), needs, rt.startup_timeout_s)
    return dims


__all__ = ["gang_job_problem", "job_layout"]
