"""Verification math (pure tensor code): per-sample forecast errors and the threshold schedule.

Errors compare a forecast ``pred`` with the true value ``true`` row by row (first dim):

* ``rel_l1``  — mean over elements of ``|pred − true| / (|true| + ε)`` (SpeCa's public code);
* ``rel_l2``  — ``‖pred − true‖₂ / ‖true‖₂`` (the SpeCa paper);
* ``cosine``  — ``1 − cos(pred, true)``.

A row whose forecast or truth holds NaN/Inf gets error ``+inf`` (always rejected). The
acceptance threshold decays with progress ``p ∈ [0, 1]``: ``τ(p) = max(τ0 · β^p, τ_min)``.
"""

from __future__ import annotations

import torch

METRICS = ("rel_l1", "rel_l2", "cosine")
_EPS = 1e-6


def forecast_error(pred: torch.Tensor, true: torch.Tensor, metric: str = "rel_l2") -> torch.Tensor:
    """Per-row error ``[rows]`` (float32) between ``pred`` and ``true`` (same shape ``[rows, ...]``)."""
    p = pred.float().flatten(1)
    t = true.float().flatten(1)
    if metric == "rel_l1":
        err = ((p - t).abs() / (t.abs() + _EPS)).mean(dim=1)
    elif metric == "rel_l2":
        err = (p - t).norm(dim=1) / (t.norm(dim=1) + _EPS)
    elif metric == "cosine":
        err = 1.0 - torch.nn.functional.cosine_similarity(p, t, dim=1, eps=_EPS)
    else:
        raise ValueError(f"unknown metric {metric!r} (allowed: {', '.join(METRICS)})")
    finite = torch.isfinite(p).all(dim=1) & torch.isfinite(t).all(dim=1)
    return torch.where(finite & torch.isfinite(err), err, torch.full_like(err, float("inf")))


class Agreement:
    """How the ranks that run one model call together (a gang under context parallelism, each
    holding a shard of the tokens) reach the same decisions. This default is one device: errors of
    the local tensors, values as they are. The runtime's
    :class:`~specdist.runtime.agree.GangAgreement` reduces over the gang instead, so the engine
    itself never touches a process group."""

    def error(self, pred: torch.Tensor, true: torch.Tensor, metric: str) -> torch.Tensor:
        """Per-row error ``[rows]`` of the whole tensors (:func:`forecast_error` on one device)."""
        return forecast_error(pred, true, metric)

    def max(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` made identical on every rank (their element-wise maximum over the ranks)."""
        return values


ONE_DEVICE = Agreement()
"""The agreement of a model that runs on one device (stateless)."""


def threshold(progress: float, tau0: float, beta: float, tau_min: float) -> float:
    """``τ(p) = max(τ0 · β^p, τ_min)`` for progress ``p`` in [0, 1]."""
    return max(tau0 * beta ** float(progress), tau_min)


def combine_rows(err: torch.Tensor, samples: int) -> torch.Tensor:
    """Per-sample error from per-row errors when rows are ``[cond..., uncond...]`` (guidance):
    a sample is only as good as its worst branch."""
    if err.shape[0] == samples:
        return err
    return err.view(-1, samples).amax(dim=0)
