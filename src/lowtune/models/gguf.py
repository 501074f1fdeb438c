"""GGUF files (Ollama, llama.cpp, LM Studio) -> a cached native safetensors folder, converted once.

`native_gguf_folder(path)` reads the file with the `gguf` package and transformers' own GGUF support: the config
comes from the metadata through transformers' mapping, tensor names and llama.cpp's layout changes (the Q/K row
permutation of Llama, ...) are undone by transformers' tensor processors, and the tokenizer, with the file's chat
template, is rebuilt by transformers' GGUF tokenizer converter. Tensors are dequantised one at a time and written as
safetensors shards into `$LOWTUNE_HOME/native/gguf-<stem>-<hash>` (temp dir + rename, as `families.base`), so every
later stage (train, chat, merge, serve, export) sees an ordinary Hugging Face folder.

A GGUF-loaded transformers model refuses `save_pretrained`, and loading it whole would hold the float model and a
shard copy at once; streaming the file keeps the peak near one output shard plus the largest tensor in float32.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowtune.errors import UserError
from lowtune.models.families.base import SOURCE_KEY, ShardWriter, generation_config
from lowtune.runs import GENERATION_CONFIG, staged_dir

if TYPE_CHECKING:
    import numpy as np
    import torch
    from gguf import GGUFReader
    from transformers import PreTrainedTokenizerBase

GGUF_SUFFIX = ".gguf"
MAGIC = b"GGUF"
MAPPING_VERSION = 1
"""Bump when the conversion changes: it is part of the cache key."""
FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# llama.cpp's architecture names for what transformers' legacy GGUF mapping calls otherwise
ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
NOT_CAUSAL = {"t5", "t5encoder", "umt5"}
REDO = ("convert the original model again with llama.cpp's convert_hf_to_gguf.py (--outtype f16 or q8_0), "
        "or give its Hugging Face folder instead")
ANSWER = "lowtune-answer-7f3a"
"""Stand-in answer rendered through the chat template to find the token that ends a turn."""


@dataclass
class GgufSource:
    """A readable GGUF file whose architecture and tensor types lowtune can convert."""

    path: Path
    reader: GGUFReader
    architecture: str
    file_type: str
    """llama.cpp's name for the file's quantisation: Q4_K_M, Q8_0, F16, ..."""

    def meta(self, key: str, default: Any = None) -> Any:
        """A metadata value (a list for arrays), decoded as transformers decodes it."""
        from transformers.modeling_gguf_pytorch_utils import read_field

        values = read_field(self.reader, key)
        return default if not values else values[0] if len(values) == 1 else values

    @property
    def tensor_types(self) -> set[str]:
        return {t.tensor_type.name for t in self.reader.tensors}


# --- finding the file -----------------------------------------------------------------------------------------------

def is_gguf_name(spec: str) -> bool:
    """A spec that names a .gguf file (whether or not it exists)."""
    return spec.lower().endswith(GGUF_SUFFIX)


def is_gguf_file(path: Path) -> bool:
    """A file named *.gguf, or any file that starts with the GGUF magic (Ollama's blobs have no suffix)."""
    if not path.is_file():
        return False
    if path.suffix.lower() == GGUF_SUFFIX:
        return True
    try:
        with path.open("rb") as handle:
            return handle.read(4) == MAGIC
    except OSError:
        return False


def gguf_in_folder(folder: Path) -> Path | None:
    """The one .gguf file of a folder (checked by the caller to have no config.json); None when it holds none."""
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == GGUF_SUFFIX)
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:8]) + (", ..." if len(found) > 8 else "")
        raise UserError(f"{folder} holds {len(found)} GGUF files ({names}); give the path of the one to use, "
                        f"e.g. {found[0]}")
    return found[0] if found else None


# --- the cache ------------------------------------------------------------------------------------------------------

def cache_key(path: Path) -> str:
    """Absolute path + size + mtime + the mapping version: any change to the file gives a new folder."""
    stat = path.stat()
    blob = json.dumps({"format": "gguf", "version": MAPPING_VERSION, "source": str(path.resolve()),
                       "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def native_gguf_folder(path: Path, cache_root: Path | None = None) -> Path:
    """The cached native folder for a GGUF file, converting it on first use (atomic: temp dir + rename)."""
    from lowtune.models.families import cache_root as native_root

    path = path.expanduser().resolve()
    stem = path.name[: -len(GGUF_SUFFIX)] if is_gguf_name(path.name) else path.name
    target = (cache_root or native_root()) / f"gguf-{stem}-{cache_key(path)}"
    if (target / "config.json").is_file():
        return target
    source = read_gguf(path)
    print(f"converting {path.name} ({source.file_type}, {_size(path.stat().st_size)}) into a native folder, "
          f"once: {target}", file=sys.stderr, flush=True)
    with staged_dir(target, replace=False) as tmp:  # another process that finished first keeps its folder
        write_native(source, tmp)
    return target


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


# --- reading and checking -------------------------------------------------------------------------------------------

def read_gguf(path: Path) -> GgufSource:
    """Open and check a GGUF file: readable, not split, an architecture and tensor types that convert."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # truncated or corrupt files fail anywhere in the header or tensor table
        raise UserError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {_first_line(exc)}); it is "
                        "probably truncated or corrupt: download it again") from None
    source = GgufSource(path=path, reader=reader, architecture="", file_type="")
    source.architecture = str(source.meta("general.architecture", ""))
    source.file_type = _file_type(source)
    if int(source.meta("split.count", 1) or 1) > 1:
        raise UserError(f"{path} is one part of a split GGUF ({source.meta('split.count')} parts); join them first "
                        "with llama.cpp's `llama-gguf-split --merge FIRST-PART OUT.gguf` and give OUT.gguf")
    check_architecture(source)
    check_tensor_types(source)
    return source


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "no detail"


def _file_type(source: GgufSource) -> str:
    """llama.cpp's label for the file (general.file_type), else the most common type of its 2-D tensors."""
    from gguf import LlamaFileType

    code = source.meta("general.file_type")
    try:
        name = LlamaFileType(int(code)).name if code is not None else ""
    except ValueError:
        name = ""
    if name and name != "GUESSED":
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    types = [t.tensor_type.name for t in source.reader.tensors if len(t.shape) > 1]
    return max(set(types), key=types.count) if types else "unknown"


def check_architecture(source: GgufSource) -> None:
    """One line when transformers has no GGUF mapping for the file's architecture, or it is not a causal LM."""
    import transformers
    from transformers.integrations.gguf import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = source.architecture
    supported = (set(GGUF_SUPPORTED_ARCHITECTURES) | set(GGUF_ARCHS)) - {"general", "tokenizer"} - NOT_CAUSAL
    if arch in supported or ARCH_ALIASES.get(arch) in supported:
        return
    what = "is not a chat (causal) language model" if arch in NOT_CAUSAL else \
        f"has no GGUF mapping in transformers {transformers.__version__}"
    raise UserError(f"{source.path}: architecture '{arch or '(none)'}' {what} (it reads "
                    f"{', '.join(sorted(supported))}); give the original model's Hugging Face folder or hub id "
                    "instead")


def check_tensor_types(source: GgufSource) -> None:
    """One line naming the tensor types that cannot be dequantised by the installed `gguf` package."""
    from gguf.quants import _type_traits

    readable = set(FLOAT_TYPES) | {t.name for t in _type_traits}
    bad = sorted(source.tensor_types - readable)
    if bad:
        first = next(t.name for t in source.reader.tensors if t.tensor_type.name in bad)
        raise UserError(f"{source.path}: tensor type {', '.join(bad)} (e.g. {first}) cannot be dequantised here "
                        f"(file type {source.file_type}); {REDO}")


def stored_dtype(tensor_types: set[str]) -> str:
    """The dtype the native folder stores: the file's own float type, bfloat16 for any quantised file.

    Quantised weights are small integers times fp16 scales: bfloat16 keeps their range without fp16 overflow risk in
    training activations, halves disk and RAM against float32, and its rounding is below the quantisation error
    already in the file (even Q8_0's). It is also what merge (`--dtype auto`) then writes.
    """
    if tensor_types - FLOAT_TYPES.keys():
        return "bfloat16"
    for name in ("BF16", "F16"):
        if name in tensor_types:
            return FLOAT_TYPES[name]
    return "float32"


# --- writing --------------------------------------------------------------------------------------------------------

def write_native(source: GgufSource, out_dir: Path) -> None:
    """Write config.json, safetensors weights, tokenizer and generation_config.json for `source` into out_dir."""
    config = native_config(source)
    model = _meta_model(source, config)
    dtype = stored_dtype(source.tensor_types)
    write_weights(source, config, model, out_dir, dtype)
    config.dtype = dtype
    stop_ids = write_tokenizer(source, out_dir)
    config.architectures = [type(model).__name__]
    setattr(config, SOURCE_KEY, {"path": str(source.path), "format": "gguf", "file_type": source.file_type,
                                 "architecture": source.architecture, "name": source.meta("general.name")})
    config.save_pretrained(out_dir)
    gen = generation_config(out_dir, config, stop_ids)
    (out_dir / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")


def write_weights(source: GgufSource, config: Any, model: Any, out_dir: Path, dtype: str) -> None:
    """Safetensors shards in `dtype` (a torch dtype name), checked against the native model's own names."""
    import torch

    writer = ShardWriter(out_dir)
    if source.architecture in _model_loaded_archs():
        _write_loaded(source, getattr(torch, dtype), writer)
    else:
        _write_streamed(source, config, model, getattr(torch, dtype), writer)
    writer.finish()
    _check_names(source, model, writer.names)


def native_config(source: GgufSource) -> Any:
    """transformers' config for the file (its own GGUF metadata mapping), with the GGUF's special token ids."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{source.path}: transformers cannot read its config ({_first_line(exc)}); {REDO}") from None
    if hasattr(config, "_model_name_or_path"):
        del config._model_name_or_path  # general.name, a display name, not a path
    # the file's ids, not the config class defaults (Llama's bos 1 is another token in most vocabularies)
    for attr, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        value = source.meta(f"tokenizer.ggml.{key}")
        if value is not None or attr != "eos_token_id":
            setattr(config, attr, None if value is None else int(value))
    return config


def _meta_model(source: GgufSource, config: Any) -> Any:
    """The native model on the meta device (no memory): names, tied weights and the GGUF name mapping."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise UserError(f"{source.path}: '{config.model_type}' has no causal-LM class in transformers "
                        f"({_first_line(exc)}); give the original model's Hugging Face folder instead") from None


def _model_loaded_archs() -> set[str]:
    """Architectures transformers maps only through its newer loader (weight converters, no tensor processor)."""
    from transformers.integrations.gguf import GGUF_ARCHS

    return set(GGUF_ARCHS)


def _write_streamed(source: GgufSource, config: Any, model: Any, dtype: torch.dtype, writer: ShardWriter) -> None:
    """Dequantise, un-permute and rename one tensor at a time with transformers' legacy GGUF mapping."""
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    processor = TENSOR_PROCESSORS.get(source.architecture, TensorProcessor)(config=config.to_dict())
    mapping = get_gguf_hf_weights_map(model, processor)
    assembled: dict[str, dict] = {"tensors": {}}
    for tensor in source.reader.tensors:
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=mapping, parsed_parameters=assembled)
        if result.name in mapping:
            writer.add(mapping[result.name], _as_torch(result.weights, dtype))
    # MoE experts (and GPT-2's head) are assembled by the processors across several source tensors: written last
    for name, tensor in assembled["tensors"].items():
        writer.add(name, tensor.to(dtype))


def _as_torch(weights: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    import numpy as np
    import torch

    # an F32 tensor comes back as a read-only view of the memory-mapped file: copy it, torch wants writable memory
    array = weights if weights.flags.writeable else np.array(weights)
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)


def _write_loaded(source: GgufSource, dtype: torch.dtype, writer: ShardWriter) -> None:
    """Architectures of transformers' newer GGUF loader: load the dequantised model once, write its tensors."""
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(str(source.path.parent), gguf_file=source.path.name, dtype=dtype,
                                                 quantization_config=GgufConfig(dequantize=True))
    tied = set(model.all_tied_weights_keys or {})
    for name, tensor in model.state_dict().items():
        if name not in tied:
            writer.add(name, tensor.to(dtype))


def _check_names(source: GgufSource, model: Any, written: set[str]) -> None:
    """Every weight of the native model must come from the file (tied copies excepted)."""
    want = set(model.state_dict()) - set(model.all_tied_weights_keys or {})
    missing = sorted(want - written)
    if missing:
        raise UserError(f"{source.path}: the file lacks {len(missing)} weight(s) its metadata implies (e.g. "
                        f"{', '.join(missing[:3])}); it is incomplete or mislabelled: {REDO}")


# --- tokenizer and stop ids ------------------------------------------------------------------------------------------

def write_tokenizer(source: GgufSource, out_dir: Path) -> list[int]:
    """Save the file's tokenizer with its chat template; return every id that ends an answer."""
    tokenizer = load_gguf_tokenizer(source)
    end = end_of_turn_id(tokenizer)
    if end is not None and end != tokenizer.eos_token_id:
        # as Hugging Face instruct folders have it: the tokenizer's eos ends an answer, so training finds the end of
        # a turn in tokenizer templates and chat stops there (a GGUF's eos is often the base model's end of text)
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(end)
    tokenizer.save_pretrained(out_dir)
    return gguf_stop_ids(source, end)


def load_gguf_tokenizer(source: GgufSource) -> PreTrainedTokenizerBase:
    """The file's tokenizer rebuilt by transformers, with the GGUF's chat template (`tokenizer.chat_template`)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    except (ValueError, KeyError, TypeError) as exc:
        kind = source.meta("tokenizer.ggml.model", "none")
        raise UserError(f"{source.path}: its tokenizer (tokenizer.ggml.model={kind}) cannot be rebuilt by "
                        f"transformers ({_first_line(exc)}); {REDO}") from None
    template = source.meta("tokenizer.chat_template")
    if template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    return tokenizer


def gguf_stop_ids(source: GgufSource, end_of_turn: int | None) -> list[int]:
    """Every id that ends an answer: eos, eot and eom from the metadata, and the template's end-of-turn token."""
    ids: list[int] = []
    candidates = [source.meta(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    for tid in [*candidates, end_of_turn]:
        if tid is not None and int(tid) not in ids:
            ids.append(int(tid))
    return ids


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template writes right after an assistant answer (ChatML's <|im_end|>), if one."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ANSWER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that refuses this conversation (raise_exception) names no end token
        return None
    if not isinstance(text, str) or ANSWER not in text:
        return None
    rest = text[text.rindex(ANSWER) + len(ANSWER):].lstrip(" ")
    specials = {tok.content: tid for tid, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    match = max((tok for tok in specials if tok and rest.startswith(tok)), key=len, default=None)
    return specials[match] if match is not None else None
