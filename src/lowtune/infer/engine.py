"""The chat engine: one model in memory (optionally with a LoRA adapter), its template and its stop ids.

`load_engine(target)` accepts a run folder (base model, adapter, template and stop ids all read from it), a PEFT
adapter folder, a merged or plain model folder, a hub id, or `builtin:tiny`. Chat, eval, agent, web and serve all
answer through `ChatEngine.stream`, which calls the shared `lowtune.generation` code path. The base model's answer
(`adapter=False`) comes from the same weights with the adapter disabled: one model in memory.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowtune.errors import UserError
from lowtune.generation import Sampling, answer_batch, stream_answer
from lowtune.models.builtin import is_builtin
from lowtune.models.load import load_model, load_tokenizer
from lowtune.models.resolve import is_hub_id, resolve_model_dir
from lowtune.runs import (ADAPTER_CONFIG, GENERATION_CONFIG, TEMPLATE_FILE, Located, is_adapter_dir, is_run_folder,
                          locate_folder, read_stop_ids)
from lowtune.templates import FAMILY_TEMPLATES, STOP_WORDS, ChatTemplate, resolve_template

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lowtune.config import Config


# --- what to load -------------------------------------------------------------------------------------------------

@dataclass
class Source:
    """Where each piece of a chat model comes from, before anything heavy is loaded."""

    name: str
    base_spec: str
    """Model spec of the weights to load: a folder, hub id or builtin:NAME."""
    adapter_dir: Path | None = None
    template_path: Path | None = None
    template_name: str = "auto"
    stop_ids: list[int] = field(default_factory=list)
    default_system: str | None = None
    config: Config | None = None
    tokenizer_dir: Path | None = None
    """Folder with the tokenizer to use instead of the base model's (a run's adapter carries one)."""

    @property
    def hub(self) -> str:
        return self.config.model.hub if self.config else "auto"

    @property
    def revision(self) -> str | None:
        return self.config.model.revision if self.config else None

    @property
    def trust_remote_code(self) -> bool:
        return bool(self.config and self.config.model.trust_remote_code)


def _chat_source(found: Located) -> Source:
    """A run or adapter folder as chat loads it: a full fine-tune is the model itself, an adapter goes on its base."""
    config, is_adapter = found.config, found.kind == "adapter"
    return Source(name=found.run.root.name if found.run else found.weights.name,
                  base_spec=(found.base_spec or "") if is_adapter else str(found.weights),
                  adapter_dir=found.weights if is_adapter else None, template_path=found.template_path,
                  template_name=config.model.template if config else "auto", stop_ids=found.stop_ids,
                  default_system=(config.eval.system or config.data.system or None) if config else None,
                  config=config, tokenizer_dir=found.tokenizer_dir)


def _trained(path: Path, adapter: str | None, base: str | None) -> Located:
    """A run's or adapter's weights; a run with none, or a lone adapter whose base is gone, is refused."""
    found = locate_folder(path, Path(adapter) if adapter else None)
    if found.weights is None:
        raise UserError(f"{path} has no trained weights yet (no adapter/ and no complete checkpoint); "
                        f"train it first or pass --adapter PATH")
    spec = base or found.base_spec
    if found.run is None and (not spec or not (is_builtin(spec) or Path(spec).exists() or is_hub_id(spec))):
        raise UserError(f"the base model of adapter {path} was not found "
                        f"(adapter_config.json names '{spec or ''}'); give --base PATH")
    return found


def locate(target: str, adapter: str | None = None, base: str | None = None) -> Source:
    """Classify TARGET (run folder, adapter folder, model folder, hub id, builtin) without loading weights.

    `adapter` replaces a run's weights or goes on a model; `base` replaces the base model of a run or adapter
    (e.g. when the path recorded at training time moved).
    """
    path = Path(target).expanduser()
    if adapter and not is_adapter_dir(Path(adapter)):
        raise UserError(f"--adapter {adapter}: no {ADAPTER_CONFIG} there; give a PEFT adapter folder")
    if is_builtin(target) or not (is_run_folder(path) or is_adapter_dir(path)):
        source = Source(name=path.name if path.is_dir() else target, base_spec=target,
                        adapter_dir=Path(adapter) if adapter else None)
    elif adapter and not is_run_folder(path):
        raise UserError(f"{path} is already an adapter; pass the base model as MODEL and this as --adapter")
    else:
        source = _chat_source(_trained(path, adapter, base))
    if base:
        if source.adapter_dir is None:
            raise UserError(f"--base applies to an adapter, and {target} has none; give the model as MODEL instead")
        source.base_spec = base
    return source


# --- loading ------------------------------------------------------------------------------------------------------

def load_base(model_dir: Path, bits: int | None = None, dtype: str = "auto",
              trust_remote_code: bool = False) -> PreTrainedModel:
    """The base model for inference: full precision in `dtype`, or 4/8-bit through bitsandbytes; eval mode."""
    from transformers.utils import logging as hf_logging

    if bits not in (None, 4, 8):
        raise UserError(f"--bits must be 4 or 8 (got {bits})")
    hf_logging.disable_progress_bar()
    quantization = {None: "none", 4: "nf4", 8: "int8"}[bits]
    model = load_model(model_dir, quantization=quantization, dtype=dtype, trust_remote_code=trust_remote_code)
    model.config.use_cache = True
    return model.eval()


def attach_adapter(model: PreTrainedModel, adapter_dir: Path) -> Any:
    import warnings

    from peft import PeftModel

    try:
        with warnings.catch_warnings():  # peft still asks transformers for a renamed attribute
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return PeftModel.from_pretrained(model, str(adapter_dir))
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"adapter {adapter_dir} does not fit base model {model.name_or_path}: "
                        f"{str(exc).splitlines()[0]}; pass the base it was trained on") from None


def choose_template(source: Source, tokenizer: PreTrainedTokenizerBase, model_dir: Path,
                    override: str | None) -> ChatTemplate:
    """--template wins; else the template the run trained with; else one saved beside the model; else 'auto'."""
    if override:
        return resolve_template(override, tokenizer, model_dir)
    stop_words = STOP_WORDS.get(source.template_name, ()) or _family_stop_words(model_dir)
    for path in (source.template_path, model_dir / TEMPLATE_FILE):
        if path is not None and path.is_file():
            name = source.template_name if source.template_name != "auto" else "tokenizer"
            return ChatTemplate(name=name, source=path.read_text(encoding="utf-8"), stop_words=stop_words)
    return resolve_template("auto", tokenizer, model_dir, stop_words=stop_words)


def _family_stop_words(model_dir: Path) -> tuple[str, ...]:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        return ()
    config = json.loads(config_path.read_text(encoding="utf-8"))
    family = FAMILY_TEMPLATES.get(config.get("lowtune_family") or config.get("model_type") or "")
    return STOP_WORDS.get(family or "", ())


# --- the engine ---------------------------------------------------------------------------------------------------

@dataclass
class ChatEngine:
    """A loaded chat model. Generation is serialised by a lock: one model, one answer at a time."""

    name: str
    model: Any
    """A transformers model, or a peft PeftModel when an adapter is attached."""
    tokenizer: PreTrainedTokenizerBase
    template: ChatTemplate
    default_system: str | None = None
    stop_ids: list[int] = field(default_factory=list)
    """Extra stop ids (generation_config.json); the template's own end-of-turn ids are always added."""
    adapter_dir: Path | None = None
    model_dir: Path | None = None
    config: Config | None = None
    """The run's resolved config when the target was a run folder (or an adapter inside one)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def has_adapter(self) -> bool:
        return self.adapter_dir is not None

    @property
    def max_context(self) -> int | None:
        """The model's context length (max_position_embeddings), if the config names one."""
        return getattr(self.model.config, "max_position_embeddings", None)

    def all_stop_ids(self) -> list[int]:
        ids = self.template.stop_token_ids(self.tokenizer)
        return ids + [i for i in self.stop_ids if i not in ids]

    def with_system(self, messages: list[dict]) -> list[dict]:
        """`messages` with the default system prompt first, unless they already carry one."""
        if self.default_system and not any(m["role"] == "system" for m in messages):
            return [{"role": "system", "content": self.default_system}, *messages]
        return list(messages)

    def prompt_length(self, messages: list[dict]) -> int:
        return len(self.template.encode_prompt(self.with_system(messages), self.tokenizer))

    def stream(self, messages: list[dict], sampling: Sampling | None = None, adapter: bool = True) -> Iterator[str]:
        """Yield the answer's text as it is generated. `adapter=False` answers as the base model."""
        messages = self.with_system(messages)
        with self._lock, self._adapter_state(adapter):
            yield from stream_answer(self.model, self.tokenizer, self.template, messages, sampling, self.stop_ids)

    def answer(self, messages: list[dict], sampling: Sampling | None = None, adapter: bool = True) -> str:
        return "".join(self.stream(messages, sampling, adapter=adapter)).strip()

    def answer_many(self, conversations: list[list[dict]], sampling: Sampling | None = None,
                    adapter: bool = True, batch_size: int = 16) -> list[str]:
        """Answers to many conversations at once (batched generation), in order; for eval and replay."""
        conversations = [self.with_system(messages) for messages in conversations]
        with self._lock, self._adapter_state(adapter):
            generated = answer_batch(self.model, self.tokenizer, self.template, conversations, sampling,
                                     self.stop_ids, batch_size)
        return [g.text for g in generated]

    @contextmanager
    def without_adapter(self) -> Iterator[ChatEngine]:
        """`with engine.without_adapter(): engine.answer(...)` answers as the base model (single-threaded use)."""
        with self._adapter_state(False):
            yield self

    def _adapter_state(self, enabled: bool):
        if enabled or not self.has_adapter:
            return nullcontext()
        return self.model.disable_adapter()


def load_engine(target: str, adapter: str | None = None, bits: int | None = None, template: str | None = None,
                system: str | None = None, dtype: str = "auto", base: str | None = None,
                trust_remote_code: bool = False) -> ChatEngine:
    """Load TARGET for chat: a run folder, adapter folder, merged/plain model folder, hub id or builtin:NAME.

    `adapter` adds a PEFT adapter to a plain model (or replaces a run's), `bits` loads the base in 4/8-bit,
    `template` overrides the chat template, `system` the default system prompt, `base` the base of an adapter;
    `trust_remote_code` runs a model's own Python code (a run's config may also say so).
    """
    source = locate(target, adapter, base)
    trust = trust_remote_code or source.trust_remote_code
    try:
        model_dir = resolve_model_dir(source.base_spec, hub=source.hub, revision=source.revision,
                                      trust_remote_code=trust)
    except UserError as exc:
        if source.adapter_dir is None or base:
            raise
        raise UserError(f"the base model of {target} was not found ({exc}); give --base PATH") from None
    tokenizer = load_tokenizer(source.tokenizer_dir or model_dir, trust)
    chat_template = choose_template(source, tokenizer, model_dir, template)
    model = load_base(model_dir, bits=bits, dtype=dtype, trust_remote_code=trust)
    stop_ids = source.stop_ids or read_stop_ids(model_dir / GENERATION_CONFIG)
    if source.adapter_dir is not None:
        model = attach_adapter(model, source.adapter_dir)
    model.eval()
    return ChatEngine(name=source.name, model=model, tokenizer=tokenizer, template=chat_template,
                      default_system=system if system is not None else source.default_system,
                      stop_ids=stop_ids, adapter_dir=source.adapter_dir, model_dir=model_dir, config=source.config)
