"""What each rank of the torchrun gang-pool failure test runs (gloo on CPU, started by
:func:`gang_ranks.run_world`): rank 0 is the torchrun coordinator (:func:`run_distributed` with
``runtime.backend=torchrun``), the other ranks run :func:`run_worker_rank` exactly as
``specdist generate`` does under torchrun; one member is SIGKILLed, or hangs, in the middle of a model call."""

from __future__ import annotations

import os
import signal
import time


from specdist.config import load_config
from specdist.errors import SpecdistError
from specdist.generate import job_inputs
from specdist.loading import load_model
from specdist.runtime import torchrun_backend
from specdist.runtime.run import run_distributed, worker_spec
from specdist.sampling import initial_noise


def _fail_on_call(n: int, how: str):
    """Wrap ``enable_context_parallel`` so that this rank fails inside its ``n``-th model call (in the
    first block, after the call's first collectives): ``kill``: SIGKILLs itself; ``hang``: sleeps."""
    enable = torchrun_backend.enable_context_parallel

    def wrapped(model, adapter, gang, backend="native"):
        out = enable(model, adapter, gang, backend)
        calls = {"n": 0}

        def die(module, args):
            calls["n"] += 1
            if calls["n"] == n:
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)
        adapter.blocks(model)[0].register_forward_pre_hook(die)
        return out
    torchrun_backend.enable_context_parallel = wrapped


def job(overrides: list[str]):
    """The job of ``overrides`` as ``specdist generate`` builds it, as :func:`run_distributed`'s
    positional arguments: config, model, noise, prompts, labels, guidance."""
    cfg = load_config(None, overrides)
    bundle = load_model(cfg.model)
    prompts, labels = job_inputs(cfg, bundle)
    noise = initial_noise(bundle.latent_shape(None, None, None), [cfg.seed + i for i in range(cfg.num_samples)])
    return cfg, bundle, noise, prompts, labels, cfg.guidance_scale or bundle.default_guidance


def _serve(rank: int, overrides: list[str], victim: int | None, call: int, how: str = "kill") -> dict:
    cfg = load_config(None, [*overrides, "runtime.backend=torchrun"])
    if rank == victim:
        _fail_on_call(call, how)
    return {"jobs": torchrun_backend.run_worker_rank(cfg, worker_spec(cfg, [], [], 1.0))}


def run_job(rank: int, world: int, overrides: list[str]) -> dict:
    """Rank 0 returns the run's latents (as lists) and decisions; workers serve."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if rank != 0:
        return _serve(rank, overrides, None, 0)
    run = run_distributed(*job([*overrides, "runtime.backend=torchrun"]), progress=False, log=lambda m: None)
    return {"latents": run.latents.tolist(), "decisions": run.decisions, "layout": run.stats.extra["layout"]}


def member_fails(rank: int, world: int, overrides: list[str], victim: int, call: int, how: str) -> dict | None:
    """Rank ``victim`` dies (``kill``) or hangs (``hang``) in its ``call``-th model call. Rank 0 returns
    the run's error and how long after the start it came; workers serve."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if rank != 0:
        return _serve(rank, overrides, victim, call, how)
    args = job([*overrides, "runtime.backend=torchrun"])
    start = time.perf_counter()
    try:
        run_distributed(*args, progress=False, log=lambda m: None)
    except SpecdistError as exc:
        return {"error": str(exc), "seconds": time.perf_counter() - start, "type": type(exc).__name__}
    raise AssertionError("the run survived a failed gang member")


__all__ = ["job", "member_fails", "run_job"]
