"""The plain HF stack (transformers + peft + bitsandbytes, SDPA), as users run it, for side-by-side runs.

Run by bench/bench_train.py, one variant per subprocess:

    python bench/hf_baseline.py VARIANT         # qlora | qlora_liger | lora | lora_liger
    env: MODEL_DIR, SEQ (2048), BS (1), GC (1 = gradient checkpointing), STEPS (10), WARMUP (3),
         CAP_GIB (cap this process's GPU memory), LENGTHS (a JSON file of sample lengths: padded length-mix mode),
         ROW (a JSON file of token ids: every row of every batch is that row, for the loss-curve comparison)

Same recipe as ../shared/bench/hf_baseline.py (which produced the baseline in the issue), plus the memory cap and
the padded length-mix mode. QLoRA uses peft's prepare_model_for_kbit_training, as the tutorials do.
"""

import json
import os
import random
import sys
import time

MODEL_DIR = os.environ["MODEL_DIR"]
SEQ = int(os.environ.get("SEQ", 2048))
BS = int(os.environ.get("BS", 1))
GC = os.environ.get("GC", "1") == "1"
STEPS = int(os.environ.get("STEPS", 10))
WARMUP = int(os.environ.get("WARMUP", 3))
CAP_GIB = float(os.environ.get("CAP_GIB", 0))
LENGTHS = os.environ.get("LENGTHS")
ROW = os.environ.get("ROW")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(variant: str, r: int = 64, alpha: int = 16, dropout: float = 0.1):
    """The model with LoRA on all 7 projections, as the tutorials build it (bf16 on the GPU; fp32 on a CPU, where
    only bench_train.py's SMALL checks run it)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if "liger" in variant:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()
    cuda = torch.cuda.is_available()
    kwargs = dict(dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="sdpa")
    if cuda:
        kwargs["device_map"] = {"": 0}
    if variant.startswith("qlora"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, **kwargs)
    if variant.startswith("qlora"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=GC)
    elif GC:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                        target_modules=TARGETS)
    model = get_peft_model(model, config)
    model.config.use_cache = False
    model.train()
    return model


def batches(vocab: int):
    """(input_ids, labels, real tokens) per step: full rows, or padded batches of real sample lengths."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(0)
    if ROW:
        row = torch.tensor(json.load(open(ROW)), device="cuda")[None].repeat(BS, 1)
        while True:
            yield row, row, row.numel()
    lengths = json.load(open(LENGTHS)) if LENGTHS else None
    pick = random.Random(0)
    while True:
        if lengths is None:
            ids = torch.randint(0, vocab, (BS, SEQ), device="cuda", generator=gen)
            yield ids, ids, BS * SEQ
            continue
        sizes = [pick.choice(lengths) for _ in range(BS)]
        width = max(sizes)
        ids = torch.randint(0, vocab, (BS, width), device="cuda", generator=gen)
        labels = ids.clone()
        mask = torch.ones_like(ids)
        for row, size in enumerate(sizes):
            labels[row, size:] = -100
            mask[row, size:] = 0
        yield (ids, mask), labels, sum(sizes)


def main(variant: str) -> None:
    import torch

    if CAP_GIB:
        torch.cuda.set_per_process_memory_fraction(CAP_GIB * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    started = time.time()
    model = load(variant)
    load_s = time.time() - started
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    torch.cuda.reset_peak_memory_stats()
    times, tokens, losses, norms = [], [], [], []
    source = batches(model.config.vocab_size)
    for step in range(WARMUP + STEPS):
        inputs, labels, real = next(source)
        ids, mask = inputs if isinstance(inputs, tuple) else (inputs, None)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= WARMUP:
            times.append(time.perf_counter() - t)
            tokens.append(real)
        losses.append(round(out.loss.item(), 4))
        norms.append(round(norm.item(), 4))
    result = dict(variant=variant, seq=SEQ, bs=BS, gc=GC, cap_gib=CAP_GIB or None, tok_per_s=round(sum(tokens) /
                  sum(times), 1), step_s=round(sorted(times)[len(times) // 2], 4),
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), load_s=round(load_s, 1),
                  losses=losses, grad_norms=norms)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
