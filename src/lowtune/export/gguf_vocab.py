"""A model folder's tokenizer as GGUF metadata, spelled the way llama.cpp reads it (as its convert_hf_to_gguf.py does).

Two tokenizer kinds cover the families lowtune exports:
- `gpt2`, byte-level BPE (tokenizer.json): every token as the BPE spells it (`Ġ` for a space), the merges, and the
  name of the pre-tokenizer (`tokenizer.ggml.pre`), which tells llama.cpp how to split text before merging.
- `llama`, SentencePiece (tokenizer.model, or a tokenizer.json converted from one): pieces, their scores (llama.cpp
  merges the best-scoring pair first, as SentencePiece's BPE does) and their types.
Added tokens become CONTROL (special) or USER_DEFINED; both are matched whole in text, as Hugging Face tokenizers do.
Ids the embedding has but the tokenizer lacks are `[PAD<id>]`, UNUSED.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowtune.errors import UserError

if TYPE_CHECKING:
    from gguf import GGUFWriter
    from transformers import PreTrainedTokenizerBase

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
"""llama.cpp's token types (gguf.TokenType), the same numbers as SentencePiece's piece types."""
SPM_BPE = 2
"""SentencePiece trainer_spec.model_type of a BPE model (what llama.cpp's `llama` tokenizer runs)."""

# The split expressions of llama.cpp's named pre-tokenizers, as tokenizer.json files write them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
NAMED_SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


@dataclass
class Vocab:
    model: str
    """tokenizer.ggml.model: 'gpt2' or 'llama'."""
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    add_space_prefix: bool | None = None


def read_vocab(model_dir: Path, tokenizer: PreTrainedTokenizerBase, vocab_size: int, starts_with_bos: bool) -> Vocab:
    """The vocabulary of `model_dir` padded to the embedding's `vocab_size` rows.

    `starts_with_bos`: the chat template writes BOS first (decides SentencePiece's space prefix, see space_prefix).
    """
    largest = max(tokenizer.get_vocab().values())
    if largest >= vocab_size:
        raise UserError(f"{model_dir}: the tokenizer has token id {largest}, but config.json's vocab_size is "
                        f"{vocab_size}; resize the embeddings (model.resize_token_embeddings) and save it again")
    spm_file = model_dir / "tokenizer.model"
    spec = backend_spec(model_dir, tokenizer)
    if spm_file.is_file() and _is_sentencepiece_bpe(spm_file):
        return sentencepiece_vocab(spm_file, tokenizer, vocab_size, spec, starts_with_bos)
    if spec is None:
        raise UserError(f"{model_dir} has neither tokenizer.json nor a SentencePiece tokenizer.model; save the "
                        "tokenizer into it (tokenizer.save_pretrained)")
    if spec["model"].get("type") != "BPE":
        raise UserError(f"{model_dir}: a {spec['model'].get('type')} tokenizer; GGUF export writes "
                        "byte-level BPE and SentencePiece BPE tokenizers only (llama, mistral, qwen2 families)")
    if spec["model"].get("byte_fallback"):
        return sentencepiece_vocab_from_json(spec, tokenizer, vocab_size, starts_with_bos)
    return byte_level_vocab(model_dir, spec, tokenizer, vocab_size)


def add_vocab(writer: GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)


def backend_spec(model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> dict | None:
    """The tokenizer as it runs, in tokenizer.json's form: transformers may replace the file's pre-tokenizer with
    its class's own (a folder whose config.json says qwen2 splits text as Qwen2Tokenizer does), and lowtune trained
    with what runs."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return json.loads(backend.to_str())
    path = model_dir / "tokenizer.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# --- byte-level BPE -------------------------------------------------------------------------------------------------

def byte_level_vocab(model_dir: Path, spec: dict, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> Vocab:
    by_id = {tid: token for token, tid in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for tid in range(vocab_size):
        if tid not in by_id:
            tokens.append(f"[PAD{tid}]")
            types.append(UNUSED)
        elif tid in added:
            tokens.append(added[tid].content)
            types.append(CONTROL if added[tid].special else USER_DEFINED)
        else:
            tokens.append(by_id[tid])
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return Vocab(model="gpt2", pre=pre_tokenizer_name(model_dir, spec.get("pre_tokenizer")), tokens=tokens,
                 types=types, merges=merges)


def pre_tokenizer_name(model_dir: Path, pre: dict | None) -> str:
    """llama.cpp's name for how tokenizer.json splits text before the merges."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = NAMED_SPLITS.get(steps[0].get("pattern", {}).get("Regex", ""))
        if name:
            return name
    raise UserError(f"{model_dir}: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is "
                    "none of those llama.cpp knows by name that lowtune maps (gpt-2, smollm, llama-bpe, qwen2); "
                    "convert this model with llama.cpp's convert_hf_to_gguf.py instead")


# --- SentencePiece ----------------------------------------------------------------------------------------------------

def _is_sentencepiece_bpe(path: Path) -> bool:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:  # noqa: BLE001 - tiktoken files and other formats share the name
        return False
    if len(proto.pieces) == 0:
        return False
    if proto.trainer_spec.model_type != SPM_BPE:
        raise UserError(f"{path}: a SentencePiece model of type {proto.trainer_spec.model_type} (not BPE); llama.cpp's "
                        "llama tokenizer runs BPE pieces only")
    return True


def sentencepiece_vocab(path: Path, tokenizer: PreTrainedTokenizerBase, vocab_size: int, spec: dict | None,
                        starts_with_bos: bool) -> Vocab:
    """Pieces, scores and types straight from tokenizer.model, then the tokenizer's added tokens over them."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    pieces = list(proto.pieces)[:vocab_size]
    tokens = [p.piece for p in pieces] + [f"[PAD{i}]" for i in range(len(pieces), vocab_size)]
    scores = [p.score for p in pieces] + [-10000.0] * (vocab_size - len(pieces))
    types = [p.type for p in pieces] + [UNUSED] * (vocab_size - len(pieces))
    _mark_added(tokenizer, tokens, scores, types)
    scheme = prepend_scheme(spec) if spec else "always" if proto.normalizer_spec.add_dummy_prefix else "never"
    return Vocab(model="llama", pre="default", tokens=tokens, types=types, scores=scores,
                 add_space_prefix=space_prefix(scheme, starts_with_bos))


def sentencepiece_vocab_from_json(spec: dict, tokenizer: PreTrainedTokenizerBase, vocab_size: int,
                                  starts_with_bos: bool) -> Vocab:
    """A SentencePiece BPE converted to tokenizer.json (no tokenizer.model): scores rebuilt from the merge order."""
    vocab: dict[str, int] = spec["model"]["vocab"]
    by_id = {tid: token for token, tid in vocab.items()}
    rank = _merge_ranks(spec["model"].get("merges", []))
    unk = spec["model"].get("unk_token")
    tokens, scores, types = [], [], []
    for tid in range(vocab_size):
        token = by_id.get(tid)
        if token is None:
            tokens.append(f"[PAD{tid}]")
            scores.append(-10000.0)
            types.append(UNUSED)
            continue
        tokens.append(token)
        # llama.cpp merges the pair whose joined piece scores highest: earlier merges score higher
        scores.append(-float(rank[token]) if token in rank else 0.0)
        types.append(UNKNOWN if token == unk else BYTE if _is_byte_piece(token) else NORMAL)
    _mark_added(tokenizer, tokens, scores, types)
    return Vocab(model="llama", pre="default", tokens=tokens, types=types, scores=scores,
                 add_space_prefix=space_prefix(prepend_scheme(spec), starts_with_bos))


def _merge_ranks(merges: list[Any]) -> dict[str, int]:
    """Joined piece -> rank of the first merge that makes it."""
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        ranks.setdefault(left + right, rank + 1)
    return ranks


def _is_byte_piece(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def prepend_scheme(spec: dict) -> str:
    """Where tokenizer.json puts SentencePiece's dummy '▁': 'always' (every stretch between added tokens), 'first'
    (only where the text starts with plain text) or 'never'."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace":
        return pre.get("prepend_scheme", "always")
    normalizer = spec.get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer]) if normalizer else []
    return "always" if any(step.get("type") == "Prepend" for step in steps) else "never"


def space_prefix(scheme: str, starts_with_bos: bool) -> bool:
    """llama.cpp's add_space_prefix that tokenizes chat prompts as the model's own tokenizer does.

    llama.cpp puts the space before the first stretch of text and after every special token, which is 'always'.
    For 'first', the prompts lowtune renders start with BOS text, so no stretch gets the space: llama.cpp must add
    none either. Only a template without BOS starts with plain text, which gets it.
    """
    return scheme == "always" or (scheme == "first" and not starts_with_bos)


def _mark_added(tokenizer: PreTrainedTokenizerBase, tokens: list[str], scores: list[float],
                types: list[int]) -> None:
    """Added tokens over the pieces: special ones CONTROL, others USER_DEFINED (both matched whole in text)."""
    for tid, added in tokenizer.added_tokens_decoder.items():
        if tid >= len(tokens):
            continue
        if types[tid] in (UNKNOWN, BYTE) and tokens[tid] == added.content:
            continue  # <unk> and byte pieces keep their own type
        tokens[tid] = added.content
        types[tid] = CONTROL if added.special else USER_DEFINED
        scores[tid] = -1000.0
