"""Cost accounting of a caching run: full evaluations, speculative-call FLOPs, acceptance."""

from __future__ import annotations

from typing import Any

from .speculative import CacheStats


def speculative_call_cost(flops: dict[str, Any], method: str, probe_block: int = -1,
                          granularity: str = "probe") -> float:
    """FLOPs of one speculative step as a fraction of a full forward: embeddings and head, plus the
    probe block for ``speca``; nothing for unverified lite forecasts (``granularity: output``).
    ``flops`` comes from :func:`specdist.metrics.flops.flops_breakdown`."""
    if granularity == "output" and method != "speca":
        return 0.0
    probe = flops["per_block"][probe_block] if method == "speca" else 0
    return (flops["embed_and_head"] + probe) / flops["total"]


def summarize(stats: CacheStats, flops: dict[str, Any], method: str, probe_block: int, steps: int,
              granularity: str = "probe") -> dict[str, Any]:
    """Per-run figures: NFE with overhead, verification overhead, acceptance, runs, cache bytes."""
    per = stats.per_sample()
    n = len(per)
    spec_steps = [r["accepted"] + r["rejected"] for r in per]
    cost = speculative_call_cost(flops, method, probe_block, granularity)
    runs = [r["mean_accepted_run"] for r in per if r["accepted"]]
    overhead = cost * sum(spec_steps) / (n * steps)
    return {
        "full_steps": [r["full_steps"] for r in per],
        "speculative_steps": spec_steps,
        "accepted": [r["accepted"] for r in per],
        "rejected": [r["rejected"] for r in per],
        "decisions": [r["decisions"] for r in per],
        "mean_accepted_run": sum(runs) / len(runs) if runs else 0.0,
        "nfe_with_overhead": sum(r["full_steps"] for r in per) / n + cost * sum(spec_steps) / n,
        "verification_overhead": {
            "flops_fraction_of_full_inference": overhead if method == "speca" else 0.0,
            "speculative_flops_fraction_of_full_inference": overhead,
            "speculative_call_cost_fraction_of_forward": cost,
        },
        "cache_bytes": stats.cache_bytes,
        "cache_order": stats.effective_order,
    }
