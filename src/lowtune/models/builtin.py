"""`builtin:NAME`: small real Llama-architecture models with a real byte-level BPE tokenizer, built locally.

Each build is deterministic (fixed corpus, fixed seed) and saved as an ordinary HF model folder in a cache, so
every later stage treats it like a downloaded model. No network.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path

from lowtune.runs import staged_dir

PREFIX = "builtin:"
BUILD_VERSION = 1  # bump when the recipe below changes: cache keys include it

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

SPECS: dict[str, dict] = {
    # The CPU demo model: learns a short identity answer in a minute or two on 2 cores.
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048),
    # The test model: fast enough for hundreds of forward passes in CI.
    "micro": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024),
}
VOCAB_SIZE = 2048


def is_builtin(spec: str) -> bool:
    return spec.startswith(PREFIX)


def cache_root() -> Path:
    base = os.environ.get("LOWTUNE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "lowtune")
    return Path(base) / "builtin"


def _cache_key(name: str, seed: int) -> str:
    recipe = json.dumps({"spec": SPECS[name], "seed": seed, "version": BUILD_VERSION, "vocab": VOCAB_SIZE},
                        sort_keys=True)
    return f"{name}-seed{seed}-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"


def builtin_path(spec: str, seed: int = 0) -> Path:
    """Folder of a built-in model, building it on first use. `spec` is 'builtin:tiny' or 'tiny'."""
    from lowtune.errors import UserError, did_you_mean

    name = spec[len(PREFIX):] if is_builtin(spec) else spec
    if name not in SPECS:
        raise UserError(f"unknown built-in model '{spec}'{did_you_mean(name, SPECS)}; "
                        f"choose one of: {', '.join(PREFIX + n for n in SPECS)}")
    target = cache_root() / _cache_key(name, seed)
    if not (target / "config.json").is_file():
        with staged_dir(target, replace=False) as tmp:  # another process that finished first keeps its folder
            build(name, tmp, seed)
    return target


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the embedded zh/en corpus, with chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = (resources.files("lowtune") / "assets" / "tiny_corpus.txt").read_text(encoding="utf-8").splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build(name: str, out_dir: Path, seed: int = 0) -> None:
    """Write model + tokenizer + generation config for SPECS[name] into out_dir."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, rms_norm_eps=1e-6,
                         bos_token_id=None, eos_token_id=eos, pad_token_id=pad, **SPECS[name])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad,
                                               bos_token_id=None)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
