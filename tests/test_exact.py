"""Exactness of ``method: exact``, tested statistically (the pattern of vLLM's rejection-sampler tests).

A Gaussian-mixture data law with its exact denoiser (:mod:`specdist.models.closed_form`) runs
through the real diffusers schedulers. Samples of the exact sampler and of the plain target chain
(diffusers' own ``scheduler.step`` with its own generator) must pass a per-coordinate KS test with
a Bonferroni correction at α = 0.01; the same test must *fail* for a deliberately broken coupling
(accept every draft, or sample the residual without the reflection) — so it has power here.
Also: reproducibility and independence of the batch composition."""

from __future__ import annotations

import diffusers
import pytest
import torch

from specdist.engine.config import ExactConfig
from specdist.engine.exact import ACCEPTED, TARGET, sample_exact, sample_target_chain
from specdist.metrics.two_sample import ks_bonferroni, mmd_permutation
from specdist.models.closed_form import ClosedFormAdapter, mixture
from specdist.sampling import initial_noise

ALPHA = 0.01
N = 500  # samples per side
STEPS = 6  # few steps: large draft errors, many rejections — where a wrong coupling shows
ADAPTER = ClosedFormAdapter()
SCHEDULERS = {
    "ddpm": (diffusers.DDPMScheduler, dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing",
                                           clip_sample=False), None),
    "ddim": (diffusers.DDIMScheduler, dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"), 1.0),
    "flow": (diffusers.FlowMatchEulerDiscreteScheduler, dict(stochastic_sampling=True, shift=2.0), None),
}


def _setup(kind: str, dim: int):
    cls, config, eta = SCHEDULERS[kind]
    sched = cls(**config)
    model = mixture(dim, separation=3.0, std=0.3, scheduler=sched, prediction="flow" if kind == "flow" else "epsilon")
    return sched, model, eta


def _diffusers_chain(model, sched, n: int, steps: int, eta: float | None, seed: int = 12345) -> torch.Tensor:
    """The plain target sampler, run by diffusers' own ``step`` with its own generator."""
    sched = type(sched).from_config(sched.config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.dim, generator=g) * getattr(sched, "init_noise_sigma", 1.0)
    cond = ADAPTER.conditioning(n)
    for t in sched.timesteps:
        out = ADAPTER.predict(model, x, t, cond)
        x = sched.step(out, t, x, generator=g, return_dict=False, **({"eta": eta} if eta else {}))[0]
    return x


def _exact(model, sched, eta, n: int, steps: int, cfg: ExactConfig | None = None, coupling: str = "reflection",
           first_seed: int = 0):
    seeds = list(range(first_seed, first_seed + n))
    cfg = cfg or ExactConfig(window=4, eta=eta)
    return sample_exact(model, ADAPTER, sched, ADAPTER.conditioning(n), initial_noise((model.dim,), seeds), steps,
                        seeds, cfg, progress=False, coupling=coupling)


@pytest.mark.parametrize("kind,dim,draft,space,steps", [
    ("ddpm", 4, "frozen", "x0", STEPS), ("ddim", 4, "frozen", "x0", STEPS), ("flow", 4, "frozen", "x0", STEPS),
    ("ddpm", 16, "taylor", "x0", 12), ("ddpm", 1, "frozen", "output", STEPS), ("flow", 2, "taylor", "output", STEPS)])
def test_exact_matches_the_target_chain_in_law(kind, dim, draft, space, steps):
    sched, model, eta = _setup(kind, dim)
    ref = _diffusers_chain(model, sched, N, steps, eta)
    cfg = ExactConfig(window=4, eta=eta, draft=draft, space=space)
    out = _exact(model, sched, eta, N, steps, cfg)
    p = ks_bonferroni(out.latents, ref)
    assert p > ALPHA, f"exact sampler differs from the target chain (KS-Bonferroni p={p:.2g})"
    stats = out.exact
    rates = [r for r in stats.acceptance_rate() if r is not None]
    assert 0.02 < sum(rates) / len(rates) < 0.98  # drafts are both accepted and rejected: the test is not vacuous
    assert all(len(o) == steps for o in stats.outcomes)
    assert all(1 <= r <= steps for r in stats.sequential_rounds)


@pytest.mark.parametrize("kind,coupling,dim,steps", [
    ("ddpm", "accept-all", 4, STEPS), ("ddim", "accept-all", 4, STEPS), ("flow", "accept-all", 4, STEPS),
    ("ddim", "no-reflection", 4, STEPS), ("flow", "no-reflection", 4, STEPS), ("ddpm", "no-reflection", 2, 10)])
def test_a_broken_coupling_fails_the_same_test(kind, coupling, dim, steps):
    """(Under DDPM the missing reflection shows at 2-D / 10 steps; at 4-D / 6 steps this sample
    size has no power against it.)"""
    sched, model, eta = _setup(kind, dim)
    ref = _diffusers_chain(model, sched, N, steps, eta)
    p = ks_bonferroni(_exact(model, sched, eta, N, steps, coupling=coupling).latents, ref)
    assert p < ALPHA, f"{coupling} passed the two-sample test (p={p:.2g}): the test has no power"
    if (kind, dim, steps) == ("ddpm", 2, 10):  # the exact coupling passes the same test here too
        assert ks_bonferroni(_exact(model, sched, eta, N, steps).latents, ref) > ALPHA


def test_mmd_agrees_on_the_gaussian_mixture():
    """A second, multivariate test (MMD with a permutation p-value) on the 4-D mixture with the
    adaptive window: exact passes, accept-all fails."""
    sched, model, eta = _setup("ddim", 4)
    ref = _diffusers_chain(model, sched, 300, STEPS, eta)
    cfg = ExactConfig(window=2, adaptive=True, max_window=6, eta=eta)
    assert mmd_permutation(_exact(model, sched, eta, 300, STEPS, cfg).latents, ref, 200)[1] > ALPHA
    assert mmd_permutation(_exact(model, sched, eta, 300, STEPS, cfg, "accept-all").latents, ref, 200)[1] < ALPHA


def test_same_seed_same_result_and_batch_independence():
    sched, model, eta = _setup("ddpm", 8)
    a = _exact(model, sched, eta, 6, 20)
    b = _exact(model, sched, eta, 6, 20)
    assert torch.equal(a.latents, b.latents) and a.exact.outcomes == b.exact.outcomes
    alone = _exact(model, sched, eta, 2, 20, first_seed=3)  # seeds 3, 4 without the others
    torch.testing.assert_close(alone.latents, a.latents[3:5], atol=1e-6, rtol=1e-6)
    assert alone.exact.outcomes == a.exact.outcomes[3:5]


def test_a_draft_equal_to_the_target_is_always_accepted_and_reproduces_the_chain():
    """A target whose output never changes (so the frozen draft is exact): every drafted step is
    accepted, each round commits its whole window, and the result is bit-identical to the plain
    target chain with the same (seed, step) noise streams."""
    sched, model, eta = _setup("ddpm", 3)
    seeds, steps, window = [0, 1, 2], 21, 4
    const = lambda states, ts, rows: torch.full_like(states, 0.25)  # noqa: E731
    noise = initial_noise((3,), seeds)
    chain = sample_target_chain(model, ADAPTER, sched, ADAPTER.conditioning(3), noise, steps, seeds, target=const,
                                progress=False)
    out = sample_exact(model, ADAPTER, sched, ADAPTER.conditioning(3), noise, steps, seeds,
                       ExactConfig(window=window, space="output"),
                       target=const, progress=False)
    torch.testing.assert_close(out.latents, chain.latents, atol=1e-6, rtol=1e-6)
    assert all(o == [TARGET] + [ACCEPTED] * (steps - 1) for o in out.exact.outcomes)
    assert out.exact.sequential_rounds == [1 + 5] * 3  # one plain first step, then 20 steps in windows of 4
    assert out.exact.latency_units(4) == [6] * 3 and out.exact.latency_units(1) == [21] * 3
