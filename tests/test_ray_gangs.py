"""The Ray pool runs workers that are gangs (issue 12), on CPU with gloo: ``runtime.backend=ray``
with ``runtime.workers=2 runtime.gang_size=2`` starts its own local Ray cluster with 1 coordinator
actor + 2 gangs of 2 actors (a ``STRICT_PACK`` placement group per gang), one torch.distributed
world over them, and each gang's model under diffusers context parallelism (Ulysses 2).

* A latency-mode ``speca`` job (output granularity, and block granularity with the anchors' features
  gathered from the gangs' shards; thresholds that accept and reject) on the video zoo model
  equals the single-process run of the same seed within 1e-5 relative L2, with identical
  decisions, and every member took part in every model call of its gang.
* Throughput mode, block-level ``speca`` to a 30 dB target (one generation per gang, its decisions
  agreed over the gang's ranks): the same within 1e-5, identical decisions.
* A gang member SIGKILLed while its gang computes: the run fails with one line naming the gang
  (its leader's next collective fails at once), long before ``runtime.job_timeout_s``, and the
  cluster the run started is stopped.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specdist.config import load_config
from specdist.errors import SpecdistError
from specdist.generate import run_generate
from specdist.runtime.run import run_distributed

from runtime_jobs import job

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")

JOB = ["model=hunyuan-shapes-video", "steps=8", "num_samples=1", "method=speca", "cache.granularity=output",
       "cache.target_psnr_db=null", "cache.tau0=0.1", "cache.beta=1.0", "cache.warmup=2", "runtime.mode=latency",
       "reference=false", "output.save_latents=true"]
GANGS = ["runtime.backend=ray", "runtime.workers=2", "runtime.gang_size=2"]


def _generate(out: Path, *sets: str) -> tuple[dict, torch.Tensor]:
    cfg = load_config(None, [*sets, f"output.dir={out}"])
    report = run_generate(cfg, progress=False, log=lambda m: None)
    return report, load_file(str(out / "latents.safetensors"))["latents"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("granularity", ["output", "block"])
def test_latency_speca_on_two_ray_gangs_of_two_matches_single_process(tmp_path, granularity):
    job = [*JOB, f"cache.granularity={granularity}"]  # block: the gangs gather and cut the block features
    report, got = _generate(tmp_path / "gangs", *job, *GANGS)
    ref_report, ref = _generate(tmp_path / "single", *job, "runtime.backend=local", "runtime.workers=1")
    rel = _rel(got, ref)
    rt = report["runtime"]
    print(f"ray: latency speca ({granularity}), 2 gangs of 2 vs single process: rel-L2 {rel:.2e}, decisions "
          f"{[s['decisions'] for s in rt['per_sample']]}, member calls {rt['gang_member_calls']}")
    assert rel < 1e-5, rel
    decisions = [s["decisions"] for s in rt["per_sample"]]
    assert decisions == [s["decisions"] for s in ref_report["runtime"]["per_sample"]]
    assert "A" in decisions[0] and "R" in decisions[0]  # the rule both accepted and rejected
    assert rt["backend"] == "ray" and rt["workers"] == 2
    assert rt["gang_size"] == 2 and rt["ulysses_degree"] == 2 and rt["ring_degree"] == 1
    assert rt["world_size"] == 5 and rt["leaders"] == [1, 3]
    assert "gangs of 2" in rt["transport"]
    # one member per gang, each in every call its leader ran (one call per job the pool submitted)
    assert len(rt["gang_member_calls"]) == 2 and min(rt["gang_member_calls"]) >= 1
    assert sum(rt["gang_member_calls"]) == rt["jobs"]["jobs_submitted"]


def test_throughput_speca_to_a_target_on_ray_gangs_matches_single_process(tmp_path):
    """Block-level speca generations, one per gang, each deciding on features its ranks hold
    sharded: the engine agrees every error and value over the gang (GangAgreement), so the
    decisions and the quality target's bookkeeping are the single process's."""
    sets = ["model=hunyuan-shapes-video", "steps=10", "num_samples=2", "method=speca", "cache.target_psnr_db=30",
            "cache.warmup=2", "runtime.mode=throughput", "reference=false", "output.save_latents=true"]
    report, got = _generate(tmp_path / "gangs", *sets, *GANGS)
    ref_report, ref = _generate(tmp_path / "single", *sets, "runtime.backend=local", "runtime.workers=1")
    rel = _rel(got, ref)
    decisions = [s["decisions"] for s in report["runtime"]["per_sample"]]
    print(f"ray: throughput speca (target 30 dB), 2 gangs of 2 vs single process: rel-L2 {rel:.2e}, decisions {decisions}")
    assert rel < 1e-5, rel
    assert decisions == [s["decisions"] for s in ref_report["runtime"]["per_sample"]]
    assert all("A" in d for d in decisions)  # the generations speculated
    assert report["runtime"]["gang_member_calls"] == [1, 1]  # one generation per gang, its member in it


def _ray_worker_pids() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::RayWorker"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_killed_ray_gang_member_fails_the_run_clearly(tmp_path):
    killed: list[int] = []

    def kill_a_member(leader_pids, actors):
        def later():
            time.sleep(2.0)  # inside the first calls (each waits 0.5 s of emulated step time)
            members = [p for p in _ray_worker_pids() if p not in leader_pids]
            os.kill(members[0], signal.SIGKILL)
            killed.append(members[0])
        threading.Thread(target=later, daemon=True).start()

    cfg, bundle, prompts, labels, guidance, noise = job(*JOB[:-2], "num_samples=2", "steps=6", "runtime.emulate_step_s=0.5",
                                                        "runtime.job_timeout_s=60", *GANGS)
    start = time.perf_counter()
    with pytest.raises(SpecdistError) as err:
        run_distributed(cfg, bundle, noise, prompts, labels, guidance, progress=False, log=lambda m: None,
                        on_workers=kill_a_member)
    seconds = time.perf_counter() - start
    msg = str(err.value)
    print(f"killed ray gang member: the run failed after {seconds:.1f} s: {msg}")
    assert killed
    assert "failed on Ray worker" in msg and "drop the gang" in msg, msg
    assert any(f"gang {k} (ranks {r}), leader" in msg for k, r in ((0, [1, 2]), (1, [3, 4]))), msg
    assert "\n" not in msg
    assert seconds < 60  # noticed at once, not at runtime.job_timeout_s
    deadline = time.monotonic() + 15
    while _ray_worker_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _ray_worker_pids()  # the cluster the run started is gone
