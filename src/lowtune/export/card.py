"""Model cards (`README.md` with hub front matter) for merged models and adapters, and ModelScope's configuration.json.

The front matter follows the Hugging Face model-card metadata keys (base_model, library_name, pipeline_tag, tags,
datasets, language, license); ModelScope reads the same card. Used by merge and by upload.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from lowtune.models.builtin import is_builtin
from lowtune.models.resolve import is_hub_id

if TYPE_CHECKING:
    from lowtune.config import Config

MODELSCOPE_CONFIGURATION = {"framework": "pytorch", "task": "text-generation", "allow_remote": True}
CJK = re.compile(r"[\u4e00-\u9fff]")
LATIN = re.compile(r"[A-Za-z]")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt", ".xlsx", ".xls", ".parquet", ".arrow")


@dataclass
class CardInfo:
    """What a card says. `library_name` is 'transformers' for merged models, 'peft' for adapters."""

    title: str
    base_model: str | None = None
    library_name: str = "transformers"
    tags: list[str] = field(default_factory=lambda: ["lowtune", "sft"])
    datasets: list[str] = field(default_factory=list)
    language: list[str] = field(default_factory=list)
    license: str = "other"
    license_fields: dict[str, str] = field(default_factory=dict)
    """license_name / license_link, copied from the base model's card when its license is 'other'."""
    details: dict[str, str] = field(default_factory=dict)
    """Training facts shown as a table in the card body."""
    stop_ids: list[int] = field(default_factory=list)

    def front_matter(self) -> dict:
        meta: dict = {}
        if self.base_model:
            meta["base_model"] = self.base_model
        meta.update(library_name=self.library_name, pipeline_tag="text-generation", tags=self.tags)
        if self.datasets:
            meta["datasets"] = self.datasets
        if self.language:
            meta["language"] = self.language
        meta["license"] = self.license
        meta.update(self.license_fields)
        return meta

    def render(self) -> str:
        head = yaml.safe_dump(self.front_matter(), sort_keys=False, allow_unicode=True, width=1000)
        return f"---\n{head}---\n\n{self._body()}"

    def _body(self) -> str:
        lines = [f"# {self.title}", ""]
        base = f"`{self.base_model}`" if self.base_model else "its base model"
        what = "a LoRA adapter for" if self.library_name == "peft" else "a fine-tuned version of"
        lines += [f"This is {what} {base}, trained with lowtune.", ""]
        if self.details:
            lines += ["| setting | value |", "|---|---|"]
            lines += [f"| {key} | {value} |" for key, value in self.details.items()]
            lines.append("")
        lines += ["## Use", "", "```python", *self._usage(), "```", ""]
        if self.stop_ids:
            lines += [f"Generation stops on token ids {self.stop_ids} (listed in `generation_config.json`).", ""]
        return "\n".join(lines)

    def _usage(self) -> list[str]:
        if self.library_name == "peft":
            return ["from peft import AutoPeftModelForCausalLM",
                    "model = AutoPeftModelForCausalLM.from_pretrained(PATH)"]
        return ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                "tokenizer = AutoTokenizer.from_pretrained(PATH)",
                "model = AutoModelForCausalLM.from_pretrained(PATH)",
                'messages = [{"role": "user", "content": "Hi"}]',
                "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,",
                "                                       return_tensors='pt')",
                "output = model.generate(**inputs, max_new_tokens=256)[0]",
                "print(tokenizer.decode(output[inputs['input_ids'].shape[1]:], skip_special_tokens=True))"]


def hub_id_or_none(spec: str) -> str | None:
    """`spec` when it names a hub repository (owner/name, not a local folder), else None."""
    if is_builtin(spec) or Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")):
        return None
    if spec.lower().endswith(DATA_SUFFIXES):  # a data file that is not here, not a repository
        return None
    return spec if is_hub_id(spec) else None


def read_front_matter(readme: Path) -> dict:
    """The YAML front matter of a model card, {} when there is none or it does not parse."""
    if not readme.is_file():
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme.read_text(encoding="utf-8", errors="replace"), re.S)
    if not match:
        return {}
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def detect_languages(paths: list[str], max_chars: int = 200_000) -> list[str]:
    """'zh' and/or 'en' from the text of the training files that exist locally (first `max_chars` of each)."""
    found: list[str] = []
    for path in paths:
        file = Path(path)
        if not file.is_file():
            continue
        with file.open(encoding="utf-8", errors="replace") as handle:
            text = handle.read(max_chars)
        if CJK.search(text) and "zh" not in found:
            found.append("zh")
        if len(LATIN.findall(text)) > len(text) // 20 and "en" not in found:
            found.append("en")
    return found


def method_tags(config: Config) -> list[str]:
    if not config.lora.enabled:
        return ["full-finetune"]
    return ["lora", "qlora"] if config.model.quantization != "none" else ["lora"]


def training_details(config: Config) -> dict[str, str]:
    details = {"method": "+".join(method_tags(config)), "template": config.model.template}
    if config.lora.enabled:
        details["LoRA"] = f"r={config.lora.r}, alpha={config.lora.alpha}, dropout={config.lora.dropout}"
    train = config.train
    steps = f", max_steps={train.max_steps}" if train.max_steps else ""
    details["schedule"] = f"epochs={train.epochs}{steps}, lr={train.lr}, {train.scheduler}"
    details["batch"] = f"{train.batch_size} x {train.grad_accum} accumulation"
    details["data"] = ", ".join(config.data.train) or "-"
    details["max_length"] = str(config.data.max_length)
    return details


def card_for_run(title: str, config: Config | None, base_dir: Path | None, library_name: str = "transformers",
                 stop_ids: list[int] | None = None, base_spec: str | None = None) -> CardInfo:
    """A card for the output of a run (merged model or adapter), with the base model's license copied."""
    base_meta = read_front_matter(base_dir / "README.md") if base_dir else {}
    spec = base_spec or (config.model.path if config else "")
    info = CardInfo(title=title, base_model=hub_id_or_none(spec), library_name=library_name,
                    license=str(base_meta.get("license") or "other"), stop_ids=list(stop_ids or []),
                    license_fields={k: str(base_meta[k]) for k in ("license_name", "license_link") if k in base_meta})
    if config is not None:
        info.tags = ["lowtune", "sft", *method_tags(config)]
        info.datasets = [d for d in config.data.train if hub_id_or_none(d)]
        info.language = detect_languages(config.data.train)
        info.details = training_details(config)
    return info


def write_card(folder: Path, info: CardInfo) -> None:
    (folder / "README.md").write_text(info.render(), encoding="utf-8")


def write_modelscope_configuration(folder: Path) -> None:
    """configuration.json, which ModelScope's hub needs beside the weights (kept when one exists)."""
    path = folder / "configuration.json"
    if not path.is_file():
        path.write_text(json.dumps(MODELSCOPE_CONFIGURATION, indent=2) + "\n", encoding="utf-8")
