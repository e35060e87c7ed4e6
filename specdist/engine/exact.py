"""``method: exact`` — exact speculative sampling of a stochastic sampler (DESIGN §2.4).

Per sample, one round from the committed state ``x_s`` at step ``s``:

1. **Draft** ``L`` transitions: ``x̃_s = x_s``; for ``j = 0..L−1`` (step ``k = s + j``) the draft
   output ``d_k`` (:class:`OutputDraft`: from the newest committed target evaluation — reused, or
   Taylor-forecast to step ``k`` — carried as the predicted clean sample or as the raw output)
   gives ``m^p_k = m_k(x̃_k, d_k)`` and ``x̃_{k+1} = m^p_k + σ_k Z_k``. The draft only reads
   committed evaluations, made before this round's noise was drawn, as exactness requires.
2. **Verify** the ``L`` drafted states ``x̃_s … x̃_{s+L−1}`` with *one* batched target call (every
   sample's window in the same call): ``m^q_k = m_k(x̃_k, F(x̃_k, t_k))``.
3. **Accept** step ``k`` with probability ``min(1, q/p)`` (:func:`~specdist.engine.exact_math.coupled_step`);
   at the first rejection commit the reflection-coupled residual sample and drop the rest.

Every committed state is an exact sample of the target chain given its predecessor, so the output
law is the target sampler's. ``Z_k`` and the acceptance uniform ``U_k`` are fixed functions of
(sample seed, step) (:func:`~specdist.engine.exact_math.step_noise`), so a sample's result does not
depend on which samples share its batch, on the batch order, or on how the verification is spread
over workers. A round commits between 1 and ``L`` steps; its latency is one target call when ``L``
verifications run in parallel, its cost ``L`` target evaluations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..models.base import Conditioning, ModelAdapter
from ..sampling import SampleResult, fresh_scheduler, init_latents, model_device, model_dtype
from .config import ExactConfig
from .exact_math import GaussianKernel, coupled_step, gaussian_draw, gaussian_kernels, step_noise, step_uniform
from .forecast import TaylorCache

TargetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``target(states [n, *shape], timesteps [n], rows [n] sample index) -> outputs [n, *shape]`` float32."""

ACCEPTED, REJECTED, TARGET = "accepted", "rejected", "target"
"""Per-step outcomes: the draft was kept; the draft was rejected and the residual sampled; no draft
(the first step, or σ = 0) so the target's transition was taken."""


@dataclass
class ExactStats:
    """What exact sampling did, per sample."""

    steps: int
    outcomes: list[list[str]]  # [samples][steps] ACCEPTED / REJECTED / TARGET
    windows: list[list[int]]  # [samples][rounds] L of each round (target evaluations of the round)
    run_lengths: list[list[int]]  # [samples][rounds] drafts accepted in the round before its end
    batched_calls: int = 0  # target calls made (each batched over samples x window)
    pool_jobs: int = 0  # step jobs sent to reference workers (0: verified in this process)

    @property
    def sequential_rounds(self) -> list[int]:
        """Rounds per sample: the latency in target calls when a round's L verifications run in parallel."""
        return [len(w) for w in self.windows]

    @property
    def target_evaluations(self) -> list[int]:
        """Target evaluations per sample (the cost; the target sampler spends ``steps``)."""
        return [sum(w) for w in self.windows]

    def acceptance_rate(self) -> list[float | None]:
        """Accepted drafts / verified drafts per sample (steps without a draft are not counted)."""
        rates = []
        for outs in self.outcomes:
            drafted = sum(o != TARGET for o in outs)
            rates.append(sum(o == ACCEPTED for o in outs) / drafted if drafted else None)
        return rates

    def acceptance_per_step(self) -> list[float | None]:
        """Share of samples whose draft was accepted at each step (``None`` where none drafted)."""
        out = []
        for k in range(self.steps):
            col = [o[k] for o in self.outcomes if o[k] != TARGET]
            out.append(round(sum(c == ACCEPTED for c in col) / len(col), 4) if col else None)
        return out

    def latency_units(self, workers: int) -> list[int]:
        """Per sample, emulated latency in target-call units with ``workers`` parallel verifiers:
        ``Σ_rounds ⌈L / workers⌉`` (the target sampler: ``steps``)."""
        return [sum(math.ceil(w / workers) for w in ws) for ws in self.windows]

    @staticmethod
    def concat(parts: list["ExactStats"]) -> "ExactStats":
        """The stats of several batches as one (samples in order)."""
        return ExactStats(parts[0].steps, [o for p in parts for o in p.outcomes], [w for p in parts for w in p.windows],
                          [r for p in parts for r in p.run_lengths], sum(p.batched_calls for p in parts),
                          sum(p.pool_jobs for p in parts))

    def as_dict(self) -> dict[str, Any]:
        """The report's ``exact`` numbers."""
        return {
            "sequential_rounds": self.sequential_rounds,
            "target_evaluations": self.target_evaluations,
            "acceptance_rate": [None if r is None else round(r, 4) for r in self.acceptance_rate()],
            "accepted_run_lengths": self.run_lengths,
            "windows": self.windows,
            "acceptance_per_step": self.acceptance_per_step(),
            "batched_target_calls": self.batched_calls,
            "latency_units_by_workers": {str(w): self.latency_units(w) for w in (1, 2, 4, 8)},
        }


@dataclass
class ExactResult(SampleResult):
    """A :class:`SampleResult` with the exact sampler's statistics."""

    exact: ExactStats | None = None


class OutputDraft:
    """Proposer of the draft model outputs, from the committed target evaluations of each sample.

    What is carried forward is either the model ``output`` itself or the clean sample it predicts
    (``x0``, :meth:`GaussianKernel.x0`; turned back into an output at the drafted state). ``frozen``
    reuses the newest committed value; ``taylor`` extrapolates the Newton polynomial through the last
    ``order + 1`` committed values to the drafted step (time = step index, the engine's
    :class:`~specdist.engine.forecast.TaylorCache`)."""

    def __init__(self, cfg: ExactConfig, samples: int, kernels: list[GaussianKernel]) -> None:
        self.cache = TaylorCache(cfg.order, samples) if cfg.draft == "taylor" else None
        self.space = cfg.space
        self.kernels = kernels
        self.last: list[torch.Tensor | None] = [None] * samples  # [samples] newest committed value

    def ready(self, row: int) -> bool:
        """Whether sample ``row`` has a committed evaluation to draft from."""
        return self.last[row] is not None

    def record(self, row: int, output: torch.Tensor, step: int, state: torch.Tensor) -> None:
        """Record the target ``output`` ``[*shape]`` at the committed ``state`` of ``step``."""
        value = self.kernels[step].x0(state, output) if self.space == "x0" else output
        self.last[row] = value
        if self.cache is not None:
            self.cache.update(torch.tensor([row]), (value[None],), float(step))

    def propose(self, row: int, step: int, state: torch.Tensor) -> torch.Tensor:
        """The draft output ``[*shape]`` for ``step`` at drafted ``state``."""
        value = self.last[row] if self.cache is None else self.cache.forecast(torch.tensor([row]), float(step))[0][0]
        return self.kernels[step].output_for_x0(state, value) if self.space == "x0" else value


class WindowPolicy:
    """Each round's window L: fixed, or adaptive from the sample's committed outcomes."""

    def __init__(self, cfg: ExactConfig) -> None:
        self.cfg = cfg

    def window(self, outcomes: list[str]) -> int:
        """L for the next round given the sample's outcomes so far (committed history only)."""
        if not self.cfg.adaptive:
            return self.cfg.window
        drafted = [o for o in outcomes if o != TARGET]
        if not drafted:
            return self.cfg.window
        rate = (sum(o == ACCEPTED for o in drafted) + 1) / (len(drafted) + 2)  # Laplace-smoothed â
        return max(1, min(self.cfg.max_window, math.ceil(math.log(0.1) / math.log(rate))))


def model_target(model: nn.Module, adapter: ModelAdapter, cond: Conditioning) -> TargetFn:
    """A :data:`TargetFn` running ``model`` locally: one batched call, one timestep per state. (The
    schedulers exact mode supports have no input scaling: ``scale_model_input`` is the identity.)"""
    dtype = model_dtype(model)

    def target(states: torch.Tensor, timesteps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            sub = cond.select(rows)
            return adapter.predict(model, states.to(dtype), timesteps.to(states.device), sub).float()
    return target


@dataclass
class _Window:
    """One sample's drafted window."""

    row: int
    start: int  # first step of the window
    states: list[torch.Tensor] = field(default_factory=list)  # [L + 1] x̃_s … x̃_{s+L} ([*shape] each)
    means: list[torch.Tensor | None] = field(default_factory=list)  # [L] m^p_k (None: no draft)
    noise: list[torch.Tensor] = field(default_factory=list)  # [L] Z_k


def _draft(row: int, start: int, length: int, x: torch.Tensor, kernels: list[GaussianKernel], draft: OutputDraft,
           seed: int) -> _Window:
    """Draft ``length`` transitions of sample ``row`` from its committed state ``x`` at ``start``."""
    win = _Window(row, start, [x])
    for j in range(length):
        k = start + j
        z = step_noise(seed, k, tuple(x.shape)).to(x.device)
        mean = kernels[k].mean(win.states[-1], draft.propose(row, k, win.states[-1])) if draft.ready(row) else None
        win.means.append(mean)
        win.noise.append(z)
        win.states.append(gaussian_draw(mean, kernels[k].std, z) if mean is not None else win.states[-1])
    return win


def sample_exact(model: nn.Module, adapter: ModelAdapter, scheduler: Any, cond: Conditioning, noise: torch.Tensor,
                 steps: int, seeds: list[int], cfg: ExactConfig, *, progress: bool = True, desc: str = "exact",
                 target: TargetFn | None = None, coupling: str = "reflection") -> ExactResult:
    """Sample ``noise`` (``[B, *shape]``, sample ``b`` from ``seeds[b]``) exactly as the scheduler's
    stochastic chain would, in rounds of drafted windows verified by one batched target call.

    ``target`` replaces the local model call (e.g. workers); ``coupling`` other than ``reflection``
    is a deliberately broken coupling for tests (:func:`~specdist.engine.exact_math.coupled_step`).
    Raises :class:`~specdist.errors.ConfigError` for a deterministic sampler (σ = 0) or a scheduler
    without Gaussian steps."""
    device = model_device(model)
    sched = fresh_scheduler(scheduler)
    adapter.set_timesteps(sched, steps, tuple(noise.shape[1:]), device)
    kernels = gaussian_kernels(sched, cfg.eta)
    n = len(kernels)
    timesteps = [k.timestep for k in kernels]
    target = target or model_target(model, adapter, cond.to(device, model_dtype(model)))
    samples = noise.shape[0]
    x = list(init_latents(sched, noise, device))
    pos = [0] * samples
    draft, policy = OutputDraft(cfg, samples, kernels), WindowPolicy(cfg)
    stats = ExactStats(n, [[] for _ in range(samples)], [[] for _ in range(samples)], [[] for _ in range(samples)])
    bar = tqdm(total=n * samples, desc=desc, disable=not progress, leave=False)
    start = time.perf_counter()
    while any(p < n for p in pos):
        wins = []
        for b in range(samples):
            if pos[b] < n:  # a sample with no committed evaluation yet takes one plain target step
                length = min(policy.window(stats.outcomes[b]), n - pos[b]) if draft.ready(b) else 1
                wins.append(_draft(b, pos[b], length, x[b], kernels, draft, seeds[b]))
        states = torch.stack([s for w in wins for s in w.states[:-1]])
        ts = torch.tensor([timesteps[w.start + j] for w in wins for j in range(len(w.means))], dtype=torch.float32)
        rows = torch.tensor([w.row for w in wins for _ in w.means])
        outputs = target(states, ts, rows)
        stats.batched_calls += 1
        offset = 0
        for w in wins:
            committed = _verify(w, outputs[offset: offset + len(w.means)], kernels, draft, seeds[w.row],
                                stats, coupling)
            offset += len(w.means)
            x[w.row] = committed
            bar.update(len(stats.outcomes[w.row]) - pos[w.row])
            pos[w.row] = len(stats.outcomes[w.row])
    bar.close()
    return ExactResult(latents=torch.stack(x).float().cpu(), nfe=sum(stats.target_evaluations) / samples,
                       wall_s=time.perf_counter() - start, timesteps=timesteps, exact=stats)


def _verify(win: _Window, outputs: torch.Tensor, kernels: list[GaussianKernel], draft: OutputDraft, seed: int,
            stats: ExactStats, coupling: str) -> torch.Tensor:
    """Accept ``win``'s drafts in order against the target ``outputs`` ``[L, *shape]``; record the
    committed evaluations and outcomes; return the committed state at the end of the round."""
    b = win.row
    accepted = 0
    stats.windows[b].append(len(win.means))
    for j, (mean_p, z) in enumerate(zip(win.means, win.noise)):
        k = win.start + j
        kernel = kernels[k]
        state = win.states[j]  # committed: the round's start or an accepted draft
        draft.record(b, outputs[j], k, state)
        mean_q = kernel.mean(state, outputs[j])
        if mean_p is None or kernel.std <= 0:  # no draft, or a deterministic step: the target's transition
            stats.outcomes[b].append(TARGET)
            stats.run_lengths[b].append(accepted)
            return gaussian_draw(mean_q, kernel.std, z)
        step = coupled_step(mean_p[None], mean_q[None], kernel.std, z[None], step_uniform(seed, k)[None], coupling)
        if bool(step.accepted[0]):
            stats.outcomes[b].append(ACCEPTED)
            accepted += 1
            continue
        stats.outcomes[b].append(REJECTED)
        stats.run_lengths[b].append(accepted)
        return step.state[0]
    stats.run_lengths[b].append(accepted)
    return win.states[-1]


def sample_target_chain(model: nn.Module, adapter: ModelAdapter, scheduler: Any, cond: Conditioning,
                        noise: torch.Tensor, steps: int, seeds: list[int], eta: float | None = None, *,
                        progress: bool = True, desc: str = "target sampler",
                        target: TargetFn | None = None) -> SampleResult:
    """The plain target sampler exact mode reproduces in law: one target call per step,
    ``x_{k+1} = m_k(x_k, F(x_k)) + σ_k Z_k`` with the same per-(seed, step) noise streams."""
    device = model_device(model)
    sched = fresh_scheduler(scheduler)
    adapter.set_timesteps(sched, steps, tuple(noise.shape[1:]), device)
    kernels = gaussian_kernels(sched, eta)
    target = target or model_target(model, adapter, cond.to(device, model_dtype(model)))
    x = init_latents(sched, noise, device)
    rows = torch.arange(x.shape[0])
    start = time.perf_counter()
    for k, kernel in enumerate(tqdm(kernels, desc=desc, disable=not progress, leave=False)):
        out = target(x, torch.full((x.shape[0],), kernel.timestep), rows)
        z = torch.stack([step_noise(s, k, tuple(x.shape[1:])) for s in seeds]).to(device)
        x = kernel.sample(x, out, z)
    return SampleResult(latents=x.float().cpu(), nfe=float(len(kernels)), wall_s=time.perf_counter() - start,
                        timesteps=[k.timestep for k in kernels])
