"""Feature forecasters (pure tensor math): reuse (FORA) and Taylor/Newton extrapolation (TaylorSeer).

A :class:`TaylorCache` keeps, for every cached feature and every row (sample, or sample × guidance
branch), the divided differences of the feature over the row's last ``m + 1`` *full* steps
(DESIGN §2.1). On a full step at time ``s`` (previous full steps at ``s_0 > s_1 > …``)::

    f_new[0]   = F(s)
    f_new[j+1] = (f_new[j] − f_old[j]) / (s − s_j)          (recursive divided differences)

and the forecast at time ``s*`` is the Newton form of the interpolating polynomial::

    F̂(s*) = f[0] + f[1]·(s* − s_0) + f[2]·(s* − s_0)(s* − s_1) + …

The order grows by one per full step up to ``m``. This is TaylorSeer's expansion with its
derivative estimates made consistent: at order 1 it is identical (``f[1] = (F(s) − F(s'))/Δ``,
forecast ``F + f[1]·k``); at higher orders TaylorSeer's ``Σ f[j] k^j / j!`` with gap-only
differences is off by O(Δ) even on a quadratic, while the Newton form is exact on every
polynomial of degree ≤ m, on any (non-uniform) grid. Order 0 is plain reuse (FORA).

"Time" is whatever the caller passes: the step index (as the public code) or the scheduler's own
time (e.g. sigma). Rows are independent; nothing here knows about models or devices.
"""

from __future__ import annotations

import torch


class TaylorCache:
    """Per-row divided differences of a tuple of features.

    Args:
        order: maximum order ``m`` (0 = reuse).
        rows: number of rows.
    """

    def __init__(self, order: int, rows: int) -> None:
        if order < 0:
            raise ValueError(f"order must be >= 0, got {order}")
        self.order = order
        self.rows = rows
        self.factors: list[list[torch.Tensor]] | None = None  # [feature][j] -> [rows, ...]
        self.nodes = torch.full((rows, order + 1), float("nan"), dtype=torch.float64)  # [rows, m+1] newest first
        self.filled = torch.zeros(rows, dtype=torch.long)  # [rows] full steps seen, capped at m+1

    def reset(self) -> None:
        """Forget everything (a new generation)."""
        self.factors = None
        self.nodes.fill_(float("nan"))
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

    def _all_rows(self, rows_cpu: torch.Tensor) -> bool:
        return len(rows_cpu) == self.rows and bool((rows_cpu == torch.arange(self.rows)).all())

    def update(self, rows: torch.Tensor, features: tuple[torch.Tensor, ...], time: float) -> None:
        """Record full-step ``features`` (each ``[len(rows), ...]``) of ``rows`` at ``time``."""
        rows_cpu = rows.cpu()
        if self.factors is None:
            self.factors = [
                [torch.zeros((self.rows, *f.shape[1:]), dtype=f.dtype, device=f.device) for _ in range(self.order + 1)]
                for f in features
            ]
        whole = self._all_rows(rows_cpu)  # the common case: no gathers, factors replaced in place
        filled = self.filled[rows_cpu]
        gaps = time - self.nodes[rows_cpu]  # [n, m+1] float64; nan where no node
        for feat_idx, value in enumerate(features):
            shape = (-1,) + (1,) * (value.ndim - 1)
            factors = self.factors[feat_idx]
            new = [value]
            for j in range(self.order):
                usable = filled > j
                inv = torch.where(usable, 1.0 / gaps[:, j], torch.zeros_like(gaps[:, j]))
                old = factors[j] if whole else factors[j][rows]
                diff = torch.sub(new[j], old).mul_(inv.to(value.device, value.dtype).view(shape))
                if not bool(usable.all()):
                    diff = torch.where(usable.to(value.device).view(shape), diff, torch.zeros_like(diff))
                new.append(diff)
            if whole:
                factors[0].copy_(value)
                factors[1:] = new[1:]
            else:
                for j in range(self.order + 1):
                    factors[j][rows] = new[j]
        shifted = torch.cat([torch.full((len(rows_cpu), 1), float(time), dtype=torch.float64),
                             self.nodes[rows_cpu, : self.order]], dim=1)
        self.nodes[rows_cpu] = shifted
        self.filled[rows_cpu] = torch.clamp(filled + 1, max=self.order + 1)

    def forecast(self, rows: torch.Tensor, time: float) -> tuple[torch.Tensor, ...]:
        """Forecast every feature for ``rows`` at ``time`` (rows must be :meth:`ready`)."""
        if self.factors is None:
            raise RuntimeError("TaylorCache.forecast called before any full step was recorded")
        rows_cpu = rows.cpu()
        whole = self._all_rows(rows_cpu)
        offsets = torch.nan_to_num(time - self.nodes[rows_cpu], nan=0.0)  # [n, m+1] float64
        coeffs = torch.cumprod(offsets[:, : self.order], dim=1)  # [n, m]: Newton basis products
        pick = (lambda t: t) if whole else (lambda t: t[rows])  # a view of every row, or a gather
        out = []
        for feats in self.factors:
            ref = feats[0]
            shape = (-1,) + (1,) * (ref.ndim - 1)
            if self.order == 0:  # reuse: a copy, never the cache's own storage
                out.append(feats[0].clone() if whole else feats[0][rows])
                continue
            c = coeffs.to(ref.device, ref.dtype)
            total = torch.addcmul(pick(feats[0]), pick(feats[1]), c[:, 0].view(shape))
            for j in range(2, self.order + 1):
                total.addcmul_(pick(feats[j]), c[:, j - 1].view(shape))
            out.append(total)
        return tuple(out)
