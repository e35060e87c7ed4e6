"""Feature forecasters (pure tensor math): reuse (FORA) and Taylor expansion (TaylorSeer).

A :class:`TaylorCache` holds, for every cached feature and every sample (row), Taylor factors
``f[0..m]`` built from the sample's *full* steps only (DESIGN §2.1):

* on a full step at time ``s`` with the previous full step at ``s'`` (gap ``Δ = s − s'``)::

      f_new[0] = F(s);    f_new[j+1] = (f_new[j] − f_old[j]) / Δ      (j < order reached)

  so the order grows by one per full step up to ``m``;
* the forecast ``k = s_now − s_last`` after the last full step is ``Σ_j f[j] · k^j / j!``.

"Time" is whatever the caller passes: the step index (as the public TaylorSeer/SpeCa code) or the
scheduler's own time (e.g. sigma), which is more faithful on non-uniform schedules. Order 0 is
plain reuse. Rows are independent: each sample has its own factors, last time and order, and is
updated or forecast only through its row indices. Nothing here knows about models or devices.
"""

from __future__ import annotations

import math

import torch


class TaylorCache:
    """Per-row Taylor factors for a tuple of features.

    Args:
        order: maximum Taylor order ``m`` (0 = reuse).
        rows: number of rows (samples, or samples × guidance branches).
    """

    def __init__(self, order: int, rows: int) -> None:
        if order < 0:
            raise ValueError(f"order must be >= 0, got {order}")
        self.order = order
        self.rows = rows
        self.factors: list[list[torch.Tensor]] | None = None  # [feature][j] -> [rows, ...]
        self.last_time = torch.full((rows,), float("nan"), dtype=torch.float64)  # [rows]
        self.filled = torch.zeros(rows, dtype=torch.long)  # [rows] full steps seen, capped at order+1

    def reset(self) -> None:
        """Forget everything (a new generation)."""
        self.factors = None
        self.last_time.fill_(float("nan"))
        self.filled.zero_()

    def ready(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Bool ``[len(rows)]``: rows with at least one full step cached (can be forecast)."""
        filled = self.filled if rows is None else self.filled[rows.cpu()]
        return filled > 0

    def nbytes(self) -> int:
        """Bytes held by the factors."""
        if self.factors is None:
            return 0
        return sum(t.numel() * t.element_size() for feat in self.factors for t in feat)

    def update(self, rows: torch.Tensor, features: tuple[torch.Tensor, ...], time: float) -> None:
        """Record full-step ``features`` (each ``[len(rows), ...]``) of ``rows`` at ``time``."""
        rows_cpu = rows.cpu()
        if self.factors is None:
            self.factors = [
                [torch.zeros((self.rows, *f.shape[1:]), dtype=f.dtype, device=f.device) for _ in range(self.order + 1)]
                for f in features
            ]
        prev_time = self.last_time[rows_cpu]
        filled = self.filled[rows_cpu]
        delta = (time - prev_time).to(torch.float32)  # nan where no previous full step
        for feat_idx, value in enumerate(features):
            old = [self.factors[feat_idx][j][rows] for j in range(self.order + 1)]
            new = [value]
            for j in range(self.order):
                shape = (-1,) + (1,) * (value.ndim - 1)
                usable = (filled > j).to(value.device).view(shape)
                d = delta.to(value.device, value.dtype).view(shape)
                diff = (new[j] - old[j]) / torch.where(usable, d, torch.ones_like(d))
                new.append(torch.where(usable, diff, torch.zeros_like(diff)))
            for j in range(self.order + 1):
                self.factors[feat_idx][j][rows] = new[j]
        self.last_time[rows_cpu] = float(time)
        self.filled[rows_cpu] = torch.clamp(filled + 1, max=self.order + 1)

    def forecast(self, rows: torch.Tensor, time: float) -> tuple[torch.Tensor, ...]:
        """Forecast every feature for ``rows`` at ``time`` (rows must be :meth:`ready`)."""
        if self.factors is None:
            raise RuntimeError("TaylorCache.forecast called before any full step was recorded")
        rows_cpu = rows.cpu()
        k = (time - self.last_time[rows_cpu]).to(torch.float32)  # [n]
        out = []
        for feats in self.factors:
            ref = feats[0]
            shape = (-1,) + (1,) * (ref.ndim - 1)
            kk = k.to(ref.device, ref.dtype).view(shape)
            total = feats[0][rows].clone()
            for j in range(1, self.order + 1):
                total = total + feats[j][rows] * (kk**j / math.factorial(j))
            out.append(total)
        return tuple(out)
