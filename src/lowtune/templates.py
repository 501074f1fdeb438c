"""Chat templates: one object used by training, chat, web, serve and export alike.

The tokenizer's own `chat_template` is used when it has one; models that lack one (InternLM v1, ...) get a shipped
Jinja file from `chat_templates/`. Shipped templates wrap each trained span (answer + end-of-turn token) in
`{% generation %}` so label masks come from the template itself. Rendering goes through transformers'
`apply_chat_template` (no template engine of our own). Rendered text includes the BOS token where the model uses
one; encode it with `add_special_tokens=False`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowtune.errors import UserError, did_you_mean

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATE_FILE = "chat_template.jinja"

# Stop words of each shipped template: generation ends at any of them (plus the tokenizer's EOS).
STOP_WORDS: dict[str, tuple[str, ...]] = {
    "internlm_chat": ("<eoa>", "</s>"),
    "internlm2_chat": ("<|im_end|>",),
    "chatml": ("<|im_end|>",),
    "qwen_chat": ("<|im_end|>", "<|endoftext|>"),
    "default": (),
}
# model_type in config.json -> shipped template used when the tokenizer has none.
FAMILY_TEMPLATES = {
    "internlm": "internlm_chat",
    "internlm2": "internlm2_chat",
    "qwen": "qwen_chat",
}


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    """Shipped template name, 'tokenizer' for the tokenizer's own, or a file path."""
    source: str
    """Jinja source, as transformers' apply_chat_template takes it."""
    stop_words: tuple[str, ...] = field(default=())

    @property
    def marks_generation(self) -> bool:
        return "{% generation %}" in self.source or "{%- generation %}" in self.source

    def render(self, messages: list[dict], tokenizer: PreTrainedTokenizerBase,
               add_generation_prompt: bool = False) -> str:
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        return tokenizer.apply_chat_template(plain, chat_template=self.source, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    def encode_prompt(self, messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Token ids of a conversation ready for the model's next answer (inference)."""
        text = self.render(messages, tokenizer, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Ids that end a generated answer: the template's stop words that are single tokens, plus EOS."""
        ids: list[int] = []
        for word in self.stop_words:
            tid = tokenizer.convert_tokens_to_ids(word)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
        eos = tokenizer.eos_token_id
        for tid in eos if isinstance(eos, list) else [eos]:
            if tid is not None and tid not in ids:
                ids.append(tid)
        return ids


def shipped_names() -> list[str]:
    folder = resources.files("lowtune") / "chat_templates"
    return sorted(p.name[:-6] for p in folder.iterdir() if p.name.endswith(".jinja"))


def shipped(name: str) -> ChatTemplate:
    if name not in shipped_names():
        raise UserError(f"unknown chat template '{name}'{did_you_mean(name, shipped_names())}; "
                        f"known: {', '.join(shipped_names())}, or a path to a .jinja file")
    source = (resources.files("lowtune") / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")
    return ChatTemplate(name=name, source=source, stop_words=STOP_WORDS.get(name, ()))


def _model_type(model_dir: Path | None) -> str | None:
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        return None
    config: dict[str, Any] = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return config.get("lowtune_family") or config.get("model_type")


def resolve_template(name: str, tokenizer: PreTrainedTokenizerBase, model_dir: Path | None = None,
                     stop_words: tuple[str, ...] = ()) -> ChatTemplate:
    """The template to use: 'auto' = a template saved beside the model, else the tokenizer's own, else the family's.

    `name` may also be a shipped template name or a path to a .jinja file.
    """
    if name != "auto":
        path = Path(name)
        if path.suffix == ".jinja":
            if not path.is_file():
                raise UserError(f"chat template file not found: {path}")
            return ChatTemplate(name=str(path), source=path.read_text(encoding="utf-8"), stop_words=stop_words)
        return shipped(name)
    family = FAMILY_TEMPLATES.get(_model_type(model_dir) or "")
    if family:
        # a family whose published tokenizer template lacks a system slot or the trained end-of-turn token
        return shipped(family)
    if getattr(tokenizer, "chat_template", None):
        return ChatTemplate(name="tokenizer", source=tokenizer.chat_template, stop_words=stop_words)
    return shipped("default")
