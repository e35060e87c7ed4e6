"""Calibrations from what a user has: a loaded model bundle (``specdist generate``/``bench``/
``calibrate``) or a stock diffusers pipeline (the drop-in :func:`specdist.enable`).

The calibration itself is :mod:`specdist.engine.calibration`; here the calibration samples are
chosen the same way everywhere: ``cache.calibration_samples`` samples on the model's own default
conditioning (its default prompts or classes), from seeds ``CALIBRATION_SEED + s``, at the job's
step count, size and guidance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .engine.calibration import CALIBRATION_SEED, Calibration, CalibrationInfo, ensure_calibration
from .engine.config import CacheConfig
from .sampling import initial_noise


def calibration_for(bundle: Any, cache: CacheConfig, steps: int, latent_shape: tuple[int, ...], guidance: float, *,
                    log: Callable[[str], None] = print, progress: bool = True) -> tuple[Calibration, CalibrationInfo]:
    """The calibration of ``bundle``'s model for a job (cached; see :func:`ensure_calibration`)."""
    from .config import GenerateConfig
    from .generate import job_inputs

    n = cache.calibration_samples
    prompts, labels = job_inputs(GenerateConfig(model=bundle.name, num_samples=n), bundle)
    cond = bundle.encode(prompts or [""] * n, labels, guidance, CALIBRATION_SEED)
    noise = initial_noise(latent_shape, [CALIBRATION_SEED + s for s in range(n)])
    return ensure_calibration(bundle.transformer, bundle.adapter, bundle.scheduler, cond, noise, steps, cache,
                              decode=bundle.decode, log=log, progress=progress)


def calibrate_pipeline(pipe: Any, prompt: str | list[str] = "", *, num_inference_steps: int, height: int,
                       width: int, num_frames: int = 1, guidance_scale: float = 1.0,
                       cache: CacheConfig | None = None, conditioning: Any = None,
                       log: Callable[[str], None] = print, progress: bool = True) -> Calibration:
    """The calibration of ``pipe.transformer`` for :func:`specdist.enable` with a quality target.

    It runs on specdist's loop, which reproduces the pipeline's own denoising loop (its
    encoders, timesteps and guidance; ``tests/test_pipeline_equivalence.py``), for the sizes the
    pipeline will be called with; decoding uses the pipeline's VAE when it has one. Prompts go
    through the pipeline's own encoders, or pass ``conditioning`` (a
    :class:`~specdist.models.base.Conditioning` of ``cache.calibration_samples`` rows) when the
    pipeline has none loaded.
    """
    from .models import adapter_for

    cfg = cache or CacheConfig()
    adapter = adapter_for(pipe.transformer)
    device = next(pipe.transformer.parameters()).device
    n = cfg.calibration_samples
    prompts = ([prompt] if isinstance(prompt, str) else list(prompt)) or [""]
    prompts = [prompts[s % len(prompts)] for s in range(n)]
    cond = conditioning if conditioning is not None else adapter.pipeline_conditioning(pipe, prompts, [],
                                                                                        guidance_scale, device)
    h, w, f = adapter.pipeline_latent_size(pipe, height, width, num_frames)
    shape = adapter.latent_shape(pipe.transformer, h, w, f)
    noise = initial_noise(shape, [CALIBRATION_SEED + s for s in range(n)])
    decode = None
    if getattr(pipe, "vae", None) is not None:
        decode = lambda z: adapter.pipeline_decode(pipe, z.to(device)).float().cpu()  # noqa: E731
    with torch.inference_mode():
        cal, _ = ensure_calibration(pipe.transformer, adapter, pipe.scheduler, cond, noise, num_inference_steps, cfg,
                                    decode=decode, log=log, progress=progress)
    return cal
