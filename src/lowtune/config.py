"""Run configuration: pydantic sections, YAML loading, dotted `key=value` overrides, resolved dump.

Bottom layer: imports nothing from lowtune but `errors`.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lowtune.errors import UserError, did_you_mean

RECIPE_SUFFIX = ".yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    path: str = "builtin:tiny"
    """Local folder, hub id, or builtin:tiny."""
    template: str = "auto"
    """'auto' = the tokenizer's own chat template, else the family's shipped one; or a template name / .jinja path."""
    quantization: Literal["nf4", "int8", "none"] = "nf4"
    double_quant: bool = True
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype: auto = bf16 where the GPU supports it, else fp16; fp32 on CPU."""
    hub: Literal["auto", "hf", "modelscope"] = "auto"
    revision: str | None = None
    trust_remote_code: bool = False


class DataSection(_Section):
    train: list[str] = Field(default_factory=list)
    """One path or a list: JSONL/JSON files in any supported format, or local dataset folders."""
    eval: str | float | None = None
    """A file, or a fraction (0-1) of the training data held out."""
    format: str = "auto"
    max_length: int | None = 2048
    packing: bool = True
    system: str | None = None
    """System prompt added to conversations that have none."""
    replay: float = Field(0.0, ge=0, lt=1)
    """Share of training conversations that replay the base model's own answers to built-in general prompts
    (self-distillation against forgetting; train/replay.py). 0 = off."""

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("eval")
    @classmethod
    def _fraction_in_range(cls, value: Any) -> Any:
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError(f"data.eval must be a held-out fraction between 0 and 1 or a file path (got {value})")
        return value


class LoraSection(_Section):
    enabled: bool = True
    """false = full fine-tuning (needs model.quantization=none)."""
    r: int = Field(64, gt=0)
    alpha: float = 16
    dropout: float = Field(0.1, ge=0, lt=1)
    targets: str | list[str] = "all-linear"


class TrainSection(_Section):
    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to train; null = train.epochs decides."""
    batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(16, gt=0)
    lr: float = Field(2.0e-4, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    micro_batch: int | Literal["auto"] = "auto"
    """Rows per forward pass; batch_size x grad_accum rows make one optimizer step whatever the split.
    auto: the largest split that fits the GPU's memory (batch_size on CPU)."""
    optimizer: Literal["auto", "adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = "auto"
    """auto: AdamW, or paged 8-bit AdamW when 32-bit states do not fit the GPU."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """auto: only when activations would not fit the GPU's memory (off on CPU)."""
    offload_activations: bool | Literal["auto"] = "auto"
    """Keep checkpointed layer inputs in CPU memory; auto: only when they would not fit the GPU."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile each decoder layer; auto: on CUDA."""
    tiled_mlp: bool | Literal["auto"] = "auto"
    """Run each layer's MLP over the sequence in tiles, recomputed in backward (long rows); auto: on a GPU, when a
    micro-batch holds more than 16,384 tokens."""
    save_every: int = Field(500, gt=0)
    save_limit: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0)
    seed: int = 42
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    """Several processes: ddp (whole weights on each) or fsdp (weights, gradients, optimizer states sharded)."""
    method: Literal["sft", "dpo", "orpo", "simpo"] = "sft"
    """sft: next-token loss on answers. dpo / orpo / simpo: preference tuning on pairs
    {"prompt": [...], "chosen": [...], "rejected": [...]} (docs/decisions.md, 'Preference tuning')."""
    beta: float | None = Field(None, gt=0)
    """dpo: strength of the pull toward the reference (0.1); simpo: reward scale (2.0); orpo: weight of the odds-ratio
    term, lambda in the paper (0.1). null = that default."""
    simpo_gamma: float = Field(0.5, ge=0)
    """simpo: target reward margin (gamma in the paper)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """dpo (sigmoid) and simpo: share of pairs assumed mislabelled (conservative DPO)."""
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    """dpo: sigmoid (the DPO paper), hinge (SLiC) or ipo (IPO, squared)."""

    @field_validator("distributed", mode="before")
    @classmethod
    def _not_zero(cls, value: Any) -> Any:
        if value in ("zero2", "zero3"):  # DeepSpeed's names, as XTuner spells them: say what to use instead
            raise ValueError(f"train.distributed={value} is not available yet: several GPUs train with ddp (each "
                             "holds the whole model; QLoRA 7B fits one 8 GB card) or fsdp (weights, gradients and "
                             "optimizer states sharded); use train.distributed=fsdp or ddp")
        return value


class EvalSection(_Section):
    every: int = Field(500, gt=0)
    """Steps between eval loss and sample answers (also run at step 0 and at the end)."""
    system: str = ""
    prompts: list[str] = Field(default_factory=list)
    max_new_tokens: int = Field(128, gt=0)


class LogSection(_Section):
    to: list[Literal["tensorboard", "wandb", "swanlab"]] = Field(default_factory=lambda: ["tensorboard"])


class OutputSection(_Section):
    dir: str | None = None
    """Run folder; default runs/<config name>."""


class Config(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    log: LogSection = Field(default_factory=LogSection)
    output: OutputSection = Field(default_factory=OutputSection)
    versions: dict[str, str] = Field(default_factory=dict)
    """Library versions, written into a run folder's config.yaml; informational."""


SECTIONS = {name: field.annotation for name, field in Config.model_fields.items()}


# --- YAML ---------------------------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise UserError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None


def _line_of(text: str, keys: tuple) -> int | None:
    """1-based line of a dotted key in YAML text, or None."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        return None
    line = None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if k.value == str(key):
                line, node = k.start_mark.line + 1, v
                break
        else:
            break
    return line


# --- recipes ------------------------------------------------------------------------------------------------------

def recipe_names() -> list[str]:
    folder = resources.files("lowtune") / "recipes"
    return sorted(p.name[: -len(RECIPE_SUFFIX)] for p in folder.iterdir() if p.name.endswith(RECIPE_SUFFIX))


def recipe_text(name: str) -> str:
    if name.endswith(RECIPE_SUFFIX):
        name = name[: -len(RECIPE_SUFFIX)]
    if name not in recipe_names():
        raise UserError(f"no recipe named '{name}'{did_you_mean(name, recipe_names())}; see `lowtune list`")
    return (resources.files("lowtune") / "recipes" / f"{name}{RECIPE_SUFFIX}").read_text(encoding="utf-8")


def read_config_source(path_or_recipe: str) -> tuple[str, str]:
    """(yaml text, display name) from a file path, else from a shipped recipe of that name."""
    path = Path(path_or_recipe)
    if path.is_file():
        return path.read_text(encoding="utf-8-sig"), str(path)
    if path.suffix in (".yaml", ".yml") and (path.parent != Path(".") or path.name not in
                                                {f"{n}{RECIPE_SUFFIX}" for n in recipe_names()}):
        raise UserError(f"config file not found: {path}; `lowtune list` shows shipped recipes")
    return recipe_text(path_or_recipe), f"recipe {path.stem if path.suffix else path_or_recipe}"


# --- overrides ----------------------------------------------------------------------------------------------------

def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    if "=" not in item:
        raise UserError(f"override '{item}' must look like section.key=value (e.g. train.lr=1e-4)")
    dotted, raw = item.split("=", 1)
    keys = tuple(k for k in dotted.strip().split(".") if k)
    if len(keys) < 2:
        raise UserError(f"override '{item}' must name a section and a key, e.g. train.{dotted}={raw}")
    value = parse_yaml(raw, f"override {item}") if raw.strip() else ""
    return keys, value


def _set_nested(tree: dict, keys: tuple[str, ...], value: Any) -> None:
    for key in keys[:-1]:
        child = tree.get(key)
        if not isinstance(child, dict):
            child = {}
            tree[key] = child
        tree = child
    tree[keys[-1]] = value


# --- loading ------------------------------------------------------------------------------------------------------

def _field_names(loc: tuple) -> list[str]:
    model: Any = Config
    for part in loc[:-1]:
        model = getattr(model, "model_fields", {}).get(part)
        model = model.annotation if model is not None else None
    fields = getattr(model, "model_fields", None) or {}
    return list(fields)


def _describe(err: dict) -> str:
    loc = tuple(str(p) for p in err["loc"] if not isinstance(p, int))
    dotted = ".".join(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        what = "section" if len(loc) == 1 else "key"
        prefix = ".".join(loc[:-1]) + "." if len(loc) > 1 else ""
        return f"unknown {what} '{dotted}'{did_you_mean(loc[-1], _field_names(loc), prefix)}"
    got = err.get("input")
    if kind.startswith(("float", "int")):
        need = "an integer" if kind.startswith("int") else "a number"
        return f"{dotted} must be {need} (got {got!r})"
    if kind == "greater_than":
        return f"{dotted} must be greater than {err['ctx']['gt']} (got {got!r})"
    if kind == "value_error":  # our validators' own sentence, which names the key
        return str(err["ctx"]["error"])
    if kind == "literal_error":
        return f"{dotted} must be {err['ctx']['expected']} (got {got!r})"
    if kind in ("model_type", "dict_type"):
        return f"{dotted} must be a mapping of keys (got {got!r})"
    return f"{dotted}: {err['msg']} (got {got!r})"


def build_config(tree: dict, source: str, text: str = "", overrides: dict | None = None) -> Config:
    """Validate a config tree; errors name the key, where it came from, and a suggestion."""
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        keys = tuple(str(p) for p in err["loc"] if not isinstance(p, int))
        for item, item_keys in (overrides or {}).items():
            if item_keys[: len(keys)] == keys or keys[: len(item_keys)] == item_keys:
                raise UserError(f"override '{item}': {_describe(err)}") from None
        line = _line_of(text, keys) if text else None
        raise UserError(f"{source}{f':{line}' if line else ''}: {_describe(err)}") from None


def load_config(path_or_recipe: str, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or shipped recipe), apply `section.key=value` overrides, validate."""
    text, source = read_config_source(path_or_recipe)
    tree = parse_yaml(text, source) or {}
    if not isinstance(tree, dict):
        raise UserError(f"{source}: a config is a mapping of sections (model:, data:, train: ...)")
    parsed = {item: parse_override(item) for item in overrides or []}
    for item, (keys, value) in parsed.items():
        if keys[0] not in SECTIONS:
            raise UserError(f"override '{item}': unknown section '{keys[0]}'{did_you_mean(keys[0], SECTIONS)}")
        _set_nested(tree, keys, value)
    cfg = build_config(tree, source, text, {item: keys for item, (keys, _) in parsed.items()})
    if cfg.output.dir is None:
        cfg.output.dir = f"runs/{Path(path_or_recipe).stem}"
    check_combination(cfg)
    return cfg


def check_combination(cfg: Config) -> None:
    """Reject settings that cannot work together, before anything heavy loads."""
    if not cfg.lora.enabled and cfg.model.quantization != "none":
        raise UserError(
            f"full fine-tuning (lora.enabled=false) cannot update {cfg.model.quantization} weights; "
            "set model.quantization=none or lora.enabled=true")
    if cfg.data.packing and not cfg.data.max_length:
        raise UserError("data.packing=true needs data.max_length (e.g. data.max_length=2048) or data.packing=false")
    _check_preference(cfg)
    if cfg.train.distributed == "fsdp" and cfg.model.quantization != "none":
        raise UserError(f"train.distributed=fsdp shards bf16/fp32 weights, not {cfg.model.quantization} ones: "
                        "QLoRA trains on several GPUs with train.distributed=ddp (a 7B QLoRA fits one 8 GB card), "
                        "or use model.quantization=none with fsdp")


def _check_preference(cfg: Config) -> None:
    """train.method and the settings that only some methods read."""
    train = cfg.train
    if train.method == "sft":
        if train.beta is not None or train.label_smoothing or train.loss_type != "sigmoid":
            raise UserError("train.beta, train.label_smoothing and train.loss_type apply to preference tuning: set "
                            "train.method=dpo (or orpo, simpo), or drop them")
        return
    if train.loss_type != "sigmoid" and train.method != "dpo":
        raise UserError(f"train.loss_type={train.loss_type} is a DPO variant; train.method={train.method} has its own "
                        "loss: drop train.loss_type or use train.method=dpo")
    if train.label_smoothing and (train.method == "orpo" or train.loss_type != "sigmoid"):
        raise UserError(f"train.label_smoothing applies to dpo with loss_type=sigmoid and to simpo, not to "
                        f"{train.method}{'' if train.method == 'orpo' else f' loss_type={train.loss_type}'}; "
                        "set train.label_smoothing=0")
    if train.distributed == "fsdp":
        raise UserError(f"train.method={train.method} does not run sharded yet: use train.distributed=ddp "
                        "(or auto: one process per GPU, whole weights on each)")
    if cfg.data.replay:
        raise UserError(f"data.replay adds plain conversations, and train.method={train.method} trains on preference "
                        "pairs: set data.replay=0")


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, every default visible, sections in the documented order."""
    data = cfg.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)


def config_changes(old: Config, new: Config) -> list[str]:
    """'section.key: old -> new' for every setting that differs (library versions aside)."""
    before = old.model_dump(mode="json", exclude={"versions"})
    after = new.model_dump(mode="json", exclude={"versions"})
    return [f"{section}.{key}: {before[section][key]!r} -> {after[section][key]!r}"
            for section in after for key in after[section] if before[section].get(key) != after[section][key]]
