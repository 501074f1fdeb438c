"""`lowtune train --nproc N`: run the same training command in N processes through torchrun (DDP via accelerate).

Layer 2 (train). The workers re-enter `lowtune train` with torchrun's environment; the loop shards each optimizer
step's rows across them and normalises the loss by the supervised tokens of all of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from lowtune.errors import UserError


def in_worker() -> bool:
    """True inside a process that torchrun / accelerate launch started."""
    return "LOCAL_RANK" in os.environ


def launch(nproc: int, argv: list[str]) -> int:
    """Run `lowtune train ARGV` in `nproc` local processes; returns torchrun's exit code."""
    import torch

    if nproc < 1:
        raise UserError(f"--nproc must be at least 1 (got {nproc})")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UserError(f"--nproc {nproc}: only {torch.cuda.device_count()} GPU(s) visible; "
                        f"use --nproc {torch.cuda.device_count()} or fewer")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "lowtune.cli", "train", *argv]
    proc = subprocess.Popen(command)
    # Ctrl-C reaches the workers directly (same process group): they checkpoint and exit; we just wait for them.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
