"""Config loading, validation and --set overrides."""

from __future__ import annotations

import pytest

from specdist.config import GenerateConfig, apply_overrides, config_from_dict, load_config
from specdist.errors import ConfigError


def test_defaults_are_valid():
    cfg = load_config(None)
    assert isinstance(cfg, GenerateConfig)
    assert cfg.model == "hunyuan-shapes-video" and cfg.method == "full" and cfg.steps == 50


def test_default_yaml_loads_and_overrides_apply(repo_root):
    cfg = load_config(repo_root / "configs" / "default.yaml", ["steps=7", "output.fps=12", "prompt=red square moving up"])
    assert cfg.steps == 7
    assert cfg.output.fps == 12
    assert cfg.prompt == ["red square moving up"]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("stepz=3", "unknown config key 'stepz'"),
        ("output.colour=red", "unknown config key 'output.colour'"),
        ("steps=0", "invalid value for 'steps': 0 (allowed: an integer >= 1)"),
        ("steps=many", "invalid value for 'steps': 'many' (allowed: an integer)"),
        ("method=turbo", "invalid value for 'method': 'turbo' (allowed: one of ['full', 'fora', 'taylorseer', 'speca', 'specdiff', 'diffusers-fbcache'"),
        ("cache.metric=l3", "invalid value for 'cache.metric': 'l3'"),
        ("cache.order=9", "invalid value for 'cache.order': 9 (allowed: an integer 0..6)"),
        ("cache.max_run=0", "invalid value for 'cache.max_run': 0"),
        ("cache.tau=1", "unknown config key 'cache.tau'"),
        ("device=tpu", "invalid value for 'device': 'tpu'"),
        ("dtype=int8", "invalid value for 'dtype': 'int8'"),
        ("guidance_scale=0.5", "invalid value for 'guidance_scale': 0.5"),
        ("output.save_latents=maybe", "invalid value for 'output.save_latents': 'maybe' (allowed: true or false)"),
        ("output=3", "invalid value for 'output': 3"),
        ("noequals", "invalid override 'noequals'"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_override_nested_creates_sections_and_rejects_scalar_parent():
    data = apply_overrides({}, ["output.dir=/tmp/x"])
    assert data == {"output": {"dir": "/tmp/x"}}
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"steps": 3}, ["steps.x=1"])


def test_types_are_coerced_strictly():
    cfg = config_from_dict({"guidance_scale": 3, "class_labels": [1, "circle"]})
    assert cfg.guidance_scale == 3.0 and isinstance(cfg.guidance_scale, float)
    assert cfg.class_labels == ["1", "circle"]
    with pytest.raises(ConfigError, match="'seed': True"):
        config_from_dict({"seed": True})
    # PyYAML (YAML 1.1) reads "1e9" as a string; a float field takes it, garbage still fails.
    assert load_config(None, ["cache.tau0=1e9"]).cache.tau0 == 1e9
    with pytest.raises(ConfigError, match="invalid value for 'cache.tau0': 'lots' \\(allowed: a number\\)"):
        load_config(None, ["cache.tau0=lots"])
