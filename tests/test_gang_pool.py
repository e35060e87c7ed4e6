"""The torchrun pool runs workers that are gangs (issue 12, phase 2), on CPU with gloo.

* ``launch/torchrun.sh`` with ``WORKERS=2 GANG_SIZE=2`` (1 coordinator + 2 gangs of 2 = 5 processes):
  a latency-mode ``speca`` job (output granularity, and block granularity whose anchors' features
  are gathered from the gang's shards and whose drafts take their shard of the forecasts;
  thresholds that accept and reject) on the video zoo model. Each gang's leader receives rank 0's jobs, broadcasts them to its member, both run the
  model call under diffusers context parallelism (Ulysses 2), the leader answers. The final latents
  equal the single-process run of the same seed within 1e-5 relative L2 and the decisions are
  identical. Not bitwise: the sharded attention adds the same terms in another order (all-to-all
  over heads, the output gathered from two shards; phase 1 measured 3.8e-7 to 6.1e-7 on this model),
  and the latency rule decides on those outputs.
* Throughput mode, ``method=full`` and block-level ``speca`` (each gang runs whole generations, the
  engine agreeing its decisions over the gang; the torchrun test harness, 5 gloo processes): the
  latents equal the single-process run within 1e-5, the decisions are identical.
* What gangs do not run is refused before anything starts, in one line: throughput mode with a
  method whose decisions are not agreed over the gang (the diffusers caches, per-token selection).
* A gang member SIGKILLed inside a model call: its leader's next collective fails at once
  (``GangFailure``), the leader reports it, and rank 0 ends the run with one line naming the gang,
  long before ``runtime.job_timeout_s``; every other rank ends. A member that hangs instead: the
  run ends with one line after ``runtime.job_timeout_s`` (rank 0's bound on a job, or the leader's
  bounded collective, whichever comes first); every rank but the hung one ends (torchrun's agent
  ends that one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from specdist.config import load_config
from specdist.errors import ConfigError
from specdist.generate import run_generate
from specdist.loading import load_model
from specdist.runtime.layout import job_layout
from specdist.runtime.run import run_distributed

import gang_pool_ranks
from gang_ranks import run_world

JOB = ["model=hunyuan-shapes-video", "steps=8", "num_samples=1", "method=speca", "cache.granularity=output",
       "cache.target_psnr_db=null", "cache.tau0=0.1", "cache.beta=1.0", "cache.warmup=2", "runtime.mode=latency", "reference=false",
       "output.save_latents=true"]


def _single_process(out, job=JOB):
    cfg = load_config(None, [*job, "runtime.backend=local", "runtime.workers=1", f"output.dir={out}"])
    report = run_generate(cfg, progress=False, log=lambda m: None)
    return report, load_file(str(out / "latents.safetensors"))["latents"]


@pytest.mark.parametrize("granularity", ["output", "block"])
def test_torchrun_launcher_with_two_gangs_of_two_matches_single_process(tmp_path, repo_root, granularity):
    """Output level: every job is a full call. Block level: the anchors' features are gathered from
    the gang's shards and each draft's forecasts cut back into them (:mod:`specdist.runtime.shards`)."""
    job = [*JOB, f"cache.granularity={granularity}"]
    env = {**os.environ, "WORKERS": "2", "GANG_SIZE": "2", "OUT": str(tmp_path / "gangs"), "OMP_NUM_THREADS": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": str(repo_root)}
    sets = [a for s in job for a in ("--set", s)]
    proc = subprocess.run(["bash", "launch/torchrun.sh", *sets, "--quiet"], capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gangs" / "report.json").read_text())
    got = load_file(str(tmp_path / "gangs" / "latents.safetensors"))["latents"]
    ref_report, ref = _single_process(tmp_path / "single", job)
    rel = float((got - ref).norm() / ref.norm())
    print(f"latency speca ({granularity}), 2 gangs of 2 vs single process: rel-L2 {rel:.2e}, "
          f"decisions {ref_report['runtime']['per_sample']}")
    assert rel < 1e-5, rel
    rt = report["runtime"]
    decisions = [s["decisions"] for s in rt["per_sample"]]
    assert decisions == [s["decisions"] for s in ref_report["runtime"]["per_sample"]]
    assert "A" in decisions[0] and "R" in decisions[0]  # the rule both accepted and rejected
    assert rt["backend"] == "torchrun" and rt["workers"] == 2
    assert rt["gang_size"] == 2 and rt["ulysses_degree"] == 2 and rt["ring_degree"] == 1
    assert rt["world_size"] == 5
    assert "gangs of 2" in rt["transport"]


def test_killed_gang_member_fails_the_run_clearly(tmp_path):
    overrides = [a for a in JOB if not a.startswith(("reference", "output.", "steps"))]
    overrides += ["steps=4", "runtime.workers=2", "runtime.gang_size=2", "runtime.job_timeout_s=60"]
    records = run_world(gang_pool_ranks.member_fails, 5, tmp_path, overrides, 2, 2, "kill", deadline_s=120)
    coordinator, victim = records[0], records[2]
    assert victim["exitcode"] == -9
    assert coordinator["ok"], coordinator["error"]
    err = coordinator["result"]["error"]
    print(f"killed member: rank 0 failed after {coordinator['result']['seconds']:.2f} s: {err}")
    assert "GangFailure" in err and "gang 0 (ranks [1, 2]), leader" in err and "drop the gang" in err, err
    assert "\n" not in err
    assert coordinator["result"]["seconds"] < 60  # noticed at once, not at runtime.job_timeout_s
    for r, rec in enumerate(records):
        assert not rec["alive_after"], (r, rec)  # no rank left behind
        if r not in (0, 2):
            assert rec["ok"], (r, rec["error"])


def _two_gangs_vs_single_process(tmp_path, overrides: list[str]):
    """``overrides`` on a torchrun world of a coordinator and 2 gangs of 2 (every rank must end
    cleanly) and on one local worker: (records, rank 0's result, the local run, latents rel-L2)."""
    records = run_world(gang_pool_ranks.run_job, 5, tmp_path, [*overrides, "runtime.workers=2", "runtime.gang_size=2"],
                        deadline_s=120)
    for r, rec in enumerate(records):
        assert rec["ok"], (r, rec["error"])
    got = records[0]["result"]
    ref = run_distributed(*gang_pool_ranks.job([*overrides, "runtime.backend=local", "runtime.workers=1"]),
                          progress=False, log=lambda m: None)
    rel = float((torch.tensor(got["latents"]) - ref.latents).norm() / ref.latents.norm())
    return records, got, ref, rel


@pytest.mark.parametrize("method", [
    ["method=full"],
    # block-level speca with thresholds that accept and reject: the engine agrees over the gang
    ["method=speca", "cache.target_psnr_db=null", "cache.tau0=0.1", "cache.beta=1.0", "cache.warmup=2"],
], ids=["full", "speca"])
def test_throughput_generations_on_gangs_match_single_process(tmp_path, method):
    overrides = ["model=hunyuan-shapes-video", "steps=8", "num_samples=2", *method, "runtime.mode=throughput"]
    records, got, ref, rel = _two_gangs_vs_single_process(tmp_path, overrides)
    print(f"throughput {method[0]}, 2 gangs of 2 vs single process: rel-L2 {rel:.2e}, decisions {ref.decisions}")
    assert rel < 1e-5, rel
    assert got["decisions"] == ref.decisions
    if method[0] == "method=speca":
        assert all("A" in d and "R" in d for d in ref.decisions)  # accepted and rejected forecasts, agreed
    assert got["layout"]["leaders"] == [1, 3] and got["layout"]["gang_size"] == 2
    assert [rec["result"]["jobs"] for rec in records[1:]] == [1, 1, 1, 1]  # one generation per gang, members too


def test_picard_on_gangs_matches_single_process(tmp_path):
    """method=picard runs only full calls, so it runs on gangs: 2 gangs of 2 commit the same
    decisions as the single process and latents within context parallelism's rounding."""
    overrides = ["model=hunyuan-shapes-video", "steps=8", "num_samples=1", "method=picard", "picard.window=4",
                 "runtime.mode=latency"]
    _, got, ref, rel = _two_gangs_vs_single_process(tmp_path, overrides)
    assert rel < 1e-5, rel
    assert got["decisions"] == ref.decisions and "A" in ref.decisions[0], (got["decisions"], ref.decisions)


@pytest.fixture(scope="module")
def video():
    return load_model("hunyuan-shapes-video")


@pytest.mark.parametrize("sets, message", [
    (["runtime.mode=throughput", "method=diffusers-magcache"],
     r"method=diffusers-magcache with runtime.mode=throughput .* not agreed over a gang's ranks; on gangs use method "
     r"full, fora, taylorseer or speca"),
    (["runtime.mode=throughput", "method=taylorseer", "cache.granularity=token"],
     r"cache.granularity=token with runtime.mode=throughput selects tokens per rank.* use cache.granularity=block or output"),
])
def test_what_gangs_do_not_run_is_refused_at_once(video, sets, message):
    cfg = load_config(None, ["model=hunyuan-shapes-video", "runtime.backend=torchrun", "runtime.workers=2",
                             "runtime.gang_size=2", *sets])
    with pytest.raises(ConfigError, match=message) as err:
        job_layout(cfg, video, (3, 8, 32, 32))
    assert "\n" not in str(err.value)


def test_hung_gang_member_fails_the_run_within_the_job_timeout(tmp_path):
    overrides = [a for a in JOB if not a.startswith(("reference", "output.", "steps"))]
    overrides += ["steps=4", "runtime.workers=2", "runtime.gang_size=2", "runtime.job_timeout_s=4"]
    records = run_world(gang_pool_ranks.member_fails, 5, tmp_path, overrides, 2, 2, "hang", deadline_s=120, hung={2})
    coordinator = records[0]
    assert coordinator["ok"], coordinator["error"]
    err, seconds = coordinator["result"]["error"], coordinator["result"]["seconds"]
    print(f"hung member: rank 0 failed after {seconds:.2f} s: {err}")
    # rank 0's own bound on a job, or the leader's bounded collective (GangFailure), whichever comes first
    assert "gang led by rank 1" in err, err
    assert ("gave no result for job" in err and "runtime.job_timeout_s" in err) or "GangFailure" in err, err
    assert 4.0 <= seconds < 30.0
    assert records[2]["reaped"]  # still blocked: the pool's launcher (torchrun) ends it
    for r in (1, 3, 4):
        assert records[r]["ok"] and not records[r]["alive_after"], (r, records[r])
