"""The parallel speculation rule of one trajectory (DESIGN §3): what is drafted, compared and committed.

This is pure tensor logic (no Ray, no torch.distributed, no timing). The coordinator feeds it
reference outputs in any order; the committed trajectory depends only on the config, the seed and
the reference outputs, never on how many workers computed them or when they arrived.

Anchor ``c``: the committed state ``x_c`` whose full output ``F_c`` is known. The forecaster holds
the full outputs at committed steps ``≤ c``. A window drafts ``K'`` steps from the anchor *at once*
(the forecaster is frozen for the whole window)::

    x̂_{c+1} = step(F_c, x_c),   x̂_{c+j+1} = step(f̂_{c+j}, x̂_{c+j}),   f̂_{c+j} = forecast(c+j)

Reference jobs compute ``F(x̂_{c+j})`` for ``j = 1..K'``. Verification runs in order: draft ``j`` is
accepted when ``err(f̂_{c+j}, F(x̂_{c+j})) ≤ τ(c+j)`` (the engine's metric and schedule; NaN/Inf
never passes). The window closes at ``j*``: the first rejection, or ``K'`` (the last draft, or the
step before a forced full step). ``x̂_{c+j*}`` is then committed (its predecessors were accepted) and
becomes the next anchor with ``F(x̂_{c+j*})`` known; drafts after ``j*`` are dropped (their jobs are
cancelled). Every reference output at a committed state joins the forecaster's history.

The window ``K'`` is ``min(K, steps − 1 − c, next forced step − c)`` and ``K`` adapts from the last
window only (committed history), so 1 or 64 workers commit the same trajectory.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine.config import CacheConfig
from ..engine.forecast import TaylorCache
from ..engine.verify import forecast_error, threshold
from ..sampling import scale_input


def snapshot(scheduler: Any) -> Any:
    """A copy of ``scheduler`` that a later ``step`` on either side does not affect.

    diffusers schedulers advance by rebinding attributes (``_step_index``, ``sample``, …) and by
    assigning into lists (multistep ``model_outputs``); their tensors (timesteps, sigmas, alphas)
    are never written in place. So a shallow copy with fresh containers is a full snapshot, at a
    fraction of ``deepcopy``'s cost (which copies every schedule tensor).
    """
    new = copy.copy(scheduler)
    for key, value in vars(scheduler).items():
        if isinstance(value, (list, dict)):
            setattr(new, key, copy.copy(value))
    return new


@dataclass
class Draft:
    """One drafted step of the open window."""

    step: int
    x: torch.Tensor  # state x̂_step (float32, [1, ...])
    x_in: torch.Tensor  # model input at that state (scaled, model dtype)
    forecast: torch.Tensor | None  # f̂_step (None when not speculating)
    scheduler: Any  # scheduler state before step ``step``


@dataclass
class TrajectoryStats:
    """Decisions per step (``F`` anchor computed fully, ``A`` accepted forecast, ``R`` rejected
    forecast whose reference output was committed) and the windows' bookkeeping."""

    decisions: list[str] = field(default_factory=list)
    errors: list[float | None] = field(default_factory=list)
    windows: list[int] = field(default_factory=list)  # K' of each window
    closed_at: list[int] = field(default_factory=list)  # j* of each window
    anchors: int = 0  # windows + the initial full step: the critical path in full steps


class Trajectory:
    """Per-sample state of the latency-mode rule.

    Args:
        scheduler: a fresh diffusers scheduler with timesteps set (this object owns it).
        latents: initial latents ``[1, ...]`` float32 (already scaled by ``init_noise_sigma``).
        cache: the engine's cache config (order, time unit, metric, τ schedule, warm-up, forced steps).
        lookahead: the largest window ``K``; ``adaptive`` lets ``K`` follow the last accepted run.
        dtype: the model's input dtype.
        speculate: ``False`` gives windows of one step (every step computed fully: ``full``).
    """

    def __init__(self, scheduler: Any, latents: torch.Tensor, cache: CacheConfig, lookahead: int, *,
                 adaptive: bool = True, dtype: torch.dtype = torch.float32, speculate: bool = True) -> None:
        self.sched = scheduler
        self.timesteps = list(scheduler.timesteps)
        self.steps = len(self.timesteps)
        self.cfg, self.kmax, self.adaptive, self.dtype = cache, lookahead, adaptive, dtype
        self.speculate = speculate
        self.train_t = float(getattr(scheduler.config, "num_train_timesteps", 1000))
        self.forced = {s % self.steps for s in cache.full_steps} | set(range(min(cache.warmup, self.steps)))
        self.history = TaylorCache(cache.order, 1)
        self.c = 0
        self.x = latents
        self.x_in = self._input(self.sched, latents, 0)
        self.f_c: torch.Tensor | None = None
        self.window_id = 0
        self.drafts: list[Draft] = []
        self.k = lookahead
        self._checked: set[int] = set()
        self.results: dict[int, torch.Tensor] = {}
        self.final: torch.Tensor | None = None
        self.stats = TrajectoryStats()

    # -- queries -------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """Whether the final latents are known."""
        return self.final is not None

    def wanted(self) -> list[tuple[int, torch.Tensor]]:
        """``(step, model input)`` of every reference output the open window still needs, in order."""
        if self.done:
            return []
        if self.f_c is None:
            return [] if self.c in self.results else [(self.c, self.x_in)]
        return [(d.step, d.x_in) for d in self.drafts if d.step not in self.results]

    def timestep(self, step: int) -> torch.Tensor:
        """The scheduler timestep of ``step``."""
        return self.timesteps[step]

    # -- the rule ------------------------------------------------------------------------------
    def deliver(self, window_id: int, step: int, output: torch.Tensor) -> list[int]:
        """Record the reference output ``F(x̂_step)`` computed for window ``window_id``.

        Returns the steps whose jobs became useless (to cancel); a stale result is ignored.
        """
        if window_id != self.window_id or self.done:
            return []
        self.results[step] = output.float()
        return self._advance()

    def _input(self, sched: Any, x: torch.Tensor, step: int) -> torch.Tensor:
        return scale_input(sched, x, self.timesteps[step]).to(self.dtype)

    def _time(self, step: int) -> float:
        t = self.timesteps[step]
        return float(step) if self.cfg.time == "index" else float(t) / self.train_t

    def _tau(self, step: int) -> float:
        return threshold(step / max(self.steps - 1, 1), self.cfg.tau0, self.cfg.beta, self.cfg.tau_min)

    def _advance(self) -> list[int]:
        if self.f_c is None:  # the first anchor (step 0), or nothing yet
            if self.c not in self.results:
                return []
            self.f_c = self.results.pop(self.c)
            self.stats.decisions.append("F")
            self.stats.errors.append(None)
            self.stats.anchors += 1
            self.history.update(torch.zeros(1, dtype=torch.long), (self.f_c,), self._time(self.c))
            self._open_window()
            return []
        for j, d in enumerate(self.drafts, start=1):
            if d.step not in self.results:
                return []
            if j in self._checked:
                continue
            true = self.results[d.step]
            err = float(forecast_error(d.forecast, true, self.cfg.metric)[0]) if self.speculate else float("nan")
            passed = self.speculate and err <= self._tau(d.step)  # NaN/Inf: err is inf, never passes
            self._checked.add(j)
            self.history.update(torch.zeros(1, dtype=torch.long), (true,), self._time(d.step))
            self.stats.errors.append(err if self.speculate else None)
            if passed and j < len(self.drafts):
                self.stats.decisions.append("A")
                continue
            forced = d.step in self.forced or not self.speculate
            self.stats.decisions.append("F" if passed or forced else "R")
            return self._close(j, true, passed)
        return []

    def _close(self, j: int, true: torch.Tensor, passed: bool) -> list[int]:
        """Commit draft ``j`` as the new anchor with its reference output; drop later drafts."""
        d = self.drafts[j - 1]
        dropped = [e.step for e in self.drafts[j:]]
        self.stats.closed_at.append(j)
        self.stats.anchors += 1
        if self.adaptive:  # from this window's outcome only (committed history)
            self.k = min(self.kmax, 2 * self.k) if passed else max(1, min(self.kmax, j + 1))
        self.c, self.x, self.sched, self.f_c = d.step, d.x, d.scheduler, true
        self.results = {}
        self._open_window()
        return dropped

    def _open_window(self) -> None:
        """Draft the next window from the anchor (forecaster frozen), or finish the trajectory."""
        self.window_id += 1
        self._checked = set()
        self.drafts = []
        sched = snapshot(self.sched)
        x = sched.step(self.f_c, self.timesteps[self.c], self.x, return_dict=False)[0]
        if self.c == self.steps - 1:
            self.final = x
            return
        size = min(self.k if self.speculate else 1, self.steps - 1 - self.c)
        nxt = min((s for s in self.forced if s > self.c), default=self.steps)
        size = max(1, min(size, nxt - self.c))
        for j in range(1, size + 1):
            step = self.c + j
            before = snapshot(sched)
            f = self.history.forecast(torch.zeros(1, dtype=torch.long), self._time(step))[0] if self.speculate else None
            self.drafts.append(Draft(step, x, self._input(before, x, step), f, before))
            if j < size:
                x = sched.step(f, self.timesteps[step], x, return_dict=False)[0]
        self.stats.windows.append(size)


def run_sequential(traj: Trajectory, compute) -> torch.Tensor:
    """The rule run in one process, one reference output at a time, in order (the single-process
    engine every backend must match). ``compute(step, x_in) -> output``; returns the final latents."""
    while not traj.done:
        step, x_in = traj.wanted()[0]
        traj.deliver(traj.window_id, step, compute(step, x_in))
    return traj.final
