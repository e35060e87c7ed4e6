"""Regenerate tests/data/zoo_reference.safetensors: final latents of each zoo model for a fixed job.

    python scripts/make_zoo_reference.py                      # every job
    python scripts/make_zoo_reference.py --only wan-shapes    # these jobs; the others' tensors kept as committed

tests/test_zoo.py recomputes the same jobs and compares within a tight tolerance, so a changed
checkpoint, sampler or adapter shows up as a failing test. Run this only when such a change is
intended, and say so in the commit. Recomputed on another machine, unchanged jobs can differ in
the last bits (~1e-5, float summation order), so add a new model with ``--only``.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from specdist.config import load_config
from specdist.generate import run_generate

JOBS = {
    "dit-shapes": ["model=dit-shapes", "steps=10", "num_samples=2", "class_labels=[circle, ring]", "guidance_scale=4.0"],
    "hunyuan-shapes-video": ["model=hunyuan-shapes-video", "steps=10", "num_samples=2",
                             "prompt=[red square moving right, blue circle moving down]", "guidance_scale=3.0"],
    "wan-shapes": ["model=wan-shapes", "steps=10", "num_samples=2", "prompt=[red circle, blue vertical stripes]",
                   "guidance_scale=3.5"],
}
OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "zoo_reference.safetensors"


def reference_latents(name: str, out_dir: Path):
    """Run the fixed reference job of zoo model ``name``; returns its final latents."""
    from safetensors.torch import load_file

    cfg = load_config(None, [*JOBS[name], "device=cpu", f"output.dir={out_dir}"])
    run_generate(cfg, progress=False, log=lambda m: None)
    return load_file(str(out_dir / "latents.safetensors"))["latents"]


def main() -> None:
    import argparse
    import tempfile

    from safetensors.torch import load_file

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(JOBS), help="recompute these jobs only")
    args = p.parse_args()
    tensors = load_file(str(OUT)) if args.only and OUT.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or JOBS:
            tensors[name] = reference_latents(name, Path(tmp) / name)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
