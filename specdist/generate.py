"""The generation job behind ``specdist generate``: load, sample, decode, write media and a report."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from . import media
from .config import GenerateConfig, config_to_dict
from .engine.config import PEER_METHODS
from .calibrate import calibration_for
from .engine.accounting import summarize
from .engine.exact import ExactStats, sample_exact, sample_target_chain
from .engine.speculative import CacheStats
from .env import environment
from .loading import ModelBundle, load_model, scheduler_record
from .metrics import compare
from .metrics.flops import flops_breakdown
from .memory import configure_vae
from .metrics.telemetry import GpuTelemetry
from .methods import run_method
from .report import StagedOutput, output_sha256, write_json
from .sampling import SampleResult, initial_noise, model_dtype


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
        prompts = _cycled(cfg.prompt or bundle.default_prompts, n)
    return prompts, labels


def _write_media(pixels: torch.Tensor | None, out: Path, fps: int) -> list[str]:
    if pixels is None:
        return []
    if pixels.ndim == 5 and pixels.shape[2] == 1:  # a one-frame video is an image
        pixels = pixels[:, :, 0]
    if pixels.ndim == 5:
        media.save_video(pixels, out / "video.mp4", fps=fps)
        media.save_video_grid_png(pixels, out / "frames.png")
        return ["video.mp4", "frames.png"]
    media.save_image_grid(pixels, out / "grid.png")
    return ["grid.png"]


def cache_report(cfg: GenerateConfig, results: list, references: list, flops: dict,
                 latents: torch.Tensor, pixels: torch.Tensor | None, bundle: ModelBundle) -> dict[str, Any]:
    """Report fields of a caching method: per-sample decisions, overhead, memory, quality vs full."""
    if cfg.method == "full":
        return {}
    if cfg.method in PEER_METHODS:  # diffusers' caches: the share of block work that really ran
        work = [sum(w) for w in zip(*[r.work for r in results])] if results[0].work else []
        out = {"peer": config_to_dict(cfg.peer), "nfe_with_overhead": sum(r.nfe * r.latents.shape[0] for r in results)
               / sum(r.latents.shape[0] for r in results),
               "work_per_step": [round(w / len(results), 4) for w in work]}
    else:
        stats = CacheStats.concat([r.stats for r in results])
        out = summarize(stats, flops, cfg.method, cfg.cache.probe_block, cfg.steps, cfg.cache.granularity)
        out["cache"] = config_to_dict(cfg.cache)
    if references:
        out["reference"] = reference_quality(references, latents, pixels, bundle)
        out["reference"]["speedup_wall"] = out["reference"]["full_wall_s"] / max(sum(r.wall_s for r in results), 1e-9)
        out["reference"]["speedup_nfe"] = cfg.steps / out["nfe_with_overhead"]
        out.update(quality_target_section(cfg, out["reference"]))
        overhead = out.get("verification_overhead")
        if overhead is not None:
            overhead["speculative_time_fraction_of_full_inference"] = (
                overhead["speculative_seconds"] / max(out["reference"]["full_wall_s"], 1e-9))
    return out


def quality_target_section(cfg: GenerateConfig, reference: dict[str, Any]) -> dict[str, Any]:
    """``{"quality_target": ...}`` for a ``speca`` run to a target that has a reference (single
    process or distributed): the target, the worst sample's PSNR reached, whether it was met and
    the calibration's sample count; ``{}`` otherwise."""
    if not (cfg.method == "speca" and cfg.cache.uses_target):
        return {}
    target = cfg.cache.effective_target_psnr_db
    worst = reference["pixels"]["psnr_db"]["worst"] if reference.get("pixels") else None
    return {"quality_target": {"target_psnr_db": target, "worst_psnr_db": worst,
                               "met": worst is not None and (worst == "inf" or worst >= target),
                               "calibration_samples": cfg.cache.calibration_samples}}


def target_notice(quality: dict[str, Any] | None, samples: int) -> str | None:
    """One line when a quality target was missed (``quality``: the report's ``quality_target``),
    naming by how much and why it can happen: the calibration saw ``calibration_samples`` samples,
    and a sample harder than every one of them can end below the target
    (``benchmarks/results/calibration_samples.md``). ``None`` when the target was met or not measured."""
    if not quality or quality.get("met", True) or quality.get("worst_psnr_db") is None:
        return None
    target, worst, n = quality["target_psnr_db"], float(quality["worst_psnr_db"]), quality["calibration_samples"]
    return (f"specdist: note: the worst of {samples} samples reached {worst:.1f} dB, {target - worst:.1f} dB below "
            f"the {target:g} dB target; the calibration saw {n} samples and a harder one can fall below it "
            f"(raise cache.calibration_samples or the target; benchmarks/results/calibration_samples.md)")


def _exact_batch(cfg: GenerateConfig, bundle: ModelBundle, args: tuple, seeds: list[int], prompts: list[str],
                 labels: list[str], idx: list[int], guidance: float, run: dict) -> tuple[Any, Any]:
    """One batch of ``method: exact`` and its target sampler (``reference``): verification by one
    batched call here (``runtime.backend: none``) or spread over a local pool of reference workers."""
    target, pool = None, None
    if cfg.runtime.distributed:  # local: step jobs on runtime.workers threads sharing the model
        from .runtime.exact_pool import pool_target
        from .runtime.pool import LocalPool
        from .runtime.run import torch_threads, worker_spec
        from .runtime.worker import StepWorker

        spec = worker_spec(cfg, [prompts[i] for i in idx] if prompts else [],
                           [labels[i] for i in idx] if labels else [], guidance)
        pool = LocalPool([StepWorker(bundle.transformer, bundle.adapter, bundle.scheduler, args[3], spec)]
                         * cfg.runtime.workers)
        target = pool_target(pool, dtype=model_dtype(bundle.transformer))
    try:
        with (torch_threads(cfg.runtime.threads_per_worker) if pool is not None else contextlib.nullcontext()):
            result = sample_exact(*args, seeds, cfg.exact, progress=run["progress"], desc=run["desc"], target=target)
            result.exact.pool_jobs = pool.stats.jobs if pool is not None else 0
            reference = None
            if cfg.reference:  # the target sampler exact mode reproduces in law, on the same pool
                reference = sample_target_chain(*args, seeds, cfg.exact.eta, progress=run["progress"],
                                                desc=run["desc"].replace("exact", "target sampler"), target=target)
    finally:
        if pool is not None:
            pool.close()
    return result, reference


def exact_report(cfg: GenerateConfig, results: list, references: list, latents: torch.Tensor) -> dict[str, Any]:
    """The report's ``exact`` section: per-sample rounds, evaluations, acceptance, run lengths, wall,
    and the target sampler of the same seeds (rounds = evaluations = steps) when it ran."""
    stats = ExactStats.concat([r.exact for r in results])
    rounds = stats.sequential_rounds
    out = {"config": config_to_dict(cfg.exact), **stats.as_dict(),
           "wall_s": round(sum(r.wall_s for r in results), 4),
           "mean_sequential_rounds": sum(rounds) / len(rounds),
           "round_reduction": cfg.steps / (sum(rounds) / len(rounds)),
           "evaluations_ratio": sum(stats.target_evaluations) / (len(rounds) * cfg.steps),
           "note": "samples are exact in law (the target sampler's distribution), not per seed; "
                   "latency_units_by_workers is an emulation: sum over rounds of ceil(window / workers) "
                   "target-call units (the target sampler: steps)"}
    if references:
        ref = torch.cat([r.latents for r in references])
        out["target_sampler"] = {"sequential_rounds": cfg.steps, "target_evaluations": cfg.steps,
                                 "wall_s": round(sum(r.wall_s for r in references), 4),
                                 "same_seed_latent_rel_l2": compare(latents, ref)["rel_l2"]}
        out["speedup_wall_local"] = out["target_sampler"]["wall_s"] / max(out["wall_s"], 1e-9)
    return out


def exact_summary(section: dict[str, Any], steps: int) -> str:
    """One log line of an exact run."""
    rates = [r for r in section["acceptance_rate"] if r is not None]
    line = (f"specdist: exact: {section['mean_sequential_rounds']:.1f} sequential rounds vs {steps} "
            f"({section['round_reduction']:.2f}x fewer), {section['evaluations_ratio']:.2f}x the target's evaluations, "
            f"acceptance {sum(rates) / max(len(rates), 1):.2f}")
    if "target_sampler" in section:
        where = (f"{section['verification']['workers']} local workers" if "verification" in section
                 else "one process, batched")
        line += f", wall {section['wall_s']:.1f} s vs {section['target_sampler']['wall_s']:.1f} s ({where})"
    return line


def memory_report(telemetry: dict[str, Any], caching: dict[str, Any], bundle: ModelBundle) -> dict[str, Any]:
    """Peak device memory of the job (NVML, device-wide, and ``torch.cuda.max_memory_allocated``, this
    process's tensors) next to the cache's bytes on the device and in host memory."""
    gpus = telemetry.get("gpus") or []
    torch_cuda = telemetry.get("torch_cuda") or {}
    out = {
        "device": str(bundle.device),
        "nvml_peak_used_mib": max((g["memory_used_peak_mib"] or 0 for g in gpus), default=None),
        "torch_max_memory_allocated_mib": torch_cuda.get("max_memory_allocated_mib"),
        "cache_bytes": caching.get("cache_bytes"),
        "cache_device_bytes": caching.get("cache_device_bytes"),
        "cache_host_bytes": caching.get("cache_host_bytes"),
    }
    if bundle.device.type != "cuda":
        out["note"] = ("no CUDA device: peak device memory is not measured; the cache's 'device' is this "
                       "machine's memory, so host offload on a CPU saves nothing")
    return out


def reference_quality(references: list, latents: torch.Tensor, pixels: torch.Tensor | None,
                      bundle: ModelBundle) -> dict[str, Any]:
    """Quality of ``latents`` (and decoded ``pixels``) against the full-compute ``references``."""
    ref_latents = torch.cat([r.latents for r in references])
    ref_pixels = bundle.decode(ref_latents)
    return {
        "full_wall_s": round(sum(r.wall_s for r in references), 4),
        "output_sha256_full": output_sha256(ref_latents),
        "latent_rel_l2": compare(latents, ref_latents)["rel_l2"],
        "pixels": compare(pixels, ref_pixels) if pixels is not None else None,
    }


def _run_distributed(cfg: GenerateConfig, bundle: ModelBundle, shape: tuple[int, ...], prompts: list[str],
                     labels: list[str], guidance: float, seeds: list[int], progress: bool,
                     log: Callable[[str], None], cond: Any, calibration: Any = None) -> tuple[list, list, tuple, dict]:
    from .runtime.report import runtime_report
    from .runtime.run import run_distributed

    noise = initial_noise(shape, seeds)
    run = run_distributed(cfg, bundle, noise, prompts, labels, guidance, progress=progress, log=log, cond=cond,
                          calibration=calibration)
    result = SampleResult(latents=run.latents, nfe=sum(run.nfe) / len(run.nfe), wall_s=run.stats.wall_s)
    tokens = bundle.adapter.token_counts(bundle.transformer, shape, cond)
    references = []
    if cfg.reference and not (cfg.method == "full" and cfg.runtime.mode == "latency"):
        references.append(run_method("full", bundle.transformer, bundle.adapter, bundle.scheduler, cond, noise,
                                     cfg.steps, progress=progress, desc="full (reference, single process)"))
    return [result], references, tokens, runtime_report(cfg, run)


def _torchrun_worker(cfg: GenerateConfig) -> dict[str, Any]:
    """A torchrun worker rank: serve jobs until rank 0 is done; writes nothing. It loads only the
    transformer (once, in :func:`run_worker_rank`); the encoded prompts come from rank 0."""
    import torch.distributed as dist

    from .runtime.run import worker_spec
    from .runtime.torchrun_backend import run_worker_rank

    try:
        jobs = run_worker_rank(cfg, worker_spec(cfg, [], [], 1.0))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return {"rank": int(os.environ["RANK"]), "jobs": jobs}


def run_generate(cfg: GenerateConfig, *, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one generation job and write ``cfg.output.dir``; returns the report dict.

    The output directory is staged before anything is computed (an unwritable ``output.dir`` fails
    at once, naming it) and swapped in only when everything is written, so a failed run never
    leaves a partial result under the final name and an earlier result stays intact.
    """
    t0 = time.perf_counter()
    if cfg.runtime.backend == "torchrun":
        from .runtime.torchrun_backend import rank_info

        info = rank_info()
        if info is not None and info[0] != 0:
            return _torchrun_worker(cfg)
    staged = StagedOutput(cfg.output.dir)
    try:
        report, pixels, latents = _sample_job(cfg, progress, log)
        report["media"] = _write_media(pixels, staged.dir, cfg.output.fps)
        if cfg.output.save_latents:
            save_file({"latents": latents.contiguous()}, str(staged.dir / "latents.safetensors"))
        report["wall_s"] = round(time.perf_counter() - t0, 4)
        write_json(staged.dir / "report.json", report)
        final = staged.commit()
    except BaseException:
        staged.discard()
        raise
    ref = report.get("reference")
    if ref and "speedup_wall" in ref:
        quality = ref["pixels"]["psnr_db"] if ref.get("pixels") else None
        worst = f", worst-sample PSNR {quality['worst']:.1f} dB (mean {quality['mean']:.1f})" if quality and \
            quality["worst"] != "inf" else ""
        log(f"specdist: {report['method']} sampled {ref['speedup_wall']:.2f}x faster than full compute "
            f"({report['sampling_wall_s']:.1f} s vs {ref['full_wall_s']:.1f} s){worst}")
    notice = target_notice(report.get("quality_target"), cfg.num_samples)
    if notice:
        log(notice)
    log(f"specdist: wrote {final}/report.json (nfe={report['nfe']:g}, wall={report['wall_s']:.1f}s, "
        f"sha256={report['output_sha256'][:16]}...)")
    return report


def _sample_job(cfg: GenerateConfig, progress: bool,
                log: Callable[[str], None]) -> tuple[dict[str, Any], torch.Tensor | None, torch.Tensor]:
    """Load, sample (single process or distributed), decode and measure: (report, pixels, latents)."""
    rt = cfg.runtime
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    bundle = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, scheduler=cfg.scheduler,
                        scheduler_config=cfg.scheduler_config, attention_backend=cfg.attention_backend,
                        offload=cfg.offload)
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else bundle.default_guidance
    shape = bundle.latent_shape(cfg.height, cfg.width, cfg.frames)
    prompts, labels = job_inputs(cfg, bundle)
    vae = configure_vae(bundle.pipeline, cfg.vae.tiling, cfg.vae.slicing, shape, cfg.num_samples, bundle.name)
    # the prompts go through the model's encoders once per job; batches and workers use this conditioning
    cond_all = bundle.encode(prompts or [""] * cfg.num_samples, labels, guidance, cfg.seed)
    seeds = [cfg.seed + i for i in range(cfg.num_samples)]
    bs = cfg.effective_batch_size
    batches = [list(range(i, min(i + bs, cfg.num_samples))) for i in range(0, cfg.num_samples, bs)]
    log(f"specdist: {bundle.name} ({bundle.adapter.model_class}), {cfg.num_samples} samples x {cfg.steps} steps, "
        f"method={cfg.method}, device={bundle.device}")
    results, references, tokens, runtime = [], [], None, {}
    calibration, calibration_info = None, None
    if cfg.method == "speca" and cfg.cache.uses_target:
        calibration, calibration_info = calibration_for(bundle, cfg.cache, cfg.steps, shape, guidance, log=log,
                                                        progress=progress)
    with GpuTelemetry() as telemetry:
        if rt.distributed and cfg.method != "exact":
            results, references, tokens, runtime = _run_distributed(cfg, bundle, shape, prompts, labels, guidance,
                                                                     seeds, progress, log, cond_all, calibration)
        for k, idx in enumerate([] if rt.distributed and cfg.method != "exact" else batches):
            cond = cond_all.select(torch.tensor(idx))
            tokens = bundle.adapter.token_counts(bundle.transformer, shape, cond)
            noise = initial_noise(shape, [seeds[i] for i in idx])
            run = dict(progress=progress, desc=f"batch {k + 1}/{len(batches)} {cfg.method}")
            args = (bundle.transformer, bundle.adapter, bundle.scheduler, cond, noise, cfg.steps)
            batch_seeds = [seeds[i] for i in idx]
            if cfg.method == "exact":
                result, reference = _exact_batch(cfg, bundle, args, batch_seeds, prompts, labels, idx, guidance, run)
                results.append(result)
                references += [reference] if reference is not None else []
                continue
            results.append(run_method(cfg.method, *args, cache=cfg.cache, peer=cfg.peer, calibration=calibration, **run))
            if cfg.method != "full" and cfg.reference:
                run["desc"] = f"batch {k + 1}/{len(batches)} full (reference)"
                references.append(run_method("full", *args, **run))
    latents = torch.cat([r.latents for r in results])
    pixels = bundle.decode(latents)
    cfg_factor = 2 if guidance > 1.0 and bundle.conditions_on != "none" else 1
    flops = flops_breakdown(bundle.transformer, *tokens)
    per_forward = flops["total"]
    nfe = sum(r.nfe * r.latents.shape[0] for r in results) / cfg.num_samples
    if cfg.method == "exact":
        caching = {"exact": exact_report(cfg, results, references, latents)}
        if rt.distributed:
            caching["exact"]["verification"] = {
                "backend": rt.backend, "workers": rt.workers, "jobs": sum(r.exact.pool_jobs for r in results),
                "emulate_step_s": rt.emulate_step_s, "emulated": rt.emulate_step_s > 0,
                "note": "jobs: exact mode's verifications, one step job per drafted state on a reference worker "
                        "(threads of this process); the target sampler then ran on the same pool, one job per step"}
        log(exact_summary(caching["exact"], cfg.steps))
    elif not rt.distributed:
        caching = cache_report(cfg, results, references, flops, latents, pixels, bundle)
    else:
        caching = {"reference": reference_quality(references, latents, pixels, bundle)} if references else {}
        if references:  # the distributed run's wall time against the single-process full run
            caching["reference"]["speedup_wall"] = caching["reference"]["full_wall_s"] / max(runtime["wall_s"], 1e-9)
            caching.update(quality_target_section(cfg, caching["reference"]))
    if calibration_info is not None:
        caching["calibration"] = calibration_info.as_dict()
    nfe_eff = caching.get("nfe_with_overhead", nfe)
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
        "conditioning": bundle.conditioning,
        **({"conditioning_note": f"{bundle.adapter.model_class} without a text encoder: random conditioning "
                                 f"drawn from seed {cfg.seed}; the prompts are not used, the result is latents only"}
           if bundle.conditioning == "random" else {}),
        "guidance_scale": guidance,
        "scheduler": scheduler_record(bundle.scheduler),
        "latent_shape": list(shape),
        "tokens": {"video": tokens[0], "text": tokens[1]},
        "nfe": nfe,
        "flops": {
            "per_forward_per_sample": per_forward,
            "per_sample": int(per_forward * cfg_factor * nfe_eff),
            "note": "analytic (specdist.metrics.flops); guided steps count cond + uncond; "
                    "speculative calls included",
        },
        "sampling_wall_s": round(sum(r.wall_s for r in results), 4),
        **caching,
        **({"runtime": runtime} if runtime else {}),
        "output_sha256": output_sha256(latents),
        "dtype": bundle.setup["dtype"],
        "attention": bundle.setup["attention"],
        "offload": bundle.setup["offload"],
        "vae": vae,
        "memory": memory_report(telemetry.summary(), caching, bundle),
        "telemetry": telemetry.summary(),
        "environment": environment(bundle.device),
        "config": config_to_dict(cfg),
    }
    return report, pixels, latents
