"""Resumable checkpoints, written so that a kill at any moment never leaves one that resume would take.

Layer 2 (train). A checkpoint is built in a hidden temp folder: accelerate's `save_state` (optimizer, scheduler,
RNG of every process, fp16 scaler), the trainable weights (PEFT `adapter/`, or the full HF `model/` after full
fine-tuning: both directly loadable by chat) and `trainer_state.json` (step = data position). The COMPLETE marker
is written last, then the folder is renamed to `checkpoints/step-N`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowtune.errors import UserError
from lowtune.runs import (ADAPTER_DIR, CHECKPOINT_PREFIX, COMPLETE_MARKER, FULL_MODEL_DIR, RunFolder, atomic_write_text,
                          publish_dir)
from lowtune.train.shard import (OPTIMIZER_FILE, TRAINABLE_FILE, full_optimizer_state, full_trainable_state,
                                 load_full_state)
from lowtune.train.state import RunState

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

TRAINER_STATE = "trainer_state.json"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
SCHEDULER_KEY = "scheduler"
"""The LR schedule's state, kept as JSON in trainer_state.json: accelerate would pickle a registered object and read
it back with weights_only=False, which runs whatever a downloaded run folder holds."""
LEGACY_SCHEDULER = "custom_checkpoint_0.pkl"


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


def save_trained(model: Any, folder: Path, is_main_process: bool = True, state_dict: dict | None = None) -> None:
    """PEFT adapter files (or a full HF model folder) with safetensors; `state_dict` = gathered weights of a
    sharded model (names as in named_parameters).

    Embedding layers are saved only when LoRA trains them; PEFT's 'auto' would otherwise look the base model up
    on the hub to compare vocabularies, which fails offline.
    """
    kwargs: dict[str, Any] = {"safe_serialization": True, "is_main_process": is_main_process}
    if state_dict is not None:
        kwargs["state_dict"] = state_dict
    if is_peft(model):
        kwargs["save_embedding_layers"] = any("lora_embedding" in name for name, _ in model.named_parameters())
    model.save_pretrained(str(folder), **kwargs)


# --- weights through accelerate's save/load hooks -----------------------------------------------------------------

def install_weight_hooks(accelerator: Accelerator) -> None:
    """Make save_state/load_state store only what is trained: a PEFT adapter (MBs, not the frozen base), or the
    whole model as an HF folder after full fine-tuning."""

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for model in models:
            model = accelerator.unwrap_model(model)
            sub = ADAPTER_DIR if is_peft(model) else FULL_MODEL_DIR
            save_trained(model, Path(output_dir) / sub, accelerator.is_main_process)
        weights.clear()

    def load_hook(models: list, input_dir: str) -> None:
        for model in models:
            load_weights(accelerator.unwrap_model(model), Path(input_dir))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _model_shards(checkpoint: Path) -> list[Path]:
    return sorted((checkpoint / FULL_MODEL_DIR).glob("*.safetensors"))


def _read_tensors(files: list[Path]) -> dict:
    from safetensors.torch import load_file

    tensors: dict = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def load_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Trained weights of a checkpoint (adapter/ or model/) into an already built model."""
    if is_peft(model):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(model, load_peft_weights(str(checkpoint / ADAPTER_DIR), device="cpu"))
        return
    result = model.load_state_dict(_read_tensors(_model_shards(checkpoint)), strict=False)
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - set(dict(model.named_parameters()))
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise UserError(f"{checkpoint}: the saved model does not match this model "
                        f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); "
                        "resume with the same model.path and lora settings")


# --- save / find / load -------------------------------------------------------------------------------------------

def _temp_dir(run: RunFolder, step: int) -> Path:
    return run.checkpoints_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"


def save_checkpoint(state: RunState, step: int) -> Path:
    """Write checkpoints/step-N atomically and keep only the newest train.save_limit complete checkpoints. A full
    disk is one line naming the checkpoint that is still intact; the unfinished one is removed to give space back."""
    try:
        return _write_checkpoint(state, step)
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        shutil.rmtree(_temp_dir(state.run, step), ignore_errors=True)
        latest = state.run.latest_checkpoint()
        kept = f"{latest} is intact" if latest else "no earlier checkpoint exists"
        raise UserError(f"no space left while writing checkpoint step-{step} in {state.run.checkpoints_dir} "
                        f"({free_space(state.run.root)} free); {kept}. Free some space (or lower train.save_limit, "
                        f"now {state.cfg.train.save_limit}), then `lowtune train {state.run.config_path} "
                        "--resume auto`") from None


def free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**30:.1f} GiB"
    except OSError:
        return "unknown space"


def _write_checkpoint(state: RunState, step: int) -> Path:
    accelerator, run = state.accelerator, state.run
    tmp = _temp_dir(run, step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if state.plan.sharded:  # accelerate's save_state sees only what it prepared: gather the full states here
        _save_sharded(state.model, state.optimizer, tmp, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    final = run.checkpoint_dir(step)
    if accelerator.is_main_process:
        trainer_state = {**state.trainer_state(step), SCHEDULER_KEY: state.scheduler.state_dict()}
        atomic_write_text(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=2))
        atomic_write_text(tmp / COMPLETE_MARKER, f"step {step}\n")  # last: its presence means "safe to resume"
        publish_dir(tmp, final)
        prune(run, state.cfg.train.save_limit)
    accelerator.wait_for_everyone()
    return final


def prune(run: RunFolder, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and leftovers of interrupted writes."""
    doomed = [path for _, path in run.complete_checkpoints()[:-keep]]
    doomed += [p for p in run.checkpoints_dir.glob(".*") if p.is_dir()]
    for path in doomed:
        trash = path if path.name.startswith(".trash-") else path.with_name(f".trash-{path.name.lstrip('.')}")
        if trash != path:
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(path, trash)  # never a half-deleted folder that still carries its COMPLETE marker
        shutil.rmtree(trash, ignore_errors=True)


def find_resume(run: RunFolder, resume: str | None) -> Path | None:
    """The checkpoint to resume from: 'auto' = the newest complete one in the run folder (None if there is none);
    a path = that checkpoint, or the newest complete one of that run folder."""
    if resume is None:
        return None
    if resume == "auto":
        return run.latest_checkpoint()
    path = Path(resume)
    if (path / COMPLETE_MARKER).is_file() and (path / TRAINER_STATE).is_file():
        return path
    if path.is_dir():
        latest = RunFolder(path).latest_checkpoint()
        if latest is not None:
            return latest
        if path.name.startswith(CHECKPOINT_PREFIX):
            raise UserError(f"--resume {path}: this checkpoint is incomplete (its write was interrupted); "
                            "use --resume auto to take the newest complete one")
    raise UserError(f"--resume {resume}: no complete checkpoint there; give a checkpoints/step-N folder, a run "
                    "folder, or 'auto'")


def load_checkpoint(state: RunState, checkpoint: Path) -> dict:
    """Restore weights, optimizer, scheduler and RNG in place; return the trainer state (step, ...)."""
    state.accelerator.load_state(str(checkpoint))
    if state.plan.sharded:
        _load_sharded(state.model, state.optimizer, checkpoint, state.accelerator.is_main_process)
    saved = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    restore_scheduler(state.scheduler, saved, checkpoint)
    return saved


def restore_scheduler(scheduler: Any, saved: dict, checkpoint: Path) -> None:
    """The LR schedule from trainer_state.json, or from the pickle older checkpoints hold (read weights_only)."""
    import torch

    if SCHEDULER_KEY in saved:
        scheduler.load_state_dict(saved[SCHEDULER_KEY])
    elif (checkpoint / LEGACY_SCHEDULER).is_file():
        scheduler.load_state_dict(torch.load(checkpoint / LEGACY_SCHEDULER, map_location="cpu", weights_only=True))


def _save_sharded(model: Any, optimizer: Any, folder: Path, is_main_process: bool) -> None:
    """Gather (every process) and write (rank 0): the trained weights as chat loads them, the full optimizer state,
    and for an adapter also its weights under their parameter names (PEFT's files drop the adapter name; a full
    model's files keep the names, so resuming reads model/ itself and its weights are stored once)."""
    import torch
    from safetensors.torch import save_file

    weights = full_trainable_state(model)
    optimizer_state = full_optimizer_state(model, optimizer)
    if is_main_process:
        save_trained(model, folder / (ADAPTER_DIR if is_peft(model) else FULL_MODEL_DIR), state_dict=weights)
        if is_peft(model):
            save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / TRAINABLE_FILE))
        torch.save(optimizer_state, folder / OPTIMIZER_FILE)


def _load_sharded(model: Any, optimizer: Any, checkpoint: Path, is_main_process: bool) -> None:
    """Every process checks the saved names (so a mismatch stops them all, not just rank 0); rank 0 reads the
    tensors and the shards are filled from it."""
    import torch
    from safetensors import safe_open

    if not (checkpoint / OPTIMIZER_FILE).is_file():
        raise UserError(f"{checkpoint}: not written by a train.distributed=fsdp run; resume it with the "
                        "train.distributed it was trained with")
    files = [checkpoint / TRAINABLE_FILE] if is_peft(model) else _model_shards(checkpoint)
    saved: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            saved.update(handle.keys())
    missing = [name for name, param in model.named_parameters() if param.requires_grad and name not in saved]
    if missing:
        raise UserError(f"{checkpoint}: the saved weights do not match this model (missing {missing[:3]}); "
                        "resume with the same model.path and lora settings")
    weights = _read_tensors(files) if is_main_process else {}
    optimizer_state = torch.load(checkpoint / OPTIMIZER_FILE, weights_only=True) if is_main_process else {}
    load_full_state(model, optimizer, weights, optimizer_state)
