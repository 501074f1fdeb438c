"""Chat templates: one object used by training, chat, web, serve and export alike.

The tokenizer's own `chat_template` is used when it has one; models that lack one (InternLM v1, ...) get a shipped
Jinja file from `chat_templates/`. Shipped templates wrap each trained span (answer + end-of-turn token) in
`{% generation %}` so label masks come from the template itself; templates without it (a tokenizer's own) are split
by rendering growing prefixes of the conversation. Rendering goes through transformers' Jinja renderer (no template
engine of our own). Rendered text includes the BOS token where the model uses one.

Token ids are built per segment (prompt scaffolding / trained answer span), each encoded with
`add_special_tokens=False`, for training and inference alike, so a prompt is encoded to exactly the ids the model
saw in training even where a tokenizer would merge characters across the prompt/answer boundary.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowtune.errors import UserError, did_you_mean

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Stop words of each shipped template: generation ends at any of them (plus the tokenizer's EOS).
STOP_WORDS: dict[str, tuple[str, ...]] = {
    "default": (),
    "zephyr": (),
    "internlm_chat": ("<eoa>", "</s>"),
    "internlm2_chat": ("<|im_end|>",),
    "moss_sft": ("<eoc>", "<eom>"),
    "llama2_chat": (),
    "code_llama_chat": (),
    "chatglm2": (),
    "chatglm3": (),
    "chatml": ("<|im_end|>",),
    "qwen_chat": ("<|im_end|>", "<|endoftext|>"),
    "baichuan_chat": (),
    "baichuan2_chat": (),
    "vicuna": (),
    "wizardlm": (),
    "wizardcoder": (),
    "deepseek_coder": (),
    "deepseek_moe": (),
    "deepseek_v2": ("<｜end▁of▁sentence｜>",),
    "mistral": (),
    "mixtral": (),
    "minicpm": (),
    "gemma": ("<end_of_turn>",),
    "cohere_chat": ("<|END_OF_TURN_TOKEN|>",),
    "llama3_chat": ("<|eot_id|>",),
    "phi3_chat": ("<|end|>",),
}
ALIASES = {"deepseekcoder": "deepseek_coder"}
# model_type in config.json -> shipped template used when the tokenizer has none.
FAMILY_TEMPLATES = {
    "internlm": "internlm_chat",
    "internlm2": "internlm2_chat",
    "qwen": "qwen_chat",
    "baichuan": "baichuan_chat",
    "baichuan2": "baichuan2_chat",
}

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
Segment = tuple[str, "int | None"]
"""(text, index of the assistant message whose trained span this is, or None for untrained scaffolding)."""


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    """Shipped template name, 'tokenizer' for the tokenizer's own, or a file path."""
    source: str
    """Jinja source, as transformers' apply_chat_template takes it."""
    stop_words: tuple[str, ...] = field(default=())

    @property
    def marks_generation(self) -> bool:
        return GENERATION_TAG.search(self.source) is not None

    def _render(self, messages: list[dict], tokenizer: PreTrainedTokenizerBase, add_generation_prompt: bool,
                spans: bool) -> tuple[str, list[tuple[int, int]]]:
        from transformers.utils.chat_template_utils import render_jinja_template

        from jinja2.exceptions import TemplateError

        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            texts, indices = render_jinja_template(
                conversations=[plain], chat_template=self.source, return_assistant_tokens_mask=spans,
                add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens_map)
        except TemplateError as exc:
            raise UserError(f"chat template '{self.name}': {exc}") from None
        return texts[0], [tuple(s) for s in indices[0]] if spans else []

    def render(self, messages: list[dict], tokenizer: PreTrainedTokenizerBase,
               add_generation_prompt: bool = False) -> str:
        return self._render(messages, tokenizer, add_generation_prompt, spans=False)[0]

    def segments(self, messages: list[dict], tokenizer: PreTrainedTokenizerBase,
                 add_generation_prompt: bool = False) -> list[Segment]:
        """The rendered conversation cut into untrained scaffolding and each assistant message's trained span.

        The trained span of an assistant message is its content plus the end-of-turn token(s) the template adds
        (e.g. `<eoa>`, `<|im_end|>`, or EOS). Raises UserError when the template does not let us find it.
        """
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.marks_generation:
            text, spans = self._render(messages, tokenizer, add_generation_prompt, spans=True)
            if len(spans) != len(assistants):
                raise UserError(f"chat template '{self.name}' marks {len(spans)} {{% generation %}} spans for "
                                f"{len(assistants)} assistant messages; wrap each assistant answer exactly once")
        else:
            text = self.render(messages, tokenizer, add_generation_prompt)
            spans = [self._span_by_prefix(messages, i, text, tokenizer) for i in assistants]
        out: list[Segment] = []
        pos = 0
        for (start, end), index in zip(spans, assistants):
            if start > pos:
                out.append((text[pos:start], None))
            out.append((text[start:end], index))
            pos = end
        if pos < len(text):
            out.append((text[pos:], None))
        return out

    def _span_by_prefix(self, messages: list[dict], index: int, full: str,
                        tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
        """Char span of messages[index]'s answer + end-of-turn in `full`, found by rendering the prompt before it."""
        prompt = self.render(messages[:index], tokenizer, add_generation_prompt=True) if index else ""
        content = messages[index]["content"].strip()
        where = f"chat template '{self.name}'"
        if not full.startswith(prompt):
            raise UserError(f"{where} renders a conversation differently from its own prefix, so answer tokens "
                            "cannot be located; pass a template with {% generation %} (model.template=NAME)")
        start = full.find(content, len(prompt))
        if start < 0:
            raise UserError(f"{where} does not render the assistant's text verbatim; "
                            "pass a template with {% generation %} (model.template=NAME)")
        if full[len(prompt):start].strip():
            raise UserError(f"{where} renders text before an answer that its generation prompt lacks (does it "
                            "handle add_generation_prompt?); pass a template with {% generation %}")
        after = start + len(content)
        stops = [w for w in (*self.stop_words, tokenizer.eos_token) if w]
        found = [(at, w) for w in stops if (at := full.find(w, after)) >= 0]
        if not found or full[after:min(found)[0]].strip():
            raise UserError(f"{where} puts no end-of-turn token right after an answer, so the model would never "
                            "learn to stop; pass a template with {% generation %} (model.template=NAME)")
        at, word = min(found)
        return start, at + len(word)

    def encode_segments(self, segments: list[Segment], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
        """Token ids of each segment, each encoded on its own without added special tokens."""
        texts = [text for text, _ in segments]
        if not texts:
            return []
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode_prompt(self, messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Token ids of a conversation ready for the model's next answer (inference); equal to training's ids."""
        segments = self.segments(messages, tokenizer, add_generation_prompt=True)
        return [tid for ids in self.encode_segments(segments, tokenizer) for tid in ids]

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
    name = ALIASES.get(name, name)
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
