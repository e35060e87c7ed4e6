"""Pure math of exact speculative sampling (De Bortoli et al. 2025; DESIGN §2.4).

A stochastic sampler's step ``k`` is a Gaussian transition

    x_{k+1} ~ N(m_k(x_k, F(x_k, t_k)), σ_k² I)

whose mean ``m_k`` is the scheduler's deterministic update (a function of the state and the model
output ``F``) and whose std ``σ_k`` does not depend on the model. :func:`gaussian_kernels` reads
these from a diffusers scheduler (after ``set_timesteps``) for ``DDPMScheduler``, ``DDIMScheduler``
with ``η > 0`` and ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``; each kernel's
``mean(x, out) + std · z`` equals that scheduler's ``step`` given the same noise ``z``
(tests/test_exact_math.py checks this against diffusers).

Draft ``p = N(m^p, σ²I)`` and target ``q = N(m^q, σ²I)`` share ``σ``. With ``Δ = (m^p − m^q)/σ``
and the drafted state ``x̃ = m^p + σZ``:

* ``log min(1, q(x̃)/p(x̃)) = min(0, −⟨Z, Δ⟩ − ½‖Δ‖²)`` (:func:`log_acceptance`, float64, no exp);
* on rejection the residual ``(q − p)⁺`` is sampled by reflection maximal coupling
  ``y = m^q + σ (Z − 2⟨e, Z⟩ e)``, ``e = Δ/‖Δ‖`` (:func:`reflect`);
* the acceptance probability is ``2Φ(−‖Δ‖/2)`` (:func:`acceptance_probability`), which collapses
  in high dimension since ``‖Δ‖`` grows like ``√D`` for a fixed per-coordinate error.

Nothing here knows about models, Ray or torch.distributed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError

EXACT_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "FlowMatchEulerDiscreteScheduler")
"""Scheduler classes whose steps :func:`gaussian_kernels` can write as Gaussian transitions."""
DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")


@dataclass(frozen=True)
class GaussianKernel:
    """One step ``x' ~ N(mean(x, out), std² I)`` of a scheduler, as its ``step`` computes it.

    ``mean(x, out) = c0 · clip(x0) + cx · x + ce · eps`` with the scheduler's predicted clean sample
    ``x0 = x0_x · x + x0_o · out`` (clipped to ``±clip`` when ``clip`` is set) and predicted noise
    ``eps = e_x · x + e_o · out`` (DDIM's "direction pointing to x_t").
    """

    timestep: float  # the scheduler's timestep value of this step (the model's time input)
    std: float  # σ_k >= 0; 0 is a deterministic step
    c0: float
    cx: float
    ce: float
    x0_x: float
    x0_o: float
    e_x: float = 0.0
    e_o: float = 0.0
    clip: float | None = None

    def x0(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The scheduler's predicted clean sample (before clipping) for state ``x`` and output ``out``."""
        return self.x0_x * x + self.x0_o * out

    def output_for_x0(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The model output that predicts clean sample ``x0`` at state ``x`` (inverse of :meth:`x0`)."""
        return (x0 - self.x0_x * x) / self.x0_o

    def mean(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The transition mean for states ``x`` and model outputs ``out`` (same shape)."""
        x0 = self.x0(x, out)
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        mean = self.c0 * x0 + self.cx * x
        if self.ce:
            mean = mean + self.ce * (self.e_x * x + self.e_o * out)
        return mean

    def sample(self, x: torch.Tensor, out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The next state given the noise ``z`` (the plain target chain's step)."""
        return gaussian_draw(self.mean(x, out), self.std, z)


def gaussian_draw(mean: torch.Tensor, std: float, z: torch.Tensor) -> torch.Tensor:
    """``mean + std · z`` in float32 (``mean`` itself when ``std`` = 0): every drafted, target and
    committed state is formed by this one expression, so an accepted draft is bit-identical to it."""
    mean = mean.float()
    return mean + std * z.to(mean.device, torch.float32) if std > 0 else mean


def prediction_coefficients(kind: str, alpha: float) -> tuple[float, float, float, float]:
    """``(x0_x, x0_o, e_x, e_o)`` for prediction type ``kind`` at cumulative alpha ``alpha``."""
    a, b = math.sqrt(alpha), math.sqrt(1.0 - alpha)
    if kind == "epsilon":
        return 1.0 / a, -b / a, 0.0, 1.0
    if kind == "sample":
        return 0.0, 1.0, 1.0 / b, -a / b
    if kind == "v_prediction":
        return a, -b, b, a
    raise ConfigError(f"invalid value for 'scheduler_config.prediction_type': {kind!r} "
                      f"(allowed with method=exact: epsilon, sample, v_prediction)")


def _clip(config: dict) -> float | None:
    if config.get("thresholding", False):
        raise ConfigError("invalid value for 'scheduler_config.thresholding': True (allowed with method=exact: "
                          "false; dynamic thresholding makes the step's mean depend on the whole batch)")
    return float(config["clip_sample_range"]) if config.get("clip_sample", False) else None


def _ddpm_kernels(s) -> list[GaussianKernel]:
    config = dict(s.config)
    variance = config.get("variance_type", "fixed_small")
    if variance not in DDPM_VARIANCES:
        raise ConfigError(f"invalid value for 'scheduler_config.variance_type': {variance!r} (allowed with "
                          f"method=exact: one of {list(DDPM_VARIANCES)}; a learned variance depends on the model)")
    ac = s.alphas_cumprod.double()
    kernels = []
    for t in s.timesteps:
        t = int(t)
        prev = int(s.previous_timestep(t))
        a_t = float(ac[t])
        a_prev = float(ac[prev]) if prev >= 0 else 1.0
        alpha_t = a_t / a_prev
        beta_t = 1.0 - alpha_t
        x0_x, x0_o, _, _ = prediction_coefficients(config["prediction_type"], a_t)
        var = max((1.0 - a_prev) / (1.0 - a_t) * beta_t, 1e-20)
        std = {"fixed_small": math.sqrt(var), "fixed_small_log": math.exp(0.5 * math.log(var)),
               "fixed_large": math.sqrt(beta_t)}[variance] if t > 0 else 0.0
        kernels.append(GaussianKernel(
            timestep=float(t), std=std, c0=math.sqrt(a_prev) * beta_t / (1.0 - a_t),
            cx=math.sqrt(alpha_t) * (1.0 - a_prev) / (1.0 - a_t), ce=0.0, x0_x=x0_x, x0_o=x0_o, clip=_clip(config)))
    return kernels


def _ddim_kernels(s, eta: float) -> list[GaussianKernel]:
    config = dict(s.config)
    ac = s.alphas_cumprod.double()
    final = float(s.final_alpha_cumprod)
    kernels = []
    for t in s.timesteps:
        t = int(t)
        prev = t - config["num_train_timesteps"] // s.num_inference_steps
        a_t = float(ac[t])
        a_prev = float(ac[prev]) if prev >= 0 else final
        var = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
        std = eta * math.sqrt(max(var, 0.0))
        x0_x, x0_o, e_x, e_o = prediction_coefficients(config["prediction_type"], a_t)
        kernels.append(GaussianKernel(
            timestep=float(t), std=std, c0=math.sqrt(a_prev), cx=0.0,
            ce=math.sqrt(max(1.0 - a_prev - std**2, 0.0)), x0_x=x0_x, x0_o=x0_o, e_x=e_x, e_o=e_o,
            clip=_clip(config)))
    return kernels


def _flow_kernels(s) -> list[GaussianKernel]:
    sig = s.sigmas.double()
    return [GaussianKernel(timestep=float(t), std=float(sig[i + 1]), c0=1.0 - float(sig[i + 1]), cx=0.0, ce=0.0,
                           x0_x=1.0, x0_o=-float(sig[i])) for i, t in enumerate(s.timesteps)]


def gaussian_kernels(scheduler, eta: float | None = None) -> list[GaussianKernel]:
    """Every step of ``scheduler`` (after ``set_timesteps``) as a :class:`GaussianKernel`.

    ``eta`` is DDIM's η (``exact.eta``; required > 0 for ``DDIMScheduler``, refused for the others).
    A deterministic sampler (every σ = 0) or a scheduler with no Gaussian form is refused with one
    :class:`ConfigError` line saying why."""
    name = type(scheduler).__name__
    if name not in EXACT_SCHEDULERS:
        raise ConfigError(f"invalid value for 'scheduler': {name!r} (allowed with method=exact: one of "
                          f"{list(EXACT_SCHEDULERS)}; exact mode needs a stochastic sampler with Gaussian steps, "
                          f"e.g. --set scheduler=DDPMScheduler)")
    if name != "DDIMScheduler" and eta is not None:
        raise ConfigError(f"invalid value for 'exact.eta': {eta!r} (allowed: null with scheduler {name}; "
                          f"eta is DDIM's noise level)")
    if name == "DDPMScheduler":
        kernels = _ddpm_kernels(scheduler)
    elif name == "DDIMScheduler":
        if eta is None or eta <= 0:
            raise ConfigError(f"invalid value for 'exact.eta': {eta!r} (allowed with DDIMScheduler: a number in "
                              f"(0, 1]; DDIM with eta=0 is deterministic (sigma=0), so exact speculative sampling "
                              f"has nothing to accept or reject: use eta > 0 or --set scheduler=DDPMScheduler)")
        kernels = _ddim_kernels(scheduler, eta)
    else:
        if not scheduler.config.get("stochastic_sampling", False):
            raise ConfigError("invalid value for 'scheduler_config.stochastic_sampling': False (allowed with "
                              "method=exact: true; the flow-matching Euler ODE step is deterministic (sigma=0), so "
                              "exact speculative sampling does not apply)")
        kernels = _flow_kernels(scheduler)
    if not any(k.std > 0 for k in kernels):
        raise ConfigError(f"invalid value for 'scheduler': {name!r} (every step has sigma=0: a deterministic sampler; "
                          f"exact speculative sampling needs a stochastic one)")
    return kernels


# ----- the acceptance rule and the coupling -------------------------------------------------------
def normalized_gap(mean_draft: torch.Tensor, mean_target: torch.Tensor, std: float) -> torch.Tensor:
    """``Δ = (m^p − m^q)/σ`` in float64, shape of the means (``std`` > 0)."""
    return (mean_draft.double() - mean_target.double()) / std


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def log_acceptance(z: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``log min(1, q(x̃)/p(x̃))`` per row (``[B]`` float64) for drafted noise ``z`` and gap ``delta``
    (``[B, ...]``): ``min(0, −⟨z, Δ⟩ − ½‖Δ‖²)``, computed in log space (never overflows)."""
    z, delta = _flat(z.double()), _flat(delta.double())
    return torch.clamp(-(z * delta).sum(1) - 0.5 * (delta * delta).sum(1), max=0.0)


def reflect(z: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``z − 2⟨e, z⟩ e`` with ``e = Δ/‖Δ‖`` per row (rows with ``Δ = 0`` unchanged), float64."""
    zf, df = _flat(z.double()), _flat(delta.double())
    norm = df.norm(dim=1, keepdim=True)
    e = torch.where(norm > 0, df / norm.clamp_min(1e-300), torch.zeros_like(df))
    return (zf - 2.0 * (zf * e).sum(1, keepdim=True) * e).reshape(z.shape)


def acceptance_probability(delta_norm: float | torch.Tensor) -> torch.Tensor:
    """Expected acceptance ``2Φ(−‖Δ‖/2) = erfc(‖Δ‖ / (2√2))`` of a draft at gap norm ``‖Δ‖``."""
    return torch.special.erfc(torch.as_tensor(delta_norm, dtype=torch.float64) / (2.0 * math.sqrt(2.0)))


@dataclass
class CoupledStep:
    """Outcome of one coupled step for a batch of rows."""

    state: torch.Tensor  # [B, ...] the committed next state (float32): the draft or the residual sample
    accepted: torch.Tensor  # [B] bool: the drafted state was kept
    log_accept: torch.Tensor  # [B] float64: log min(1, q/p) of the drafted state


COUPLINGS = ("reflection", "no-reflection", "accept-all")
"""``reflection`` is the exact coupling; the other two are deliberately broken (tests only)."""


def coupled_step(mean_draft: torch.Tensor, mean_target: torch.Tensor, std: float, z: torch.Tensor,
                 u: torch.Tensor, coupling: str = "reflection") -> CoupledStep:
    """One step of the maximal coupling of ``p = N(m^p, σ²)`` and ``q = N(m^q, σ²)``.

    The drafted state ``x̃ = m^p + σ z`` is kept when ``log u < log min(1, q/p)`` (``u`` ~ U(0,1),
    ``[B]``); otherwise the state is ``m^q + σ·reflect(z)``, a sample of the residual ``(q − p)⁺``.
    The committed state is then an exact sample of ``q``. Two *broken* couplings (tests only) whose
    output law is not ``q``: ``no-reflection`` commits ``m^q + σ z`` on rejection, ``accept-all``
    keeps every draft. With ``σ = 0`` (a deterministic step) the draft is kept only when the means
    are equal."""
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
    if std <= 0:
        accepted = (_flat(mean_draft) == _flat(mean_target)).all(1)
        return CoupledStep(mean_target.float(), accepted, torch.where(accepted, 0.0, -math.inf).double())
    delta = normalized_gap(mean_draft, mean_target, std)
    log_a = log_acceptance(z, delta)
    accepted = torch.log(u.double().to(log_a.device)) < log_a
    if coupling == "accept-all":
        accepted = torch.ones_like(accepted)
    residual_noise = reflect(z, delta) if coupling == "reflection" else z.double()
    residual = gaussian_draw(mean_target, std, residual_noise)
    drafted = gaussian_draw(mean_draft, std, z)
    keep = accepted.to(drafted.device).view((-1,) + (1,) * (z.ndim - 1))
    return CoupledStep(torch.where(keep, drafted, residual), accepted, log_a)


# ----- random streams -----------------------------------------------------------------------------
def stream_seed(seed: int, step: int, kind: str) -> int:
    """A 63-bit generator seed that is a fixed function of (sample seed, step, stream kind)."""
    digest = hashlib.blake2b(f"specdist-exact:{int(seed)}:{int(step)}:{kind}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def step_noise(seed: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The transition noise ``Z`` of ``step`` for the sample of ``seed`` (float32, ``shape``)."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(stream_seed(seed, step, "z")))


def step_uniform(seed: int, step: int) -> torch.Tensor:
    """The acceptance uniform ``U`` of ``step`` for the sample of ``seed`` (0-d float64 in [0, 1))."""
    return torch.rand((), generator=torch.Generator("cpu").manual_seed(stream_seed(seed, step, "u")),
                      dtype=torch.float64)
