"""How much does *where* the full steps fall matter? Fixed-interval phase and single-window damage.

Two measurements per zoo model, every run from the same seeds and conditioning, PSNR on pixels
against ``full`` (worst sample and mean):

1. **Phase.** ``taylorseer`` at a fixed interval with the warm-up shifted by one and two steps
   (``cache.warmup`` 3, 4, 5): the same number of full steps, a schedule moved by one step. Next
   to them ``speca`` at its quality targets (calibrated, everything else at defaults), so the
   comparison the speed–quality benchmark makes against one phase can be read against all three.
2. **Where a forecast hurts.** Full compute everywhere except one window of five consecutive
   forecasts (``cache.full_steps`` = every other step), for windows starting every six steps:
   the final damage one window does, by position in the trajectory, at order 1, at order 2 with
   the default order fallback (``cache.extrapolation_ratio`` 2: beyond twice the gap between the
   adjacent full steps the forecast is order 1) and at plain order 2 (ratio 0).

    python benchmarks/schedule_sensitivity.py                 # every zoo model, 4 samples
    python benchmarks/schedule_sensitivity.py --models hunyuan-shapes-video --samples 8

Writes ``benchmarks/results/schedule_sensitivity.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from specdist.calibrate import calibration_for
from specdist.engine.config import CacheConfig
from specdist.loading import load_model
from specdist.methods import run_method
from specdist.metrics import compare
from specdist.sampling import initial_noise

MODELS = ("dit-shapes", "hunyuan-shapes-video", "wan-shapes")
STEPS = 50
WINDOW = 5
WINDOW_VARIANTS = (("order 1", 1, 0.0), ("order 2 (fallback, default)", 2, 2.0), ("order 2 plain", 2, 0.0))
"""(label, cache.order, cache.extrapolation_ratio) of the window study's rows."""


def model_inputs(bundle, n: int):
    """The conditioning of ``n`` samples: the model's default class labels or prompts, in turn."""
    if bundle.conditions_on == "class":
        return bundle.encode([], [bundle.class_names[i % len(bundle.class_names)] for i in range(n)],
                             bundle.default_guidance, 0)
    return bundle.encode([bundle.default_prompts[i % len(bundle.default_prompts)] for i in range(n)], [],
                         bundle.default_guidance, 0)


def _row(label: str, res, pixels: torch.Tensor, ref_pixels: torch.Tensor) -> dict:
    per = res.stats.per_sample()
    q = compare(pixels, ref_pixels)["psnr_db"]
    return {"run": label, "nfe": sum(p["full_steps"] for p in per) / len(per), "psnr_worst": q["worst"],
            "psnr_mean": q["mean"], "psnr_per_sample": q["per_sample"], "decisions": per[0]["decisions"]}


def measure(model: str, n: int, targets: list[float], intervals: list[int]) -> dict:
    """Every run of one model (see the module doc)."""
    bundle = load_model(model)
    cond = model_inputs(bundle, n)
    shape = bundle.latent_shape(None, None, None)
    run = (bundle.transformer, bundle.adapter, bundle.scheduler, cond, initial_noise(shape, list(range(n))), STEPS)
    ref_pixels = bundle.decode(run_method("full", *run, desc=f"{model} full").latents)

    def go(label: str, method: str, cache: CacheConfig, calibration=None) -> dict:
        res = run_method(method, *run, cache=cache, calibration=calibration, desc=f"{model} {label}")
        return _row(label, res, bundle.decode(res.latents), ref_pixels)

    phase = []
    for interval in intervals:
        for granularity, order in (("block", 2), ("output", 1)):
            for warmup in (3, 4, 5):
                phase.append(go(f"taylorseer {granularity} o{order} interval {interval}, warm-up {warmup}",
                                "taylorseer", CacheConfig(granularity=granularity, order=order, interval=interval,
                                                          warmup=warmup)))
    for target in targets:
        cache = CacheConfig(target_psnr_db=target)
        cal, _ = calibration_for(bundle, cache, STEPS, shape, cond.guidance_scale, log=print)
        phase.append(go(f"speca target {target:g} dB", "speca", cache, cal))
    windows = []
    for variant, order, ratio in WINDOW_VARIANTS:
        for start in range(3, STEPS - WINDOW + 1, 6):
            inside = range(start, start + WINDOW)
            extra = {} if order < 2 else {"extrapolation_ratio": ratio}
            cache = CacheConfig(granularity="block", order=order, interval=WINDOW + 1,
                                full_steps=[i for i in range(STEPS) if i not in inside], **extra)
            windows.append({"variant": variant, "order": order, "start": start,
                            **go(f"forecast steps {start}-{start + WINDOW - 1}, {variant}", "taylorseer", cache)})
    return {"model": model, "class": bundle.adapter.model_class, "samples": n, "phase": phase, "windows": windows}


def _markdown(results: list[dict], argv: str) -> str:
    lines = ["# Schedule sensitivity: where the full steps fall", "",
             f"`python benchmarks/schedule_sensitivity.py{argv}` — {STEPS} steps, PSNR on pixels against `full` from "
             "the same seeds (worst sample / mean). NFE = full-model evaluations per sample. CPU; no timing.", ""]
    for r in results:
        lines += [f"## {r['model']} ({r['class']}, {r['samples']} samples)", "",
                  "**Phase** — the same fixed interval with the schedule shifted by one and two steps, next to speca:", "",
                  "| run | NFE | PSNR worst / mean | per sample |", "|---|---|---|---|"]
        for p in r["phase"]:
            lines.append(f"| {p['run']} | {p['nfe']:.1f} | {p['psnr_worst']:.1f} / {p['psnr_mean']:.1f} | "
                         + ", ".join(f"{v:.1f}" for v in p["psnr_per_sample"]) + " |")
        starts = sorted({w["start"] for w in r["windows"]})
        lines += ["", f"**Where a forecast hurts** — full compute except {WINDOW} consecutive block-level forecasts "
                  "from the full steps just before them; worst-sample PSNR:", "",
                  "| forecast | " + " | ".join(f"steps {s}-{s + WINDOW - 1}" for s in starts) + " |",
                  "|---|" + "---|" * len(starts)]
        for variant, _, _ in WINDOW_VARIANTS:
            by = {w["start"]: w for w in r["windows"] if w["variant"] == variant}
            lines.append(f"| {variant} | " + " | ".join(f"{by[s]['psnr_worst']:.1f}" for s in starts) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def argv_suffix(models: list[str], samples: int) -> str:
    """The command-line arguments a results file names (empty for the defaults: every model, 4 samples)."""
    return "" if models == list(MODELS) and samples == 4 else f" --models {' '.join(models)} --samples {samples}"


def write_results(out_dir: str, stem: str, payload: dict, text: str) -> None:
    """``<out_dir>/<stem>.json`` and ``<stem>.md``; the markdown is printed too."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / f"{stem}.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--targets", nargs="+", type=float, default=[30.0, 35.0])
    parser.add_argument("--intervals", nargs="+", type=int, default=[4, 6])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    results = [measure(m, args.samples, args.targets, args.intervals) for m in args.models]
    write_results(args.out, "schedule_sensitivity", {"steps": STEPS, "results": results},
                  _markdown(results, argv_suffix(args.models, args.samples)))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
