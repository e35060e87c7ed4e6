"""An independent check of what a caching method *accepts*: on every accepted step, the forecast
must be the Taylor (Newton) extrapolation of the values recorded on the full steps before it,
computed here from scratch in float64 (order 0: bit-equal to the last full value).

Values are taken where the engine hands them on: the model output the scheduler receives
(:func:`recording_scheduler`, ``granularity: output``), or a tensor that a torch hook sees in the
model on each call (:class:`Tap`: a block's or a branch's output, a submodule's input)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch


def newton(history: Sequence[tuple[float, torch.Tensor]], order: int, at: float) -> torch.Tensor:
    """Newton interpolation through the last ``order + 1`` points of ``history`` (oldest first),
    evaluated at ``at``, in float64."""
    pts = history[-(order + 1):][::-1]  # newest first, as the forecaster holds them
    times = [t for t, _ in pts]
    table = [v.double() for _, v in pts]
    coeffs = [table[0]]
    for j in range(1, len(pts)):
        table = [(table[k] - table[k + 1]) / (times[k] - times[k + j]) for k in range(len(table) - 1)]
        coeffs.append(table[0])
    out, basis = coeffs[0].clone(), 1.0
    for j in range(1, len(coeffs)):
        basis *= at - times[j - 1]
        out = out + coeffs[j] * basis
    return out


def effective_order(history: Sequence[tuple[float, torch.Tensor]], order: int, at: float,
                    fallback_ratio: float) -> int:
    """The order a forecast at ``at`` uses: 1 instead of ``order >= 2`` when ``at`` lies more than
    ``fallback_ratio`` times the gap between the last two full steps beyond the last one."""
    if order < 2 or fallback_ratio <= 0 or len(history) < 2:
        return order
    (t1, _), (t0, _) = history[-2], history[-1]
    return 1 if abs(at - t0) > fallback_ratio * abs(t0 - t1) else order


def assert_accepted_are_extrapolations(values: Sequence[torch.Tensor], decisions: str, order: int,
                                       times: Sequence[float] | None = None, *, rtol: float = 1e-5,
                                       atol: float = 1e-5, fallback_ratio: float = 2.0) -> int:
    """``values[i]``: the tensor at step ``i`` (``decisions[i]``: ``F`` full, ``A`` accepted,
    ``R`` recomputed); every ``A`` must extrapolate the ``F``/``R`` values before it, at order 1
    where the order fallback applies (``fallback_ratio``: ``cache.extrapolation_ratio``, default 2).
    Returns the number of accepted steps checked (so a caller can insist there were some)."""
    assert len(values) == len(decisions), (len(values), decisions)
    times = list(range(len(values))) if times is None else list(times)
    history, checked = [], 0
    for i, (value, d) in enumerate(zip(values, decisions)):
        if d == "A":
            want = newton(history, effective_order(history, order, times[i], fallback_ratio), times[i])
            if order == 0:
                assert torch.equal(value, history[-1][1]), f"step {i}: reuse is not the last full value"
            else:
                torch.testing.assert_close(value.double(), want, rtol=rtol, atol=atol,
                                           msg=lambda m: f"step {i} (order {order}): {m}")
            checked += 1
        else:
            history.append((times[i], value))
    return checked


def recording_scheduler(scheduler):
    """A copy of ``scheduler`` whose ``step`` also appends the model output it is given to
    ``.outputs`` (kept across the engine's own copies of the scheduler)."""
    outputs: list[torch.Tensor] = []
    base = type(scheduler)

    class Recording(base):
        def step(self, model_output, *args, **kwargs):
            outputs.append(model_output.detach().float().cpu().clone())
            return super().step(model_output, *args, **kwargs)

    rec = copy.deepcopy(scheduler)
    rec.__class__ = Recording
    rec.outputs = outputs
    return rec


class Tap:
    """Records one tensor per call of ``module``: its output (first tensor if a tuple), or with
    ``pre=True`` its first input (positional, else ``hidden_states``)."""

    def __init__(self, module: torch.nn.Module, pre: bool = False) -> None:
        self.values: list[torch.Tensor] = []
        if pre:
            self.handle = module.register_forward_pre_hook(self._pre, with_kwargs=True)
        else:
            self.handle = module.register_forward_hook(self._post)

    @staticmethod
    def _first(x):
        return x[0] if isinstance(x, (tuple, list)) else x

    def _pre(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.values.append(x.detach().float().cpu().clone())

    def _post(self, module, args, output):
        self.values.append(self._first(output).detach().float().cpu().clone())

    def remove(self) -> None:
        self.handle.remove()
