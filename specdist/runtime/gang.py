"""A worker that is a gang of ranks: its process groups, context parallelism on its model, and the
gang-level model call.

Every rank of the world calls :func:`build_gangs` with the same :class:`ParallelDims` (group creation
is collective over the world, in the order of :meth:`ParallelDims.group_specs`). A gang rank gets a
:class:`Gang`: its ``("ring", "ulysses")`` ``DeviceMesh`` (the device backend: gloo on CPU, NCCL on
GPUs), a gloo ``ctrl`` group for agreed decisions (:mod:`specdist.runtime.agree`) and a gloo
``dispatch`` group on which members wait for the leader's next job.

One model call on a gang (:func:`gang_call`): the leader broadcasts a small header (JSON metadata,
each input tensor's dtype and shape) on ``dispatch`` and the input tensors on the gang's mesh group,
so every rank holds the same inputs; every rank runs the call under diffusers context parallelism (which
splits the sequence and gathers the output); the leader returns the output, members return ``None``.

Failures are bounded: the mesh and ``ctrl`` groups are created with ``timeout_s`` (a member that
hangs makes the others' next collective fail after it), a member that dies closes its sockets (gloo
fails the peers' collectives at once). Either way every rank of the gang raises
:class:`GangFailure` naming the gang; after a failed collective the gang's groups are unusable, so
the pool must drop the whole gang and end its processes (the torchrun pool's leader answers every
job of a failed gang ``failed`` and rank 0 ends the run, :func:`specdist.runtime.torchrun_backend.serve`;
on Ray the leader's job raises and the coordinator ends the run, :mod:`specdist.runtime.ray_gangs`).
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import SpecdistError
from .jobs import Job
from .parallel_dims import ParallelDims

OP_STOP, OP_RUN = 0, 1
_HEADER = 12  # per input tensor: dtype code, ndim, shape[10]
_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool]
_IDLE_S = 10 * 365 * 86400.0  # dispatch waits: members are idle while no job comes

# diffusers 0.42.1 backends with context parallelism; those returning log-sum-exp can run ring attention
_RING_BACKENDS = {"flash", "flash_hub", "flash_varlen_hub", "_flash_3_hub", "_flash_3_varlen_hub", "_native_cudnn",
                  "_native_flash", "_native_npu", "sage", "sage_hub"}


class GangFailure(SpecdistError):
    """A gang's collective failed (a member died, hung past the gang timeout, or raised)."""


def ring_supported(backend: str) -> bool:
    """Whether diffusers' attention backend ``backend`` returns log-sum-exp (ring attention needs it;
    ``native`` raises "Native attention does not support return_lse=True")."""
    return backend in _RING_BACKENDS


@dataclass
class Gang:
    """This rank's gang (see the module doc)."""

    dims: ParallelDims
    index: int  # gang = worker index
    member: int  # position in the gang; 0 is the leader
    ranks: tuple[int, ...]  # global ranks, leader first
    mesh: Any  # DeviceMesh ("ring", "ulysses")
    group: Any  # the mesh flattened: the gang's device-backend group
    ctrl: Any  # gloo, bounded by timeout_s
    dispatch: Any  # gloo, unbounded (idle waits)
    device: torch.device
    timeout_s: float

    @property
    def is_leader(self) -> bool:
        return self.member == 0

    @property
    def size(self) -> int:
        return len(self.ranks)

    def describe(self) -> str:
        return f"gang {self.index} (ranks {list(self.ranks)})"


@dataclass
class GangRanks:
    """What :func:`build_gangs` gives a rank: its gang (``None`` for the coordinator) and the world's
    gloo control group (coordinator → worker cancels)."""

    dims: ParallelDims
    rank: int
    gang: Gang | None
    world_ctrl: Any


def _options(backend: str, timeout_s: float) -> Any:
    opts = dist.ProcessGroupNCCL.Options() if backend == "nccl" else dist.ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    return opts


def build_gangs(dims: ParallelDims, rank: int, device: torch.device, timeout_s: float) -> GangRanks:
    """Create every group of ``dims`` (collective: every rank of the world calls it, same ``dims``).

    Args:
        dims: the layout; ``dist`` must already be initialised with ``dims.world_size`` ranks.
        rank: this process's global rank.
        device: this rank's compute device (its mesh uses NCCL when it is CUDA, gloo otherwise).
        timeout_s: bound on every collective of a model call (mesh and ``ctrl`` groups).
    """
    if dist.get_world_size() != dims.world_size:
        raise SpecdistError(f"{dims.describe()} needs WORLD_SIZE={dims.world_size} (1 coordinator + workers × "
                            f"gang_size), but the process group has {dist.get_world_size()}")
    from torch.distributed.device_mesh import DeviceMesh

    backend = "nccl" if device.type == "cuda" else "gloo"
    mine = dims.gang_of(rank)
    gang: dict[str, Any] = {}
    world_ctrl = None
    for spec in dims.group_specs():
        if spec.kind == "cp":
            layout = torch.tensor(spec.ranks).reshape(dims.ring_degree, dims.ulysses_degree)
            override = (backend, _options(backend, timeout_s))
            mesh = DeviceMesh(device.type, layout, mesh_dim_names=("ring", "ulysses"),
                              backend_override=(override, override))
            flat = mesh["ring", "ulysses"]._flatten(backend_override=override)  # diffusers' setup reuses it
            if mine is not None and spec.gang == mine[0]:
                gang.update(mesh=mesh, group=flat.get_group())
        else:
            bound = timeout_s if spec.kind == "ctrl" else _IDLE_S
            pg = dist.new_group(list(spec.ranks), backend="gloo", timeout=datetime.timedelta(seconds=bound))
            if spec.kind == "world_ctrl":
                world_ctrl = pg
            elif mine is not None and spec.gang == mine[0]:
                gang[spec.kind] = pg
    if mine is None or dims.gang_size == 1:
        return GangRanks(dims, rank, None, world_ctrl)
    k, member = mine
    return GangRanks(dims, rank, Gang(dims, k, member, dims.gang_ranks(k), gang["mesh"], gang["group"], gang["ctrl"],
                                      gang["dispatch"], device, timeout_s), world_ctrl)


# ----- context parallelism on the model --------------------------------------------------------
def enable_context_parallel(model: nn.Module, adapter: Any, gang: Gang, backend: str = "native") -> Any:
    """Run ``model`` context-parallel over ``gang`` with the adapter's plan; returns the
    ``ContextParallelConfig``. Every later forward is a collective over the gang.

    The plan goes to diffusers: ``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree,
    ring_degree, mesh=<the gang's mesh>), cp_plan=<plan>)``. On a torch without any accelerator that
    call divides by ``torch.accelerator.device_count() == 0`` (diffusers 0.42.1,
    ``ModelMixin._resolve_parallel_config``), so there the same steps are taken here: set up a
    ``ParallelConfig`` on the gang's mesh, give it to every dispatching attention processor, and
    ``apply_context_parallel`` the plan (``tests/test_gangs.py`` checks it leaves the model as
    ``enable_parallelism`` does).
    """
    from diffusers import ContextParallelConfig

    plan = adapter.context_parallel_plan(model)
    model.set_attention_backend(backend)
    cp = ContextParallelConfig(ulysses_degree=gang.dims.ulysses_degree, ring_degree=gang.dims.ring_degree,
                               mesh=gang.mesh)
    if torch.accelerator.device_count() > 0:
        model.enable_parallelism(config=cp, cp_plan=plan)
    else:
        _enable_without_accelerator(model, cp, plan, gang.device)
    adapter.apply_context_parallel_hooks(model, cp)
    return cp


def _enable_without_accelerator(model: nn.Module, cp: Any, plan: dict, device: torch.device) -> None:
    """``ModelMixin.enable_parallelism``'s context-parallel branch with ``device`` given (diffusers 0.42.1)."""
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ParallelConfig
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    from diffusers.models.attention_processor import Attention, MochiAttention

    if model._parallel_config is not None:
        raise RuntimeError(f"parallelism is already applied to this {type(model).__name__}")
    classes = (Attention, MochiAttention, AttentionModuleMixin)
    processors = [m.processor for m in model.modules() if isinstance(m, classes) and m.processor is not None]
    for proc in processors:
        if hasattr(proc, "_attention_backend"):
            name = proc._attention_backend
            name = _AttentionBackendRegistry.get_active_backend()[0] if name is None else AttentionBackendName(name)
            if not _AttentionBackendRegistry._is_context_parallel_available(name):
                raise ValueError(f"attention backend '{name.value}' does not support context parallelism")
            break
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=cp.mesh)
    model._parallel_config = config
    for proc in processors:
        if hasattr(proc, "_parallel_config"):
            proc._parallel_config = config
    apply_context_parallel(model, cp, plan)


# ----- one model call on a gang ---------------------------------------------------------------
def _fail(gang: Gang, what: str, start: float, exc: BaseException) -> GangFailure:
    role = "leader" if gang.is_leader else f"member {gang.member}"
    return GangFailure(f"{gang.describe()}, {role}: {what} failed after {time.perf_counter() - start:.1f} s "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the gang's "
                       f"process groups are unusable — drop the gang (bound: {gang.timeout_s:g} s per collective)")


def _exchange(gang: Gang, op: int = OP_RUN, meta: dict | None = None,
              xs: tuple[torch.Tensor, ...] = ()) -> tuple[int, dict, tuple[torch.Tensor, ...]]:
    """The leader's ``(op, meta, xs)`` on every rank of the gang: a header (op, metadata bytes,
    tensor count) and the metadata on ``dispatch``, then per tensor its dtype and shape (on
    ``dispatch``) and its values (on the gang's device group)."""
    start = time.perf_counter()
    header = torch.zeros(3, dtype=torch.int64)
    blob = b""
    if gang.is_leader:
        blob = json.dumps(meta or {}).encode()
        header[:] = torch.tensor([op, len(blob), len(xs)])
    try:
        dist.broadcast(header, group=gang.dispatch, group_src=0)
        n = int(header[1])
        buf = torch.tensor(list(blob), dtype=torch.uint8) if gang.is_leader else torch.empty(n, dtype=torch.uint8)
        if n:
            dist.broadcast(buf, group=gang.dispatch, group_src=0)
    except Exception as exc:  # noqa: BLE001 - the dispatch channel to the leader is gone
        raise _fail(gang, "waiting for the leader's job", start, exc) from exc
    if int(header[0]) == OP_STOP:
        return OP_STOP, {}, ()
    out = []
    for k in range(int(header[2])):
        shape_header = torch.zeros(_HEADER, dtype=torch.int64)  # dtype code, ndim, shape[...]
        if gang.is_leader:
            x = xs[k]
            shape_header[:2] = torch.tensor([_DTYPES.index(x.dtype), x.dim()])
            shape_header[2:2 + x.dim()] = torch.tensor(x.shape)
        try:
            dist.broadcast(shape_header, group=gang.dispatch, group_src=0)
            shape = tuple(int(d) for d in shape_header[2:2 + int(shape_header[1])])
            t = (xs[k].to(gang.device).contiguous() if gang.is_leader
                 else torch.empty(shape, dtype=_DTYPES[int(shape_header[0])], device=gang.device))
            dist.broadcast(t, group=gang.group, group_src=0)
        except Exception as exc:  # noqa: BLE001
            raise _fail(gang, "broadcasting the job's input", start, exc) from exc
        out.append(t)
    return OP_RUN, json.loads(bytes(buf.tolist()).decode()), tuple(out)


def _run(gang: Gang, fn: Callable[[dict, tuple[torch.Tensor, ...]], Any], meta: dict,
         xs: tuple[torch.Tensor, ...]) -> Any:
    start = time.perf_counter()
    try:
        return fn(meta, xs)
    except Exception as exc:  # noqa: BLE001 - any failure inside a gang call ends the gang
        raise _fail(gang, "the model call", start, exc) from exc


def gang_call(gang: Gang, fn: Callable[[dict, tuple[torch.Tensor, ...]], Any], meta: dict | None = None,
              xs: torch.Tensor | tuple[torch.Tensor, ...] | None = None) -> Any:
    """One model call on the gang. The leader passes ``meta`` (JSON-able job description) and the
    job's input tensors ``xs`` (one tensor or a tuple); a member passes neither and receives them.
    Every rank runs ``fn(meta, xs)`` (the model under context parallelism); the leader returns its
    result, members return ``None``.

    Raises :class:`GangFailure` when a collective fails or ``fn`` raises on this rank.
    """
    if gang.is_leader and (meta is None or xs is None):
        raise ValueError("gang_call: the leader passes meta and xs")
    xs = (xs,) if isinstance(xs, torch.Tensor) else tuple(xs or ())
    deep = [x.dim() for x in xs if x.dim() > _HEADER - 2]
    if deep:  # refused before anything is broadcast, so no member is left waiting for a header
        raise ValueError(f"gang_call: a {deep[0]}-d input (at most {_HEADER - 2} dimensions)")
    op, meta, xs = _exchange(gang, OP_RUN, meta, xs)
    if op == OP_STOP:
        return None
    out = _run(gang, fn, meta, xs)
    return out if gang.is_leader else None


def job_fn(worker: Any, rank: int, flag_of: Callable[[int], Any]) -> Callable[[dict, tuple[torch.Tensor, ...]], Any]:
    """What every rank of a gang runs for one job (the ``fn`` of :func:`gang_call` and
    :func:`serve_gang`): the :class:`~specdist.runtime.worker.StepWorker`'s call on the leader's job
    (``meta``: the job's fields) and inputs, cancellable only as the whole gang (the worker agrees on
    the flag ``flag_of(job id)`` per block); returns the worker's ``JobResult``."""
    def fn(meta: dict, xs: tuple[torch.Tensor, ...]) -> Any:
        job = Job(**meta)
        return worker.run(job, xs, flag_of(job.id), rank)
    return fn


def stop_gang(gang: Gang) -> None:
    """Leader: release the members from :func:`serve_gang`."""
    _exchange(gang, OP_STOP)


def serve_gang(gang: Gang, fn: Callable[[dict, tuple[torch.Tensor, ...]], Any]) -> int:
    """A member's loop: take part in the leader's calls until :func:`stop_gang`; returns calls run."""
    if gang.is_leader:
        raise ValueError("serve_gang is the members' loop; the leader calls gang_call")
    calls = 0
    while True:
        op, meta, xs = _exchange(gang)
        if op == OP_STOP:
            return calls
        _run(gang, fn, meta, xs)
        calls += 1


__all__ = ["Gang", "GangFailure", "GangRanks", "build_gangs", "enable_context_parallel", "gang_call", "job_fn", "ring_supported",
           "serve_gang", "stop_gang"]
