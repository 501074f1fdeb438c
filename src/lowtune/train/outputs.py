"""The self-describing parts of a run folder: config.yaml, chat_template.jinja, generation_config.json (stop ids),
and at the end adapter/ (PEFT) or model/ (full fine-tuning), each written atomically.

Layer 2 (train). Chat, eval, merge, web and serve read these files and need nothing else.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowtune.config import Config, dump_config
from lowtune.runs import GENERATION_CONFIG, TEMPLATE_FILE, RunFolder, atomic_write_text, staged_dir
from lowtune.templates import ChatTemplate
from lowtune.train.checkpoint import is_peft, save_trained

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

VERSIONED = ("lowtune", "torch", "transformers", "peft", "accelerate", "bitsandbytes")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def generation_config_json(model_dir: Path, tokenizer: PreTrainedTokenizerBase, stop_ids: list[int]) -> str:
    """The base model's generation config with eos_token_id = every stop id of the template."""
    from transformers import GenerationConfig

    base = GenerationConfig.from_pretrained(str(model_dir)) if (model_dir / GENERATION_CONFIG).is_file() \
        else GenerationConfig()
    base.eos_token_id = stop_ids
    base.pad_token_id = tokenizer.pad_token_id
    return base.to_json_string(use_diff=True)


def write_run_header(run: RunFolder, cfg: Config, model_dir: Path, tokenizer: PreTrainedTokenizerBase,
                     template: ChatTemplate) -> None:
    """config.yaml (with library versions), chat_template.jinja and generation_config.json, before step 1."""
    cfg.versions = library_versions()
    atomic_write_text(run.config_path, dump_config(cfg))
    atomic_write_text(run.chat_template_path, template.source)
    atomic_write_text(run.generation_config_path,
                      generation_config_json(model_dir, tokenizer, template.stop_token_ids(tokenizer)))


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, template: ChatTemplate, folder: Path) -> None:
    tokenizer.chat_template = template.source  # the saved tokenizer renders exactly as training did
    tokenizer.save_pretrained(str(folder))
    atomic_write_text(folder / TEMPLATE_FILE, template.source)


def export_weights(model: Any, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate, run: RunFolder,
                   cfg: Config, state_dict: dict | None = None) -> Path:
    """adapter/ (LoRA/QLoRA: PEFT files + tokenizer + template) or model/ (full fine-tuning: an HF model folder).

    `state_dict`: the trained weights gathered from a sharded model (train/shard.py); else the model's own."""
    peft = is_peft(model)
    final = run.adapter_dir if peft else run.full_model_dir
    if peft:
        for config in model.peft_config.values():
            config.base_model_name_or_path = cfg.model.path  # the spec the user gave, not a cache path
    with staged_dir(final) as tmp:
        model.config.use_cache = True  # what inference wants; training turned it off
        save_trained(model, tmp, state_dict=state_dict)
        model.config.use_cache = False
        _save_tokenizer(tokenizer, template, tmp)
        if not peft:
            atomic_write_text(tmp / GENERATION_CONFIG, run.generation_config_path.read_text(encoding="utf-8"))
    return final
