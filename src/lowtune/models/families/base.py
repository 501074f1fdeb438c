"""Conversion engine: a remote-code checkpoint -> a cached native transformers folder, one shard at a time.

A `Family` says how its config maps to a native config (Llama / Qwen2), how each original tensor maps to native
tensors, and how its tokenizer becomes a native one. `convert()` streams the original shards (`.bin` through
`torch.load(mmap=True)`, `.safetensors` through `safe_open`), maps tensor by tensor, writes safetensors shards of at
most `max_shard_bytes`, checks the written names against the native model's own, and renames the finished folder
into place (temp dir + rename), so peak memory is about one source shard plus one output shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowtune.errors import UserError
from lowtune.runs import GENERATION_CONFIG, staged_dir

if TYPE_CHECKING:
    import torch

MARKER = "lowtune_family"
SOURCE_KEY = "lowtune_source"
MAX_SHARD_BYTES = 2 * 2**30
KEEP_FILES = ("README.md", "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "USE_POLICY.md")


class Family:
    """One remote-code family with an exact native mapping. Subclasses fill in the four hooks."""

    name = ""
    """Written into the native config as `lowtune_family`; templates.FAMILY_TEMPLATES maps it to a chat template."""
    model_types: tuple[str, ...] = ()
    version = 1
    """Bump when the mapping changes: it is part of the cache key."""
    remote_needs = "the transformers version of its release"
    """What the family's own remote code needs, said when a checkpoint of it can only load that way."""

    def matches(self, config: dict, folder: Path) -> bool:
        return config.get("model_type") in self.model_types

    def marker(self, config: dict, folder: Path) -> str:
        """The `lowtune_family` value for this checkpoint (a family may cover two template families)."""
        return self.name

    def not_exact(self, config: dict, folder: Path) -> str | None:
        """Why this checkpoint has no exact native mapping (then it needs trust_remote_code), or None."""
        return None

    def native_config(self, config: dict, folder: Path) -> Any:
        """A transformers PreTrainedConfig for the native architecture."""
        raise NotImplementedError

    def map_tensor(self, name: str, tensor: torch.Tensor, config: dict) -> Iterable[tuple[str, torch.Tensor]]:
        """Native (name, tensor) pairs for one original tensor; nothing for tensors the native model drops."""
        raise NotImplementedError

    def write_tokenizer(self, folder: Path, out_dir: Path, config: dict) -> list[int]:
        """Write a native tokenizer into out_dir; return the ids that end an answer (besides config eos)."""
        raise NotImplementedError


# --- reading ----------------------------------------------------------------------------------------------------

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def llama_config(config: dict, rope_parameters: dict, attention_bias: bool, max_positions: int = 2048) -> Any:
    """A native LlamaConfig from a Llama-shaped remote-code config (InternLM v1, InternLM2, Baichuan);
    `max_positions` where the config names none."""
    from transformers import LlamaConfig

    heads = config["num_attention_heads"]
    return LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=config.get("num_key_value_heads") or heads,
        hidden_act=config.get("hidden_act", "silu"),
        max_position_embeddings=config.get("max_position_embeddings", max_positions),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6), initializer_range=config.get("initializer_range", 0.02),
        attention_bias=attention_bias, mlp_bias=False,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id", 1), eos_token_id=config.get("eos_token_id", 2),
        pad_token_id=config.get("pad_token_id", 0), rope_parameters=rope_parameters,
        dtype=config.get("torch_dtype"), architectures=["LlamaForCausalLM"])


def qkv_entries(prefix: str, suffix: str, q: Any, k: Any, v: Any) -> list[tuple[str, Any]]:
    """A fused q/k/v tensor's three parts under their native names, e.g. `{prefix}q_proj{suffix}`."""
    return [(f"{prefix}{part}_proj{suffix}", tensor) for part, tensor in zip("qkv", (q, k, v))]


def sentencepiece_model(folder: Path, family: str) -> Path:
    """The checkpoint's `tokenizer.model`, or a one-line error naming the folder."""
    model_file = folder / "tokenizer.model"
    if not model_file.is_file():
        raise UserError(f"{folder} has no tokenizer.model ({family} ships a SentencePiece model)")
    return model_file


def weight_shards(folder: Path) -> list[Path]:
    """The checkpoint's weight files in index order (sharded or single)."""
    for index in WEIGHT_INDEXES:
        path = folder / index
        if path.is_file():
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise UserError(f"{path} lists {missing[0]}, which is missing; re-download the model "
                                "(lowtune download ID -o DIR resumes)")
            return [folder / n for n in names]
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise UserError(f"{folder} has no weights (model.safetensors, pytorch_model.bin or a sharded index)")


def iter_tensors(shard: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one shard; a `.bin` is memory-mapped so only the tensors in use are paged in."""
    import torch

    if shard.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)
        return
    try:
        state = torch.load(str(shard), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        state = torch.load(str(shard), map_location="cpu", weights_only=True)
    try:
        yield from state.items()
    finally:
        del state


# --- writing ----------------------------------------------------------------------------------------------------

class ShardWriter:
    """Collects tensors and writes `model-0000k-of-0000n.safetensors` shards plus the index."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
        self.out_dir, self.max_bytes = out_dir, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0
        self.names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name} produced twice")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size
        self.names.add(name)

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.out_dir / f".part-{len(self.parts)}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        if len(self.parts) == 1:
            os.replace(self.parts[0][0], self.out_dir / "model.safetensors")
            return
        weight_map = {}
        count = len(self.parts)
        for k, (path, names) in enumerate(self.parts, start=1):
            final = f"model-{k:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --- the conversion ---------------------------------------------------------------------------------------------

def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder} has no config.json: give a Hugging Face model folder") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def cache_key(family: Family, folder: Path) -> str:
    """Source path + every file's size and mtime + the mapping version: any change gives a new folder."""
    stats = sorted((p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts)
    blob = json.dumps({"family": family.name, "version": family.version, "source": str(folder.resolve()),
                       "files": stats})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def expected_names(native_config: Any) -> set[str]:
    """Parameter and persistent buffer names of the native model, built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(native_config)
    return set(model.state_dict())


def generation_config(folder: Path, native_config: Any, stop_ids: list[int]) -> dict:
    """The source generation_config.json with every stop id in eos_token_id."""
    path = folder / GENERATION_CONFIG
    source = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    eos = source.get("eos_token_id", native_config.eos_token_id)
    eos_ids = [*(eos if isinstance(eos, list) else [eos] if eos is not None else [])]
    for tid in stop_ids:
        if tid not in eos_ids:
            eos_ids.append(tid)
    keep = {k: v for k, v in source.items() if k not in ("transformers_version", "_from_model_config",
                                                          "chat_format", "max_window_size")}
    pad = source.get("pad_token_id", native_config.pad_token_id)
    return {**keep, "bos_token_id": source.get("bos_token_id", native_config.bos_token_id),
            "eos_token_id": eos_ids, "pad_token_id": pad if pad is not None else eos_ids[0]}


def convert(family: Family, folder: Path, out_dir: Path, config: dict,
            max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write the native folder for `folder` into the empty `out_dir`."""
    native = family.native_config(config, folder)
    setattr(native, MARKER, family.marker(config, folder))
    config = dict(config, _lowtune_folder=str(folder))  # lets map_tensor look at the source files
    setattr(native, SOURCE_KEY, {"path": str(folder.resolve()), "model_type": config.get("model_type")})
    writer = ShardWriter(out_dir, max_shard_bytes)
    for shard in weight_shards(folder):
        for name, tensor in iter_tensors(shard):
            for new_name, new_tensor in family.map_tensor(name, tensor, config):
                writer.add(new_name, new_tensor)
        writer.flush()  # never hold more than one source shard's worth
    writer.finish()
    want = expected_names(native)
    missing, extra = sorted(want - writer.names), sorted(writer.names - want)
    if missing or extra:
        raise UserError(f"{folder}: weights do not match a {family.name} checkpoint (missing {missing[:3]}, "
                        f"unexpected {extra[:3]}); is config.json from the same model?")
    stop_ids = family.write_tokenizer(folder, out_dir, config)
    native.save_pretrained(out_dir)
    gen = generation_config(folder, native, stop_ids)
    (out_dir / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    for name in KEEP_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out_dir / name)


def native_folder(family: Family, folder: Path, cache_root: Path) -> Path:
    """The cached native folder for `folder`, converting it on first use (atomic: temp dir + rename)."""
    config = read_config(folder)
    target = cache_root / f"{family.name}-{folder.resolve().name}-{cache_key(family, folder)}"
    if (target / "config.json").is_file():
        return target
    with staged_dir(target, replace=False) as tmp:  # another process that finished first keeps its folder
        convert(family, folder, tmp, config)
    return target
