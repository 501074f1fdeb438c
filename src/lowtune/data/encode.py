"""Conversation -> token ids + labels: exactly each trained answer and its end-of-turn token carry loss.

Layer 1. The trained spans come from the chat template (`ChatTemplate.segments`); everything else (BOS, system,
user turns, role markers, separators, `loss: false` answers) is IGNORE_INDEX. A pretraining sample (one assistant
message and nothing else, which is what plain text converts to) supervises every token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lowtune.templates import ChatTemplate

IGNORE_INDEX = -100


def has_loss(message: dict) -> bool:
    """Whether an assistant message is trained: `loss` absent or true (canonical data holds booleans only)."""
    return message["role"] == "assistant" and message.get("loss", True) is not False


def is_pretraining(messages: list[dict]) -> bool:
    return len(messages) == 1 and messages[0]["role"] == "assistant"


def _with_bos_eos(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    out = [tokenizer.bos_token_id, *ids] if tokenizer.bos_token_id is not None else list(ids)
    if tokenizer.eos_token_id is not None:
        out.append(tokenizer.eos_token_id)  # documents stay apart when packed, and the model learns to end one
    return out


def encode_full(messages: list[dict], tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> dict:
    """{"input_ids", "labels"} of a whole conversation, before truncation."""
    return encode_many([messages], tokenizer, template)[0]


def encode_many(conversations: list[list[dict]], tokenizer: PreTrainedTokenizerBase,
                template: ChatTemplate) -> list[dict]:
    """encode_full for several conversations, with one batched tokenizer call (fast tokenizers use every core)."""
    plans, texts = plan_batch(conversations, tokenizer, template)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return assemble(plans, encoded, tokenizer)


def plan_batch(conversations: list[list[dict]], tokenizer: PreTrainedTokenizerBase,
               template: ChatTemplate) -> tuple[list, list[str]]:
    """(plans, texts): the texts to tokenize for some conversations, and how to put their ids back together."""
    plans, texts = [], []
    for messages in conversations:
        if is_pretraining(messages):
            plans.append(("text", len(texts), [messages[0].get("loss", True) is not False]))
            texts.append(messages[0]["content"])
        else:
            segments = template.segments(messages, tokenizer)
            plans.append(("chat", len(texts), [index is not None and has_loss(messages[index])
                                               for _, index in segments]))
            texts.extend(text for text, _ in segments)
    return plans, texts


def assemble(plans: list, encoded: list[list[int]], tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """Samples from plan_batch's plans and the token ids of its texts."""
    samples = []
    for kind, start, flags in plans:
        if kind == "text":
            input_ids = _with_bos_eos(encoded[start], tokenizer)
            labels = list(input_ids) if flags[0] else [IGNORE_INDEX] * len(input_ids)
        else:
            input_ids, labels = [], []
            for ids, trained in zip(encoded[start:start + len(flags)], flags):
                input_ids.extend(ids)
                labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
        if labels:
            # Nothing predicts a sample's first token; in a packed row the previous sample's last token would.
            labels[0] = IGNORE_INDEX
        samples.append({"input_ids": input_ids, "labels": labels})
    return samples


def truncate(sample: dict, max_length: int | None) -> dict | None:
    """The sample cut to max_length tokens (hard cut at the end), or None when no trained token remains."""
    if max_length is not None and len(sample["input_ids"]) > max_length:
        sample = {"input_ids": sample["input_ids"][:max_length], "labels": sample["labels"][:max_length]}
    if all(label == IGNORE_INDEX for label in sample["labels"]):
        return None
    return sample


def encode_conversation(messages: list[dict], tokenizer: PreTrainedTokenizerBase, template: ChatTemplate,
                        max_length: int | None) -> dict | None:
    """{"input_ids", "labels"} for one canonical conversation, cut to max_length; None if nothing is trained."""
    return truncate(encode_full(messages, tokenizer, template), max_length)
