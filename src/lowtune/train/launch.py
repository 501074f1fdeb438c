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


def requested_processes(nproc: int | None, env: dict[str, str] | None = None) -> int:
    """--nproc, else NPROC_PER_NODE (XTuner's and LLaMA-Factory's variable), else 1."""
    env = os.environ if env is None else env
    if nproc is not None:
        return nproc
    raw = env.get("NPROC_PER_NODE", "1")
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"NPROC_PER_NODE={raw!r} must be a whole number of processes per machine") from None


def _nodes(env: dict[str, str]) -> int:
    raw = env.get("NNODES", "1") or "1"
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"NNODES={raw!r} must be a whole number of machines") from None


def needs_launch(nproc: int, env: dict[str, str] | None = None) -> bool:
    """Whether `train` must start torchrun: several processes on this machine, or several machines."""
    return nproc > 1 or _nodes(os.environ if env is None else env) > 1


def torchrun_command(nproc: int, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """The torchrun command line; several machines when NNODES > 1 (NODE_RANK, MASTER_ADDR, MASTER_PORT)."""
    env = os.environ if env is None else env
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1 (got {nproc})")
    nodes = _nodes(env)
    if nodes > 1:
        if "MASTER_ADDR" not in env:
            raise UserError(f"NNODES={nodes} needs MASTER_ADDR (the first machine's address) on every machine")
        where = [f"--nnodes={nodes}", f"--node-rank={env.get('NODE_RANK', '0')}",
                 f"--master-addr={env['MASTER_ADDR']}", f"--master-port={env.get('MASTER_PORT', '29500')}"]
    else:
        where = ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={nproc}",
            "-m", "lowtune.cli", "train", *argv]


def launch(nproc: int, argv: list[str]) -> int:
    """Run `lowtune train ARGV` in `nproc` processes per machine; returns torchrun's exit code."""
    import torch

    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UserError(f"--nproc {nproc}: only {torch.cuda.device_count()} GPU(s) visible; "
                        f"use --nproc {torch.cuda.device_count()} or fewer")
    proc = subprocess.Popen(torchrun_command(nproc, argv))
    # Ctrl-C reaches the workers directly (same process group): they checkpoint and exit; we just wait for them.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
