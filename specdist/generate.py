"""The generation job behind ``specdist generate``: load, sample, decode, write media and a report."""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from . import media
from .config import GenerateConfig, config_to_dict
from .env import environment
from .loading import DEFAULT_VIDEO_PROMPTS, ModelBundle, load_model
from .metrics.flops import forward_flops
from .metrics.telemetry import GpuTelemetry
from .report import StagedOutput, output_sha256, write_json
from .sampling import initial_noise, sample_full


def _cycled(values: list[str], n: int) -> list[str]:
    return list(islice(cycle(values), n)) if values else []


def job_inputs(cfg: GenerateConfig, bundle: ModelBundle) -> tuple[list[str], list[str]]:
    """Per-sample prompts and class labels for the job (defaults filled in, cycled to ``num_samples``)."""
    n = cfg.num_samples
    labels, prompts = [], []
    if bundle.conditions_on == "class":
        labels = _cycled(cfg.class_labels or list(bundle.class_names) or ["0"], n)
        bundle.class_ids(labels)  # validate early, before any compute
    if bundle.conditions_on in ("text", "none"):
        default = DEFAULT_VIDEO_PROMPTS if bundle.adapter.is_video else ["a photo"]
        prompts = _cycled(cfg.prompt or default, n)
    return prompts, labels


def _write_media(pixels: torch.Tensor | None, out: Path, fps: int) -> list[str]:
    if pixels is None:
        return []
    if pixels.ndim == 5:
        media.save_video(pixels, out / "video.mp4", fps=fps)
        media.save_video_grid_png(pixels, out / "frames.png")
        return ["video.mp4", "frames.png"]
    media.save_image_grid(pixels, out / "grid.png")
    return ["grid.png"]


def run_generate(cfg: GenerateConfig, *, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one generation job and write ``cfg.output.dir``; returns the report dict.

    The output directory is staged and swapped in only when everything is written, so a failed
    run never leaves a partial result under the final name.
    """
    t0 = time.perf_counter()
    bundle = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, scheduler=cfg.scheduler)
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else bundle.default_guidance
    shape = bundle.latent_shape(cfg.height, cfg.width, cfg.frames)
    prompts, labels = job_inputs(cfg, bundle)
    seeds = [cfg.seed + i for i in range(cfg.num_samples)]
    bs = cfg.effective_batch_size
    batches = [list(range(i, min(i + bs, cfg.num_samples))) for i in range(0, cfg.num_samples, bs)]
    log(f"specdist: {bundle.name} ({bundle.adapter.model_class}), {cfg.num_samples} samples x {cfg.steps} steps, "
        f"method={cfg.method}, device={bundle.device}")
    results, tokens = [], None
    with GpuTelemetry() as telemetry:
        for k, idx in enumerate(batches):
            cond = bundle.encode([prompts[i] for i in idx] if prompts else [""] * len(idx),
                                 [labels[i] for i in idx], guidance, cfg.seed)
            tokens = bundle.adapter.token_counts(bundle.transformer, shape, cond)
            noise = initial_noise(shape, [seeds[i] for i in idx])
            results.append(sample_full(bundle.transformer, bundle.adapter, bundle.scheduler, cond, noise, cfg.steps,
                                       progress=progress, desc=f"batch {k + 1}/{len(batches)}"))
    latents = torch.cat([r.latents for r in results])
    pixels = bundle.decode(latents)
    cfg_factor = 2 if guidance > 1.0 and bundle.conditions_on != "none" else 1
    per_forward = forward_flops(bundle.transformer, *tokens)
    nfe = results[0].nfe
    report = {
        "model": bundle.name,
        "model_source": bundle.source,
        "model_class": bundle.adapter.model_class,
        "family": bundle.adapter.family,
        "method": cfg.method,
        "steps": cfg.steps,
        "num_samples": cfg.num_samples,
        "batch_size": bs,
        "seeds": seeds,
        "prompts": prompts,
        "class_labels": labels,
        "guidance_scale": guidance,
        "latent_shape": list(shape),
        "tokens": {"video": tokens[0], "text": tokens[1]},
        "nfe": nfe,
        "flops": {
            "per_forward_per_sample": per_forward,
            "per_sample": int(per_forward * cfg_factor * nfe),
            "note": "analytic (specdist.metrics.flops); guided steps count cond + uncond",
        },
        "sampling_wall_s": round(sum(r.wall_s for r in results), 4),
        "output_sha256": output_sha256(latents),
        "telemetry": telemetry.summary(),
        "environment": environment(bundle.device),
        "config": config_to_dict(cfg),
    }
    with StagedOutput(cfg.output.dir) as staged:
        report["media"] = _write_media(pixels, staged.dir, cfg.output.fps)
        if cfg.output.save_latents:
            save_file({"latents": latents.contiguous()}, str(staged.dir / "latents.safetensors"))
        report["wall_s"] = round(time.perf_counter() - t0, 4)
        write_json(staged.dir / "report.json", report)
        final = staged.commit()
    log(f"specdist: wrote {final}/report.json (nfe={nfe:g}, wall={report['wall_s']:.1f}s, "
        f"sha256={report['output_sha256'][:16]}...)")
    return report
