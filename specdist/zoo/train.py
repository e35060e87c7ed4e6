"""Train a zoo model on its synthetic dataset (CPU or GPU) and save it as a checkpoint directory.

Usage::

    python -m specdist.zoo.train --model dit-shapes --steps 2400 --out specdist/zoo/checkpoints/dit-shapes
    python -m specdist.zoo.train --model hunyuan-shapes-video --steps 2000 --threads 1 --out ...
    python -m specdist.zoo.train --model wan-shapes --steps 5500 --threads 1 --sigma-sampling mixed --out ...

The data stream is a pure function of ``--seed`` (see :mod:`specdist.zoo.data`); weights are an EMA
of the trained weights, stored as fp16 safetensors. ``specdist_model.json`` in the output records
the command, steps, samples seen, wall time and final loss. A checkpoint is written every
``--save-every`` steps (atomically, so an interrupted run leaves the last complete one).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..models import adapter_for
from . import data
from .build import build_scheduler, build_text_encoder, build_transformer
from .specs import ZOO_SPECS, ZooSpec


def _shape_batch(spec: ZooSpec, n: int, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    b = data.shape_images(n, gen, size=spec.sample_shape[-1])
    return b.pixels, {"class_labels": b.labels}


def _video_batch(spec: ZooSpec, n: int, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    b = data.moving_shape_videos(n, gen, frames=spec.sample_shape[1], size=spec.sample_shape[-1])
    return b.pixels, {"prompts": b.prompts}


def _one_frame_batch(spec: ZooSpec, n: int, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    b = data.prompted_shape_images(n, gen, size=spec.sample_shape[-1])
    return b.pixels[:, :, None], {"prompts": b.prompts}  # [N, 3, 1, H, W]: a one-frame video


_BATCHES = {"dit": _shape_batch, "hunyuan_video": _video_batch, "wan": _one_frame_batch}
"""Training data of each zoo family: ``(pixels shaped [N, *spec.sample_shape], conditioning)``."""


def _batch(spec: ZooSpec, n: int, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    return _BATCHES[spec.family](spec, n, gen)


def _sigmas(n: int, gen: torch.Generator, sampling: str) -> torch.Tensor:
    """Flow-matching noise levels: logit-normal (SD3), uniform, or a half/half mixture (covers the
    small sigmas of the last sampling steps, which logit-normal almost never draws)."""
    logit_normal = torch.sigmoid(torch.randn(n, generator=gen))
    uniform = torch.rand(n, generator=gen)
    if sampling == "logit_normal":
        return logit_normal
    if sampling == "uniform":
        return uniform
    return torch.where(torch.rand(n, generator=gen) < 0.5, logit_normal, uniform)


def _loss(spec, model, text_encoder, noise_sched, x0, cond, gen, cfg_drop: float,
          sigma_sampling: str = "logit_normal") -> torch.Tensor:
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=gen)
    if spec.objective == "v_prediction":
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (n,), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        target = noise_sched.get_velocity(x0, noise, t)
        pred = model(hidden_states=xt, timestep=t, class_labels=cond["class_labels"]).sample
    else:
        sigma = _sigmas(n, gen, sigma_sampling)
        s = sigma.view(n, *([1] * (x0.ndim - 1)))
        xt = (1 - s) * x0 + s * noise
        target = noise - x0
        drop = torch.rand(n, generator=gen) < cfg_drop
        prompts = ["" if d else p for d, p in zip(drop.tolist(), cond["prompts"])]
        # The text inputs exactly as sampling builds them (the adapter's model fact); the timestep
        # per sample is sigma x 1000, what the adapters pass from FlowMatchEulerDiscreteScheduler.
        kwargs = adapter_for(model).prompt_conditioning(text_encoder(prompts)).kwargs
        pred = model(hidden_states=xt, timestep=sigma * 1000.0, **kwargs).sample
    return torch.nn.functional.mse_loss(pred.float(), target.float())


def save_checkpoint(spec: ZooSpec, model, text_encoder, out: Path, meta: dict) -> None:
    """Write ``out`` atomically: build in a sibling temp dir, then swap it in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    copy.deepcopy(model).half().save_pretrained(tmp / "transformer")
    if text_encoder is not None:
        copy.deepcopy(text_encoder).half().save_pretrained(tmp / "text_encoder")
    build_scheduler(spec).save_pretrained(tmp / "scheduler")
    (tmp / "specdist_model.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _adapt_patch_t(state: dict[str, torch.Tensor], model: torch.nn.Module) -> list[str]:
    """Map weights trained with a larger temporal patch onto ``model`` (in place); names the changed keys.

    A temporal patch of ``p_t`` frames embeds ``sum_i W_i f_i`` over its frames, so a one-frame patch
    gets ``sum_i W_i`` (a static clip embeds as before); the output head's rows for the ``p_t`` frame
    slots, laid out ``(C, p_t, p, p)``, are averaged into the one slot.
    """
    target = model.state_dict()
    changed = []
    for key, value in list(state.items()):
        want = target[key].shape
        if value.shape == want:
            continue
        if key == "x_embedder.proj.weight" and value.dim() == 5 and want[2] == 1:
            state[key] = value.sum(dim=2, keepdim=True)
        elif key in ("proj_out.weight", "proj_out.bias"):
            c = model.config.out_channels
            pt_old = value.shape[0] // want[0]
            tail = value.shape[1:]
            state[key] = value.reshape(c, pt_old, -1, *tail).mean(dim=1).reshape(want)
        else:
            raise ValueError(f"cannot adapt {key}: checkpoint {tuple(value.shape)} vs model {tuple(want)}")
        changed.append(key)
    return changed


def _load_phase(spec: ZooSpec, path: Path):
    """Weights (fp32) and earlier training phases of the checkpoint at ``path``.

    The model is built from the current spec; weights whose shape changed with the temporal patch
    size are mapped by :func:`_adapt_patch_t` and the mapping is recorded in the phase list.
    """
    from safetensors.torch import load_file

    from .text_encoder import PromptEncoder

    model = build_transformer(spec).float()
    state = load_file(str(path / "transformer" / "diffusion_pytorch_model.safetensors"))
    state = {k: v.float() for k, v in state.items()}
    changed = _adapt_patch_t(state, model)
    model.load_state_dict(state)
    text_encoder = None
    if (path / "text_encoder").is_dir():
        text_encoder = PromptEncoder.from_pretrained(path / "text_encoder", torch_dtype=torch.float32,
                                                     low_cpu_mem_usage=False)
    training = json.loads((path / "specdist_model.json").read_text())["training"]
    phases = training.get("phases") or [{k: training[k] for k in ("command", "steps", "wall_s", "final_loss_ema")}]
    if changed:
        phases = [*phases, {"command": "weights adapted to the current spec", "steps": 0, "wall_s": 0.0,
                            "final_loss_ema": phases[-1]["final_loss_ema"], "adapted_keys": changed}]
    return model, text_encoder, phases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(ZOO_SPECS))
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--cfg-drop", type=float, default=0.1, help="prompt dropout for guidance")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from this checkpoint's weights (a further training phase; recorded)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the spec's)")
    p.add_argument("--sigma-sampling", default="logit_normal", choices=["logit_normal", "uniform", "mixed"],
                   help="flow matching: how training noise levels are drawn")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ZOO_SPECS[args.model]
    hp = spec.train
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = build_transformer(spec)
    text_encoder = build_text_encoder(spec)
    previous: list[dict] = []
    if args.init_from is not None:
        model, text_encoder, previous = _load_phase(spec, args.init_from)
    model = model.to(args.device).train()
    params = list(model.parameters())
    if text_encoder is not None:
        text_encoder = text_encoder.to(args.device).train()
        params += list(text_encoder.parameters())
    ema = [copy.deepcopy(m).eval().requires_grad_(False) for m in (model, text_encoder) if m is not None]
    opt = torch.optim.AdamW(params, lr=args.lr or hp["lr"], weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / hp["warmup"]) * (0.5 + 0.5 * math.cos(math.pi * s / args.steps))
    )
    noise_sched = None
    if spec.objective == "v_prediction":
        from diffusers import DDPMScheduler

        noise_sched = DDPMScheduler(**{k: v for k, v in spec.scheduler_config.items() if k in
                                       ("num_train_timesteps", "beta_schedule", "prediction_type")})
    n_params = sum(p.numel() for p in params)
    start, loss_avg = time.time(), None
    bar = tqdm(range(1, args.steps + 1), desc=f"train {spec.name} ({n_params / 1e6:.2f}M params)")
    for step in bar:
        x0, cond = _batch(spec, hp["batch_size"], gen)
        loss = _loss(spec, model, text_encoder, noise_sched, x0.to(args.device), cond, gen, args.cfg_drop,
                     args.sigma_sampling)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(hp["ema_decay"], (1 + step) / (10 + step))
        with torch.no_grad():
            live = [m for m in (model, text_encoder) if m is not None]
            for e, m in zip(ema, live):
                for pe, pm in zip(e.parameters(), m.parameters()):
                    pe.lerp_(pm, 1 - decay)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{loss_avg:.4f}")
        if step % args.save_every == 0 or step == args.steps:
            meta = {
                "name": spec.name,
                "family": spec.family,
                "description": spec.description,
                "parameters": n_params,
                "training": {
                    "phases": [*previous, {
                        "command": "python -m specdist.zoo.train " + " ".join(sys.argv[1:] if argv is None else argv),
                        "steps": step, "wall_s": round(time.time() - start, 1), "final_loss_ema": round(loss_avg, 5),
                    }],
                    "command": "python -m specdist.zoo.train " + " ".join(sys.argv[1:] if argv is None else argv),
                    "steps": step + sum(p["steps"] for p in previous),
                    "batch_size": hp["batch_size"],
                    "samples_seen": (step + sum(p["steps"] for p in previous)) * hp["batch_size"],
                    "wall_s": round(time.time() - start + sum(p["wall_s"] for p in previous), 1),
                    "final_loss_ema": round(loss_avg, 5),
                    "device": args.device,
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                },
            }
            save_checkpoint(spec, ema[0], ema[1] if len(ema) > 1 else None, args.out, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
