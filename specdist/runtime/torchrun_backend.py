"""The ``torchrun`` backend: SPMD ranks, rank 0 coordinates, ranks 1..W are reference workers.

Messages are torch.distributed point-to-point sends on the default group (``gloo`` on CPU, ``nccl``
on GPUs): a fixed header (``int64[8]``: op, job id, sample, step, window, timestep dtype code,
tensor count or status, meta length), the timestep or compute time (``float64[1]``), a JSON meta
blob (``uint8``: the job's or result's meta and the shapes and dtypes of the tensors that follow),
then the tensors. Cancellations go on a second gloo group that each worker reads from a listener
thread, so a cancel reaches a worker in the middle of a forward pass. Rank 0 receives results with
one thread per worker rank (blocking receives, posted only while that rank has a job), so it never
blocks on one worker. With NCCL each rank uses GPU ``LOCAL_RANK`` and messages are staged on it.
"""

from __future__ import annotations

import dataclasses
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
from .jobs import CANCELLED, DONE, DRAFT, GENERATION, STEP, Job, JobResult, WorkerSpec
from .pool import PoolStats, WorkerFailure, WorkerPool, drain, tensor_bytes

OP_STOP, OP_STEP, OP_GEN, OP_RESULT, OP_DRAFT = 0, 1, 2, 3, 4
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


_DTYPE_OF = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16,
                                                       torch.int64, torch.int32, torch.uint8, torch.bool)}


def _describe(tensors: tuple[torch.Tensor, ...]) -> list[list]:
    return [[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in tensors]


def _blob_bytes(payload: dict) -> bytes:
    return json.dumps(payload).encode()


def _recv_tensors(described: list[list], src: int) -> tuple[torch.Tensor, ...]:
    return tuple(_recv(tuple(shape), _DTYPE_OF[dtype], src) for shape, dtype in described)


class TorchrunPool(WorkerPool):
    """Rank 0's view of the worker ranks.

    One receiver thread per worker rank posts a blocking receive only while that rank has a job
    (gloo's ``irecv`` cannot be polled for completion), and queues the result.
    """

    def __init__(self, world: int, ctrl: Any, job_timeout_s: float) -> None:
        super().__init__()
        self.ranks = list(range(1, world))
        self.ctrl, self.job_timeout_s = ctrl, job_timeout_s
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

    def submit(self, job: Job, tensors: tuple[torch.Tensor, ...]) -> None:
        rank = next(r for r in self.ranks if r not in self.busy)
        op = {GENERATION: OP_GEN, DRAFT: OP_DRAFT}.get(job.kind, OP_STEP)
        tensors = tuple(tensors)
        self.busy[rank] = (job, time.perf_counter())
        self.expect[rank].put(job)
        blob = _blob_bytes({"job": job.meta, "tensors": _describe(tensors)})
        _send_header([op, job.id, job.sample, job.step, job.window, _TS_DTYPES.index(job.timestep_dtype),
                      len(tensors), len(blob)], job.timestep, rank)
        _send(torch.tensor(list(blob), dtype=torch.uint8), rank)
        for t in tensors:
            _send(t, rank)
        self.stats.jobs += 1
        self.stats.bytes_to_workers += tensor_bytes(tensors)

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
        blob = json.loads(bytes(_recv((h[7],), torch.uint8, rank).tolist()).decode())
        output = None
        if blob["output"] is not None:
            (output,) = _recv_tensors([blob["output"]], rank)
        features = _recv_tensors(blob["features"], rank)
        self.stats.bytes_from_workers += tensor_bytes(output) + tensor_bytes(features)
        self.stats.cancelled_mid_forward += status == CANCELLED
        return JobResult(job, status, output, rank, float(compute[0]), blob["meta"], features=features)

    def close(self) -> None:
        for rank in self.ranks:
            self.expect[rank].put(None)
            _send_header([OP_STOP], 0.0, rank)
            dist.send(torch.tensor([-1, -1], dtype=torch.int64), dst=rank, group=self.ctrl)
        for t in self.threads:
            t.join(timeout=10)


def serve(worker: Any, ctrl: Any) -> int:
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
        kind = {OP_GEN: GENERATION, OP_DRAFT: DRAFT}.get(h[0], STEP)
        blob = json.loads(bytes(_recv((h[7],), torch.uint8, 0).tolist()).decode())
        tensors = _recv_tensors(blob["tensors"], 0)
        job = Job(h[1], kind, h[2], h[3], float(ts[0]), _TS_DTYPES[h[5]], h[4], blob["job"])
        with lock:
            flag = flags.setdefault(job.id, threading.Event())
        try:
            r = worker.run(job, tensors, flag, rank)
        except Exception as exc:  # reported to rank 0, which fails the run clearly
            r = JobResult(job, "failed", None, rank, 0.0, {"error": f"{type(exc).__name__}: {exc}"})
        with lock:
            flags.pop(job.id, None)
        output = r.output.float() if r.status == DONE and r.output is not None else None
        features = tuple(r.features) if r.status == DONE else ()
        reply = _blob_bytes({"meta": r.meta, "output": None if output is None else _describe((output,))[0],
                             "features": _describe(features)})
        _send(torch.tensor([OP_RESULT, job.id, 0, 0, 0, 0, _STATUS.index(r.status), len(reply)], dtype=torch.int64), 0)
        _send(torch.tensor([r.compute_s], dtype=torch.float64), 0)
        _send(torch.tensor(list(reply), dtype=torch.uint8), 0)
        for t in ((output,) if output is not None else ()) + features:
            _send(t, 0)
        runs += 1


def run_on_torchrun(cfg: Any, spec: WorkerSpec, plan: Any, *, progress: bool = True,
                    log: Callable[[str], None] = print, cond: Any = None):
    """Rank 0: coordinate ``plan`` over the worker ranks (which run :func:`run_worker_rank`); the
    job's encoded conditioning ``cond`` (CPU tensors) is broadcast to them once."""
    from .run import coordinate

    rank, world, ctrl = init(cfg.runtime, spec.device)
    if rank != 0:
        raise SpecdistError("run_on_torchrun is rank 0's entry point; worker ranks call run_worker_rank")
    dist.broadcast_object_list([cond, spec.calibration], src=0)  # encoded prompts (workers load no text
    # encoder) and speca's calibration (throughput generations with a quality target)
    pool = TorchrunPool(world, ctrl, cfg.runtime.job_timeout_s)
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
    bundle = load_worker_model(spec)  # before the broadcast: rank 0 waits there until every rank has loaded
    box: list[Any] = [None, None]
    dist.broadcast_object_list(box, src=0)
    worker = StepWorker(bundle.transformer, bundle.adapter, bundle.scheduler, box[0],
                        dataclasses.replace(spec, calibration=box[1]))
    try:
        return serve(worker, ctrl)
    finally:
        worker.close()
