"""Token-level caching on the zoo: ``specdiff`` and token-level ``taylorseer`` against block-level
``speca`` and ``taylorseer`` (and ``full``), same seeds, same run, through ``specdist bench``'s own
row code (:func:`specdist.bench.bench_model`).

Per model: speedup in FLOPs (what the engine booked as really run) and in wall time, next to the
mean and worst-sample PSNR against full compute from the same seeds; the share of tokens at each
level (recompute / forecast / reuse) over the trajectory; and the token selection's overhead
(scoring and sorting; wall time) as a share of full inference. Knobs were chosen on dit-shapes and
hunyuan-shapes-video only; wan-shapes is held out (same sweep, reported as untuned).

    python benchmarks/token_level.py                 # writes benchmarks/results/token.{md,json} and token_levels.png
    python benchmarks/token_level.py --samples 2 --steps 20 --models dit-shapes   # a quick look
"""

from __future__ import annotations

import os
import sys

# This file is named like the standard library's ``token`` module; running it puts its folder first
# on sys.path, where ``import token`` (inspect, dataclasses) would find it. Drop that entry.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import json
import time
from pathlib import Path
from typing import Any

from specdist.bench import BenchConfig, bench_model
from specdist.env import environment

SWEEP_TOKEN: dict[str, list[dict[str, list]]] = {
    "specdiff": [{"cache.interval": [4, 5, 6], "cache.token_refresh": [0.1, 0.25]},
                 {"cache.interval": [4], "cache.token_refresh": [0.25], "cache.token_reuse": [0.1]}],
    "taylorseer": [{"cache.granularity": ["token"], "cache.interval": [4, 5], "cache.token_refresh": [0.1, 0.25]},
                   {"cache.granularity": ["block"], "cache.interval": [2, 3, 4, 5]}],
    "speca": [{"cache.target_psnr_db": [30, 36]},
              {"cache.granularity": ["token"], "cache.token_refresh": [0.25], "cache.tau0": [0.05, 0.1, 0.3],
               "cache.beta": [1.0], "cache.max_run": [6]}],
}


def _label(row: dict) -> str:
    knobs = {k.removeprefix("cache."): v for k, v in row["knobs"].items()}
    level = knobs.pop("granularity", "token" if row["method"] == "specdiff" else "block")
    parts = ", ".join(f"{k} {v}" for k, v in knobs.items())
    return f"{row['method']} ({level}{', ' if parts else ''}{parts})"


def _psnr(row: dict, key: str) -> str:
    value = row["psnr_db"][key]
    return value if isinstance(value, str) else f"{value:.1f}"


def _table(model: dict) -> list[str]:
    lines = [f"### {model['model']}{' (held out: untuned)' if model['untuned'] else ''}", "",
             "| run | speedup FLOPs | speedup wall | PSNR mean / worst (dB) | levels recompute / forecast / reuse "
             "| selection overhead |", "|---|---|---|---|---|---|"]
    rows = sorted(model["rows"], key=lambda r: -r["speedup_nfe"])
    for r in rows:
        tl = r.get("token_level")
        shares = ("—" if tl is None else " / ".join(f"{tl['mean_shares'][k]:.2f}"
                                                    for k in ("recompute", "forecast", "reuse")))
        sel = "—" if tl is None else f"{100 * r['selection_time_fraction']:.2f} %"
        lines.append(f"| {_label(r) if r['method'] != 'full' else 'full'} | {r['speedup_nfe']:.2f}× | "
                     f"{r['speedup_wall']:.2f}× | {_psnr(r, 'mean')} / {_psnr(r, 'worst')} | {shares} | {sel} |")
    return lines + [""]


def _best_at(model: dict, floor: float) -> list[str]:
    """The fastest run (FLOPs) of each family with worst-sample PSNR >= ``floor``."""
    out = []
    for name, pick in (("specdiff", lambda r: r["method"] == "specdiff"),
                       ("taylorseer token", lambda r: r["method"] == "taylorseer"
                        and r["knobs"].get("cache.granularity") == "token"),
                       ("taylorseer block", lambda r: r["method"] == "taylorseer"
                        and r["knobs"].get("cache.granularity") == "block"),
                       ("speca token", lambda r: r["method"] == "speca"
                        and r["knobs"].get("cache.granularity") == "token"),
                       ("speca block", lambda r: r["method"] == "speca"
                        and r["knobs"].get("cache.granularity", "block") == "block")):
        ok = [r for r in model["rows"] if pick(r) and not isinstance(r["psnr_db"]["worst"], str)
              and r["psnr_db"]["worst"] >= floor]
        if not ok:
            out.append(f"| {name} | none reaches {floor:g} dB | | |")
            continue
        best = max(ok, key=lambda r: r["speedup_nfe"])
        out.append(f"| {name} | {_label(best)} | {best['speedup_nfe']:.2f}× / {best['speedup_wall']:.2f}× | "
                   f"{_psnr(best, 'worst')} |")
    return out


def _plot(models: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shown = [(m, r) for m in models for r in m["rows"] if r["method"] == "specdiff"
             and r["knobs"] == {"cache.interval": 4, "cache.token_refresh": 0.25, "cache.token_reuse": 0.1}]
    if not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 3.4), squeeze=False)
    for ax, (m, r) in zip(axes[0], shown):
        steps = r["steps"]
        per = {int(s[0]): s[1:] for s in r["token_level"]["per_step"]}
        xs = list(range(steps))
        rec = [per[i][0] if i in per else 1.0 for i in xs]
        fc = [per[i][1] if i in per else 0.0 for i in xs]
        ru = [per[i][2] if i in per else 0.0 for i in xs]
        ax.stackplot(xs, rec, fc, ru, labels=["recompute (full steps: all)", "forecast (Taylor)", "reuse"],
                     colors=["#c0392b", "#2980b9", "#95a5a6"], step="mid")
        ax.set_title(f"{m['model']}: specdiff ({_label(r).split('(')[1][:-1]})", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("share of tokens (first sample)")
        ax.set_ylim(0, 1)
    axes[0][0].legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["dit-shapes", "hunyuan-shapes-video", "wan-shapes"])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    began = time.perf_counter()
    models = []
    for name in args.models:
        cfg = BenchConfig(models=[name], steps=args.steps, num_samples=args.samples, sweep=SWEEP_TOKEN,
                          untuned=["wan-shapes"], device="cpu")
        cfg.validate()
        result = bench_model(cfg, name, progress=False)
        for r in result["rows"]:
            r["steps"] = args.steps
        models.append(result)
        print(f"{name}: {len(result['rows'])} runs, {time.perf_counter() - began:.0f} s so far", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot = _plot(models, out / "token_levels.png")
    (out / "token.json").write_text(json.dumps({"models": models, "environment": environment(),
                                                "samples": args.samples, "steps": args.steps}, indent=1))
    lines = ["# Token-level caching (specdiff, token-level taylorseer) vs block level", "",
             f"`python benchmarks/token_level.py --samples {args.samples} --steps {args.steps}` — {args.samples} samples "
             f"(seeds 0…), {args.steps} steps, CPU, one run; {time.perf_counter() - began:.0f} s "
             "in all. Speedup FLOPs = steps / full-forward equivalents that really ran (token steps counted "
             "block by block on their selected tokens, `specdist.engine.tokens.call_cost`); wall = full's wall "
             "time / the run's, same process. PSNR against full compute from the same seeds (pixels). Levels: "
             "mean shares over the steps between full steps, in the partial blocks. Selection overhead: wall time "
             "of scoring and sorting tokens / full inference's wall time.", ""]
    for m in models:
        lines += _table(m)
    for floor in (30.0, 35.0):
        lines += [f"### Fastest run per family at worst-sample PSNR ≥ {floor:g} dB", "",
                  "| model / family | run | speedup FLOPs / wall | worst PSNR (dB) |", "|---|---|---|---|"]
        for m in models:
            lines.append(f"| **{m['model']}** | | | |")
            lines += _best_at(m, floor)
        lines.append("")
    if plot:
        lines += [f"![token levels over the trajectory]({plot})", ""]
    (out / "token.md").write_text("\n".join(lines))
    print(f"wrote {out / 'token.md'}")


if __name__ == "__main__":
    main()
