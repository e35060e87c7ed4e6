"""The rank arithmetic of a distributed job: workers that are gangs of ranks (pure, no torch.distributed).

One validated, frozen :class:`ParallelDims` owns every number that says *which process is what*
(torchtitan's ``ParallelDims`` is the pattern). Nothing else in specdist may compute ranks.

Model of a job:

* ``workers`` reference workers, each a **gang** of ``gang_size`` ranks that runs one model call
  together with diffusers context parallelism (``ulysses_degree × ring_degree = gang_size``; the
  ring is the outer mesh dimension, Ulysses the inner one, as diffusers' ``("ring", "ulysses")``
  mesh). Speculation runs *across* gangs: different gangs compute different model calls.
* one **coordinator**, global rank 0 (torchrun), on node 0. It holds no device slot of its own: it
  is an extra process next to node 0's gangs (torchrun accepts a different ``--nproc-per-node`` per
  node; checked with a static rendezvous of 3 + 2 processes).
* ``nodes`` nodes with ``devices_per_node`` device slots each (GPUs; ``None`` on CPU, where a node
  holds any number of ranks and :func:`check_capacity` bounds them by cores and memory).

Layout rules:

* **A gang never spans nodes** (its Ulysses all-to-all needs the node's interconnect).
* **Gangs are spread across nodes round-robin** (gang ``k`` goes to the next node with a free
  gang slot), so consecutive workers — the ones speculation keeps busy together — sit on different
  nodes and only latents and features cross the network.
* torchrun numbers ranks node by node; on each node the coordinator (node 0 only) comes first,
  then the node's gangs in gang order, each gang's ranks contiguous, ring-major within the gang.

:meth:`ParallelDims.group_specs` lists the process groups the layout needs, in the order every
rank must create them (``torch.distributed.new_group`` is collective over the whole world).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

AUTO = "auto"


def _int_or_auto(value: Any) -> bool:
    return value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


def resolve_degrees(gang_size: int, ulysses: int | str, ring: int | str, heads: int | None = None,
                    ring_supported: bool = True) -> tuple[int, int]:
    """``(ulysses_degree, ring_degree)`` for a gang of ``gang_size``, resolving ``auto``.

    ``auto`` prefers Ulysses (one all-to-all per attention, no extra passes): the largest divisor of
    ``gang_size`` that also divides ``heads`` (when known) becomes the Ulysses degree and the rest is
    ring. Without ring support (an attention backend that does not return log-sum-exp, e.g. diffusers'
    ``native``), ``auto`` takes Ulysses only. Explicit values are returned as given (``ParallelDims``
    validates them).
    """
    if ulysses != AUTO and ring != AUTO:
        return int(ulysses), int(ring)
    if ulysses != AUTO:
        return int(ulysses), max(gang_size // int(ulysses), 1)
    if ring != AUTO:
        return max(gang_size // int(ring), 1), int(ring)
    divisors = [d for d in range(gang_size, 0, -1) if gang_size % d == 0 and (heads is None or heads % d == 0)]
    if not ring_supported:
        return gang_size, 1  # ParallelDims names the problem when the heads do not divide
    return divisors[0], gang_size // divisors[0]


@dataclass(frozen=True)
class GroupSpec:
    """One process group of the layout.

    ``kind``: ``cp`` — a gang's context-parallel mesh (ring × ulysses; the device backend, NCCL on
    GPUs, created through ``DeviceMesh``); ``ctrl`` — a gang's gloo group for agreed decisions and
    cancels (bounded by the gang timeout); ``dispatch`` — a gang's gloo group on which members wait
    for the leader's next job (idle waits: unbounded); ``world_ctrl`` — the world's gloo group for
    coordinator → worker cancels.
    """

    name: str
    kind: str
    ranks: tuple[int, ...]
    gang: int | None = None


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """Workers × gang size × (ring × Ulysses) over nodes, validated at construction.

    Raises :class:`~specdist.errors.ConfigError` naming every degree when they do not fit.
    """

    workers: int
    """Reference workers = gangs (``runtime.workers``)."""
    gang_size: int = 1
    """Ranks per gang (``runtime.gang_size``); 1: every worker is one device, no context parallelism."""
    ulysses_degree: int = 1
    """Ulysses (all-to-all over heads) degree inside a gang."""
    ring_degree: int = 1
    """Ring-attention degree inside a gang (``ulysses_degree × ring_degree = gang_size``)."""
    nodes: int = 1
    """Nodes of the job."""
    devices_per_node: int | None = None
    """Device slots (GPUs) per node for worker ranks; ``None``: no device limit (CPU)."""
    coordinator: bool = True
    """Whether rank 0 of this world is the coordinator (torchrun). ``False``: a world of gangs only —
    a Ray gang is its own torch.distributed world of ``gang_size`` ranks (``workers=1``), the
    coordinator being an actor outside it."""

    def __post_init__(self) -> None:
        problems = self._layout_problems()
        if problems:
            raise ConfigError(self.fit_error(problems))

    # ----- construction ------------------------------------------------------------------
    @classmethod
    def from_runtime(cls, rt: Any, *, nodes: int = 1, devices_per_node: int | None = None,
                     heads: int | None = None, ring_supported: bool = True,
                     gang_size: int | None = None, coordinator: bool = True) -> "ParallelDims":
        """From a :class:`~specdist.runtime.config.RuntimeConfig` (``auto`` degrees resolved; pass
        ``gang_size`` when ``runtime.gang_size`` is ``auto``, see :func:`specdist.runtime.gang_cost.choose_split`)."""
        g = rt.gang_size if gang_size is None else gang_size
        if g == AUTO:
            raise ConfigError("runtime.gang_size=auto must be resolved to a number before the layout is built "
                              "(specdist.runtime.gang_cost.choose_split)")
        u, r = (1, 1) if g == 1 else resolve_degrees(g, rt.ulysses_degree, rt.ring_degree, heads, ring_supported)
        return cls(workers=rt.workers, gang_size=g, ulysses_degree=u, ring_degree=r, nodes=nodes,
                   devices_per_node=devices_per_node, coordinator=coordinator)

    def describe(self) -> str:
        """Every degree, for messages: ``workers=2 × gang_size=4 (ulysses_degree=2 × ring_degree=2), nodes=1``."""
        devices = "" if self.devices_per_node is None else f", devices_per_node={self.devices_per_node}"
        return (f"workers={self.workers} × gang_size={self.gang_size} (ulysses_degree={self.ulysses_degree} × "
                f"ring_degree={self.ring_degree}), nodes={self.nodes}{devices}")

    def fit_error(self, problems: list[str]) -> str:
        """The one error line for ``problems``."""
        return f"runtime: {self.describe()} does not fit: " + "; ".join(problems)

    def _layout_problems(self) -> list[str]:
        for name in ("workers", "gang_size", "ulysses_degree", "ring_degree", "nodes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                return [f"{name} must be an integer >= 1 (got {v!r})"]
        out = []
        if self.ulysses_degree * self.ring_degree != self.gang_size:
            out.append(f"ulysses_degree × ring_degree = {self.ulysses_degree * self.ring_degree} "
                       f"must equal gang_size {self.gang_size}")
        d = self.devices_per_node
        if d is not None:
            if d < 1:
                out.append(f"devices_per_node must be >= 1 (got {d})")
            elif self.gang_size > d:
                out.append(f"a gang of {self.gang_size} does not fit in a node of {d} devices (gangs never span nodes)")
            elif self.workers > self.nodes * (d // self.gang_size):
                out.append(f"{self.nodes} node(s) × {d // self.gang_size} gang(s) of {self.gang_size} per node hold "
                           f"{self.nodes * (d // self.gang_size)} workers, not {self.workers}")
        return out

    def model_problems(self, *, heads: int | None = None, lengths: Mapping[str, int] | None = None,
                       ring_supported: bool = True, backend: str = "native",
                       unsupported: str | None = None) -> list[str]:
        """What keeps this layout from running a model (empty when it fits).

        Args:
            heads: the model's attention heads (Ulysses splits them: ``heads % ulysses_degree``).
            lengths: the sequence lengths the model's context-parallel plan splits across the gang
                (e.g. ``{"video tokens": 48, "text tokens": 8}``), each divisible by ``gang_size``.
            ring_supported: whether the attention backend returns log-sum-exp (ring attention
                merges partial results with it).
            backend: the attention backend's name (for the message).
            unsupported: the adapter's reason when the model class cannot run context-parallel.
        """
        if self.gang_size == 1:
            return []
        if unsupported:
            return [unsupported]
        out = []
        if heads is not None and heads % self.ulysses_degree:
            out.append(f"the model's {heads} attention heads are not divisible by ulysses_degree {self.ulysses_degree}")
        for name, n in (lengths or {}).items():
            if n % self.gang_size:
                out.append(f"{name} {n} not divisible by gang_size {self.gang_size} (the plan splits them over the gang)")
        if self.ring_degree > 1 and not ring_supported:
            out.append(f"ring_degree {self.ring_degree} needs an attention backend that returns log-sum-exp; "
                       f"'{backend}' (diffusers 0.42.1's only CPU backend for context parallelism) does not "
                       f"— use ulysses_degree={self.gang_size}, ring_degree=1")
        return out

    def check_model(self, **kwargs: Any) -> None:
        """Raise one :class:`ConfigError` naming every degree when :meth:`model_problems` finds any."""
        problems = self.model_problems(**kwargs)
        if problems:
            raise ConfigError(self.fit_error(problems))

    # ----- layout ------------------------------------------------------------------------
    @property
    def worker_ranks(self) -> int:
        """Ranks that compute (workers × gang size)."""
        return self.workers * self.gang_size

    @property
    def world_size(self) -> int:
        """World size: the coordinator (when this world has it) plus every gang's ranks."""
        return int(self.coordinator) + self.worker_ranks

    @property
    def node_of_gang(self) -> tuple[int, ...]:
        """The node of each gang: round-robin over the nodes that still have a free gang slot."""
        cap = [math.inf if self.devices_per_node is None else self.devices_per_node // self.gang_size] * self.nodes
        out, n = [], 0
        for _ in range(self.workers):
            while cap[n] == 0:
                n = (n + 1) % self.nodes
            out.append(n)
            cap[n] -= 1
            n = (n + 1) % self.nodes
        return tuple(out)

    def gangs_on(self, node: int) -> tuple[int, ...]:
        """Gang indices placed on ``node``, in gang order."""
        return tuple(k for k, n in enumerate(self.node_of_gang) if n == node)

    @property
    def procs_per_node(self) -> tuple[int, ...]:
        """Processes each node runs (torchrun's ``--nproc-per-node`` of that node; node 0 adds the coordinator)."""
        return tuple(len(self.gangs_on(n)) * self.gang_size + (n == 0 and self.coordinator) for n in range(self.nodes))

    def node_base(self, node: int) -> int:
        """First global rank on ``node``."""
        return sum(self.procs_per_node[:node])

    def gang_ranks(self, gang: int) -> tuple[int, ...]:
        """Global ranks of ``gang`` (its leader first), contiguous on its node."""
        node = self.node_of_gang[gang]
        slot = self.gangs_on(node).index(gang)
        first = self.node_base(node) + (node == 0 and self.coordinator) + slot * self.gang_size
        return tuple(range(first, first + self.gang_size))

    def leader(self, gang: int) -> int:
        """Global rank of ``gang``'s leader (the rank the coordinator talks to)."""
        return self.gang_ranks(gang)[0]

    @property
    def leaders(self) -> tuple[int, ...]:
        """Every gang's leader, in gang (= worker) order."""
        return tuple(self.leader(k) for k in range(self.workers))

    def gang_of(self, rank: int) -> tuple[int, int] | None:
        """``(gang, member)`` of a global rank; ``None`` for the coordinator."""
        self._check_rank(rank)
        for k in range(self.workers):
            ranks = self.gang_ranks(k)
            if rank in ranks:
                return k, ranks.index(rank)
        return None

    def node_of(self, rank: int) -> int:
        """The node that runs global ``rank``."""
        self._check_rank(rank)
        return next(n for n in range(self.nodes) if rank < self.node_base(n) + self.procs_per_node[n])

    def local_rank(self, rank: int) -> int:
        """torchrun's ``LOCAL_RANK`` of global ``rank``."""
        return rank - self.node_base(self.node_of(rank))

    def device_index(self, rank: int) -> int | None:
        """The device (GPU index on its node) of a worker rank; ``None`` for the coordinator, which has
        no device slot (node 0's first worker device is index 0)."""
        if self.gang_of(rank) is None:
            return None
        return self.local_rank(rank) - (self.node_of(rank) == 0 and self.coordinator)

    def mesh_coords(self, member: int) -> tuple[int, int]:
        """``(ring index, ulysses index)`` of a gang member (ring-major, as diffusers' mesh)."""
        return divmod(member, self.ulysses_degree)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside the world of {self.world_size} ({self.describe()})")

    def group_specs(self) -> list[GroupSpec]:
        """Every process group of the layout, in creation order (the same on every rank).

        Per gang (``gang_size > 1``): ``cp`` (the gang's ranks as a ring × ulysses mesh), ``ctrl`` and
        ``dispatch``; then ``world_ctrl`` over all ranks. The coordinator talks to the leaders on the
        default (world) group.
        """
        out = []
        if self.gang_size > 1:
            for k in range(self.workers):
                ranks = self.gang_ranks(k)
                out += [GroupSpec(f"gang{k}.cp", "cp", ranks, k), GroupSpec(f"gang{k}.ctrl", "ctrl", ranks, k),
                        GroupSpec(f"gang{k}.dispatch", "dispatch", ranks, k)]
        out.append(GroupSpec("world.ctrl", "world_ctrl", tuple(range(self.world_size))))
        return out


# ----- capacity ------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeResources:
    """What one node offers."""

    cpus: float
    memory_bytes: int
    gpus: int = 0


@dataclass(frozen=True)
class RankNeeds:
    """What one rank process needs.

    Defaults measured on the 2-core CPU machine (2026-12): a process with torch, diffusers and Ray
    imported and the video zoo model loaded holds 0.40 GiB resident; importing torch + diffusers
    takes ~5.5 s of CPU time. ``memory_bytes`` should add the model's parameters when the model
    lives in host memory.
    """

    memory_bytes: int = int(0.40 * 2**30)
    startup_cpu_s: float = 5.5
    gpus: int = 0


def local_resources() -> tuple[NodeResources, ...]:
    """This machine as one node: usable cores, available memory (``MemAvailable``), CUDA devices."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        mem = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch / no driver: no GPUs
        gpus = 0
    return (NodeResources(float(cpus), mem, gpus),)


def capacity_problems(dims: ParallelDims, nodes: tuple[NodeResources, ...], needs: RankNeeds,
                      startup_timeout_s: float) -> list[str]:
    """What keeps ``nodes`` from holding the layout (empty when it fits), per node.

    Memory: every rank process (the coordinator too) needs ``needs.memory_bytes``. GPUs: every
    worker rank needs ``needs.gpus``. Start-up: the processes of a node start at once and share its
    cores, so they are ready after about ``processes × startup_cpu_s / cpus`` seconds, which must
    stay under ``startup_timeout_s`` (else the run would only fail at that timeout).
    """
    if len(nodes) < dims.nodes:
        return [f"the job needs {dims.nodes} nodes, the cluster has {len(nodes)}"]
    out = []
    for n in range(dims.nodes):
        procs, workers = dims.procs_per_node[n], len(dims.gangs_on(n)) * dims.gang_size
        res = nodes[n]
        where = "this machine" if dims.nodes == 1 else f"node {n}"
        mem = procs * needs.memory_bytes
        if mem > res.memory_bytes:
            out.append(f"{where}: {procs} processes × {needs.memory_bytes / 2**30:.2f} GiB = {mem / 2**30:.1f} GiB "
                       f"> {res.memory_bytes / 2**30:.1f} GiB available")
        if workers * needs.gpus > res.gpus:
            out.append(f"{where}: {workers} worker ranks × {needs.gpus} GPU > {res.gpus} GPUs")
        startup = procs * needs.startup_cpu_s / max(res.cpus, 1e-9)
        if startup > startup_timeout_s:
            out.append(f"{where}: {procs} processes would start in about {procs} × {needs.startup_cpu_s:g} s CPU / "
                       f"{res.cpus:g} cores = {startup:.0f} s > runtime.startup_timeout_s={startup_timeout_s:g} s")
    return out


def check_capacity(dims: ParallelDims, nodes: tuple[NodeResources, ...], needs: RankNeeds = RankNeeds(),
                   startup_timeout_s: float = 120.0) -> None:
    """Raise one :class:`ConfigError` naming every degree when the machine cannot hold the layout."""
    problems = capacity_problems(dims, nodes, needs, startup_timeout_s)
    if problems:
        raise ConfigError(dims.fit_error(problems) + " (use fewer runtime.workers or a smaller runtime.gang_size)")


__all__ = ["AUTO", "GroupSpec", "NodeResources", "ParallelDims", "RankNeeds", "capacity_problems", "check_capacity",
           "local_resources", "resolve_degrees"]
