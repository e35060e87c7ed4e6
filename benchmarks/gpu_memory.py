"""GPU memory and step time of block-level caching on full-size HunyuanVideo (random bf16 weights).

    python benchmarks/gpu_memory.py --size 544p                # every run, one process (est. ~5 min on an H100)
    python benchmarks/gpu_memory.py --size 720p --runs full speca speca-fp8 speca-host            # est. ~6 min
    python benchmarks/gpu_memory.py --size 720p --runs speca-host-fp8 speca-all-on-device \
        diffusers-taylorseer diffusers-taylorseer-lite                                          # est. ~6 min
    python benchmarks/gpu_memory.py --tiny --device cpu        # a CPU dry run of the script (tiny model)

Runs of a later command for the same size are merged into that size's result files (a run named
again replaces the earlier one). Time estimates are DESIGN §1's H100 step times × the steps run,
not measurements.

NOT RUN ON A GPU YET: this project has had no GPU machine. The script is written to run as it
is on one CUDA GPU (80 GB class) and has been dry-run on CPU with ``--tiny`` only; the numbers in
``benchmarks/results/gpu_memory.md`` until then are arithmetic, labelled as such.

What it measures, in one process per size (the model is built once, every run resets the
allocator's peak and frees its caches before the next): diffusers 0.42's
``HunyuanVideoTransformer3DModel`` in its default 12.8B configuration with random bf16 weights,
batch 1, 256 text tokens, embedded guidance 6, at 544×960×129f (latent 16×33×68×120, 67,320 video
tokens) or 720×1280×129f (16×33×90×160, 118,800 tokens); attention ``auto`` (what ran is recorded).
Runs (``--runs``; each a few steps, the step kinds timed separately with CUDA synchronisation):

* ``full`` — every step the whole model (DESIGN §1's baseline: 11.1 s / 31.8 s per step on an H100,
  30.9 / 36.3 GiB peak).
* ``speca`` — block-level ``speca`` under the default 16 GiB device budget, factors in the model's
  dtype (bf16); ``speca-fp8`` — the same with ``cache.storage_dtype: float8_e4m3fn``;
  ``speca-host`` / ``speca-host-fp8`` — ``cache.host_offload: true`` (every block cached in pinned
  host memory, the next block's branches prefetched on a side stream); ``speca-all-on-device`` —
  every block on the device (``max_cache_bytes: 0``), expected not to fit at 720p.
  The speculative steps accept every forecast (τ = ∞, a fixed schedule): with random weights the
  decisions say nothing; what is measured is the memory and time of each step kind. The first full
  step of a block-level run is the measuring call, the second records; steps after that speculate.
* ``diffusers-taylorseer`` — diffusers' ``TaylorSeerCacheConfig(cache_interval=5, max_order=1)``
  with diffusers' own default module patterns and bf16 factors (DESIGN §1: out of memory at 544p
  and 720p on an 80 GB H100); ``diffusers-taylorseer-lite`` — its lite mode.

An out-of-memory run is recorded as such (``"oom": true`` with the allocator's message), and so is
a run the engine refuses (``"refused"``: e.g. ``speca-host`` at 720p keeps 117 GB = 109 GiB of bf16
factors page-locked, which a host with less than 137 GiB of memory refuses: at most 80 % of it is
page-locked); the benchmark goes on. Results: ``<out>/gpu_memory_<size>.json`` and ``gpu_memory_<size>.md``; peak
memory is ``torch.cuda.max_memory_allocated`` (this process's tensors) and NVML's device-wide peak
(:class:`specdist.metrics.telemetry.GpuTelemetry`); cache bytes on the device and in host memory
come from the engine's own accounting.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch

from specdist.attention import apply_attention_backend
from specdist.engine.config import CacheConfig, PeerConfig
from specdist.engine.hooks import SpeculationHooks
from specdist.engine.peers import sample_with_peer
from specdist.engine.speculative import SpeculativeStepper, forecaster_time
from specdist.env import environment
from specdist.errors import ConfigError
from specdist.metrics.telemetry import GpuTelemetry
from specdist.models import adapter_for
from specdist.models.hunyuan_video import HunyuanVideoAdapter
from specdist.sampling import fresh_scheduler, init_latents, initial_noise, model_dtype

OUT = Path(__file__).parent / "results"
SIZES = {"544p": (16, 33, 68, 120), "720p": (16, 33, 90, 160), "tiny": (4, 3, 4, 4)}
DESIGN_H100 = {"544p": {"s_per_step": 11.1, "peak_gib": 30.9}, "720p": {"s_per_step": 31.8, "peak_gib": 36.3}}
RUNS = ("full", "speca", "speca-fp8", "speca-host", "speca-host-fp8", "speca-all-on-device",
        "diffusers-taylorseer", "diffusers-taylorseer-lite")
_GIB = 2**30


def build(tiny: bool, device: torch.device, dtype: torch.dtype):
    """HunyuanVideo with random weights made directly on ``device`` in ``dtype`` (default 12.8B config,
    or a tiny one for a CPU dry run), its adapter, a flow-matching scheduler and 256-token conditioning."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel

    kwargs = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                  num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
                  pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)) if tiny else {}
    before = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = HunyuanVideoTransformer3DModel(**kwargs).eval()
    finally:
        torch.set_default_dtype(before)
    adapter = adapter_for(model)
    text = 6 if tiny else 256
    g = torch.Generator().manual_seed(1)
    cond = HunyuanVideoAdapter.conditioning(torch.randn(1, text, model.config.text_embed_dim, generator=g),
                                            torch.ones(1, text, dtype=torch.bool),
                                            torch.randn(1, model.config.pooled_projection_dim, generator=g),
                                            embedded_guidance=6.0)
    return model, adapter, FlowMatchEulerDiscreteScheduler(shift=7.0), cond.to(device, dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / _GIB if device.type == "cuda" else None


def run_cached(model, adapter, scheduler, cond, noise, steps: int, cfg: CacheConfig,
               device: torch.device) -> dict[str, Any]:
    """Block-level speca with every forecast accepted; each step timed on its own (CUDA synced)."""
    sched = fresh_scheduler(scheduler)
    adapter.set_timesteps(sched, steps, tuple(noise.shape[1:]), device)
    latents = init_latents(sched, noise, device)
    dtype = model_dtype(model)
    hooks = SpeculationHooks(model, adapter, cfg.probe_block, cfg.granularity)
    stepper = SpeculativeStepper(hooks, "speca", cfg, 1, threshold_fn=lambda i: float("inf"))
    times = []
    try:
        with torch.inference_mode():
            for i, t in enumerate(sched.timesteps):
                x_in = latents.to(dtype)
                call = lambda idx: adapter.predict(model, x_in[idx.to(device)], t, cond.select(idx)).float()
                _sync(device)
                began = time.perf_counter()
                out = stepper.step(i, steps, forecaster_time(cfg, i, t, 1000.0), call)
                latents = sched.step(out, t, latents, return_dict=False)[0]
                _sync(device)
                times.append(time.perf_counter() - began)
    finally:
        hooks.remove()
    decisions = "".join(stepper.stats.decisions[0])
    full = [s for s, d in zip(times, decisions) if d != "A"]
    spec = [s for s, d in zip(times, decisions) if d == "A"]
    stats = stepper.stats
    return {"decisions": decisions, "step_s": [round(s, 3) for s in times],
            "full_step_s": round(min(full[1:] or full), 3) if full else None,  # the measuring call excluded
            "speculative_step_s": round(min(spec), 3) if spec else None,
            "cached_blocks": stats.extra.get("cached_blocks"), "order": stats.effective_order,
            "cache_gib": stats.cache_bytes / _GIB,
            "cache_host_gib": stats.extra.get("cache_host_bytes", 0) / _GIB,
            "cache_device_gib": (stats.cache_bytes - stats.extra.get("cache_host_bytes", 0)) / _GIB}


def run_full(model, adapter, scheduler, cond, noise, steps: int, device: torch.device) -> dict[str, Any]:
    """Every step the whole model, each timed."""
    sched = fresh_scheduler(scheduler)
    adapter.set_timesteps(sched, steps, tuple(noise.shape[1:]), device)
    latents, dtype, times = init_latents(sched, noise, device), model_dtype(model), []
    with torch.inference_mode():
        for t in sched.timesteps:
            _sync(device)
            began = time.perf_counter()
            out = adapter.predict(model, latents.to(dtype), t, cond).float()
            latents = sched.step(out, t, latents, return_dict=False)[0]
            _sync(device)
            times.append(time.perf_counter() - began)
    return {"step_s": [round(s, 3) for s in times], "full_step_s": round(min(times[1:] or times), 3)}


def run_peer(model, adapter, scheduler, cond, noise, steps: int, lite: bool) -> dict[str, Any]:
    """diffusers' TaylorSeerCache (interval 5, order 1, bf16 factors, diffusers' default patterns)."""
    from diffusers.hooks.taylorseer_cache import _TRANSFORMER_BLOCK_IDENTIFIERS

    peer = PeerConfig(taylorseer_cache_interval=5, taylorseer_max_order=1, taylorseer_factors_dtype="bfloat16",
                      taylorseer_cache_identifiers=list(_TRANSFORMER_BLOCK_IDENTIFIERS), taylorseer_lite=lite)
    began = time.perf_counter()
    res = sample_with_peer(model, adapter, scheduler, cond, noise, steps, "diffusers-taylorseer", peer,
                           progress=False)
    return {"wall_s": round(time.perf_counter() - began, 3), "s_per_step": round(res.wall_s / steps, 3),
            "work_per_step": [round(w, 3) for w in (res.work or [])]}


def one(name: str, model, adapter, scheduler, cond, noise, steps: int, device: torch.device) -> dict[str, Any]:
    """Run ``name``; out of memory is a result."""
    _free(device)
    base = dict(granularity="block", warmup=2, max_run=steps, min_run=0)
    configs = {
        "speca": CacheConfig(**base),
        "speca-fp8": CacheConfig(**base, storage_dtype="float8_e4m3fn"),
        "speca-host": CacheConfig(**base, host_offload=True),
        "speca-host-fp8": CacheConfig(**base, host_offload=True, storage_dtype="float8_e4m3fn"),
        "speca-all-on-device": CacheConfig(**base, max_cache_bytes=0),
    }
    row: dict[str, Any] = {"run": name}
    try:
        with GpuTelemetry(interval_s=0.2) as tel:
            if name == "full":
                row.update(run_full(model, adapter, scheduler, cond, noise, steps, device))
            elif name in configs:
                cfg = configs[name]
                cfg.validate()
                row.update(run_cached(model, adapter, scheduler, cond, noise, steps, cfg, device))
                row["cache"] = {k: getattr(cfg, k) for k in ("storage_dtype", "host_offload", "max_cache_bytes",
                                                              "max_host_bytes")}
            else:
                row.update(run_peer(model, adapter, scheduler, cond, noise, steps, lite=name.endswith("lite")))
        row["oom"] = False
    except torch.cuda.OutOfMemoryError as err:
        row.update(oom=True, error=str(err).strip().splitlines()[0][:300])
        tel = None
    except (ConfigError, MemoryError) as err:  # e.g. a host cache larger than 80 % of this machine's memory
        row.update(oom=False, refused=str(err).strip().splitlines()[0][:400])
        tel = None
    row["peak_gib"] = _peak(device)
    if tel is not None:
        gpus = tel.summary().get("gpus") or []
        row["nvml_peak_gib"] = max((g["memory_used_peak_mib"] or 0) / 1024 for g in gpus) if gpus else None
    return row


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table."""
    size, env = result["size"], result["environment"]
    gpu = (env.get("gpus") or {}).get("gpus") or [{}]
    lines = [f"# GPU memory and step time — HunyuanVideo {size} (random {result['weights_dtype']} weights)", "",
             f"Measured by `python benchmarks/gpu_memory.py --size {size}` on {gpu[0].get('name', env['device'])}; "
             f"torch {env['torch']}, diffusers {env['diffusers']}; attention backend "
             f"`{result['attention']['backend']}`; {result['steps']} steps per run, latent {result['latent']}.", "",
             "| run | peak GiB (torch) | peak GiB (NVML) | full step s | speculative step s | cached blocks | "
             "cache GiB device / host | decisions |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, p=2: "—" if v is None else f"{v:.{p}f}"
    for r in result["runs"]:
        if r.get("oom"):
            lines.append(f"| {r['run']} | out of memory | {fmt(r.get('nvml_peak_gib'))} | | | | | |")
            continue
        if r.get("refused"):
            lines.append(f"| {r['run']} | refused: {r['refused']} | | | | | | |")
            continue
        full = r.get("full_step_s", r.get("s_per_step"))
        lines.append(f"| {r['run']} | {fmt(r['peak_gib'])} | {fmt(r.get('nvml_peak_gib'))} | {fmt(full)} | "
                     f"{fmt(r.get('speculative_step_s'))} | {r.get('cached_blocks', '—')} | "
                     f"{fmt(r.get('cache_device_gib'))} / {fmt(r.get('cache_host_gib'))} | "
                     f"{r.get('decisions', '—')} |")
    ref = DESIGN_H100.get(size)
    if ref:
        lines += ["", f"DESIGN §1 (one H100, full step): {ref['s_per_step']} s per step, {ref['peak_gib']} GiB peak."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=[s for s in SIZES if s != "tiny"], default="720p")
    ap.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    ap.add_argument("--steps", type=int, default=4, help="steps per run (block level: 2 full, then speculative)")
    ap.add_argument("--tiny", action="store_true", help="a tiny HunyuanVideo (dry run of this script)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_memory.py: no CUDA GPU here (use --tiny --device cpu for a dry run of the script)")
    if not args.tiny and device.type != "cuda":
        raise SystemExit("gpu_memory.py: the full-size model needs --device cuda (or --tiny for a dry run)")
    size = "tiny" if args.tiny else args.size
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    model, adapter, scheduler, cond = build(args.tiny, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    attention = apply_attention_backend(model, adapter, "auto")
    noise = initial_noise(SIZES[size], [0])
    result = {"size": size, "latent": list(SIZES[size]), "steps": args.steps, "attention": attention,
              "weights_dtype": str(model_dtype(model)).removeprefix("torch."),
              "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / _GIB,
              "environment": environment(device), "runs": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_memory_{size}.json"
    earlier = json.loads(path.read_text())["runs"] if path.is_file() else []
    for name in args.runs:
        print(f"gpu_memory: {size} {name} ...", flush=True)
        steps = 2 if name == "full" else args.steps  # full: one warm step, one timed
        result["runs"].append(one(name, model, adapter, scheduler, cond, noise, steps, device))
        print(f"  {json.dumps(result['runs'][-1])}", flush=True)
    names = {r["run"] for r in result["runs"]}
    result["runs"] = [r for r in earlier if r["run"] not in names] + result["runs"]
    result["runs"].sort(key=lambda r: RUNS.index(r["run"]))
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"gpu_memory_{size}.md").write_text(markdown(result))
    print(f"gpu_memory: wrote {out / f'gpu_memory_{size}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
