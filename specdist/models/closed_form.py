"""A denoiser whose output is exact: an isotropic Gaussian-mixture data law in ``D`` dimensions.

With data ``x0 ~ Σ_c w_c N(μ_c, s_c² I)``, the noisy state's law is again a mixture, so the
posterior mean of the noise (or of the velocity) is known in closed form:

* ``prediction="epsilon"`` (DDPM/DDIM, ``x_t = √ᾱ x0 + √(1−ᾱ) ε``): ``E[ε | x_t]``, with ``ᾱ``
  read from the scheduler's ``alphas_cumprod`` at the call's timestep;
* ``prediction="flow"`` (flow matching, ``x_t = (1−σ) x0 + σ ε``, ``σ = t / 1000``):
  ``E[ε − x0 | x_t]``, the velocity the Euler scheduler expects.

It runs through the same adapter/scheduler code path as the zoo models, so the exact sampler's
statistical tests (and the acceptance-vs-dimension benchmark) check the real sampling code on a
problem whose target law is known. Latents are ``[B, D]``; there is no conditioning.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Conditioning, ModelAdapter, timestep_batch


class GaussianMixtureDenoiser(nn.Module):
    """Exact denoiser of an isotropic Gaussian mixture (see the module docstring).

    Args:
        means: ``[C, D]`` component means.
        stds: ``[C]`` component standard deviations (> 0).
        weights: ``[C]`` mixture weights (normalised here).
        prediction: ``epsilon`` or ``flow``.
        alphas_cumprod: ``[T]`` the scheduler's ``ᾱ`` (``epsilon`` only).
    """

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor, prediction: str = "epsilon",
                 alphas_cumprod: torch.Tensor | None = None) -> None:
        super().__init__()
        if prediction not in ("epsilon", "flow"):
            raise ValueError(f"prediction must be 'epsilon' or 'flow', got {prediction!r}")
        if prediction == "epsilon" and alphas_cumprod is None:
            raise ValueError("prediction='epsilon' needs the scheduler's alphas_cumprod")
        self.prediction = prediction
        self.register_buffer("means", means.double())
        self.register_buffer("stds", stds.double())
        self.register_buffer("log_weights", torch.log(weights.double() / weights.double().sum()))
        self.register_buffer("alphas_cumprod", (alphas_cumprod if alphas_cumprod is not None
                                                else torch.ones(1)).double())
        self.dummy = nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the module a dtype and device

    @property
    def dim(self) -> int:
        """Data dimension D."""
        return self.means.shape[1]

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Exact prediction for states ``x`` ``[B, D]`` at ``timestep`` ``[B]``."""
        xd = x.double()
        if self.prediction == "epsilon":
            a = self.alphas_cumprod[timestep.round().long().clamp(0, len(self.alphas_cumprod) - 1)][:, None]
            scale, noise = a.sqrt(), (1 - a).sqrt()  # x_t = scale · x0 + noise · ε
        else:
            sigma = (timestep.double() / 1000.0)[:, None]
            scale, noise = 1 - sigma, sigma
        var = scale**2 * self.stds[None] ** 2 + noise**2  # [B, C] variance of x_t given the component
        centred = xd[:, None, :] - scale[:, :, None] * self.means[None]  # [B, C, D]
        logp = self.log_weights[None] - 0.5 * (centred**2).sum(-1) / var - 0.5 * self.dim * torch.log(var)
        resp = torch.softmax(logp, dim=1)[:, :, None]  # [B, C, 1] posterior component weights
        eps_c = noise[:, :, None] * centred / var[:, :, None]  # E[ε | x_t, c]
        eps = (resp * eps_c).sum(1)
        if self.prediction == "epsilon":
            return eps.to(x.dtype)
        x0 = (xd - noise * eps) / scale.clamp_min(1e-12)
        return (eps - x0).to(x.dtype)


class ClosedFormAdapter(ModelAdapter):
    """Adapter of :class:`GaussianMixtureDenoiser`: latents ``[B, D]``, no blocks, no conditioning."""

    family = "closed_form"
    model_class = "GaussianMixtureDenoiser"

    def block_lists(self, model: nn.Module) -> list[str]:
        return []

    def head_modules(self, model: nn.Module) -> list[str]:
        return []

    def latent_shape(self, model: nn.Module, height: int, width: int, frames: int) -> tuple[int, ...]:
        return (model.dim,)

    def token_counts(self, model, latent_shape, cond) -> tuple[int, int]:
        return 1, 0

    def forward(self, model, latents, timestep, kwargs, extra) -> torch.Tensor:
        return model(latents, timestep_batch(timestep, latents.shape[0], latents.device, torch.float64))

    def conditioning(self, batch: int) -> Conditioning:
        """The (empty) conditioning of ``batch`` samples."""
        return Conditioning({"index": torch.arange(batch)})

    def random_conditioning(self, model, batch, generator, guidance_scale=1.0) -> Conditioning:
        return self.conditioning(batch)


def mixture(dim: int, components: int = 2, separation: float = 2.0, std: float = 0.5, seed: int = 0,
            prediction: str = "epsilon", scheduler: Any = None) -> GaussianMixtureDenoiser:
    """A ``components``-component mixture in ``dim`` dimensions: means of norm ``separation`` along
    random directions (so ``‖μ‖`` does not grow with D), component std ``std``, unequal weights."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(components, dim, generator=g, dtype=torch.float64)
    means = separation * dirs / dirs.norm(dim=1, keepdim=True)
    weights = torch.linspace(1.0, 2.0, components, dtype=torch.float64)
    stds = torch.full((components,), std, dtype=torch.float64)
    ac = scheduler.alphas_cumprod if prediction == "epsilon" else None
    return GaussianMixtureDenoiser(means, stds, weights, prediction, ac).eval()
