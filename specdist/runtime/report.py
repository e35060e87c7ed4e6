"""The ``runtime`` section of ``report.json`` for a distributed run."""

from __future__ import annotations

import dataclasses
from typing import Any

from .coordinator import RunResult


def mean_accepted_run(decisions: str) -> float:
    """Mean length of the runs of accepted forecasts (``A``) in a decision string."""
    runs = [len(r) for r in decisions.replace("R", "F").split("F") if r]
    return sum(runs) / len(runs) if runs else 0.0


def runtime_report(cfg: Any, result: RunResult) -> dict[str, Any]:
    """Decisions, critical path, wasted work, traffic and coordinator overhead of ``result``."""
    rt, s = cfg.runtime, result.stats
    steps = cfg.steps * len(result.decisions)
    pool = s.extra.get("pool", {})
    moved = pool.get("bytes_to_workers", 0) + pool.get("bytes_from_workers", 0)
    out: dict[str, Any] = {
        "backend": rt.backend,
        "mode": rt.mode,
        "workers": rt.workers,
        "emulated": rt.emulate_step_s > 0,
        "emulate_step_s": rt.emulate_step_s,
        "transport": pool.get("transport"),
        "per_sample": [
            {"decisions": d, "accepted": d.count("A"), "rejected": d.count("R"), "anchors": a, "jobs": n,
             "draft_jobs": result.draft_jobs[k] if result.draft_jobs else 0,
             "mean_accepted_run": round(mean_accepted_run(d), 3)}
            for k, (d, a, n) in enumerate(zip(result.decisions, result.anchors, result.nfe))
        ],
        "jobs": {k: v for k, v in dataclasses.asdict(s).items() if k.startswith("jobs_") or k == "cancel_requests"},
        "cancelled_mid_forward": pool.get("cancelled_mid_forward", 0),
        "workers_lost": pool.get("workers_lost", 0),
        "resubmitted": pool.get("resubmitted", 0),
        "wasted_compute_s": round(s.wasted_compute_s, 4),
        "useful_compute_s": round(s.useful_compute_s, 4),
        "bytes_moved": moved,
        "bytes_moved_per_step": moved / max(steps, 1),
        "coordinator_s": round(s.coordinator_s, 4),
        "coordinator_s_per_step": s.coordinator_s / max(steps, 1),
        "wall_s": round(s.wall_s, 4),
    }
    layout = s.extra.get("layout")
    if layout:  # gangs: workers × gang_size (ulysses × ring) and the ranks the coordinator talks to
        out.update(layout)
    if "gang_member_calls" in s.extra:  # ray gangs: model calls each member took part in, in rank order
        out["gang_member_calls"] = s.extra["gang_member_calls"]
    if rt.mode == "latency":
        out["lookahead"] = rt.lookahead
        out["adaptive_lookahead"] = rt.adaptive_lookahead
        out["critical_path_full_steps"] = max(result.anchors) if result.anchors else 0
    if rt.emulate_step_s > 0:
        out["note"] = (f"emulated: every full model call also waited {rt.emulate_step_s:g} s (runtime.emulate_step_s); "
                       "wall-clock figures stand for a bigger model, not this one")
    return out
