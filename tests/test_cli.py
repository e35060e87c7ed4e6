"""The ``specdist`` command line, end to end on the shipped zoo models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from specdist.cli import main
from specdist.config import METHODS
from specdist.engine.config import CACHE_METHODS
from specdist.zoo.specs import ZOO_SPECS


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specdist", *args], capture_output=True, text=True, timeout=300)


def test_generate_image_model_end_to_end_and_deterministic(tmp_path, capsys):
    common = ["generate", "--config", "configs/dit-shapes.yaml", "--quiet",
              "--set", "steps=4", "--set", "num_samples=3", "--set", "batch_size=2"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    for key in ("model", "method", "steps", "num_samples", "nfe", "wall_s", "output_sha256", "environment"):
        assert key in a, key
    assert a["model"] == "dit-shapes" and a["method"] == "full" and a["steps"] == 4 and a["num_samples"] == 3
    assert a["nfe"] == 4 and a["environment"]["device"] == "cpu"
    assert a["output_sha256"] == b["output_sha256"]
    assert a["class_labels"] == ["circle", "square", "triangle"]
    assert (tmp_path / "a" / "grid.png").stat().st_size > 0
    assert (tmp_path / "a" / "latents.safetensors").is_file()
    assert capsys.readouterr().out == ""  # --quiet
    # a different seed gives a different result
    assert main([*common, "--set", "seed=1", "--out", str(tmp_path / "c")]) == 0
    c = json.loads((tmp_path / "c" / "report.json").read_text())
    assert c["output_sha256"] != a["output_sha256"]


def test_generate_video_model_writes_mp4_and_speca_reports_quality(tmp_path):
    out = tmp_path / "v"
    assert main(["generate", "--quiet", "--set", "steps=6", "--set", "num_samples=2", "--set", "method=speca",
                 "--set", "cache.warmup=2", "--set", "cache.granularity=block", "--set", "cache.min_run=1",
                 "--set", "cache.tau0=1e9", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "hunyuan-shapes-video" and report["media"] == ["video.mp4", "frames.png"]
    assert report["prompts"] == ["red square moving right", "blue circle moving down"]
    assert (out / "video.mp4").stat().st_size > 0
    assert len(report["decisions"]) == 2 and all(len(d) == 6 for d in report["decisions"])
    assert report["reference"]["pixels"]["psnr_db"]["per_sample"]
    assert report["cache_bytes"] > 0
    assert report["cached_blocks"] == 16 and report["decisions"] == ["FFAAAA"] * 2
    assert report["probed"] == [3, 3]  # min_run 1: the first forecast after a full step goes unchecked
    overhead = report["verification_overhead"]
    assert 0 < overhead["flops_fraction_of_full_inference"] < overhead["speculative_flops_fraction_of_full_inference"]
    assert 0 < overhead["speculative_time_fraction_of_full_inference"] < 1


def test_generate_one_frame_wan_model_writes_an_image_grid(tmp_path):
    out = tmp_path / "w"
    assert main(["generate", "--quiet", "--set", "model=wan-shapes", "--set", "steps=3", "--set", "num_samples=2",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "wan-shapes" and report["model_class"] == "WanTransformer3DModel"
    assert report["prompts"] == ["red circle", "green square"]  # the model's own default prompts
    assert report["latent_shape"] == [3, 1, 32, 32] and report["tokens"] == {"video": 64, "text": 6}
    assert report["media"] == ["grid.png"] and (out / "grid.png").stat().st_size > 0
    assert report["guidance_scale"] == 3.5 and report["nfe"] == 3


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "steps=0"], "invalid value for 'steps': 0"),
        (["--set", "modle=x"], "unknown config key 'modle'"),
        (["--set", "model=/nonexistent/model"], "model path not found: /nonexistent/model"),
        (["--set", "model=dit-shapes", "--set", "class_labels=[banana]"], "invalid value for 'class_labels': 'banana'"),
        (["--config", "/nonexistent.yaml"], "config file not found: /nonexistent.yaml"),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, needle, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier result")
    proc = _run("generate", *args, "--out", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "keep.txt").read_text() == "earlier result"  # nothing clobbered


def test_failed_run_leaves_previous_output_intact(tmp_path, monkeypatch):
    from specdist import generate as gen
    from specdist.config import load_config

    out = tmp_path / "out"
    cfg = load_config("configs/dit-shapes.yaml", ["steps=2", "num_samples=1", f"output.dir={out}"])
    gen.run_generate(cfg, progress=False, log=lambda m: None)
    before = (out / "report.json").read_text()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gen.media, "save_image_grid", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        gen.run_generate(load_config("configs/dit-shapes.yaml", ["steps=3", "num_samples=1", f"output.dir={out}"]),
                         progress=False, log=lambda m: None)
    assert (out / "report.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.staging")]


def test_models_and_info_commands(capsys):
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert "dit-shapes" in text and "hunyuan-shapes-video" in text and "HunyuanVideoTransformer3DModel" in text
    assert "wan-shapes" in text
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == {"dit-shapes", "hunyuan-shapes-video", "wan-shapes"}
    assert all(r["available"] and r["parameters"] > 0 for r in rows)
    assert main(["info", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["torch"] and env["diffusers"]
    if not env["cuda_available"]:
        assert env["gpus"]["available"] is False and env["gpus"]["reason"]


def test_unwritable_output_dir_is_one_line(tmp_path):
    proc = _run("generate", "--set", "model=dit-shapes", "--set", "steps=2", "--set", "output.dir=/proc/x")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "output.dir '/proc/x' cannot be written" in lines[0], proc.stderr


def test_a_feature_the_model_does_not_support_is_one_line_and_writes_nothing(tmp_path):
    """Adapters refuse what a model cannot do (here: token level on HunyuanVideo's first-frame
    token replacement) with an ``UnsupportedError``: the CLI prints it in one line, exits 2 and
    leaves no output directory behind."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                           patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
                                           rope_axes_dim=(2, 2, 4), image_condition_type="token_replace")
    model.save_pretrained(tmp_path / "m")
    FlowMatchEulerDiscreteScheduler().save_pretrained(tmp_path / "m" / "scheduler")
    out = tmp_path / "out"
    proc = _run("generate", "--quiet", "--set", f"model={tmp_path / 'm'}", "--set", "method=specdiff", "--set", "steps=3",
                "--set", "num_samples=1", "--set", "height=8", "--set", "width=8", "--set", "frames=2",
                "--set", "runtime.backend=none", "--out", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "token-level caching is not supported" in lines[0], proc.stderr
    assert not out.exists()


def test_report_records_the_scheduler_used(tmp_path):
    out = tmp_path / "o"
    assert main(["generate", "--quiet", "--set", "model=dit-shapes", "--set", "steps=3", "--set", "num_samples=1",
                 "--set", "scheduler=DDPMScheduler", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["scheduler"]["class"] == "DDPMScheduler"
    assert report["scheduler"]["config"]["prediction_type"] == "v_prediction"


@pytest.mark.parametrize("model", list(ZOO_SPECS))
@pytest.mark.parametrize("method", METHODS)
def test_generate_runs_every_method_on_every_zoo_model(tmp_path, repo_root, one_thread, model, method):
    """Every method the README lists, through ``specdist generate``, on every shipped zoo model
    (few steps, one sample): it runs, writes its media, and reports what the method did."""
    assert f"`{method}`" in (repo_root / "README.md").read_text()
    steps, out = 6, tmp_path / "o"
    sampler = []  # exact needs a stochastic sampler: DDPM for DDIM models, the stochastic flow Euler step
    if method == "exact":
        sampler = (["--set", "scheduler=DDPMScheduler"] if ZOO_SPECS[model].scheduler_class == "DDIMScheduler"
                   else ["--set", "scheduler_config.stochastic_sampling=true"])
    if method == "picard":  # a worker pool in latency mode
        sampler = ["--set", "runtime.backend=local", "--set", "runtime.mode=latency", "--set", "runtime.workers=2"]
    assert main(["generate", "--quiet", "--set", f"model={model}", "--set", f"method={method}",
                 "--set", f"steps={steps}", "--set", "num_samples=1", *sampler, "--out", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    assert (r["model"], r["method"], r["steps"], r["num_samples"]) == (model, method, steps, 1)
    assert r["conditioning"] in ("class", "text_encoder")
    assert r["media"] and all((out / m).stat().st_size > 0 for m in r["media"])
    if method == "exact":  # rounds <= steps; evaluations up to window x rounds; its baseline is the target sampler
        (rounds,), (evals,) = r["exact"]["sequential_rounds"], r["exact"]["target_evaluations"]
        assert 1 <= rounds <= steps and rounds <= evals == r["nfe"] and "reference" not in r
        assert r["exact"]["target_sampler"]["sequential_rounds"] == steps
        return
    if method == "picard":  # rounds on the critical path; every state a full call per round it is in
        (sample,) = r["runtime"]["per_sample"]
        assert len(sample["decisions"]) == steps and set(sample["decisions"]) <= set("FA")
        assert 1 <= r["runtime"]["critical_path_full_steps"] <= steps <= r["nfe"] and r["reference"]["output_sha256_full"]
        return
    assert 0 < r["nfe"] <= steps and r["flops"]["per_sample"] > 0
    if method == "full":
        assert r["nfe"] == steps and "reference" not in r
        return
    ref = r["reference"]  # the full-compute run of the same seeds
    assert 0.0 <= ref["latent_rel_l2"]["worst"] < 10.0 and ref["output_sha256_full"]
    assert (ref["latent_rel_l2"]["worst"] == 0.0) == (r["output_sha256"] == ref["output_sha256_full"])
    if method in CACHE_METHODS:
        (decisions,) = r["decisions"]
        assert len(decisions) == steps and set(decisions) <= set("FAR")
        assert r["nfe"] == decisions.count("F") + decisions.count("R")
        if method != "speca":  # fixed interval 3 after 3 warm-up steps
            assert decisions == "FFFAAF" and r["output_sha256"] != ref["output_sha256_full"]
    else:
        assert r["peer"] and len(r["work_per_step"]) == steps and r["work_per_step"][0] == 1.0
