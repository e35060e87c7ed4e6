"""Exact speculative sampling (``method: exact``): sequential rounds, evaluations and wall against the
target sampler, and acceptance against the latent dimension (issue 13; DESIGN §2.4).

* **Zoo models** — ``dit-shapes`` with ``DDPMScheduler`` at 50/100/250 steps and
  ``hunyuan-shapes-video`` with the stochastic flow-matching Euler step: for each draft kind
  (frozen target, Taylor order 1; carried as the predicted clean sample ``x0`` or as the raw model
  output) and window (fixed 4, 8; adaptive up to 16), the mean sequential
  rounds per sample (the latency in target calls when a round's L verifications run in parallel),
  target evaluations (the cost), acceptance, and the emulated latency with 1/2/4/8 workers
  (``Σ_rounds ⌈L / workers⌉`` target-call units; **emulation**, not measured on workers). The
  target sampler of the same seeds runs in the same process (rounds = evaluations = steps) for the
  wall-clock row; the local wall of exact mode is one process computing every verification, so it
  is *slower* than the target sampler here — the gain needs parallel verifiers.
* **Acceptance vs dimension** — the closed-form Gaussian-mixture denoiser
  (:mod:`specdist.models.closed_form`) in D = 1 … 4096 with DDPM 100 steps: acceptance and round
  reduction where ``‖Δ‖`` grows like ``√D``.

    python benchmarks/exact.py                 # writes benchmarks/results/exact.{md,json}
    python benchmarks/exact.py --quick         # fewer settings (a smoke run)
    python benchmarks/exact.py --pool          # the local worker pool with an emulated step time → exact_pool.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import diffusers
import torch

from specdist.config import GenerateConfig
from specdist.engine.config import ExactConfig
from specdist.engine.exact import sample_exact, sample_target_chain
from specdist.generate import job_inputs
from specdist.loading import load_model
from specdist.models.closed_form import ClosedFormAdapter, mixture
from specdist.sampling import initial_noise

WORKERS = (1, 2, 4, 8)
VARIANTS = {  # label -> ExactConfig kwargs (the default space is x0)
    "frozen x0, L=4": dict(window=4),
    "frozen output, L=4": dict(window=4, space="output"),
    "taylor1 x0, L=4": dict(window=4, draft="taylor", order=1),
    "frozen x0, L=8": dict(window=8),
    "frozen x0, adaptive<=16": dict(window=4, adaptive=True, max_window=16),
}


def _summary(result: Any, steps: int) -> dict[str, Any]:
    st = result.exact
    rounds = st.sequential_rounds
    rates = [r for r in st.acceptance_rate() if r is not None]
    return {
        "mean_rounds": statistics.fmean(rounds), "worst_rounds": max(rounds),
        "round_reduction": steps / statistics.fmean(rounds),
        "evaluations_ratio": statistics.fmean(st.target_evaluations) / steps,
        "acceptance": statistics.fmean(rates) if rates else None,
        "mean_accepted_run": statistics.fmean(r for rs in st.run_lengths for r in rs),
        "latency_units": {str(w): statistics.fmean(st.latency_units(w)) for w in WORKERS},
        "acceptance_per_step": st.acceptance_per_step(),
        "wall_s": result.wall_s,
    }


def zoo_rows(model: str, steps_list: list[int], samples: int, variants: dict, scheduler: str,
             scheduler_config: dict, log) -> list[dict[str, Any]]:
    """One row per (steps, variant) on ``model`` with ``scheduler``; the target sampler first."""
    bundle = load_model(model, device="cpu", dtype="float32", scheduler=scheduler, scheduler_config=scheduler_config)
    cfg = GenerateConfig(model=model, num_samples=samples)
    prompts, labels = job_inputs(cfg, bundle)
    guidance = bundle.default_guidance
    shape = bundle.latent_shape(None, None, None)
    cond = bundle.encode(prompts or [""] * samples, labels, guidance, 0)
    seeds = list(range(samples))
    noise = initial_noise(shape, seeds)
    args = (bundle.transformer, bundle.adapter, bundle.scheduler, cond, noise)
    dim = int(torch.tensor(shape).prod())
    rows = []
    for steps in steps_list:
        t0 = time.perf_counter()
        target = sample_target_chain(*args, steps, seeds, progress=False)
        rows.append({"model": model, "scheduler": scheduler, "dim": dim, "steps": steps, "variant": "target sampler",
                     "mean_rounds": steps, "worst_rounds": steps, "round_reduction": 1.0, "evaluations_ratio": 1.0,
                     "acceptance": None, "latency_units": {str(w): steps for w in WORKERS},
                     "wall_s": target.wall_s})
        log(f"{model} {steps} steps: target sampler {time.perf_counter() - t0:.1f} s")
        for label, kw in variants.items():
            result = sample_exact(*args, steps, seeds, ExactConfig(**kw), progress=False)
            row = {"model": model, "scheduler": scheduler, "dim": dim, "steps": steps, "variant": label,
                   **_summary(result, steps)}
            rows.append(row)
            log(f"{model} {steps} steps {label}: rounds {row['mean_rounds']:.1f} "
                f"({row['round_reduction']:.2f}x fewer), evals {row['evaluations_ratio']:.2f}x, "
                f"acceptance {row['acceptance']:.2f}, wall {row['wall_s']:.1f} s")
    return rows


DATA_LAWS = {  # label -> mixture() kwargs
    "Gaussian N(0, 0.3² I)": dict(components=1, separation=0.0, std=0.3),
    "2-mixture, ‖μ‖ = 3, std 0.3": dict(components=2, separation=3.0, std=0.3),
}


def dimension_rows(dims: list[int], steps: int, samples: int, log) -> list[dict[str, Any]]:
    """Acceptance and rounds vs D on closed-form data laws (DDPM, frozen x0 draft, L = 4). The
    Gaussian's coordinates are independent, so the draft error is spread over all of them and
    ``‖Δ‖`` grows like ``√D``; the mixture's structure lives in two directions."""
    adapter = ClosedFormAdapter()
    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", clip_sample=False)
    rows = []
    for law, kw in DATA_LAWS.items():
        for dim in dims:
            model = mixture(dim, scheduler=sched, **kw)
            seeds = list(range(samples))
            result = sample_exact(model, adapter, sched, adapter.conditioning(samples), initial_noise((dim,), seeds),
                                  steps, seeds, ExactConfig(window=4), progress=False)
            row = {"law": law, "dim": dim, "steps": steps, **_summary(result, steps)}
            row.pop("acceptance_per_step")
            rows.append(row)
            log(f"{law} D={dim}: acceptance {row['acceptance']:.3f}, rounds {row['mean_rounds']:.1f} "
                f"({row['round_reduction']:.2f}x fewer)")
    return rows


def pool_rows(steps: int, workers_list: list[int], emulate_step_s: float, log) -> list[dict[str, Any]]:
    """Measured wall clock on the runtime's local pool with an emulated step time: dit-shapes, DDPM,
    one sample, frozen x0 draft, L = 4; the target sampler on the same pool (one job per step)."""
    from specdist.config import load_config
    from specdist.runtime.exact_pool import pool_target
    from specdist.runtime.pool import LocalPool
    from specdist.runtime.run import worker_spec
    from specdist.runtime.worker import StepWorker

    bundle = load_model("dit-shapes", device="cpu", dtype="float32", scheduler="DDPMScheduler")
    cfg = load_config(None, ["model=dit-shapes", "num_samples=1", f"steps={steps}",
                             f"runtime.emulate_step_s={emulate_step_s}"])
    prompts, labels = job_inputs(cfg, bundle)
    cond = bundle.encode([""], labels, bundle.default_guidance, 0)
    spec = worker_spec(cfg, prompts, labels, bundle.default_guidance)
    seeds = [0]
    args = (bundle.transformer, bundle.adapter, bundle.scheduler, cond, initial_noise(bundle.latent_shape(None, None,
                                                                                                          None), seeds))
    rows = []
    for workers in [None, *workers_list]:
        worker = StepWorker(bundle.transformer, bundle.adapter, bundle.scheduler, cond, spec)
        pool = LocalPool([worker] * (workers or 1))
        try:
            start = time.perf_counter()
            if workers is None:
                sample_target_chain(*args, steps, seeds, progress=False, target=pool_target(pool))
                row = {"variant": "target sampler", "workers": 1, "rounds": steps}
            else:
                result = sample_exact(*args, steps, seeds, ExactConfig(window=4), progress=False,
                                      target=pool_target(pool))
                row = {"variant": "exact, frozen x0, L=4", "workers": workers,
                       "rounds": result.exact.sequential_rounds[0],
                       "latency_units": result.exact.latency_units(workers)[0]}
            row.update(steps=steps, emulate_step_s=emulate_step_s, wall_s=time.perf_counter() - start,
                       jobs=pool.stats.jobs)
        finally:
            pool.close()
        rows.append(row)
        log(f"pool: {row['variant']} W={row['workers']}: wall {row['wall_s']:.1f} s, jobs {row['jobs']}")
    return rows


def pool_markdown(rows: list[dict], meta: dict) -> str:
    """The committed pool table."""
    base = rows[0]["wall_s"]
    lines = ["# Exact mode on the runtime's local worker pool (emulated step time)", "",
             f"Measured {meta['date']} on {meta['machine']}; command: `{meta['command']}`. dit-shapes, DDPMScheduler, "
             f"{rows[0]['steps']} steps, 1 sample (seed 0). **Emulation**: every model call on a worker also waits "
             f"`runtime.emulate_step_s` = {rows[0]['emulate_step_s']} s (spread over its blocks), standing in for a "
             "big model's step; the workers are threads of one process sharing the zoo model, so the wait "
             "overlaps and the zoo model's own compute does not (2 cores).", "",
             "| sampler | workers | sequential rounds | step jobs | wall s | vs target sampler |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['workers']} | {r['rounds']} | {r['jobs']} | {r['wall_s']:.1f} | "
                     f"{base / r['wall_s']:.2f}x |")
    return "\n".join(lines + [""])


def _fmt(x: Any, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(zoo: list[dict], dims: list[dict], meta: dict) -> str:
    """The committed result table."""
    lines = ["# Exact speculative sampling (`method: exact`)", "",
             f"Measured {meta['date']} on {meta['machine']}; command: `{meta['command']}` "
             f"({meta['wall_s']:.0f} s). {meta['samples']} samples (seeds 0…) per setting.", "",
             "Every exact row is exact in law (tests/test_exact.py checks this statistically on closed-form "
             "problems); *rounds* are sequential target rounds per sample (mean; the latency in target calls "
             "when a round's L verifications run in parallel), *evals* the target evaluations per sample over "
             "the target sampler's (the cost). **Latency with W workers is an emulation**: "
             "Σ_rounds ⌈L/W⌉ target-call units per sample (the target sampler: steps). *Wall (1 proc)* is this "
             "CPU computing every verification in one batched call per round — not the parallel latency.", "",
             "## Zoo models", "",
             "| model | scheduler | steps | draft / window | rounds (worst) | fewer rounds | evals | acceptance | "
             "latency W=1 / 2 / 4 / 8 | wall (1 proc) s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in zoo:
        lat = " / ".join(f"{r['latency_units'][str(w)]:.0f}" for w in WORKERS)
        lines.append(f"| {r['model']} | {r['scheduler']} | {r['steps']} | {r['variant']} | {r['mean_rounds']:.1f} "
                     f"({r['worst_rounds']}) | {r['round_reduction']:.2f}x | {r['evaluations_ratio']:.2f}x | "
                     f"{_fmt(r['acceptance'])} | {lat} | {r['wall_s']:.1f} |")
    lines += ["", "## Acceptance vs latent dimension (closed-form data, exact denoiser, DDPM "
              f"{dims[0]['steps'] if dims else ''} steps, frozen x0 draft, L = 4, 16 samples)", "",
              "| data law | D | acceptance | rounds | fewer rounds | evals |", "|---|---|---|---|---|---|"]
    for r in dims:
        lines.append(f"| {r['law']} | {r['dim']} | {r['acceptance']:.3f} | {r['mean_rounds']:.1f} | "
                     f"{r['round_reduction']:.2f}x | {r['evaluations_ratio']:.2f}x |")
    lines += ["", "Reading: acceptance per step (`acceptance_per_step` in exact.json) is highest early and falls "
              "towards the last steps, where σ_k shrinks faster than the draft error; the dimension rows show "
              "acceptance falling steadily with D (‖Δ‖ grows like √D for a fixed per-coordinate error), not a "
              "cliff, because most steps' per-coordinate error is tiny. Where acceptance is near 0 every round "
              "commits one step and exact mode costs L evaluations per step for no latency gain.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 50 steps, two variants, three dimensions")
    ap.add_argument("--samples", type=int, default=2, help="zoo samples per setting")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--pool", action="store_true", help="only the local-pool rows (emulated step time)")
    ap.add_argument("--render", action="store_true", help="rewrite the markdown from the saved JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.render:  # re-render the tables from the saved measurements (no new runs)
        name = "exact_quick" if args.quick else "exact"
        data = json.loads((Path(args.out) / f"{name}.json").read_text())
        (Path(args.out) / f"{name}.md").write_text(markdown(data["zoo"], data["dimension"], data["meta"]))
        return
    if args.pool:
        rows = pool_rows(100, [1, 2, 4, 8], 0.1, print)
        meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": "the shared 2-core CPU",
                "command": "python benchmarks/exact.py --pool"}
        out = Path(args.out)
        (out / "exact_pool.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (out / "exact_pool.md").write_text(pool_markdown(rows, meta))
        print(f"wrote {out / 'exact_pool.md'} ({time.perf_counter() - start:.0f} s)")
        return
    variants = dict(list(VARIANTS.items())[:2]) if args.quick else VARIANTS
    zoo = zoo_rows("dit-shapes", [50] if args.quick else [50, 100, 250], args.samples, variants, "DDPMScheduler", {},
                   print)
    zoo += zoo_rows("hunyuan-shapes-video", [50], 1, {"frozen x0, L=4": VARIANTS["frozen x0, L=4"]},
                    "FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, print)
    dims = dimension_rows([1, 16, 256] if args.quick else [1, 16, 256, 3072, 16384, 65536], 100, 16, print)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": "the shared 2-core CPU (1 thread)",
            "command": "python benchmarks/exact.py" + (" --quick" if args.quick else ""), "samples": args.samples,
            "wall_s": time.perf_counter() - start}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "exact_quick" if args.quick else "exact"
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "zoo": zoo, "dimension": dims}, indent=1))
    (out / f"{name}.md").write_text(markdown(zoo, dims, meta))
    print(f"wrote {out / name}.md ({meta['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
