"""The Ray paths a user runs by hand, each with its own cluster (not the test module's ``ray.init``):
the default job, which starts a local cluster and stops it; ``launch/ray_cluster.sh head``, ``submit``
(``runtime.ray_address: auto``) and ``stop``. Each cluster lives under its own ``RAY_TMPDIR``, so
its processes are told apart from any other Ray on the machine, and none is left afterwards."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from specdist.report import output_sha256

from runtime_jobs import BASE, assert_counters, job, sequential

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")


def ray_processes(root: str) -> list[int]:
    """Processes whose command line names a directory under ``root`` (every Ray process names its
    session directory), other than this one."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"{root}/ray/" in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def wait_gone(root: str, timeout: float = 15.0) -> list[int]:
    """Ray processes under ``root`` still there after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (left := ray_processes(root)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture
def ray_tmp():
    """A short temp root for one cluster (Ray's socket paths live under it); whatever it leaves
    running is killed by pid afterwards, so a failing test cannot leak a cluster."""
    root = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    try:
        yield root
    finally:
        for pid in ray_processes(root):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_job_starts_and_stops_its_own_ray_cluster(tmp_path, monkeypatch, ray_tmp):
    """The README's main job (configs/default.yaml, runtime.ray_address: null) as a user runs it, shortened
    (to 30 steps: at 6 steps its probe-level speca misses the 30 dB target, see the README)."""
    import ray

    from specdist.cli import main

    assert not ray.is_initialized()
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    out = tmp_path / "default"
    assert main(["generate", "--config", "configs/default.yaml", "--quiet", "--set", "steps=30",
                 "--set", "num_samples=1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    rt = report["runtime"]
    assert rt["backend"] == "ray" and rt["workers"] == 2 and rt["transport"] == "ray tensor transport (gloo)"
    assert_counters(rt)
    assert (out / "video.mp4").stat().st_size > 0
    worst = report["reference"]["pixels"]["psnr_db"]["worst"]
    assert worst == "inf" or worst > 30  # "inf": every draft was rejected, the result is full compute
    # the distributed report states the target, the quality reached and the calibration's size
    assert report["quality_target"] == {"target_psnr_db": 30.0, "worst_psnr_db": worst, "met": True,
                                        "calibration_samples": 4}
    assert report["reference"]["speedup_wall"] > 0
    # it started a cluster of its own (under RAY_TMPDIR) and stopped it: nothing is left running
    assert list(Path(ray_tmp, "ray").glob("session_2*/logs/raylet.out"))
    assert not ray.is_initialized()
    assert wait_gone(ray_tmp) == []


def test_ray_cluster_launcher_head_submit_stop(tmp_path, ray_tmp, repo_root):
    """``launch/ray_cluster.sh head`` starts a cluster, ``submit`` runs the job on it through
    ``runtime.ray_address: auto`` (the single-process result; the cluster stays up), ``stop``
    stops it and nothing of it is left."""
    cfg, bundle, prompts, labels, guidance, noise = job()
    sha = output_sha256(sequential(cfg, bundle, prompts, labels, guidance, noise))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # `auto` must find the cluster itself
    env.update(RAY_TMPDIR=ray_tmp, RAY_PORT=str(free_port()), RAY_NUM_CPUS="2", WORKERS="1", RAY_STOP_GRACE="2",
               CONFIG="configs/dit-shapes.yaml", OUT=str(tmp_path / "out"), PYTHONPATH=str(repo_root),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))

    def launch(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", "launch/ray_cluster.sh", *args], capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-3000:])
        return proc

    # ports of their own, so that another Ray on this machine does not collide with this head
    launch("head", "--include-dashboard=false", f"--dashboard-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--metrics-export-port={free_port()}")
    head = ray_processes(ray_tmp)
    assert head
    launch("submit", *[a for s in BASE for a in ("--set", s)], "--set", "reference=false", "--quiet")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["output_sha256"] == sha
    assert report["config"]["runtime"]["ray_address"] == "auto"
    assert report["runtime"]["backend"] == "ray" and report["runtime"]["workers"] == 1
    assert_counters(report["runtime"])
    logs = Path(ray_tmp, "ray", "session_latest", "logs")
    assert any("RayWorker" in p.read_text(errors="replace") for p in logs.glob("worker-*.out"))  # ran there
    assert set(head) <= set(ray_processes(ray_tmp))  # a joined cluster is left running
    stop = launch("stop")
    assert "stopped" in stop.stdout
    assert wait_gone(ray_tmp, timeout=5) == []
