"""Two-sample tests (pure torch): do two sets of samples come from the same law?

* :func:`ks_bonferroni` — per-coordinate two-sample Kolmogorov–Smirnov tests (asymptotic p-value)
  with a Bonferroni correction over the coordinates;
* :func:`mmd_permutation` — the unbiased squared MMD with a Gaussian kernel (median-heuristic
  bandwidth) and a permutation p-value.

Used by the exact sampler's statistical tests and its benchmark (tests/test_exact.py).
"""

from __future__ import annotations

import math

import torch


def kolmogorov_sf(x: float) -> float:
    """``P(K > x)`` of the Kolmogorov distribution: ``2 Σ_{k≥1} (−1)^{k−1} exp(−2k²x²)``."""
    if x <= 0.0:
        return 1.0
    if x < 0.2:  # the alternating series converges slowly here; the value is 1 to many digits
        return 1.0
    total = sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * x * x) for k in range(1, 101))
    return min(1.0, max(0.0, 2.0 * total))


def ks_two_sample(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``(D, p)`` of the two-sample KS test of 1-D samples ``a`` and ``b`` (asymptotic p-value with
    Stephens' small-sample correction)."""
    a, b = a.double().flatten().sort().values, b.double().flatten().sort().values
    n, m = len(a), len(b)
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True).double() / n
    cdf_b = torch.searchsorted(b, grid, right=True).double() / m
    d = float((cdf_a - cdf_b).abs().max())
    ne = n * m / (n + m)
    return d, kolmogorov_sf((math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * d)


def ks_bonferroni(a: torch.Tensor, b: torch.Tensor) -> float:
    """Bonferroni-corrected p-value of per-coordinate KS tests of ``a`` ``[n, D]`` vs ``b`` ``[m, D]``."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    pvals = [ks_two_sample(a[:, i], b[:, i])[1] for i in range(a.shape[1])]
    return min(1.0, min(pvals) * len(pvals))


def _mmd2(k: torch.Tensor, n: int) -> float:
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    m = k.shape[0] - n
    return float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
                 - 2.0 * kxy.mean())


def mmd_permutation(a: torch.Tensor, b: torch.Tensor, permutations: int = 200, seed: int = 0) -> tuple[float, float]:
    """``(MMD², p)``: unbiased squared MMD of ``a`` ``[n, D]`` vs ``b`` ``[m, D]`` with a Gaussian kernel
    (bandwidth: the median pairwise distance) and its permutation p-value ``(1 + #{MMD²_π ≥ MMD²}) / (1 + P)``."""
    x = torch.cat([a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)]).double()
    d2 = torch.cdist(x, x).pow(2)
    bandwidth2 = float(d2[d2 > 0].median())
    k = torch.exp(-d2 / bandwidth2)
    n = a.shape[0]
    stat = _mmd2(k, n)
    g = torch.Generator().manual_seed(seed)
    hits = 0
    for _ in range(permutations):
        perm = torch.randperm(x.shape[0], generator=g)
        hits += _mmd2(k[perm][:, perm], n) >= stat
    return stat, (1 + hits) / (1 + permutations)
