"""The ``ray`` backend (a local Ray cluster, real actors, tensor transport over torch_gloo) and the
``torchrun`` backend (3 gloo processes) commit exactly what the single-process engine commits;
a killed Ray worker is survived; bad cluster settings fail clearly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from specdist.errors import SpecdistError
from specdist.report import output_sha256
from specdist.runtime.run import run_distributed

from runtime_jobs import BASE, job, sequential

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def reference():
    return output_sha256(sequential(*job()))


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (the backend joins an initialised Ray)."""
    ray.init(num_cpus=5, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _ray_run(*overrides, on_workers=None):
    cfg, bundle, prompts, labels, guidance, noise = job("runtime.backend=ray", *overrides)
    return run_distributed(cfg, bundle, noise, prompts, labels, guidance, progress=False, log=lambda m: None,
                           on_workers=on_workers)


def test_ray_three_actors_match_single_process(cluster, reference):
    run = _ray_run("runtime.workers=3")
    assert output_sha256(run.latents) == reference
    pool = run.stats.extra["pool"]
    assert pool["transport"] == "ray tensor transport (gloo)"
    assert pool["bytes_to_workers"] > 0 and pool["bytes_from_workers"] > 0
    assert len(set(run.stats.extra["worker_pids"])) == 3 and os.getpid() not in run.stats.extra["worker_pids"]


def test_killed_ray_worker_is_survived(cluster, reference):
    """SIGKILL one worker actor mid-run: its job goes to the others, the result is unchanged."""
    def kill_soon(pids):
        threading.Timer(1.5, os.kill, (pids[0], signal.SIGKILL)).start()

    run = _ray_run("runtime.workers=3", "runtime.emulate_step_s=0.4", on_workers=kill_soon)
    assert output_sha256(run.latents) == reference
    assert run.stats.extra["pool"]["workers_lost"] == 1


def test_all_ray_workers_dead_fails_in_bounded_time(cluster):
    def kill_all(pids):
        threading.Timer(1.0, lambda: [os.kill(p, signal.SIGKILL) for p in pids]).start()

    start = time.monotonic()
    with pytest.raises(SpecdistError, match="Ray workers died|failed"):
        _ray_run("runtime.workers=2", "runtime.emulate_step_s=0.4", on_workers=kill_all)
    assert time.monotonic() - start < 120


def test_more_gpus_than_the_cluster_has_fails_clearly(cluster):
    with pytest.raises(SpecdistError, match=r"needs 2 GPUs; the Ray cluster has 0"):
        _ray_run("runtime.workers=2", "runtime.gpus_per_worker=1")


def test_unanswering_ray_address_fails_clearly():
    from specdist.runtime.ray_backend import _check_address

    with pytest.raises(SpecdistError, match="does not answer"):
        _check_address("127.0.0.1:1", timeout=5)


def test_torchrun_three_processes_match_single_process(tmp_path, reference):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    sets = [a for s in [*BASE, "runtime.backend=torchrun", "runtime.workers=2", "reference=false"] for a in ("--set", s)]
    cmd = [torchrun, "--standalone", "--nproc-per-node", "3", "-m", "specdist", "generate", *sets,
           "--out", str(tmp_path / "out"), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["output_sha256"] == reference
    assert report["runtime"]["transport"] == "torch.distributed p2p (gloo)"
    assert report["runtime"]["jobs"]["jobs_done"] >= 2 * 10 // 4


def test_default_job_runs_on_two_ray_workers(cluster, tmp_path):
    """The README's main job (configs/default.yaml) as a user runs it, shortened."""
    from specdist.cli import main

    out = tmp_path / "default"
    assert main(["generate", "--config", "configs/default.yaml", "--quiet", "--set", "steps=6",
                 "--set", "num_samples=2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["runtime"]["backend"] == "ray" and report["runtime"]["workers"] == 2
    assert report["runtime"]["transport"] == "ray tensor transport (gloo)"
    assert (out / "video.mp4").stat().st_size > 0
    assert report["reference"]["pixels"]["psnr_db"]["worst"] > 30
