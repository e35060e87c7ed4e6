"""Quality of an accelerated output against the full-compute reference (DESIGN.md §6).

All metrics are *per sample* (the first dimension is the batch) and computed in float64.
Inputs are images ``[B, C, H, W]`` or videos ``[B, C, F, H, W]``; pixel metrics assume values in
``[-1, 1]`` (``data_range = 2``), but any tensors of equal shape are accepted (e.g. latents).

- PSNR: ``10 log10(data_range^2 / MSE)`` over all non-batch elements; identical inputs give ``inf``.
- SSIM: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), ``K1 = 0.01``, ``K2 = 0.03``,
  "valid" filtering (no padding), computed per channel on every 2-D frame and averaged over
  channels, frames and pixels. Frames smaller than 11 px use a window clipped to the frame.
- Relative L2: ``||x - ref||_2 / ||ref||_2`` over all non-batch elements.

JSON: :func:`compare` returns plain Python numbers; an infinite PSNR (bit-identical sample) is
written as the **string** ``"inf"`` so the result passes ``json.dumps(..., allow_nan=False)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["QualitySummary", "compare", "gaussian_window", "psnr", "rel_l2", "ssim"]

_WIN = 11
_SIGMA = 1.5
_K1 = 0.01
_K2 = 0.03


def _check_pair(x: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)} vs ref {tuple(ref.shape)}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"expected a batch [B, ...] with B >= 1, got shape {tuple(x.shape)}")
    return x.detach().to(torch.float64), ref.detach().to(device=x.device, dtype=torch.float64)


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per sample (shape ``[B]``, float64); ``inf`` where identical."""
    a, b = _check_pair(x, ref)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(torch.as_tensor(float(data_range) ** 2, dtype=torch.float64) / mse)


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Relative L2 error ``||x - ref|| / ||ref||`` per sample (shape ``[B]``, float64).

    A zero reference gives ``0`` where ``x`` is also zero and ``inf`` otherwise.
    """
    a, b = _check_pair(x, ref)
    num = (a - b).flatten(1).norm(dim=1)
    den = b.flatten(1).norm(dim=1)
    out = num / den
    return torch.where((num == 0) & (den == 0), torch.zeros_like(out), out)


def gaussian_window(size: int = _WIN, sigma: float = _SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian window (float64) of ``size`` taps, as used by :func:`ssim`."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return g / g.sum()


def _frames(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Reshape to ``[B * frames * C, 1, H, W]``; returns it and the number of planes per sample."""
    if t.ndim == 4:
        b, c, h, w = t.shape
        return t.reshape(b * c, 1, h, w), c
    if t.ndim == 5:
        b, c, f, h, w = t.shape
        return t.reshape(b * c * f, 1, h, w), c * f
    raise ValueError(f"ssim expects images [B, C, H, W] or videos [B, C, F, H, W], got shape {tuple(t.shape)}")


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Structural similarity per sample (shape ``[B]``, float64); ``1`` where identical.

    Gaussian 11x11 window (sigma 1.5), K1=0.01, K2=0.03, per channel on 2-D frames, valid
    region only; the SSIM map is averaged over pixels, channels and (for videos) frames.
    """
    a, b = _check_pair(x, ref)
    pa, planes = _frames(a)
    pb, _ = _frames(b)
    h, w = pa.shape[-2:]
    g = gaussian_window().to(pa.device)
    gh = gaussian_window(min(_WIN, h)).to(pa.device) if h < _WIN else g
    gw = gaussian_window(min(_WIN, w)).to(pa.device) if w < _WIN else g
    kernel = (gh[:, None] * gw[None, :])[None, None]  # [1, 1, kh, kw], separable product

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel)

    c1 = (_K1 * data_range) ** 2
    c2 = (_K2 * data_range) ** 2
    mu_a, mu_b = blur(pa), blur(pb)
    var_a = blur(pa * pa) - mu_a**2
    var_b = blur(pb * pb) - mu_b**2
    cov = blur(pa * pb) - mu_a * mu_b
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    per_plane = smap.flatten(1).mean(dim=1)
    return per_plane.reshape(-1, planes).mean(dim=1)


def _json_float(v: float) -> float | str:
    """A JSON-safe float: ``inf``/``-inf``/``nan`` become the strings ``"inf"``/``"-inf"``/``"nan"``."""
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return float(v)


@dataclass(frozen=True)
class QualitySummary:
    """Per-sample values of one metric with its mean and worst case.

    ``worst`` is the minimum for higher-is-better metrics (PSNR, SSIM) and the maximum for
    lower-is-better ones (relative L2). ``mean`` of PSNR is ``inf`` only when every sample is
    identical to its reference.
    """

    per_sample: tuple[float, ...]
    mean: float
    worst: float

    @classmethod
    def of(cls, values: torch.Tensor, higher_is_better: bool) -> QualitySummary:
        """Summarise a ``[B]`` tensor of per-sample values."""
        vals = tuple(float(v) for v in values.detach().to(torch.float64).cpu().tolist())
        if not vals:
            raise ValueError("cannot summarise an empty set of samples")
        finite = all(math.isfinite(v) for v in vals)
        mean = (math.fsum(vals) if finite else sum(vals)) / len(vals)
        worst = min(vals) if higher_is_better else max(vals)
        return cls(per_sample=vals, mean=mean, worst=worst)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict ``{"mean", "worst", "per_sample"}`` (non-finite values as strings)."""
        return {
            "mean": _json_float(self.mean),
            "worst": _json_float(self.worst),
            "per_sample": [_json_float(v) for v in self.per_sample],
        }


def compare(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> dict[str, Any]:
    """PSNR (dB), SSIM and relative L2 of ``x`` against ``ref``, JSON-ready.

    Returns ``{"psnr_db": {...}, "ssim": {...}, "rel_l2": {...}}`` where each entry is
    ``{"mean", "worst", "per_sample": [...]}``; worst is min for PSNR/SSIM and max for rel-L2.
    An infinite PSNR is the string ``"inf"``. SSIM needs images or videos (4-D or 5-D); for other
    shapes (e.g. flat latents) the ``"ssim"`` entry is ``None``.
    """
    out: dict[str, Any] = {
        "psnr_db": QualitySummary.of(psnr(x, ref, data_range), higher_is_better=True).to_dict(),
        "ssim": None,
        "rel_l2": QualitySummary.of(rel_l2(x, ref), higher_is_better=False).to_dict(),
    }
    if x.ndim in (4, 5):
        out["ssim"] = QualitySummary.of(ssim(x, ref, data_range), higher_is_better=True).to_dict()
    return out
