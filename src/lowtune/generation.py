"""Answer generation shared by training samples, chat, web and serve: one code path, template-driven stopping.

Layer 1: imports templates only. The model may be a plain transformers model or a PEFT model.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lowtune.templates import ChatTemplate

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Sampling:
    max_new_tokens: int = 512
    temperature: float = 0.0
    """0 = greedy (deterministic)."""
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def generate_kwargs(self) -> dict:
        kwargs: dict = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


def stream_answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate,
                  messages: list[dict], sampling: Sampling | None = None,
                  extra_stop_ids: list[int] | None = None) -> Iterator[str]:
    """Yield the answer's text as it is generated; stops on the template's end-of-turn ids, never yields them.

    Closing the generator early (a consumer that stops reading, Ctrl-C, a dropped web client) stops generation at
    the next token instead of letting it run to max_new_tokens.
    """
    import torch
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    sampling = sampling or Sampling()
    prompt_ids = template.encode_prompt(messages, tokenizer)
    stop_ids = template.stop_token_ids(tokenizer) + [i for i in extra_stop_ids or [] if i is not None]
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                  eos_token_id=stop_ids, pad_token_id=pad_id, use_cache=True, **sampling.generate_kwargs())
    cancel = threading.Event()
    kwargs["stopping_criteria"] = StoppingCriteriaList([_cancelled_criteria(cancel)])
    errors: list[BaseException] = []

    def run() -> None:
        try:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as exc:  # surfaced in the caller's thread below
            errors.append(exc)
            streamer.end()

    was_training = model.training
    model.eval()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        for piece in streamer:
            if piece:
                yield piece
    finally:
        cancel.set()  # no-op when generation already ended; otherwise it stops at the next token
        worker.join()
        if was_training:
            model.train()
    if errors:
        raise errors[0]


def _cancelled_criteria(event: threading.Event):
    """A transformers StoppingCriteria that ends generation once `event` is set."""
    import torch
    from transformers import StoppingCriteria

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return Cancelled()


def answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate,
           messages: list[dict], sampling: Sampling | None = None) -> str:
    """The whole answer as one string (greedy by default)."""
    return "".join(stream_answer(model, tokenizer, template, messages, sampling)).strip()


@dataclass
class Generated:
    text: str
    ended: bool
    """True when the answer ended with an end-of-turn id, False when it ran into max_new_tokens."""


def answer_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate,
                 conversations: list[list[dict]], sampling: Sampling | None = None,
                 extra_stop_ids: list[int] | None = None, batch_size: int = 16) -> list[Generated]:
    """Answers to many conversations, `batch_size` prompts per `generate` call (left-padded), in input order.

    The prompts are the same ids `stream_answer` builds; prompts of similar length share a batch to keep padding
    small. Each answer ends at its first stop id.
    """
    import torch

    sampling = sampling or Sampling()
    stop_ids = template.stop_token_ids(tokenizer) + [i for i in extra_stop_ids or [] if i is not None]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    prompts = [template.encode_prompt(messages, tokenizer) for messages in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = next(model.parameters()).device
    answers: list[Generated] = [Generated("", False)] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk],
                                device=device)
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=stop_ids, pad_token_id=pad_id,
                                     use_cache=True, **sampling.generate_kwargs())
            for i, row in zip(chunk, out[:, width:].tolist()):
                cut = next((k for k, tid in enumerate(row) if tid in stop_ids), None)
                text = tokenizer.decode(row[:cut], skip_special_tokens=True).strip()
                answers[i] = Generated(text, ended=cut is not None)
    finally:
        if was_training:
            model.train()
    return answers
