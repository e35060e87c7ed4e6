"""The Picard rule of one trajectory (``method: picard``, latency mode): parallel-in-time sampling
by fixed-point iteration over a sliding window of states (ParaDiGMS, Shih et al. 2023, DESIGN §2.5),
with drafted initial guesses.

Pure tensor logic (no Ray, no torch.distributed, no timing), driven by the coordinator through the
speculative rule's interface (:class:`~specdist.runtime.rule.LatencyTrajectory`): :meth:`wanted`,
:meth:`deliver`, :meth:`keeps`. What is committed depends only on the config, the seed and the model outputs —
never on how many workers computed them or when they arrived.

One *round* over the window ``c … c+w`` (``w = min(picard.window, steps − c)``): the state ``x_c``
is committed, ``g_{c+1} … g_{c+w}`` are guesses. Every position ``c … c+w−1`` gets a full model
call at its guess, in parallel (``w`` jobs, one per worker); then the sampler's step is chained
from ``x_c`` through those outputs::

    n_c = x_c,   n_{j+1} = S_j(F(g_j), n_j)

(``S_j`` the scheduler's step ``j``, its state carried along the chain, so multistep solvers see
their own history). The change of each guess, ``e_j = ‖n_j − g_j‖ / ‖n_j − n_{j−1}‖`` (RMS of the
update against RMS of that step's own displacement, so the tolerance means the same for every
scheduler and noise level), decides how far the window slides: to the first ``j`` with
``e_j > picard.tol``, or to ``c + w`` when every guess held. The states ``n_{c+1} … n_j`` are
committed (each was stepped from outputs at guesses that held), and the next round starts at ``j``.
The refined states beyond ``j`` are the next round's guesses (what was computed is reused); the
positions new to the window are *drafted*:

* ``init: copy`` — the textbook ParaDiGMS initialisation: the last known state, copied;
* ``init: drift`` — the sampler stepped on from the last known state with the newest model
  output's *clean-sample prediction* held fixed: for DDPM/DDIM-type schedulers (``alphas_cumprod``
  and an epsilon / sample / v prediction type) the output at each drafted state is the one that
  predicts the same ``x̂_0``; for flow matching that is the output itself held fixed (the Euler step
  of ``v`` toward a fixed ``x̂_0`` is linear). No model call. On the video zoo model this alone cuts
  the rounds of a window of 8 from 12.5 to 8 at the same tolerance (see
  ``benchmarks/results/distributed.md``); on the DDIM DiT zoo model holding ``x̂_0`` rather than the
  raw v output took the rounds at window 8, tol 0.5 from 11.2 to 10.2.

``tol = 0`` commits only states whose guess was the exact state (bit for bit), so it reproduces
``full``'s trajectory exactly. The critical path is the number of rounds (each is one model call
when the pool has ``window`` workers, ``⌈window / workers⌉`` otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine.exact_math import prediction_coefficients
from ..sampling import scale_input, snapshot
from .config import PICARD_INITS
from .rule import FULL, LatencyTrajectory, Request


@dataclass
class PicardStats:
    """Per committed step: ``F`` the round's first position (computed at the committed state), ``A``
    a later position whose guess held; ``errors`` its ``e_j`` (``None`` for ``F``); per round the
    window and how far it slid."""

    decisions: list[str] = field(default_factory=list)
    errors: list[float | None] = field(default_factory=list)
    windows: list[int] = field(default_factory=list)
    closed_at: list[int] = field(default_factory=list)
    anchors: int = 0  # rounds: the critical path in full-call units (with window-many workers)
    drafts: int = 0  # draft calls that ran a model (none: drafts here are free)


@dataclass
class _Guess:
    x: torch.Tensor  # the state (float32, [1, ...])
    sched: Any  # scheduler state before the step at this position


def _rms(t: torch.Tensor) -> float:
    return float(t.float().pow(2).mean().sqrt())


_X0_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler")
_X0_KINDS = ("epsilon", "sample", "v_prediction")


def _x0_map(scheduler: Any, timestep: torch.Tensor) -> tuple[float, float] | None:
    """``(a, b)`` with ``x̂_0 = a · x + b · output`` at ``timestep`` for DDPM/DDIM-type schedulers,
    ``None`` for the others (the output itself is then held fixed)."""
    kind = getattr(scheduler.config, "prediction_type", None)
    if type(scheduler).__name__ not in _X0_SCHEDULERS or kind not in _X0_KINDS:
        return None
    a, b, _, _ = prediction_coefficients(kind, float(scheduler.alphas_cumprod[int(timestep)]))
    return a, b


class PicardTrajectory(LatencyTrajectory):
    """Per-sample state of the Picard rule.

    Args:
        scheduler: a fresh diffusers scheduler with timesteps set (this object owns it).
        latents: initial latents ``[1, ...]`` float32 (already scaled by ``init_noise_sigma``).
        window: states refined per round (``picard.window``).
        tol: the largest accepted change of a guess, relative to its step (``picard.tol``).
        init: how new positions are guessed (``drift`` or ``copy``, see the module doc).
        dtype: the model's input dtype.
    """

    def __init__(self, scheduler: Any, latents: torch.Tensor, window: int, tol: float, init: str = "drift", *,
                 dtype: torch.dtype = torch.float32) -> None:
        if init not in PICARD_INITS:
            raise ValueError(f"init must be one of {list(PICARD_INITS)}, not {init!r}")
        super().__init__(scheduler)
        self.window, self.tol, self.init, self.dtype = window, tol, init, dtype
        self.c = 0
        self.window_id = 0
        self.guesses: dict[int, _Guess] = {}
        self.results: dict[int, torch.Tensor] = {}
        self.stats = PicardStats()
        self._last_output: torch.Tensor | None = None  # the newest model output (drift drafts)
        self._last_at: tuple[int, torch.Tensor] | None = None  # (step, state) it was computed at
        self._open({0: _Guess(latents, scheduler)})

    # -- queries -------------------------------------------------------------------------------
    def wanted(self) -> list[Request]:
        """The round's full calls still missing, earliest position first."""
        if self.done:
            return []
        return [Request(FULL, j, self.window_id, (self._input(j),), "off")
                for j in range(self.c, self.c + self._w) if j not in self.results]

    def keeps(self, request: Request) -> bool:
        """A job of a finished round is never needed again (its guesses have moved on)."""
        return False

    # -- results -------------------------------------------------------------------------------
    def deliver(self, request: Request, output: torch.Tensor | None, features: tuple[torch.Tensor, ...] = (),
                meta: dict | None = None) -> list[int]:
        """Record a full call's output; when the round is complete, slide the window. Returns the
        steps whose jobs became useless (none: a round waits for all of its calls)."""
        if self.done or request.window != self.window_id:
            return []
        self.results[request.step] = output.float()
        if len(self.results) == self._w:
            self._slide()
        return []

    # -- the round -----------------------------------------------------------------------------
    @property
    def _w(self) -> int:
        return min(self.window, self.steps - self.c)

    def _input(self, step: int) -> torch.Tensor:
        g = self.guesses[step]
        return scale_input(g.sched, g.x, self.timesteps[step]).to(self.dtype)

    def _slide(self) -> None:
        c, w = self.c, self._w
        sched = snapshot(self.guesses[c].sched)
        new = {c: _Guess(self.guesses[c].x, self.guesses[c].sched)}
        for j in range(c, c + w):  # chain the sampler's step through the round's outputs
            x = sched.step(self.results[j], self.timesteps[j], new[j].x, return_dict=False)[0]
            new[j + 1] = _Guess(x, sched)
            sched = snapshot(sched)
        nxt, errors = c + w, {}
        for j in range(c + 1, c + w + 1):
            e = _rms(new[j].x - self.guesses[j].x) / max(_rms(new[j].x - new[j - 1].x), 1e-12)
            errors[j] = e
            if not e <= self.tol:
                nxt = j
                break
        for j in range(c, nxt):  # the steps whose outputs built the committed states
            self.stats.decisions.append("F" if j == c else "A")
            self.stats.errors.append(None if j == c else errors[j])
        self.stats.anchors += 1
        self.stats.windows.append(w)
        self.stats.closed_at.append(nxt - c)
        self._last_output = self.results[c + w - 1]
        self._last_at = (c + w - 1, self.guesses[c + w - 1].x)
        self.results = {}
        self.window_id += 1
        if nxt == self.steps:
            self.final = new[nxt].x
            return
        self.c = nxt
        self._open({j: g for j, g in new.items() if j >= nxt})

    def _open(self, known: dict[int, _Guess]) -> None:
        """Guesses for the window from ``c``: the refined states where known, drafts beyond."""
        self.guesses = dict(known)
        last = max(known)
        x0 = None  # drift: the clean sample the newest output predicts, where the scheduler has one
        if self.init == "drift" and self._last_output is not None:
            step, state = self._last_at
            m = _x0_map(self.guesses[last].sched, self.timesteps[step])
            x0 = None if m is None else m[0] * state + m[1] * self._last_output
        for j in range(last, min(self.c + self.window, self.steps)):
            g = self.guesses[j]
            # the scheduler is stepped either way (its state at the position feeds scale_model_input)
            v = self._last_output if self._last_output is not None else torch.zeros_like(g.x)
            if x0 is not None:
                a, b = _x0_map(g.sched, self.timesteps[j])
                v = (x0 - a * g.x) / b
            sched = snapshot(g.sched)
            x = sched.step(v, self.timesteps[j], g.x, return_dict=False)[0]
            copy = self.init == "copy" or self._last_output is None
            self.guesses[j + 1] = _Guess(g.x if copy else x, sched)
