"""Cost accounting of a caching run: full evaluations, speculative-call FLOPs, acceptance."""

from __future__ import annotations

from typing import Any

from .speculative import CacheStats


def speculative_call_cost(flops: dict[str, Any], method: str, probe_block: int = -1,
                          granularity: str = "probe") -> float:
    """FLOPs of one speculative step *without* the probe, as a fraction of a full forward: the
    embeddings and head; nothing for unverified lite forecasts (``granularity: output``).
    ``flops`` comes from :func:`specdist.metrics.flops.flops_breakdown`."""
    if granularity == "output" and method != "speca":
        return 0.0
    return flops["embed_and_head"] / flops["total"]


def summarize(stats: CacheStats, flops: dict[str, Any], method: str, probe_block: int, steps: int,
              granularity: str = "probe") -> dict[str, Any]:
    """Per-run figures: NFE with overhead, verification overhead, acceptance, runs, cache bytes.

    Verification overhead (``flops_fraction_of_full_inference``) is the probe block's FLOPs on every
    speculative step it checked (``min_run`` waives the first ones) over the FLOPs of full inference
    (all steps full); the speculative FLOPs add the embeddings and head every speculative step runs
    (not counted: the norms and modulation a ``block``-granularity step runs in every block, which
    are elementwise or per-sample work, O(tokens·width) and O(width²), next to O(tokens·width²)).
    ``speculative_seconds`` is the wall time of the speculative calls, each up to its decision (the
    step's host synchronisation): forecast, probe, head and verification."""
    per = stats.per_sample()
    n = len(per)
    spec_steps = [r["accepted"] + r["rejected"] for r in per]
    base = speculative_call_cost(flops, method, probe_block, granularity)
    probe = flops["per_block"][probe_block] / flops["total"]
    probed = sum(stats.probed) if stats.probed else 0
    runs = [r["mean_accepted_run"] for r in per if r["accepted"]]
    verification = probe * probed / (n * steps)
    spec_flops = base * sum(spec_steps) / n + probe * probed / n  # in full forwards per sample
    tokens = {}
    if stats.token_cost:  # token level: what the partial calls really ran (engine.tokens.call_cost)
        spec_flops = sum(stats.token_cost) / n
        verification = 0.0  # speca's check reads the probe block's refreshed rows: nothing extra runs
        shares = [lv[1:] for per_sample in stats.token_levels for lv in per_sample]
        tokens = {"token_level": {
            "mean_shares": {name: sum(s[k] for s in shares) / max(len(shares), 1)
                            for k, name in enumerate(("recompute", "forecast", "reuse"))},
            "per_step": [list(lv) for lv in stats.token_levels[0]] if stats.token_levels else [],
            "selection_seconds": stats.select_seconds,
        }}
    return {
        "full_steps": [r["full_steps"] for r in per],
        "speculative_steps": spec_steps,
        "accepted": [r["accepted"] for r in per],
        "rejected": [r["rejected"] for r in per],
        "probed": list(stats.probed),
        "decisions": [r["decisions"] for r in per],
        "mean_accepted_run": sum(runs) / len(runs) if runs else 0.0,
        "nfe_with_overhead": sum(r["full_steps"] for r in per) / n + spec_flops,
        "verification_overhead": {
            "flops_fraction_of_full_inference": verification,
            "speculative_flops_fraction_of_full_inference": spec_flops / steps,
            "speculative_seconds": stats.spec_seconds,
        },
        "cache_bytes": stats.cache_bytes,
        "cache_device_bytes": stats.cache_bytes - stats.extra.get("cache_host_bytes", 0),
        "cache_host_bytes": stats.extra.get("cache_host_bytes", 0),
        "cache_order": stats.effective_order,
        **({"cached_blocks": stats.extra["cached_blocks"]} if "cached_blocks" in stats.extra else {}),
        **({"rule": stats.rule} if stats.rule else {}),
        **tokens,
    }
