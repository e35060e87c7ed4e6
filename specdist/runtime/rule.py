"""The latency-mode rule of one trajectory (DESIGN §3): what is drafted, verified and committed.

Pure tensor logic (no Ray, no torch.distributed, no timing): the coordinator hands it the results
of the jobs it asked for, in any order; the committed trajectory depends only on the config, the
seed and those results — never on how many workers computed them or when they arrived.

*Anchor* ``c``: a committed state ``x_c`` whose full output ``F_c`` is known. The *history* is a
:class:`~specdist.engine.forecast.TaylorCache` of the features of committed full steps (every
block's residual branches at ``block`` granularity — the engine's features — or the model output
at ``output`` granularity). A *window* drafts ``K'`` steps from the anchor, one after the other::

    x̂_{c+1} = S(F_c, x_c),   p_{c+j} = draft(x̂_{c+j}),   x̂_{c+j+1} = S(p_{c+j}, x̂_{c+j})

A *draft* at ``block`` granularity is the engine's speculative call run by a worker at the drafted
state: the forecast branches (from the history, frozen for the window) are re-gated by the blocks'
own norms and the step's modulation (:mod:`specdist.engine.hooks`); at ``output`` granularity the
draft is the forecast output itself (no model call). Every drafted state also gets a *reference*
job, the full model at ``x̂_{c+j}``, in parallel with the drafting of the next steps. Verification
runs in order with the engine's decision module (:mod:`specdist.engine.decision`; the verifier's
error is ``err(p, F(x̂))`` on the output, so a quality target books it with the output's own
damage weights): draft ``j`` is accepted while the rule accepts. The window closes at ``j*``, the
first rejection or forced step (or ``K'``): ``x̂_{c+j*}`` is committed (its predecessors were
accepted) with ``F(x̂_{c+j*})`` as the next anchor; later drafts are dropped (their jobs cancelled).
Only anchors' full features join the history (tried: every verified state as well — the history
then mixes states that drafts produced, and the video zoo model needed 27 anchors instead of 20).

*Reuse* (``runtime.reuse``, Picard / ParaDiGMS style): after a rejection at ``j*`` the closed
window's reference outputs at the later steps, computed at its (now dropped) drafted states, are
what was already paid for; the next window takes them as its predictions at those steps instead
of fresh drafts (they are the full model at a nearby state), so their jobs are kept, not
cancelled, and the new window covers at least the steps it can reuse. Each reused prediction is
verified against the reference output at the new state like any draft.

``K' = min(K, steps − 1 − c, next forced step − c)`` and ``K`` adapts from committed history only
(doubles after a fully accepted window, shrinks to ``j* + 1`` after a rejection at ``j*``).
At ``block`` granularity the very first full call measures the branch sizes (the cached region is
sized under ``cache.max_cache_bytes`` exactly as in the engine) and is repeated with recording.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine.config import CacheConfig
from ..engine.decision import Rule, forecaster_time
from ..engine.forecast import TaylorCache
from ..engine.hooks import region_bytes
from ..engine.speculative import fit_region
from ..engine.verify import forecast_error
from ..sampling import scale_input, snapshot

FULL, DRAFT = "full", "draft"


@dataclass(frozen=True)
class Request:
    """A job a trajectory wants: a full model call (``FULL``; ``record`` names what to record:
    ``"measure"``, ``"record"`` or ``"off"``) or a draft (``DRAFT``) at ``step``, for window
    ``window``. ``tensors`` travel with it (the model input, then the forecast features)."""

    kind: str
    step: int
    window: int
    tensors: tuple[torch.Tensor, ...]
    record: str = "off"
    start: int = 0
    layout: tuple[tuple[str, int], ...] = ()  # DRAFT: (feature name, tensors) of the forecast features


@dataclass
class Draft:
    """One drafted step of the open window."""

    step: int
    x: torch.Tensor  # state x̂_step (float32, [1, ...])
    x_in: torch.Tensor  # model input at that state (scaled, model dtype)
    scheduler: Any  # scheduler state before step ``step``
    prediction: torch.Tensor | None = None  # p_step, once drafted
    reused: bool = False  # its prediction is the previous window's reference output at this step


@dataclass
class TrajectoryStats:
    """Decisions per step (``F`` anchor computed fully, ``A`` accepted draft, ``R`` rejected draft
    whose reference output was committed) and the windows' bookkeeping."""

    decisions: list[str] = field(default_factory=list)
    errors: list[float | None] = field(default_factory=list)
    windows: list[int] = field(default_factory=list)  # K' of each window
    closed_at: list[int] = field(default_factory=list)  # j* of each window
    anchors: int = 0  # windows + the initial full step(s): the critical path in full steps
    drafts: int = 0  # draft calls that ran a model


class LatencyTrajectory(ABC):
    """One sample's trajectory as the latency-mode coordinator drives it: the jobs it still needs
    (:meth:`wanted`), which of a closed window's jobs it still keeps (:meth:`keeps`), their results
    (:meth:`deliver`), and ``final`` once it is done. ``window_id`` and ``stats`` (decisions, anchors,
    windows, closed_at, errors, drafts) are the subclass's. Subclasses: :class:`Trajectory` (the
    speculative rule) and :class:`~specdist.runtime.picard.PicardTrajectory`."""

    window_id: int

    def __init__(self, scheduler: Any) -> None:
        self.timesteps = list(scheduler.timesteps)
        self.steps = len(self.timesteps)
        self.final: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        """Whether the final latents are known."""
        return self.final is not None

    def timestep(self, step: int) -> torch.Tensor:
        """The scheduler timestep of ``step``."""
        return self.timesteps[step]

    @abstractmethod
    def wanted(self) -> list[Request]:
        """The jobs the trajectory still needs, in the order it needs them."""

    @abstractmethod
    def keeps(self, request: Request) -> bool:
        """Whether a job of a closed window is still needed."""

    @abstractmethod
    def deliver(self, request: Request, output: torch.Tensor | None, features: tuple[torch.Tensor, ...] = (),
                meta: dict | None = None) -> None:
        """Take the result of ``request``."""


class Trajectory(LatencyTrajectory):
    """Per-sample state of the latency-mode rule.

    Args:
        scheduler: a fresh diffusers scheduler with timesteps set (this object owns it).
        latents: initial latents ``[1, ...]`` float32 (already scaled by ``init_noise_sigma``).
        cache: the engine's cache config (order, time unit, granularity, forced steps, budget).
        rule: the decision rule of this sample (:func:`specdist.engine.decision.make_rule` with
            ``signal="output"``); ``None`` computes every step fully (``full``).
        lookahead: the largest window ``K``; ``adaptive`` lets ``K`` follow the last window.
        dtype: the model's input dtype.
        reuse: use what was computed — after a rejection, the new window's steps that the closed
            window had drafted take that window's reference output at that step as their
            prediction (Picard / ParaDiGMS: the previous iterate at the same step), instead of a
            fresh draft; the closed window's jobs at those steps are then waited for, not cancelled.
    """

    def __init__(self, scheduler: Any, latents: torch.Tensor, cache: CacheConfig, rule: Rule | None, lookahead: int, *,
                 adaptive: bool = True, dtype: torch.dtype = torch.float32, reuse: bool = True) -> None:
        super().__init__(scheduler)
        self.sched = scheduler
        self.cfg, self.rule, self.kmax, self.adaptive, self.dtype = cache, rule, lookahead, adaptive, dtype
        self.speculate = rule is not None
        self.block_level = self.speculate and cache.granularity == "block"
        self.train_t = float(getattr(scheduler.config, "num_train_timesteps", 1000))
        self.forced = set(rule.forced) if rule is not None else set(range(self.steps))
        # block level: made on the first recording, one row per model row of the sample
        self.history: TaylorCache | None = None if self.block_level else TaylorCache(
            cache.order, 1, fallback_ratio=cache.extrapolation_ratio)
        self.layout: list[tuple[str, int]] = []  # block level: feature names and tensors per feature
        self.start = 0  # block level: first cached block (sized by the measuring call)
        self.order = cache.order
        self.c = 0
        self.x = latents
        self.x_in = self._input(self.sched, latents, 0)
        self.f_c: torch.Tensor | None = None
        self.window_id = 0
        self.drafts: list[Draft] = []
        self.k = lookahead
        self._checked = 0  # drafts of the open window already decided
        self.results: dict[int, torch.Tensor] = {}  # step -> reference output
        self.features: dict[int, tuple[torch.Tensor, ...]] = {}  # step -> recorded full features
        self.phase = "measure" if self.block_level else "record"
        self.reuse = reuse and self.speculate
        self.old: list[Draft] = []  # the closed window's drafts after its new anchor, still computed
        self.old_window = -1
        self.old_history: TaylorCache | None = None  # the closed window's history (its drafts' forecasts)
        self.old_results: dict[int, torch.Tensor] = {}
        self.stats = TrajectoryStats()

    # -- queries -------------------------------------------------------------------------------
    def wanted(self) -> list[Request]:
        """Every job the trajectory still needs, in the order it needs them (drafts first at a position)."""
        if self.done:
            return []
        if self.f_c is None:  # the first anchor: measured (block level), then recorded
            return [] if self.c in self.results else [Request(FULL, self.c, self.window_id, (self.x_in,),
                                                              self.phase if self.block_level else "off", self.start)]
        drafts, fulls = [], []
        record = "record" if self.block_level else "off"
        for d in self.old:  # the closed window's states that the open window reuses
            if d.x is None:
                break
            if d.prediction is None and self.block_level:
                drafts.append(Request(DRAFT, d.step, self.old_window, (d.x_in, *self._forecast(d.step, self.old_history)),
                                      start=self.start, layout=tuple(self.layout)))
            if d.step not in self.old_results:
                fulls.append(Request(FULL, d.step, self.old_window, (d.x_in,), "off", self.start))
            if d.prediction is None:
                break
        for d in self.drafts:
            if d.x is None:
                break
            if d.prediction is None and self.block_level and not d.reused:
                drafts.append(Request(DRAFT, d.step, self.window_id, (d.x_in, *self._forecast(d.step)),
                                      start=self.start, layout=tuple(self.layout)))
            if d.step not in self.results:
                fulls.append(Request(FULL, d.step, self.window_id, (d.x_in,), record, self.start))
            if d.prediction is None:
                break  # later states depend on this draft
        return drafts + fulls

    def keeps(self, request: Request) -> bool:
        """Whether a job of a closed window is still needed (reused by the open window): not to cancel."""
        return request.window == self.old_window and any(d.step == request.step for d in self.old)

    # -- results -------------------------------------------------------------------------------
    def deliver(self, request: Request, output: torch.Tensor | None, features: tuple[torch.Tensor, ...] = (),
                meta: dict | None = None) -> list[int]:
        """Record a job's result. ``output``: the model output (full) or the draft's output;
        ``features``: a recording full call's features, ``meta["layout"]`` their (name, tensors)
        layout; ``meta["sizes"]``: a measuring call's bytes per row. Returns the steps whose jobs
        became useless (to cancel); a result for a closed window is ignored."""
        if self.done:
            return []
        if self.keeps(request):
            return self._old_result(request, output)
        if request.window != self.window_id:
            return []
        meta = meta or {}
        if request.kind == DRAFT:
            return self._drafted(request.step, output.float())
        if request.record == "measure":
            self._size(meta["sizes"], meta["rows"])
            return []
        self.results[request.step] = output.float()
        if features:
            self.features[request.step] = features
            self.layout = [tuple(x) for x in meta["layout"]]
        return self._advance()

    def _size(self, sizes: dict[str, int], rows: int) -> None:
        """Block level, after the measuring call: choose the order and the cached region as the
        engine does; the first anchor is then computed again with recording."""
        last = max(int(k.split(".")[1]) for k in sizes if k.startswith("branch."))
        order, self.start = fit_region(self.order, lambda st: rows * region_bytes(sizes, st), last,
                                       self.cfg.max_cache_bytes)
        self.order = order
        self.phase = "record"

    def _input(self, sched: Any, x: torch.Tensor, step: int) -> torch.Tensor:
        return scale_input(sched, x, self.timesteps[step]).to(self.dtype)

    def _time(self, step: int) -> float:
        return forecaster_time(self.cfg, step, self.timesteps[step], self.train_t)

    def _forecast(self, step: int, history: TaylorCache | None = None) -> tuple[torch.Tensor, ...]:
        history = history if history is not None else self.history
        return history.forecast(torch.arange(history.rows), self._time(step))

    def _old_result(self, request: Request, output: torch.Tensor) -> list[int]:
        """A closed window's draft or reference output at a step the open window reuses."""
        if request.kind == DRAFT:
            for j, d in enumerate(self.old):
                if d.step == request.step and d.prediction is None:
                    self.stats.drafts += 1
                    d.prediction = output.float()
                    self._extend(j, self.old)
        else:
            self.old_results[request.step] = output.float()
        self._fill()
        return self._advance()

    def _fill(self) -> None:
        """Give the open window's known states their predictions where no job is needed: a reused
        step takes the closed window's reference output once it is there, an output-level draft is
        the forecast itself; stops at the first state still waiting (a block-level draft job)."""
        for j, d in enumerate(self.drafts):
            if d.x is None:
                return
            if d.prediction is None:
                if d.reused:
                    if d.step not in self.old_results:
                        return
                    d.prediction = self.old_results[d.step]
                elif self.speculate and not self.block_level:
                    d.prediction = self._forecast(d.step)[0]
                else:
                    return
                self._extend(j)

    def _learn(self, step: int) -> None:
        """The full features of a committed step join the history."""
        if self.block_level:
            feats = self.features.get(step)
            if feats:
                if self.history is None:
                    self.history = TaylorCache(self.order, feats[0].shape[0],
                                               fallback_ratio=self.cfg.extrapolation_ratio)
                self.history.update(torch.arange(self.history.rows), feats, self._time(step))
        elif self.speculate:
            self.history.update(torch.arange(1), (self.results[step],), self._time(step))

    def _drafted(self, step: int, prediction: torch.Tensor) -> list[int]:
        self.stats.drafts += 1
        for j, d in enumerate(self.drafts):
            if d.step == step and d.prediction is None:
                d.prediction = prediction
                self._extend(j)
        self._fill()
        return self._advance()

    def _extend(self, j: int, drafts: list[Draft] | None = None) -> None:
        """Draft ``j`` has its prediction: the next drafted state follows from it."""
        drafts = self.drafts if drafts is None else drafts
        if j + 1 >= len(drafts) or drafts[j + 1].x is not None:
            return
        d = drafts[j]
        sched = snapshot(d.scheduler)
        x = sched.step(d.prediction, self.timesteps[d.step], d.x, return_dict=False)[0]
        nxt = drafts[j + 1]
        nxt.x, nxt.x_in, nxt.scheduler = x, self._input(sched, x, nxt.step), sched

    def _advance(self) -> list[int]:
        if self.f_c is None:  # the first anchor (step 0)
            if self.c not in self.results:
                return []
            self.f_c = self.results[self.c]
            self.stats.decisions.append("F")
            self.stats.errors.append(None)
            self.stats.anchors += 1
            if self.speculate:
                self._learn(self.c)
            self.results, self.features = {}, {}
            self._open_window()
            return []
        while self._checked < len(self.drafts):
            j = self._checked
            d = self.drafts[j]
            if d.step not in self.results or (self.speculate and d.prediction is None):
                return []
            true = self.results[d.step]
            self._checked += 1
            last = j == len(self.drafts) - 1
            if not self.speculate:
                self.stats.errors.append(None)
                self.stats.decisions.append("F")
                return self._close(j, true, passed=True)
            err = forecast_error(d.prediction, true, "rel_l2").cpu()
            self.stats.errors.append(float(err[0]))
            one, run = torch.zeros(1, dtype=torch.long), torch.tensor([j])
            # where the engine's rule ends a run (a forced step, a run at cache.max_run), the window
            # ends on the reference output. (The target's pre-emption is the engine's way to skip a
            # speculative call predicted to fail; here the draft and its reference are already computed.)
            if bool(self.rule.run_ends(d.step, run)[0]):
                self.stats.decisions.append("F")
                return self._close(j, true, passed=True)
            passed = bool(self.rule.accept(d.step, one, err, torch.zeros(1, dtype=torch.bool), run)[0])
            if passed and not last:  # accepted: its state is committed; the history keeps anchors only
                self.stats.decisions.append("A")
                continue
            self.stats.decisions.append("F" if passed else "R")
            return self._close(j, true, passed)
        return []

    def _close(self, j: int, true: torch.Tensor, passed: bool) -> list[int]:
        """Commit draft ``j`` as the new anchor with its reference output; drop later drafts."""
        d = self.drafts[j]
        later = self.drafts[j + 1:]
        if self.reuse:  # the later states keep being computed: the next window reuses their outputs
            self.old, self.old_window = later, self.window_id
            self.old_results = {e.step: self.results[e.step] for e in later if e.step in self.results}
            self.old_history = copy.deepcopy(self.history) if later else None
            dropped = []
        else:
            self.old, self.old_window, self.old_results, self.old_history = [], -1, {}, None
            dropped = [e.step for e in later]
        self.stats.closed_at.append(j + 1)
        self.stats.anchors += 1
        if self.adaptive:  # from this window's outcome only (committed history)
            self.k = min(self.kmax, 2 * self.k) if passed else max(1, min(self.kmax, j + 2))
        self.c, self.x, self.sched, self.f_c = d.step, d.x, d.scheduler, true
        if self.speculate:
            self._learn(d.step)
            if self.rule is not None:
                self.rule.observe_full(torch.zeros(1, dtype=torch.long))
        self.results, self.features = {}, {}
        self._open_window()
        return dropped

    def _open_window(self) -> None:
        """Lay out the next window from the anchor (forecaster frozen), or finish the trajectory."""
        self.window_id += 1
        self._checked = 0
        self.drafts = []
        sched = snapshot(self.sched)
        x = sched.step(self.f_c, self.timesteps[self.c], self.x, return_dict=False)[0]
        if self.c == self.steps - 1:
            self.final = x
            return
        size = min(self.k if self.speculate else 1, self.steps - 1 - self.c)
        nxt = min((s for s in self.forced if s > self.c), default=self.steps)
        reusable = [e.step for e in self.old if e.step <= nxt]  # a window covers what it can reuse
        size = max(1, min(max(size, len(reusable)), nxt - self.c))
        for j in range(1, size + 1):
            step = self.c + j
            if j == 1:
                self.drafts.append(Draft(step, x, self._input(sched, x, step), sched))
            else:
                self.drafts.append(Draft(step, None, None, None))
        self.old = [e for e in self.old if e.step <= self.drafts[-1].step]  # only what this window reuses
        for d in self.drafts:
            d.reused = d.step in set(reusable)
        self._fill()
        self.stats.windows.append(size)


def run_sequential(traj: Trajectory, compute) -> torch.Tensor:
    """The rule run in one process, one job at a time, in order (the single-process engine every
    backend must match). ``compute(request) -> (output, features, sizes)``; returns the final latents."""
    while not traj.done:
        request = traj.wanted()[0]
        traj.deliver(request, *compute(request))
    return traj.final
