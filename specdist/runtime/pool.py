"""The worker-pool interface (submit a job, cancel it by id, collect results as they finish) and the
in-process ``local`` backend.

A pool never decides anything: it runs jobs and reports what happened. Every backend gives each
worker at most one job at a time (the coordinator submits only to idle workers) and raises
:class:`WorkerFailure` with the worker and the job named when a job fails. The ``ray`` pool also
survives worker deaths: a dead actor's job is resubmitted to the others (up to ``max_retries``
times per job) and the run fails clearly only when no worker is left. (Local threads cannot die
on their own; under torchrun a dead rank makes torchrun stop the whole group.)
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ..errors import SpecdistError
from .jobs import CANCELLED, FAILED, Job, JobResult
from .worker import StepWorker


class WorkerFailure(SpecdistError):
    """Workers died and the run cannot complete (no worker left, or a job failed too often)."""


@dataclass
class PoolStats:
    """Traffic and events of a pool over one run."""

    jobs: int = 0
    cancel_requests: int = 0
    cancelled_mid_forward: int = 0
    resubmitted: int = 0
    workers_lost: int = 0
    bytes_to_workers: int = 0
    bytes_from_workers: int = 0
    transport: str = "in-process"
    extra: dict = field(default_factory=dict)


def drain(results: queue.Queue, timeout: float) -> list[JobResult]:
    """Everything in ``results``: waits up to ``timeout`` seconds for the first item only."""
    out = []
    try:
        out.append(results.get(timeout=timeout))
        while True:
            out.append(results.get_nowait())
    except queue.Empty:
        pass
    return out


def tensor_bytes(t: torch.Tensor | tuple | None) -> int:
    """Bytes of a tensor or a tuple of tensors (0 for ``None``)."""
    if t is None:
        return 0
    if isinstance(t, (tuple, list)):
        return sum(tensor_bytes(x) for x in t)
    return t.numel() * t.element_size()


class WorkerPool(ABC):
    """A set of reference workers."""

    def __init__(self) -> None:
        self.stats = PoolStats()

    @property
    @abstractmethod
    def workers(self) -> int:
        """Workers alive."""

    @abstractmethod
    def idle(self) -> int:
        """Workers without a job."""

    @abstractmethod
    def submit(self, job: Job, tensors: tuple[torch.Tensor, ...]) -> None:
        """Start ``job`` on an idle worker with its ``tensors`` (see :class:`~specdist.runtime.jobs.Job`)."""

    @abstractmethod
    def cancel(self, job_id: int) -> None:
        """Ask the worker running ``job_id`` to stop (between blocks); its result comes back
        ``cancelled`` (or ``done`` when it finished first)."""

    @abstractmethod
    def wait(self, timeout: float) -> list[JobResult]:
        """Results that finished (at least one unless ``timeout`` seconds pass)."""

    def progress(self) -> dict[int, int]:
        """Steps completed so far by the running generation jobs (job id -> steps; may be empty
        where a backend cannot tell before a job ends)."""
        return {}

    def close(self) -> None:
        """Release the workers."""


class LocalPool(WorkerPool):
    """One thread per entry of ``workers`` in this process (the ``local`` backend). Entries may be
    the same :class:`StepWorker` (step and draft jobs share one model safely: the hooks' plans are
    per thread); generation jobs need one model copy per thread (the engine hooks its model).
    Nothing crosses a transport, so no bytes are counted as moved."""

    def __init__(self, workers: list[StepWorker]) -> None:
        super().__init__()
        self.per_thread, self.n = workers, len(workers)
        self.inbox: list[queue.Queue] = [queue.Queue() for _ in range(self.n)]
        self.results: queue.Queue = queue.Queue()
        self.busy: dict[int, int] = {}  # job id -> worker
        self.flags: dict[int, threading.Event] = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(w,), daemon=True, name=f"specdist-worker-{w}")
                        for w in range(self.n)]
        for t in self.threads:
            t.start()

    @property
    def workers(self) -> int:
        return self.n

    def idle(self) -> int:
        with self.lock:
            return self.n - len(self.busy)

    def _loop(self, w: int) -> None:
        while True:
            item = self.inbox[w].get()
            if item is None:
                return
            job, tensor = item
            try:
                result = self.per_thread[w].run(job, tensor, self.flags[job.id], worker=w)
            except Exception as exc:  # a failing job is reported, never swallowed
                result = JobResult(job, FAILED, worker=w, error=f"{type(exc).__name__}: {exc}")
            self.results.put(result)

    def submit(self, job: Job, tensors: tuple[torch.Tensor, ...]) -> None:
        with self.lock:
            free = [w for w in range(self.n) if w not in self.busy.values()]
            if not free:
                raise RuntimeError("LocalPool.submit: no idle worker")
            self.busy[job.id] = free[0]
            self.flags[job.id] = threading.Event()
        self.stats.jobs += 1  # no bytes: the tensors are handed over in-process, nothing moves
        self.inbox[free[0]].put((job, tuple(tensors)))

    def cancel(self, job_id: int) -> None:
        flag = self.flags.get(job_id)
        if flag is not None and not flag.is_set():
            flag.set()
            self.stats.cancel_requests += 1

    def wait(self, timeout: float) -> list[JobResult]:
        out = drain(self.results, timeout)
        for r in out:
            with self.lock:
                self.busy.pop(r.job.id, None)
                self.flags.pop(r.job.id, None)
            self.stats.cancelled_mid_forward += r.status == CANCELLED
            if r.status == FAILED:
                raise WorkerFailure(f"job {r.job.id} ({r.job.kind}, sample {r.job.sample}, step {r.job.step}) "
                                    f"failed on local worker {r.worker}: {r.error}")
        return out

    def progress(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for worker in {id(w): w for w in self.per_thread}.values():
            out.update(worker.steps_done)
        return out

    def close(self) -> None:
        for q in self.inbox:
            q.put(None)
        for t in self.threads:
            t.join(timeout=5)
        for worker in {id(w): w for w in self.per_thread}.values():
            worker.close()
