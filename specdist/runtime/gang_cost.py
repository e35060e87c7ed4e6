"""Emulated cost of a model call on a gang, and the ``gang_size: auto`` split (pure math).

**Emulation** (labelled as such wherever it is used): one full model call that takes ``T`` seconds
on one device takes ``T / (g · e_g)`` on a gang of ``g`` devices running context parallelism, with
the per-device efficiency ``e_g = t_1 / (g · t_g)`` taken from xDiT's published HunyuanVideo
720p×129f, 50-step timings on H100 (Ulysses): 1,904 / 925 / 514 / 338 s on 1 / 2 / 4 / 8 GPUs,
i.e. ``e = 1, 1.03, 0.93, 0.70``. Gang sizes outside that table have no measured efficiency and are
refused rather than extrapolated.

**Choosing the split** (``runtime.gang_size: auto``). ``D`` devices become ``G = D / g`` gangs of
``g``. A round of speculation issues ``k`` independent model calls (the expected number of calls
ready at once: in latency mode about samples × (mean accepted run + 1), capped by the window; in
throughput mode the generations in flight). ``G`` gangs run them in ``⌈k / G⌉`` waves, each wave one
gang call, so a round takes

    round(g) = ⌈k / (D / g)⌉ · T / (g · e_g)

and ``auto`` picks the ``g`` (dividing ``D``, at most the devices of one node, in the table, and
allowed by the model's heads) with the smallest ``round(g)``; ties go to the larger gang (fewer
speculative calls wasted when a draft is rejected). With ``k = 1`` (no parallel calls) that is one
gang of all devices; with ``k ≥ D`` it is the smallest gang that is at least as efficient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from ..errors import ConfigError

XDIT_HUNYUAN_720P_S: Mapping[int, float] = {1: 1904.0, 2: 925.0, 4: 514.0, 8: 338.0}
"""xDiT, HunyuanVideo 720p×129f, 50 steps, H100, Ulysses degree = GPUs: seconds per video."""


def efficiency(g: int, table: Mapping[int, float] = XDIT_HUNYUAN_720P_S) -> float:
    """Per-device efficiency ``e_g = t_1 / (g · t_g)`` of a gang of ``g`` (``e_1 = 1``)."""
    if g not in table:
        raise ConfigError(f"no measured context-parallel efficiency for gang_size {g} (the emulation's table "
                          f"has {sorted(table)}: xDiT HunyuanVideo 720p×129f on H100)")
    return table[1] / (g * table[g])


def gang_call_s(one_device_s: float, g: int, table: Mapping[int, float] = XDIT_HUNYUAN_720P_S) -> float:
    """Emulated time of one full model call on a gang of ``g``: ``T / (g · e_g)``."""
    return one_device_s / (g * efficiency(g, table))


def round_s(devices: int, g: int, parallel_calls: int, one_device_s: float = 1.0,
            table: Mapping[int, float] = XDIT_HUNYUAN_720P_S) -> float:
    """Emulated time of ``parallel_calls`` independent calls on ``devices / g`` gangs of ``g``."""
    if parallel_calls < 1:
        raise ValueError(f"parallel_calls must be >= 1 (got {parallel_calls})")
    if devices % g:
        raise ValueError(f"gang_size {g} does not divide {devices} devices")
    return math.ceil(parallel_calls / (devices // g)) * gang_call_s(one_device_s, g, table)


def choose_split(devices: int, parallel_calls: int, *, max_gang: int | None = None, heads: int | None = None,
                 table: Mapping[int, float] = XDIT_HUNYUAN_720P_S) -> tuple[int, int]:
    """``(gangs, gang_size)`` for ``devices`` devices and ``parallel_calls`` calls per round (module doc).

    Args:
        devices: worker devices of the job.
        parallel_calls: expected independent model calls ready at once (≥ 1).
        max_gang: largest gang (the devices of one node); ``None``: no limit.
        heads: the model's attention heads (Ulysses needs ``heads % g == 0``); ``None``: any.
    """
    if devices < 1:
        raise ConfigError(f"runtime.gang_size=auto needs at least one device (got {devices})")
    candidates: Iterable[int] = (g for g in sorted(table) if devices % g == 0
                                 and (max_gang is None or g <= max_gang) and (heads is None or heads % g == 0))
    best = min(candidates, key=lambda g: (round_s(devices, g, parallel_calls, 1.0, table), -g))
    return devices // best, best


__all__ = ["XDIT_HUNYUAN_720P_S", "choose_split", "efficiency", "gang_call_s", "round_s"]
