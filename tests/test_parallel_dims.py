"""The rank arithmetic (``ParallelDims``), its config keys, the capacity check, the context-parallel
model facts and the emulated gang cost — all pure, no processes."""

from __future__ import annotations

import time

import pytest

from specdist.config import load_config
from specdist.errors import ConfigError
from specdist.models import adapter_for
from specdist.runtime.gang import ring_supported
from specdist.runtime.gang_cost import XDIT_HUNYUAN_720P_S, choose_split, efficiency, gang_call_s, round_s
from specdist.runtime.parallel_dims import (NodeResources, ParallelDims, RankNeeds, capacity_problems,
                                            check_capacity, resolve_degrees)

GIB = 2**30


# ----- layout ----------------------------------------------------------------------------------
def test_one_node_layout_coordinator_first_then_contiguous_gangs():
    d = ParallelDims(workers=3, gang_size=2, ulysses_degree=2)
    assert d.world_size == 7 and d.procs_per_node == (7,)
    assert [d.gang_ranks(k) for k in range(3)] == [(1, 2), (3, 4), (5, 6)]
    assert d.leaders == (1, 3, 5)
    assert d.gang_of(0) is None and d.gang_of(4) == (1, 1)
    assert [d.device_index(r) for r in range(7)] == [None, 0, 1, 2, 3, 4, 5]


def test_gangs_packed_in_nodes_and_spread_across_them():
    d = ParallelDims(workers=4, gang_size=4, ulysses_degree=4, nodes=2, devices_per_node=8)
    assert d.node_of_gang == (0, 1, 0, 1)  # consecutive workers on different nodes
    assert d.procs_per_node == (9, 8)  # node 0 also runs the coordinator
    assert d.gang_ranks(0) == (1, 2, 3, 4) and d.gang_ranks(2) == (5, 6, 7, 8)
    assert d.gang_ranks(1) == (9, 10, 11, 12) and d.gang_ranks(3) == (13, 14, 15, 16)
    for k in range(4):  # a gang never spans nodes, its devices are distinct slots of its node
        ranks = d.gang_ranks(k)
        assert {d.node_of(r) for r in ranks} == {d.node_of_gang[k]}
        assert sorted(d.device_index(r) for r in ranks) == list(range((k // 2) * 4, (k // 2) * 4 + 4))
    assert [d.local_rank(r) for r in (0, 1, 8, 9, 16)] == [0, 1, 8, 0, 7]
    every = sorted(r for k in range(4) for r in d.gang_ranks(k))
    assert every == list(range(1, d.world_size))  # each worker rank in exactly one gang


def test_round_robin_skips_full_nodes():
    d = ParallelDims(workers=3, gang_size=4, ulysses_degree=4, nodes=2, devices_per_node=8)
    assert d.node_of_gang == (0, 1, 0)
    d = ParallelDims(workers=3, gang_size=2, ulysses_degree=2, nodes=3, devices_per_node=2)
    assert d.node_of_gang == (0, 1, 2) and d.procs_per_node == (3, 2, 2)


def test_ray_gang_world_has_no_coordinator():
    d = ParallelDims(workers=1, gang_size=4, ulysses_degree=2, ring_degree=2, coordinator=False)
    assert d.world_size == 4 and d.gang_ranks(0) == (0, 1, 2, 3) and d.device_index(0) == 0
    assert [d.mesh_coords(m) for m in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]  # ring-major


def test_group_specs_per_gang_then_world():
    d = ParallelDims(workers=2, gang_size=2, ulysses_degree=2)
    specs = d.group_specs()
    assert [(s.name, s.ranks) for s in specs] == [
        ("gang0.cp", (1, 2)), ("gang0.ctrl", (1, 2)), ("gang0.dispatch", (1, 2)),
        ("gang1.cp", (3, 4)), ("gang1.ctrl", (3, 4)), ("gang1.dispatch", (3, 4)), ("world.ctrl", (0, 1, 2, 3, 4))]
    assert [s.name for s in ParallelDims(workers=3).group_specs()] == ["world.ctrl"]  # no gangs, no gang groups


@pytest.mark.parametrize("kwargs, named", [
    (dict(workers=2, gang_size=4, ulysses_degree=2, ring_degree=1), ["ulysses_degree × ring_degree = 2", "gang_size 4"]),
    (dict(workers=1, gang_size=8, ulysses_degree=8, devices_per_node=4), ["a gang of 8 does not fit in a node of 4"]),
    (dict(workers=5, gang_size=2, ulysses_degree=2, nodes=2, devices_per_node=4), ["hold 4 workers, not 5"]),
    (dict(workers=0), ["workers must be an integer >= 1"]),
])
def test_bad_layouts_name_every_degree(kwargs, named):
    with pytest.raises(ConfigError) as err:
        ParallelDims(**kwargs)
    msg = str(err.value)
    for word in ("workers=", "gang_size=", "ulysses_degree=", "ring_degree=", "nodes=", *named):
        assert word in msg, (word, msg)


def test_model_problems_all_in_one_error():
    d = ParallelDims(workers=1, gang_size=4, ulysses_degree=4)
    with pytest.raises(ConfigError) as err:
        d.check_model(heads=6, lengths={"video tokens": 48, "text tokens": 6})
    msg = str(err.value)
    assert "6 attention heads are not divisible by ulysses_degree 4" in msg
    assert "text tokens 6 not divisible by gang_size 4" in msg and "video tokens" not in msg.split("fit:")[1]
    ring = ParallelDims(workers=1, gang_size=2, ulysses_degree=1, ring_degree=2)
    problems = ring.model_problems(heads=2, ring_supported=ring_supported("native"))
    assert len(problems) == 1 and "log-sum-exp" in problems[0] and "'native'" in problems[0]
    assert ring.model_problems(heads=2, ring_supported=ring_supported("_native_cudnn")) == []
    assert ParallelDims(workers=2).model_problems(heads=3, lengths={"x": 7}) == []  # no gang: nothing splits


def test_resolve_degrees_prefers_ulysses_within_the_heads():
    assert resolve_degrees(8, "auto", "auto", heads=24) == (8, 1)
    assert resolve_degrees(8, "auto", "auto", heads=12) == (4, 2)
    assert resolve_degrees(4, "auto", "auto", heads=2) == (2, 2)
    assert resolve_degrees(4, "auto", "auto", heads=2, ring_supported=False) == (4, 1)  # then check_model names the heads
    assert resolve_degrees(4, 2, "auto") == (2, 2) and resolve_degrees(4, "auto", 4) == (1, 4)


# ----- capacity ----------------------------------------------------------------------------------
def test_sixty_four_workers_on_two_cores_fail_at_once():
    two_cores = (NodeResources(cpus=2, memory_bytes=22 * GIB),)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        check_capacity(ParallelDims(workers=64), two_cores, RankNeeds(), startup_timeout_s=120)
    assert time.perf_counter() - start < 0.1
    msg = str(err.value)
    assert "workers=64" in msg and "65 processes" in msg and "26.0 GiB > 22.0 GiB" in msg
    assert "179 s > runtime.startup_timeout_s=120 s" in msg
    check_capacity(ParallelDims(workers=8), two_cores, RankNeeds(), startup_timeout_s=120)  # 8 fit


def test_capacity_per_node_and_gpus():
    dims = ParallelDims(workers=4, gang_size=4, ulysses_degree=4, nodes=2, devices_per_node=8)
    nodes = (NodeResources(64, 512 * GIB, 8), NodeResources(64, 512 * GIB, 4))
    problems = capacity_problems(dims, nodes, RankNeeds(gpus=1), 120)
    assert problems == ["node 1: 8 worker ranks × 1 GPU > 4 GPUs"]
    assert capacity_problems(dims, nodes[:1], RankNeeds(), 120) == ["the job needs 2 nodes, the cluster has 1"]


# ----- config keys -------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, key", [
    (["runtime.backend=local", "runtime.gang_size=2"], "runtime.gang_size"),
    (["runtime.backend=none", "runtime.gang_size=auto"], "runtime.gang_size"),
    (["runtime.backend=ray", "runtime.gang_size=0"], "runtime.gang_size"),
    (["runtime.backend=ray", "runtime.gang_size=two"], "runtime.gang_size"),
    (["runtime.backend=ray", "runtime.ulysses_degree=2"], "runtime.ulysses_degree"),  # gang_size 1
    (["runtime.backend=ray", "runtime.gang_size=4", "runtime.ulysses_degree=2", "runtime.ring_degree=1"],
     "runtime.ulysses_degree"),
    (["runtime.backend=ray", "runtime.gang_size=4", "runtime.ring_degree=3"], "runtime.ring_degree"),
])
def test_gang_keys_refused_with_one_line(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert f"'{key}'" in str(err.value) and "\n" not in str(err.value)


def test_gang_keys_accepted():
    cfg = load_config(None, ["runtime.backend=torchrun", "runtime.gang_size=4", "runtime.ring_degree=2"])
    rt = cfg.runtime
    assert (rt.gang_size, rt.ulysses_degree, rt.ring_degree) == (4, "auto", 2)
    d = ParallelDims.from_runtime(rt, heads=24)
    assert (d.ulysses_degree, d.ring_degree, d.world_size) == (2, 2, 1 + 2 * 4)
    assert load_config(None, []).runtime.gang_size == 1


# ----- context-parallel model facts ----------------------------------------------------------------
def _tiny(family):
    from gang_ranks import tiny
    return tiny(family)


def test_plans_and_lengths_per_family():
    from diffusers import DiTTransformer2DModel

    from specdist.models.context_parallel import HUNYUAN_VIDEO_CP_PLAN

    flux, wan, hv = _tiny("flux"), _tiny("wan"), _tiny("hunyuan_video")
    assert adapter_for(flux).context_parallel_plan(flux) is type(flux)._cp_plan  # diffusers' own
    assert adapter_for(wan).context_parallel_plan(wan) is type(wan)._cp_plan
    assert getattr(type(hv), "_cp_plan", None) is None
    assert adapter_for(hv).context_parallel_plan(hv) is HUNYUAN_VIDEO_CP_PLAN
    cond = adapter_for(hv).random_conditioning(hv, 1, __import__("torch").Generator().manual_seed(0))
    assert adapter_for(hv).context_parallel_lengths(hv, (4, 3, 4, 4), cond) == {"video tokens": 48, "text tokens": 6}
    assert adapter_for(wan).context_parallel_lengths(wan, (4, 3, 8, 8), None) == {"video tokens": 48}
    assert adapter_for(flux).context_parallel_lengths(flux, (4, 8, 8), None) == {"image tokens": 16}
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    reason = adapter_for(dit).context_parallel_unsupported(dit)
    assert "AttnProcessor2_0" in reason
    with pytest.raises(ConfigError) as err:
        ParallelDims(workers=1, gang_size=2, ulysses_degree=2).check_model(unsupported=reason)
    assert "DiTTransformer2DModel cannot run context-parallel" in str(err.value)


# ----- emulated gang cost ------------------------------------------------------------------------
def test_efficiency_from_the_xdit_table():
    assert efficiency(1) == 1.0
    assert [round(efficiency(g), 2) for g in (2, 4, 8)] == [1.03, 0.93, 0.70]
    assert gang_call_s(1904.0, 8) == pytest.approx(XDIT_HUNYUAN_720P_S[8])  # T / (g e_g) gives back the table
    with pytest.raises(ConfigError, match="gang_size 3"):
        efficiency(3)


def test_auto_split_follows_the_parallel_calls():
    assert choose_split(8, 1) == (1, 8)  # nothing to overlap: one gang of all devices
    assert choose_split(8, 2) == (2, 4)
    assert choose_split(8, 4) == (4, 2)
    assert choose_split(8, 8) == (4, 2)  # e_2 > 1: two waves on 4 gangs of 2 beat one wave on 8 single GPUs
    assert choose_split(8, 1, max_gang=4) == (2, 4)  # a gang never spans nodes
    assert choose_split(8, 1, heads=2) == (4, 2)  # Ulysses cannot split 2 heads over 4
    # the choice is the minimum of the stated formula
    for k in (1, 2, 3, 5, 8, 13):
        gangs, g = choose_split(8, k)
        assert round_s(8, g, k) == min(round_s(8, h, k) for h in (1, 2, 4, 8))
