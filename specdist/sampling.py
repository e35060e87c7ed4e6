"""The full-compute sampling loop over diffusers schedulers.

One step is ``latents ← scheduler.step(adapter.predict(model, scale(latents), t, cond), t, latents)``
with the scheduler's timesteps set up by the adapter exactly as the model's diffusers pipeline
sets them. Initial noise is drawn per sample from its own seeded generator, so a sample's result
does not depend on which other samples share its batch.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .models.base import Conditioning, ModelAdapter

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
StepContext = Callable[[int, torch.Tensor], contextlib.AbstractContextManager]


@dataclass
class SampleResult:
    """Result of one sampling run over a batch."""

    latents: torch.Tensor  # [B, *latent_shape] final latents, float32
    nfe: float  # full-model evaluations per sample (a guided call counts once)
    wall_s: float
    timesteps: list[float] = field(default_factory=list)


def initial_noise(latent_shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """``[len(seeds), *latent_shape]`` float32 standard normal noise, sample ``i`` from ``seeds[i]``."""
    return torch.stack([
        torch.randn(latent_shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds
    ])


def fresh_scheduler(scheduler: Any) -> Any:
    """An independent copy of ``scheduler`` (multistep schedulers carry state per generation)."""
    return copy.deepcopy(scheduler)


def snapshot(scheduler: Any) -> Any:
    """A copy of ``scheduler`` that a later ``step`` on either side does not affect.

    diffusers schedulers advance by rebinding attributes (``_step_index``, ``sample``, …) and by
    assigning into lists (multistep ``model_outputs``); their tensors (timesteps, sigmas, alphas)
    are never written in place. So a shallow copy with fresh containers is a full snapshot, at a
    fraction of ``deepcopy``'s cost (which copies every schedule tensor).
    """
    new = copy.copy(scheduler)
    for key, value in vars(scheduler).items():
        if isinstance(value, (list, dict)):
            setattr(new, key, copy.copy(value))
    return new


def init_latents(scheduler: Any, noise: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Initial float32 latents: ``noise`` scaled by the scheduler's ``init_noise_sigma`` (if any)."""
    return noise.to(device=device, dtype=torch.float32) * getattr(scheduler, "init_noise_sigma", 1.0)


def scale_input(scheduler: Any, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """``scheduler.scale_model_input`` where the scheduler has one (flow matching has not)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return latents if scale is None else scale(latents, timestep)


def model_device(model: nn.Module) -> torch.device:
    """The device ``model`` computes on: diffusers' ``ModelMixin.device`` (under group offloading, where
    the weights wait in CPU memory between uses, that is the onload device), else its parameters'."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of ``model``'s parameters."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def sample_full(
    model: nn.Module,
    adapter: ModelAdapter,
    scheduler: Any,
    cond: Conditioning,
    noise: torch.Tensor,
    steps: int,
    *,
    progress: bool = True,
    desc: str = "sampling",
    on_step: StepCallback | None = None,
    step_context: StepContext | None = None,
) -> SampleResult:
    """Run ``steps`` denoising steps computing the full model at every step.

    Args:
        model: the diffusers transformer.
        adapter: its :class:`ModelAdapter`.
        scheduler: a diffusers scheduler (copied; the caller's instance is not modified).
        cond: conditioning for the batch (same batch size as ``noise``).
        noise: initial noise ``[B, *latent_shape]`` (see :func:`initial_noise`).
        steps: number of denoising steps.
        progress: show a tqdm bar over steps.
        on_step: called as ``on_step(step_index, timestep, latents_after_step)``.
        step_context: each step's model call runs inside ``step_context(step_index, timestep)``
            (e.g. diffusers' ``cache_context`` for its cache hooks); default: nothing.
    """
    device = model_device(model)
    dtype = model_dtype(model)
    sched = fresh_scheduler(scheduler)
    adapter.set_timesteps(sched, steps, tuple(noise.shape[1:]), device)
    latents = init_latents(sched, noise, device)
    cond = cond.to(device, dtype)
    start = time.perf_counter()
    timesteps = list(sched.timesteps)
    with torch.inference_mode():
        for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress, leave=False)):
            x_in = scale_input(sched, latents, t).to(dtype)
            with step_context(i, t) if step_context is not None else contextlib.nullcontext():
                out = adapter.predict(model, x_in, t, cond).float()
            latents = sched.step(out, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i, t, latents)
    return SampleResult(
        latents=latents.float().cpu(),
        nfe=float(len(timesteps)),
        wall_s=time.perf_counter() - start,
        timesteps=[float(t) for t in timesteps],
    )
