"""Distributed runtime benchmark: latency vs workers and throughput mode, on real Ray actors.

    python benchmarks/distributed.py                    # ~25 min on 2 CPU cores
    python benchmarks/distributed.py --workers 1 2 4    # a quicker subset

Every run here is **emulated**: each full model call of the zoo video model also waits
``--emulate-step-s`` (default 2 s; throughput mode ``--throughput-emulate-step-s``, 0.5 s) spread over its blocks (cancellable between blocks), standing
in for a big model's step (HunyuanVideo 720p×129f takes 31.8 s per step on one H100, DESIGN §1).
The coordinator, the Ray actors, the placement group, the tensor transport (torch_gloo) and the
cancellations are all real. One Ray cluster serves the whole benchmark; each run starts its own
actors.

Latency mode (one generation, 1 sample): the baseline is ``method=full`` on one worker, measured
in the same run. For each worker count: wall-clock, speedup, the target
``0.8 × min(workers, mean steps per window)`` (mean accepted run + 1), acceptance, cancelled and
wasted work, bytes moved per step, coordinator overhead per step (as a share of the emulated
step), and PSNR/SSIM of the output against the full-compute output from the same seed.

Throughput mode (8 generations, each run by one worker with the single-device ``speca`` engine):
generations per hour against the same workload with ``method=full``.

Results: ``benchmarks/results/distributed.{md,json}`` and ``distributed.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from specdist.config import load_config  # noqa: E402
from specdist.env import environment  # noqa: E402
from specdist.generate import job_inputs  # noqa: E402
from specdist.loading import load_model  # noqa: E402
from specdist.metrics import compare  # noqa: E402
from specdist.runtime.report import mean_accepted_run  # noqa: E402
from specdist.runtime.run import run_distributed  # noqa: E402
from specdist.sampling import initial_noise  # noqa: E402

OUT = Path(__file__).parent / "results"


def _job(model: str, steps: int, samples: int, overrides: list[str]):
    cfg = load_config(None, [f"model={model}", f"steps={steps}", f"num_samples={samples}", "runtime.backend=ray",
                             *overrides])
    bundle = load_model(cfg.model)
    prompts, labels = job_inputs(cfg, bundle)
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else bundle.default_guidance
    noise = initial_noise(bundle.latent_shape(None, None, None), [cfg.seed + i for i in range(samples)])
    return cfg, bundle, prompts, labels, guidance, noise


def _run(model: str, steps: int, samples: int, overrides: list[str]):
    cfg, bundle, prompts, labels, guidance, noise = _job(model, steps, samples, overrides)
    t0 = time.perf_counter()
    run = run_distributed(cfg, bundle, noise, prompts, labels, guidance, progress=False, log=lambda m: None)
    return run, time.perf_counter() - t0, bundle


def latency_rows(args) -> list[dict]:
    common = [f"runtime.emulate_step_s={args.emulate_step_s}", "runtime.mode=latency",
              f"runtime.lookahead={args.lookahead}", f"cache.tau0={args.tau}", "cache.beta=1.0"]
    full, _, bundle = _run(args.model, args.steps, 1, [*common, "method=full", "runtime.workers=1"])
    ref_pixels = bundle.decode(full.latents)
    base = full.stats.wall_s
    rows = [_latency_row("full", 1, full, base, ref_pixels, bundle, args)]
    print(f"full, 1 worker: {base:.1f}s", flush=True)
    for w in args.workers:
        run, _, _ = _run(args.model, args.steps, 1, [*common, "method=speca", f"runtime.workers={w}"])
        rows.append(_latency_row("speca", w, run, base, ref_pixels, bundle, args))
        print(f"speca, {w} workers: {run.stats.wall_s:.1f}s ({base / run.stats.wall_s:.2f}x)", flush=True)
    return rows


def _latency_row(method, workers, run, base, ref_pixels, bundle, args) -> dict:
    s, pool = run.stats, run.stats.extra.get("pool", {})
    d = run.decisions[0]
    windows = run.closed_at[0]
    per_window = (sum(windows) / len(windows)) if windows else 1.0
    q = compare(bundle.decode(run.latents), ref_pixels)
    steps = args.steps
    return {
        "method": method,
        "workers": workers,
        "wall_s": round(s.wall_s, 2),
        "speedup": round(base / s.wall_s, 3),
        "target": round(0.8 * min(workers, per_window), 3) if method == "speca" else None,
        "critical_path_full_steps": run.anchors[0],
        "accepted": d.count("A"),
        "rejected": d.count("R"),
        "acceptance": round(d.count("A") / max(d.count("A") + d.count("R"), 1), 3),
        "mean_accepted_run": round(mean_accepted_run(d), 3),
        "mean_steps_per_window": round(per_window, 3),
        "jobs": s.jobs_submitted,
        "jobs_cancelled": s.jobs_cancelled,
        "jobs_stale": s.jobs_stale,
        "wasted_compute_s": round(s.wasted_compute_s, 2),
        "bytes_moved_per_step": int((pool.get("bytes_to_workers", 0) + pool.get("bytes_from_workers", 0)) / steps),
        "coordinator_ms_per_step": round(1000 * s.coordinator_s / steps, 3),
        "coordinator_share_of_step": round(s.coordinator_s / steps / args.emulate_step_s, 5),
        "psnr_db": q["psnr_db"]["mean"] if isinstance(q["psnr_db"]["mean"], str) else round(q["psnr_db"]["mean"], 2),
        "ssim": round(q["ssim"]["mean"], 4),
        "decisions": d,
    }


def throughput_rows(args) -> list[dict]:
    rows = []
    common = [f"runtime.emulate_step_s={args.throughput_emulate_step_s}", "runtime.mode=throughput",
              f"cache.tau0={args.throughput_tau}"]
    for method, workers in [("full", 1), *[("speca", w) for w in args.throughput_workers], ("full", max(args.throughput_workers))]:
        run, _, _ = _run(args.model, args.steps, args.generations, [*common, f"method={method}", f"runtime.workers={workers}"])
        per_hour = args.generations / run.stats.wall_s * 3600
        rows.append({"method": method, "workers": workers, "generations": args.generations,
                     "wall_s": round(run.stats.wall_s, 2), "generations_per_hour": round(per_hour, 1),
                     "nfe_per_generation": round(sum(run.nfe) / len(run.nfe), 2)})
        print(f"throughput {method} x{workers}: {per_hour:.0f} gen/h", flush=True)
    base = rows[0]["generations_per_hour"]
    for r in rows:
        r["vs_full_1_worker"] = round(r["generations_per_hour"] / base, 2)
    return rows


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed.json").write_text(json.dumps(results, indent=2) + "\n")
    a, env = results["args"], results["environment"]
    lines = [
        "# Distributed runtime: latency and throughput (emulated step time)",
        "",
        f"Machine: {env['cpu_count']} CPU cores, no GPU; torch {env['torch']}, diffusers {env['diffusers']}, "
        f"ray {env['ray']}. Model `{a['model']}`, {a['steps']} steps, guidance on.",
        "",
        f"**Emulated**: every full model call also waits {a['emulate_step_s']} s in latency mode and "
        f"{a['throughput_emulate_step_s']} s in throughput mode (`runtime.emulate_step_s`), spread over its blocks and "
        "cancellable between them. The real model's own compute comes on top: ~0.3 s per call on one CPU thread, "
        "and with more than two workers computing at once the 2 cores are shared, so real compute does not "
        "parallelise beyond 2 workers here. Coordinator, Ray actors (one per worker, placement group), tensor "
        "transport (torch_gloo collective group) and cancellations are real.",
        *([f"Throughput rows: {results['throughput_source']}."] if results.get("throughput_source") else []),
        "",
        f"Reproduce: `python benchmarks/distributed.py` (latency: speca τ = {a['tau']} constant, lookahead "
        f"{a['lookahead']}, adaptive).",
        "",
        "## Latency mode (one generation)",
        "",
        "Speedup is against `full` on one worker in the same run. Target = 0.8 × min(workers, mean steps per "
        "window), where steps per window = accepted run + 1. Quality is against that `full` output.",
        "",
        "| method | workers | wall s | speedup | target | critical path (full steps) | acceptance | mean accepted run "
        "| steps/window | jobs | cancelled | stale | wasted s | bytes/step | coordinator ms/step (share of step) "
        "| PSNR dB | SSIM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["latency"]:
        target = "" if r["target"] is None else f"{r['target']:.2f}×"
        lines.append(
            f"| {r['method']} | {r['workers']} | {r['wall_s']} | {r['speedup']:.2f}× | {target} | "
            f"{r['critical_path_full_steps']} | {r['acceptance']:.2f} | {r['mean_accepted_run']:.2f} | "
            f"{r['mean_steps_per_window']:.2f} | {r['jobs']} | {r['jobs_cancelled']} | {r['jobs_stale']} | "
            f"{r['wasted_compute_s']} | {r['bytes_moved_per_step']} | {r['coordinator_ms_per_step']:.2f} "
            f"({100 * r['coordinator_share_of_step']:.2f}%) | {r['psnr_db']} | {r['ssim']} |")
    lines += [
        "",
        "## Throughput mode (many generations share the pool)",
        "",
        f"{a['generations']} generations; each worker runs whole generations with the single-device engine "
        f"(speca τ0 = {a['throughput_tau']}, the engine's default schedule otherwise).",
        "",
        "| method | workers | wall s | generations/hour | vs full on 1 worker | full evaluations per generation |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["throughput"]:
        lines.append(f"| {r['method']} | {r['workers']} | {r['wall_s']} | {r['generations_per_hour']} | "
                     f"{r['vs_full_1_worker']}× | {r['nfe_per_generation']} |")
    (out / "distributed.md").write_text("\n".join(lines) + "\n")
    spec = [r for r in results["latency"] if r["method"] == "speca"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ws = [r["workers"] for r in spec]
    ax[0].plot(ws, [r["speedup"] for r in spec], "o-", label="speca (measured)")
    ax[0].plot(ws, [r["target"] for r in spec], "s--", label="target 0.8·min(W, steps/window)")
    ax[0].plot(ws, ws, ":", color="grey", label="linear")
    ax[0].set_xscale("log", base=2)
    ax[0].set_xlabel("workers")
    ax[0].set_ylabel("latency speedup vs full on 1 worker")
    ax[0].set_title(f"latency (emulated {a['emulate_step_s']} s/step)")
    ax[0].legend(fontsize=8)
    tp = results["throughput"]
    ax[1].bar([f"{r['method']}\n×{r['workers']}" for r in tp], [r["generations_per_hour"] for r in tp])
    ax[1].set_ylabel("generations / hour")
    ax[1].set_title(f"throughput mode ({a['throughput_emulate_step_s']} s/step emulated)")
    fig.tight_layout()
    fig.savefig(out / "distributed.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hunyuan-shapes-video")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--throughput-workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--emulate-step-s", type=float, default=2.0, help="latency mode")
    p.add_argument("--throughput-emulate-step-s", type=float, default=0.5)
    p.add_argument("--reuse-throughput", type=Path, default=None,
                   help="take the throughput rows from this earlier distributed.json instead of rerunning them")
    p.add_argument("--tau", type=float, default=0.05)
    p.add_argument("--throughput-tau", type=float, default=0.1)
    p.add_argument("--lookahead", type=int, default=16)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ray.init(num_cpus=max(args.workers + args.throughput_workers) + 1, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "environment": environment(torch.device("cpu")), "latency": latency_rows(args)}
        if args.reuse_throughput is not None:
            earlier = json.loads(args.reuse_throughput.read_text())
            results["throughput"] = earlier["throughput"]
            results["args"]["throughput_emulate_step_s"] = earlier["args"]["emulate_step_s"]
            results["throughput_source"] = (f"an earlier run of this script with the same model and steps, "
                                            f"{earlier['args']['emulate_step_s']} s emulated per call")
        else:
            results["throughput"] = throughput_rows(args)
    finally:
        ray.shutdown()
    write(results, args.out)
    print(f"wrote {args.out / 'distributed.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
