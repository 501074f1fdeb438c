"""A tiktoken BPE file (`qwen.tiktoken`: base64 token, rank per line) -> a native byte-level `tokenizer.json`.

tiktoken merges, inside each regex-split piece, the adjacent pair whose joined bytes have the lowest rank. A
byte-level BPE whose merge list holds every split (a, b) of every token with both halves in the vocabulary, ranked
by the joined token's rank, picks the same pair at every step, so the ids are the same. Special tokens are added
tokens matched before the regex split, as tiktoken does with `allowed_special="all"`.
"""

from __future__ import annotations

import base64
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def load_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_fast_tokenizer(ranks: dict[bytes, int], pattern: str, specials: dict[str, int], nfc: bool = True):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    to_char = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError("tiktoken ranks must be 0..N-1 without gaps")
    first_special = min(specials.values(), default=len(vocab))
    for idx in range(len(vocab), first_special):  # ids no text can reach, so specials keep their ids
        vocab[f"<|unused_rank_{idx}|>"] = idx
    merges = []
    for tok, rank in ranks.items():
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], text(left), text(right)))
    merges.sort()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in merges], ignore_merges=False))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    for content, idx in sorted(specials.items(), key=lambda kv: kv[1]):
        tok.add_special_tokens([AddedToken(content, normalized=False, special=True)])
        if tok.token_to_id(content) != idx:
            raise ValueError(f"special token {content} landed on id {tok.token_to_id(content)}, not {idx}")
    return tok
