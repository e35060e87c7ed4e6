"""Does the quality target hold on the worst of more samples, and what do more calibration samples buy?

``speca``'s controller is calibrated on ``cache.calibration_samples`` samples (seeds 1000…); its
promise is about the *worst* sample of a generation. A calibration sees how forecast damage
propagates on its own few samples only (``propagation``: the largest over them), so a generation
with a sample harder than every calibration sample can end below the target. This measures it:
per zoo model, per quality target and per calibration size, ``speca`` on ``--samples`` seeds
(0 …) against ``full`` from the same seeds; NFE = full evaluations per sample (every rollback
included), PSNR on pixels (worst / mean), the miss (worst − target), and per calibration the
spread of the per-sample propagation factor κ (final damage over injected damage) it saw and its
cost (wall time of the calibration on this machine, two full generations of its samples plus the
shadow run's speculative calls; reused calibrations show the cost recorded when they were made).

    python benchmarks/calibration_samples.py                       # every zoo model, 8 seeds
    python benchmarks/calibration_samples.py --models dit-shapes --calibration-samples 4 8 12

Writes ``benchmarks/results/calibration_samples.{md,json}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

from schedule_sensitivity import MODELS, STEPS, model_inputs, write_results

from specdist.calibrate import calibration_for
from specdist.engine.config import CacheConfig
from specdist.loading import load_model
from specdist.methods import run_method
from specdist.metrics import compare
from specdist.sampling import initial_noise


def measure(model: str, n: int, targets: list[float], sizes: list[int]) -> dict:
    """Every run of one model (see the module doc)."""
    bundle = load_model(model)
    cond = model_inputs(bundle, n)
    shape = bundle.latent_shape(None, None, None)
    run = (bundle.transformer, bundle.adapter, bundle.scheduler, cond, initial_noise(shape, list(range(n))), STEPS)
    ref = bundle.decode(run_method("full", *run, desc=f"{model} full").latents)
    rows = []
    for size in sizes:
        for target in targets:
            cache = CacheConfig(target_psnr_db=target, calibration_samples=size)
            cal, info = calibration_for(bundle, cache, STEPS, shape, cond.guidance_scale, log=print)
            res = run_method("speca", *run, cache=cache, calibration=cal, desc=f"{model} speca {target:g} dB, "
                                                                                f"{size} calibration samples")
            q = compare(bundle.decode(res.latents), ref)["psnr_db"]
            per = res.stats.per_sample()
            kappa = cal.meta.get("kappa_per_sample", [])
            rows.append({"calibration_samples": size, "target_psnr_db": target,
                         "nfe": sum(p["full_steps"] for p in per) / len(per),
                         "psnr_worst": q["worst"], "psnr_mean": q["mean"], "psnr_per_sample": q["per_sample"],
                         "miss_db": q["worst"] - target, "kappa_min": min(kappa, default=None),
                         "kappa_max": max(kappa, default=None),
                         "kappa_median": statistics.median(kappa) if kappa else None,
                         "calibration": dataclasses.asdict(info), "calibration_cost_s": cal.meta.get("cost_s")})
    return {"model": model, "class": bundle.adapter.model_class, "samples": n, "rows": rows}


def _markdown(results: list[dict], argv: str) -> str:
    lines = ["# Quality targets on the worst of more samples: calibration size", "",
             f"`python benchmarks/calibration_samples.py{argv}` — {STEPS} steps, `speca` to a quality target (everything "
             "else at defaults) against `full` from the same seeds; PSNR on pixels (worst / mean); NFE = full "
             "evaluations per sample; miss = worst − target (≥ −2 dB keeps the issue's promise); κ = a calibration "
             "sample's final damage over the damage its forecasts injected (min / median / max over the calibration's "
             "samples); cost = the calibration's wall time when it was made (2-core CPU). No timing of the runs.", ""]
    for r in results:
        lines += [f"## {r['model']} ({r['class']}, {r['samples']} seeds)", "",
                  "| calibration samples | target | NFE | PSNR worst / mean | miss | κ min / median / max | "
                  "calibration cost | per sample |", "|---|---|---|---|---|---|---|---|"]
        for x in r["rows"]:
            kappa = (f"{x['kappa_min']:.2f} / {x['kappa_median']:.2f} / {x['kappa_max']:.2f}"
                     if x["kappa_min"] is not None else "—")
            lines.append(f"| {x['calibration_samples']} | {x['target_psnr_db']:g} dB | {x['nfe']:.1f} | "
                         f"{x['psnr_worst']:.1f} / {x['psnr_mean']:.1f} | {x['miss_db']:+.1f} | {kappa} | "
                         f"{x['calibration_cost_s']:.0f} s | " + ", ".join(f"{v:.1f}" for v in x["psnr_per_sample"])
                         + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--targets", nargs="+", type=float, default=[30.0, 35.0])
    parser.add_argument("--calibration-samples", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    results = [measure(m, args.samples, args.targets, args.calibration_samples) for m in args.models]
    defaults = vars(parser.parse_args([]))
    default = all(getattr(args, k) == v for k, v in defaults.items() if k != "out")
    argv = "" if default else (f" --models {' '.join(args.models)} --samples {args.samples} --targets "
                               f"{' '.join(f'{t:g}' for t in args.targets)} --calibration-samples "
                               f"{' '.join(map(str, args.calibration_samples))}")
    write_results(args.out, "calibration_samples", {"steps": STEPS, "results": results}, _markdown(results, argv))


if __name__ == "__main__":
    main()
