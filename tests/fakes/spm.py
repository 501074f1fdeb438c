"""Tiny SentencePiece BPE models with real special pieces at real ids, trained locally on lowtune's corpus.

`make_spm_model(path, size, specials={103027: "<eoh>", 103028: "<eoa>"})` writes a `tokenizer.model` whose layout
follows the LLaMA-style models these families published: `<unk>`=0, `<s>`=1, `</s>`=2, then the 256 byte pieces
(at 3..258 unless a special sits there, so InternLM's `\\n` is `<0x0A>` = 13) and the learned pieces, the given
user-defined specials at their fixed ids, and unused filler pieces up to `size`.
"""

from __future__ import annotations

import io
from importlib import resources
from pathlib import Path

TEMPLATE_LINES = [
    "<|User|>:你好<eoh>\n<|Bot|>:你好，我是书生·浦语<eoa>\n",
    "<|System|>:You are a professional, highly experienced doctor professor.\n",
    "<|im_start|>user\nWhat are ketorolac eye drops?<|im_end|>\n<|im_start|>assistant\n",
    "<reserved_106>请介绍一下你自己<reserved_107>我是一个助手。\n",
]


def corpus() -> list[str]:
    text = (resources.files("lowtune") / "assets" / "tiny_corpus.txt").read_text(encoding="utf-8")
    return text.splitlines() + TEMPLATE_LINES * 4


def make_spm_model(path: Path, size: int, specials: dict[int, str], add_dummy_prefix: bool = True,
                   learned: int = 700) -> Path:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus() * 2), model_writer=buf, vocab_size=learned, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=list(specials.values()), allow_whitespace_only_pieces=True, minloglevel=2,
        num_threads=1)
    trained = pb.ModelProto()
    trained.ParseFromString(buf.getvalue())
    head = list(trained.pieces[:3])
    queue = [p for p in trained.pieces if p.type == 6] + [p for p in trained.pieces if p.type == 1]
    by_name = {p.piece: p for p in trained.pieces if p.type == 4}
    layout: list = head
    filler = 0
    while len(layout) < size:
        idx = len(layout)
        if idx in specials:
            layout.append(by_name[specials[idx]])
        elif queue:
            layout.append(queue.pop(0))
        else:
            layout.append(pb.ModelProto.SentencePiece(piece=f"<unused{filler}>", score=0.0, type=5))
            filler += 1
    if queue:
        raise ValueError(f"{len(queue)} learned pieces do not fit in a vocabulary of {size}")
    del trained.pieces[:]
    trained.pieces.extend(layout)
    path.write_bytes(trained.SerializeToString())
    return path
