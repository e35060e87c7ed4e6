"""Can a quality target be met by *measuring* fixed schedules on a few calibration samples?

An idea tried for issue 10 and not adopted; this script keeps the evidence. For each zoo model,
block-level order-2 forecasts (the default forecaster of ``speca``, run unchecked as
``taylorseer``) on fixed schedules — full steps at the first ``warmup`` steps, then one every
``interval`` — are run on two disjoint seed sets of the same conditioning: the calibration's seeds
(1000…) and the benchmark's (0…). Next to each, the final PSNR that speca's damage model
(:mod:`specdist.engine.target`, the model's calibration) predicts for that schedule. Then, per
target, the schedule a 4-sample measurement would pick (the fewest full steps whose worst
calibration-seed sample reaches target + 1 dB) and what it gives on the benchmark seeds.

    python benchmarks/measured_schedules.py                     # every zoo model, 4 samples
    python benchmarks/measured_schedules.py --models dit-shapes --samples 8

Writes ``benchmarks/results/measured_schedules.{md,json}``. CPU; no timing.
"""

from __future__ import annotations

import argparse

import torch

from specdist.calibrate import calibration_for
from specdist.engine.calibration import CALIBRATION_SEED
from specdist.engine.config import CacheConfig
from specdist.engine.target import TargetRule, psnr_of_budget
from specdist.loading import load_model
from specdist.methods import run_method
from specdist.metrics import compare
from specdist.sampling import initial_noise

from schedule_sensitivity import MODELS, STEPS, argv_suffix, model_inputs, write_results

WARMUPS = (3, 5)
INTERVALS = (2, 3, 4, 5, 6)
MARGIN_DB = 1.0
"""The pick: worst calibration-seed sample at least target + this."""


def full_steps(warmup: int, interval: int) -> set[int]:
    """The full steps of ``taylorseer`` with this warm-up and interval."""
    return {i for i in range(STEPS) if i < warmup or (i - (warmup - 1)) % interval == 0}


def predicted_psnr(cal, target: float, fulls: set[int]) -> float:
    """speca's damage model on a fixed schedule: ``Σ damage[i] · base[i] · k^growth`` over the
    forecast steps (``k``: steps since the last full one), as the rule books it."""
    rule = TargetRule(CacheConfig(target_psnr_db=target), STEPS, 1, cal)
    k, total = 0, 0.0
    for i in range(STEPS):
        k = 0 if i in fulls else k + 1
        total += 0.0 if k == 0 else rule.damage[i] * cal.base[i] * k ** cal.growth
    return psnr_of_budget(total)


def measure(model: str, n: int, targets: list[float]) -> dict:
    """Every schedule on both seed sets, and the damage model's prediction (module doc)."""
    bundle = load_model(model)
    cond = model_inputs(bundle, n)
    shape = bundle.latent_shape(None, None, None)
    seed_sets = {"calibration": [CALIBRATION_SEED + s for s in range(n)], "benchmark": list(range(n))}
    cal, _ = calibration_for(bundle, CacheConfig(target_psnr_db=targets[0]), STEPS, shape, cond.guidance_scale,
                             log=print)
    refs = {name: bundle.decode(run_method("full", bundle.transformer, bundle.adapter, bundle.scheduler, cond,
                                           initial_noise(shape, seeds), STEPS, desc=f"{model} full {name}").latents)
            for name, seeds in seed_sets.items()}
    rows = []
    for warmup in WARMUPS:
        for interval in INTERVALS:
            row = {"warmup": warmup, "interval": interval, "nfe": len(full_steps(warmup, interval)),
                   "predicted_db": {f"{t:g}": predicted_psnr(cal, t, full_steps(warmup, interval)) for t in targets}}
            for name, seeds in seed_sets.items():
                res = run_method("taylorseer", bundle.transformer, bundle.adapter, bundle.scheduler, cond,
                                 initial_noise(shape, seeds), STEPS,
                                 cache=CacheConfig(granularity="block", order=2, interval=interval, warmup=warmup),
                                 desc=f"{model} w{warmup} i{interval} {name}")
                q = compare(bundle.decode(res.latents), refs[name])["psnr_db"]
                row[name] = {"worst": q["worst"], "mean": q["mean"], "per_sample": q["per_sample"]}
            rows.append(row)
    picks = []
    for t in targets:
        ok = [r for r in rows if r["calibration"]["worst"] >= t + MARGIN_DB]
        pick = min(ok, key=lambda r: (r["nfe"], r["warmup"])) if ok else None
        picks.append({"target": t, "pick": None if pick is None else
                      {k: pick[k] for k in ("warmup", "interval", "nfe")},
                      "calibration_worst": None if pick is None else pick["calibration"]["worst"],
                      "benchmark_worst": None if pick is None else pick["benchmark"]["worst"]})
    return {"model": model, "class": bundle.adapter.model_class, "samples": n, "rows": rows, "picks": picks}


def _markdown(results: list[dict], targets: list[float], argv: str) -> str:
    lines = ["# Measured fixed schedules: calibration seeds, benchmark seeds, the damage model", "",
             f"`python benchmarks/measured_schedules.py{argv}` — {STEPS} steps, block-level order-2 forecasts "
             "(unchecked), PSNR on pixels against `full` from the same seeds (worst / mean). Calibration seeds "
             f"{CALIBRATION_SEED}…, benchmark seeds 0…, the same conditioning. Predicted: speca's damage model for that "
             "schedule. CPU; no timing.", ""]
    for r in results:
        lines += [f"## {r['model']} ({r['class']}, {r['samples']} samples per seed set)", "",
                  "| warm-up | interval | NFE | calibration seeds | benchmark seeds | predicted ("
                  + " / ".join(f"{t:g}" for t in targets) + " dB damage level) |", "|---|---|---|---|---|---|"]
        for row in r["rows"]:
            c, b = row["calibration"], row["benchmark"]
            lines.append(f"| {row['warmup']} | {row['interval']} | {row['nfe']} | {c['worst']:.1f} / {c['mean']:.1f} | "
                         f"{b['worst']:.1f} / {b['mean']:.1f} | "
                         + ", ".join(f"{row['predicted_db'][f'{t:g}']:.1f}" for t in targets) + " |")
        lines += ["", f"The pick (fewest full steps with worst calibration-seed sample ≥ target + {MARGIN_DB:g} dB):", ""]
        for p in r["picks"]:
            if p["pick"] is None:
                lines.append(f"- {p['target']:g} dB: no schedule qualifies")
            else:
                s = p["pick"]
                lines.append(f"- {p['target']:g} dB: warm-up {s['warmup']}, interval {s['interval']} ({s['nfe']} full "
                             f"steps): worst {p['calibration_worst']:.1f} dB on the calibration seeds, "
                             f"**{p['benchmark_worst']:.1f} dB** on the benchmark seeds")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--targets", nargs="+", type=float, default=[30.0, 35.0, 40.0])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    results = [measure(m, args.samples, args.targets) for m in args.models]
    write_results(args.out, "measured_schedules", {"steps": STEPS, "results": results},
                  _markdown(results, args.targets, argv_suffix(args.models, args.samples)))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
