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
    """Why the job's worker calls cannot run on a gang yet (``None`` when they can).

    On a gang every rank holds the whole model output (gathered at the plan's end), but block-level
    features only for its own shard of the tokens. Jobs that return or take block-level features
    (latency mode with ``cache.granularity=block``: measuring, recording and draft calls) and
    generations whose engine decides on them (throughput mode with a caching method) would need the
    features gathered or the decisions agreed (:mod:`specdist.runtime.agree`), which the pool does
    not do yet.
    """
    rt = cfg.runtime
    if rt.mode == "latency" and cfg.method != "full" and cfg.cache.granularity != "output":
        return (f"cache.granularity={cfg.cache.granularity} with runtime.mode=latency records and drafts block-level "
                f"features, which a gang holds sharded over its ranks (not gathered yet); use cache.granularity=output")
    if rt.mode == "throughput" and cfg.method != "full":
        return (f"method={cfg.method} with runtime.mode=throughput decides inside each generation on block-level "
                f"features a gang holds sharded (decisions not agreed over the gang yet); use runtime.mode=latency "
                f"or method=full")
    return None


def job_layout(cfg: Any, bundle: Any, latent_shape: tuple[int, ...] | None = None, cond: Any = None,
               backend: str = "native") -> ParallelDims:
    """The layout of ``cfg.runtime`` for ``bundle``'s model; raises :class:`ConfigError` when it does not fit.

    Gangs (``gang_size > 1``) run on the torchrun pool (:mod:`specdist.runtime.torchrun_backend`) for
    the jobs whose every branch depends only on the gathered model output (:func:`gang_job_problem`);
    the ray pool does not run gangs yet: such a layout is validated, then refused with one line
    rather than run as single-device workers.
    """
    rt = cfg.runtime
    model, adapter = bundle.transformer, bundle.adapter
    g = rt.gang_size
    if g == AUTO:  # the efficiency model is GPU-measured; without an accelerator a worker stays one rank
        if torch.accelerator.device_count() > 0:
            raise ConfigError("runtime.gang_size=auto on GPUs needs gangs in the ray/torchrun pools (issue 12, "
                              "phase 2); set runtime.gang_size=1 for now")
        g = 1
    heads = adapter.attention_heads(model) if hasattr(model, "config") else None
    dims = ParallelDims.from_runtime(rt, gang_size=g, heads=heads, ring_supported=ring_supported(backend))
    if dims.gang_size > 1:
        lengths = adapter.context_parallel_lengths(model, latent_shape, cond) if latent_shape is not None else {}
        dims.check_model(heads=heads, lengths=lengths, ring_supported=ring_supported(backend), backend=backend,
                         unsupported=adapter.context_parallel_unsupported(model))
        if rt.backend != "torchrun":
            raise ConfigError(f"runtime.gang_size={dims.gang_size}: {dims.describe()} is a valid layout, but the "
                              f"{rt.backend} pool does not run gangs yet (issue 12, phase 2; runtime.backend=torchrun "
                              f"does); use runtime.gang_size=1")
        problem = gang_job_problem(cfg)
        if problem:
            raise ConfigError(f"runtime.gang_size={dims.gang_size}: {problem}")
    if rt.backend == "ray" and not rt.ray_address:  # a local cluster on this machine
        needs = RankNeeds(memory_bytes=RankNeeds().memory_bytes + _model_bytes_on_host(model))
        check_capacity(dims, local_resources(), needs, rt.startup_timeout_s)
    return dims


__all__ = ["gang_job_problem", "job_layout"]
