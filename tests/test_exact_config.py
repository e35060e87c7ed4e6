"""``method: exact`` through the config and the CLI: validated fields, refusals in one line, and the
report's ``exact`` section from ``specdist generate`` on a zoo model."""

from __future__ import annotations

import json

import pytest

from specdist.config import load_config
from specdist.errors import ConfigError
from specdist.generate import run_generate


@pytest.mark.parametrize("overrides,key", [
    (["method=exact", "exact.window=0"], "exact.window"),
    (["method=exact", "exact.window=65"], "exact.window"),
    (["method=exact", "exact.draft=medusa"], "exact.draft"),
    (["method=exact", "exact.space=eps"], "exact.space"),
    (["method=exact", "exact.order=2"], "exact.order"),  # the frozen draft has no order
    (["method=exact", "exact.max_window=8"], "exact.max_window"),  # only with adaptive
    (["method=exact", "exact.eta=0"], "exact.eta"),
    (["method=exact", "cache.interval=5"], "cache.interval"),  # cache knobs do not apply to exact
    (["method=exact", "peer.fbcache_threshold=0.1"], "peer.fbcache_threshold"),
    (["method=exact", "runtime.backend=ray"], "runtime.backend"),
    (["method=exact", "runtime.backend=local", "runtime.mode=throughput"], "runtime.mode"),
    (["method=speca", "exact.window=8"], "exact.window"),  # exact knobs do not apply to other methods
])
def test_invalid_or_inapplicable_fields_are_refused_naming_the_field(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'") as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_valid_exact_configs():
    cfg = load_config(None, ["method=exact", "exact.adaptive=true", "exact.max_window=8", "exact.draft=taylor",
                             "exact.order=2", "exact.space=output", "scheduler=DDIMScheduler", "exact.eta=0.5"])
    assert cfg.exact.max_window == 8 and cfg.exact.eta == 0.5


def _generate(tmp_path, *extra):
    cfg = load_config(None, ["model=dit-shapes", "method=exact", "steps=8", "num_samples=2", "batch_size=1",
                             f"output.dir={tmp_path / 'out'}", *extra])
    return run_generate(cfg, progress=False, log=lambda _: None)


def test_generate_writes_the_exact_section(tmp_path):
    report = _generate(tmp_path, "scheduler=DDPMScheduler", "exact.window=3")
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    exact = on_disk["exact"]
    assert report["scheduler"]["class"] == "DDPMScheduler"
    for key in ("sequential_rounds", "target_evaluations", "acceptance_rate", "accepted_run_lengths", "wall_s"):
        assert len(exact[key]) == 2 if isinstance(exact[key], list) else exact[key] > 0
    assert all(1 <= r <= 8 for r in exact["sequential_rounds"])
    assert all(r <= e <= 3 * 8 for r, e in zip(exact["sequential_rounds"], exact["target_evaluations"]))
    assert exact["target_sampler"]["sequential_rounds"] == 8 and exact["target_sampler"]["wall_s"] > 0
    assert set(exact["latency_units_by_workers"]) == {"1", "2", "4", "8"}
    assert on_disk["nfe"] == pytest.approx(sum(exact["target_evaluations"]) / 2)
    # batches of one sample give what one batch of two gives (streams are per seed)
    again = _generate(tmp_path, "scheduler=DDPMScheduler", "exact.window=3", "batch_size=2")
    for key in ("sequential_rounds", "target_evaluations", "acceptance_rate", "accepted_run_lengths"):
        assert again["exact"][key] == exact[key]


def test_a_deterministic_sampler_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="exact.eta.*deterministic") as err:
        _generate(tmp_path)  # dit-shapes' own sampler: DDIM, eta unset (= 0)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()

