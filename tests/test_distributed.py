"""The ``ray`` backend (a local Ray cluster, real actors, tensor transport over torch_gloo) and the
``torchrun`` backend (``launch/torchrun.sh``, 3 gloo processes) commit exactly what the
single-process engine commits, and their counters add up; a Ray worker killed while it computes a
job is survived (its job resubmitted), or fails the run clearly when it cannot be; bad cluster
settings fail clearly. Only the tests that need Ray are skipped without it."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from specdist.errors import SpecdistError
from specdist.report import output_sha256
from specdist.runtime.report import runtime_report
from specdist.runtime.run import run_distributed

from runtime_jobs import BASE, assert_counters, job, picard_job, sequential

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")


@pytest.fixture(scope="module")
def reference():
    args = job()
    noise = args[-1]
    return output_sha256(sequential(*args)), noise[0:1].numel() * noise.element_size()


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (the backend joins an initialised Ray)."""
    import ray

    ray.init(num_cpus=5, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _ray_run(*overrides, on_workers=None):
    cfg, bundle, prompts, labels, guidance, noise = job("runtime.backend=ray", *overrides)
    run = run_distributed(cfg, bundle, noise, prompts, labels, guidance, progress=False, log=lambda m: None,
                          on_workers=on_workers)
    return cfg, run


class Killer:
    """``on_workers`` hook: SIGKILLs worker ``index`` while it computes a job, i.e. once its
    ``running()`` shows a job whose forward began less than ``fresh_s`` ago (the job's input has
    arrived and, with emulated step time, its output is far from ready: no tensor is moving)."""

    def __init__(self, *indices: int, fresh_s: float = 0.1, together: bool = False) -> None:
        self.indices, self.fresh_s, self.together = indices, fresh_s, together
        self.killed: list[int] = []

    def __call__(self, pids, actors):
        target = self._watch_together if self.together else self._watch
        threading.Thread(target=target, args=(pids, actors), daemon=True).start()

    def _watch_together(self, pids, actors):
        """Kill every worker of ``indices`` at one moment at which each computes a fresh job: no
        tensor is moving to or from any of them then (killing them one after the other can hit the
        second while the first one's resubmitted job is being sent to it, and Ray's transport then
        kills the coordinator too)."""
        import ray

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            running = ray.get([actors[i].running.remote() for i in self.indices], timeout=30)
            if all(any(age < self.fresh_s for age in r.values()) for r in running):
                for i in self.indices:
                    os.kill(pids[i], signal.SIGKILL)
                    self.killed.append(i)
                return
            time.sleep(0.02)

    def _watch(self, pids, actors):
        import ray

        for i in self.indices:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                running = ray.get(actors[i].running.remote(), timeout=30)
                if any(age < self.fresh_s for age in running.values()):
                    os.kill(pids[i], signal.SIGKILL)
                    self.killed.append(i)
                    break
                time.sleep(0.02)


@needs_ray
def test_ray_three_actors_match_single_process(cluster, reference):
    sha, tensor_bytes = reference
    cfg, run = _ray_run("runtime.workers=3")
    assert output_sha256(run.latents) == sha
    pool = run.stats.extra["pool"]
    assert pool["transport"] == "ray tensor transport (gloo)"
    assert len(set(run.stats.extra["worker_pids"])) == 3 and os.getpid() not in run.stats.extra["worker_pids"]
    assert pool["workers_lost"] == pool["resubmitted"] == 0
    assert_counters(runtime_report(cfg, run), tensor_bytes=tensor_bytes)


@needs_ray
def test_killed_ray_worker_is_survived(cluster, reference):
    """SIGKILL a worker in the middle of a job: the job goes to the other worker, the result is unchanged."""
    sha, tensor_bytes = reference
    killer = Killer(0)
    cfg, run = _ray_run("runtime.workers=2", "runtime.emulate_step_s=0.3", on_workers=killer)
    assert killer.killed == [0]
    assert output_sha256(run.latents) == sha
    rt = runtime_report(cfg, run)
    assert rt["workers_lost"] == 1 and rt["resubmitted"] >= 1
    assert_counters(rt, tensor_bytes=tensor_bytes)


@needs_ray
def test_picard_on_ray_survives_a_killed_worker(cluster):
    """method=picard on 3 Ray actors equals the single-process rule, also when a worker is SIGKILLed
    mid-job (its job goes to another worker)."""
    args = picard_job()
    sha = output_sha256(sequential(*args))
    killer = Killer(1)
    cfg, bundle, prompts, labels, guidance, noise = picard_job("runtime.backend=ray", "runtime.workers=3",
                                                               "runtime.emulate_step_s=0.3")
    run = run_distributed(cfg, bundle, noise, prompts, labels, guidance, progress=False, log=lambda m: None,
                          on_workers=killer)
    assert killer.killed == [1]
    assert output_sha256(run.latents) == sha
    rt = runtime_report(cfg, run)
    assert rt["workers_lost"] == 1 and rt["resubmitted"] >= 1
    assert_counters(rt)


@needs_ray
def test_killed_ray_worker_without_retries_fails_clearly(cluster):
    killer = Killer(0)
    with pytest.raises(SpecdistError, match=r"lost with a dead Ray worker 1 time\(s\).*runtime\.max_retries=0 "
                                            r"allows no more resubmissions") as err:
        _ray_run("runtime.workers=2", "runtime.emulate_step_s=0.3", "runtime.max_retries=0", on_workers=killer)
    assert killer.killed == [0] and "\n" not in str(err.value)


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` in the process tree (from /proc)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    out, todo = [], [root]
    while todo:
        here = todo.pop()
        kids = [p for p, pp in parent.items() if pp == here]
        out += kids
        todo += kids
    return out


@needs_ray
def test_lost_ray_coordinator_fails_clearly(cluster):
    """The coordinator actor dies (as when Ray's collective transport, after a transfer to or from a
    dying worker failed, kills both ends of it): the run ends with one line saying so."""
    def kill_coordinator(pids, actors):
        for pid in _descendants(os.getpid()):  # this module's cluster only: its raylet is our child
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::RayCoordinator"):
                        os.kill(pid, signal.SIGKILL)
                        return
            except OSError:
                continue
        raise AssertionError("no RayCoordinator process found")

    with pytest.raises(SpecdistError, match="the Ray coordinator actor died") as err:
        _ray_run("runtime.workers=2", on_workers=kill_coordinator)
    assert "\n" not in str(err.value)

    def kill_all(pids, actors):  # the coordinator and every worker: the error names the workers' death
        kill_coordinator(pids, actors)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    with pytest.raises(SpecdistError, match="all Ray workers died, and the coordinator actor with them") as err:
        _ray_run("runtime.workers=2", on_workers=kill_all)
    assert "\n" not in str(err.value)


@needs_ray
def test_all_ray_workers_dead_fails_in_bounded_time(cluster):
    killer = Killer(0, 1, fresh_s=0.15, together=True)
    start = time.monotonic()
    # a worker killed while a tensor moves to or from it takes the coordinator with it (Ray's
    # collective transport kills both ends of the failed transfer; seen once in a fresh-clone CI
    # run, 2026-12-03): the error still names the workers' death
    with pytest.raises(SpecdistError, match="all Ray workers died") as err:
        _ray_run("runtime.workers=2", "runtime.emulate_step_s=0.3", on_workers=killer)
    assert sorted(killer.killed) == [0, 1] and time.monotonic() - start < 120
    assert "\n" not in str(err.value)


@needs_ray
def test_more_gpus_than_the_cluster_has_fails_clearly(cluster):
    with pytest.raises(SpecdistError, match=r"needs 2 GPUs; the Ray cluster has 0"):
        _ray_run("runtime.workers=2", "runtime.gpus_per_worker=1")


@needs_ray
def test_unanswering_ray_address_fails_clearly():
    from specdist.runtime.ray_backend import _check_address

    with pytest.raises(SpecdistError, match="does not answer"):
        _check_address("127.0.0.1:1", timeout=5)


def test_torchrun_launcher_three_processes_match_single_process(tmp_path, reference, repo_root):
    """``launch/torchrun.sh`` on one node (rank 0 + 2 workers) writes the single-process result."""
    sha, tensor_bytes = reference
    env = {**os.environ, "WORKERS": "2", "CONFIG": "configs/dit-shapes.yaml", "OUT": str(tmp_path / "out"),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": str(repo_root)}
    sets = [a for s in BASE for a in ("--set", s)]
    proc = subprocess.run(["bash", "launch/torchrun.sh", *sets, "--set", "reference=false", "--quiet"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["output_sha256"] == sha
    rt = report["runtime"]
    assert rt["backend"] == "torchrun" and rt["workers"] == 2
    assert rt["transport"] == "torch.distributed p2p (gloo)"
    assert_counters(rt, tensor_bytes=tensor_bytes)
