"""Which check predicts the damage a forecast does, per unit of cost? (issue: a verifier worth its cost)

On the two tuning models (``dit-shapes``, ``hunyuan-shapes-video``; the held-out model is not used),
the calibration's shadow schedule is run — full steps at the warm-up and every 3rd/5th step, every
speculative step computing the forecast, every candidate check, and the true output at the same
state (not cached) — and each candidate signal is compared with what the forecast really did to
the model output (relative L2 of forecast vs true output):

* the probe block's forecast error with each metric (``rel_l1``, ``rel_l2``, ``cosine``), for the
  first, a middle and the last block as the probe (separate runs, same schedule);
* the error accumulated over the run since the last full step (sum of the probe's rel-L2);
* the calibrated expectation alone (no check at all: ``base[i] · k^growth``, the quality target's
  prediction used to pre-empt or waive checks).

Figures: Spearman rank correlation with the output error (pooled over steps and samples), and the
spread of ``log(output error / (gain[i] · signal))`` after the per-step gain is fitted (what the
quality target books against), next to the probe's cost (its FLOPs over a full forward).

    python benchmarks/verifier_study.py         # writes benchmarks/results/verifier_study.{md,json}
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from specdist.engine.calibration import SHADOW_INTERVALS, _ShadowRule, fit
from specdist.engine.config import CacheConfig
from specdist.engine.decision import forecaster_time
from specdist.engine.hooks import SpeculationHooks
from specdist.engine.speculative import SpeculativeStepper
from specdist.engine.verify import combine_rows, forecast_error
from specdist.generate import job_inputs
from specdist.config import GenerateConfig
from specdist.loading import load_model
from specdist.metrics.flops import flops_breakdown
from specdist.sampling import fresh_scheduler, init_latents, initial_noise, model_dtype, scale_input

MODELS = ("dit-shapes", "hunyuan-shapes-video")
METRICS = ("rel_l1", "rel_l2", "cosine")


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    for r, i in enumerate(order):
        ranks[i] = float(r)
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation of two equally long lists."""
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return num / den if den else float("nan")


def shadow_signals(bundle, granularity: str, probe: int, samples: int, steps: int) -> list[dict]:
    """One shadow run; per speculative step and sample: step, run length, every signal, output error."""
    cfg = CacheConfig(granularity=granularity, order=2, probe_block=probe)
    prompts, labels = job_inputs(GenerateConfig(model=bundle.name, num_samples=samples), bundle)
    cond = bundle.encode(prompts or [""] * samples, labels, bundle.default_guidance, 0).to("cpu", torch.float32)
    shape = bundle.latent_shape(None, None, None)
    noise = initial_noise(shape, list(range(samples)))
    model, adapter = bundle.transformer, bundle.adapter
    dtype = model_dtype(model)
    sched = fresh_scheduler(bundle.scheduler)
    adapter.set_timesteps(sched, steps, tuple(shape), torch.device("cpu"))
    train_t = float(getattr(sched.config, "num_train_timesteps", 1000))
    x = init_latents(sched, noise, torch.device("cpu"))
    guided = cond.uncond_kwargs is not None and cond.guidance_scale > 1.0
    hooks = SpeculationHooks(model, adapter, probe, granularity)
    stepper = SpeculativeStepper(hooks, "speca", cfg, samples, 2 if guided else 1,
                                 rule=_ShadowRule(cfg, steps, samples))
    rows, accumulated = [], torch.zeros(samples)
    try:
        with torch.inference_mode():
            for i, t in enumerate(list(sched.timesteps)):
                x_in = scale_input(sched, x, t).to(dtype)
                call = lambda idx: adapter.predict(model, x_in[idx], t, cond.select(idx)).float()  # noqa: E731
                ftime = forecaster_time(cfg, i, t, train_t)
                full = stepper.rule.must_compute(i, stepper.run_len, stepper._ready())
                out = torch.empty_like(x)
                spec = (~full).nonzero().flatten()
                if len(spec):
                    forecast = stepper._forecast(spec, ftime)
                    plan = hooks.plan("speculate", verify=True, forecast=forecast, start=stepper.start)
                    guess = call(spec) if stepper.uses_probe else None
                    if stepper.lite:
                        guess = forecast["output"][0]
                    names = hooks.verified_features()
                    true_f = torch.cat([s.flatten(1) for n in names for s in plan.recorded[n]], dim=1)
                    pred_f = torch.cat([s.flatten(1) for n in names for s in forecast[n]], dim=1)
                    signals = {m: combine_rows(forecast_error(pred_f, true_f, m), len(spec)) for m in METRICS}
                    hooks.plan("off")
                    true_out = call(spec)
                    oerr = forecast_error(guess, true_out, "rel_l2")
                    accumulated[spec] += signals["rel_l2"]
                    for j, s in enumerate(spec.tolist()):
                        rows.append({"step": i, "k": int(stepper.run_len[s]) + 1, "output": float(oerr[j]),
                                     "accumulated": float(accumulated[s]),
                                     **{m: float(v[j]) for m, v in signals.items()}})
                    out[spec] = guess
                    stepper.run_len[spec] += 1
                redo = full.nonzero().flatten()
                if len(redo):
                    out[redo] = stepper.compute_full(redo, ftime, call)
                    stepper.run_len[redo] = 0
                    accumulated[redo] = 0.0
                x = sched.step(out, t, x, return_dict=False)[0]
    finally:
        hooks.remove()
    return rows


def score(rows: list[dict], signal: str, steps: int) -> dict:
    """Rank correlation with the output error, and the log-spread after a per-step gain fit."""
    obs = [(r["step"], r["k"], r[signal], r["output"]) for r in rows if r[signal] > 0 and r["output"] > 0]
    if signal == "expected":
        gain, base, growth, spread, _ = fit(steps, [(i, k, 1.0, o) for i, k, _, o in obs])
        return {"spearman": spearman([base[i] * k ** growth for i, k, _, _ in obs], [o for *_, o in obs]),
                "log_spread": spread}
    _, _, _, _, gain_spread = fit(steps, obs)
    return {"spearman": spearman([v for _, _, v, _ in obs], [o for *_, o in obs]), "log_spread": gain_spread}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"steps": args.steps, "samples": args.samples, "shadow_intervals": list(SHADOW_INTERVALS), "models": []}
    for name in MODELS:
        bundle = load_model(name, device="cpu")
        n_blocks = len(bundle.adapter.blocks(bundle.transformer))
        shape = bundle.latent_shape(None, None, None)
        prompts, labels = job_inputs(GenerateConfig(model=name, num_samples=1), bundle)
        cond = bundle.encode(prompts or [""], labels, bundle.default_guidance, 0)
        flops = flops_breakdown(bundle.transformer, *bundle.adapter.token_counts(bundle.transformer, shape, cond))
        for granularity in ("block", "output"):
            for probe in (0, n_blocks // 2, n_blocks - 1):
                rows = shadow_signals(bundle, granularity, probe, args.samples, args.steps)
                cost = flops["per_block"][probe] / flops["total"]
                scores = {s: score(rows, s, args.steps) for s in (*METRICS, "accumulated", "expected")}
                results["models"].append({"model": name, "granularity": granularity, "probe_block": probe,
                                          "probe_flops_fraction": cost, "observations": len(rows), "scores": scores})
                print(name, granularity, probe, {k: (round(v["spearman"], 3), round(v["log_spread"], 3))
                                                 for k, v in scores.items()}, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "verifier_study.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# Which check predicts a forecast's damage?", "",
             f"`python benchmarks/verifier_study.py` — {args.steps} steps, {args.samples} samples per model, the "
             f"calibration's shadow schedule (full every {SHADOW_INTERVALS[0]}/{SHADOW_INTERVALS[1]} steps, order-2 "
             "forecasts), true output computed beside every forecast. ρ = Spearman rank correlation of the signal "
             "with the forecast's relative output error; σ = spread of log(output error / (per-step gain × signal)) "
             "— what one check's reading may be off by after calibration (lower is better). `expected` is no check "
             "at all: the calibrated expectation base[i]·k^growth. Probe cost = the probe block's FLOPs over a full "
             "forward. Tuning models only (the held-out model is not used).", "",
             "| model | granularity | probe block | probe cost | " + " | ".join(
                 f"{s} ρ / σ" for s in (*METRICS, "accumulated", "expected")) + " |",
             "|---|---|---|---|" + "---|" * (len(METRICS) + 2)]
    for r in results["models"]:
        cells = " | ".join(f"{r['scores'][s]['spearman']:.2f} / {r['scores'][s]['log_spread']:.2f}"
                           for s in (*METRICS, "accumulated", "expected"))
        lines.append(f"| {r['model']} | {r['granularity']} | {r['probe_block']} | "
                     f"{100 * r['probe_flops_fraction']:.1f}% | {cells} |")
    (out / "verifier_study.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'verifier_study.md'}")


if __name__ == "__main__":
    main()
