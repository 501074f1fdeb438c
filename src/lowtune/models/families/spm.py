"""SentencePiece `tokenizer.model` -> a native `tokenizer.json` (tokenizers BPE with byte fallback), same ids.

Used for families whose published tokenizer is remote code around a SentencePiece BPE model (InternLM v1/2,
Baichuan). The vocabulary keeps every piece at its id; merges come from the pieces' scores (SentencePiece BPE
merges the adjacent pair whose joined piece scores highest, which is what a merge list ranked by that score does).
Unused pieces never take part in merges; user-defined pieces (e.g. `<eoh>`, `<reserved_106>`) become special added
tokens, so chat output that stops on `<eoa>` never shows it.

`prepend` decides where the dummy-prefix space goes when the model has `add_dummy_prefix`:
- "first": only at the start of the text, like `SentencePieceProcessor.encode` on the whole string, with
  user-defined pieces inline (InternLM v1: no dummy space after `<eoh>`, so `<eoh>\\n` encodes as SentencePiece does);
- "always": at the start of every stretch between added tokens, like the published fast tokenizers that split on
  added tokens and encode each stretch separately (InternLM2).
Known limit of "first": a text that itself starts with a space gets one space-piece fewer than SentencePiece
(the tokenizers Metaspace never doubles a leading `▁`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def load_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


def _merges(proto) -> list[tuple[str, str]]:
    normal = {p.piece for p in proto.pieces if p.type == NORMAL}
    ranked = []
    for idx, piece in enumerate(proto.pieces):
        if piece.type != NORMAL or len(piece.piece) < 2:
            continue
        for cut in range(1, len(piece.piece)):
            left, right = piece.piece[:cut], piece.piece[cut:]
            if left in normal and right in normal:
                ranked.append((-piece.score, idx, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def build_fast_tokenizer(model_file: Path, prepend: str = "first", extra_added: dict[int, str] | None = None,
                         special: set[str] | None = None, add_bos: bool = True, add_eos: bool = False):
    """A `tokenizers.Tokenizer` equivalent to the SentencePiece model in `model_file`.

    `extra_added`: id -> content of tokens the original tokenizer registered as added tokens (beyond the model's
    control and user-defined pieces). `special`: which added tokens are special (skipped when decoding).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    proto = load_proto(model_file)
    if proto.trainer_spec.model_type != 2:  # 1 = unigram, 2 = bpe
        raise ValueError(f"{model_file}: only SentencePiece BPE models convert exactly (got type "
                         f"{proto.trainer_spec.model_type})")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = next((p.piece for p in proto.pieces if p.type == UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges(proto), unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    dummy = proto.normalizer_spec.add_dummy_prefix
    if prepend == "always" or not dummy:
        steps = [normalizers.Prepend("▁")] if dummy else []
        tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence([*steps, decoders.Strip(content=" ", left=1)] if dummy else steps)

    special = set(special or ())
    added: dict[int, str] = {i: p.piece for i, p in enumerate(proto.pieces) if p.type in (CONTROL, UNKNOWN,
                                                                                           USER_DEFINED)}
    added.update(extra_added or {})
    special |= {p.piece for p in proto.pieces if p.type in (CONTROL, UNKNOWN, USER_DEFINED)}
    for idx in sorted(added):
        content = added[idx]
        if vocab.get(content) != idx:
            raise ValueError(f"{model_file}: added token {content!r} is not piece {idx} of the model")
        token = AddedToken(content, normalized=False, special=content in special)
        (tok.add_special_tokens if content in special else tok.add_tokens)([token])

    bos = proto.pieces[proto.trainer_spec.bos_id].piece if proto.trainer_spec.bos_id >= 0 else None
    eos = proto.pieces[proto.trainer_spec.eos_id].piece if proto.trainer_spec.eos_id >= 0 else None
    single = " ".join([*([f"{bos}:0"] if add_bos and bos else []), "$A:0", *([f"{eos}:0"] if add_eos and eos else [])])
    pair = single + " " + " ".join([*([f"{bos}:1"] if add_bos and bos else []), "$B:1",
                                    *([f"{eos}:1"] if add_eos and eos else [])])
    specials = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if t and on]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return tok


def save_native_tokenizer(model_file: Path, out_dir: Path, tokenizer_config: dict[str, Any], **kwargs) -> None:
    """Write tokenizer.json + tokenizer_config.json (+ the original tokenizer.model) loadable by AutoTokenizer."""
    import shutil

    tok = build_fast_tokenizer(model_file, **kwargs)
    tok.save(str(out_dir / "tokenizer.json"))
    shutil.copyfile(model_file, out_dir / "tokenizer.model")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": 1000000000000000019884624838656, **tokenizer_config}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
