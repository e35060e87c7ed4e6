"""Ray workers that are gangs (``runtime.gang_size > 1`` with ``runtime.backend=ray``).

Layout: one placement group for the coordinator actor and one per gang, ``STRICT_PACK`` (a gang's
``g`` actors on one node, where its context-parallel collectives are cheap; gangs spread over the
cluster as Ray places their groups). The coordinator actor and every gang rank form one
torch.distributed world in the order of :class:`~specdist.runtime.parallel_dims.ParallelDims`
(rank 0 the coordinator, gang ``k`` the contiguous ranks ``dims.gang_ranks(k)``, leader first):

1. every actor joins the world (:func:`join_world`: a TCP rendezvous at the coordinator's node;
   gloo, plus NCCL for CUDA tensors when the actors hold GPUs);
2. the coordinator creates the Ray collective group over the same actors in the same order, so
   Ray's tensor transport (coordinator ↔ leaders) runs on that world (on CPU Ray's ``torch_gloo``
   group then reuses the initialised world instead of starting its own);
3. every rank builds the layout's groups (:func:`~specdist.runtime.gang.build_gangs`, collective
   over the world): per gang its mesh, ``ctrl`` and ``dispatch`` groups; each gang rank puts its
   model under diffusers context parallelism (:func:`~specdist.runtime.gang.enable_context_parallel`);
4. the members enter :func:`~specdist.runtime.gang.serve_gang` (an actor call that returns only
   when the leader stops the gang); the coordinator's pool talks to the leaders only, and a leader
   runs each job on its whole gang (:func:`~specdist.runtime.gang.gang_call`).

The jobs a gang may run are those of the torchrun pool (:func:`~specdist.runtime.layout.gang_job_problem`).
A member that dies or hangs makes its leader's next collective fail (bounded by
``runtime.job_timeout_s``); the leader's job then raises and the coordinator ends the run with one
line naming the gang.
"""

from __future__ import annotations

import datetime
import socket
from typing import Any

import torch
import torch.distributed as dist

from ..errors import SpecdistError
from .parallel_dims import ParallelDims


def rendezvous_address() -> str:
    """``tcp://<this node's IP>:<a free port>`` (called on the coordinator's node)."""
    import ray

    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"tcp://{ip}:{port}"


def join_world(address: str, rank: int, world_size: int, timeout_s: float) -> None:
    """Join the job's torch.distributed world (every actor, concurrently): gloo for CPU tensors,
    NCCL for CUDA ones where this process sees a GPU. Idle ranks wait in receives as long as a run
    lasts, so the default group's timeout is long; the gang's own collectives are bounded
    (:func:`~specdist.runtime.gang.build_gangs`)."""
    if dist.is_initialized():
        raise SpecdistError(f"rank {rank}: this Ray actor already belongs to a torch.distributed world")
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=max(timeout_s, 86400)))


def gang_device() -> torch.device:
    """This gang rank's compute device (the Ray actor's GPU when it holds one)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def gang_placement_groups(dims: ParallelDims, gpus: float, timeout_s: float) -> list[Any]:
    """The coordinator's placement group (one CPU) and one ``STRICT_PACK`` group of ``gang_size``
    bundles per gang; fails clearly when the cluster cannot hold them within ``timeout_s``."""
    import ray
    from ray.util.placement_group import placement_group

    have = ray.cluster_resources()
    if gpus * dims.worker_ranks > have.get("GPU", 0):
        raise SpecdistError(f"{dims.describe()} with {gpus:g} GPU per rank needs {gpus * dims.worker_ranks:g} GPUs; "
                            f"the Ray cluster has {have.get('GPU', 0):g}")
    if dims.world_size > have.get("CPU", 0):
        raise SpecdistError(f"{dims.describe()} needs {dims.world_size} CPUs (every gang rank + the coordinator); "
                            f"the Ray cluster has {have.get('CPU', 0):g} (raise runtime.ray_num_cpus)")
    bundle = {"CPU": 1, **({"GPU": gpus} if gpus else {})}
    groups = [placement_group([{"CPU": 1}], strategy="PACK")]
    groups += [placement_group([bundle] * dims.gang_size, strategy="STRICT_PACK") for _ in range(dims.workers)]
    ready, _ = ray.wait([g.ready() for g in groups], num_returns=len(groups), timeout=timeout_s)
    if len(ready) < len(groups):
        for g in groups:
            ray.util.remove_placement_group(g)
        raise SpecdistError(f"{dims.workers} gangs of {dims.gang_size} (STRICT_PACK: each gang on one node) could "
                            f"not be placed within {timeout_s:g} s (cluster resources: {have})")
    return groups


__all__ = ["gang_device", "gang_placement_groups", "join_world", "rendezvous_address"]
