"""Configuration of the feature-caching methods (``cache:`` section of a job config).

Methods (``method`` key of the job):

* ``full`` — every step computes the whole model (the reference).
* ``fora`` — FORA: reuse the last full step's features for ``interval − 1`` steps, no checks.
* ``taylorseer`` — TaylorSeer: Taylor forecast of order ``order`` over full steps, full every
  ``interval`` steps, no checks.
* ``speca`` — SpeCa forecast-then-verify: Taylor forecast, a one-block probe checks each forecast
  against ``τ(p) = max(τ0·β^p, τ_min)``; a rejected step is recomputed fully at the same state
  (true rollback), per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import check_value as _check

CACHE_METHODS = ("fora", "taylorseer", "speca")
TIME_UNITS = ("index", "timestep")
METRICS = ("rel_l1", "rel_l2", "cosine")


@dataclass(kw_only=True)
class CacheConfig:
    """Knobs of the caching methods; each is used by the methods named in its doc."""

    order: int = 1
    """Taylor order m (taylorseer, speca); fora always uses 0 (reuse)."""
    time: str = "index"
    """Distance unit of the Taylor expansion: ``index`` (step index, as the public code) or
    ``timestep`` (the scheduler's own time t / num_train_timesteps, i.e. sigma for flow matching)."""
    interval: int = 3
    """fora, taylorseer: one full step every ``interval`` steps."""
    probe_block: int = -1
    """speca: the block run for real to verify a forecast (negative counts from the end)."""
    metric: str = "rel_l2"
    """speca: forecast error: ``rel_l1`` (SpeCa code), ``rel_l2`` (SpeCa paper) or ``cosine``."""
    tau0: float = 0.1
    """speca: threshold at progress 0."""
    beta: float = 0.1
    """speca: threshold decay over the trajectory, τ(p) = max(τ0·β^p, τ_min)."""
    tau_min: float = 0.0
    """speca: threshold floor."""
    warmup: int = 3
    """All methods: leading steps always computed fully."""
    full_steps: list[int] = field(default_factory=list)
    """All methods: step indices always computed fully (negative counts from the end, e.g. -1)."""
    min_run: int = 0
    """speca: speculative steps right after a full step accepted without the probe check
    (NaN/Inf forecasts are still rejected); 0 verifies every forecast."""
    max_run: int = 8
    """speca: at most this many consecutive speculative steps before a forced full step."""
    max_cache_bytes: int = 0
    """Cap on the forecaster's memory; the Taylor order is lowered until the cache fits
    (0 = no cap). Fails clearly if even reuse (order 0) does not fit."""

    def validate(self, prefix: str = "cache.") -> None:
        _check(0 <= self.order <= 6, f"{prefix}order", self.order, "an integer 0..6")
        _check(self.time in TIME_UNITS, f"{prefix}time", self.time, f"one of {list(TIME_UNITS)}")
        _check(self.interval >= 1, f"{prefix}interval", self.interval, "an integer >= 1")
        _check(self.metric in METRICS, f"{prefix}metric", self.metric, f"one of {list(METRICS)}")
        _check(self.tau0 >= 0, f"{prefix}tau0", self.tau0, "a number >= 0")
        _check(0 < self.beta <= 1, f"{prefix}beta", self.beta, "a number in (0, 1]")
        _check(self.tau_min >= 0, f"{prefix}tau_min", self.tau_min, "a number >= 0")
        _check(self.warmup >= 1, f"{prefix}warmup", self.warmup, "an integer >= 1 (the cache needs a full step)")
        _check(self.min_run >= 0, f"{prefix}min_run", self.min_run, "an integer >= 0")
        _check(self.max_run >= max(1, self.min_run), f"{prefix}max_run", self.max_run,
               f"an integer >= max(1, min_run={self.min_run})")
        _check(self.max_cache_bytes >= 0, f"{prefix}max_cache_bytes", self.max_cache_bytes, "an integer >= 0")
