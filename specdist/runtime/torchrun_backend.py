"""The ``torchrun`` backend: SPMD ranks, rank 0 coordinates, ranks 1..W are reference workers.

Messages are torch.distributed point-to-point sends on the default group (``gloo`` on CPU, ``nccl``
on GPUs): a fixed header (``int64[8]``: op, job id, sample, step, window, timestep dtype code,
status, meta length), the timestep (``float64[1]``), then the payload tensor. Cancellations go on a
second gloo group that each worker reads from a listener thread, so a cancel reaches a worker
in the middle of a forward pass. Results are collected with ``irecv`` polling, so the coordinator
never blocks on one worker.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..errors import SpecdistError
from .jobs import CANCELLED, DONE, GENERATION, STEP, Job, JobResult, WorkerSpec
from .pool import PoolStats, WorkerFailure, WorkerPool, tensor_bytes

OP_STOP, OP_STEP, OP_GEN, OP_RESULT = 0, 1, 2, 3
_TS_DTYPES = ["float32", "float64", "int64", "int32", "bfloat16", "float16"]
_STATUS = [DONE, CANCELLED, "failed"]
_HEADER = 8


def rank_info() -> tuple[int, int] | None:
    """``(rank, world_size)`` when launched by torchrun, else ``None``."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def init(rt: Any, device: str) -> tuple[int, int, Any]:
    """Join the process group (and the cancel group); checks the world size against the config."""
    info = rank_info()
    if info is None:
        raise SpecdistError("runtime.backend=torchrun needs torchrun (RANK/WORLD_SIZE unset); "
                            "launch with launch/torchrun.sh or use runtime.backend=local|ray")
    rank, world = info
    if world != rt.workers + 1:
        raise SpecdistError(f"runtime.workers={rt.workers} needs WORLD_SIZE={rt.workers + 1} "
                            f"(rank 0 coordinates), but torchrun started {world} processes")
    backend = "nccl" if device == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=rt.startup_timeout_s))
    ctrl = dist.new_group(backend="gloo")
    return rank, world, ctrl


def _send_header(values: list[int], ts: float, dst: int) -> None:
    dist.send(torch.tensor(values + [0] * (_HEADER - len(values)), dtype=torch.int64), dst=dst)
    dist.send(torch.tensor([ts], dtype=torch.float64), dst=dst)


class TorchrunPool(WorkerPool):
    """Rank 0's view of the worker ranks."""

    def __init__(self, world: int, ctrl: Any, in_shape: tuple[int, ...], in_dtype: torch.dtype,
                 out_shape: tuple[int, ...], job_timeout_s: float) -> None:
        super().__init__()
        self.ranks = list(range(1, world))
        self.ctrl, self.in_shape, self.in_dtype, self.out_shape = ctrl, in_shape, in_dtype, out_shape
        self.job_timeout_s = job_timeout_s
        self.busy: dict[int, Job] = {}  # rank -> job
        self.recv: dict[int, tuple[Any, torch.Tensor, float]] = {}  # rank -> (work, header, since)
        self.stats = PoolStats(transport=f"torch.distributed p2p ({dist.get_backend()})")

    @property
    def workers(self) -> int:
        return len(self.ranks)

    def idle(self) -> int:
        return len(self.ranks) - len(self.busy)

    def submit(self, job: Job, tensor: torch.Tensor) -> None:
        rank = next(r for r in self.ranks if r not in self.busy)
        op = OP_GEN if job.kind == GENERATION else OP_STEP
        _send_header([op, job.id, job.sample, job.step, job.window, _TS_DTYPES.index(job.timestep_dtype)],
                     job.timestep, rank)
        dist.send(tensor.contiguous(), dst=rank)
        header = torch.zeros(_HEADER, dtype=torch.int64)
        self.recv[rank] = (dist.irecv(header, src=rank), header, time.perf_counter())
        self.busy[rank] = job
        self.stats.jobs += 1
        self.stats.bytes_to_workers += tensor_bytes(tensor)

    def cancel(self, job_id: int) -> None:
        for rank, job in self.busy.items():
            if job.id == job_id:
                dist.send(torch.tensor([job_id, 1], dtype=torch.int64), dst=rank, group=self.ctrl)
                self.stats.cancel_requests += 1

    def wait(self, timeout: float) -> list[JobResult]:
        deadline = time.perf_counter() + timeout
        while True:
            out = []
            for rank in list(self.recv):
                work, header, since = self.recv[rank]
                try:
                    finished = work.is_completed()
                    if finished:
                        work.wait()
                except RuntimeError as exc:
                    raise WorkerFailure(f"torchrun worker rank {rank} failed or died: {exc}") from None
                if not finished:
                    if time.perf_counter() - since > self.job_timeout_s:
                        raise WorkerFailure(f"torchrun worker rank {rank} gave no result for "
                                            f"{self.job_timeout_s:g} s (runtime.job_timeout_s)")
                    continue
                del self.recv[rank]
                job = self.busy.pop(rank)
                out.append(self._receive(rank, job, header))
            if out or time.perf_counter() >= deadline:
                return out
            time.sleep(0.0005)

    def _receive(self, rank: int, job: Job, header: torch.Tensor) -> JobResult:
        h = header.tolist()
        status = _STATUS[h[6]]
        compute = torch.zeros(1, dtype=torch.float64)
        dist.recv(compute, src=rank)
        output, meta = None, {}
        if status == DONE:
            output = torch.empty(self.out_shape, dtype=torch.float32)
            dist.recv(output, src=rank)
            self.stats.bytes_from_workers += tensor_bytes(output)
        if h[7]:
            raw = torch.empty(h[7], dtype=torch.uint8)
            dist.recv(raw, src=rank)
            meta = json.loads(bytes(raw.tolist()).decode())
        if status == "failed":
            raise WorkerFailure(f"job {job.id} failed on torchrun worker rank {rank}: {meta.get('error')}")
        self.stats.cancelled_mid_forward += status == CANCELLED
        return JobResult(job, status, output, rank, float(compute[0]), meta)

    def close(self) -> None:
        for rank in self.ranks:
            _send_header([OP_STOP], 0.0, rank)
            dist.send(torch.tensor([-1, -1], dtype=torch.int64), dst=rank, group=self.ctrl)


def serve(worker: Any, ctrl: Any, in_shape: tuple[int, ...], in_dtype: torch.dtype, noise_shape: tuple[int, ...]) -> int:
    """A worker rank's loop: receive jobs from rank 0, run them, send results; returns jobs run."""
    flags: dict[int, threading.Event] = {}
    lock = threading.Lock()

    def listen() -> None:  # cancellations, possibly while a forward runs
        msg = torch.zeros(2, dtype=torch.int64)
        while True:
            dist.recv(msg, src=0, group=ctrl)
            job_id = int(msg[0])
            if job_id < 0:
                return
            with lock:
                flags.setdefault(job_id, threading.Event()).set()

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    rank, runs = dist.get_rank(), 0
    while True:
        header = torch.zeros(_HEADER, dtype=torch.int64)
        ts = torch.zeros(1, dtype=torch.float64)
        dist.recv(header, src=0)
        dist.recv(ts, src=0)
        h = header.tolist()
        if h[0] == OP_STOP:
            listener.join(timeout=10)
            return runs
        kind = GENERATION if h[0] == OP_GEN else STEP
        tensor = torch.empty(noise_shape if kind == GENERATION else in_shape,
                             dtype=torch.float32 if kind == GENERATION else in_dtype)
        dist.recv(tensor, src=0)
        job = Job(h[1], kind, h[2], h[3], float(ts[0]), _TS_DTYPES[h[5]], h[4])
        with lock:
            flag = flags.setdefault(job.id, threading.Event())
        try:
            r = worker.run(job, tensor, flag, rank)
        except Exception as exc:  # reported to rank 0, which fails the run clearly
            r = JobResult(job, "failed", None, rank, 0.0, {"error": f"{type(exc).__name__}: {exc}"})
        with lock:
            flags.pop(job.id, None)
        meta = json.dumps(r.meta).encode() if r.meta else b""
        dist.send(torch.tensor([OP_RESULT, job.id, 0, 0, 0, 0, _STATUS.index(r.status), len(meta)],
                               dtype=torch.int64), dst=0)
        dist.send(torch.tensor([r.compute_s], dtype=torch.float64), dst=0)
        if r.status == DONE:
            dist.send(r.output.float().contiguous(), dst=0)
        if meta:
            dist.send(torch.tensor(list(meta), dtype=torch.uint8), dst=0)
        runs += 1


def _shapes(cfg: Any, spec: WorkerSpec, plan: Any) -> tuple[tuple[int, ...], torch.dtype, tuple[int, ...], tuple[int, ...]]:
    """(model input shape, its dtype, output shape, generation noise shape) of one job."""
    if cfg.runtime.mode == "latency":
        t = plan[0]
        return tuple(t.x_in.shape), t.x_in.dtype, tuple(t.x.shape), tuple(t.x.shape)
    shape = (1, *plan.shape[1:])
    return shape, torch.float32, shape, shape


def run_on_torchrun(cfg: Any, spec: WorkerSpec, plan: Any, *, progress: bool = True,
                    log: Callable[[str], None] = print):
    """Rank 0: coordinate ``plan`` over the worker ranks (which run :func:`run_worker_rank`)."""
    from .run import coordinate

    rank, world, ctrl = init(cfg.runtime, spec.device)
    if rank != 0:
        raise SpecdistError("run_on_torchrun is rank 0's entry point; worker ranks call run_worker_rank")
    in_shape, in_dtype, out_shape, _ = _shapes(cfg, spec, plan)
    # the job's shapes go to the workers once (a worker rank cannot build the plan cheaply)
    dims = torch.tensor([len(in_shape), *in_shape] + [0] * (8 - len(in_shape)), dtype=torch.int64)
    dist.broadcast(dims, src=0)
    pool = TorchrunPool(world, ctrl, in_shape, in_dtype, out_shape, cfg.runtime.job_timeout_s)
    log(f"specdist: torchrun backend: {world - 1} worker ranks ({dist.get_backend()})")
    try:
        result = coordinate(pool, cfg, plan, progress)
    finally:
        pool.close()
        dist.destroy_process_group()
    result.stats.extra.update(pool=pool.stats.__dict__)
    return result


def run_worker_rank(cfg: Any, spec: WorkerSpec) -> int:
    """A worker rank (≥ 1): load the model from ``spec`` and serve jobs until rank 0 stops."""
    from .worker import StepWorker

    rank, world, ctrl = init(cfg.runtime, spec.device)
    worker = StepWorker.from_spec(spec)
    dims = torch.zeros(9, dtype=torch.int64)
    dist.broadcast(dims, src=0)
    n = int(dims[0])
    shape = tuple(int(d) for d in dims[1:1 + n])
    dtype = next(p.dtype for p in worker.model.parameters() if p.is_floating_point())
    try:
        return serve(worker, ctrl, shape, dtype, shape)
    finally:
        worker.close()
