"""The ``ray`` backend: one Ray actor per reference worker, gang-scheduled in a placement group.

Layout: a coordinator actor and ``workers`` worker actors, one placement-group bundle each
(``{"CPU": 1}`` here, ``{"CPU": 1, "GPU": g}`` per worker on GPUs). The coordinator actor runs the
same :class:`~specdist.runtime.coordinator.Coordinator` as the other backends. Tensors never go
through the object store: the coordinator and the workers form a Ray collective group
(``torch_gloo``; ``nccl`` when the workers hold GPUs) and every tensor is the return value of a method
declared ``@ray.method(tensor_transport=...)``, passed by ObjectRef straight to the actor that
consumes it (Ray Direct Transport: the coordinator "emits" a model input to a worker, the worker's
output is "absorbed" by the coordinator). Only small control data (job headers, stats) are pickled.

A worker actor is threaded (``max_concurrency=2``) so ``cancel(job_id)`` reaches it while a forward
runs. A dead worker (its process killed) is noticed when its result fails; its job is resubmitted
to the others. The driver starts a local cluster (``runtime.ray_address: null``) and stops it
afterwards, or joins an existing one.

With ``runtime.gang_size > 1`` each worker is a gang of actors (one placement group per gang,
``STRICT_PACK``) that runs every model call together under diffusers context parallelism; the
coordinator talks to the gangs' leaders only (:mod:`specdist.runtime.ray_gangs`).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
import torch

from ..errors import SpecdistError
from .gang import gang_call
from .jobs import Job, JobResult, WorkerSpec
from .pool import PoolStats, WorkerFailure, WorkerPool, tensor_bytes


class RayWorker:
    """A reference worker actor (wraps a :class:`~specdist.runtime.worker.StepWorker`), or one rank
    of a gang (``gang=True``: the worker is made in :meth:`join_gang`, once the gang's groups exist)."""

    def __init__(self, spec: WorkerSpec, index: int, cond: Any = None, gang: bool = False) -> None:
        from .worker import StepWorker, load_worker_model

        self.index, self.spec, self.cond = index, spec, cond
        self.flags: dict[int, threading.Event] = {}
        self.started: dict[int, float] = {}  # job id -> when its forward began
        self.gang, self.fn = None, None
        if gang:
            self.bundle = load_worker_model(spec)
            self.worker = None
        else:
            self.worker = StepWorker.from_spec(spec, cond)  # cond: the job's encoded prompts (no text encoder here)

    def join_world(self, address: str, rank: int, world_size: int, timeout_s: float) -> int:
        """Gang ranks: join the job's torch.distributed world (:func:`~.ray_gangs.join_world`)."""
        from .ray_gangs import join_world

        join_world(address, rank, world_size, timeout_s)
        return rank

    def join_gang(self, dims: Any, rank: int, timeout_s: float) -> tuple[int, int]:
        """Gang ranks: build the layout's groups (collective over the world), put the model under
        context parallelism on this rank's gang and make the worker; returns ``(gang, member)``."""
        from .gang import build_gangs, enable_context_parallel, job_fn
        from .ray_gangs import gang_device
        from .worker import StepWorker

        gang = build_gangs(dims, rank, gang_device(), timeout_s).gang
        backend = "native" if self.spec.attention_backend == "auto" else self.spec.attention_backend
        b = self.bundle
        enable_context_parallel(b.transformer, b.adapter, gang, backend)
        self.worker = StepWorker(b.transformer, b.adapter, b.scheduler, self.cond, self.spec, group=gang.ctrl)
        self.gang = gang
        never = threading.Event()  # a member sees no cancel itself: the leader's flag is agreed per block
        flag_of = (lambda job_id: self.flags.setdefault(job_id, threading.Event())) if gang.is_leader \
            else (lambda _id: never)
        self.fn = job_fn(self.worker, rank, flag_of)
        return gang.index, gang.member

    def serve_members(self) -> int:
        """A gang member: take part in the leader's calls until it stops the gang; returns calls run."""
        from .gang import serve_gang

        return serve_gang(self.gang, self.fn)

    def stop_gang(self) -> None:
        """A gang leader: release the members from :meth:`serve_members`."""
        from .gang import stop_gang

        if self.gang is not None:
            stop_gang(self.gang)

    def ready(self) -> int:
        """The worker's process id (once the model is loaded)."""
        return os.getpid()

    def running(self) -> dict[int, float]:
        """Jobs whose forward is running (their input has arrived): job id -> seconds since it began."""
        now = time.perf_counter()
        return {jid: now - t for jid, t in list(self.started.items())}

    def _compute(self, job: Job, tensors: tuple[torch.Tensor, ...]) -> tuple:
        flag = self.flags.setdefault(job.id, threading.Event())
        self.started[job.id] = time.perf_counter()
        try:
            if self.gang is None:
                r = self.worker.run(job, tensors, flag, self.index)
            else:  # the whole gang runs it; a failed collective raises GangFailure naming the gang
                r = gang_call(self.gang, self.fn, dataclasses.asdict(job), tuple(tensors))
        finally:
            self.flags.pop(job.id, None)
            self.started.pop(job.id, None)
        return r.status, (r.output if r.output is not None else torch.empty(0)), r.compute_s, r.meta, r.features

    @ray.method(tensor_transport="gloo")
    def compute_gloo(self, job: Job, tensors: tuple[torch.Tensor, ...]):
        return self._compute(job, tensors)

    @ray.method(tensor_transport="nccl")
    def compute_nccl(self, job: Job, tensors: tuple[torch.Tensor, ...]):
        status, out, compute_s, meta, features = self._compute(job, tensors)
        return status, out.cuda(), compute_s, meta, tuple(f.cuda() for f in features)

    def progress(self) -> dict[int, int]:
        """Steps completed by this worker's running generation job."""
        return dict(self.worker.steps_done)

    def cancel(self, job_id: int) -> None:
        """Stop job ``job_id`` at the next block boundary (or before it starts)."""
        self.flags.setdefault(job_id, threading.Event()).set()


class RayCoordinator:
    """The coordinator actor: owns the collective group's rank 0 and runs the coordinator."""

    def __init__(self, workers: list[Any], transport: str, ranks: list[Any] | None = None) -> None:
        self.workers, self.transport = workers, transport  # workers: the pool's (gang leaders with gangs)
        self.ranks = list(workers) if ranks is None else list(ranks)  # every worker-rank actor, in rank order
        self.box: dict[Any, Any] = {}
        self.me = None

    def rendezvous(self) -> str:
        """Gangs: the world's rendezvous address, on this actor's node."""
        from .ray_gangs import rendezvous_address

        return rendezvous_address()

    def join_world(self, address: str, world_size: int, timeout_s: float) -> int:
        """Gangs: join the job's world as rank 0."""
        from .ray_gangs import join_world

        join_world(address, 0, world_size, timeout_s)
        return 0

    def join_gangs(self, dims: Any, timeout_s: float) -> None:
        """Gangs: take part (as rank 0) in creating the layout's groups."""
        from .gang import build_gangs

        build_gangs(dims, 0, torch.device("cpu"), timeout_s)

    def setup(self) -> str:
        from ray.experimental.collective import create_collective_group

        self.me = ray.get_runtime_context().current_actor
        create_collective_group([self.me, *self.ranks], backend="torch_gloo" if self.transport == "gloo" else "nccl")
        return self.transport

    @ray.method(tensor_transport="gloo")
    def emit_gloo(self, key: int) -> tuple[torch.Tensor, ...]:
        return self.box.pop(("out", key))

    @ray.method(tensor_transport="nccl")
    def emit_nccl(self, key: int) -> tuple[torch.Tensor, ...]:
        return tuple(t.cuda() for t in self.box.pop(("out", key)))

    def absorb(self, key: int, result: tuple) -> int:
        status, tensor, compute_s, meta, features = result
        self.box[("in", key)] = (status, tensor.cpu() if tensor.numel() else None, compute_s, meta,
                                 tuple(f.cpu() for f in features))
        return key

    def run(self, cfg: Any, plan: Any, progress: bool, max_retries: int) -> tuple[Any, dict]:
        from .run import coordinate

        torch.set_num_threads(1)
        pool = RayPool(self, max_retries)
        result = coordinate(pool, cfg, plan, progress)
        return result, dataclasses.asdict(pool.stats)


class RayPool(WorkerPool):
    """The pool seen by the coordinator inside :class:`RayCoordinator`."""

    def __init__(self, host: RayCoordinator, max_retries: int) -> None:
        super().__init__()
        self.host, self.max_retries = host, max_retries
        self.alive = list(range(len(host.workers)))
        self.busy: dict[int, int] = {}  # job id -> worker
        self.pending: dict[Any, tuple[Job, int]] = {}  # absorb ref -> (job, worker)
        self.inputs: dict[int, torch.Tensor] = {}
        self.tries: dict[int, int] = {}
        self.requeue: list[Job] = []  # jobs of dead workers, resubmitted as workers free up
        g = len(host.ranks) // max(len(host.workers), 1)
        gangs = f"; gangs of {g}: job inputs broadcast by each leader" if g > 1 else ""
        self.stats = PoolStats(transport=f"ray tensor transport ({host.transport}){gangs}")
        self._progress: dict[int, int] = {}
        self._progress_at = 0.0

    @property
    def workers(self) -> int:
        return len(self.alive)

    def _free(self) -> list[int]:
        return [w for w in self.alive if w not in self.busy.values()]

    def idle(self) -> int:
        return max(0, len(self._free()) - len(self.requeue))

    def submit(self, job: Job, tensors: tuple[torch.Tensor, ...]) -> None:
        free = self._free()
        if not free:
            raise RuntimeError("RayPool.submit: no idle worker")
        w, host = free[0], self.host
        tensors = tuple(tensors)
        self.inputs[job.id] = tensors
        host.box[("out", job.id)] = tensors
        emit = host.me.emit_gloo if host.transport == "gloo" else host.me.emit_nccl
        worker = host.workers[w]
        compute = worker.compute_gloo if host.transport == "gloo" else worker.compute_nccl
        out_ref = compute.remote(job, emit.remote(job.id))
        self.pending[host.me.absorb.remote(job.id, out_ref)] = (job, w)
        self.busy[job.id] = w
        self.stats.jobs += 1
        self.stats.bytes_to_workers += tensor_bytes(tensors)

    def progress(self) -> dict[int, int]:
        now = time.perf_counter()
        if now - self._progress_at < 0.5:  # a poll of the workers at most twice a second
            return self._progress
        self._progress_at = now
        refs = [self.host.workers[w].progress.remote() for w in set(self.busy.values())]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.2) if refs else ([], [])
        out: dict[int, int] = {}
        for ref in ready:
            try:
                out.update(ray.get(ref))
            except ray.exceptions.RayError:
                pass  # a dead worker is handled by wait()
        self._progress = out
        return out

    def cancel(self, job_id: int) -> None:
        w = self.busy.get(job_id)
        if w is not None:
            self.host.workers[w].cancel.remote(job_id)
            self.stats.cancel_requests += 1

    def _lost(self, job: Job, w: int, exc: Exception) -> None:
        if w in self.alive:
            self.alive.remove(w)
            self.stats.workers_lost += 1
        tries = self.tries.get(job.id, 0) + 1
        self.tries[job.id] = tries
        if not self.alive:
            raise WorkerFailure(f"all Ray workers died (last: worker {w}: {type(exc).__name__}); the run cannot complete")
        if tries > self.max_retries:
            raise WorkerFailure(f"job {job.id} (sample {job.sample}, step {job.step}) was lost with a dead Ray worker "
                                f"{tries} time(s) (last: worker {w}: {type(exc).__name__}); runtime.max_retries="
                                f"{self.max_retries} allows no more resubmissions")
        self.stats.resubmitted += 1
        self.requeue.append(job)

    def _flush(self) -> None:
        while self.requeue and self._free():
            job = self.requeue.pop(0)
            self.submit(job, self.inputs[job.id])

    def wait(self, timeout: float) -> list[JobResult]:
        self._flush()
        out: list[JobResult] = []
        if not self.pending:
            time.sleep(min(timeout, 0.01))
            return out
        ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
        for ref in ready:
            job, w = self.pending.pop(ref)
            self.busy.pop(job.id, None)
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # the worker process died
                self._lost(job, w, exc)
                continue
            except ray.exceptions.RayTaskError as exc:  # the job raised: report it, do not retry
                raise WorkerFailure(f"job {job.id} (sample {job.sample}, step {job.step}) failed on Ray worker "
                                    f"{w}: {exc.cause if hasattr(exc, 'cause') else exc}") from None
            status, tensor, compute_s, meta, features = self.host.box.pop(("in", job.id))
            self.inputs.pop(job.id, None)
            self.stats.bytes_from_workers += tensor_bytes(tensor) + tensor_bytes(features)
            self.stats.cancelled_mid_forward += status == "cancelled"
            out.append(JobResult(job, status, tensor, w, compute_s, meta, features=features))
        self._flush()
        return out


def _all_dead(workers: list, timeout_s: float = 5.0) -> bool:
    """Whether every worker actor is dead: its ``ready`` call fails with an actor-death error (a
    worker that is busy or slow to answer within ``timeout_s`` counts as alive)."""
    refs = [w.ready.remote() for w in workers]
    answered, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if len(answered) < len(refs):
        return False
    for ref in answered:
        try:
            ray.get(ref)
            return False
        except ray.exceptions.RayActorError:
            pass
    return True


def _death_reason(exc: Exception) -> str:
    """The one line of a Ray actor-death error that says why the actor died."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    why = [ln for ln in lines if ln.startswith("The actor is dead because")]
    return (why or lines or [type(exc).__name__])[0].split(". ")[0].rstrip(".")


def _check_address(address: str, timeout: float) -> None:
    """Fail fast when a ``host:port`` Ray address does not answer."""
    bare = address.removeprefix("ray://")
    if address == "auto" or ":" not in bare:
        return
    host, _, port = bare.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=min(timeout, 10.0)):
            return
    except (OSError, ValueError) as exc:
        raise SpecdistError(f"runtime.ray_address {address!r} does not answer ({exc})") from None


def _placement_group(rt: Any, gpus: float):
    from ray.util.placement_group import placement_group

    need_gpus = gpus * rt.workers
    have = ray.cluster_resources()
    if need_gpus > have.get("GPU", 0):
        raise SpecdistError(f"runtime.workers={rt.workers} with {gpus:g} GPU each needs {need_gpus:g} GPUs; "
                            f"the Ray cluster has {have.get('GPU', 0):g}")
    if rt.workers + 1 > have.get("CPU", 0):
        raise SpecdistError(f"runtime.workers={rt.workers} needs {rt.workers + 1} CPUs (workers + coordinator); "
                            f"the Ray cluster has {have.get('CPU', 0):g} (raise runtime.ray_num_cpus)")
    worker_bundle = {"CPU": 1, **({"GPU": gpus} if gpus else {})}
    pg = placement_group([{"CPU": 1}] + [worker_bundle] * rt.workers, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=rt.startup_timeout_s)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise SpecdistError(f"placement group of {rt.workers} workers could not be scheduled within "
                            f"{rt.startup_timeout_s:g} s (cluster resources: {have})")
    return pg


def run_on_ray(cfg: Any, spec: WorkerSpec, plan: Any, *, progress: bool = True,
               log: Callable[[str], None] = print, on_workers: Callable[[list[int], Any], None] | None = None,
               cond: Any = None, dims: Any = None):
    """Start (or join) a Ray cluster, run ``plan`` there, and tear everything down again. ``cond``
    (the job's encoded conditioning, on the CPU) goes to each worker actor with its constructor.
    ``dims`` (the job's :class:`~specdist.runtime.parallel_dims.ParallelDims`): with
    ``gang_size > 1`` every worker is a gang of actors (:mod:`specdist.runtime.ray_gangs`).

    ``on_workers(pids, actors)`` is called once the workers are ready (``actors``: their Ray handles —
    the gang leaders with gangs —, whose ``running()`` says which job each is computing; tests use it
    to kill a busy worker)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    rt = cfg.runtime
    g = dims.gang_size if dims is not None else 1
    started = False
    if not ray.is_initialized():
        if rt.ray_address:
            _check_address(rt.ray_address, rt.startup_timeout_s)
            try:
                ray.init(address=rt.ray_address, log_to_driver=False)
            except ConnectionError as exc:
                raise SpecdistError(f"runtime.ray_address {rt.ray_address!r}: no Ray cluster answers ({exc})") from None
        else:
            ray.init(num_cpus=rt.ray_num_cpus or rt.workers * g + 1, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        started = True
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    auto_gpus = 1.0 if spec.device == "cuda" or (spec.device == "auto" and cluster_gpus > 0) else 0.0
    gpus = rt.gpus_per_worker if rt.gpus_per_worker is not None else auto_gpus
    transport = "nccl" if gpus > 0 else "gloo"
    groups, actors, members = [], [], []
    try:
        t0 = time.perf_counter()
        if g == 1:
            groups = [_placement_group(rt, gpus)]
            strat = lambda i: PlacementGroupSchedulingStrategy(placement_group=groups[0], placement_group_bundle_index=i)
            worker_cls = ray.remote(max_concurrency=2)(RayWorker)
            workers = [worker_cls.options(num_cpus=1, num_gpus=gpus, scheduling_strategy=strat(i + 1)).remote(spec, i, cond)
                       for i in range(rt.workers)]
            actors.extend(workers)
            pids = ray.get([w.ready.remote() for w in workers], timeout=rt.startup_timeout_s)
            coord = ray.remote(max_concurrency=8)(RayCoordinator).options(
                num_cpus=1, scheduling_strategy=strat(0)).remote(workers, transport)
            actors.append(coord)
            ray.get(coord.setup.remote(), timeout=rt.startup_timeout_s)
            what = f"{rt.workers} worker actors"
        else:
            from .ray_gangs import gang_placement_groups

            groups = gang_placement_groups(dims, gpus, rt.startup_timeout_s)
            coord, workers, members, pids = _start_gangs(dims, spec, cond, gpus, transport, groups, rt, actors)
            what = (f"{dims.workers} gangs of {g} actors (ulysses_degree={dims.ulysses_degree}, "
                    f"ring_degree={dims.ring_degree}; STRICT_PACK per gang)")
        log(f"specdist: ray backend: {what} ready in {time.perf_counter() - t0:.1f}s (transport {transport})")
        if on_workers is not None:
            on_workers(pids, workers)
        try:
            result, pool_stats = ray.get(coord.run.remote(cfg, plan, progress, rt.max_retries))
        except ray.exceptions.RayActorError as exc:  # the coordinator actor itself is gone
            if _all_dead(workers):  # killed with its workers: name the cause, not the casualty
                raise SpecdistError(f"all Ray workers died, and the coordinator actor with them "
                                    f"({_death_reason(exc)}); the run cannot complete") from None
            raise SpecdistError(f"the Ray coordinator actor died ({_death_reason(exc)}); the run cannot complete "
                                "(a worker that dies while a tensor moves to or from it does this: Ray's collective "
                                "tensor transport then kills both ends of the failed transfer)") from None
        result.stats.extra.update(pool=pool_stats, worker_pids=pids)
        if members:  # release the members: each loop returns the calls it took part in
            ray.get([w.stop_gang.remote() for w in workers], timeout=rt.job_timeout_s)
            result.stats.extra["gang_member_calls"] = ray.get(members, timeout=rt.job_timeout_s)
        if dims is not None and g > 1:
            result.stats.extra["layout"] = {"gang_size": g, "ulysses_degree": dims.ulysses_degree,
                                            "ring_degree": dims.ring_degree, "world_size": dims.world_size,
                                            "leaders": list(dims.leaders)}
        return result
    except ray.exceptions.GetTimeoutError:
        raise SpecdistError(f"Ray workers did not start within runtime.startup_timeout_s={rt.startup_timeout_s:g} s") from None
    except ray.exceptions.RayTaskError as exc:
        cause = exc.as_instanceof_cause() if hasattr(exc, "as_instanceof_cause") else exc
        if isinstance(getattr(exc, "cause", None), SpecdistError):
            raise exc.cause from None
        raise SpecdistError(f"the Ray coordinator failed: {cause}") from None
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        for pg in groups:
            ray.util.remove_placement_group(pg)
        if started:
            ray.shutdown()


def _start_gangs(dims: Any, spec: WorkerSpec, cond: Any, gpus: float, transport: str, groups: list[Any], rt: Any,
                 actors: list[Any]) -> tuple[Any, list[Any], list[Any], list[int]]:
    """Gangs (:mod:`~.ray_gangs`): the coordinator and every gang rank's actor in its placement group,
    one torch.distributed world in :class:`ParallelDims` rank order, the Ray collective group over it,
    the gangs' groups and context parallelism; the members left serving. Returns ``(coordinator,
    leaders, member loop refs, leader pids)``; every actor started is appended to ``actors``."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    def place(pg: Any, i: int) -> Any:
        return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)

    worker_cls = ray.remote(max_concurrency=2)(RayWorker)
    by_rank: dict[int, Any] = {}
    for k in range(dims.workers):
        for m, rank in enumerate(dims.gang_ranks(k)):
            by_rank[rank] = worker_cls.options(num_cpus=1, num_gpus=gpus,
                                               scheduling_strategy=place(groups[k + 1], m)).remote(spec, k, cond, True)
            actors.append(by_rank[rank])
    ranks = [by_rank[r] for r in range(1, dims.world_size)]
    pids = ray.get([a.ready.remote() for a in ranks], timeout=rt.startup_timeout_s)
    leaders = [by_rank[r] for r in dims.leaders]
    coord = ray.remote(max_concurrency=8)(RayCoordinator).options(
        num_cpus=1, scheduling_strategy=place(groups[0], 0)).remote(leaders, transport, ranks)
    actors.append(coord)
    address = ray.get(coord.rendezvous.remote(), timeout=rt.startup_timeout_s)
    ray.get([coord.join_world.remote(address, dims.world_size, rt.startup_timeout_s),
             *[a.join_world.remote(address, r + 1, dims.world_size, rt.startup_timeout_s) for r, a in enumerate(ranks)]],
            timeout=rt.startup_timeout_s)
    ray.get(coord.setup.remote(), timeout=rt.startup_timeout_s)
    ray.get([coord.join_gangs.remote(dims, rt.job_timeout_s),
             *[a.join_gang.remote(dims, r + 1, rt.job_timeout_s) for r, a in enumerate(ranks)]],
            timeout=rt.startup_timeout_s)
    members = [by_rank[r].serve_members.remote() for r in range(1, dims.world_size) if r not in dims.leaders]
    leader_pids = [pids[r - 1] for r in dims.leaders]
    return coord, leaders, members, leader_pids
