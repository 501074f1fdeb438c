"""Shared fixtures: every test runs offline on CPU against models built in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"


def pytest_configure(config):
    # Never reach a hub from a test; tests that exercise download set their own endpoints on 127.0.0.1.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("LOWTUNE_HOME", str(ROOT / ".pytest_cache" / "lowtune_home"))


@pytest.fixture(scope="session")
def micro_dir() -> Path:
    """Folder of builtin:micro (2 layers, hidden 64): the fast test model."""
    from lowtune.models.builtin import builtin_path

    return builtin_path("builtin:micro")


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """Folder of builtin:tiny (the demo model)."""
    from lowtune.models.builtin import builtin_path

    return builtin_path("builtin:tiny")


@pytest.fixture(scope="session")
def micro_tokenizer(micro_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(micro_dir)


@pytest.fixture
def artifacts() -> Path:
    """Folder for files a test keeps for humans to look at (screenshots, plots)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
