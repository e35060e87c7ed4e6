"""One decision module for every place a speculative step is decided (DESIGN §2.2, §3).

The single-device engine (:mod:`~specdist.engine.speculative`), the diffusers pipeline drop-in
(:mod:`~specdist.engine.pipeline`) and the distributed runtime (:mod:`~specdist.runtime.rule`) all
ask a :class:`Rule` the same four questions, so a method means the same everywhere:

1. *Forced full steps* — :func:`forced_steps`: the warm-up and ``cache.full_steps``.
2. *Forecaster time* — :func:`forecaster_time`: the step index or the scheduler's own ``t``.
3. *Must this sample compute fully without speculating?* — :meth:`Rule.must_compute` (forced, an
   empty cache, a run that is too long, or — quality target — a forecast predicted to fail or to
   overspend the sample's damage budget, so no speculative call is wasted on it).
4. *Is this forecast accepted?* — :meth:`Rule.accept`: finite, and ``err < τ(step)`` for a
   threshold schedule, or "the damage it predicts fits the step's allowance and the sample's
   budget" for a quality target (:class:`~specdist.engine.target.TargetRule`).

The acceptance test is strict (``err < τ``): with ``τ = 0`` every check fails and the result is
the full-compute trajectory, bit for bit. NaN/Inf errors never pass. Everything here is pure
tensor logic over per-sample counters: no model, no Ray, no torch.distributed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import CacheConfig
from .verify import threshold


def forced_steps(cfg: CacheConfig, steps: int) -> frozenset[int]:
    """Steps always computed fully: the first ``cfg.warmup`` and ``cfg.full_steps`` (negative
    indices count from the end)."""
    return frozenset(range(min(cfg.warmup, steps))) | frozenset(s % steps for s in cfg.full_steps)


def forecaster_time(cfg: CacheConfig, step: int, timestep: torch.Tensor | float, num_train_timesteps: float) -> float:
    """The forecaster's time of a step: its index, or the scheduler's time ``t / num_train_timesteps``."""
    return float(step) if cfg.time == "index" else float(timestep) / num_train_timesteps


def accept_errors(err: torch.Tensor, tau: float) -> torch.Tensor:
    """Bool mask: ``err < tau`` and finite (the one acceptance test of a threshold schedule)."""
    return torch.isfinite(err) & (err < tau)


class Rule:
    """The decisions of one generation of ``samples`` samples over ``steps`` steps.

    Subclasses: :class:`FixedIntervalRule` (``fora``, ``taylorseer``), :class:`ThresholdRule`
    (``speca`` with a τ schedule) and :class:`~specdist.engine.target.TargetRule` (``speca`` with a
    quality target). A rule may keep per-sample state (a damage budget); make one per generation.
    """

    verify: bool = True
    """Whether forecasts are checked (by the probe, or the reference output in the runtime)."""

    def __init__(self, cfg: CacheConfig, steps: int, samples: int) -> None:
        self.cfg, self.steps, self.samples = cfg, steps, samples
        self.forced = forced_steps(cfg, steps)

    def threshold(self, step: int) -> float | None:
        """The threshold on the verifier's error at ``step`` (``None`` where not applicable)."""
        return None

    def run_limit(self) -> int:
        """Most consecutive speculative steps after a full one."""
        return self.cfg.max_run

    def must_compute(self, step: int, run_len: torch.Tensor, ready: torch.Tensor) -> torch.Tensor:
        """Bool ``[B]``: samples computed fully at ``step`` without a speculative call.

        Args:
            step: the step index.
            run_len: ``[B]`` consecutive speculative steps of each sample since its last full step.
            ready: ``[B]`` samples whose cache holds at least one full step.
        """
        return (~ready) | self.run_ends(step, run_len)

    def run_ends(self, step: int, run_len: torch.Tensor) -> torch.Tensor:
        """Bool ``[B]``: a run of speculative steps cannot go on at ``step`` — the step is forced, or
        the run (``run_len`` steps so far) is at its limit. The latency runtime ends its windows here."""
        return (step in self.forced) | (run_len >= self.run_limit())

    def waive(self, step: int, samples: torch.Tensor, run_len: torch.Tensor) -> torch.Tensor:
        """Bool ``[n]``: speculative steps of ``samples`` accepted without running the check."""
        return run_len < self.cfg.min_run

    def accept(self, step: int, samples: torch.Tensor, err: torch.Tensor, waived: torch.Tensor,
               run_len: torch.Tensor) -> torch.Tensor:
        """Bool ``[n]``: which forecasts of ``samples`` (errors ``err [n]``, NaN where ``waived``; each
        sample ``run_len [n]`` speculative steps into its run) are accepted. Call once per step with
        every speculating sample; stateful rules book them."""
        tau = self.threshold(step)
        return waived.clone() if tau is None else waived | accept_errors(err, tau)

    def observe_full(self, samples: torch.Tensor) -> None:
        """``samples`` computed a full step (a stateful rule may reset per-run bookkeeping)."""

    def summary(self) -> dict:
        """What the report says about the rule."""
        return {}


class FixedIntervalRule(Rule):
    """``fora`` / ``taylorseer``: one full step every ``cfg.interval`` steps, forecasts unchecked."""

    verify = False

    def run_limit(self) -> int:
        return self.cfg.interval - 1

    def waive(self, step: int, samples: torch.Tensor, run_len: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(samples), dtype=torch.bool)


class ThresholdRule(Rule):
    """``speca`` with a threshold schedule ``τ(p) = max(τ0 · β^p, τ_min)``, ``p = step / (N − 1)``
    (the expert override of the quality target), or any ``threshold_fn(step) -> τ`` (ablations)."""

    def __init__(self, cfg: CacheConfig, steps: int, samples: int,
                 threshold_fn: Callable[[int], float] | None = None) -> None:
        super().__init__(cfg, steps, samples)
        self.threshold_fn = threshold_fn

    def threshold(self, step: int) -> float:
        if self.threshold_fn is not None:
            return float(self.threshold_fn(step))
        tau0, beta, tau_min = self.cfg.threshold_schedule()
        return threshold(step / max(self.steps - 1, 1), tau0, beta, tau_min)

    def summary(self) -> dict:
        if self.threshold_fn is not None:
            return {"threshold": "custom"}
        tau0, beta, tau_min = self.cfg.threshold_schedule()
        return {"threshold": {"tau0": tau0, "beta": beta, "tau_min": tau_min}}


def make_rule(method: str, cfg: CacheConfig, steps: int, samples: int, *, calibration=None,
              threshold_fn: Callable[[int], float] | None = None, signal: str = "probe") -> Rule:
    """The rule of ``method`` for one generation: fixed interval (``fora``, ``taylorseer``), a
    threshold schedule (``speca`` with ``tau0``, or ``threshold_fn``), or a quality target
    (``speca`` otherwise; needs the model's ``calibration``)."""
    if method != "speca":
        return FixedIntervalRule(cfg, steps, samples)
    if threshold_fn is not None or not cfg.uses_target:
        return ThresholdRule(cfg, steps, samples, threshold_fn)
    if calibration is None:
        raise ValueError("speca with a quality target needs the model's calibration "
                         "(specdist.engine.calibration.ensure_calibration), or set cache.tau0")
    from .target import TargetRule

    return TargetRule(cfg, steps, samples, calibration, signal)
