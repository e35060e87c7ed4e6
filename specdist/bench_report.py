"""Write benchmark results: JSON, a Markdown table per model and a speed–quality plot per model."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from .report import write_json

PSNR_TARGET = 30.0


def _psnr(row: dict, key: str = "mean") -> float:
    value = (row.get("psnr_db") or {}).get(key)
    return float("inf") if value == "inf" else float(value) if value is not None else float("nan")


def _verif(row: dict) -> str:
    flops = f"{100 * row['verification_overhead_flops']:.1f}%"
    return flops if "speculative_time_fraction" not in row else f"{flops} / {100 * row['speculative_time_fraction']:.1f}%"


def _fmt_psnr(value: float) -> str:
    return "∞" if value == float("inf") else f"{value:.1f}"


FIXED_INTERVAL = ("fora", "taylorseer", "diffusers-taylorseer", "diffusers-pab")
"""Methods on a fixed schedule (the bar speca's verification must beat)."""


def fastest_at_least(rows: list[dict], worst: float, methods: tuple[str, ...] | None = None) -> dict | None:
    """The fastest row (NFE speedup) of ``methods`` whose worst-sample PSNR is at least ``worst``."""
    ok = [r for r in rows if r["method"] != "full" and (methods is None or r["method"] in methods)
          and _psnr(r, "worst") >= worst]
    return max(ok, key=lambda r: r["speedup_nfe"], default=None)


def speca_against_fixed(model: dict[str, Any]) -> list[dict]:
    """Per speca row: its speedup, worst PSNR, target, and the fastest fixed-interval method (and the
    fastest of all others) at a worst-sample PSNR at least as high."""
    out = []
    for r in model["rows"]:
        if r["method"] != "speca":
            continue
        worst = _psnr(r, "worst")
        fixed = fastest_at_least(model["rows"], worst, FIXED_INTERVAL)
        other = fastest_at_least([x for x in model["rows"] if x["method"] != "speca"], worst)
        out.append({"knobs": r["knobs"], "target": r.get("target_psnr_db"), "speedup_nfe": r["speedup_nfe"],
                    "speedup_wall": r["speedup_wall"], "worst": worst, "mean": _psnr(r),
                    "fixed": fixed, "ratio_nfe": r["speedup_nfe"] / fixed["speedup_nfe"] if fixed else None,
                    "ratio_wall": r["speedup_wall"] / fixed["speedup_wall"] if fixed else None, "other": other})
    return out


def _name(r: dict | None) -> str:
    if r is None:
        return "—"
    knobs = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["knobs"].items())
    return f"`{r['method']}` ({knobs}) {r['speedup_nfe']:.2f}× / {r['speedup_wall']:.2f}× at {_fmt_psnr(_psnr(r, 'worst'))}"


def best_at_target(rows: list[dict], target: float = PSNR_TARGET) -> dict[str, dict]:
    """Per method, the run with the highest NFE speedup whose worst-sample PSNR is ≥ ``target``."""
    best: dict[str, dict] = {}
    for row in rows:
        if row["method"] == "full" or _psnr(row, "worst") < target:
            continue
        if row["method"] not in best or row["speedup_nfe"] > best[row["method"]]["speedup_nfe"]:
            best[row["method"]] = row
    return best


def storage_costs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(run with ``cache.storage_dtype``, the same run in the compute dtype) pairs: every knob equal
    but the storage dtype, the second one absent from its knobs or ``compute``."""
    def key(row: dict) -> tuple:
        knobs = {k: v for k, v in row["knobs"].items() if k != "cache.storage_dtype"}
        return row["method"], json.dumps(knobs, sort_keys=True, default=str)

    base = {key(r): r for r in rows if r["knobs"].get("cache.storage_dtype", "compute") == "compute"}
    return [(r, base[key(r)]) for r in rows
            if r["knobs"].get("cache.storage_dtype", "compute") != "compute" and key(r) in base]


def _storage_table(rows: list[dict]) -> list[str]:
    pairs = storage_costs(rows)
    if not pairs:
        return []
    lines = ["Cache storage dtype (the same run with its Taylor factors stored in another dtype; arithmetic in "
             "the compute dtype). Δ = this run − the compute-dtype run, both against `full`:", "",
             "| method | knobs | storage | cache KiB (× of compute) | PSNR mean / worst | Δ PSNR mean / worst | "
             "decisions equal |", "|---|---|---|---|---|---|---|"]
    for r, b in pairs:
        knobs = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["knobs"].items() if k != "cache.storage_dtype")
        ratio = r["cache_bytes"] / b["cache_bytes"] if b.get("cache_bytes") else float("nan")
        dm, dw = _psnr(r) - _psnr(b), _psnr(r, "worst") - _psnr(b, "worst")
        same = "yes" if r.get("decisions") == b.get("decisions") else "no"
        lines.append(f"| {r['method']} | {knobs} | {r['knobs']['cache.storage_dtype']} | "
                     f"{r['cache_bytes'] / 1024:.0f} ({ratio:.2f}×) | {_fmt_psnr(_psnr(r))} / "
                     f"{_fmt_psnr(_psnr(r, 'worst'))} | {dm:+.2f} / {dw:+.2f} | {same} |")
    return lines + [""]


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables (one per model, then a best-at-target summary)."""
    env = results["environment"]
    cfg = results["config"]
    lines = [
        "# Speed–quality benchmark",
        "",
        f"Generated by `specdist bench` — {cfg['steps']} steps, {cfg['num_samples']} seeds/prompts per model, "
        f"every method from the same noise and conditioning in one run. Machine: {env['platform']}, "
        f"{env['cpu_count']} CPU cores, device {env['device']}; torch {env['torch']}, diffusers {env['diffusers']}, "
        f"Python {platform.python_version()}. Wall-clock is measured on this machine (no emulation).",
        "",
        "Columns: NFE = full-model evaluations per sample (rollbacks included); NFE+ = NFE plus the FLOPs of "
        "speculative calls (embeddings, head and — for speca — the probe block) in full-forward units; "
        "speedups are against `full` in the same run; PSNR/SSIM on pixels and rel-L2 on latents vs `full` "
        "from the same seed (mean / worst over samples); verif = verification FLOPs (the probe block on every "
        "speculative step) as a fraction of full inference, then the wall time of the speculative calls "
        "(forecast, probe, head, decision) as a fraction of `full`'s wall time. "
        "For the diffusers peers, NFE and NFE+ are the measured share of the blocks' linear-layer work that "
        "really ran (FBCache's always-run first block and PAB's MLPs included; see specdist/engine/peers.py).",
        "",
        *[f"Note: {n}" for n in results.get("notes", [])],
        *([""] if results.get("notes") else []),
    ]
    for model in results["models"]:
        untuned = " — **untuned** (held out from every tuning decision)" if model.get("untuned") else ""
        lines += [f"## {model['model']} ({model['class']}, latent {model['latent_shape']}, "
                  f"guidance {model['guidance_scale']}){untuned}", "",
                  "| method | knobs | NFE | NFE+ | speedup (FLOPs) | wall s | speedup (wall) | PSNR mean / worst | "
                  "SSIM mean | rel-L2 mean / worst | verif | acc / rej | mean run | cache KiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in model["rows"]:
            knobs = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["knobs"].items()) or "—"
            ssim = (r.get("ssim") or {}).get("mean")
            acc = f"{r['accepted']:.1f} / {r['rejected']:.1f}" if "accepted" in r else "—"
            run = f"{r['mean_accepted_run']:.2f}" if "mean_accepted_run" in r else "—"
            kib = f"{r['cache_bytes'] / 1024:.0f}" if "cache_bytes" in r else "—"
            lines.append(
                f"| {r['method']} | {knobs} | {r['nfe']:.1f} | {r['nfe_with_overhead']:.2f} | "
                f"{r['speedup_nfe']:.2f}× | {r['wall_s']:.2f} | {r['speedup_wall']:.2f}× | "
                f"{_fmt_psnr(_psnr(r))} / {_fmt_psnr(_psnr(r, 'worst'))} | "
                f"{'—' if ssim is None else f'{ssim:.4f}'} | {r['latent_rel_l2']['mean']:.4f} / "
                f"{r['latent_rel_l2']['worst']:.4f} | {_verif(r)} | {acc} | {run} | {kib} |")
        vs = speca_against_fixed(model)
        if vs:
            lines += ["", "`speca` (quality target, everything else at defaults) against the fastest fixed-interval "
                      "method whose worst sample is at least as good (and the fastest of every other method):", "",
                      "| target | speca FLOPs / wall speedup | PSNR worst / mean | fastest fixed-interval at ≥ that worst | "
                      "ratio FLOPs / wall | fastest of all others at ≥ that worst |", "|---|---|---|---|---|---|"]
            for v in vs:
                ratio = "—" if v["ratio_nfe"] is None else f"{v['ratio_nfe']:.2f}× / {v['ratio_wall']:.2f}×"
                target = "—" if v["target"] is None else f"{v['target']:g} dB"
                lines.append(f"| {target} | {v['speedup_nfe']:.2f}× / {v['speedup_wall']:.2f}× | "
                             f"{_fmt_psnr(v['worst'])} / {_fmt_psnr(v['mean'])} | {_name(v['fixed'])} | {ratio} | "
                             f"{_name(v['other'])} |")
        for c in model.get("speca_calibration", []):
            lines += ["", f"Calibration `{c['key']}`: {c['cost_s']:.1f} s when computed ({c['samples']} samples; "
                      f"{c['cost']})."]
        best = best_at_target(model["rows"])
        lines += ["", f"Fastest run of each method with worst-sample PSNR ≥ {PSNR_TARGET:.0f} dB:", ""]
        for method, r in sorted(best.items(), key=lambda kv: -kv[1]["speedup_nfe"]):
            lines.append(f"- `{method}` {r['knobs']}: {r['speedup_nfe']:.2f}× fewer full-model FLOPs, "
                         f"{r['speedup_wall']:.2f}× wall-clock, PSNR worst {_fmt_psnr(_psnr(r, 'worst'))} dB "
                         f"(mean {_fmt_psnr(_psnr(r))})")
        lines += ["", *_storage_table(model["rows"])]
        lines += [f"![speed–quality {model['model']}](pareto_{model['model']}.png)", ""]
    return "\n".join(lines) + "\n"


def plot(model: dict[str, Any], path: Path) -> None:
    """Speed (FLOPs-based speedup) against mean PSNR, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    methods: dict[str, list[tuple[float, float]]] = {}
    cap = 60.0
    for r in model["rows"]:
        if r["method"] != "full":
            methods.setdefault(r["method"], []).append((r["speedup_nfe"], min(_psnr(r, "worst"), cap)))
    for method, pts in methods.items():
        front, best = [], -1.0  # each method's Pareto front: faster points only where quality allows
        for x, y in sorted(pts, key=lambda p: -p[1]):
            if x > best:
                front.append((x, y))
                best = x
        style = dict(lw=2.2, zorder=5) if method == "speca" else dict(lw=1.0)
        ax.plot([p[0] for p in front], [p[1] for p in front], "o-" if len(front) > 1 else "s", label=method, **style)
    ax.axhline(PSNR_TARGET, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("speedup vs full (analytic FLOPs, verification included)")
    ax.set_ylabel(f"worst-sample PSNR vs full, dB (∞ drawn at {cap:.0f})")
    untuned = " (untuned)" if model.get("untuned") else ""
    ax.set_title(f"{model['model']}{untuned}: speed vs worst-sample quality (Pareto fronts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out: Path) -> Path:
    """Write ``speed_quality.json``, ``speed_quality.md`` and ``pareto_<model>.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "speed_quality.json", json.loads(json.dumps(results, default=str)))
    for model in results["models"]:
        plot(model, out / f"pareto_{Path(model['model']).name}.png")
    tmp = out / ".speed_quality.md.tmp"
    tmp.write_text(markdown(results))
    tmp.replace(out / "speed_quality.md")
    return out
