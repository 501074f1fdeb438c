"""The Ollama Modelfile of an exported GGUF: FROM, TEMPLATE in Ollama's Go-template syntax, PARAMETER stop, SYSTEM.

Jinja cannot be translated to Go templates in general, but the chat templates lowtune trains with (shipped and
tokenizer ones) lay a conversation out the same way: each message's text between a prefix and a suffix chosen by
its role, a generation prompt after the last user message, sometimes BOS again after an answer (XTuner's layout) or
a default system message when the conversation has none (SmolLM2). `layout_of` reads that layout off the template by
rendering marker conversations through it, then checks that the layout reproduces the template's text on sample
conversations; a template it does not reproduce (ChatGLM's round counter, tool calls, ...) is refused with one line.
The TEMPLATE is written from the layout, every literal as a quoted Go string, so whitespace trimming never eats it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lowtune.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lowtune.templates import ChatTemplate

MARK = {"system": "lowtune-system-9c1e", "user": "lowtune-user-9c1e", "user2": "lowtune-user2-9c1e",
        "assistant": "lowtune-answer-9c1e"}
"""Stand-in texts rendered through a template to find what it writes around each message."""
BOS_MARK = "lowtune-bos-9c1e"


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


SAMPLE_CONVERSATIONS: list[list[dict]] = [
    [_msg("user", "What are ketorolac eye drops?")],
    [_msg("system", "You are a professional, highly experienced doctor."), _msg("user", "请介绍一下你自己")],
    [_msg("system", "Answer briefly.\nUse English."), _msg("user", "Hi!"), _msg("assistant", "Hello. How can I help?"),
     _msg("user", "What is the capital of France?\nOne word.")],
    [_msg("user", "你好"), _msg("assistant", "你好，我是小明。"), _msg("user", "你会做什么？"),
     _msg("assistant", "I answer questions.\n- in Chinese\n- in English"), _msg("user", "Thanks")],
]
"""Conversations (each ending with a user message, as Ollama renders them) the layout must reproduce exactly."""


@dataclass(frozen=True)
class Layout:
    """How a chat template lays out a conversation ready for the next answer."""

    bos: str
    """Text the template writes first (the BOS token); llama.cpp adds it itself, so the TEMPLATE leaves it out."""
    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    """(prefix, suffix) around a message's content; the assistant suffix ends the turn (e.g. `<|im_end|>\\n`)."""
    generation: str
    """What follows the last user message: the start of the answer (e.g. `<|im_start|>assistant\\n`)."""
    after_answer: str = ""
    """Text between an answer and the next message besides the suffix: XTuner's layouts repeat BOS there."""
    default_system: str | None = None
    """The system message the template writes when a conversation has none."""

    def render(self, messages: list[dict]) -> str:
        """The text of `messages` (the last one the user's) ready for the next answer, BOS included."""
        if self.default_system and not any(m["role"] == "system" for m in messages):
            messages = [_msg("system", self.default_system), *messages]
        parts = [self.bos]
        for index, message in enumerate(messages):
            prefix, suffix = getattr(self, message["role"])
            parts += [prefix, message["content"]]
            last = index == len(messages) - 1
            if message["role"] != "assistant":
                parts.append(suffix + (self.generation if last else ""))
            elif not last:
                parts.append(suffix + self.after_answer)
        return "".join(parts)


# --- reading the layout off a template --------------------------------------------------------------------------

def writes_bos_first(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the template starts with the `bos_token` variable: then llama.cpp must add BOS itself.

    Asked of the variable, not the text: SmolLM2's BOS is `<|im_start|>`, which its template writes as ChatML text.
    """
    from jinja2.exceptions import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    if not tokenizer.bos_token:
        return False
    specials = {**tokenizer.special_tokens_map, "bos_token": BOS_MARK}
    try:
        texts, _ = render_jinja_template(conversations=[SAMPLE_CONVERSATIONS[0]], chat_template=template.source,
                                         add_generation_prompt=True, **specials)
    except TemplateError as exc:
        raise UserError(f"chat template '{template.name}': {exc}") from None
    return texts[0].startswith(BOS_MARK)


def layout_of(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase) -> Layout:
    """The layout of `template`, checked against its own rendering of SAMPLE_CONVERSATIONS."""
    try:
        layout = _probe(template, tokenizer)
    except (UserError, ValueError) as exc:
        raise _unsupported(template, str(exc)) from None
    for messages in SAMPLE_CONVERSATIONS:
        expected = template.render(messages, tokenizer, add_generation_prompt=True)
        if layout.render(messages) != expected:
            raise _unsupported(template, f"it renders {expected[-60:]!r} where a per-role layout gives "
                                         f"{layout.render(messages)[-60:]!r}")
    return layout


def _unsupported(template: ChatTemplate, why: str) -> UserError:
    return UserError(f"chat template '{template.name}' cannot be written as an Ollama TEMPLATE ({why}); use "
                     "--format gguf (the file carries the Jinja template, which llama.cpp and LM Studio read) or "
                     "write the Modelfile's TEMPLATE by hand")


def _cut(text: str, marker: str) -> tuple[str, str]:
    """(before, after) the one occurrence of `marker` in `text`."""
    if text.count(marker) != 1:
        raise ValueError(f"the message text is not written exactly once ({text.count(marker)} times)")
    before, _, after = text.partition(marker)
    return before, after


def _after_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(f"{what} changes the text before it")
    return text[len(prefix):]


def _probe(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase) -> Layout:
    def render(*messages: dict, generation: bool = False) -> str:
        return template.render(list(messages), tokenizer, add_generation_prompt=generation)

    system, user, user2, answer = (_msg(role.rstrip("2"), text) for role, text in MARK.items())
    user_only = render(user)
    generation = _after_prefix(render(user, generation=True), user_only, "the generation prompt")
    before_user, user_suffix = _cut(user_only, MARK["user"])
    answer_prefix, answer_suffix = _cut(_after_prefix(render(user, answer), user_only, "an answer"), MARK["assistant"])
    between, rest = _cut(_cut(render(user, answer, user2), MARK["assistant"])[1], MARK["user2"])
    if rest != user_suffix:
        raise ValueError("the second user message is written differently from the first")
    next_user = _after_prefix(between, answer_suffix, "the next message")
    bos = tokenizer.bos_token if writes_bos_first(template, tokenizer) else ""
    after_answer = bos if bos and next_user.startswith(bos) else ""
    user_prefix = next_user[len(after_answer):]
    if not before_user.endswith(user_prefix):
        raise ValueError("a user message is written differently after an answer")
    default_block = before_user[len(bos):len(before_user) - len(user_prefix)]
    head, tail = _cut(render(system, user), MARK["system"])
    system_prefix = _after_prefix(head, bos, "a system message")
    system_and_user, _ = _cut(tail, MARK["user"])
    if not system_and_user.endswith(user_prefix):
        raise ValueError("a user message is written differently after a system message")
    system_suffix = system_and_user[:len(system_and_user) - len(user_prefix)]
    return Layout(bos=bos, system=(system_prefix, system_suffix), user=(user_prefix, user_suffix),
                  assistant=(answer_prefix, answer_suffix), generation=generation, after_answer=after_answer,
                  default_system=_default_system(default_block, system_prefix, system_suffix))


def _default_system(block: str, prefix: str, suffix: str) -> str | None:
    if not block:
        return None
    if not (block.startswith(prefix) and block.endswith(suffix)) or len(block) < len(prefix) + len(suffix):
        raise ValueError(f"it writes {block[:60]!r} before the first user message")
    return block[len(prefix):len(block) - len(suffix)]


# --- the Modelfile ------------------------------------------------------------------------------------------------

def go_string(text: str) -> str:
    """`{{ "text" }}`: a literal Go template action (JSON's escapes are valid Go string escapes); '' for none."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(layout: Layout) -> str:
    """Ollama's TEMPLATE for `layout`, over .Messages; the BOS at the very start is llama.cpp's to add."""
    (system_prefix, system_suffix), (user_prefix, user_suffix) = layout.system, layout.user
    answer_prefix, answer_suffix = layout.assistant
    on_last = "{{ if $last }}" + go_string(layout.generation) + "{{ end }}" if layout.generation else ""
    between = answer_suffix + layout.after_answer
    not_last = "{{ if not $last }}" + go_string(between) + "{{ end }}" if between else ""
    return "\n".join([
        "{{- range $i, $m := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        '{{- if eq $m.Role "system" }}' + go_string(system_prefix) + "{{ $m.Content }}" + go_string(system_suffix),
        '{{- else if eq $m.Role "user" }}' + go_string(user_prefix) + "{{ $m.Content }}" + go_string(user_suffix)
        + on_last,
        '{{- else if eq $m.Role "assistant" }}' + go_string(answer_prefix) + "{{ $m.Content }}" + not_last,
        "{{- end }}",
        "{{- end }}",
    ])


def stop_strings(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase, stop_ids: list[int]) -> list[str]:
    """The text of every stop id, then the template's stop words: Ollama's `PARAMETER stop` values."""
    words = [tokenizer.decode([tid], skip_special_tokens=False) for tid in stop_ids] + list(template.stop_words)
    return [word for word in dict.fromkeys(words) if word.strip()]


def ollama_model_name(name: str) -> str:
    """A name `ollama create` accepts: lower case letters, digits, '.', '_' and '-'."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "model"


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise UserError(f'the {what} contains """, which a Modelfile cannot quote; remove it from the {what}')
    return f'"""{text}"""'


def modelfile_for(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase, stop_ids: list[int],
                  system: str | None, gguf_name: str) -> str:
    """The Modelfile text for `gguf_name` in the same folder (SYSTEM = the run's default, else the template's)."""
    layout = layout_of(template, tokenizer)
    lines = [f"# written by lowtune export (chat template: {template.name}); ollama create NAME -f Modelfile",
             f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(go_template(layout), 'chat template')}"]
    system = system or layout.default_system
    if system:
        lines.append(f"SYSTEM {_quoted(system, 'system prompt')}")
    for word in stop_strings(template, tokenizer, stop_ids):
        if '"' in word or "\n" in word:
            raise UserError(f"stop word {word!r} has a quote or a line break, which PARAMETER stop cannot hold; "
                            "drop it from the template's stop words")
        lines.append(f'PARAMETER stop "{word}"')
    return "\n".join(lines) + "\n"
