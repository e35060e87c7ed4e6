"""The ``torchrun`` backend: SPMD ranks, rank 0 coordinates, ranks 1..W are reference workers.

Messages are torch.distributed point-to-point sends on the default group (``gloo`` on CPU, ``nccl``
on GPUs): a fixed header (``int64[8]``: op, job id, sample, step, window, timestep dtype code,
status, meta length), the timestep (``float64[1]``), then the payload tensor. Cancellations go on a
second gloo group that each worker reads from a listener thread, so a cancel reaches a worker
in the middle of a forward pass. Rank 0 receives results with one thread per worker rank (blocking
receives, posted only while that rank has a job), so it never blocks on one worker. With NCCL each
rank uses GPU ``LOCAL_RANK`` and messages are staged on it.
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..errors import SpecdistError
from ..sampling import model_dtype
from .jobs import CANCELLED, DONE, GENERATION, STEP, Job, JobResult, WorkerSpec
from .pool import PoolStats, WorkerFailure, WorkerPool, drain, tensor_bytes

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
    use_cuda = device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        # idle ranks block in receives for as long as a run lasts; rank 0 bounds waits for results
        # itself (runtime.job_timeout_s), and torchrun tears the group down when a rank dies
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=max(rt.startup_timeout_s, 86400)))
    ctrl = dist.new_group(backend="gloo")
    return rank, world, ctrl


def _wire() -> torch.device:
    """Where point-to-point tensors must live: the rank's GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _send(t: torch.Tensor, dst: int) -> None:
    dist.send(t.contiguous().to(_wire()), dst=dst)


def _recv(shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=_wire())
    dist.recv(t, src=src)
    return t.cpu()


def _send_header(values: list[int], ts: float, dst: int) -> None:
    _send(torch.tensor(values + [0] * (_HEADER - len(values)), dtype=torch.int64), dst)
    _send(torch.tensor([ts], dtype=torch.float64), dst)


class TorchrunPool(WorkerPool):
    """Rank 0's view of the worker ranks.

    One receiver thread per worker rank posts a blocking receive only while that rank has a job
    (gloo's ``irecv`` cannot be polled for completion), and queues the result.
    """

    def __init__(self, world: int, ctrl: Any, out_shape: tuple[int, ...], job_timeout_s: float) -> None:
        super().__init__()
        self.ranks = list(range(1, world))
        self.ctrl, self.out_shape, self.job_timeout_s = ctrl, out_shape, job_timeout_s
        self.busy: dict[int, tuple[Job, float]] = {}  # rank -> (job, since)
        self.results: queue.Queue = queue.Queue()
        self.expect: dict[int, queue.Queue] = {r: queue.Queue() for r in self.ranks}
        self.threads = [threading.Thread(target=self._receiver, args=(r,), daemon=True) for r in self.ranks]
        for t in self.threads:
            t.start()
        self.stats = PoolStats(transport=f"torch.distributed p2p ({dist.get_backend()})")

    @property
    def workers(self) -> int:
        return len(self.ranks)

    def idle(self) -> int:
        return len(self.ranks) - len(self.busy)

    def submit(self, job: Job, tensor: torch.Tensor) -> None:
        rank = next(r for r in self.ranks if r not in self.busy)
        op = OP_GEN if job.kind == GENERATION else OP_STEP
        self.busy[rank] = (job, time.perf_counter())
        self.expect[rank].put(job)
        _send_header([op, job.id, job.sample, job.step, job.window, _TS_DTYPES.index(job.timestep_dtype)],
                     job.timestep, rank)
        _send(tensor, rank)
        self.stats.jobs += 1
        self.stats.bytes_to_workers += tensor_bytes(tensor)

    def cancel(self, job_id: int) -> None:
        for rank, (job, _) in list(self.busy.items()):
            if job.id == job_id:
                dist.send(torch.tensor([job_id, 1], dtype=torch.int64), dst=rank, group=self.ctrl)
                self.stats.cancel_requests += 1

    def _receiver(self, rank: int) -> None:
        while True:
            job = self.expect[rank].get()
            if job is None:
                return
            try:
                self.results.put(self._receive(rank, job))
            except Exception as exc:  # a dead peer: reported by wait()
                self.results.put(JobResult(job, "failed", None, rank, 0.0, {}, f"{type(exc).__name__}: {exc}"))
                return

    def wait(self, timeout: float) -> list[JobResult]:
        out = drain(self.results, timeout)
        for r in out:
            self.busy.pop(r.worker, None)
            if r.status == "failed":
                raise WorkerFailure(f"job {r.job.id} failed on torchrun worker rank {r.worker}: "
                                    f"{r.error or r.meta.get('error')}")
        now = time.perf_counter()
        for rank, (job, since) in self.busy.items():
            if now - since > self.job_timeout_s:
                raise WorkerFailure(f"torchrun worker rank {rank} gave no result for job {job.id} in "
                                    f"{self.job_timeout_s:g} s (runtime.job_timeout_s)")
        return out

    def _receive(self, rank: int, job: Job) -> JobResult:
        h = _recv((_HEADER,), torch.int64, rank).tolist()
        status = _STATUS[h[6]]
        compute = _recv((1,), torch.float64, rank)
        output, meta = None, {}
        if status == DONE:
            output = _recv(self.out_shape, torch.float32, rank)
            self.stats.bytes_from_workers += tensor_bytes(output)
        if h[7]:
            meta = json.loads(bytes(_recv((h[7],), torch.uint8, rank).tolist()).decode())
        self.stats.cancelled_mid_forward += status == CANCELLED
        return JobResult(job, status, output, rank, float(compute[0]), meta)

    def close(self) -> None:
        for rank in self.ranks:
            self.expect[rank].put(None)
            _send_header([OP_STOP], 0.0, rank)
            dist.send(torch.tensor([-1, -1], dtype=torch.int64), dst=rank, group=self.ctrl)
        for t in self.threads:
            t.join(timeout=10)


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
        h = _recv((_HEADER,), torch.int64, 0).tolist()
        ts = _recv((1,), torch.float64, 0)
        if h[0] == OP_STOP:
            listener.join(timeout=10)
            return runs
        kind = GENERATION if h[0] == OP_GEN else STEP
        tensor = _recv(noise_shape if kind == GENERATION else in_shape,
                       torch.float32 if kind == GENERATION else in_dtype, 0)
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
        _send(torch.tensor([OP_RESULT, job.id, 0, 0, 0, 0, _STATUS.index(r.status), len(meta)], dtype=torch.int64), 0)
        _send(torch.tensor([r.compute_s], dtype=torch.float64), 0)
        if r.status == DONE:
            _send(r.output.float(), 0)
        if meta:
            _send(torch.tensor(list(meta), dtype=torch.uint8), 0)
        runs += 1


def _shapes(cfg: Any, spec: WorkerSpec, plan: Any) -> tuple[tuple[int, ...], torch.dtype, tuple[int, ...], tuple[int, ...]]:
    """(model input shape, its dtype, output shape, generation noise shape) of one job."""
    if cfg.runtime.mode == "latency":
        t = plan[0]
        return tuple(t.x_in.shape), t.x_in.dtype, tuple(t.x.shape), tuple(t.x.shape)
    shape = (1, *plan.shape[1:])
    return shape, torch.float32, shape, shape


def run_on_torchrun(cfg: Any, spec: WorkerSpec, plan: Any, *, progress: bool = True,
                    log: Callable[[str], None] = print, cond: Any = None):
    """Rank 0: coordinate ``plan`` over the worker ranks (which run :func:`run_worker_rank`); the
    job's encoded conditioning ``cond`` (CPU tensors) is broadcast to them once."""
    from .run import coordinate

    rank, world, ctrl = init(cfg.runtime, spec.device)
    if rank != 0:
        raise SpecdistError("run_on_torchrun is rank 0's entry point; worker ranks call run_worker_rank")
    in_shape, in_dtype, out_shape, _ = _shapes(cfg, spec, plan)
    # the job's shapes go to the workers once (a worker rank cannot build the plan cheaply)
    dims = torch.tensor([len(in_shape), *in_shape] + [0] * (8 - len(in_shape)), dtype=torch.int64)
    dist.broadcast(dims.to(_wire()), src=0)
    dist.broadcast_object_list([cond], src=0)  # the encoded prompts: workers load no text encoder
    pool = TorchrunPool(world, ctrl, out_shape, cfg.runtime.job_timeout_s)
    log(f"specdist: torchrun backend: {world - 1} worker ranks ({dist.get_backend()})")
    try:
        result = coordinate(pool, cfg, plan, progress)
    finally:
        pool.close()
        dist.destroy_process_group()
    result.stats.extra.update(pool=pool.stats.__dict__)
    return result


def run_worker_rank(cfg: Any, spec: WorkerSpec) -> int:
    """A worker rank (≥ 1): load the transformer from ``spec``, receive the job's shapes and encoded
    conditioning from rank 0, and serve jobs until rank 0 stops."""
    from .worker import StepWorker, load_worker_model

    rank, world, ctrl = init(cfg.runtime, spec.device)
    bundle = load_worker_model(spec)  # before the broadcasts: rank 0 waits there until every rank has loaded
    dims = torch.zeros(9, dtype=torch.int64, device=_wire())
    dist.broadcast(dims, src=0)
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    worker = StepWorker(bundle.transformer, bundle.adapter, bundle.scheduler, box[0], spec)
    dims = dims.cpu()
    n = int(dims[0])
    shape = tuple(int(d) for d in dims[1:1 + n])
    dtype = model_dtype(worker.model)
    try:
        return serve(worker, ctrl, shape, dtype, shape)
    finally:
        worker.close()
