"""Small runtime jobs shared by the runtime tests (speca and picard latency jobs on the DiT zoo model)."""

from __future__ import annotations

import random
import threading

import torch

from specdist.config import load_config
from specdist.generate import job_inputs
from specdist.loading import load_model
from specdist.runtime.coordinator import job_for
from specdist.runtime.rule import run_sequential
from specdist.runtime.run import build_trajectories, worker_spec
from specdist.runtime.worker import StepWorker, encode_all
from specdist.sampling import initial_noise

STEPS = 10
BASE = ["model=dit-shapes", f"steps={STEPS}", "num_samples=2", "method=speca", "cache.tau0=0.12", "cache.beta=1.0",
        "cache.warmup=2", "cache.granularity=block", "runtime.lookahead=4"]


PICARD = ["model=dit-shapes", "steps=12", "num_samples=2", "method=picard", "picard.window=4", "picard.tol=0.3",
          "runtime.backend=local"]


def picard_job(*overrides: str):
    """A small method=picard latency job on the DiT zoo model (window 4: rounds slide and stop)."""
    cfg = load_config(None, [*PICARD, *overrides])
    bundle = load_model(cfg.model)
    prompts, labels = job_inputs(cfg, bundle)
    guidance = cfg.guidance_scale or bundle.default_guidance
    noise = initial_noise(bundle.latent_shape(None, None, None), [cfg.seed, cfg.seed + 1])
    return cfg, bundle, prompts, labels, guidance, noise


def job(*overrides: str):
    """A small speca latency job on the DiT zoo model (thresholds that accept and reject)."""
    cfg = load_config(None, [*BASE, "runtime.backend=local", *overrides])
    bundle = load_model(cfg.model)
    prompts, labels = job_inputs(cfg, bundle)
    guidance = cfg.guidance_scale or bundle.default_guidance
    noise = initial_noise(bundle.latent_shape(None, None, None), [cfg.seed, cfg.seed + 1])
    return cfg, bundle, prompts, labels, guidance, noise


def _worker(cfg, bundle, prompts, labels, guidance) -> StepWorker:
    spec = worker_spec(cfg, prompts, labels, guidance)
    return StepWorker(bundle.transformer, bundle.adapter, bundle.scheduler, encode_all(bundle, spec), spec)


def in_shuffled_order(cfg, bundle, prompts, labels, guidance, noise, seed: int) -> tuple[torch.Tensor, list]:
    """The rule fed every open window's results in a random order (as many workers would deliver
    them), restarting from ``wanted()`` whenever a window closes. Returns the final latents and the
    trajectories."""
    worker = _worker(cfg, bundle, prompts, labels, guidance)
    trajs = build_trajectories(cfg, bundle.adapter, bundle.scheduler, noise, torch.float32)
    rng = random.Random(seed)
    try:
        for i, t in enumerate(trajs):
            while not t.done:
                window, wanted = t.window_id, t.wanted()
                rng.shuffle(wanted)
                for request in wanted:
                    r = worker.run(job_for(request, 0, i, t), request.tensors, threading.Event())
                    t.deliver(request, r.output, r.features, r.meta)
                    if t.window_id != window:
                        break
        return torch.cat([t.final for t in trajs]), trajs
    finally:
        worker.close()


def sequential(cfg, bundle, prompts, labels, guidance, noise) -> torch.Tensor:
    """The single-process engine: the rule, one reference output at a time."""
    worker = _worker(cfg, bundle, prompts, labels, guidance)
    trajs = build_trajectories(cfg, bundle.adapter, bundle.scheduler, noise, torch.float32)
    try:
        outs = []
        for i, t in enumerate(trajs):
            def compute(request, i=i, t=t):
                r = worker.run(job_for(request, 0, i, t), request.tensors, threading.Event())
                return r.output, r.features, r.meta
            outs.append(run_sequential(t, compute))
        return torch.cat(outs)
    finally:
        worker.close()


def assert_counters(rt: dict, *, tensor_bytes: int | None = None) -> None:
    """The identities the ``runtime`` section of a report must satisfy, whatever the backend.

    Every submitted job ends ``done`` (useful or stale) or ``cancelled``; a job stops only when
    asked, and a mid-forward stop is a cancellation; bytes move only over a transport. With
    ``tensor_bytes`` (one latent, in bytes), ``bytes_moved`` is at least one latent in per job sent
    (resubmissions included) and one out per job done (drafts also carry their forecast branches and
    recording references return their features, so it is a lower bound).
    """
    j = rt["jobs"]
    assert j["jobs_submitted"] == j["jobs_done"] + j["jobs_cancelled"], j
    assert 0 <= j["jobs_stale"] <= j["jobs_done"], j
    assert rt["cancelled_mid_forward"] <= j["jobs_cancelled"] <= j["cancel_requests"] <= j["jobs_submitted"], rt
    assert rt["resubmitted"] >= 0 and rt["workers_lost"] <= rt["workers"]
    if rt["mode"] == "latency":
        assert sum(s["jobs"] + s["draft_jobs"] for s in rt["per_sample"]) == j["jobs_submitted"]
        # every committed step (F, A, R) used one reference output from a job of an open window
        assert j["jobs_done"] - j["jobs_stale"] >= sum(len(s["decisions"]) for s in rt["per_sample"])
    else:
        assert j["jobs_submitted"] == j["jobs_done"] == len(rt["per_sample"])
    if rt["transport"] == "in-process":
        assert rt["bytes_moved"] == 0 and rt["bytes_moved_per_step"] == 0, rt
    else:
        assert rt["bytes_moved"] > 0 and rt["bytes_moved_per_step"] > 0, rt
        if tensor_bytes is not None:
            sent = j["jobs_submitted"] + rt["resubmitted"]
            assert rt["bytes_moved"] >= (sent + j["jobs_done"]) * tensor_bytes, rt
