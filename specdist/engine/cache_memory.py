"""Where a block-level cache's bytes go (device or host) under ``cache.max_cache_bytes``,
``cache.max_host_bytes``, ``cache.storage_dtype`` and ``cache.host_offload``: the arithmetic the
engine sizes its cached region with, also usable without a model (the meta-device sizing test,
``benchmarks/gpu_memory.py``). Pure arithmetic on byte counts.

Without host offload the factors live on the device: ``(order + 1) × region`` stored bytes must fit
``max_cache_bytes``. With host offload they live in (pinned) host memory and must fit
``max_host_bytes``; the device holds only the *working set*: the entry (one branch of one block)
being read or written, as stored and converted to the compute dtype, plus the next entry's
prefetched copy — ``(order + 1) × (2 × stored + compute)`` bytes of the largest entry — which must
fit ``max_cache_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..errors import ConfigError
from .forecast import CacheStorage
from .host_memory import physical_memory

HOST_MEMORY_SHARE = 0.8
"""At most this share of the machine's physical memory is page-locked for a cache."""


def working_set_bytes(order: int, rows: int, sizes: dict[str, int], itemsize: int, storage: CacheStorage) -> int:
    """Device bytes of a host-offloaded cache during a call (see the module doc); ``sizes``: bytes
    per row of each feature in the compute dtype (``itemsize`` bytes per element)."""
    largest = rows * max(sizes.values(), default=0)
    return (order + 1) * (2 * storage.stored_bytes(largest, itemsize) + largest)


def check_working_set(order: int, rows: int, sizes: dict[str, int], itemsize: int, storage: CacheStorage,
                      cap: int) -> None:
    """Raise :class:`ConfigError` when the working set of a host-offloaded cache exceeds ``cap``
    (``cache.max_cache_bytes``; 0 = no cap)."""
    need = working_set_bytes(order, rows, sizes, itemsize, storage)
    if cap and need > cap:
        raise ConfigError(f"invalid value for 'cache.max_cache_bytes': {cap} (allowed: >= {need} bytes with "
                          f"cache.host_offload, two cached branches of the largest block on the device)")


@dataclass(frozen=True)
class BlockCachePlan:
    """What a block-level cache keeps, and where."""

    order: int
    start: int  # first cached block
    cached_blocks: int
    stored_bytes: int  # all factors, in the storage dtype
    device_bytes: int  # on the device: the factors, or (host offload) the working set
    host_bytes: int  # in host memory (host offload), else 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dict(self.__dict__)


def plan_block_cache(hooks: Any, sizes: dict[str, int], rows: int, itemsize: int, order: int, last_start: int,
                     storage: CacheStorage, max_cache_bytes: int, max_host_bytes: int) -> BlockCachePlan:
    """The order and cached region a block-level cache gets (the engine's rule, see
    :func:`~specdist.engine.speculative.fit_region`), with its bytes on the device and the host.

    ``hooks``: the model's :class:`~specdist.engine.hooks.SpeculationHooks` (block level);
    ``sizes``: a measuring call's bytes per row (compute dtype, ``itemsize`` bytes per element);
    ``rows``: samples × guidance branches; ``last_start``: the probe block (speca) or the last.

    Raises:
        ConfigError: not even reuse of the last block's branches fits, or (host offload) the
            working set does not fit ``max_cache_bytes``.
    """
    from .speculative import fit_region

    stored = lambda st: storage.stored_bytes(rows * hooks.region_bytes(sizes, st), itemsize)
    cap = max_host_bytes if storage.host else max_cache_bytes
    m, start = fit_region(order, stored, last_start, cap)
    total = (m + 1) * stored(start)
    if storage.host:
        check_working_set(m, rows, sizes, itemsize, storage, max_cache_bytes)
        device, host = working_set_bytes(m, rows, sizes, itemsize, storage), total
    else:
        device, host = total, 0
    return BlockCachePlan(m, start, hooks.last + 1 - start, total, device, host)


def storage_for(plan: BlockCachePlan, storage: CacheStorage, max_host_bytes: int = 0,
                physical: int | None = None) -> CacheStorage:
    """``storage`` with the plan's exact host capacity (one page-locked arena, plus alignment slack).

    Raises:
        ConfigError: the host part would take more than :data:`HOST_MEMORY_SHARE` of this machine's
            ``physical`` memory (default: what the OS reports), which would stall or kill it.
    """
    if not storage.host:
        return storage
    physical = physical_memory() if physical is None else physical
    if physical and plan.host_bytes > HOST_MEMORY_SHARE * physical:
        raise ConfigError(f"invalid value for 'cache.max_host_bytes': {max_host_bytes} (allowed: at most "
                          f"{int(HOST_MEMORY_SHARE * physical)} bytes here: the cache would page-lock "
                          f"{plan.host_bytes / 2**30:.1f} GiB, more than {HOST_MEMORY_SHARE:.0%} of this machine's "
                          f"{physical / 2**30:.1f} GiB; or a smaller cache.storage_dtype)")
    return replace(storage, host_capacity=plan.host_bytes + (plan.host_bytes >> 10) + (16 << 20))
