"""`lowtune export RUN|MODEL --format gguf|ollama`: one GGUF file for llama.cpp, LM Studio and Ollama, written with the
`gguf` package (no llama.cpp build needed), and for Ollama a Modelfile beside it (export/ollama.py).

A run is merged first (export/merge.py, into a temp folder dropped afterwards); a model folder, a GGUF-imported
folder, builtin:NAME or a .gguf file is exported as it is. Everything llama.cpp needs comes from the files chat reads:
- tensors renamed by `gguf.TensorNameMap` for the architecture: `llama` (also Mistral, and the native folders lowtune
  converts InternLM v1, InternLM2, Qwen v1 and Baichuan into) or `qwen2`; for `llama`, the Q/K rows permuted into
  llama.cpp's rotary layout, as its convert_hf_to_gguf.py does;
- hyper-parameters from config.json, the tokenizer from its own files (export/gguf_vocab.py);
- the chat template the model was trained with (the run's chat_template.jinja) without lowtune's `{% generation %}`
  tags, which llama.cpp's Jinja does not know; every stop id as eos/eot/eom; `add_bos_token` exactly when the
  template starts with BOS (llama.cpp then adds it itself).
f32/f16/bf16/q8_0 are quantised by `gguf.quants`; llama.cpp's k-quants (q4_k_m, ...) by its own quantiser through
llama-cpp-python (the `gguf-quant` extra) when that is installed.

The file is streamed: tensor infos first (from shapes alone), then one tensor at a time, so memory stays near the
largest tensor in float32. The output folder is written as a temp folder renamed into place (runs.staged_dir).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowtune.errors import UserError
from lowtune.export.gguf_vocab import add_vocab, read_vocab
from lowtune.export.merge import all_stop_ids, find_source, merge_template, resolve_base, write_merged
from lowtune.export.ollama import SAMPLE_CONVERSATIONS, modelfile_for, ollama_model_name, writes_bos_first
from lowtune.models.builtin import is_builtin
from lowtune.models.families.base import iter_tensors, weight_shards
from lowtune.models.gguf import is_gguf_name
from lowtune.models.resolve import resolve_model_dir
from lowtune.runs import (GENERATION_CONFIG, Located, is_adapter_dir, is_run_folder, locate_folder, read_stop_ids,
                          staged_dir)
from lowtune.templates import ChatTemplate

if TYPE_CHECKING:
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, GGUFWriter
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

FORMATS = ("gguf", "ollama")
WRITTEN_QUANTS = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
"""--quant values the `gguf` package writes itself -> GGML tensor type of 2-D weights."""
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
LLAMA_CPP_QUANTS = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
                    "q5_k_s", "q5_k_m", "q6_k")
"""--quant values only llama.cpp's quantiser makes (llama-cpp-python's llama_model_quantize)."""
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
"""config.json model_type -> GGUF architecture (llama.cpp runs Mistral 7B as llama, as its converter writes it)."""
ROTARY_PERMUTED = {"llama"}
"""Architectures whose Q/K rows llama.cpp expects interleaved per head (it applies rotary to adjacent pairs)."""
SKIPPED = ("rotary_emb.inv_freq",)
MERGE_DIR = ".merged"
PROGRESS_BYTES = 256 * 2**20
"""Files at least this big print a progress line every tenth."""
GENERATION_TAGS = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


@dataclass
class ExportSource:
    """A full model folder and what chat reads beside it: template, stop ids, default system prompt."""

    model_dir: Path
    name: str
    tokenizer: Any
    template: ChatTemplate
    stop_ids: list[int]
    system: str | None = None
    adapter: Located | None = None
    """The run or adapter to merge into `model_dir` (its base) before writing; None for a full model."""


@dataclass
class ExportResult:
    out_dir: Path
    gguf: Path
    quant: str
    stop_ids: list[int]
    template_name: str
    modelfile: Path | None = None
    ollama_name: str | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class PlannedTensor:
    """One tensor of the GGUF file, known before its data is read."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    source: str = ""
    """Its name in the model folder; '' for a tensor lowtune computes (llama3's rope_freqs)."""
    rotary_heads: int = 0
    """Heads to permute the rows over (llama Q/K), 0 for none."""

    @property
    def nbytes(self) -> int:
        from gguf import GGML_QUANT_SIZES

        block, size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


# --- checking the request ---------------------------------------------------------------------------------------------

def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)} (got '{fmt}')")
    return fmt


def check_quant(quant: str) -> str:
    """A --quant value this machine can write; k-quants need llama-cpp-python."""
    quant = quant.lower()
    if quant in WRITTEN_QUANTS:
        return quant
    if quant not in LLAMA_CPP_QUANTS:
        choices = ", ".join([*WRITTEN_QUANTS, *LLAMA_CPP_QUANTS])
        raise UserError(f"--quant {quant} is not a GGUF type lowtune writes; choose one of {choices}")
    try:
        import llama_cpp  # noqa: F401  (its quantiser is llama.cpp's own library)
    except ImportError:
        raise UserError(f"--quant {quant} needs llama.cpp's quantiser: pip install 'lowtune[gguf-quant]' "
                        f"(llama-cpp-python), or export --quant f16 and run llama.cpp's "
                        f"`llama-quantize NAME-f16.gguf NAME-{quant}.gguf {quant.upper()}`") from None
    return quant


def check_output(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"{out} already exists and is not empty; choose another -o or add --force")


def export_name(target: str) -> str:
    """A file-name-safe name for the export: the run or model folder's name, the GGUF's stem, the builtin's name."""
    if is_builtin(target):
        raw = target.split(":", 1)[1]
    elif is_gguf_name(target):
        raw = Path(target).name[: -len(".gguf")]
    else:
        raw = Path(target).expanduser().resolve().name if Path(target).expanduser().exists() else target
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw.split("/")[-1]).strip("-.") or "model"


# --- what to export -----------------------------------------------------------------------------------------------

def prepare_source(target: str) -> ExportSource:
    """RUN|ADAPTER|MODEL -> the folder to export with the template and stop ids it was trained with; nothing heavy
    is loaded, so a request that cannot be exported fails before the merge. An adapter's folder is its base until
    `merge_adapter` runs."""
    from transformers import AutoTokenizer

    path = Path(target).expanduser()
    adapter = None
    if path.is_dir() and (is_run_folder(path) or is_adapter_dir(path)):
        located = locate_folder(path)
        if located.weights is None:
            raise UserError(f"{path} has no trained weights yet (no adapter/, model/ or complete checkpoint); "
                            "train it first")
        if located.kind == "adapter":
            located = adapter = find_source(target)  # merge's own checks: a mergeable adapter, a base to merge into
            model_dir = resolve_base(located)
        else:
            model_dir = resolve_model_dir(str(located.weights))
    else:
        model_dir = resolve_model_dir(target)
        located = locate_folder(model_dir)
    read_model_config(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(located.tokenizer_dir if adapter and located.tokenizer_dir
                                                  else model_dir))
    template = merge_template(located, tokenizer, model_dir)
    if template.name == "auto":  # the template saved with the model: say whose it is
        template = ChatTemplate(name="tokenizer", source=template.source, stop_words=template.stop_words)
    stop_ids = all_stop_ids(template, tokenizer, located.stop_ids, read_stop_ids(model_dir / GENERATION_CONFIG))
    if not stop_ids:
        raise UserError(f"{model_dir}: no stop token (the tokenizer has no EOS and generation_config.json lists "
                        "none); add eos_token_id to generation_config.json")
    system = (located.config.eval.system or located.config.data.system or None) if located.config else None
    return ExportSource(model_dir=model_dir, name=export_name(target), tokenizer=tokenizer, template=template,
                        stop_ids=stop_ids, system=system, adapter=adapter)


def merge_adapter(source: ExportSource, merge_dir: Path) -> None:
    """Merge the adapter into `merge_dir` in its base's own dtype (export.merge, as `lowtune merge` does); the
    merged folder, whose tokenizer carries the same template and stop ids, is what gets exported."""
    from lowtune.export.merge import choose_dtype

    base_dir = source.model_dir
    print(f"merging {source.adapter.weights} into its base {base_dir} first ...", file=sys.stderr, flush=True)
    merge_dir.mkdir(parents=True)
    write_merged(source.adapter, base_dir, merge_dir, choose_dtype("auto", base_dir), "2GB")
    source.model_dir = merge_dir


def runtime_template(source: ExportSource) -> str:
    """The training template as llama.cpp's Jinja reads it: `{% generation %}` tags removed, same rendered text."""
    stripped = ChatTemplate(name=source.template.name, source=GENERATION_TAGS.sub("", source.template.source))
    for messages in SAMPLE_CONVERSATIONS:
        try:
            expected = source.template.render(messages, source.tokenizer, add_generation_prompt=True)
        except UserError:
            continue  # a conversation the template itself refuses (a system prompt where it has no slot)
        if stripped.render(messages, source.tokenizer, add_generation_prompt=True) != expected:
            raise UserError(f"chat template '{source.template.name}' renders differently without its "
                            "{% generation %} tags; put them right beside the text they wrap")
    return stripped.source


# --- the GGUF file ------------------------------------------------------------------------------------------------

def read_model_config(model_dir: Path) -> PretrainedConfig:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    if config.model_type not in ARCHITECTURES:
        raise UserError(f"{model_dir}/config.json: model_type '{config.model_type}' has no GGUF export in lowtune "
                        f"(it writes {', '.join(ARCHITECTURES)}); convert it with llama.cpp's convert_hf_to_gguf.py")
    return config


def write_gguf(source: ExportSource, path: Path, quant: str) -> list[str]:
    """Write `source` as one GGUF file of type `quant` (f32/f16/bf16/q8_0); return notes for the user."""
    import numpy as np
    from gguf import GGUFWriter

    config = read_model_config(source.model_dir)
    arch = ARCHITECTURES[config.model_type]
    writer = GGUFWriter(path=None, arch=arch)
    add_general(writer, source.name, quant)
    notes = add_hyperparameters(writer, config)
    add_bos = writes_bos_first(source.template, source.tokenizer)
    add_vocab(writer, read_vocab(source.model_dir, source.tokenizer, config.vocab_size, add_bos))
    notes += add_chat(writer, source, add_bos)
    plan = plan_tensors(source.model_dir, config, arch, quant)
    for tensor in plan:
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=tensor.qtype)
    progress = Progress(path.name, sum(t.nbytes for t in plan))
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor, (name, data) in zip(plan, tensor_data(source.model_dir, plan, config), strict=True):
            assert name == tensor.name, f"{name} read where {tensor.name} was planned"  # both walk the same files
            writer.write_tensor_data(data)
            progress.advance(tensor.nbytes)
    finally:
        writer.close()
    return notes


def add_general(writer: GGUFWriter, name: str, quant: str) -> None:
    from gguf import GGML_QUANT_VERSION, LlamaFileType

    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(LlamaFileType[FILE_TYPES[quant]].value)
    writer.add_quantization_version(GGML_QUANT_VERSION)


def add_hyperparameters(writer: GGUFWriter, config: PretrainedConfig) -> list[str]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    notes = add_rope_scaling(writer, config)
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window and window < config.max_position_embeddings:
        notes.append(f"the model attends over a {window}-token sliding window; llama.cpp's {config.model_type} "
                     f"attends over the whole context, so answers may differ beyond {window} tokens")
    return notes


def rope_parameters(config: PretrainedConfig) -> dict:
    """rope_theta, rope_type and scaling settings, from transformers 5's rope_parameters or the older keys."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return params
    legacy = dict(getattr(config, "rope_scaling", None) or {})
    legacy.setdefault("rope_type", legacy.pop("type", "default"))
    return {"rope_theta": getattr(config, "rope_theta", 10000.0), **legacy}


def add_rope_scaling(writer: GGUFWriter, config: PretrainedConfig) -> list[str]:
    from gguf import RopeScalingType

    params = rope_parameters(config)
    writer.add_rope_freq_base(float(params["rope_theta"]))
    kind = params.get("rope_type") or "default"
    if kind in ("default", "llama3"):  # llama3's factors go in the rope_freqs tensor
        return []
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
        return []
    if kind == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(params["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(params.get("original_max_position_embeddings")
                                                 or config.max_position_embeddings))
        return []
    if kind == "dynamic":
        return [f"rope scaling is dynamic NTK, which llama.cpp lacks: answers match up to "
                f"{config.max_position_embeddings} tokens (the file's context length)"]
    raise UserError(f"config.json: rope type '{kind}' has no llama.cpp equivalent that lowtune writes (default, "
                    "linear, dynamic, llama3, yarn); convert it with llama.cpp's convert_hf_to_gguf.py")


def add_chat(writer: GGUFWriter, source: ExportSource, add_bos: bool) -> list[str]:
    """The chat template, special ids and every stop id (llama.cpp ends generation at eos, eot and eom)."""
    tokenizer = source.tokenizer
    writer.add_chat_template(runtime_template(source))
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    for kind, tid in (("bos", tokenizer.bos_token_id), ("unk", tokenizer.unk_token_id),
                      ("pad", tokenizer.pad_token_id)):
        if tid is not None:
            getattr(writer, f"add_{kind}_token_id")(tid)
    slots = stop_slots(tokenizer, source.stop_ids)
    for kind, tid in slots.items():
        getattr(writer, f"add_{kind}_token_id")(tid)
    left = [tid for tid in source.stop_ids if tid not in slots.values()]
    if left:
        return [f"stop ids {left} do not fit GGUF's eos/eot/eom slots: llama.cpp stops there only when it "
                "recognises the token's text; the Ollama Modelfile lists them as stops"]
    return []


def stop_slots(tokenizer: PreTrainedTokenizerBase, stop_ids: list[int]) -> dict[str, int]:
    """eos = the tokenizer's EOS when it stops an answer, else the first stop id; eot and eom = the next ones."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id in stop_ids else stop_ids[0]
    others = [tid for tid in stop_ids if tid != eos]
    return {"eos": eos, **dict(zip(("eot", "eom"), others))}


# --- tensors ------------------------------------------------------------------------------------------------------

def plan_tensors(model_dir: Path, config: PretrainedConfig, arch: str, quant: str) -> list[PlannedTensor]:
    """Every tensor of the file, named and typed, from the weight files' shapes (no data read)."""
    from gguf import MODEL_ARCH, TensorNameMap

    names = TensorNameMap(MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    plan = []
    for source_name, shape in tensor_shapes(model_dir):
        if source_name.endswith(SKIPPED) or (source_name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        name = names.get_name(source_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"{model_dir}: tensor {source_name} has no llama.cpp name in the {arch} architecture; "
                            "convert this model with llama.cpp's convert_hf_to_gguf.py")
        rotary = 0
        if arch in ROTARY_PERMUTED and ".attn_q." in name:
            rotary = heads
        elif arch in ROTARY_PERMUTED and ".attn_k." in name:
            rotary = kv_heads
        plan.append(PlannedTensor(name=name, shape=shape, qtype=tensor_type(shape, quant), source=source_name,
                                  rotary_heads=rotary))
    if rope_parameters(config).get("rope_type") == "llama3":
        plan.append(PlannedTensor(name="rope_freqs.weight", shape=(_head_dim(config) // 2,),
                                  qtype=tensor_type((1,), "f32")))
    return plan


def tensor_type(shape: tuple[int, ...], quant: str) -> GGMLQuantizationType:
    """1-D tensors (norms, biases) stay F32, as llama.cpp keeps them; rows that do not fill a block fall back to F16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) == 1:
        return GGMLQuantizationType.F32
    qtype = GGMLQuantizationType[WRITTEN_QUANTS[quant]]
    block, _ = GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else GGMLQuantizationType.F16


def tensor_shapes(model_dir: Path) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight, in the order `iter_tensors` reads them, without loading any."""
    for shard in weight_shards(model_dir):
        if shard.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(shard), framework="pt") as handle:
                for key in handle.keys():
                    yield key, tuple(handle.get_slice(key).get_shape())
        else:
            for key, tensor in iter_tensors(shard):  # memory-mapped: shapes cost no reads
                yield key, tuple(tensor.shape)


def tensor_data(model_dir: Path, plan: list[PlannedTensor],
                config: PretrainedConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, bytes) of each planned tensor, in plan order, one tensor in memory at a time."""
    from gguf.quants import quantize

    wanted = {tensor.source: tensor for tensor in plan if tensor.source}
    for shard in weight_shards(model_dir):
        for key, tensor in iter_tensors(shard):
            planned = wanted.get(key)
            if planned is not None:
                yield planned.name, quantize(_as_float32(tensor, planned.rotary_heads), planned.qtype)
    for planned in plan:
        if planned.name == "rope_freqs.weight":
            yield planned.name, quantize(llama3_rope_factors(config), planned.qtype)


def _as_float32(tensor: torch.Tensor, rotary_heads: int) -> np.ndarray:
    import torch

    data = tensor.to(torch.float32)
    if rotary_heads:
        data = permute_rotary(data, rotary_heads)
    return data.contiguous().numpy()


def permute_rotary(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half Q/K rows -> llama.cpp's interleaved pairs (its convert_hf_to_gguf `permute`)."""
    rows = weights.shape[0]
    return (weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama3_rope_factors(config: PretrainedConfig) -> np.ndarray:
    """Llama 3.1's per-frequency rope scaling, which llama.cpp reads from the rope_freqs tensor."""
    import numpy as np

    params = rope_parameters(config)
    dim = _head_dim(config)
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_context = float(params.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (float(params["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelengths = 2 * math.pi / freqs
    smooth = (old_context / wavelengths - low) / (high - low)
    factors = np.where(wavelengths < old_context / high, 1.0,
                       np.where(wavelengths > old_context / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


class Progress:
    """A line every tenth of the bytes written, for files big enough to take a while."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self.shown = label.lstrip("."), total, 0, 0
        self.started = time.perf_counter()

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        tenth = self.done * 10 // max(self.total, 1)
        if self.total >= PROGRESS_BYTES and tenth > self.shown:
            self.shown = tenth
            print(f"{self.label}: {tenth * 10}% of {self.total / 1e9:.1f} GB written "
                  f"({time.perf_counter() - self.started:.0f}s)", file=sys.stderr, flush=True)


# --- llama.cpp's k-quants -------------------------------------------------------------------------------------------

def quantize_with_llama_cpp(source: Path, target: Path, quant: str) -> None:
    """Requantise a float GGUF with llama.cpp's own quantiser (llama-cpp-python's bundled library), quietly."""
    import ctypes
    import os

    import llama_cpp
    from gguf import LlamaFileType

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LlamaFileType[f"MOSTLY_{quant.upper()}"].value
    params.nthread = os.cpu_count() or 1
    print(f"quantising to {quant} with llama.cpp (llama-cpp-python {llama_cpp.__version__}) ...", file=sys.stderr,
          flush=True)
    with quiet_stderr():  # llama.cpp prints a line or two per tensor straight to the process's stderr
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if failed:
        raise UserError(f"llama.cpp could not quantise {source.name} to {quant}; try --quant q8_0, or run "
                        f"llama.cpp's `llama-quantize {source.name} {target.name} {quant.upper()}`")


@contextmanager
def quiet_stderr() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null for the block (C libraries write there directly)."""
    import os

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def k_quant_note(model_dir: Path, quant: str) -> list[str]:
    """k-quants pack rows in blocks of 256; llama.cpp stores narrower rows in a legacy type instead."""
    config = read_model_config(model_dir)
    widths = {config.hidden_size, config.intermediate_size}
    if "_k" not in quant or all(width % 256 == 0 for width in widths):
        return []
    return [f"rows of {sorted(w for w in widths if w % 256)} values do not fill {quant}'s blocks of 256, so "
            "llama.cpp stores those tensors as q5_0/q8_0 (as llama-quantize would)"]


def float_type_for(model_dir: Path) -> str:
    """The float type to quantise from: bf16 for weights stored in bf16 (no range lost), else f16."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return "bf16" if (config.get("dtype") or config.get("torch_dtype")) == "bfloat16" else "f16"


# --- the verb -----------------------------------------------------------------------------------------------------

def export(target: str, fmt: str = "gguf", quant: str = "f16", out_dir: str | Path | None = None,
           force: bool = False) -> ExportResult:
    """Export RUN|MODEL as `out_dir/NAME-QUANT.gguf` (+ `Modelfile` for ollama); all of it appears, or nothing."""
    started = time.perf_counter()
    fmt, quant = check_format(fmt), check_quant(quant)
    out = Path(out_dir).expanduser() if out_dir else Path("exports") / export_name(target)
    check_output(out, force)
    source = prepare_source(target)
    file_name = f"{source.name}-{quant}.gguf"
    modelfile = modelfile_for(source.template, source.tokenizer, source.stop_ids, source.system, file_name) \
        if fmt == "ollama" else None  # before the merge and the write: a template Ollama cannot take fails fast
    with staged_dir(out) as tmp:
        if source.adapter is not None:
            merge_adapter(source, tmp / MERGE_DIR)
        notes = _write_file(source, tmp / file_name, quant)
        if modelfile is not None:
            (tmp / "Modelfile").write_text(modelfile, encoding="utf-8")
        shutil.rmtree(tmp / MERGE_DIR, ignore_errors=True)
    return ExportResult(out_dir=out, gguf=out / file_name, quant=quant, stop_ids=source.stop_ids,
                        template_name=source.template.name, modelfile=out / "Modelfile" if modelfile else None,
                        ollama_name=ollama_model_name(source.name) if modelfile else None, notes=notes,
                        seconds=time.perf_counter() - started)


def _write_file(source: ExportSource, path: Path, quant: str) -> list[str]:
    if quant in WRITTEN_QUANTS:
        return write_gguf(source, path, quant)
    float_type = float_type_for(source.model_dir)
    float_file = path.with_name(f".{source.name}-{float_type}.gguf")
    notes = write_gguf(source, float_file, float_type)
    quantize_with_llama_cpp(float_file, path, quant)
    float_file.unlink()
    return notes + k_quant_note(source.model_dir, quant)
