"""The coordinator: drives trajectories over a worker pool, whatever the backend.

Latency mode: every sample is a :class:`~specdist.runtime.rule.LatencyTrajectory` (the speculative
rule's :class:`~specdist.runtime.rule.Trajectory` or Picard's). The coordinator
submits the reference jobs its open window wants to idle workers (earliest window position first,
across samples), hands results back to the trajectory as they arrive (in any order), and when a
window closes cancels every in-flight job of the old window (mid-forward, through the workers'
cancel flag). What is committed is decided by the rule alone; the pool only changes *when*.

Throughput mode: each sample is one generation job run by a worker with the single-device engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from .jobs import CANCELLED, DRAFT, GENERATION, STEP, Job, dtype_name
from .pool import WorkerFailure, WorkerPool
from .rule import FULL, LatencyTrajectory, Request


@dataclass
class RunStats:
    """What a distributed run did (all counts over the whole job)."""

    jobs_submitted: int = 0  # = jobs_done + jobs_cancelled once the run has ended
    jobs_done: int = 0  # finished (useful or stale)
    jobs_cancelled: int = 0  # stopped mid-forward or before starting
    jobs_stale: int = 0  # part of jobs_done: finished, but for a window that had closed (wasted)
    cancel_requests: int = 0  # jobs asked to stop (each counted once; >= jobs_cancelled)
    wasted_compute_s: float = 0.0
    useful_compute_s: float = 0.0
    coordinator_s: float = 0.0  # time the coordinator spent deciding/drafting (not waiting)
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    """Final latents ``[N, ...]`` and per-sample decisions of a distributed run."""

    latents: torch.Tensor
    decisions: list[str]
    nfe: list[float]  # full-model evaluations per sample (latency: jobs computed, incl. wasted)
    anchors: list[int]  # latency: sequential full steps on each sample's critical path
    stats: RunStats
    windows: list[list[int]] = field(default_factory=list)
    closed_at: list[list[int]] = field(default_factory=list)
    errors: list[list[float | None]] = field(default_factory=list)
    drafts: list[int] = field(default_factory=list)  # latency: draft calls per sample (delivered)
    draft_jobs: list[int] = field(default_factory=list)  # latency: draft jobs submitted per sample


def job_for(request: Request, job_id: int, sample: int, traj: LatencyTrajectory) -> Job:
    """The pool job that serves a trajectory's :class:`~specdist.runtime.rule.Request`."""
    ts = traj.timestep(request.step)
    meta = ({"record": request.record, "start": request.start} if request.kind == FULL
            else {"start": request.start, "layout": [list(x) for x in request.layout]})
    return Job(job_id, STEP if request.kind == FULL else DRAFT, sample, request.step, float(ts), dtype_name(ts.dtype),
               request.window, meta)


class Coordinator:
    """Runs jobs on ``pool``; ``job_timeout_s`` bounds the wait for any result."""

    def __init__(self, pool: WorkerPool, *, job_timeout_s: float = 600.0, progress: bool = True) -> None:
        self.pool, self.job_timeout_s, self.progress = pool, job_timeout_s, progress
        self._next_id = 0

    def _job_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _collect(self, inflight: dict[int, Any], last_progress: float) -> tuple[list, float]:
        results = self.pool.wait(timeout=min(1.0, self.job_timeout_s))
        now = time.perf_counter()
        if results:
            return results, now
        if inflight and now - last_progress > self.job_timeout_s:
            raise WorkerFailure(f"no job finished for {self.job_timeout_s:g} s ({len(inflight)} in flight); "
                                f"see runtime.job_timeout_s")
        return results, last_progress

    def run_latency(self, trajs: list[LatencyTrajectory]) -> RunResult:
        """Run every trajectory to its end; returns the committed final latents."""
        stats, pool = RunStats(), self.pool
        start = last = time.perf_counter()
        inflight: dict[int, tuple[int, Request]] = {}  # job id -> (sample, request)
        submitted: set[tuple[int, int, str, int, str]] = set()  # (sample, window, kind, step, record)
        asked: set[int] = set()  # job ids already asked to stop

        def cancel(jid: int) -> None:
            if jid not in asked:
                asked.add(jid)
                pool.cancel(jid)
                stats.cancel_requests += 1
        jobs_per_sample = [0] * len(trajs)
        drafts_per_sample = [0] * len(trajs)
        bar = tqdm(total=sum(t.steps for t in trajs), desc="latency: steps committed", unit="step",
                   disable=not self.progress, leave=False)
        committed = 0
        while not all(t.done for t in trajs):
            t0 = time.perf_counter()
            idle = pool.idle()
            if idle:
                todo = []
                for i, t in enumerate(trajs):
                    for pos, req in enumerate(t.wanted()):
                        if (i, req.window, req.kind, req.step, req.record) not in submitted:
                            todo.append((pos, i, req))
                for pos, i, req in sorted(todo, key=lambda r: r[:2])[:idle]:
                    job = job_for(req, self._job_id(), i, trajs[i])
                    pool.submit(job, req.tensors)
                    inflight[job.id] = (i, req)
                    submitted.add((i, req.window, req.kind, req.step, req.record))
                    stats.jobs_submitted += 1
                    jobs_per_sample[i] += req.kind == FULL
                    drafts_per_sample[i] += req.kind != FULL
            stats.coordinator_s += time.perf_counter() - t0
            results, last = self._collect(inflight, last)
            t0 = time.perf_counter()
            for r in results:
                i, req = inflight.pop(r.job.id)
                t = trajs[i]
                if r.status == CANCELLED:
                    stats.jobs_cancelled += 1
                    stats.wasted_compute_s += r.compute_s
                    continue
                stats.jobs_done += 1
                if req.window != t.window_id and not t.keeps(req):
                    stats.jobs_stale += 1
                    stats.wasted_compute_s += r.compute_s
                    continue
                stats.useful_compute_s += r.compute_s
                window = t.window_id
                t.deliver(req, r.output, r.features, r.meta)
                if t.window_id != window:  # the window closed: cancel what is still running for it
                    for jid, (k, other) in inflight.items():
                        if k == i and other.window != t.window_id and not t.keeps(other):
                            cancel(jid)
            now_committed = sum(len(t.stats.decisions) for t in trajs)
            bar.update(now_committed - committed)
            committed = now_committed
            stats.coordinator_s += time.perf_counter() - t0
        self._drain(inflight, stats, last, cancel)
        bar.close()
        stats.wall_s = time.perf_counter() - start
        return RunResult(
            latents=torch.cat([t.final for t in trajs]).float().cpu(),
            decisions=["".join(t.stats.decisions) for t in trajs],
            nfe=[float(n) for n in jobs_per_sample],
            anchors=[t.stats.anchors for t in trajs],
            stats=stats,
            windows=[t.stats.windows for t in trajs],
            closed_at=[t.stats.closed_at for t in trajs],
            errors=[t.stats.errors for t in trajs],
            drafts=[t.stats.drafts for t in trajs],
            draft_jobs=drafts_per_sample,
        )

    def _drain(self, inflight: dict, stats: RunStats, last: float, cancel) -> None:
        """Jobs of closed windows still running finish or stop before the pool is reused; each is
        counted once, as cancelled or (finished for a closed window) done and stale."""
        for jid in list(inflight):
            cancel(jid)
        while inflight:
            results, last = self._collect(inflight, last)
            for r in results:
                inflight.pop(r.job.id, None)
                if r.status == CANCELLED:
                    stats.jobs_cancelled += 1
                else:
                    stats.jobs_done += 1
                    stats.jobs_stale += 1
                stats.wasted_compute_s += r.compute_s

    def run_throughput(self, noise: torch.Tensor, steps: int = 0) -> RunResult:
        """One generation job per sample (``noise[i]`` is sample ``i``'s initial noise); ``steps``
        per generation sizes the progress bar (steps completed, polled from the workers)."""
        stats, pool = RunStats(), self.pool
        start = last = time.perf_counter()
        n = noise.shape[0]
        queue = list(range(n))
        inflight: dict[int, int] = {}
        outputs: dict[int, Any] = {}
        steps = steps or 1
        bar = tqdm(total=n * steps, desc=f"throughput: steps of {n} generations", unit="step",
                   disable=not self.progress, leave=False)
        shown = 0
        while len(outputs) < n:
            t0 = time.perf_counter()
            for _ in range(min(pool.idle(), len(queue))):
                i = queue.pop(0)
                job = Job(self._job_id(), GENERATION, i)
                pool.submit(job, (noise[i:i + 1].contiguous(),))
                inflight[job.id] = i
                stats.jobs_submitted += 1
            stats.coordinator_s += time.perf_counter() - t0
            results, last = self._collect(inflight, last)
            for r in results:
                i = inflight.pop(r.job.id)
                stats.jobs_done += 1
                stats.useful_compute_s += r.compute_s
                outputs[i] = r
            if self.progress:
                running = pool.progress()
                done = len(outputs) * steps + sum(min(running.get(j, 0), steps) for j in inflight)
                bar.update(done - shown)
                shown = done
        bar.close()
        stats.wall_s = time.perf_counter() - start
        rs = [outputs[i] for i in range(n)]
        return RunResult(
            latents=torch.cat([r.output for r in rs]).float().cpu(),
            decisions=[r.meta.get("decisions", "") for r in rs],
            nfe=[float(r.meta.get("nfe", 0.0)) for r in rs],
            anchors=[len(r.meta.get("decisions", "")) for r in rs],
            stats=stats,
        )
