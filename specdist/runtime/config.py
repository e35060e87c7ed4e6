"""Configuration of the distributed runtime (``runtime:`` section of a job config).

``backend: none`` runs the single-process engine (:mod:`specdist.engine`). Any other backend runs
the job through a worker pool (:mod:`specdist.runtime.pool`) driven by the coordinator
(:mod:`specdist.runtime.coordinator`):

* ``local`` — worker threads in this process (tests, one device);
* ``ray`` — one Ray actor per worker in a placement group, tensors over Ray's tensor transport in a
  collective group (``torch_gloo`` on CPU, ``nccl`` on GPUs);
* ``torchrun`` — SPMD under ``torchrun``: rank 0 coordinates, ranks ≥ 1 are workers,
  torch.distributed point-to-point (``gloo`` on CPU, ``nccl`` on GPUs).

Modes: ``latency`` speeds up each generation with parallel verification (method ``speca``) or
parallel-in-time Picard iteration (method ``picard``, ``picard:`` section); ``full`` runs every step
on the pool (the one-worker baseline). ``throughput`` runs whole generations on the workers, each
with the single-device engine's ``method``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engine.config import CacheConfig
from ..errors import check_value as _check

BACKENDS = ("none", "local", "ray", "torchrun")
MODES = ("latency", "throughput")
LATENCY_METHODS = ("full", "speca", "picard")
PICARD_INITS = ("drift", "copy")


@dataclass(kw_only=True)
class PicardConfig:
    """Knobs of ``method: picard`` (latency mode): ParaDiGMS-style Picard iteration over a sliding
    window of states with drafted initial guesses (:mod:`specdist.runtime.picard`)."""

    window: int = 8
    """States refined per round (one full call each, in parallel): best with ``runtime.workers``
    equal to it. The result depends on it, not on the number of workers."""
    tol: float = 0.5
    """The largest change of a guess in a round, relative to that step's own displacement (RMS), for
    the window to slide past it; 0 reproduces ``full`` bit for bit. Below 1 (a guess that did not
    move at all has change 1)."""
    init: str = "drift"
    """Guesses at positions new to the window: ``drift`` (the sampler stepped on with the newest
    model output's clean-sample prediction held fixed — for flow matching the output itself; no
    model call) or ``copy`` (the last known state: textbook ParaDiGMS)."""

    def validate(self, prefix: str = "picard.") -> None:
        _check(1 <= self.window <= 64, f"{prefix}window", self.window, "an integer 1..64")
        _check(0 <= self.tol < 1, f"{prefix}tol", self.tol, "a number in [0, 1)")
        _check(self.init in PICARD_INITS, f"{prefix}init", self.init, f"one of {list(PICARD_INITS)}")


@dataclass(kw_only=True)
class RuntimeConfig:
    """Where and how the job's model calls run."""

    backend: str = "none"
    """``none`` (single-process engine), ``local``, ``ray`` or ``torchrun`` (see the module doc)."""
    workers: int = 2
    """Reference workers (Ray actors, local threads); under torchrun it must equal WORLD_SIZE − 1."""
    mode: str = "latency"
    """``latency`` (parallel verification of one generation) or ``throughput`` (generations share
    the pool)."""
    lookahead: int = 8
    """latency: most draft steps verified in parallel after an anchor (the window)."""
    adaptive_lookahead: bool = True
    """latency: adapt the window to the last accepted run (from committed history only, so the
    result does not depend on the number of workers)."""
    reuse: bool = True
    """latency: after a rejection, the next window takes the closed window's reference outputs at the
    steps both cover as their predictions (Picard / ParaDiGMS reuse of what was computed) instead
    of fresh drafts; those jobs are waited for rather than cancelled."""
    ray_address: str | None = None
    """ray: ``null`` starts a local cluster (stopped afterwards); ``auto`` or ``host:port`` joins one."""
    ray_num_cpus: int | None = None
    """ray, local cluster only: logical CPUs to declare (default: workers + 1)."""
    gpus_per_worker: float | None = None
    """ray: GPUs per worker bundle; ``null``: 1 when the job's device is CUDA, else 0."""
    threads_per_worker: int = 1
    """torch CPU threads per worker (the same everywhere, so every backend computes the same bits)."""
    emulate_step_s: float = 0.0
    """Emulation: each full model call also waits this long (spread over its blocks, cancellable),
    standing in for a big model's step time (e.g. 31.8 s, HunyuanVideo 720p on one H100). Reports
    of such runs say ``emulated``."""
    emulate_draft_s: float = 0.0
    """Emulation: each draft (a latency-mode speculative call, or a speculative step of a
    throughput-mode generation) also waits this long, e.g. its measured share of a big model's step."""
    job_timeout_s: float = 600.0
    """No result from a busy worker for this long fails the run with an error naming the worker
    (a hung worker is not silently waited on). A *dead* Ray worker is noticed at once and its job
    resubmitted to the others."""
    startup_timeout_s: float = 120.0
    """ray: waiting for the cluster, placement group or worker actors longer than this fails clearly
    (under torchrun, rendezvous timeouts are torchrun's own)."""
    max_retries: int = 2
    """Resubmissions of one job after worker failures before the run fails."""
    gang_size: int | str = 1
    """torchrun and ray (local: refused): ranks per worker. Each worker is a *gang*
    of this many ranks (GPUs) that runs one model call together with diffusers context parallelism
    (``ulysses_degree × ring_degree``);
    ``runtime.workers`` counts gangs, so the world is 1 coordinator + workers × gang_size ranks.
    ``auto``: the split of the devices into gangs that the emulated cost model picks
    (:mod:`specdist.runtime.gang_cost`). 1: one device per worker, no context parallelism."""
    ulysses_degree: int | str = "auto"
    """gang_size > 1: Ulysses degree (attention heads split over the gang by all-to-all; must divide
    the model's heads). ``auto``: the largest divisor of gang_size that divides the heads."""
    ring_degree: int | str = "auto"
    """gang_size > 1: ring-attention degree (``ulysses_degree × ring_degree = gang_size``); needs an
    attention backend that returns log-sum-exp (GPU: flash, cuDNN, sage; not diffusers' CPU
    ``native``). ``auto``: gang_size / ulysses_degree."""

    def validate(self, prefix: str = "runtime.") -> None:
        _check(self.backend in BACKENDS, f"{prefix}backend", self.backend, f"one of {list(BACKENDS)}")
        _check(self.mode in MODES, f"{prefix}mode", self.mode, f"one of {list(MODES)}")
        _check(self.workers >= 1, f"{prefix}workers", self.workers, "an integer >= 1")
        _check(self.lookahead >= 1, f"{prefix}lookahead", self.lookahead, "an integer >= 1")
        _check(self.ray_num_cpus is None or self.ray_num_cpus >= 1, f"{prefix}ray_num_cpus", self.ray_num_cpus,
               "null or an integer >= 1")
        _check(self.gpus_per_worker is None or self.gpus_per_worker >= 0, f"{prefix}gpus_per_worker",
               self.gpus_per_worker, "null or a number >= 0")
        _check(self.threads_per_worker >= 1, f"{prefix}threads_per_worker", self.threads_per_worker, "an integer >= 1")
        _check(self.emulate_step_s >= 0, f"{prefix}emulate_step_s", self.emulate_step_s, "a number >= 0")
        _check(self.emulate_draft_s >= 0, f"{prefix}emulate_draft_s", self.emulate_draft_s, "a number >= 0")
        _check(self.job_timeout_s > 0, f"{prefix}job_timeout_s", self.job_timeout_s, "a number > 0")
        _check(self.startup_timeout_s > 0, f"{prefix}startup_timeout_s", self.startup_timeout_s, "a number > 0")
        _check(self.max_retries >= 0, f"{prefix}max_retries", self.max_retries, "an integer >= 0")
        self._validate_gangs(prefix)

    def _validate_gangs(self, prefix: str) -> None:
        """``gang_size`` / ``ulysses_degree`` / ``ring_degree``: values, product, and where they apply."""
        from .parallel_dims import AUTO, _int_or_auto

        for key in ("gang_size", "ulysses_degree", "ring_degree"):
            value = getattr(self, key)
            _check(_int_or_auto(value), f"{prefix}{key}", value, "an integer >= 1 or 'auto'")
        g, u, r = self.gang_size, self.ulysses_degree, self.ring_degree
        if g != 1 and self.backend in ("none", "local"):
            _check(False, f"{prefix}gang_size", g, f"1 with runtime.backend={self.backend} (a gang is gang_size "
                   f"processes; use runtime.backend=ray or torchrun)")
        if g == 1:
            for key, value in (("ulysses_degree", u), ("ring_degree", r)):
                _check(value in (AUTO, 1), f"{prefix}{key}", value, "'auto' or 1 with runtime.gang_size=1 (context "
                       "parallelism needs a gang: set runtime.gang_size)")
        elif g != AUTO:
            if u != AUTO and r != AUTO:
                _check(u * r == g, f"{prefix}ulysses_degree", u, f"ulysses_degree × ring_degree = gang_size: "
                       f"{u} × {r} != {g} (runtime.gang_size={g}, runtime.ring_degree={r})")
            for key, value in (("ulysses_degree", u), ("ring_degree", r)):
                _check(value == AUTO or g % value == 0, f"{prefix}{key}", value,
                       f"a divisor of runtime.gang_size={g} or 'auto'")

    @property
    def distributed(self) -> bool:
        """Whether the job runs through a worker pool."""
        return self.backend != "none"


def check_latency_cache(cache: Any, prefix: str = "cache.") -> None:
    """Refuse the cache fields that mean nothing in latency mode (one line naming the field): drafts
    are verified against the reference output itself (no probe, no waived checks, rel-L2), and only
    ``block`` and ``output`` granularity draft. ``cache.max_run`` means what it means in the engine
    (at most that many consecutive drafts are committed before a full step), next to the window
    ``runtime.lookahead``."""
    defaults = CacheConfig()
    _check(cache.granularity in ("block", "output"), f"{prefix}granularity", cache.granularity,
           "block or output with runtime.mode=latency (a draft is a block-level speculative call or the forecast output)")
    for key, why in (("probe_block", "drafts are verified against the reference output, not a probe"),
                     ("min_run", "every draft is verified by its reference output"),
                     ("metric", "drafts are compared with the reference output in rel-L2")):
        _check(getattr(cache, key) == getattr(defaults, key), f"{prefix}{key}", getattr(cache, key),
               f"{getattr(defaults, key)!r} with runtime.mode=latency ({why})")
