"""Command-line interface: ``specdist generate | calibrate | models | info | bench``.

Errors that come from bad input (config keys and values, model paths) end in one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import SpecdistError

DEFAULT_CONFIG = "configs/default.yaml"


def _cmd_generate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .generate import run_generate

    overrides = list(args.set or [])
    if args.out:
        overrides.append(f"output.dir={args.out}")
    cfg = load_config(args.config, overrides)
    run_generate(cfg, progress=not args.quiet, log=(lambda _m: None) if args.quiet else print)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import ADAPTERS
    from .zoo import zoo_listing

    rows = zoo_listing()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<22} {'family':<14} {'params':>8}  generates")
    for r in rows:
        params = f"{r['parameters'] / 1e6:.2f}M" if r["parameters"] else "-"
        status = "" if r["available"] else "  [checkpoint missing]"
        print(f"{r['name']:<22} {r['family']:<14} {params:>8}  {r['generates']}{status}")
    print("\nLocal checkpoints (model: /path): diffusers pipelines or bare transformers of "
          + ", ".join(sorted(ADAPTERS)))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .env import environment

    env = environment()
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    gpus = env["gpus"]
    for key in ("python", "torch", "diffusers", "ray", "specdist", "cuda", "platform", "cpu_count"):
        print(f"{key:<10} {env[key]}")
    if gpus.get("available"):
        print(f"{'driver':<10} {gpus.get('driver')}")
        for g in gpus.get("gpus", []):
            print(f"{'gpu':<10} {g}")
    else:
        print(f"{'gpu':<10} no GPU ({gpus.get('reason')})")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibration_for
    from .config import load_config
    from .engine.decision import make_rule
    from .loading import load_model

    overrides = list(args.set or [])
    if args.refresh:
        overrides.append("cache.calibration=refresh")
    cfg = load_config(args.config, [*overrides, "method=speca"])
    if not cfg.cache.uses_target:
        from .errors import ConfigError

        raise ConfigError("invalid value for 'cache.tau0': a threshold schedule needs no calibration "
                          "(set cache.tau0: null to calibrate for a quality target)")
    log = (lambda _m: None) if args.quiet else print
    bundle = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, scheduler=cfg.scheduler,
                        scheduler_config=cfg.scheduler_config)
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else bundle.default_guidance
    shape = bundle.latent_shape(cfg.height, cfg.width, cfg.frames)
    cal, info = calibration_for(bundle, cfg.cache, cfg.steps, shape, guidance, log=log, progress=not args.quiet)
    rule = make_rule("speca", cfg.cache, cfg.steps, 1, calibration=cal)
    summary = {**info.as_dict(), "target_psnr_db": cfg.cache.effective_target_psnr_db, "growth": cal.growth,
               "spec_cost": cal.spec_cost, "shadow_psnr_db": cal.meta.get("shadow_psnr_db"),
               "step_allowance_rms": rule.cap}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        state = "reused" if info.reused else f"computed in {info.cost_s:.1f} s"
        print(f"calibration {info.key} ({state}): {info.path}")
        print(f"  {bundle.name}, {cfg.steps} steps, {cfg.cache.granularity} granularity, {info.samples} samples; "
              f"target {cfg.cache.effective_target_psnr_db:g} dB -> step allowance {rule.cap:.3g} (RMS)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, run_bench
    from .config import load_config

    overrides = list(args.set or [])
    if args.out:
        overrides.append(f"out={args.out}")
    cfg = load_config(args.config, overrides, cls=BenchConfig)
    run_bench(cfg, progress=not args.quiet, log=(lambda _m: None) if args.quiet else print)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``specdist`` argument parser."""
    parser = argparse.ArgumentParser(prog="specdist", description="Speculative, distributed diffusion-transformer inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="run one generation job (media + report.json)")
    gen.add_argument("--config", default=None, help=f"YAML config (default: built-in defaults; see {DEFAULT_CONFIG})")
    gen.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (dotted keys), repeatable")
    gen.add_argument("--out", default=None, help="output directory (same as --set output.dir=DIR)")
    gen.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    gen.set_defaults(func=_cmd_generate)
    models = sub.add_parser("models", help="list the shipped zoo models")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=_cmd_models)
    info = sub.add_parser("info", help="versions, CUDA and GPUs (via NVML)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_cmd_info)
    cal = sub.add_parser("calibrate", help="calibrate speca's quality target for a model and setting (cached)")
    cal.add_argument("--config", default=None, help="YAML config (the job's model, steps, size, guidance, cache.*)")
    cal.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, repeatable")
    cal.add_argument("--refresh", action="store_true", help="recompute even when a cached calibration exists")
    cal.add_argument("--json", action="store_true")
    cal.add_argument("--quiet", action="store_true")
    cal.set_defaults(func=_cmd_calibrate)
    bench = sub.add_parser("bench", help="speed-quality benchmark of every method (tables + plots)")
    bench.add_argument("--config", default="configs/bench.yaml", help="YAML bench config")
    bench.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a bench config key")
    bench.add_argument("--out", default=None, help="results directory (same as --set out=DIR)")
    bench.add_argument("--quiet", action="store_true")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``specdist`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecdistError as exc:
        print(f"specdist: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specdist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
