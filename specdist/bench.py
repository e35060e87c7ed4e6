"""``specdist bench``: every method, every knob of its sweep, on the same inputs, in one run.

For each model the full-compute reference is run first; every method then runs from the same
noise and conditioning, and is measured against that reference: NFE (full evaluations per
sample, and with the speculative calls' FLOPs added), analytic FLOPs, wall-clock, verification
overhead, cache memory, and PSNR / SSIM (pixels) and relative L2 (latents) per sample. Results go
to ``<out>/speed_quality.{json,md}`` and one speed–quality plot per model.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .calibrate import calibration_for
from .config import apply_overrides, build_config, config_to_dict
from .engine.accounting import summarize
from .engine.config import CacheConfig, PeerConfig
from .env import environment
from .errors import ConfigError, check_value
from .loading import load_model
from .metrics import compare
from .metrics.flops import flops_breakdown
from .methods import run_method
from .sampling import initial_noise


@dataclass(kw_only=True)
class BenchConfig:
    """A speed–quality benchmark."""

    models: list[str] = field(default_factory=lambda: ["dit-shapes", "hunyuan-shapes-video"])
    """Zoo names or local paths."""
    steps: int = 50
    num_samples: int = 8
    """Seeds ``seed .. seed + num_samples − 1``, prompts/classes cycled."""
    seed: int = 0
    device: str = "auto"
    repeats: int = 1
    """Timed repetitions of every run (the minimum wall time is reported)."""
    sweep: dict[str, dict[str, list] | list[dict[str, list]]] = field(default_factory=dict)
    """method → {dotted knob (``cache.interval``, ``peer.threshold``) → values}; the runs of a
    method are the cartesian product of its knob values. A list of such dicts gives several
    products in turn (e.g. a τ range per granularity)."""
    out: str = "benchmarks/results"
    untuned: list[str] = field(default_factory=list)
    """Models held out from every tuning decision (reported separately as untuned)."""

    def validate(self, prefix: str = "") -> None:
        from .config import METHODS

        check_value(self.steps >= 2, f"{prefix}steps", self.steps, "an integer >= 2")
        check_value(self.num_samples >= 1, f"{prefix}num_samples", self.num_samples, "an integer >= 1")
        check_value(self.repeats >= 1, f"{prefix}repeats", self.repeats, "an integer >= 1")
        allowed = [m for m in METHODS if m not in ("full", "exact")]  # exact: benchmarks/exact.py
        for method, groups in self.sweep.items():
            check_value(method in allowed, f"{prefix}sweep", method, f"methods among {allowed}")
            groups = groups if isinstance(groups, list) else [groups]
            check_value(all(isinstance(g, dict) and all(isinstance(v, list) for v in g.values()) for g in groups),
                        f"{prefix}sweep.{method}", groups, "a mapping knob -> list of values, or a list of them")


def expand_runs(cfg: BenchConfig) -> list[tuple[str, dict[str, Any]]]:
    """(method, knob overrides) for every run of the sweep, in config order."""
    runs = []
    for method, groups in cfg.sweep.items():
        for knobs in groups if isinstance(groups, list) else [groups]:
            keys = list(knobs)
            for values in itertools.product(*(knobs[k] for k in keys)):
                runs.append((method, dict(zip(keys, values))))
    return runs


def _knob_configs(knobs: dict[str, Any]) -> tuple[CacheConfig, PeerConfig]:
    data: dict[str, Any] = {}
    apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in knobs.items()])
    unknown = set(data) - {"cache", "peer"}
    if unknown:
        raise ConfigError(f"unknown sweep knob section {sorted(unknown)} (allowed: cache.*, peer.*)")
    cache = build_config(CacheConfig, data.get("cache", {}), "cache.")
    cache.validate()
    peer = build_config(PeerConfig, data.get("peer", {}), "peer.")
    peer.validate()
    return cache, peer


def _timed(repeats: int, fn):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def bench_model(cfg: BenchConfig, model: str, progress: bool = True) -> dict[str, Any]:
    """Run the reference and every sweep run on one model; returns its result rows."""
    bundle = load_model(model, device=cfg.device)
    n = cfg.num_samples
    if bundle.conditions_on == "class":
        labels = [bundle.class_names[i % len(bundle.class_names)] for i in range(n)]
        cond = bundle.encode([], labels, bundle.default_guidance, cfg.seed)
    else:
        defaults = bundle.default_prompts
        prompts = [defaults[i % len(defaults)] for i in range(n)]
        cond = bundle.encode(prompts, [], bundle.default_guidance, cfg.seed)
    shape = bundle.latent_shape(None, None, None)
    noise = initial_noise(shape, [cfg.seed + i for i in range(n)])
    flops = flops_breakdown(bundle.transformer, *bundle.adapter.token_counts(bundle.transformer, shape, cond))
    guided = 2 if cond.uncond_kwargs is not None and cond.guidance_scale > 1 else 1
    args = (bundle.transformer, bundle.adapter, bundle.scheduler, cond, noise, cfg.steps)
    run_method("full", *args[:-1], 2, progress=False)  # warm-up (allocators, kernels) before timing
    ref, ref_wall = _timed(cfg.repeats, lambda: run_method("full", *args, progress=progress, desc=f"{model} full"))
    ref_pixels = bundle.decode(ref.latents)
    rows = [_row("full", {}, ref, ref_wall, ref, ref_wall, ref_pixels, ref_pixels, flops, guided, cfg.steps)]
    calibrations: dict = {}  # MagCache calibrations, computed once per model and step count
    speca_calibrations: dict[str, dict] = {}  # speca's, by key: what each cost when it was computed
    for method, knobs in expand_runs(cfg):
        cache, peer = _knob_configs(knobs)
        label = f"{model} {method} {knobs}"
        cal = None
        if method == "speca" and cache.uses_target:
            cal, info = calibration_for(bundle, cache, cfg.steps, shape, cond.guidance_scale, log=lambda m: None,
                                        progress=progress)
            speca_calibrations.setdefault(info.key, {"key": info.key, "cost_s": cal.meta.get("cost_s"),
                                                     "samples": info.samples, "reused_from_disk": info.reused,
                                                     "cost": cal.meta.get("cost")})
        res, wall = _timed(cfg.repeats, lambda: run_method(method, *args, cache=cache, peer=peer, progress=progress,
                                                          desc=label, calibrations=calibrations, calibration=cal))
        rows.append(_row(method, knobs, res, wall, ref, ref_wall, bundle.decode(res.latents), ref_pixels,
                         flops, guided, cfg.steps, cache))
    return {"model": model, "class": bundle.adapter.model_class, "latent_shape": list(shape),
            "guidance_scale": cond.guidance_scale, "flops_per_forward": flops["total"], "rows": rows,
            "untuned": model in cfg.untuned, "speca_calibration": list(speca_calibrations.values()),
            "full_wall_s": ref_wall}


def _row(method, knobs, res, wall, ref, ref_wall, pixels, ref_pixels, flops, guided, steps,
         cache: CacheConfig | None = None) -> dict[str, Any]:
    nfe_eff, extra = res.nfe, {}
    stats = getattr(res, "stats", None)
    if stats is not None:
        cache = cache or CacheConfig()
        summary = summarize(stats, flops, method, cache.probe_block, steps, cache.granularity)
        n = len(summary["accepted"])
        nfe_eff = summary["nfe_with_overhead"]
        extra = {
            "accepted": sum(summary["accepted"]) / n,
            "rejected": sum(summary["rejected"]) / n,
            "mean_accepted_run": summary["mean_accepted_run"],
            "cache_bytes": summary["cache_bytes"],
            "full_steps_min_max": [min(summary["full_steps"]), max(summary["full_steps"])],
            "decisions": summary["decisions"],
            "verification_overhead_flops": summary["verification_overhead"]["flops_fraction_of_full_inference"],
            "speculative_time_fraction": summary["verification_overhead"]["speculative_seconds"] / ref_wall,
        }
        if "target_psnr_db" in stats.rule:
            extra["target_psnr_db"] = stats.rule["target_psnr_db"]
        if "token_level" in summary:  # token level: level shares and the selection's wall-time share
            extra["token_level"] = summary["token_level"]
            extra["selection_time_fraction"] = summary["token_level"]["selection_seconds"] / ref_wall
    q_pix = compare(pixels, ref_pixels) if pixels is not None else None
    return {
        "method": method,
        "knobs": knobs,
        "nfe": res.nfe,
        "nfe_with_overhead": nfe_eff,
        "speedup_nfe": steps / nfe_eff,
        "flops_per_sample": int(flops["total"] * guided * nfe_eff),
        "wall_s": wall,
        "speedup_wall": ref_wall / wall,
        "verification_overhead_flops": 0.0,
        "psnr_db": q_pix["psnr_db"] if q_pix else None,
        "ssim": q_pix["ssim"] if q_pix else None,
        "latent_rel_l2": compare(res.latents, ref.latents)["rel_l2"],
        **extra,
    }


def run_bench(cfg: BenchConfig, progress: bool = True, log=print) -> dict[str, Any]:
    """Run the whole benchmark and write its outputs; returns the results dict."""
    from .bench_report import write_outputs

    results = {"config": config_to_dict(cfg), "environment": environment(), "models": []}
    for model in cfg.models:
        log(f"specdist bench: {model}")
        results["models"].append(bench_model(cfg, model, progress))
    out = write_outputs(results, Path(cfg.out))
    log(f"specdist bench: wrote {out}")
    return results
