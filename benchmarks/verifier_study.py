"""Which check predicts the *final* damage a forecast does, per unit of cost? (issue 10: a verifier worth its cost)

A check is worth its cost when its reading ranks forecasts by the damage they do to the finished
sample — not only by how far the forecast is off at its own step. This measures it directly.
Per zoo model, ``--samples`` seeds from the same conditioning, block-level order-2 forecasts (the
engine's defaults): for each window of two consecutive forecasts (steps ``j, j+1``, ``j`` every
3rd step from the warm-up on), everything else computed fully, every forecast accepted. Each
window run gives, per sample:

* **the final damage**: RMS error of the decoded output against ``full`` from the same seed (pixels
  in [-1, 1]; PSNR = 20 log10(2 / RMS));
* **the checks' readings** at the two forecast steps, each run separately so every check sees the
  same window: the probe block's forecast error (rel-L2, the default) with the last block (the
  default), the first and a middle block as the probe, and with the metrics rel-L1 and cosine;
  the error *accumulated* over the window (the sum of both readings);
* **the calibrated predictions** of the quality target (``specdist.engine.target``): the reading
  mapped to final damage (``coef · propagation · gain · error`` per step, summed), and the
  expectation *without* any check (``coef · propagation · base · k^growth``: where in the trajectory
  a forecast hurts, as calibrated on other seeds);
* **an oracle**: the latent error the window really injected (state after the window vs the full
  trajectory's) — what a perfect check of the immediate damage would read, at the cost of a full call.

And whether damage adds up: one more run forecasts every window at once (the windows tile a
fixed-interval-3 schedule), against the sum and the root sum of squares of the windows' damages alone.

Figures (Spearman rank correlation with the final damage):

* *pooled* — over every (window, sample);
* *across steps* — per sample, over its windows, averaged (does the check find *where* forecasts hurt?);
* *across samples* — per window, over its samples, averaged, and how often the check's largest
  reading is the sample that ends most damaged (chance: 1 / samples) — what per-sample decisions need.

The default run uses the two tuning models; ``wan-shapes`` is reported separately, as held out.

    python benchmarks/verifier_study.py                     # writes benchmarks/results/verifier_study.{md,json}
    python benchmarks/verifier_study.py --models dit-shapes --samples 8
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from schedule_sensitivity import model_inputs, write_results
from tqdm import tqdm

from specdist.calibrate import calibration_for
from specdist.engine.config import CacheConfig
from specdist.engine.speculative import sample_cached
from specdist.engine.target import budget_for
from specdist.env import environment
from specdist.loading import load_model
from specdist.metrics.flops import block_flops, forward_flops
from specdist.sampling import initial_noise, sample_full

MODELS = ("dit-shapes", "hunyuan-shapes-video", "wan-shapes")
HELD_OUT = ("wan-shapes",)
STEPS = 50
WINDOW = 2
WARMUP = 3
TARGET_DB = 35.0
"""The calibrated predictions are read at this quality target's damage level."""
PROBES = (("last block, rel-L2 (default)", "last", "rel_l2"), ("first block, rel-L2", "first", "rel_l2"),
          ("middle block, rel-L2", "middle", "rel_l2"), ("last block, rel-L1", "last", "rel_l1"),
          ("last block, cosine", "last", "cosine"))
"""(label, probe block, metric) of each check, each measured in its own window runs."""


def _ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (ties: average ranks); NaN when either side is constant."""
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx, sy = math.sqrt(sum((a - mx) ** 2 for a in rx)), math.sqrt(sum((b - my) ** 2 for b in ry))
    return sxy / (sx * sy) if sx > 0 and sy > 0 else float("nan")


def _rms(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return (a.double() - b.double()).flatten(1).pow(2).mean(dim=1).sqrt().tolist()


def _forecast_at(run: tuple, forecast: set[int], on_latents=None, **knobs):
    """Block-level ``speca`` that forecasts exactly the steps ``forecast`` (each accepted, its check
    still read) and computes every other step fully."""
    cfg = CacheConfig(granularity="block", tau0=1.0, warmup=WARMUP, max_run=WINDOW,
                      full_steps=[i for i in range(STEPS) if i not in forecast], **knobs)
    return sample_cached(*run, "speca", cfg, progress=False, threshold_fn=lambda i: math.inf, on_latents=on_latents)


def _window_run(run: tuple, j: int, probe: int, metric: str) -> tuple[list[list[float]], torch.Tensor, torch.Tensor]:
    """(readings [samples][WINDOW], latents after the window, final latents) of one window run."""
    after = {}
    res = _forecast_at(run, set(range(j, j + WINDOW)), probe_block=probe, metric=metric,
                       on_latents=lambda i, x: after.setdefault("x", x.float().cpu()) if i == j + WINDOW - 1 else None)
    readings = [[float(e[i]) for i in range(j, j + WINDOW)] for e in res.stats.errors]
    return readings, after["x"], res.latents


def measure(model: str, n: int, windows: list[int]) -> dict:
    """Every window run of one model (see the module doc)."""
    bundle = load_model(model)
    cond = model_inputs(bundle, n)
    shape = bundle.latent_shape(None, None, None)
    run = (bundle.transformer, bundle.adapter, bundle.scheduler, cond, initial_noise(shape, list(range(n))), STEPS)
    states = {}
    full = sample_full(*run, progress=False, on_step=lambda i, t, x: states.__setitem__(i, x.float().cpu()))
    ref = bundle.decode(full.latents)
    cal, _ = calibration_for(bundle, CacheConfig(target_psnr_db=TARGET_DB), STEPS, shape, cond.guidance_scale,
                             log=print, progress=False)
    weight = [c * p for c, p in zip(cal.coef, cal.propagation_at(budget_for(TARGET_DB)))]
    blocks = len(bundle.adapter.blocks(bundle.transformer))
    probe_index = {"last": blocks - 1, "first": 0, "middle": blocks // 2}
    tokens = bundle.adapter.token_counts(bundle.transformer, shape, cond)
    per_block = block_flops(bundle.transformer, *tokens)
    total = forward_flops(bundle.transformer, *tokens)
    rows = []  # one per (window, sample)
    readings: dict[str, list[list[float]]] = {label: [] for label, *_ in PROBES}
    bar = tqdm(total=len(windows) * len(PROBES), desc=f"{model} verifier study", leave=False)
    for j in windows:
        expect = sum(weight[i] * cal.base[i] * (k + 1) ** cal.growth for k, i in enumerate(range(j, j + WINDOW)))
        for label, probe, metric in PROBES:
            read, after, final = _window_run(run, j, probe_index[probe], metric)
            readings[label].extend(read)
            if label == PROBES[0][0]:  # the default check's run also gives the damage and the oracle
                damage = _rms(bundle.decode(final), ref)
                injected = _rms(after, states[j + WINDOW - 1])
                for s in range(n):
                    booked = sum(weight[i] * cal.gain[i] * e for i, e in zip(range(j, j + WINDOW), read[s]))
                    rows.append({"window": j, "sample": s, "damage": damage[s], "psnr_db": _psnr(damage[s]),
                                 "injected": injected[s], "calibrated_expectation": expect,
                                 "calibrated_from_reading": booked})
            bar.update()
    bar.close()
    composition = _composition(bundle, run, ref, windows, rows, n)
    signals: dict[str, tuple[list[float], float]] = {}
    probe_cost = per_block[-1] / total
    for label, probe, _ in PROBES:
        cost = per_block[probe_index[probe]] / total
        signals[f"{label}, first step"] = ([r[0] for r in readings[label]], cost)
        if label == PROBES[0][0]:
            signals["last block, rel-L2, accumulated over the window"] = ([sum(r) for r in readings[label]], cost)
    signals["calibrated: reading → final damage (default check)"] = ([r["calibrated_from_reading"] for r in rows],
                                                                     probe_cost)
    signals["calibrated expectation, no check"] = ([r["calibrated_expectation"] for r in rows], 0.0)
    signals["oracle: latent error injected by the window"] = ([r["injected"] for r in rows], 1.0)
    damage = [r["damage"] for r in rows]
    figures = [{"signal": name, "cost": cost, **_figures(values, damage, rows, n)} for name, (values, cost) in signals.items()]
    return {"model": model, "class": bundle.adapter.model_class, "samples": n, "windows": windows,
            "held_out": model in HELD_OUT, "figures": figures, "rows": rows, "composition": composition,
            "worst": sorted(rows, key=lambda r: -r["damage"])[:5],
            "readings": readings}


def _psnr(rms: float) -> float:
    return 20 * math.log10(2 / rms)


def _composition(bundle, run: tuple, ref: torch.Tensor, windows: list[int], rows: list[dict], n: int) -> dict:
    """Do the windows' damages add up? Every window forecast in one run (the windows tile a
    fixed-interval-3 schedule) against the sum (linear) and the root of the sum of squares
    (independent errors) of the damages the same windows did alone, per sample."""
    forecast = {i for j in windows for i in range(j, j + WINDOW)}
    res = _forecast_at(run, forecast)
    together = _rms(bundle.decode(res.latents), ref)
    alone = [[r["damage"] for r in rows if r["sample"] == s] for s in range(n)]
    return {"full_steps": STEPS - len(forecast),
            "together_psnr_db": [_psnr(d) for d in together],
            "linear_psnr_db": [_psnr(sum(a)) for a in alone],
            "independent_psnr_db": [_psnr(math.sqrt(sum(x * x for x in a))) for a in alone],
            "worst_window_psnr_db": [_psnr(max(a)) for a in alone]}


def _mean(xs: list[float]) -> float:
    """Mean of the defined values (NaN: a constant signal there); NaN when none is."""
    defined = [x for x in xs if not math.isnan(x)]
    return statistics.fmean(defined) if defined else float("nan")


def _figures(values: list[float], damage: list[float], rows: list[dict], n: int) -> dict:
    """Pooled, across-steps and across-samples rank correlations of one signal with the damage."""
    by_sample = [spearman([values[k] for k, r in enumerate(rows) if r["sample"] == s],
                          [damage[k] for k, r in enumerate(rows) if r["sample"] == s]) for s in range(n)]
    by_window, hits = [], []
    for j in sorted({r["window"] for r in rows}):
        idx = [k for k, r in enumerate(rows) if r["window"] == j]
        by_window.append(spearman([values[k] for k in idx], [damage[k] for k in idx]))
        top = [k for k in idx if values[k] == max(values[m] for m in idx)]  # ties: a random pick among them
        hits.append(len(top) and (max(idx, key=lambda k: damage[k]) in top) / len(top))
    return {"pooled": spearman(values, damage), "across_steps": _mean(by_sample), "across_samples": _mean(by_window),
            "worst_sample_found": sum(hits) / len(hits)}


def _markdown(results: list[dict], argv: str, env: dict) -> str:
    lines = ["# Which check predicts the final damage? (verifier study)", "",
             f"`python benchmarks/verifier_study.py{argv}` — {STEPS} steps, block-level order-2 forecasts; per window "
             f"of {WINDOW} forecasts (steps j, j+1; j every 3rd step from {WARMUP}), everything else computed fully. "
             "Spearman rank correlation of each signal with the final damage (RMS of the decoded output against "
             "`full` from the same seed): pooled over (window, sample); across steps (per sample, over its windows, "
             "averaged); across samples (per window, over its samples, averaged), and how often the signal's largest "
             "reading in a window is the sample that ends most damaged. Cost: the check's FLOPs over a full forward "
             f"(calibrated predictions at the {TARGET_DB:g} dB target's damage level, calibration seeds 1000…, "
             f"benchmark seeds 0…). Machine: {env['platform']}, {env['cpu_count']} CPU cores, device {env['device']}, "
             f"torch {env['torch']}, diffusers {env['diffusers']}; nothing is timed or emulated.", ""]
    for r in results:
        tag = " — **held out** (no choice was made on it)" if r["held_out"] else ""
        lines += [f"## {r['model']} ({r['class']}, {r['samples']} samples, {len(r['windows'])} windows){tag}", "",
                  "| signal | cost | pooled | across steps | across samples | worst sample found |",
                  "|---|---|---|---|---|---|"]
        for f in r["figures"]:
            corr = lambda x: "—" if math.isnan(x) else f"{x:+.2f}"  # —: the signal is constant there
            lines.append(f"| {f['signal']} | {f['cost']:.3f} | {corr(f['pooled'])} | {corr(f['across_steps'])} | "
                         f"{corr(f['across_samples'])} | {100 * f['worst_sample_found']:.0f}% |")
        c = r["composition"]
        lines += ["", f"Do the damages add up? All {len(r['windows'])} windows forecast in one run ({c['full_steps']} full "
                  "steps; the default windows tile a fixed interval of 3) against what the same windows did alone, per sample (PSNR, dB):", "",
                  "| sample | all windows together (measured) | sum of the damages alone | root sum of squares "
                  "(independent) | the worst window alone |", "|---|---|---|---|---|"]
        for s in range(r["samples"]):
            lines.append(f"| {s} | {c['together_psnr_db'][s]:.1f} | {c['linear_psnr_db'][s]:.1f} | "
                         f"{c['independent_psnr_db'][s]:.1f} | {c['worst_window_psnr_db'][s]:.1f} |")
        worst = ", ".join(f"window {w['window']}–{w['window'] + WINDOW - 1} sample {w['sample']}: {w['psnr_db']:.1f} dB"
                          for w in r["worst"])
        lines += ["", f"Most damaging (window, sample): {worst}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    windows = list(range(WARMUP, STEPS - WINDOW + 1, 3))
    results = [measure(m, args.samples, windows) for m in args.models]
    argv = "" if args.models == list(MODELS) and args.samples == 4 else \
        f" --models {' '.join(args.models)} --samples {args.samples}"
    env = environment()
    write_results(args.out, "verifier_study", {"steps": STEPS, "window": WINDOW, "environment": env, "results": results},
                  _markdown(results, argv, env))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
