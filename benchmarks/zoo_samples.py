"""Samples and per-step feature dynamics of the shipped zoo models (written to benchmarks/zoo/).

    python benchmarks/zoo_samples.py            # ~3 min on 2 CPU cores

For each zoo model: a sample sheet (PNG; for video also a GIF; a one-frame video is an image) from
50 full steps, and a plot of how much the features change from one step to the next — the model
output and the hidden states entering the last block (what specdist forecasts) — relative change
``‖F_i − F_{i−1}‖ / ‖F_i‖``.
Smooth, small changes after a structured early phase are what make forecasting work.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from specdist import media  # noqa: E402
from specdist.loading import load_model  # noqa: E402
from specdist.models.hooks import BlockTap  # noqa: E402
from specdist.sampling import fresh_scheduler, init_latents, initial_noise, scale_input  # noqa: E402

OUT = Path(__file__).parent / "zoo"


def trajectory(name: str, n: int, steps: int) -> tuple[torch.Tensor, dict[str, list[float]], dict]:
    """Final pixels and per-step relative feature changes of ``n`` samples."""
    bundle = load_model(name, device="cpu")
    model, adapter = bundle.transformer, bundle.adapter
    if bundle.conditions_on == "class":
        labels = [bundle.class_names[i % len(bundle.class_names)] for i in range(n)]
        cond, inputs = bundle.encode([], labels, bundle.default_guidance, 0), labels
    else:
        defaults = bundle.default_prompts
        prompts = [defaults[i % len(defaults)] for i in range(n)]
        cond, inputs = bundle.encode(prompts, [], bundle.default_guidance, 0), prompts
    shape = bundle.latent_shape(None, None, None)
    sched = fresh_scheduler(bundle.scheduler)
    adapter.set_timesteps(sched, steps, shape, torch.device("cpu"))
    x = init_latents(sched, initial_noise(shape, list(range(n))), torch.device("cpu"))
    prev: dict[str, torch.Tensor] = {}
    change: dict[str, list[float]] = {"model output": [], "last-block input": []}
    with torch.inference_mode(), BlockTap(model, adapter, [-1]) as tap:
        for t in sched.timesteps:
            out = adapter.predict(model, scale_input(sched, x, t), t, cond)
            feats = {"model output": out, "last-block input": tap.inputs(-1)[0]}
            for key, value in feats.items():
                if key in prev:
                    num = (value - prev[key]).flatten(1).norm(dim=1)
                    change[key].append(float((num / value.flatten(1).norm(dim=1)).mean()))
                prev[key] = value.clone()
            x = sched.step(out, t, x, return_dict=False)[0]
    return bundle.decode(x), change, {"inputs": inputs, "training": bundle.meta.get("training")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    models = (("dit-shapes", 16), ("hunyuan-shapes-video", 8), ("wan-shapes", 16))
    fig, ax = plt.subplots(1, len(models), figsize=(5 * len(models), 3.5))
    summary = {}
    for k, (name, n) in enumerate(models):
        pixels, change, info = trajectory(name, n, args.steps)
        if pixels.ndim == 5 and pixels.shape[2] == 1:  # one-frame video: an image
            pixels = pixels[:, :, 0]
        if pixels.ndim == 5:
            media.save_video_grid_png(pixels, args.out / f"{name}.png")
            media.save_gif(pixels, args.out / f"{name}.gif", fps=6)
        else:
            media.save_image_grid(pixels, args.out / f"{name}.png", nrow=8, scale=4)
        for key, values in change.items():
            ax[k].semilogy(range(1, args.steps), values, label=key)
        ax[k].set_title(f"{name}: step-to-step change")
        ax[k].set_xlabel("step")
        ax[k].legend()
        summary[name] = {**info, "relative_change": change}
    ax[0].set_ylabel("mean ‖F_i − F_{i−1}‖ / ‖F_i‖")
    fig.tight_layout()
    fig.savefig(args.out / "feature_change.png", dpi=110)
    (args.out / "samples.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
