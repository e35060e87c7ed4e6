"""A worker pool on a virtual clock: emulated timing of many workers, real results.

:class:`VirtualPool` implements the :class:`~specdist.runtime.pool.WorkerPool` interface for the
real :class:`~specdist.runtime.coordinator.Coordinator`: ``workers`` emulated workers, each job
taking a fixed emulated time (``step_s`` for a full call, ``draft_s`` for a draft). A job's result
is computed for real, by one :class:`~specdist.runtime.worker.StepWorker`, when its emulated
completion time comes (a job cancelled before then costs nothing and frees its worker at the
cancel time, as a mid-forward cancellation does). Results are delivered in completion-time order,
so the coordinator sees exactly what it would see on ``workers`` real workers with those call
times — minus transport and coordinator time, which the virtual clock does not charge (both are
measured on the real backends). Benchmarks use it to emulate e.g. HunyuanVideo 720p×129f (31.8 s
per full call) on 1–16 workers in minutes; it is labelled emulation wherever it is used.
"""

from __future__ import annotations

import heapq
import threading

import torch

from .jobs import CANCELLED, DRAFT, Job, JobResult
from .pool import WorkerPool, tensor_bytes
from .worker import StepWorker


class VirtualPool(WorkerPool):
    """``workers`` emulated workers on a virtual clock (see the module doc).

    Args:
        worker: computes every job's real result.
        workers: emulated workers.
        step_s: emulated time of a full call; ``draft_s`` of a draft (latency mode).
    """

    def __init__(self, worker: StepWorker, workers: int, step_s: float, draft_s: float) -> None:
        super().__init__()
        self.worker, self.n, self.step_s, self.draft_s = worker, workers, step_s, draft_s
        self.clock = 0.0
        self.busy: dict[int, tuple[Job, tuple[torch.Tensor, ...], float]] = {}  # job id -> (job, tensors, end)
        self.events: list[tuple[float, int, int]] = []  # (end time, sequence, job id)
        self.cancelled: list[JobResult] = []
        self.busy_time = 0.0  # worker-seconds spent on jobs (cancelled ones up to their cancel time)
        self._seq = 0
        self.stats.transport = "virtual (emulated timing, in-process compute)"

    @property
    def workers(self) -> int:
        return self.n

    def idle(self) -> int:
        return self.n - len(self.busy)

    def submit(self, job: Job, tensors: tuple[torch.Tensor, ...]) -> None:
        if len(self.busy) >= self.n:
            raise RuntimeError("VirtualPool.submit: no idle worker")
        end = self.clock + (self.draft_s if job.kind == DRAFT else self.step_s)
        self.busy[job.id] = (job, tuple(tensors), end)
        self._seq += 1
        heapq.heappush(self.events, (end, self._seq, job.id))
        self.stats.jobs += 1
        self.stats.bytes_to_workers += tensor_bytes(tensors)  # what would cross the wire

    def cancel(self, job_id: int) -> None:
        entry = self.busy.pop(job_id, None)
        if entry is None:
            return
        job, _, end = entry
        self.stats.cancel_requests += 1
        self.stats.cancelled_mid_forward += 1
        duration = self.draft_s if job.kind == DRAFT else self.step_s
        self.busy_time += duration - (end - self.clock)
        self.cancelled.append(JobResult(job, CANCELLED, None, -1, duration - (end - self.clock)))

    def wait(self, timeout: float) -> list[JobResult]:
        if self.cancelled:
            out, self.cancelled = self.cancelled, []
            return out
        while self.events:
            end, _, job_id = heapq.heappop(self.events)
            if job_id not in self.busy:
                continue  # cancelled before it finished
            job, tensors, _ = self.busy.pop(job_id)
            self.clock = end
            result = self.worker.run(job, tensors, threading.Event())
            duration = self.draft_s if job.kind == DRAFT else self.step_s
            result.compute_s = duration
            self.busy_time += duration
            self.stats.bytes_from_workers += tensor_bytes(result.output) + tensor_bytes(result.features)
            return [result]
        return []
