"""The ``torchrun`` backend: SPMD ranks, rank 0 coordinates, the other ranks are reference workers
(with ``runtime.gang_size > 1`` each worker is a gang of ranks: rank 0 talks to its leader, which
broadcasts every job to its members, :mod:`specdist.runtime.gang`).

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
from .gang import (Gang, GangFailure, GangRanks, build_gangs, enable_context_parallel, gang_call, job_fn, serve_gang,
                   stop_gang)
from .jobs import CANCELLED, DONE, DRAFT, GENERATION, STEP, Job, JobResult, WorkerSpec
from .parallel_dims import ParallelDims
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


def gang_size_of(rt: Any) -> int:
    """Ranks per worker of ``rt`` (``auto`` is one rank without an accelerator; see :func:`~.layout.job_layout`)."""
    return 1 if rt.gang_size == "auto" else int(rt.gang_size)


def init(rt: Any, device: str) -> tuple[int, int]:
    """Join the process group; checks the world size against the config (1 coordinator + workers ×
    gang_size). The cancel and gang groups come later, from :func:`join_layout` (every rank)."""
    info = rank_info()
    if info is None:
        raise SpecdistError("runtime.backend=torchrun needs torchrun (RANK/WORLD_SIZE unset); "
                            "launch with launch/torchrun.sh or use runtime.backend=local|ray")
    rank, world = info
    g = gang_size_of(rt)
    if world != rt.workers * g + 1:
        raise SpecdistError(f"runtime.workers={rt.workers} × runtime.gang_size={g} needs WORLD_SIZE="
                            f"{rt.workers * g + 1} (rank 0 coordinates), but torchrun started {world} processes")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        # idle ranks block in receives for as long as a run lasts; rank 0 bounds waits for results
        # itself (runtime.job_timeout_s), and torchrun tears the group down when a rank dies
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=max(rt.startup_timeout_s, 86400)))
    return rank, world


def join_layout(rt: Any, dims: ParallelDims, rank: int, device: str) -> GangRanks:
    """Every rank: create the layout's groups (:func:`~.gang.build_gangs`: per gang its mesh,
    ``ctrl`` and ``dispatch`` groups, then the world's cancel group). A gang's collectives are bounded
    by ``runtime.job_timeout_s``."""
    dev = torch.device("cuda", torch.cuda.current_device()) if device != "cpu" and torch.cuda.is_available() \
        else torch.device("cpu")
    return build_gangs(dims, rank, dev, rt.job_timeout_s)


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

    def __init__(self, ranks: list[int], ctrl: Any, job_timeout_s: float, gang_size: int = 1) -> None:
        super().__init__()
        self.ranks = list(ranks)  # the workers' ranks (each gang's leader)
        self.gang_size = gang_size
        self.ctrl, self.job_timeout_s = ctrl, job_timeout_s
        self.busy: dict[int, tuple[Job, float]] = {}  # rank -> (job, since)
        self.results: queue.Queue = queue.Queue()
        self.expect: dict[int, queue.Queue] = {r: queue.Queue() for r in self.ranks}
        self.threads = [threading.Thread(target=self._receiver, args=(r,), daemon=True) for r in self.ranks]
        for t in self.threads:
            t.start()
        gangs = f"; gangs of {gang_size}: job inputs broadcast by each leader" if gang_size > 1 else ""
        self.stats = PoolStats(transport=f"torch.distributed p2p ({dist.get_backend()}){gangs}")

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
                where = f"gang led by rank {r.worker}" if self.gang_size > 1 else f"rank {r.worker}"
                raise WorkerFailure(f"job {r.job.id} failed on torchrun worker {where}: "
                                    f"{r.error or r.meta.get('error')}")
        now = time.perf_counter()
        for rank, (job, since) in self.busy.items():
            if now - since > self.job_timeout_s:
                where = f"gang led by rank {rank}" if self.gang_size > 1 else f"rank {rank}"
                raise WorkerFailure(f"torchrun worker {where} gave no result for job {job.id} in "
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


def _job_dict(job: Job) -> dict:
    return dataclasses.asdict(job)


def _reply(r: JobResult) -> None:
    output = r.output.float() if r.status == DONE and r.output is not None else None
    features = tuple(r.features) if r.status == DONE else ()
    reply = _blob_bytes({"meta": r.meta, "output": None if output is None else _describe((output,))[0],
                         "features": _describe(features)})
    _send(torch.tensor([OP_RESULT, r.job.id, 0, 0, 0, 0, _STATUS.index(r.status), len(reply)], dtype=torch.int64), 0)
    _send(torch.tensor([r.compute_s], dtype=torch.float64), 0)
    _send(torch.tensor(list(reply), dtype=torch.uint8), 0)
    for t in ((output,) if output is not None else ()) + features:
        _send(t, 0)


def serve(worker: Any, ctrl: Any, gang: Gang | None = None) -> int:
    """A worker rank's loop (a gang's leader with ``gang``): receive jobs from rank 0, run them (on
    the whole gang), send results; returns jobs run.

    A gang that failed (:class:`~.gang.GangFailure`: a member died, hung past ``runtime.job_timeout_s``
    or raised) answers this job and every later one with ``failed`` and the failure's message, so
    rank 0 ends the run with it; the leader does not touch the gang's broken groups again.
    """
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

    def flag_of(job_id: int) -> threading.Event:
        with lock:
            return flags.setdefault(job_id, threading.Event())

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    rank, runs = dist.get_rank(), 0
    broken: str | None = None  # the gang's failure, once it failed
    fn = job_fn(worker, rank, flag_of) if gang is not None else None
    while True:
        h = _recv((_HEADER,), torch.int64, 0).tolist()
        ts = _recv((1,), torch.float64, 0)
        if h[0] == OP_STOP:
            if gang is not None and broken is None:
                stop_gang(gang)
            listener.join(timeout=10)
            return runs
        kind = {OP_GEN: GENERATION, OP_DRAFT: DRAFT}.get(h[0], STEP)
        blob = json.loads(bytes(_recv((h[7],), torch.uint8, 0).tolist()).decode())
        tensors = _recv_tensors(blob["tensors"], 0)
        job = Job(h[1], kind, h[2], h[3], float(ts[0]), _TS_DTYPES[h[5]], h[4], blob["job"])
        flag = flag_of(job.id)
        try:
            if broken is not None:
                raise GangFailure(broken)
            if gang is None:
                r = worker.run(job, tensors, flag, rank)
            else:
                r = gang_call(gang, fn, _job_dict(job), tuple(tensors))
        except GangFailure as exc:
            broken = str(exc)
            r = JobResult(job, "failed", None, rank, 0.0, {"error": f"GangFailure: {exc}"})
        except Exception as exc:  # reported to rank 0, which fails the run clearly
            r = JobResult(job, "failed", None, rank, 0.0, {"error": f"{type(exc).__name__}: {exc}"})
        with lock:
            flags.pop(job.id, None)
        _reply(r)
        runs += 1


def run_on_torchrun(cfg: Any, spec: WorkerSpec, plan: Any, *, progress: bool = True,
                    log: Callable[[str], None] = print, cond: Any = None, dims: ParallelDims | None = None):
    """Rank 0: coordinate ``plan`` over the workers (which run :func:`run_worker_rank`); the job's
    encoded conditioning ``cond`` (CPU tensors) and the layout ``dims`` are broadcast to them once.
    With gangs (``dims.gang_size > 1``) rank 0 talks to each gang's leader only."""
    from .run import coordinate

    rank, world = init(cfg.runtime, spec.device)
    if rank != 0:
        raise SpecdistError("run_on_torchrun is rank 0's entry point; worker ranks call run_worker_rank")
    dims = dims or ParallelDims.from_runtime(cfg.runtime, gang_size=gang_size_of(cfg.runtime))
    # encoded prompts (workers load no text encoder), speca's calibration (throughput generations with
    # a quality target) and the layout every rank builds its groups from
    dist.broadcast_object_list([cond, spec.calibration, dims], src=0)
    view = join_layout(cfg.runtime, dims, rank, spec.device)
    pool = TorchrunPool(list(dims.leaders), view.world_ctrl, cfg.runtime.job_timeout_s, dims.gang_size)
    gangs = (f" = {dims.workers} gangs of {dims.gang_size} (ulysses_degree={dims.ulysses_degree}, "
             f"ring_degree={dims.ring_degree}), leaders {list(dims.leaders)}" if dims.gang_size > 1 else "")
    log(f"specdist: torchrun backend: {world - 1} worker ranks{gangs} ({dist.get_backend()})")
    try:
        result = coordinate(pool, cfg, plan, progress)
    finally:
        pool.close()
        dist.destroy_process_group()
    result.stats.extra.update(pool=pool.stats.__dict__, layout={
        "gang_size": dims.gang_size, "ulysses_degree": dims.ulysses_degree, "ring_degree": dims.ring_degree,
        "world_size": dims.world_size, "leaders": list(dims.leaders)})
    return result


def run_worker_rank(cfg: Any, spec: WorkerSpec) -> int:
    """A worker rank (≥ 1): load the transformer from ``spec``, receive the job's encoded
    conditioning and layout from rank 0, and serve jobs until rank 0 stops. In a gang the leader
    serves rank 0 (:func:`serve`) and the members take part in each of its calls
    (:func:`~.gang.serve_gang`), the model running under diffusers context parallelism."""
    from .worker import StepWorker, load_worker_model

    rank, world = init(cfg.runtime, spec.device)
    bundle = load_worker_model(spec)  # before the broadcast: rank 0 waits there until every rank has loaded
    box: list[Any] = [None, None, None]
    dist.broadcast_object_list(box, src=0)
    dims: ParallelDims = box[2]
    view = join_layout(cfg.runtime, dims, rank, spec.device)
    gang = view.gang
    if gang is not None:
        backend = "native" if spec.attention_backend == "auto" else spec.attention_backend
        enable_context_parallel(bundle.transformer, bundle.adapter, gang, backend)
    worker = StepWorker(bundle.transformer, bundle.adapter, bundle.scheduler, box[0],
                        dataclasses.replace(spec, calibration=box[1]), group=None if gang is None else gang.ctrl)
    try:
        if gang is None or gang.is_leader:
            return serve(worker, view.world_ctrl, gang)
        never = threading.Event()  # a member sees no cancel itself: the leader's flag is agreed per block
        return serve_gang(gang, job_fn(worker, rank, lambda _id: never))
    finally:
        worker.close()
