"""``specdist bench`` end to end on a small sweep."""

from __future__ import annotations

import json

import pytest

from specdist.bench import BenchConfig, expand_runs, run_bench
from specdist.config import config_from_dict
from specdist.errors import ConfigError


def test_expand_runs_is_the_cartesian_product_per_method():
    cfg = config_from_dict({"sweep": {"speca": {"cache.tau0": [0.1, 0.2], "cache.order": [1, 2]},
                                      "fora": {"cache.interval": [2]}}}, BenchConfig)
    runs = expand_runs(cfg)
    assert len(runs) == 5
    assert runs[0] == ("speca", {"cache.tau0": 0.1, "cache.order": 1})
    assert runs[-1] == ("fora", {"cache.interval": 2})
    groups = config_from_dict({"sweep": {"speca": [{"cache.granularity": ["probe"], "cache.tau0": [0.1]},
                                                   {"cache.granularity": ["block"], "cache.tau0": [0.03, 0.05]}]}},
                              BenchConfig)
    assert [k["cache.tau0"] for _, k in expand_runs(groups)] == [0.1, 0.03, 0.05]


def test_bad_sweeps_fail_clearly():
    with pytest.raises(ConfigError, match="invalid value for 'sweep': 'warp'"):
        config_from_dict({"sweep": {"warp": {}}}, BenchConfig)
    with pytest.raises(ConfigError, match=r"invalid value for 'sweep.fora\[0\].cache.interval': 2 \(allowed: a list\)"):
        config_from_dict({"sweep": {"fora": [{"cache.interval": 2}]}}, BenchConfig)
    cfg = config_from_dict({"models": ["dit-shapes"], "steps": 2, "num_samples": 1,
                            "sweep": {"fora": {"cache.intervall": [2]}}}, BenchConfig)
    with pytest.raises(ConfigError, match="unknown config key 'cache.intervall'"):
        run_bench(cfg, progress=False, log=lambda m: None)


def test_bench_writes_tables_and_plots(tmp_path):
    cfg = config_from_dict({
        "models": ["dit-shapes"], "steps": 6, "num_samples": 2, "out": str(tmp_path),
        "sweep": {"speca": {"cache.tau0": [0.0, 1e9]},
                  "fora": {"cache.interval": [2], "cache.storage_dtype": ["compute", "float8_e4m3fn"]},
                  "diffusers-fbcache": {"peer.fbcache_threshold": [0.0]}},
    }, BenchConfig)
    results = run_bench(cfg, progress=False, log=lambda m: None)
    rows = results["models"][0]["rows"]
    assert [r["method"] for r in rows] == ["full", "speca", "speca", "fora", "fora", "diffusers-fbcache"]
    full, exact, loose, fora, fora8, fb = rows
    assert fora8["cache_bytes"] < fora["cache_bytes"] / 3 and fora8["decisions"] == fora["decisions"]
    assert fora8["psnr_db"]["mean"] != fora["psnr_db"]["mean"]  # stored in fp8: the forecast changed
    assert full["psnr_db"]["mean"] == "inf" and full["speedup_nfe"] == 1.0
    assert exact["psnr_db"]["mean"] == "inf" and exact["rejected"] == 3  # tau 0: every check rejects
    assert loose["nfe"] == 3 and loose["accepted"] == 3 and loose["speedup_nfe"] > 1.5
    assert fora["nfe"] == 4 and fora["psnr_db"]["mean"] != "inf"  # FFFAFA
    assert fb["psnr_db"]["mean"] == "inf"  # threshold 0 never skips
    assert json.loads((tmp_path / "speed_quality.json").read_text())["models"][0]["model"] == "dit-shapes"
    md = (tmp_path / "speed_quality.md").read_text()
    assert "| speca | tau0=1000000000.0 |" in md
    assert "CPU cores" in md and "Fastest run of each method" in md
    assert "| fora | interval=2 | float8_e4m3fn |" in md and "Cache storage dtype" in md
    assert (tmp_path / "pareto_dit-shapes.png").stat().st_size > 0
