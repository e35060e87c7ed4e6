"""Which samples must compute a full step (pure logic over per-sample counters)."""

from __future__ import annotations

import torch

from .config import CacheConfig


def must_compute_full(method: str, cfg: CacheConfig, step: int, steps: int, run_len: torch.Tensor,
                      ready: torch.Tensor) -> torch.Tensor:
    """Bool ``[B]``: samples whose step ``step`` is computed fully without speculating.

    Args:
        method: ``fora``, ``taylorseer`` or ``speca``.
        cfg: the cache config.
        step: the step index.
        steps: the number of steps of the trajectory.
        run_len: ``[B]`` consecutive speculative steps of each sample since its last full step.
        ready: ``[B]`` samples whose cache holds at least one full step.
    """
    pinned = step in {s % steps for s in cfg.full_steps}
    forced = (~ready) | (step < cfg.warmup) | pinned
    if method == "speca":
        return forced | (run_len >= cfg.max_run)
    return forced | (run_len >= cfg.interval - 1)


def verification_waived(cfg: CacheConfig, run_len: torch.Tensor) -> torch.Tensor:
    """Bool ``[B]``: speculative steps accepted without the probe check (``min_run``)."""
    return run_len < cfg.min_run
