"""Exact mode's verification spread over the runtime's local worker pool gives the samples of the
local batched call, for 1 and 3 workers (the streams are per seed, not per worker)."""

from __future__ import annotations

import torch

from specdist.config import load_config
from specdist.engine.config import ExactConfig
from specdist.engine.exact import sample_exact
from specdist.loading import load_model
from specdist.runtime.exact_pool import pool_target
from specdist.runtime.pool import LocalPool
from specdist.runtime.run import worker_spec
from specdist.runtime.worker import StepWorker
from specdist.sampling import initial_noise


def test_pool_verification_matches_the_local_call():
    bundle = load_model("dit-shapes", device="cpu", dtype="float32", scheduler="DDPMScheduler")
    cfg = load_config(None, ["model=dit-shapes", "num_samples=2", "steps=10"])
    seeds, labels = [0, 1], ["0", "3"]
    cond = bundle.encode(["", ""], labels, bundle.default_guidance, 0)
    shape = bundle.latent_shape(None, None, None)
    args = (bundle.transformer, bundle.adapter, bundle.scheduler, cond, initial_noise(shape, seeds), 10, seeds,
            ExactConfig(window=3))
    local = sample_exact(*args, progress=False)
    spec = worker_spec(cfg, [], labels, bundle.default_guidance)
    for workers in (1, 3):
        worker = StepWorker(bundle.transformer, bundle.adapter, bundle.scheduler, cond, spec)
        pool = LocalPool([worker] * workers)
        try:
            pooled = sample_exact(*args, progress=False, target=pool_target(pool))
        finally:
            pool.close()
        assert pool.stats.jobs == sum(local.exact.target_evaluations)
        assert pooled.exact.outcomes == local.exact.outcomes
        torch.testing.assert_close(pooled.latents, local.latents, atol=1e-4, rtol=1e-4)


def test_generate_with_the_local_pool(tmp_path):
    """``runtime.backend=local``: the rounds' states go to runtime.workers reference workers; the
    statistics are those of the in-process run (same seeds), the report says how many jobs ran."""
    from specdist.generate import run_generate

    common = ["model=dit-shapes", "method=exact", "scheduler=DDPMScheduler", "steps=6", "num_samples=2",
              "exact.window=3"]
    here = run_generate(load_config(None, [*common, f"output.dir={tmp_path / 'a'}"]), progress=False,
                        log=lambda _: None)
    pooled = run_generate(load_config(None, [*common, "runtime.backend=local", "runtime.workers=3",
                                             f"output.dir={tmp_path / 'b'}"]), progress=False, log=lambda _: None)
    for key in ("sequential_rounds", "target_evaluations", "acceptance_rate"):
        assert pooled["exact"][key] == here["exact"][key]
    verification = pooled["exact"]["verification"]
    assert verification["workers"] == 3
    assert verification["jobs"] == sum(here["exact"]["target_evaluations"])  # one job per verified state
