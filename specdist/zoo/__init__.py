"""The shipped model zoo: small trained checkpoints that run on a CPU (see DESIGN §5)."""

from __future__ import annotations

import json
from pathlib import Path

from .specs import ZOO_SPECS, ZooSpec

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"


def checkpoint_path(name: str) -> Path:
    """Directory of the shipped checkpoint ``name``."""
    return CHECKPOINT_DIR / name


def zoo_listing() -> list[dict]:
    """One row per zoo model: name, family, parameters, what it generates, training record."""
    rows = []
    for name, spec in ZOO_SPECS.items():
        meta_path = checkpoint_path(name) / "specdist_model.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        rows.append({
            "name": name,
            "family": spec.family,
            "class": spec.transformer_class,
            "parameters": meta.get("parameters"),
            "generates": spec.description,
            "trained": meta.get("training"),
            "available": meta_path.is_file(),
        })
    return rows


__all__ = ["CHECKPOINT_DIR", "ZOO_SPECS", "ZooSpec", "checkpoint_path", "zoo_listing"]
