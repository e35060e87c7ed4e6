"""The coordinator: drives trajectories over a worker pool, whatever the backend.

Latency mode: every sample is a :class:`~specdist.runtime.rule.Trajectory`. The coordinator
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

from .jobs import CANCELLED, GENERATION, STEP, Job, dtype_name
from .pool import WorkerFailure, WorkerPool
from .rule import Trajectory


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

    def run_latency(self, trajs: list[Trajectory]) -> RunResult:
        """Run every trajectory to its end; returns the committed final latents."""
        stats, pool = RunStats(), self.pool
        start = last = time.perf_counter()
        inflight: dict[int, tuple[int, int, int]] = {}  # job id -> (sample, window, step)
        submitted: set[tuple[int, int, int]] = set()
        asked: set[int] = set()  # job ids already asked to stop

        def cancel(jid: int) -> None:
            if jid not in asked:
                asked.add(jid)
                pool.cancel(jid)
                stats.cancel_requests += 1
        jobs_per_sample = [0] * len(trajs)
        bar = tqdm(total=sum(t.steps for t in trajs), desc="latency", disable=not self.progress, leave=False)
        committed = 0
        while not all(t.done for t in trajs):
            t0 = time.perf_counter()
            idle = pool.idle()
            if idle:
                todo = []
                for i, t in enumerate(trajs):
                    for pos, (step, x_in) in enumerate(t.wanted()):
                        if (i, t.window_id, step) not in submitted:
                            todo.append((pos, i, step, x_in))
                for pos, i, step, x_in in sorted(todo, key=lambda r: r[:3])[:idle]:
                    t = trajs[i]
                    ts = t.timestep(step)
                    job = Job(self._job_id(), STEP, i, step, float(ts), dtype_name(ts.dtype), t.window_id)
                    pool.submit(job, x_in)
                    inflight[job.id] = (i, t.window_id, step)
                    submitted.add((i, t.window_id, step))
                    stats.jobs_submitted += 1
                    jobs_per_sample[i] += 1
            stats.coordinator_s += time.perf_counter() - t0
            results, last = self._collect(inflight, last)
            t0 = time.perf_counter()
            for r in results:
                i, window, step = inflight.pop(r.job.id)
                t = trajs[i]
                if r.status == CANCELLED:
                    stats.jobs_cancelled += 1
                    stats.wasted_compute_s += r.compute_s
                    continue
                stats.jobs_done += 1
                if window != t.window_id:
                    stats.jobs_stale += 1
                    stats.wasted_compute_s += r.compute_s
                    continue
                stats.useful_compute_s += r.compute_s
                t.deliver(window, step, r.output)
                if t.window_id != window:  # the window closed: cancel what is still running for it
                    for jid, (k, w, _) in inflight.items():
                        if k == i and w != t.window_id:
                            cancel(jid)
            now_committed = sum(len(t.stats.decisions) for t in trajs)
            bar.update(now_committed - committed)
            committed = now_committed
            stats.coordinator_s += time.perf_counter() - t0
        # drain: jobs of closed windows still running finish or stop before the pool is reused
        # (counted as in the loop above: a job that finished first is done and stale)
        while inflight:
            for jid in inflight:
                cancel(jid)
            results, last = self._collect(inflight, last)
            for r in results:
                inflight.pop(r.job.id, None)
                stats.jobs_cancelled += r.status == CANCELLED
                stats.jobs_done += r.status != CANCELLED
                stats.jobs_stale += r.status != CANCELLED
                stats.wasted_compute_s += r.compute_s
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
        )

    def run_throughput(self, noise: torch.Tensor) -> RunResult:
        """One generation job per sample (``noise[i]`` is sample ``i``'s initial noise)."""
        stats, pool = RunStats(), self.pool
        start = last = time.perf_counter()
        n = noise.shape[0]
        queue = list(range(n))
        inflight: dict[int, int] = {}
        outputs: dict[int, Any] = {}
        bar = tqdm(total=n, desc="throughput", disable=not self.progress, leave=False)
        while len(outputs) < n:
            t0 = time.perf_counter()
            for _ in range(min(pool.idle(), len(queue))):
                i = queue.pop(0)
                job = Job(self._job_id(), GENERATION, i)
                pool.submit(job, noise[i:i + 1].contiguous())
                inflight[job.id] = i
                stats.jobs_submitted += 1
            stats.coordinator_s += time.perf_counter() - t0
            results, last = self._collect(inflight, last)
            for r in results:
                i = inflight.pop(r.job.id)
                stats.jobs_done += 1
                stats.useful_compute_s += r.compute_s
                outputs[i] = r
                bar.update(1)
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
