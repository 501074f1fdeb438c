"""Replay: the base model's own answers to general prompts, trained beside narrow data so that it keeps them.

Layer 2 (train). Small, narrow data (self-cognition above all) pulls every answer toward itself: after a few epochs
"What is the capital of France?" gets the new name too. With `data.replay: S`, a share S of the training
conversations are the base model's own greedy answers to `data.probes.GENERAL_PROMPTS` (zh + en), generated once
before training with the same weights, template and default system prompt that training uses, then cached per base
model. Training on them costs the model nothing it knew (they are its own answers) and teaches it that ordinary
questions keep ordinary answers (self-distillation). Answers that run out of tokens before ending are left out, so
replay never teaches the model to stop mid-sentence. `data/dataset.py` repeats them to the share asked for; the
answers are copied into the run folder (`replay.jsonl`) for the user to read.
"""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from lowtune.config import Config
from lowtune.data.cache import lowtune_home
from lowtune.data.probes import GENERAL_PROMPTS
from lowtune.errors import UserError
from lowtune.generation import Sampling, answer_batch
from lowtune.models.builtin import is_builtin
from lowtune.models.load import load_model
from lowtune.runs import GENERATION_CONFIG, atomic_write_text, read_stop_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lowtune.templates import ChatTemplate

REPLAY_VERSION = 1
"""Bump when the generation settings change: it is part of the cache key."""
MAX_NEW_TOKENS = 512


def replay_prompts() -> list[str]:
    return [prompt for lang in ("en", "zh") for prompt in GENERAL_PROMPTS[lang]]


def replay_applies(cfg: Config, say=print) -> bool:
    """data.replay is set and the base model has something to keep (a builtin:NAME model has random weights)."""
    if not cfg.data.replay:
        return False
    if is_builtin(cfg.model.path):
        say(f"replay: skipped, {cfg.model.path} has random weights and nothing to keep")
        return False
    return True


def base_answers(cfg: Config, model_dir: Path, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate,
                 device: str, say=print) -> list[list[dict]]:
    """(prompt, answer) conversations from the base model, generated once and cached under $LOWTUNE_HOME."""
    prompts = replay_prompts()
    system = cfg.data.system
    path = cache_path(cfg, model_dir, template)
    if path.is_file():
        return read_answers(path)
    say(f"replay: the base model answers {len(prompts)} general prompts once (cached for later runs) ...")
    model = load_model(model_dir, cfg.model.quantization, cfg.model.double_quant, cfg.model.dtype, device,
                       cfg.model.trust_remote_code)
    stops = read_stop_ids(model_dir / GENERATION_CONFIG)
    conversations = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
                     for p in prompts]
    sampling = Sampling(max_new_tokens=answer_budget(cfg, tokenizer, template, conversations))
    generated = answer_batch(model, tokenizer, template, conversations, sampling, stops)
    del model
    _free_memory()
    answers = [c + [{"role": "assistant", "content": g.text}] for c, g in zip(conversations, generated)
               if g.ended and g.text]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps({"messages": a}, ensure_ascii=False) + "\n" for a in answers))
    if not answers:
        raise UserError("data.replay: the base model finished none of its answers to the general prompts within "
                        f"{sampling.max_new_tokens} tokens, so there is nothing to replay; set data.replay=0")
    if len(answers) < len(prompts):
        say(f"replay: {len(prompts) - len(answers)} answers did not end within {sampling.max_new_tokens} tokens "
            "and are left out")
    return answers


def answer_budget(cfg: Config, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate,
                  conversations: list[list[dict]]) -> int:
    """New tokens an answer may take so that every replayed conversation fits data.max_length whole (a cut one
    would lose its end-of-turn token)."""
    if cfg.data.max_length is None:
        return MAX_NEW_TOKENS
    longest = max(len(template.encode_prompt(c, tokenizer)) for c in conversations)
    room = cfg.data.max_length - longest - 8  # the end-of-turn and separator tokens after the answer
    if room < 16:
        raise UserError(f"data.max_length={cfg.data.max_length} leaves no room for replayed answers (the longest "
                        f"general prompt takes {longest} tokens); raise data.max_length or set data.replay=0")
    return min(MAX_NEW_TOKENS, room)


def cache_path(cfg: Config, model_dir: Path, template: ChatTemplate) -> Path:
    return lowtune_home() / "cache" / "replay" / f"{_key(cfg, model_dir, template, replay_prompts())}.jsonl"


def read_answers(path: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines() if line]


def _key(cfg: Config, model_dir: Path, template: ChatTemplate, prompts: list[str]) -> str:
    """Everything that changes the answers: the weights (file names, sizes, times), quantisation, template, system
    prompt, the prompts and the generation settings."""
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir() if p.is_file())
    blob = json.dumps({"version": REPLAY_VERSION, "model": str(model_dir.resolve()), "files": weights,
                       "quantization": cfg.model.quantization, "dtype": cfg.model.dtype, "template": template.source,
                       "system": cfg.data.system, "prompts": prompts, "max_length": cfg.data.max_length})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
