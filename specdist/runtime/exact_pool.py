"""Exact mode's verification on the runtime's workers: a :data:`~specdist.engine.exact.TargetFn`
that spreads a round's drafted states over a :class:`~specdist.runtime.pool.WorkerPool`.

Each drafted state is one ``step`` job (one full model call of its sample at its own timestep) on
a reference worker; with ``W`` workers a round of ``L`` states takes ``⌈L / W⌉`` waves. The random
streams of exact mode are functions of (seed, step), so the samples do not depend on the worker
count (tests/test_exact_pool.py). Wired at the engine level (``sample_exact(target=...)``); the
``specdist generate`` job still refuses ``runtime.backend`` with ``method: exact``.
"""

from __future__ import annotations

import itertools

import torch

from ..engine.exact import TargetFn
from .jobs import DONE, STEP, Job
from .pool import WorkerFailure, WorkerPool


def pool_target(pool: WorkerPool, dtype: torch.dtype = torch.float32, poll_s: float = 0.01) -> TargetFn:
    """A target that evaluates every state on ``pool``'s workers, as many at once as are idle.

    ``rows`` index the conditioning the workers were built with (the batch's samples)."""
    ids = itertools.count()

    def target(states: torch.Tensor, timesteps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        pending = list(range(states.shape[0]))
        inflight: dict[int, int] = {}  # job id -> state index
        outputs: list[torch.Tensor | None] = [None] * states.shape[0]
        while pending or inflight:
            while pending and pool.idle() > 0:
                i = pending.pop(0)
                job = Job(next(ids), STEP, int(rows[i]), 0, float(timesteps[i]), "float32")
                inflight[job.id] = i
                pool.submit(job, (states[i: i + 1].to(dtype).cpu(),))
            for result in pool.wait(poll_s):
                i = inflight.pop(result.job.id)
                if result.status != DONE or result.output is None:
                    raise WorkerFailure(f"exact verification job {result.job.id} (sample {result.job.sample}) "
                                        f"came back {result.status}: {result.error}")
                outputs[i] = result.output[0]
        return torch.stack(outputs).float().to(states.device)
    return target
