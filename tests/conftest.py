"""Shared fixtures: a temporary ZHIKU home per test, one materialised model cache per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from settings import Settings

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """Where the bundled embedder is materialised; ZHIKU_TEST_MODELS_DIR reuses one across runs."""
    preset = os.environ.get("ZHIKU_TEST_MODELS_DIR")
    return Path(preset) if preset else tmp_path_factory.mktemp("models")


@pytest.fixture
def settings(tmp_path, models_dir) -> Settings:
    return Settings(home=tmp_path / "home", models_dir=models_dir)


@pytest.fixture(scope="session")
def embedder(models_dir):
    from memory.embedding import load_embedder

    return load_embedder(Settings(home=models_dir.parent / "unused-home", models_dir=models_dir))


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED
