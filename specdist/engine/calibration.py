"""Training-free calibration behind ``speca``'s quality target (DESIGN §2.2; the module doc of
:mod:`specdist.engine.target` says how it is used).

Learning-to-Cache learns per-step caching decisions by training; MagCache measures per-step
magnitude ratios in a calibration run. specdist measures, without training, how a forecast error
at step ``i`` *as the verifier sees it* turns into damage in the final output. Two runs of the
model from the same seeds, on its own default conditioning:

* **A, full compute** — the reference trajectory; at every step the sampler's coefficient on the
  model output (``‖S(x, 2F) − S(x, F)‖ / ‖F‖``: how far the next state moves per unit of output)
  and the output's size. A and B run in lockstep, so their difference is known at every step.
* **B, the shadow run** — every speculative step runs the speculative call *with the check* (the
  verifier's error ``v``) and the full model at the same state (the true output: output error
  ``o``, and the latent error ``e`` the forecast would inject). An oracle then accepts the forecast
  while the sample's injected error stays within a budget paced evenly over the steps (even
  samples at the 40 dB budget, odd ones at 30 dB: two damage levels around the targets users ask
  for), else rolls back to the true output (whose features join the history, as in the engine).
  So B's trajectory carries real forecast damage at a realistic level, and its final output,
  against A's, shows how that damage propagated.

Fitted per step ``i`` (steps B never speculated on are interpolated from their neighbours):

* ``gain[i]``  = median ``o / v``: output error per unit of verifier error;
* ``base[i]``, ``growth`` = the fit ``o ≈ base[i] · k^growth`` over run lengths ``k``;
* ``coef[i]`` = ``coef · RMS(F_i) · px``: the RMS latent error a relative output error of 1 injects
  at step ``i`` (the sampler's coefficient times the output's size), in pixels (``px``: the
  decoder's pixel-over-latent RMS ratio, 1 for pixel-space models);
* ``propagation[i]`` = how much of an error injected at step ``i`` reaches the final output: the
  product of the later steps' measured amplification ``a_j = RMS(M_j d_j) / RMS(d_j)`` (``d_j`` =
  B − A before step ``j``, ``M_j d_j`` what one full sampler step makes of it — ``> 1`` where the
  sampler amplifies deviations, typically early, while the layout forms), times the sample's
  coherence (its final damage over ``Σ_i gain-to-end_i · injected_i``: directions partly cancel);
  per damage level, the largest over its samples (:meth:`Calibration.propagation_at` interpolates
  between the levels);
* ``spread`` = standard deviation of ``log o`` around the fit; ``gain_spread`` = that of
  ``log(o / (gain · v))``, how far one check's reading may be off;
* ``spec_cost`` = wall time of a speculative call over a full one (B's calls over A's).

Cost: two full generations of ``cache.calibration_samples`` samples, plus B's speculative calls.
The result is cached on disk (:func:`ensure_calibration`), keyed by everything it depends on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..models.base import Conditioning, ModelAdapter
from ..sampling import fresh_scheduler, init_latents, model_dtype, scale_input, snapshot
from .config import CacheConfig
from .decision import Rule, forced_steps, forecaster_time
from .hooks import SpeculationHooks
from .verify import forecast_error

CALIBRATION_VERSION = 1
SHADOW_LEVELS_DB = (40.0, 30.0)
"""B's damage levels: sample ``s`` accepts forecasts while the latent error they inject stays
within the budget of ``SHADOW_LEVELS_DB[s % 2]`` dB, paced evenly over the steps."""
CALIBRATION_SEED = 1000
"""Calibration sample ``s`` starts from the noise of seed ``CALIBRATION_SEED + s``."""


@dataclass
class Calibration:
    """A model's calibration for one setting (see the module doc). Lists are per step."""

    key: str
    steps: int
    gain: list[float]
    base: list[float]
    growth: float
    coef: list[float]
    propagation: list[list[float]]
    propagation_rms: list[float]
    spread: float
    gain_spread: float
    spec_cost: float
    meta: dict[str, Any] = field(default_factory=dict)

    def propagation_at(self, rms: float) -> list[float]:
        """Per-step propagation at a final damage of ``rms``: log-log interpolation between the
        damage levels B measured (deviations are damped more when small; large ones move content),
        the nearest level's profile beyond them."""
        levels = sorted((d, p) for d, p in zip(self.propagation_rms, self.propagation) if d > 0) or \
            [(0.0, max(self.propagation, key=max))]  # no damage seen (too few steps): the larger profile
        if rms <= levels[0][0] or len(levels) == 1:
            return list(levels[0][1])
        if rms >= levels[-1][0]:
            return list(levels[-1][1])
        for (d0, p0), (d1, p1) in zip(levels, levels[1:]):
            if d0 <= rms <= d1:
                w = math.log(rms / d0) / math.log(d1 / d0) if d1 > d0 else 0.0
                return [math.exp((1 - w) * math.log(max(a, 1e-12)) + w * math.log(max(b, 1e-12)))
                        for a, b in zip(p0, p1)]
        return list(levels[-1][1])

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (floats rounded for readability, inf as strings)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Calibration":
        """Inverse of :meth:`to_json`."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def _paced_budgets(samples: int, steps: int) -> torch.Tensor:
    """``[steps, n]``: B's allowed injected damage (latent RMS) by the end of each step."""
    levels = torch.tensor([2.0 * 10.0 ** (-SHADOW_LEVELS_DB[s % 2] / 20.0) for s in range(samples)], dtype=torch.float64)
    return levels[None, :] * (torch.arange(1, steps + 1, dtype=torch.float64)[:, None] / steps)


def _rows_of(recorded: dict[str, tuple[torch.Tensor, ...]], keep: torch.Tensor, n: int) -> dict:
    """The recorded features of the samples at positions ``keep`` of a call over ``n`` samples
    (rows ``[cond…, uncond…]`` when each sample carries several rows)."""
    out = {}
    for name, tensors in recorded.items():
        branches = tensors[0].shape[0] // n
        rows = torch.cat([keep + k * n for k in range(branches)]).to(tensors[0].device)
        out[name] = tuple(t[rows] for t in tensors)
    return out


def _rms(t: torch.Tensor) -> torch.Tensor:
    """Per-row RMS ``[B]`` of ``t`` (float64)."""
    return t.double().flatten(1).pow(2).mean(dim=1).sqrt()


def _output_coefficient(sched: Any, out: torch.Tensor, t: Any, x: torch.Tensor) -> torch.Tensor:
    """``[B]``: how far the sampler's next state moves per unit of model output at this step."""
    a = snapshot(sched).step(out, t, x, return_dict=False)[0]
    b = snapshot(sched).step(out * 2.0, t, x, return_dict=False)[0]
    return _rms(b - a) / _rms(out).clamp_min(1e-12)


def _interpolate(values: list[float | None]) -> list[float]:
    """Fill ``None`` entries linearly between known neighbours (nearest known at the ends)."""
    known = [i for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if not known:
        return [float("nan")] * len(values)
    out = []
    for i, v in enumerate(values):
        if v is not None and math.isfinite(v):
            out.append(float(v))
            continue
        lo = max((k for k in known if k < i), default=None)
        hi = min((k for k in known if k > i), default=None)
        if lo is None or hi is None:
            out.append(float(values[lo if hi is None else hi]))
        else:
            w = (i - lo) / (hi - lo)
            out.append(float(values[lo]) * (1 - w) + float(values[hi]) * w)
    return out


def _smooth(values: list[float], window: int = 5) -> list[float]:
    """Running median over ``window`` steps (keeps the trajectory's phases, drops outliers)."""
    half = window // 2
    return [statistics.median(values[max(0, i - half):i + half + 1]) for i in range(len(values))]


def fit(steps: int, observations: list[tuple[int, int, float, float]]) -> tuple[list[float], list[float], float, float,
                                                                           float]:
    """Fit ``(gain, base, growth, spread, gain_spread)`` from B's observations ``(step, k, v, o)`` (run length
    ``k``, verifier error ``v``, output error ``o``); see the module doc. Pure arithmetic."""
    obs = [(i, k, v, o) for i, k, v, o in observations if o > 0 and math.isfinite(o)]
    if not obs:
        raise ValueError("calibration observed no speculative step (too few steps after the warm-up?)")
    per_step: dict[int, list[tuple[int, float, float]]] = {}
    for i, k, v, o in obs:
        per_step.setdefault(i, []).append((k, v, o))
    gain = _interpolate([statistics.median([o / v for _, v, o in per_step[i] if v > 0]) if any(
        v > 0 for _, v, _ in per_step.get(i, [])) else None for i in range(steps)])
    # o ≈ base[i] · k^growth: a common slope from the within-step variation of log o over log k
    # (fixed effects per step), then the per-step levels (median, smoothed over neighbouring steps)
    sxy = sxx = 0.0
    for i, rows in per_step.items():
        xs = [math.log(k) for k, _, _ in rows]
        ys = [math.log(o) for _, _, o in rows]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxy += sum((x - mx) * (y - my) for x, y in zip(xs, ys))
        sxx += sum((x - mx) ** 2 for x in xs)
    growth = min(4.0, max(0.5, sxy / sxx)) if sxx > 0 else 1.0
    raw = [statistics.median([math.log(o) - growth * math.log(k) for k, _, o in per_step[i]])
           if i in per_step else None for i in range(steps)]
    log_base = _smooth(_interpolate(raw))
    residuals = [math.log(o) - log_base[i] - growth * math.log(k) for i, k, _, o in obs]
    spread = statistics.pstdev(residuals) if len(residuals) > 1 else 0.5
    misread = [math.log(o / (gain[i] * v)) for i, _, v, o in obs if v > 0 and gain[i] > 0]
    gain_spread = statistics.pstdev(misread) if len(misread) > 1 else 0.5
    base = [math.exp(v) for v in log_base]
    return gain, base, growth, spread, gain_spread


def _lockstep(model: nn.Module, adapter: ModelAdapter, scheduler: Any, cond: Conditioning, noise: torch.Tensor,
              steps: int, cfg: CacheConfig, shadow: int, bar: Any) -> dict[str, Any]:
    """A (full compute, every sample) and B (the shadow run, the first ``shadow`` samples) in
    lockstep, so B − A is known at every step: how one full sampler step amplifies it is measured."""
    from .speculative import SpeculativeStepper

    device, dtype = next(model.parameters()).device, model_dtype(model)
    n, m = noise.shape[0], shadow
    cond_b = cond.select(torch.arange(m))
    guided = cond.uncond_kwargs is not None and cond.guidance_scale > 1.0
    sched_a, sched_b = fresh_scheduler(scheduler), fresh_scheduler(scheduler)
    for sched in (sched_a, sched_b):
        adapter.set_timesteps(sched, steps, tuple(noise.shape[1:]), device)
    timesteps = list(sched_a.timesteps)
    train_t = float(getattr(sched_a.config, "num_train_timesteps", 1000))
    xa = init_latents(sched_a, noise, device)
    xb = xa[:m].clone()
    coef_rms = torch.zeros(steps, n, dtype=torch.float64)  # [steps, n] latent move per unit output, times RMS(F)
    amp = torch.ones(steps, m, dtype=torch.float64)  # [steps, m] RMS(M_i d_i) / RMS(d_i)
    injected = torch.zeros(steps, m, dtype=torch.float64)  # [steps, m] RMS latent error B's forecasts put in
    full_s, spec_s, spec_rows = 0.0, 0.0, 0  # wall time of A's full calls, of B's speculative calls
    observations: list[tuple[int, int, float, float]] = []
    hooks = SpeculationHooks(model, adapter, cfg.probe_block, cfg.granularity)
    stepper = SpeculativeStepper(hooks, "speca", cfg, m, 2 if guided else 1, rule=Rule(cfg, steps, m))
    allowed = _paced_budgets(m, steps)  # [steps, m] B's oracle: injected damage allowed by the end of each step
    spent = torch.zeros(m, dtype=torch.float64)
    try:
        with torch.inference_mode():
            for i, t in enumerate(timesteps):
                began = time.perf_counter()
                out_a = adapter.predict(model, scale_input(sched_a, xa, t).to(dtype), t, cond).float()
                full_s += time.perf_counter() - began
                coef_rms[i] = _output_coefficient(sched_a, out_a, t, xa).cpu() * _rms(out_a).cpu()
                xb_in = scale_input(sched_b, xb, t).to(dtype)

                def call(idx: torch.Tensor) -> torch.Tensor:
                    return adapter.predict(model, xb_in[idx.to(device)], t, cond_b.select(idx)).float()

                ftime = forecaster_time(cfg, i, t, train_t)
                full = stepper.rule.must_compute(i, stepper.run_len, stepper._ready())
                out_b, true_b = torch.empty_like(xb), torch.empty_like(xb)
                spec = (~full).nonzero().flatten()
                if len(spec):
                    began = time.perf_counter()
                    guess, verr = stepper.speculate(spec, ftime, True, call)
                    verr = verr.cpu()  # (the host sync ends the timed speculative call, as in the engine)
                    spec_s, spec_rows = spec_s + time.perf_counter() - began, spec_rows + len(spec)
                    plan = hooks.plan("record", start=stepper.start)  # the true output, features kept for now
                    true = call(spec)
                    hooks.plan("off")
                    oerr = forecast_error(guess, true, "rel_l2")
                    for j, smp in enumerate(spec.tolist()):
                        observations.append((i, int(stepper.run_len[smp]) + 1, float(verr[j]), float(oerr[j])))
                    # the oracle: accept while the injected damage keeps to the sample's paced budget
                    xs = xb[spec.to(device)]
                    harm = _rms(snapshot(sched_b).step(guess, t, xs, return_dict=False)[0]
                                - snapshot(sched_b).step(true, t, xs, return_dict=False)[0]).cpu()
                    ok = (spent[spec] + harm <= allowed[i, spec]) & torch.isfinite(harm)
                    spent[spec[ok]] += harm[ok]
                    out_b[spec.to(device)] = torch.where(ok.to(device).view(-1, *[1] * (xb.ndim - 1)), guess, true)
                    true_b[spec.to(device)] = true
                    stepper.run_len[spec[ok]] += 1
                    back = (~ok).nonzero().flatten()
                    if len(back):  # rolled back: that full step joins the history, as in the engine
                        stepper._record(spec[back], ftime, _rows_of(plan.recorded, back, len(spec)), true[back.to(device)])
                        stepper.run_len[spec[back]] = 0
                redo = full.nonzero().flatten()
                if len(redo):
                    out_b[redo.to(device)] = true_b[redo.to(device)] = stepper.compute_full(redo, ftime, call)
                    stepper.run_len[redo] = 0
                step_a = snapshot(sched_a).step(out_a, t, xa, return_dict=False)[0][:m]
                carried = snapshot(sched_b).step(true_b, t, xb, return_dict=False)[0] - step_a  # M_i d_i
                deviation = _rms(xb - xa[:m])
                moved = _rms(carried)
                amp[i] = torch.where(deviation > 1e-9, moved / deviation.clamp_min(1e-300), torch.ones_like(moved)).cpu()
                new_b = sched_b.step(out_b, t, xb, return_dict=False)[0]
                injected[i] = _rms(new_b - step_a - carried).cpu()
                xa = sched_a.step(out_a, t, xa, return_dict=False)[0]
                xb = new_b
                bar.update(1)
    finally:
        hooks.remove()
    return {"final_a": xa.float().cpu(), "final_b": xb.float().cpu(), "coef_rms": coef_rms, "amp": amp,
            "injected": injected, "observations": observations,
            "spec_cost": min(1.0, (spec_s / spec_rows) / max(full_s / (steps * n), 1e-9)) if spec_rows else 1.0}


def run_calibration(model: nn.Module, adapter: ModelAdapter, scheduler: Any, cond: Conditioning, noise: torch.Tensor,
                    steps: int, cfg: CacheConfig, *, decode: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
                    key: str = "", progress: bool = True) -> Calibration:
    """Runs A and B (module doc) for ``noise.shape[0]`` samples and fits the calibration."""
    started = time.perf_counter()
    device, dtype = next(model.parameters()).device, model_dtype(model)
    cond = cond.to(device, dtype)
    n = noise.shape[0]
    bar = tqdm(total=2 * steps, desc="calibration", disable=not progress, leave=False)
    try:
        run = _lockstep(model, adapter, scheduler, cond, noise, steps, cfg, n, bar)
    finally:
        bar.close()
    final_a, final_b = run["final_a"], run["final_b"]
    damage_b = _pixel_rms(decode, final_b, final_a)  # [n] final pixel damage of B
    pixel_ratio = float((damage_b.sum() / _rms(final_b - final_a).sum().clamp_min(1e-12)).clamp(0.05, 20))
    injected = run["injected"]
    later = torch.flip(torch.cumprod(torch.flip(run["amp"], [0]), 0), [0])  # [steps, n]: prod_{j >= i}
    gain_to_end = torch.cat([later[1:], torch.ones(1, n, dtype=torch.float64)])  # prod_{j > i}
    coherence = damage_b / (pixel_ratio * (gain_to_end * injected).sum(dim=0)).clamp_min(1e-12)
    gain, base, growth, spread, gain_spread = fit(steps, run["observations"])
    coef = [c * pixel_ratio for c in run["coef_rms"].mean(dim=1).tolist()]  # pixels per unit output error
    # per damage level: the per-step maximum over that level's samples of the share of an injected
    # error that reaches the end (the conservative profile: a hard sample's amplification)
    profiles = coherence[None, :] * gain_to_end  # [steps, n]
    levels = sorted({s % len(SHADOW_LEVELS_DB) for s in range(n)})
    members = {lv: [s for s in range(n) if s % len(SHADOW_LEVELS_DB) == lv] for lv in levels}
    propagation = [profiles[:, members[lv]].amax(dim=1).tolist() for lv in levels]
    propagation_rms = [max(float(damage_b[s]) for s in members[lv]) for lv in levels]
    meta = {
        "samples": n, "shadow_levels_db": list(SHADOW_LEVELS_DB), "pixel_over_latent": pixel_ratio,
        "shadow_psnr_db": [_psnr(d) for d in damage_b.tolist()], "observations": len(run["observations"]),
        "coherence_per_sample": coherence.tolist(),
        "kappa_per_sample": (damage_b / (pixel_ratio * injected.sum(dim=0)).clamp_min(1e-12)).tolist(),
        "cost_s": round(time.perf_counter() - started, 3), "cost": "two full generations of the calibration samples "
                                                                    "plus the shadow run's speculative calls",
        "version": CALIBRATION_VERSION,
    }
    return Calibration(key=key, steps=steps, gain=gain, base=base, growth=growth, coef=coef, propagation=propagation,
                       propagation_rms=propagation_rms, spread=spread, gain_spread=gain_spread,
                       spec_cost=run["spec_cost"], meta=meta)


def _level_budget(level: int) -> float:
    return 2.0 * 10.0 ** (-SHADOW_LEVELS_DB[level] / 20.0)


def _psnr(rms: float) -> float:
    return float("inf") if rms <= 0 else 20.0 * math.log10(2.0 / rms)


def _pixel_rms(decode: Callable[[torch.Tensor], torch.Tensor | None] | None, latents: torch.Tensor,
               reference: torch.Tensor) -> torch.Tensor:
    """``[B]`` RMS difference of the decoded outputs (the latents' where there is no decoder)."""
    if decode is not None:
        a, b = decode(latents), decode(reference)
        if a is not None and b is not None:
            return _rms(a.float() - b.float())
    return _rms(latents - reference)


# ----- keys and the on-disk cache ---------------------------------------------------------------

def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's weights: every tensor's name, shape, dtype and a strided sample of at
    most 65,536 of its values (so a multi-GB checkpoint hashes in seconds; any retrained or
    fine-tuned checkpoint changes it)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 65536)].to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _tensors_fingerprint(d: dict[str, torch.Tensor] | None) -> str:
    h = hashlib.sha256()
    for k, v in sorted((d or {}).items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def calibration_key(model: nn.Module, scheduler: Any, steps: int, latent_shape: tuple[int, ...], cond: Conditioning,
                    cfg: CacheConfig, samples: int) -> tuple[str, dict[str, Any]]:
    """``(key, what it hashes)``: the checkpoint, the scheduler config, steps, latent shape
    (resolution, frames), guidance and the calibration conditioning, the settings that shape the
    forecasts (granularity, order, probe, metric, time unit, forced steps, cache cap), the
    compute dtype and device type, the calibration's samples and version."""
    parts = {
        "model": model_fingerprint(model),
        "model_class": type(model).__name__,
        "scheduler": {"class": type(scheduler).__name__,
                      "config": {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}},
        "steps": steps,
        "latent_shape": list(latent_shape),
        "guidance_scale": cond.guidance_scale,
        "conditioning": [_tensors_fingerprint(cond.kwargs), _tensors_fingerprint(cond.uncond_kwargs),
                         json.dumps(cond.extra, sort_keys=True, default=str)],
        "cache": {k: getattr(cfg, k) for k in ("granularity", "order", "extrapolation_ratio", "probe_block", "metric",
                                                "time", "warmup", "full_steps", "max_cache_bytes")},
        "dtype": str(model_dtype(model)),
        "device": next(model.parameters()).device.type,
        "samples": samples,
        "version": CALIBRATION_VERSION,
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24], parts


def cache_dir() -> Path:
    """Where calibrations are kept: ``$SPECDIST_CACHE_DIR/calibration`` (default ``~/.cache/specdist``)."""
    root = os.environ.get("SPECDIST_CACHE_DIR") or Path.home() / ".cache" / "specdist"
    return Path(root) / "calibration"


@dataclass
class CalibrationInfo:
    """What ``report.json`` says about the calibration a run used."""

    key: str
    path: str
    reused: bool
    cost_s: float
    samples: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def ensure_calibration(model: nn.Module, adapter: ModelAdapter, scheduler: Any, cond: Conditioning,
                       noise: torch.Tensor, steps: int, cfg: CacheConfig, *,
                       decode: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
                       log: Callable[[str], None] = print, progress: bool = True) -> tuple[Calibration, CalibrationInfo]:
    """The cached calibration for this model and setting, computed (and cached) when missing,
    stale (another key) or when ``cfg.calibration == "refresh"``. ``cond``/``noise``: the
    calibration samples (the model's default conditioning, seeds ``CALIBRATION_SEED + s``)."""
    key, parts = calibration_key(model, scheduler, steps, tuple(noise.shape[1:]), cond, cfg, noise.shape[0])
    path = cache_dir() / f"{key}.json"
    if cfg.calibration == "auto" and path.is_file():
        try:
            cal = Calibration.from_json(json.loads(path.read_text()))
            if cal.key == key and cal.steps == steps:
                return cal, CalibrationInfo(key, str(path), True, 0.0, noise.shape[0])
        except (ValueError, TypeError, KeyError):
            pass  # unreadable: recompute and overwrite
    log(f"specdist: calibrating {type(model).__name__} for speca ({steps} steps, {cfg.granularity} granularity, "
        f"{noise.shape[0]} samples: two full generations); cached as {path}")
    cal = run_calibration(model, adapter, scheduler, cond, noise, steps, cfg, decode=decode, key=key,
                          progress=progress)
    cal.meta["key_parts"] = parts
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cal.to_json(), indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:  # an unwritable cache costs a recalibration next time, nothing else
        log(f"specdist: could not cache the calibration at {path}: {exc.strerror or exc}")
    return cal, CalibrationInfo(key, str(path), False, cal.meta["cost_s"], noise.shape[0])
