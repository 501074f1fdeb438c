"""The run folder contract (docs/architecture.md lists each file): every path inside `runs/<name>/` is named here
and nowhere else.

Bottom layer: imports only config/errors. Training writes a run folder; chat, eval, merge, web, serve and upload
read it and need nothing else, and `locate_folder` is how each of them tells a run, adapter or model folder apart.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from lowtune.config import Config, build_config, parse_yaml
from lowtune.errors import UserError, did_you_mean

CHECKPOINT_PREFIX = "step-"
COMPLETE_MARKER = "COMPLETE"  # written last inside a checkpoint: its absence means "never resume from here"
ADAPTER_CONFIG = "adapter_config.json"
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
"""Stop ids (eos_token_id) of a run, and the same HF file in model folders."""
ADAPTER_DIR = "adapter"
"""PEFT adapter folder of a LoRA/QLoRA run, and inside each of its checkpoints."""
FULL_MODEL_DIR = "model"
"""Run-folder subfolder holding the full HF model after full fine-tuning (LoRA runs write adapter/ instead)."""
TENSORBOARD_DIR = "tensorboard"


def _inside(name: str) -> property:
    """A RunFolder attribute: the path of `name` inside the run folder."""
    return property(lambda run: run.root / name)


@dataclass(frozen=True)
class RunFolder:
    root: Path

    config_path = _inside("config.yaml")
    chat_template_path = _inside(TEMPLATE_FILE)
    generation_config_path = _inside(GENERATION_CONFIG)
    adapter_dir = _inside(ADAPTER_DIR)
    full_model_dir = _inside(FULL_MODEL_DIR)
    checkpoints_dir = _inside("checkpoints")
    metrics_path = _inside("metrics.jsonl")
    samples_path = _inside("samples.jsonl")
    loss_plot_path = _inside("loss.png")
    eval_path = _inside("eval.json")
    replay_path = _inside("replay.jsonl")
    tensorboard_dir = _inside(TENSORBOARD_DIR)

    def trained_weights(self) -> Path | None:
        """adapter/ or model/ of a finished run, else the newest complete checkpoint's; None before any."""
        candidates = [self.adapter_dir, self.full_model_dir]
        latest = self.latest_checkpoint()
        if latest is not None:
            candidates += [latest / ADAPTER_DIR, latest / FULL_MODEL_DIR, latest]
        return next((c for c in candidates if is_adapter_dir(c) or (c / "config.json").is_file()), None)

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / f"{CHECKPOINT_PREFIX}{step}"

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, folder) of every checkpoint whose write finished, oldest first."""
        found = []
        if self.checkpoints_dir.is_dir():
            for child in self.checkpoints_dir.iterdir():
                match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", child.name)
                if match and (child / COMPLETE_MARKER).is_file():
                    found.append((int(match.group(1)), child))
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        complete = self.complete_checkpoints()
        return complete[-1][1] if complete else None

    def load_config(self) -> Config:
        if not self.config_path.is_file():
            raise UserError(f"{self.root} is not a run folder (no config.yaml); give a run folder or a model folder")
        text = self.config_path.read_text(encoding="utf-8")
        return build_config(parse_yaml(text, str(self.config_path)) or {}, str(self.config_path), text)


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json of a PEFT adapter folder."""
    try:
        return json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG} is not valid JSON ({exc.msg}); re-save the adapter") from None


def enclosing_run(path: Path) -> RunFolder | None:
    """The run folder a weights folder sits in (run/adapter or run/checkpoints/step-N[/adapter]), if any."""
    for parent in list(path.resolve().parents)[:3]:
        if is_run_folder(parent):
            return RunFolder(parent)
    return None


def read_stop_ids(generation_config: Path) -> list[int]:
    """eos_token_id of a generation_config.json as a list (empty when the file is missing)."""
    if not generation_config.is_file():
        return []
    try:
        eos = json.loads(generation_config.read_text(encoding="utf-8")).get("eos_token_id")
    except json.JSONDecodeError as exc:
        raise UserError(f"{generation_config} is not valid JSON ({exc.msg}); delete it or fix it") from None
    ids = eos if isinstance(eos, list) else [eos]
    return [int(i) for i in ids if isinstance(i, int)]


def is_run_folder(path: Path) -> bool:
    """config.yaml marks a run; a model folder (config.json) that also ships a config.yaml is still a model."""
    return (path / "config.yaml").is_file() and not (path / "config.json").is_file()


@dataclass(frozen=True)
class Located:
    """What a run, adapter or model folder holds, read from its files without loading any weights."""

    weights: Path | None
    """The PEFT adapter or whole-model folder; None for a run with no adapter/, model/ or complete checkpoint."""
    kind: str
    """'adapter', 'model', or '' when there are no weights."""
    run: RunFolder | None = None
    config: Config | None = None
    base_spec: str | None = None
    """The model the weights were trained from: the run's model.path, else what adapter_config.json records."""
    template_path: Path | None = None
    """The chat template trained with: the run's file, else one saved beside the weights."""
    stop_ids: list[int] = field(default_factory=list)
    """The run's stop ids (its generation_config.json)."""
    tokenizer_dir: Path | None = None
    """The weights folder when it carries its own tokenizer."""


def close_name_hint(path: Path, folders_only: bool = True) -> str:
    """' (did you mean ...?)' naming a folder (or any entry) beside `path` with a similar name, else ''."""
    if not path.parent.is_dir():
        return ""
    siblings = [p.name for p in path.parent.iterdir() if p.is_dir() or not folders_only]
    return did_you_mean(path.name, siblings, prefix="" if path.parent == Path(".") else f"{path.parent}/")


def missing_folder(path: Path) -> UserError:
    return UserError(f"{path}: no such folder (relative to {Path.cwd()}){close_name_hint(path)}")


def locate_folder(path: Path, weights: Path | None = None) -> Located:
    """Classify a run folder, PEFT adapter folder or model folder and gather what it holds.

    A run's weights are adapter/ or model/, else the newest complete checkpoint's; `weights` replaces them.
    An adapter or model folder inside a run (run/adapter, run/checkpoints/step-N/...) carries that run's facts.
    """
    if not path.exists():
        raise missing_folder(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; give a model folder, an adapter folder or a run folder")
    if is_run_folder(path):
        run = RunFolder(path)
        return _located(weights or run.trained_weights(), run)
    if is_adapter_dir(path) or (path / "config.json").is_file():
        return _located(path, enclosing_run(path))
    raise UserError(f"{path} holds no model (config.json), adapter ({ADAPTER_CONFIG}) or run (config.yaml); "
                    "give one of them")


def _located(weights: Path | None, run: RunFolder | None) -> Located:
    config = run.load_config() if run else None
    kind = "" if weights is None else "adapter" if is_adapter_dir(weights) else "model"
    base_spec = config.model.path if config else None
    if base_spec is None and kind == "adapter":  # may be a hub id or a path that has moved since
        base_spec = read_adapter_config(weights).get("base_model_name_or_path") or None
    templates = (run.chat_template_path if run else None, weights / TEMPLATE_FILE if weights else None)
    has_tokenizer = weights is not None and (weights / "tokenizer_config.json").is_file()
    return Located(weights=weights, kind=kind, run=run, config=config, base_spec=base_spec,
                   template_path=next((p for p in templates if p is not None and p.is_file()), None),
                   stop_ids=read_stop_ids(run.generation_config_path) if run else [],
                   tokenizer_dir=weights if has_tokenizer else None)


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """An open file ('w' text, 'wb' bytes) that replaces `path` when the block ends: readers see the old content or
    the new one, never half of it; an error leaves `path` as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        share_like_open(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new one, never half of it."""
    with atomic_file(path) as handle:
        handle.write(text)


def share_like_open(path: Path) -> None:
    """Give a file or folder tree the modes open()/mkdir() would under the umask.

    mkstemp, mkdtemp and safetensors make 0600/0700 ones, which other users, a container or a web server cannot read.
    """
    mask = _umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask sets it for every thread)."""
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii")
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written temp folder into place, replacing an older one (rename is atomic per folder)."""
    share_like_open(tmp_dir)
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_dir, final_dir)


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead_temps(final: Path) -> None:
    """Remove temp folders for `final` left by a killed process of this machine (host and pid are in the name), so
    an interrupted merge or export does not keep its gigabytes; those of live processes or other hosts stay."""
    prefix, host = _temp_prefix(final), socket.gethostname()
    for folder in final.parent.glob(f"{glob.escape(prefix)}*"):
        owner = folder.name[len(prefix):]
        name, _, rest = owner.rpartition("-")[0].rpartition("-")
        if name == host and rest.isdigit() and not _alive(int(rest)):
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def staged_dir(final: Path, replace: bool = True) -> Iterator[Path]:
    """A temp folder beside `final` to write into: renamed into place when the block succeeds, removed when it fails,
    so `final` is never seen half-written.

    replace=True (merge, deploy, adapter/): an existing `final` is replaced. replace=False (caches): when another
    process published `final` first, theirs is kept and this one is dropped.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(final)}{socket.gethostname()}-{os.getpid()}-",
                                dir=final.parent))
    try:
        yield tmp
        if replace:
            publish_dir(tmp, final)
        else:
            share_like_open(tmp)
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.is_dir():  # nobody else published it: a real error
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
