"""Block-level features of a gang: gathered from the ranks' shards, and sharded back.

Under context parallelism each rank of a gang holds its own shard of every block's residual
branches (its share of the tokens). The latency runtime keeps the anchors' features at the
coordinator and ships forecasts to whichever worker drafts, so a gang's recording call returns the
*whole* features and a draft takes the whole forecasts:

* :func:`gather_shards` — every rank's shard of a feature, flattened per row and concatenated in
  gang-rank order: ``[rows, Σ shard elements]``. The layout differs from one device's, which does not
  matter: a Taylor forecast is elementwise, so forecasting the gathered tensor and cutting it again
  gives each rank the forecast of its own shard.
* :func:`shard_of` — this rank's part of such a tensor, in the shard's own shape.
* :func:`sum_sizes` — a measuring call's bytes per row, summed over the gang's shards.

All collectives run on the gang's gloo ``ctrl`` group (CPU tensors), every rank in the same order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..errors import SpecdistError


def gather_shards(tensors: tuple[torch.Tensor, ...], group: Any) -> tuple[tuple[torch.Tensor, ...], list[list[int]]]:
    """``(gathered, shapes)``: each of this rank's shards ``[rows, ...]`` gathered over ``group`` as
    ``[rows, world · elements]`` (rank order), and each shard's shape. Every rank must hold shards of
    the same shapes (diffusers' equipartition); anything else is refused with one line."""
    world = dist.get_world_size(group)
    shapes = [list(t.shape) for t in tensors]
    mine = torch.tensor([d for s in shapes for d in s] or [0], dtype=torch.int64)
    seen = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(seen, mine, group=group)
    if any(not torch.equal(s, mine) for s in seen):
        raise SpecdistError("a gang's ranks hold block-level feature shards of different shapes "
                            "(the sequence does not split evenly over the gang); gathering needs equal shards")
    out = []
    for t in tensors:
        flat = t.detach().float().cpu().reshape(t.shape[0], -1).contiguous()
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat, group=group)
        out.append(torch.cat(parts, dim=1))
    return tuple(out), shapes


def shard_of(full: torch.Tensor, shape: list[int], rank: int, world: int) -> torch.Tensor:
    """This rank's shard, of ``shape`` (rows taken from ``full``), of a tensor :func:`gather_shards` made."""
    rows = full.shape[0]
    per = full.shape[1] // world
    if per * world != full.shape[1]:
        raise SpecdistError(f"a gathered feature of {full.shape[1]} elements per row does not split over {world} ranks")
    return full[:, rank * per:(rank + 1) * per].reshape(rows, *shape[1:])


def sum_sizes(sizes: dict[str, int], group: Any) -> dict[str, int]:
    """A measuring call's ``sizes`` (bytes per row of each feature) summed over ``group``'s shards."""
    keys = sorted(sizes)
    t = torch.tensor([sizes[k] for k in keys] or [0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return {k: int(v) for k, v in zip(keys, t.tolist())}


__all__ = ["gather_shards", "shard_of", "sum_sizes"]
