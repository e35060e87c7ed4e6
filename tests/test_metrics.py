"""Quality metrics: PSNR, SSIM, relative L2 and the JSON summary."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from specdist.metrics import QualitySummary, compare, psnr, rel_l2, ssim


def _naive_ssim_plane(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """Direct windowed SSIM of one 2-D plane (explicit loops over valid 11x11 windows)."""
    coords = np.arange(11) - 5.0
    g = np.exp(-(coords**2) / (2 * 1.5**2))
    g /= g.sum()
    w = np.outer(g, g)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    h, wd = a.shape
    vals = []
    for i in range(h - 10):
        for j in range(wd - 10):
            pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va = (w * (pa - ma) ** 2).sum()
            vb = (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_psnr_of_known_mse() -> None:
    ref = torch.zeros(2, 3, 8, 8)
    x = ref.clone()
    x[0] += 0.1  # MSE 0.01 -> 10 log10(4 / 0.01) = 26.0206 dB
    x[1] += 0.5  # MSE 0.25 -> 10 log10(4 / 0.25) = 12.0412 dB
    got = psnr(x, ref)
    assert got.dtype == torch.float64 and got.shape == (2,)
    assert got[0].item() == pytest.approx(10 * math.log10(400), abs=1e-6)
    assert got[1].item() == pytest.approx(10 * math.log10(16), abs=1e-6)
    assert psnr(x, ref, data_range=1.0)[0].item() == pytest.approx(20.0, abs=1e-6)
    assert math.isinf(psnr(ref, ref)[0].item())


def test_psnr_is_per_sample_for_video() -> None:
    ref = torch.rand(3, 3, 4, 8, 8) * 2 - 1
    x = ref.clone()
    x[1] += 0.2
    got = psnr(x, ref)
    assert math.isinf(got[0].item()) and math.isinf(got[2].item())
    assert got[1].item() == pytest.approx(10 * math.log10(4 / 0.04), abs=1e-4)


def test_ssim_identical_is_one_and_decreases_with_noise() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    assert ssim(ref, ref).item() == pytest.approx(1.0, abs=1e-12)
    prev = 1.0
    for sigma in (0.02, 0.1, 0.3, 1.0):
        noisy = ref + sigma * torch.randn(ref.shape, generator=g)
        value = ssim(noisy, ref).item()
        assert value < prev
        prev = value
    assert prev < 0.5


def test_ssim_matches_naive_reference() -> None:
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(2, 2, 16, 18, generator=g) * 2 - 1
    x = (ref + 0.3 * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
    got = ssim(x, ref)
    for b in range(2):
        want = np.mean([_naive_ssim_plane(x[b, c].double().numpy(), ref[b, c].double().numpy(), 2.0)
                        for c in range(2)])
        assert got[b].item() == pytest.approx(want, abs=1e-10)
    assert not torch.allclose(got[0], got[1])


def test_ssim_video_averages_over_frames() -> None:
    g = torch.Generator().manual_seed(2)
    ref = torch.rand(1, 3, 3, 16, 16, generator=g) * 2 - 1
    x = ref.clone()
    x[:, :, 1] += 0.3 * torch.randn(1, 3, 16, 16, generator=g)
    frame_vals = [ssim(x[:, :, f], ref[:, :, f]).item() for f in range(3)]
    assert frame_vals[0] == pytest.approx(1.0) and frame_vals[1] < 0.9
    assert ssim(x, ref).item() == pytest.approx(sum(frame_vals) / 3, abs=1e-12)


def test_rel_l2() -> None:
    ref = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    x = torch.tensor([[3.0, 4.5], [0.0, 0.0]])
    got = rel_l2(x, ref)
    assert got.tolist() == pytest.approx([0.1, 1.0])
    assert rel_l2(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0.0


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


def test_compare_worst_case_and_json() -> None:
    g = torch.Generator().manual_seed(3)
    ref = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    x = ref.clone()
    x[1] += 0.05 * torch.randn(3, 16, 16, generator=g)
    x[2] += 0.3 * torch.randn(3, 16, 16, generator=g)
    out = compare(x, ref)
    text = json.dumps(out, allow_nan=False)  # must not raise although sample 0 has PSNR inf
    back = json.loads(text)
    p, s, r = back["psnr_db"], back["ssim"], back["rel_l2"]
    assert p["per_sample"][0] == "inf" and p["mean"] == "inf"
    assert p["worst"] == pytest.approx(min(p["per_sample"][1:])) and p["worst"] == p["per_sample"][2]
    assert s["worst"] == pytest.approx(min(s["per_sample"])) and s["worst"] == s["per_sample"][2]
    assert r["worst"] == pytest.approx(max(r["per_sample"])) and r["worst"] == r["per_sample"][2]
    assert r["per_sample"][0] == 0.0 and s["per_sample"][0] == pytest.approx(1.0)
    assert r["mean"] == pytest.approx(sum(r["per_sample"]) / 3)


def test_quality_summary_is_frozen() -> None:
    q = QualitySummary.of(torch.tensor([1.0, 3.0]), higher_is_better=False)
    assert (q.mean, q.worst, q.per_sample) == (2.0, 3.0, (1.0, 3.0))
    with pytest.raises(AttributeError):
        q.mean = 0.0  # type: ignore[misc]
