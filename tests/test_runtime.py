"""The distributed runtime in one process: the rule, the coordinator over the local pool,
cancellation, determinism across worker counts, and bad runtime configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from specdist.config import load_config
from specdist.errors import ConfigError, SpecdistError
from specdist.report import output_sha256
from specdist.runtime.coordinator import Coordinator
from specdist.runtime.jobs import Job, dtype_name
from specdist.runtime.pool import LocalPool
from specdist.runtime.report import runtime_report
from specdist.runtime.run import build_trajectories, run_distributed, worker_spec
from specdist.runtime.worker import StepWorker, encode_all
from specdist.sampling import sample_full

from runtime_jobs import STEPS, assert_counters, in_shuffled_order, job, sequential

@pytest.fixture(scope="module")
def reference():
    args = job()
    return output_sha256(sequential(*args)), args


@pytest.fixture(scope="module")
def no_reuse():
    """Without reuse a closed window's jobs are all useless: the path that cancels them."""
    args = job("runtime.reuse=false", "cache.tau0=0.3")
    return output_sha256(sequential(*args)), args


def test_full_through_the_rule_equals_sample_full():
    """method=full on the runtime computes every step at the committed state: the trajectory of
    the plain full-compute loop (per sample, batch of one)."""
    cfg, bundle, prompts, labels, guidance, noise = job("method=full")
    got = sequential(cfg, bundle, prompts, labels, guidance, noise)
    cond = encode_all(bundle, worker_spec(cfg, prompts, labels, guidance))
    for i in range(2):
        want = sample_full(bundle.transformer, bundle.adapter, bundle.scheduler,
                           cond.select(torch.tensor([i])), noise[i:i + 1], STEPS, progress=False).latents
        assert torch.equal(got[i:i + 1], want)


def test_tau_zero_rejects_everything_and_equals_full():
    """τ = 0: every forecast is rejected, so speca commits exactly the full trajectory."""
    args = job("cache.tau0=0.0")
    full = sequential(*job("method=full"))
    assert torch.equal(sequential(*args), full)


def test_rule_is_independent_of_result_order(reference):
    """Results delivered in any order (as many workers would) commit the same trajectory."""
    sha, args = reference
    latents, _ = in_shuffled_order(*args, seed=0)
    assert output_sha256(latents) == sha


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_local_pool_matches_single_process(reference, workers):
    sha, (cfg, bundle, prompts, labels, guidance, noise) = reference
    cfg.runtime.workers = workers
    run = run_distributed(cfg, bundle, noise, prompts, labels, guidance, progress=False)
    assert output_sha256(run.latents) == sha
    assert all(len(d) == STEPS for d in run.decisions)
    assert any("A" in d for d in run.decisions) and any("R" in d for d in run.decisions)
    rt = runtime_report(cfg, run)
    assert_counters(rt)
    assert rt["emulated"] is False and rt["emulate_step_s"] == 0 and "note" not in rt
    if workers == 1:  # one job at a time, in order: nothing is cancelled or arrives stale
        assert run.stats.jobs_cancelled == 0 and run.stats.jobs_stale == 0


def test_stale_jobs_are_cancelled_mid_forward(no_reuse):
    """With emulated block latency, jobs of a closed window stop between blocks (counted)."""
    sha, (cfg, bundle, prompts, labels, guidance, noise) = no_reuse
    cfg.runtime.workers, cfg.runtime.emulate_step_s = 3, 0.1
    run = run_distributed(cfg, bundle, noise, prompts, labels, guidance, progress=False)
    assert output_sha256(run.latents) == sha  # emulation changes timing, never the result
    assert run.stats.cancel_requests > 0
    assert run.stats.extra["pool"]["cancelled_mid_forward"] > 0
    assert run.stats.wasted_compute_s > 0
    rt = runtime_report(cfg, run)
    assert_counters(rt)
    assert rt["emulated"] is True and rt["emulate_step_s"] == 0.1
    assert "emulated" in rt["note"] and "0.1 s" in rt["note"]


class LateCancelPool(LocalPool):
    """A local pool whose cancellations arrive too late: a cancelled job runs to its end, and its
    (done) result is reported only once nothing else is running, as a slow link would deliver it.
    The coordinator always has a job of an open window in flight until every sample is done, so
    these results reach it in its drain after the run."""

    def __init__(self, workers):
        super().__init__(workers)
        self.asked, self.held = set(), []

    def cancel(self, job_id):
        self.asked.add(job_id)

    def wait(self, timeout):
        out = super().wait(timeout if self.busy else 0.0)
        self.held += [r for r in out if r.job.id in self.asked]
        out = [r for r in out if r.job.id not in self.asked]
        if not self.busy and not out:
            out, self.held = self.held, []
        return out


def test_drain_after_the_run_counts_late_results_consistently(no_reuse):
    """Jobs of closed windows that finish *after* the last sample is done (the cancel lost the
    race) are done and stale, like any stale result: submitted = done + cancelled still holds."""
    sha, (cfg, bundle, prompts, labels, guidance, noise) = no_reuse
    cfg.runtime.workers = 3
    spec = worker_spec(cfg, prompts, labels, guidance)
    worker = StepWorker(bundle.transformer, bundle.adapter, bundle.scheduler, encode_all(bundle, spec), spec)
    pool = LateCancelPool([worker] * 3)
    trajs = build_trajectories(cfg, bundle.adapter, bundle.scheduler, noise, torch.float32)
    try:
        run = Coordinator(pool, progress=False).run_latency(trajs)
    finally:
        pool.close()
    run.stats.extra.update(pool=dataclasses.asdict(pool.stats))
    assert output_sha256(run.latents) == sha
    assert run.stats.jobs_stale > 0 and run.stats.jobs_cancelled == 0
    assert_counters(runtime_report(cfg, run))
    assert run.stats.cancel_requests == len(pool.asked)  # each job asked to stop once


def test_throughput_mode_matches_the_engine():
    """Throughput mode runs each sample's generation with the single-device engine on a worker."""
    cfg, bundle, prompts, labels, guidance, noise = job("runtime.mode=throughput", "runtime.workers=2")
    run = run_distributed(cfg, bundle, noise, prompts, labels, guidance, progress=False)
    from specdist.methods import run_method

    cond = encode_all(bundle, worker_spec(cfg, prompts, labels, guidance))
    for i in range(2):
        want = run_method("speca", bundle.transformer, bundle.adapter, bundle.scheduler, cond.select(torch.tensor([i])),
                          noise[i:i + 1], STEPS, cache=cfg.cache, progress=False)
        assert torch.equal(run.latents[i:i + 1], want.latents)
        assert run.decisions[i] == "".join(want.stats.decisions[0])
    assert_counters(runtime_report(cfg, run))


def test_throughput_emulation_waits_s_times_the_generations_nfe():
    """Throughput mode with ``emulate_step_s: S``: a generation also waits S × its NFE (its full
    model evaluations), so it stands for a bigger model's generation; the result is unchanged."""
    s, knobs = 0.2, ("runtime.mode=throughput", "runtime.workers=2", "cache.tau0=1e9")  # accept every forecast
    plain = job(*knobs)
    cfg, bundle, prompts, labels, guidance, noise = job(*knobs, f"runtime.emulate_step_s={s}")
    run = run_distributed(cfg, bundle, noise, prompts, labels, guidance, progress=False)
    pcfg, pbundle, pprompts, plabels, pguidance, pnoise = plain
    base = run_distributed(pcfg, pbundle, pnoise, pprompts, plabels, pguidance, progress=False)
    assert torch.equal(run.latents, base.latents)
    assert all(n <= STEPS / 2 for n in run.nfe)  # most steps were forecast: S x NFE is far from S x steps
    emulated = s * sum(run.nfe)
    assert run.stats.useful_compute_s >= emulated
    assert run.stats.useful_compute_s - base.stats.useful_compute_s < emulated + 1.0  # S x steps would add 2.4 s
    assert runtime_report(cfg, run)["emulated"] is True


def test_failing_job_is_reported_not_hung():
    cfg, bundle, prompts, labels, guidance, noise = job()
    spec = worker_spec(cfg, prompts, labels[:1], guidance)  # the worker knows sample 0 only
    worker = StepWorker(bundle.transformer, bundle.adapter, bundle.scheduler, encode_all(bundle, spec), spec)
    pool = LocalPool([worker, worker])
    trajs = build_trajectories(cfg, bundle.adapter, bundle.scheduler, noise, torch.float32)
    with pytest.raises(SpecdistError, match="failed on local worker"):
        try:
            Coordinator(pool, progress=False).run_latency(trajs)
        finally:
            pool.close()


@pytest.mark.parametrize("override, message", [
    ("runtime.backend=mpi", "runtime.backend"),
    ("runtime.workers=0", "runtime.workers"),
    ("runtime.mode=fast", "runtime.mode"),
    ("method=fora", "runtime.mode=latency"),
    ("runtime.emulate_step_s=-1", "runtime.emulate_step_s"),
])
def test_bad_runtime_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, ["runtime.backend=local", "method=speca", override])


def test_torchrun_backend_outside_torchrun_fails_clearly(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    cfg, bundle, prompts, labels, guidance, noise = job("runtime.backend=torchrun")
    with pytest.raises(SpecdistError, match="needs torchrun"):
        run_distributed(cfg, bundle, noise, prompts, labels, guidance, progress=False)


def test_torchrun_world_size_mismatch_fails_clearly(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg, bundle, prompts, labels, guidance, noise = job("runtime.backend=torchrun", "runtime.workers=3")
    with pytest.raises(SpecdistError, match="WORLD_SIZE=4"):
        run_distributed(cfg, bundle, noise, prompts, labels, guidance, progress=False)
