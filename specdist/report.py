"""Output directories written atomically, and the fingerprint of a result."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import SpecdistError


class OutputError(SpecdistError, OSError):
    """The output directory cannot be created or written: names the path."""


def output_sha256(latents: torch.Tensor) -> str:
    """SHA-256 of ``latents`` as contiguous float32 bytes (equal hashes ⇔ bit-identical results)."""
    data = latents.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON, atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


class StagedOutput:
    """An output directory that appears complete or not at all.

    Files are written into a hidden staging directory next to ``final``; :meth:`commit` swaps it
    into place (the previous contents, if any, are removed only after the new ones are complete).
    If the job fails, :meth:`discard` removes the staging directory and ``final`` is untouched.
    """

    def __init__(self, final: str | Path) -> None:
        self.final = Path(final)
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.staging-", dir=self.final.parent))
        except OSError as exc:
            raise OutputError(f"output.dir {str(self.final)!r} cannot be written: {exc.strerror or exc}") from None

    def commit(self) -> Path:
        """Move the staged files to ``final`` and return it."""
        old = None
        try:
            if self.final.exists():
                old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
                os.replace(self.final, old)
            os.replace(self.dir, self.final)
        except OSError as exc:
            if old is not None and not self.final.exists():
                os.replace(old, self.final)  # put the earlier result back
            self.discard()
            raise OutputError(f"output.dir {str(self.final)!r} cannot be replaced: {exc.strerror or exc}") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def discard(self) -> None:
        """Remove the staging directory (``final`` stays as it was)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "StagedOutput":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
