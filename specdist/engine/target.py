"""Quality targets: turn "I want PSNR ≥ T dB against full compute" into per-step decisions.

A :class:`~specdist.engine.calibration.Calibration` (measured once per model and setting, without
training) says, for every step ``i``:

* ``gain[i]`` — output error per unit of the verifier's error (the probe's forecast error
  under-reports what a forecast does to the model output; ``1`` when the verifier *is* the output);
* ``damage[i]`` — the final-output RMS damage (pixels in [-1, 1], as PSNR measures it) caused by
  accepting a forecast whose output is off by a relative error of 1 at step ``i``: the sampler's
  coefficient on the model output at that step, the output's size, and the measured propagation
  of such errors to the end of the trajectory (``κ``, the worst calibration sample's);
* ``base[i]`` and ``growth`` — the output error expected at run length ``k`` after a full step,
  ``base[i] · k^growth``.

Damage adds up over a trajectory (forecast errors of one run point the same way), so a sample
whose accepted forecasts predict damages ``δ_i`` ends near ``RMS = Σ δ_i``. The target gives the
budget ``D = 2 · 10^(−T/20)`` (PSNR = 20 log10(2 / RMS)). :class:`TargetRule` then, per sample:

* accepts a checked forecast when its predicted damage ``δ = damage[i] · gain[i] · err`` is at most
  the step allowance ``λ`` and the sample's spent budget plus ``δ`` stays within ``D``; a
  rejection rolls back (the step is computed fully), spending nothing;
* computes a step fully *without* speculating when the forecast is predicted to fail (the
  predicted ``δ`` exceeds ``λ`` by the calibration's spread, or the budget is spent) — so a step
  never pays for a speculative call and then the full one when that can be foreseen;
* accepts without running the check (waives the probe) when even a pessimistic prediction
  (``exp(2σ)`` times the expected error) is far inside the allowance; the expected damage is
  booked against the budget all the same.

``λ`` is chosen by :func:`allowance`: a constant cap on each accepted step's damage is the
Lagrangian form of "fewest full steps for a total damage budget" when per-step damage grows with
the run length; the cap that needs the fewest full steps on the calibrated model (simulated,
pure arithmetic) is taken. Each sample's budget is its own, so an easy sample speculates more
than a hard one, and a sample's decisions never depend on its batch mates. Pure tensor code.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .config import CacheConfig
from .decision import Rule

if TYPE_CHECKING:
    from .calibration import Calibration

DIFFICULTY_MEMORY = 4
"""A sample's difficulty follows its last few checks (an exponential mean over about this many)."""
DIFFICULTY_LIMIT = 1.5
"""…and stays within ``exp(±DIFFICULTY_LIMIT)`` of the calibrated expectation."""
READ_SIGMAS = 1.0
"""A check's reading is booked this many ``gain_spread`` above the calibrated median ratio."""
WAIVE_SIGMAS = 2.0
"""The check is waived when the expected damage times ``exp(WAIVE_SIGMAS · σ)`` fits the allowance."""


def budget_for(target_psnr_db: float) -> float:
    """Final RMS error (data range 2) of an output at ``target_psnr_db`` against full compute."""
    return 2.0 * 10.0 ** (-target_psnr_db / 20.0)


def psnr_of_budget(rms: float) -> float:
    """Inverse of :func:`budget_for`."""
    return float("inf") if rms <= 0 else 20.0 * math.log10(2.0 / rms)


def pass_probability(expected: torch.Tensor, cap: torch.Tensor, spread: float) -> torch.Tensor:
    """``P(damage ≤ cap)`` when the damage is log-normal around ``expected`` with log-spread ``spread``."""
    if spread <= 0:
        return (expected <= cap).double()
    z = (torch.log(cap.clamp_min(1e-300)) - torch.log(expected.clamp_min(1e-300))) / spread
    return 0.5 * torch.erfc(-z / math.sqrt(2.0))


def simulate(damage: list[float], base: list[float], growth: float, forced: frozenset[int], max_run: int,
             cap: float, budget: float) -> tuple[int, list[float]]:
    """(full steps, damage spent before each step) of a typical sample under step allowance ``cap``
    and ``budget``: per-step damage ``damage[i] · base[i] · k^growth`` at run length ``k``,
    accepted while it fits."""
    full, spent, k, curve = 0, 0.0, 0, []
    for i in range(len(damage)):
        curve.append(spent)
        if i in forced or k >= max_run or not math.isfinite(base[i]):
            full, k = full + 1, 0
            continue
        delta = damage[i] * base[i] * (k + 1) ** growth
        if delta <= cap and spent + delta <= budget:
            spent, k = spent + delta, k + 1
        else:
            full, k = full + 1, 0
    return full, curve


def allowance(damage: list[float], base: list[float], growth: float, forced: frozenset[int], max_run: int,
              budget: float) -> tuple[float, list[float]]:
    """The step allowance ``λ`` that needs the fewest full steps within ``budget`` on the calibrated
    model (ties: the smaller ``λ``, which leaves budget for harder samples), and the typical
    sample's planned spending before each step under it."""
    best = None
    for j in range(61):
        cap = budget * 10.0 ** (-3.0 + 3.0 * j / 60)
        full, curve = simulate(damage, base, growth, forced, max_run, cap, budget)
        if best is None or full < best[0]:
            best = (full, cap, curve)
    return best[1], best[2]


class TargetRule(Rule):
    """``speca`` to a quality target (see the module doc). One per generation (it books budgets).

    Args:
        cfg: the cache config (warm-up, forced steps, ``max_run``, ``min_run``, the target).
        steps: steps of the trajectory (must equal the calibration's).
        samples: samples of the generation.
        calibration: the model's calibration for this setting.
        signal: ``probe`` (the engine's verifier: errors are the probe's, mapped by ``gain``) or
            ``output`` (the runtime verifies a draft against the reference output itself).
        spec_cost: a speculative call's cost over a full call's (default: the calibration's
            measurement); a forecast is tried only when its chance to pass exceeds it.
    """

    def __init__(self, cfg: CacheConfig, steps: int, samples: int, calibration: "Calibration",
                 signal: str = "probe", spec_cost: float | None = None) -> None:
        super().__init__(cfg, steps, samples)
        if calibration.steps != steps:
            raise ValueError(f"calibration is for {calibration.steps} steps, the trajectory has {steps}")
        self.cal, self.signal = calibration, signal
        self.target = cfg.effective_target_psnr_db
        self.budget = budget_for(self.target)
        # per step: final damage per unit of relative output error, at the target's damage level
        self.damage = [c * g for c, g in zip(calibration.coef, calibration.propagation_at(self.budget))]
        self.spec_cost = calibration.spec_cost if spec_cost is None else spec_cost
        self.cap, self.plan = allowance(self.damage, calibration.base, calibration.growth, self.forced,
                                        self.run_limit(), self.budget)
        self.spent = torch.zeros(samples, dtype=torch.float64)  # [B] predicted final damage booked
        self.difficulty = torch.zeros(samples, dtype=torch.float64)  # [B] mean log(measured / expected error)
        self.checks = torch.zeros(samples, dtype=torch.long)  # [B] verified forecasts behind `difficulty`
        self.pre_empted = torch.zeros(samples, dtype=torch.long)  # [B] steps computed fully by prediction
        self._waived_damage: dict[int, float] = {}

    def _scale(self, step: int) -> float:
        """Damage booked per unit of the verifier's error at ``step``: the probe's reading is
        mapped to an output error by the calibrated gain, read pessimistically (one
        ``gain_spread`` above the median)."""
        if self.signal != "probe":
            return self.damage[step]
        return self.damage[step] * self.cal.gain[step] * math.exp(READ_SIGMAS * self.cal.gain_spread)

    def threshold(self, step: int) -> float:
        """The verifier error at which a forecast at ``step`` would use the whole (planned) step allowance."""
        scale = self._scale(step)
        return self.cap / scale if scale > 0 else float("inf")

    def caps(self, step: int, samples: torch.Tensor) -> torch.Tensor:
        """``[n]`` step allowance of each sample: the planned ``λ`` scaled by how much budget the
        sample has left against the plan (an easy sample that spent less may take larger steps,
        one that spent more must take smaller ones), never more than what is left."""
        left = (self.budget - self.spent[samples]).clamp_min(0.0)
        planned_left = max(self.budget - self.plan[step], 1e-12)
        return torch.minimum(self.cap * left / planned_left, left)

    def _expected_damage(self, step: int, samples: torch.Tensor, run_len: torch.Tensor) -> torch.Tensor:
        """``[n]`` damage a forecast at run length ``run_len + 1`` is expected to cause."""
        base = self.cal.base[step]
        if not math.isfinite(base):
            return torch.full((len(samples),), float("inf"), dtype=torch.float64)
        k = (run_len.double() + 1.0) ** self.cal.growth
        return self.damage[step] * base * k * torch.exp(self.difficulty[samples])

    def must_compute(self, step: int, run_len: torch.Tensor, ready: torch.Tensor) -> torch.Tensor:
        full = super().must_compute(step, run_len, ready)
        if step in self.forced:
            return full
        expected = self._expected_damage(step, torch.arange(self.samples), run_len)
        denom = self.damage[step] * self.cal.gain[step]
        # what the check reads per unit of damage; with no damage propagating (denom 0) it cannot matter
        read = self._scale(step) / denom if self.signal == "probe" and denom > 0 else 1.0
        caps = self.caps(step, torch.arange(self.samples))
        chance = pass_probability(expected * read, caps, self.cal.spread)  # the check books with its margin
        chance = torch.where(self.spent + expected <= self.budget, chance, torch.zeros_like(chance))
        hopeless = chance <= self.spec_cost  # trying costs more than it is expected to save
        self.pre_empted += (hopeless & ~full).long()
        return full | hopeless

    def waive(self, step: int, samples: torch.Tensor, run_len: torch.Tensor) -> torch.Tensor:
        expected = self._expected_damage(step, samples, run_len)
        sure = (expected * math.exp(WAIVE_SIGMAS * self.cal.spread) <= self.caps(step, samples)) & (
            self.spent[samples] + expected <= self.budget)
        waived = sure | (run_len < self.cfg.min_run)
        self._waived_damage = {int(s): float(e) for s, e, w in zip(samples, expected, waived) if w}
        return waived

    def accept(self, step: int, samples: torch.Tensor, err: torch.Tensor, waived: torch.Tensor,
               run_len: torch.Tensor) -> torch.Tensor:
        scale = self._scale(step)
        caps = self.caps(step, samples).tolist()
        ok = torch.zeros(len(samples), dtype=torch.bool)
        for j, (sample, e, w, k) in enumerate(zip(samples.tolist(), err.double().tolist(), waived.tolist(),
                                                  run_len.tolist())):
            if w:  # checked in waive() against a pessimistic prediction; the expectation is booked
                delta = self._waived_damage.get(sample, 0.0)
            elif not math.isfinite(e):
                continue
            else:
                delta = scale * e
                self._learn(sample, step, e, k + 1)
                if delta > caps[j]:
                    continue
            if self.spent[sample] + delta <= self.budget:
                self.spent[sample] += delta
                ok[j] = True
        return ok

    def _learn(self, sample: int, step: int, err: float, k: int) -> None:
        """Fold this check into the sample's difficulty: a running log-mean of measured over
        expected output error (expected: ``base[step] · k^growth``), clamped."""
        base = self.cal.base[step]
        gain = self.cal.gain[step] if self.signal == "probe" else 1.0
        if not (math.isfinite(base) and base > 0 and err > 0):
            return
        n = int(self.checks[sample])
        ratio = math.log(err * gain / (base * k ** self.cal.growth))
        weight = 1.0 / min(n + 1, DIFFICULTY_MEMORY)  # a running mean over the last checks
        level = (1 - weight) * float(self.difficulty[sample]) + weight * ratio
        self.difficulty[sample] = max(-DIFFICULTY_LIMIT, min(DIFFICULTY_LIMIT, level))
        self.checks[sample] = n + 1

    def summary(self) -> dict:
        return {
            "target_psnr_db": self.target,
            "budget_rms": self.budget,
            "step_allowance_rms": self.cap,
            "spec_cost": self.spec_cost,
            "predicted_psnr_db": [round(psnr_of_budget(float(s)), 2) if s > 0 else None  # None: nothing forecast
                                  for s in self.spent],
            "pre_empted_full_steps": self.pre_empted.tolist(),
        }
