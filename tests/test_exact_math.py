"""The pure math of exact mode: Gaussian steps against diffusers, the acceptance rule against
hand-computed cases, and the reflection coupling's residual law."""

from __future__ import annotations

import math

import diffusers
import pytest
import torch

from specdist.engine.exact_math import (acceptance_probability, coupled_step, gaussian_kernels, log_acceptance,
                                        reflect, step_noise, step_uniform, stream_seed)
from specdist.errors import ConfigError
from specdist.metrics.two_sample import ks_two_sample

BASE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")


@pytest.mark.parametrize("name,config,eta", [
    ("DDPMScheduler", dict(BASE, prediction_type="v_prediction", clip_sample=False), None),
    ("DDPMScheduler", dict(BASE, prediction_type="epsilon", clip_sample=True, variance_type="fixed_large"), None),
    ("DDPMScheduler", dict(BASE, prediction_type="sample", clip_sample=False, variance_type="fixed_small_log"), None),
    ("DDIMScheduler", dict(BASE, prediction_type="v_prediction"), 0.7),
    ("DDIMScheduler", dict(BASE, prediction_type="epsilon", clip_sample=True), 1.0),
    ("FlowMatchEulerDiscreteScheduler", dict(stochastic_sampling=True, shift=2.0), None),
])
def test_kernels_reproduce_the_scheduler_step(name, config, eta):
    """mean(x, out) + std·z equals diffusers' own ``step`` given the same noise, at every step."""
    sched = getattr(diffusers, name).from_config(config)
    sched.set_timesteps(12)
    kernels = gaussian_kernels(sched, eta)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(sched.timesteps):
        out = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i))
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        if name == "DDIMScheduler":
            ref = sched.step(out, t, x, eta=eta, variance_noise=z, return_dict=False)[0]
        else:
            ref = sched.step(out, t, x, generator=torch.Generator().manual_seed(i), return_dict=False)[0]
        # float64 coefficients here vs diffusers' float32: DDIM η=1's sqrt(1 − ᾱ_prev − σ²) cancels
        torch.testing.assert_close(kernels[i].sample(x, out, z), ref, atol=2e-4, rtol=1e-4)
        x = ref
    assert all(k.std >= 0 for k in kernels) and kernels[0].std > 0


def test_deterministic_samplers_are_refused_in_one_line():
    ddim = diffusers.DDIMScheduler(**BASE)
    ddim.set_timesteps(10)
    for eta in (None, 0.0):
        with pytest.raises(ConfigError, match="exact.eta.*deterministic") as err:
            gaussian_kernels(ddim, eta)
        assert "\n" not in str(err.value)
    flow = diffusers.FlowMatchEulerDiscreteScheduler()
    flow.set_timesteps(10)
    with pytest.raises(ConfigError, match="stochastic_sampling.*deterministic"):
        gaussian_kernels(flow)
    unipc = diffusers.UniPCMultistepScheduler()
    unipc.set_timesteps(10)
    with pytest.raises(ConfigError, match="'scheduler'.*UniPCMultistepScheduler.*stochastic"):
        gaussian_kernels(unipc)
    ddpm = diffusers.DDPMScheduler(**BASE)
    ddpm.set_timesteps(10)
    with pytest.raises(ConfigError, match="exact.eta"):
        gaussian_kernels(ddpm, 0.5)  # eta is DDIM's
    learned = diffusers.DDPMScheduler(variance_type="learned_range")
    learned.set_timesteps(10)
    with pytest.raises(ConfigError, match="variance_type"):
        gaussian_kernels(learned)


def test_log_acceptance_hand_computed():
    # 1-D: z = 0.5, Δ = 1: −⟨z,Δ⟩ − ½‖Δ‖² = −0.5 − 0.5 = −1  →  accept with e^{-1}
    assert float(log_acceptance(torch.tensor([[0.5]]), torch.tensor([[1.0]]))[0]) == pytest.approx(-1.0)
    # z = −2, Δ = 1: +2 − 0.5 = 1.5 > 0  →  min(1, ·) = 1, log 0
    assert float(log_acceptance(torch.tensor([[-2.0]]), torch.tensor([[1.0]]))[0]) == 0.0
    # 2-D: z = (1, −1), Δ = (0.5, 2): −(0.5 − 2) − ½(0.25 + 4) = 1.5 − 2.125 = −0.625
    assert float(log_acceptance(torch.tensor([[1.0, -1.0]]), torch.tensor([[0.5, 2.0]]))[0]) == pytest.approx(-0.625)
    # the same as the density ratio q(x̃)/p(x̃) of N(m^q, σ²) and N(m^p, σ²) at x̃ = m^p + σz
    mp, mq, sigma, z = 0.3, -0.2, 0.5, 0.8
    x = mp + sigma * z
    ratio = math.exp(-((x - mq) ** 2) / (2 * sigma**2)) / math.exp(-((x - mp) ** 2) / (2 * sigma**2))
    delta = (mp - mq) / sigma
    assert math.exp(float(log_acceptance(torch.tensor([[z]]), torch.tensor([[delta]]))[0])) == pytest.approx(
        min(1.0, ratio))
    # no overflow far out: a huge gap gives a huge negative log, not nan/inf arithmetic errors
    far = log_acceptance(torch.full((1, 4096), 3.0), torch.full((1, 4096), 1e4))
    assert torch.isfinite(far).all() and float(far[0]) < -1e10


def test_reflection_hand_computed():
    # e = (1, 0): reflect (1, 2) → (−1, 2)
    torch.testing.assert_close(reflect(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.0]])),
                               torch.tensor([[-1.0, 2.0]], dtype=torch.float64))
    # e = (1, 1)/√2: reflect (2, 0) → (2, 0) − 2·√2·(1,1)/√2 = (0, −2)
    torch.testing.assert_close(reflect(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])),
                               torch.tensor([[0.0, -2.0]], dtype=torch.float64))
    # Δ = 0 leaves z alone (the draft is then always accepted anyway)
    torch.testing.assert_close(reflect(torch.tensor([[2.0, 5.0]]), torch.zeros(1, 2)),
                               torch.tensor([[2.0, 5.0]], dtype=torch.float64))


def test_acceptance_rate_and_residual_law():
    """Accept rate = 2Φ(−‖Δ‖/2); the committed state is exactly N(m^q, σ²) with reflection, and
    not without it (a deliberately broken coupling)."""
    n, sigma = 20000, 0.7
    g = torch.Generator().manual_seed(1)
    z, u = torch.randn(n, 1, generator=g), torch.rand(n, generator=g, dtype=torch.float64)
    mp, mq = torch.full((n, 1), 0.7), torch.zeros(n, 1)  # ‖Δ‖ = 1
    exact = coupled_step(mp, mq, sigma, z, u)
    expected = float(acceptance_probability(1.0))
    assert expected == pytest.approx(2 * 0.5 * math.erfc(0.5 / math.sqrt(2)), rel=1e-9)
    assert float(exact.accepted.double().mean()) == pytest.approx(expected, abs=0.01)
    target = torch.randn(n, generator=torch.Generator().manual_seed(2)) * sigma
    assert ks_two_sample(exact.state[:, 0], target)[1] > 0.01
    broken = coupled_step(mp, mq, sigma, z, u, coupling="no-reflection")
    assert ks_two_sample(broken.state[:, 0], target)[1] < 1e-6
    # σ = 0: a deterministic step keeps only an identical draft, else the target's mean
    det = coupled_step(mp[:2], mq[:2], 0.0, z[:2], u[:2])
    assert not det.accepted.any() and torch.equal(det.state, mq[:2])


def test_streams_are_fixed_functions_of_seed_and_step():
    assert stream_seed(3, 7, "z") == stream_seed(3, 7, "z")
    assert len({stream_seed(s, k, kind) for s in range(5) for k in range(5) for kind in ("z", "u")}) == 50
    torch.testing.assert_close(step_noise(3, 7, (4,)), step_noise(3, 7, (4,)))
    assert not torch.equal(step_noise(3, 7, (4,)), step_noise(3, 8, (4,)))
    assert 0.0 <= float(step_uniform(3, 7)) < 1.0
