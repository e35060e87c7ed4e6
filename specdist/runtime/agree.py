"""Decisions that every rank of a gang takes identically (under context parallelism).

Under sequence parallelism each rank holds a shard of the tokens, so a forecast error computed on
the local shard differs from rank to rank; a rank that accepts while another rejects runs a
different program and the gang's next collective hangs (TeaCache + USP on Wan2.1; diffusers'
FirstBlockCache under context parallelism). Two rules make every data-dependent branch agree:

1. **Reduce the statistics, not the decision.** Every error metric of
   :mod:`specdist.engine.verify` is a ratio of sums over elements, so each rank computes its
   shard's sums (:func:`error_stats`, pure), one all-reduce SUM adds them up, and every rank derives
   the error of the *whole* tensor (:func:`error_from_stats`, pure): the number a single device
   computes, so the gang also takes the single device's decisions. A MAX of local errors (xDiT's
   choice for its cache) would be conservative but would not reproduce the one-device run.
2. **Agree on the branch itself.** Sums reduced in another order may differ in the last bit from
   rank to rank; the final accept/reject masks and flags are therefore OR-ed over the gang
   (:func:`agree_any`: all-reduce MAX), so all ranks take one branch, and a disagreement resolves
   towards rejecting — recomputing a step costs time, accepting a bad forecast costs quality.
   Bookkeeping that follows from agreed values (a quality target's spent budget, run lengths) is
   then identical on every rank; a data-dependent scalar of its own is agreed with :func:`agree_max`.

A gang of one (``group is None``) leaves every value as it is, so the engine runs the same code on
one device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..engine.verify import _EPS, METRICS, Agreement

STATS = {"rel_l1": 2, "rel_l2": 2, "cosine": 3}
"""Sums per row each metric needs (plus one count of non-finite elements)."""


def error_stats(pred: torch.Tensor, true: torch.Tensor, metric: str = "rel_l2") -> torch.Tensor:
    """Per-row sums ``[rows, STATS[metric] + 1]`` (float64) of a shard, such that adding the rows'
    sums over every shard and applying :func:`error_from_stats` gives
    :func:`specdist.engine.verify.forecast_error` of the whole tensor.

    ``rel_l1``: Σ|p−t|/(|t|+ε), element count; ``rel_l2``: Σ(p−t)², Σt²; ``cosine``: Σpt, Σp², Σt²;
    last column: non-finite elements (any makes the row's error ``inf``).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (allowed: {', '.join(METRICS)})")
    p, t = pred.double().flatten(1), true.double().flatten(1)
    bad = (~torch.isfinite(p)).sum(1) + (~torch.isfinite(t)).sum(1)
    p, t = torch.nan_to_num(p, 0.0, 0.0, 0.0), torch.nan_to_num(t, 0.0, 0.0, 0.0)
    if metric == "rel_l1":
        cols = [((p - t).abs() / (t.abs() + _EPS)).sum(1), torch.full_like(p[:, 0], p.shape[1])]
    elif metric == "rel_l2":
        cols = [((p - t) ** 2).sum(1), (t ** 2).sum(1)]
    else:
        cols = [(p * t).sum(1), (p ** 2).sum(1), (t ** 2).sum(1)]
    return torch.stack([*cols, bad.double()], dim=1)


def error_from_stats(stats: torch.Tensor, metric: str = "rel_l2") -> torch.Tensor:
    """Per-row error ``[rows]`` (float32) from summed :func:`error_stats`."""
    s = stats.double()
    if metric == "rel_l1":
        err = s[:, 0] / s[:, 1]
    elif metric == "rel_l2":
        err = s[:, 0].sqrt() / (s[:, 1].sqrt() + _EPS)
    elif metric == "cosine":  # torch.nn.functional.cosine_similarity: x·y / max(‖x‖·‖y‖, ε)
        err = 1.0 - s[:, 0] / torch.clamp(s[:, 1].sqrt() * s[:, 2].sqrt(), min=_EPS)
    else:
        raise ValueError(f"unknown metric {metric!r} (allowed: {', '.join(METRICS)})")
    err = err.float()
    return torch.where((s[:, -1] == 0) & torch.isfinite(err), err, torch.full_like(err, float("inf")))


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group) -> torch.Tensor:
    if group is None:
        return t
    t = t.clone()
    dist.all_reduce(t, op=op, group=group)
    return t


def sharded_error(pred: torch.Tensor, true: torch.Tensor, metric: str, group) -> torch.Tensor:
    """Per-row error of the whole (sharded) tensor, the same on every rank of ``group`` (one
    all-reduce SUM of the shards' sums)."""
    return error_from_stats(_all_reduce(error_stats(pred, true, metric), dist.ReduceOp.SUM, group), metric)


def agree_any(mask: torch.Tensor, group) -> torch.Tensor:
    """Bool mask OR-ed over ``group`` (e.g. reject masks: a row any rank rejects is rejected)."""
    return _all_reduce(mask.to(torch.int32), dist.ReduceOp.MAX, group).bool()


def agree_max(values: torch.Tensor, group) -> torch.Tensor:
    """Element-wise maximum over ``group`` (a data-dependent scalar of bookkeeping)."""
    return _all_reduce(values, dist.ReduceOp.MAX, group)


def agree_flag(flag: bool, group) -> bool:
    """A bool that is true on every rank when it is true on any (e.g. a cancel seen by the leader)."""
    return bool(agree_any(torch.tensor([flag]), group)[0])


class GangAgreement(Agreement):
    """The engine's :class:`~specdist.engine.verify.Agreement` over a gang's ``group``: forecast
    errors of the whole (sharded) tensors (:func:`sharded_error`) and values made identical on every
    rank (:func:`agree_max`), so a generation's decisions and bookkeeping (run lengths, a quality
    target's spent budget) are the same on every rank and no rank is left in a collective alone."""

    def __init__(self, group) -> None:
        self.group = group

    def error(self, pred: torch.Tensor, true: torch.Tensor, metric: str) -> torch.Tensor:
        return sharded_error(pred, true, metric, self.group).to(pred.device)

    def max(self, values: torch.Tensor) -> torch.Tensor:
        return agree_max(values, self.group)


__all__ = ["STATS", "GangAgreement", "agree_any", "agree_flag", "agree_max", "error_from_stats", "error_stats",
           "sharded_error"]
