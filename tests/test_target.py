"""speca to a quality target: the calibration (deterministic, cached, keyed), the target rule's
pure math, monotone decisions, and clear errors for bad settings."""

from __future__ import annotations

import json
import math

import pytest
import torch

from specdist.calibrate import calibration_for
from specdist.cli import main
from specdist.engine.calibration import Calibration, cache_dir, fit
from specdist.engine.config import CacheConfig
from specdist.engine.decision import ThresholdRule, make_rule
from specdist.engine.speculative import sample_cached
from specdist.engine.target import TargetRule, allowance, budget_for, pass_probability, psnr_of_budget, simulate
from specdist.errors import ConfigError
from specdist.loading import load_model
from specdist.sampling import initial_noise

STEPS = 16


@pytest.fixture(scope="module")
def dit():
    torch.set_num_threads(1)
    return load_model("dit-shapes", device="cpu")


def _calibrate(bundle, **cache):
    cfg = CacheConfig(calibration_samples=2, **cache)
    return calibration_for(bundle, cfg, STEPS, bundle.latent_shape(None, None, None), bundle.default_guidance,
                           log=lambda m: None, progress=False)


def test_calibration_is_deterministic_cached_and_keyed(dit):
    cal, info = _calibrate(dit)
    again, info2 = _calibrate(dit)
    assert not info.reused and info2.reused and info2.path == info.path and info.key == info2.key
    assert again.to_json() == cal.to_json()
    on_disk = json.loads((cache_dir() / f"{info.key}.json").read_text())
    assert Calibration.from_json(on_disk).to_json() == cal.to_json()
    # a refresh recomputes the same numbers (the calibration is a pure function of its inputs)
    fresh, info3 = _calibrate(dit, calibration="refresh")
    assert not info3.reused and fresh.gain == cal.gain and fresh.base == cal.base and fresh.propagation == cal.propagation
    # anything the forecasts depend on is in the key
    _, other = calibration_for(dit, CacheConfig(calibration_samples=2, order=1), STEPS, dit.latent_shape(None, None, None),
                               dit.default_guidance, log=lambda m: None, progress=False)
    assert other.key != info.key and not other.reused
    _, guided = calibration_for(dit, CacheConfig(calibration_samples=2), STEPS, dit.latent_shape(None, None, None), 2.0,
                                log=lambda m: None, progress=False)
    assert guided.key not in (info.key, other.key)
    assert len(cal.gain) == len(cal.base) == len(cal.coef) == STEPS
    assert all(len(p) == STEPS for p in cal.propagation) and cal.growth > 0 and 0 < cal.spec_cost <= 1


def test_a_higher_target_never_needs_fewer_full_steps(dit):
    cal, _ = _calibrate(dit)
    cond = dit.encode([], ["circle", "ring"], dit.default_guidance, 0)
    noise = initial_noise(dit.latent_shape(None, None, None), [0, 1])
    full_steps = []
    for target in (20.0, 30.0, 40.0, 60.0):
        res = sample_cached(dit.transformer, dit.adapter, dit.scheduler, cond, noise, STEPS, "speca",
                            CacheConfig(target_psnr_db=target), progress=False, calibration=cal)
        full_steps.append(res.nfe)
        assert res.stats.rule["target_psnr_db"] == target
    assert full_steps == sorted(full_steps), full_steps
    assert full_steps[0] < STEPS and full_steps[-1] == STEPS  # something is saved; 60 dB computes everything


def test_budget_and_pass_probability_math():
    assert psnr_of_budget(budget_for(35.0)) == pytest.approx(35.0)
    assert budget_for(30.0) > budget_for(40.0)
    p = pass_probability(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64), torch.tensor([2.0] * 3, dtype=torch.float64), 0.5)
    assert p[1] == pytest.approx(0.5) and p[0] > 0.9 and p[2] < 0.1
    hard = pass_probability(torch.tensor([1.0, 3.0], dtype=torch.float64), torch.tensor([2.0, 2.0], dtype=torch.float64), 0.0)
    assert hard.tolist() == [1.0, 0.0]


def test_allowance_simulation_spends_within_budget():
    steps = 20
    damage, base = [1.0] * steps, [0.01] * steps
    forced = frozenset({0, 1})
    budget = 0.1
    cap, plan = allowance(damage, base, 1.0, forced, 8, budget)
    full, curve = simulate(damage, base, 1.0, forced, 8, cap, budget)
    assert curve == plan and 0 < cap <= budget and curve[-1] <= budget
    assert all(b >= a for a, b in zip(curve, curve[1:]))  # spending only grows
    assert full < simulate(damage, base, 1.0, forced, 8, budget * 1e-3, budget)[0]  # a tiny cap computes more


def _toy_calibration(steps=10) -> Calibration:
    return Calibration(key="toy", steps=steps, gain=[2.0] * steps, base=[0.1] * steps, growth=1.0, coef=[0.05] * steps,
                       propagation=[[1.0] * steps], propagation_rms=[0.02], spread=0.3, gain_spread=0.2, spec_cost=0.1)


def test_target_rule_books_damage_per_sample_and_rolls_back_over_budget():
    cal = _toy_calibration()
    rule = TargetRule(CacheConfig(target_psnr_db=30.0, warmup=1), 10, 2, cal)
    samples = torch.tensor([0, 1])
    tiny, huge = 1e-6, 10.0
    ok = rule.accept(3, samples, torch.tensor([tiny, huge], dtype=torch.float64), torch.tensor([False, False]),
                     torch.tensor([0, 0]))
    assert ok.tolist() == [True, False]  # per sample: one check cannot spend the other's budget
    assert rule.spent[0] > 0 and rule.spent[1] == 0
    assert rule.accept(4, samples[:1], torch.tensor([float("nan")], dtype=torch.float64), torch.tensor([False]),
                       torch.tensor([1])).tolist() == [False]  # NaN never passes
    # a sample that has spent its whole budget computes fully without even trying
    rule.spent[0] = rule.budget
    assert rule.must_compute(5, torch.tensor([1, 1]), torch.tensor([True, True]))[0]
    assert rule.threshold(5) > 0 and math.isfinite(rule.threshold(5))


def test_make_rule_chooses_the_schedule_and_needs_a_calibration_for_a_target():
    assert isinstance(make_rule("speca", CacheConfig(tau0=0.1), 10, 1), ThresholdRule)
    with pytest.raises(ValueError, match="needs the model's calibration"):
        make_rule("speca", CacheConfig(), 10, 1)
    with pytest.raises(ValueError, match="calibration is for 10 steps"):
        make_rule("speca", CacheConfig(), 12, 1, calibration=_toy_calibration(10))


def test_fit_recovers_a_power_law():
    steps = 12
    obs = [(i, k, 0.01 * k ** 1.5 / 3.0, 0.01 * k ** 1.5) for i in range(2, steps) for k in (1, 2, 3)]
    gain, base, growth, spread, gain_spread = fit(steps, obs)
    assert growth == pytest.approx(1.5, rel=1e-6) and spread == pytest.approx(0.0, abs=1e-9)
    assert gain[5] == pytest.approx(3.0) and base[5] == pytest.approx(0.01) and gain_spread == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("overrides, needle", [
    (["cache.target_psnr_db=5"], "invalid value for 'cache.target_psnr_db': 5.0 (allowed: null or a PSNR in dB between 10 and 80)"),
    (["cache.target_psnr_db=30", "cache.tau0=0.1"], "invalid value for 'cache.target_psnr_db': 30.0 (allowed: null when cache.tau0 is set"),
    (["cache.beta=0.3"], "invalid value for 'cache.beta': 0.3 (allowed: null unless cache.tau0 is set"),
    (["method=taylorseer", "cache.target_psnr_db=30"], "invalid value for 'cache.target_psnr_db': 30.0 (allowed: null with method=taylorseer"),
    (["cache.calibration=sometimes"], "invalid value for 'cache.calibration': 'sometimes' (allowed: one of ['auto', 'refresh'])"),
])
def test_bad_target_settings_are_one_clear_line(overrides, needle):
    from specdist.config import load_config

    with pytest.raises(ConfigError) as info:
        load_config(None, ["method=speca", *overrides])
    assert needle in str(info.value)


def test_bare_dit_directory_runs_speca_at_the_default_target(dit, tmp_path, capsys):
    """A bare transformer directory with its saved scheduler: ``method=speca`` needs nothing else."""
    bare = tmp_path / "dit"
    dit.transformer.save_pretrained(bare)
    dit.scheduler.save_pretrained(bare / "scheduler")
    out = tmp_path / "out"
    assert main(["generate", "--quiet", "--set", f"model={bare}", "--set", "method=speca", "--set", f"steps={STEPS}",
                 "--set", "num_samples=2", "--set", "cache.calibration_samples=2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["quality_target"]["target_psnr_db"] == 35.0
    assert report["calibration"]["reused"] is False and report["calibration"]["cost_s"] > 0
    assert report["rule"]["target_psnr_db"] == 35.0 and len(report["decisions"]) == 2
    assert report["scheduler"]["config"]["prediction_type"] == "v_prediction"
    # `specdist calibrate` finds the same calibration, cached
    assert main(["calibrate", "--json", "--quiet", "--set", f"model={bare}", "--set", f"steps={STEPS}",
                 "--set", "num_samples=2", "--set", "cache.calibration_samples=2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["reused"] is True and summary["key"] == report["calibration"]["key"]


def test_pipeline_drop_in_runs_to_a_calibrated_target():
    """specdist.enable on a stock FLUX pipeline with a quality target: the calibration made for its
    step count and size drives the hook; another step count is refused in one line."""
    import specdist
    from specdist.calibrate import calibrate_pipeline
    from specdist.engine.pipeline import last_stats
    from specdist.errors import SpecdistError
    from specdist.models.flux import FluxAdapter
    from tiny_pipelines import flux_pipe, text

    pipe = flux_pipe(num_layers=1, num_single_layers=2)
    states, pooled = text(2, 4, 16, 1), torch.randn(2, 8, generator=torch.Generator().manual_seed(2))
    cond = FluxAdapter.conditioning(states, pooled, embedded_guidance=3.5)
    cache = CacheConfig(calibration_samples=2, target_psnr_db=25.0)
    cal = calibrate_pipeline(pipe, num_inference_steps=10, height=32, width=32, cache=cache, conditioning=cond,
                             log=lambda m: None, progress=False)
    specdist.enable(pipe, "speca", cache, calibration=cal)
    try:
        out = pipe(prompt_embeds=states[:1], pooled_prompt_embeds=pooled[:1], height=32, width=32,
                   num_inference_steps=10, output_type="latent").images
        stats = last_stats(pipe)["cond"]
        assert torch.isfinite(out).all() and len(stats.decisions[0]) == 10
        assert stats.rule["target_psnr_db"] == 25.0
        with pytest.raises(SpecdistError, match="calibration is for 10 steps, the trajectory has 6"):
            pipe(prompt_embeds=states[:1], pooled_prompt_embeds=pooled[:1], height=32, width=32,
                 num_inference_steps=6, output_type="latent")
    finally:
        specdist.disable(pipe)


def test_a_missed_target_is_named_in_one_line_with_its_shortfall_and_the_calibration_size():
    from specdist.generate import target_notice

    missed = {"target_psnr_db": 30.0, "worst_psnr_db": 24.6, "met": False, "calibration_samples": 4}
    line = target_notice(missed, 8)
    assert line is not None and "\n" not in line
    assert "24.6 dB" in line and "5.4 dB below the 30 dB target" in line and "saw 4 samples" in line
    assert "worst of 8 samples" in line and "cache.calibration_samples" in line
    assert target_notice({**missed, "worst_psnr_db": 31.0, "met": True}, 8) is None
    assert target_notice({**missed, "worst_psnr_db": "inf", "met": True}, 8) is None
    assert target_notice(None, 8) is None
