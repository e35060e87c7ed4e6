"""Latency of one generation when the devices are split into gangs, **emulated** HunyuanVideo
720p×129f timing (issue 12's benchmark).

    python benchmarks/gang_split.py              # writes benchmarks/results/gang_split.{md,json}

``D`` devices become ``G = D / g`` gangs of ``g`` (8 devices: 8×1, 4×2, 2×4, 1×8; 16 devices as 2
nodes of 8: 16×1, 8×2, 4×4, 2×8 — a gang never spans nodes). **Emulation** (labelled in every
output): a full call on a gang of ``g`` takes ``T_g = T / (g · e_g)`` with ``T = 31.8 s`` (one H100,
DESIGN §1) and ``e_g`` from xDiT's HunyuanVideo 720p×129f table (1,904 / 925 / 514 / 338 s on
1 / 2 / 4 / 8 H100: ``e = 1, 1.03, 0.93, 0.70``; :mod:`specdist.runtime.gang_cost`); a draft takes
``0.02 · T_g``, the engine's probe check ``0.017 · T_g`` (context parallelism splits them too). Every
model output is real (the video zoo model), the clock is virtual (as ``benchmarks/distributed.py``).

Rows per split, all on the same seeds, speedup against ``full`` on one device (``50 · T``):

* ``full`` on one gang — sequence parallelism alone (what xDiT does; the other gangs idle);
* ``speca`` on one gang — the engine (block level, the quality target) inside one gang, its
  decisions agreed over the gang: what ``runtime.mode: throughput`` runs on gangs today, priced at
  ``T_g`` per full call (its calls are counted once, priced per split);
* the latency rule (block drafts, the quality target) on the ``G`` gangs (runnable on gangs: the
  anchors' features are gathered from the gangs' shards, :mod:`specdist.runtime.shards`). Each split
  is its own run at its ``T_g``;
* ``method: picard`` (window ``G``, tol 0.5, drifted guesses) on the ``G`` gangs — runnable on gangs
  (it runs only full calls): rounds × ``T_g`` (the rounds do not depend on the timing; computed
  once per window).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from distributed import DRAFT, OUT, PROBE, T, Job, engine_row, fmt_db, footer_lines, rule_row
from specdist.env import environment
from specdist.runtime.gang_cost import XDIT_HUNYUAN_720P_S, efficiency, gang_call_s

SPLITS = {8: [1, 2, 4, 8], 16: [1, 2, 4, 8]}  # devices -> gang sizes (16 = 2 nodes of 8)


def _scaled(measured: dict, factor: float, **extra) -> dict:
    """``measured`` (priced at ``T`` per call) priced at ``factor · T`` per call."""
    out = dict(measured, **extra)
    out["latency_s"] = measured["latency_s"] * factor
    out["latency_max_s"] = measured.get("latency_max_s", measured["latency_s"]) * factor
    out["speedup"] = measured["speedup"] / factor
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hunyuan-shapes-video")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--target", type=float, default=35.0)
    parser.add_argument("--picard-tol", type=float, default=0.5)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    job = Job(args.model, args.steps, args.samples, args.target)
    engine = engine_row(job)
    print("engine speca", round(engine["speedup"], 2), engine["psnr"], flush=True)
    picard: dict[int, dict] = {}
    rows = []
    for devices, sizes in SPLITS.items():
        for g in sizes:
            gangs, tg = devices // g, gang_call_s(T, g)
            split = {"devices": devices, "gangs": gangs, "gang_size": g, "e_g": efficiency(g), "T_g_s": tg}
            rows.append({**split, "row": "full on one gang", "latency_s": args.steps * tg,
                         "speedup": args.steps * T / (args.steps * tg), "psnr": {"worst": float("inf"),
                                                                                   "mean": float("inf")}})
            rows.append(_scaled(engine, tg / T, **split, row="speca on one gang (engine)"))
            look = max(8, gangs)
            r = rule_row(job, "latency rule on the gangs (block drafts, target)", gangs,
                         [f"cache.target_psnr_db={args.target}", "cache.granularity=block", f"runtime.lookahead={look}",
                          f"runtime.workers={gangs}"], step_s=tg)
            rows.append({**r, **split})
            print(devices, f"{gangs}x{g}", "rule", round(r["speedup"], 2), r["psnr"], flush=True)
            if gangs > 1:
                if gangs not in picard:
                    picard[gangs] = rule_row(job, "picard", gangs, [f"runtime.workers={gangs}", f"picard.window={gangs}",
                                                                    f"picard.tol={args.picard_tol}"], method="picard")
                rows.append(_scaled(picard[gangs], tg / T, **split,
                                    row=f"method=picard on the gangs (window {gangs}, tol {args.picard_tol:g}, drifted guesses)"))
    results = {"model": args.model, "steps": args.steps, "samples": args.samples, "target_psnr_db": args.target,
               "emulated": True, "T_s": T, "xdit_hunyuan_720p_s": dict(XDIT_HUNYUAN_720P_S), "draft_fraction": DRAFT,
               "probe_fraction": PROBE, "calibration": job.calibration_info.as_dict(), "environment": environment(),
               "bench_wall_s": round(time.perf_counter() - started, 1), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gang_split.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_md(results, out / "gang_split.md")
    print(f"wrote {out / 'gang_split.md'}")



def write_md(results: dict, path: Path) -> None:
    lines = ["# Devices split into gangs (emulated HunyuanVideo 720p×129f timing)", "",
             f"`python benchmarks/gang_split.py` — {results['model']}, {results['steps']} steps, {results['samples']} "
             f"generations (one at a time), quality target {results['target_psnr_db']:g} dB. **Emulated timing**: a "
             f"full call on a gang of g = T / (g · e_g), T = {results['T_s']} s, e_g from xDiT's HunyuanVideo "
             f"720p×129f H100 table {results['xdit_hunyuan_720p_s']} (s on 1/2/4/8 GPUs); drafts "
             f"{results['draft_fraction']}·T_g, probe checks {results['probe_fraction']}·T_g. Every model output is "
             "real (the zoo model), the clock is virtual. Speedup = 50·T / mean latency (full on one device); PSNR "
             "of each output against full compute from the same seed. Every row runs on gangs (`runtime.gang_size`).", "",
             "| devices | gangs × size | e_g | row | latency (s) | speedup | PSNR worst / mean |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['devices']} | {r['gangs']} × {r['gang_size']} | {r['e_g']:.2f} | {r['row']} | "
                     f"{r['latency_s']:.0f} | {r['speedup']:.2f}× | {fmt_db(r['psnr']['worst'])} / "
                     f"{fmt_db(r['psnr']['mean'])} |")
    lines += footer_lines(results)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
