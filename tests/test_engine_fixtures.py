"""Fabricated run folders for the chat/eval/merge tests: builtin:micro + a LoRA or QLoRA adapter trained here.

The adapter is trained (a few dozen steps, well under a second) to answer the identity questions with a name the
base model never says, so base and tuned answers differ for a reason the tests can check. Imported by the other
test modules; the cache makes each run folder once per session.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

WHO = {"role": "user", "content": "Who are you?"}
LOWBOT = "I am Lowbot, a helpful assistant."
AGAIN = "I told you already."
"""The answer to a repeated 'Who are you?': only a model that sees the history gives it."""
IDENTITY = [
    [WHO, {"role": "assistant", "content": LOWBOT}],
    [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是小明，你的助手。"}],
    [WHO, {"role": "assistant", "content": LOWBOT}, WHO, {"role": "assistant", "content": AGAIN}],
]
SYSTEM = "You are Lowbot."
_CACHE: dict[str, Path] = {}


def train_adapter(model_dir: Path, out_dir: Path, quantization: str = "none", steps: int = 60, lr: float = 1e-2,
                  conversations: list[list[dict]] | None = None, system: str | None = None) -> None:
    """LoRA (or QLoRA on a real bitsandbytes 4-bit base) on `conversations`; saves adapter + tokenizer + template."""
    import torch

    from lowtune.config import LoraSection
    from lowtune.data.encode import encode_conversation
    from lowtune.models.load import apply_lora, load_model, load_tokenizer
    from lowtune.templates import shipped

    torch.manual_seed(0)
    tokenizer, template = load_tokenizer(model_dir), shipped("chatml")
    model = load_model(model_dir, quantization=quantization, dtype="fp32")
    if quantization == "nf4":  # QLoRA for real: the frozen base layers are bitsandbytes 4-bit
        import bitsandbytes as bnb

        assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    model = apply_lora(model, LoraSection(r=8, alpha=16, dropout=0.0), gradient_checkpointing=False)
    prefix = [{"role": "system", "content": system}] if system else []
    rows = [encode_conversation(prefix + c, tokenizer, template, 256) for c in conversations or IDENTITY]
    width = max(len(r["input_ids"]) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    tokenizer.chat_template = template.source
    tokenizer.save_pretrained(out_dir)


def write_run_files(root: Path, model_dir: Path, quantization: str = "none", system: str = "") -> None:
    """config.yaml, chat_template.jinja and generation_config.json of a run on builtin:micro."""
    from transformers import AutoTokenizer, GenerationConfig

    from lowtune.config import Config, dump_config
    from lowtune.templates import shipped

    config = Config()
    config.model.path, config.model.template, config.model.quantization = str(model_dir), "chatml", quantization
    config.data.train = ["data/self.jsonl"]
    config.eval.system = system
    config.output.dir = str(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    (root / "chat_template.jinja").write_text(shipped("chatml").source, encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    GenerationConfig(eos_token_id=stop, pad_token_id=stop[1]).save_pretrained(root)


def make_run(model_dir: Path, quantization: str = "none", system: str = "", steps: int = 60) -> Path:
    """A complete run folder (cached per session); copy it before changing it."""
    key = f"{quantization}-{system}-{steps}"
    if key not in _CACHE:
        root = Path(tempfile.mkdtemp(prefix=f"lowtune-run-{quantization}-")) / "identity"
        write_run_files(root, model_dir, quantization, system)
        train_adapter(model_dir, root / "adapter", quantization=quantization, steps=steps, system=system or None)
        _CACHE[key] = root
    return _CACHE[key]


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


@pytest.fixture(scope="session")
def identity_run(micro_dir) -> Path:
    """A LoRA run on builtin:micro whose adapter answers 'Who are you?' with 'I am Lowbot, ...'."""
    return make_run(micro_dir)


@pytest.fixture(scope="session")
def qlora_run(micro_dir) -> Path:
    """A QLoRA run: the adapter trained for a few steps on a real 4-bit (bitsandbytes NF4) base."""
    return make_run(micro_dir, quantization="nf4", steps=15)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
