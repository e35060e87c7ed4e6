"""Exactness of ``method: exact`` on a zoo model (dit-shapes, DDPM), on a low-dimensional statistic
of the outputs: each sample's latent mean and standard deviation (one class, 20 samples a side)."""

from __future__ import annotations

import torch

from specdist.engine.config import ExactConfig
from specdist.engine.exact import sample_exact, sample_target_chain
from specdist.loading import load_model
from specdist.metrics.two_sample import ks_bonferroni
from specdist.sampling import initial_noise

SAMPLES, STEPS = 20, 12


def test_zoo_model_statistic_matches_the_target_sampler(one_thread):
    """Exact mode and the target sampler (other seeds) pass the KS-Bonferroni test at α = 0.01 on
    (mean, std) of each sample's latents; accepting every draft fails it (its stale clean-sample
    estimate leaves the images with too little contrast)."""
    bundle = load_model("dit-shapes", device="cpu", dtype="float32", scheduler="DDPMScheduler")
    shape = bundle.latent_shape(None, None, None)
    cond = bundle.encode([""] * SAMPLES, ["0"] * SAMPLES, bundle.default_guidance, 0)  # one class: less spread

    def stat(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.mean(dim=(1, 2, 3)), x.std(dim=(1, 2, 3))], dim=1)

    def run(seeds: list[int], coupling: str | None = "reflection") -> torch.Tensor:
        args = (bundle.transformer, bundle.adapter, bundle.scheduler, cond, initial_noise(shape, seeds), STEPS, seeds)
        if coupling is None:
            return sample_target_chain(*args, progress=False).latents
        return sample_exact(*args, ExactConfig(window=4), progress=False, coupling=coupling).latents

    target = stat(run(list(range(1000, 1000 + SAMPLES)), None))
    p_exact = ks_bonferroni(stat(run(list(range(SAMPLES)))), target)
    p_broken = ks_bonferroni(stat(run(list(range(SAMPLES)), "accept-all")), target)
    assert p_exact > 0.01, f"exact differs from the target sampler on dit-shapes (p={p_exact:.2g})"
    assert p_broken < 0.01, f"accept-all passed (p={p_broken:.2g}): the test has no power"
