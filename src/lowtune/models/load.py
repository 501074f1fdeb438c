"""Load a tokenizer and a causal LM from a local folder, quantise it (bitsandbytes) and wrap it with LoRA (peft).

Layer 1: imports config/errors only. Folders come from `models.resolve.resolve_model_dir`; nothing here touches the
network. Training, chat, eval and merge all load weights through `load_model`.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowtune.config import LoraSection
from lowtune.errors import UserError, require

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Output heads never get LoRA: they are tied to the vocabulary and merging into them breaks resizing.
HEAD_NAMES = ("lm_head", "output", "output_layer", "embed_out")
# bitsandbytes warns on every CPU import about an optional kernel package fetched from a hub; nothing to act on
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def base_model(model: Any) -> Any:
    """The transformers model itself: under a PEFT wrapper, the wrapped model; otherwise `model`."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(name: str, device: str) -> torch.dtype:
    """auto = fp32 on CPU, bf16 where the GPU supports it, else fp16; explicit names are honoured."""
    import torch

    explicit = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name in explicit:
        return explicit[name]
    if not str(device).startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer with a pad token (EOS/UNK when it has none) and right padding for training."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"{model_dir}: cannot load a tokenizer ({str(exc).splitlines()[0]}); "
                        "the folder needs tokenizer.json or tokenizer.model") from None
    if tokenizer.pad_token is None:
        fallback = tokenizer.unk_token or tokenizer.eos_token
        if fallback is None:
            raise UserError(f"{model_dir}: the tokenizer has no pad, unk or eos token; "
                            "add one to tokenizer_config.json")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    return tokenizer


def quantization_config(quantization: str, double_quant: bool, dtype: torch.dtype) -> Any:
    """A transformers BitsAndBytesConfig for nf4/int8 (QLoRA as in the paper), None for 'none'."""
    if quantization == "none":
        return None
    require("bitsandbytes", "qlora", f"model.quantization={quantization}")
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(model_dir: str | Path, quantization: str = "none", double_quant: bool = True, dtype: str = "auto",
               device: str | None = None, trust_remote_code: bool = False,
               attn_implementation: str | None = None) -> PreTrainedModel:
    """A causal LM from a local folder, on one device, quantised when asked; returned in train mode."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    torch_dtype = compute_dtype(dtype, device)
    kwargs: dict[str, Any] = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, device_map={"": device})
    bnb = quantization_config(quantization, double_quant, torch_dtype)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"{model_dir}: cannot load the model ({str(exc).splitlines()[0]})") from None
    model.config.use_cache = False
    model.train()  # from_pretrained returns eval mode, which silently disables checkpointing and dropout
    return model


def lora_targets(model: PreTrainedModel, targets: str | list[str]) -> list[str]:
    """Module-name suffixes LoRA wraps: 'all-linear' = every Linear (incl. 4/8-bit) except the output head."""
    if targets != "all-linear":
        return [targets] if isinstance(targets, str) else list(targets)
    import torch

    linear_types: tuple[type, ...] = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        pass
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, linear_types)}
    return sorted(names - set(HEAD_NAMES))


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Activation checkpointing (non-reentrant, so frozen inputs need no requires_grad hack).

    `gradient_checkpointing_enable` exists in every transformers 5 release; later ones rename it
    `activation_checkpointing_enable` and warn on the old name.
    """
    base = base_model(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _keep_4bit_weights_differentiable(model: Any) -> None:
    """Stop bitsandbytes' CPU inference fast path from repacking 4-bit weights during sample generation.

    On CPUs with AVX512-BF16, an eval-mode forward repacks each Linear4bit for a kernel that has no backward;
    training after that silently stops gradients at every quantised layer.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def apply_lora(model: PreTrainedModel, lora: LoraSection, gradient_checkpointing: bool = True) -> PreTrainedModel:
    """Wrap with a PEFT LoRA adapter (or leave every weight trainable for full fine-tuning); train mode."""
    if getattr(model, "is_quantized", False):
        # Not peft's prepare_model_for_kbit_training: its fp32 copies of norms, embeddings and head turn the
        # whole residual stream fp32 (about a third of a QLoRA step on a GPU). RMSNorm already computes in fp32
        # and the loss upcasts its logits chunk by chunk, so bf16/fp16 weights lose nothing here.
        _keep_4bit_weights_differentiable(model)
        for param in model.parameters():
            param.requires_grad_(False)
    if lora.enabled:
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(model, lora.targets)
        if not targets:
            raise UserError(f"lora.targets={lora.targets!r} matches no Linear layer of this model; "
                            "use all-linear or module names such as [q_proj, v_proj]")
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                            bias="none", task_type="CAUSAL_LM")
        try:
            with warnings.catch_warnings():  # peft probes a deprecated transformers attribute; not ours to fix
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                model = get_peft_model(model, config)
        except ValueError as exc:
            raise UserError(f"lora.targets={lora.targets!r}: {str(exc).splitlines()[0]}") from None
    if gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their logical size."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def count_parameters_without_weights(model_dir: str | Path, lora: LoraSection,
                                     trust_remote_code: bool = False) -> tuple[int, int]:
    """The same counts from config.json alone (meta device): what --dry-run prints without loading weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model = apply_lora(model, lora, gradient_checkpointing=False)
    return count_parameters(model)
