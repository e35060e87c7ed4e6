"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch, repo_root):
    """Tests name configs by their repo-relative path, as a user would from a checkout."""
    monkeypatch.chdir(repo_root)


@pytest.fixture(autouse=True, scope="session")
def _calibration_cache(tmp_path_factory):
    """Calibrations go to a fresh directory, never the user's ~/.cache/specdist."""
    import os

    before = os.environ.get("SPECDIST_CACHE_DIR")
    os.environ["SPECDIST_CACHE_DIR"] = str(tmp_path_factory.mktemp("specdist-cache"))
    yield
    if before is None:
        os.environ.pop("SPECDIST_CACHE_DIR", None)
    else:
        os.environ["SPECDIST_CACHE_DIR"] = before


@pytest.fixture
def one_thread():
    """Small models: one thread is fastest and does not stall on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
