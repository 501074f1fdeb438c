"""Exploratory speed probe on one GPU: which change buys what, on a Llama-2-7B-shaped random model.

    python bench/probe_speed.py                 # every variant in VARIANTS, each in its own subprocess
    python bench/probe_speed.py q-ac-bs1-hf     # one variant

A variant is dash-separated flags: q|l (QLoRA NF4 / bf16 LoRA), hf (peft's prepare_model_for_kbit_training, which
upcasts norms/embeddings/head to fp32), ac (activation checkpointing), bsN (rows of SEQ tokens per step), liger
(RoPE/RMSNorm/SwiGLU kernels), flce (lowtune's fused linear cross-entropy), varlen (rows flattened into one packed
row with cu_seq_lens, lowtune_varlen attention), compile (torch.compile per decoder layer), prof (print a kernel
profile of one step), d0 (LoRA dropout 0 instead of 0.1).
"""

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

MODEL_DIR = os.environ.get("MODEL_DIR", "/dev/shm/llama2_7b_random")
SEQ = int(os.environ.get("SEQ", 2048))
STEPS, WARMUP = int(os.environ.get("STEPS", 8)), 3
N_PARAMS = 6.74e9
VARIANTS = os.environ.get("VARIANTS", "q-ac-bs1-hf,q-ac-bs1-liger-flce,q-bs4-liger-flce-prof,"
                                      "q-bs4-liger-flce-varlen,l-bs4-liger-flce,l-bs4-liger-flce-compile").split(",")


def make_model_dir() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.exists(os.path.join(MODEL_DIR, "config.json")):
        return
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(MODEL_DIR, max_shard_size="20GB")


def flops_per_token(seq: int) -> float:
    return 4 * N_PARAMS + 4 * 32 * 4096 * seq / 2 * 2


def build(flags: set, bs: int):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lowtune.kernels import attention

    attn = attention.register() if "varlen" in flags else "sdpa"
    kw = dict(dtype=torch.bfloat16, attn_implementation=attn, device_map={"": 0})
    if "q" in flags:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, **kw)
    if "liger" in flags:
        from lowtune.kernels import enable_fast_path
        print("fast path:", enable_fast_path(model), flush=True)
    if "hf" in flags:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing="ac" in flags)
    elif "ac" in flags:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    dropout = 0.0 if "d0" in flags else 0.1
    lcfg = LoraConfig(r=64, lora_alpha=16, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lcfg)
    model.config.use_cache = False
    if "compile" in flags:
        for layer in model.get_base_model().model.layers:
            layer.compile()
    model.train()
    return model


def step_fn(model, flags: set, bs: int):
    import torch
    import torch.nn.functional as F

    from lowtune.kernels import causal_lm_loss_sum

    def run(ids):
        batch = {"input_ids": ids, "labels": ids}
        kwargs = {}
        if "varlen" in flags:
            flat = ids.reshape(1, -1)
            batch = {"input_ids": flat, "labels": flat,
                     "position_ids": torch.arange(SEQ, device=ids.device).repeat(bs)[None]}
            cu = torch.arange(0, SEQ * bs + 1, SEQ, device=ids.device, dtype=torch.int32)
            kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=SEQ, max_length_k=SEQ)
        if "flce" in flags:
            loss = causal_lm_loss_sum(model, batch, **kwargs) / batch["input_ids"].numel()
        else:
            logits = model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1))
        loss.backward()
        return loss
    return run


def run_variant(name: str) -> None:
    import torch

    flags = set(name.split("-"))
    bs = next((int(f[2:]) for f in flags if f.startswith("bs")), 1)
    t0 = time.time()
    model = build(flags, bs)
    load_s = time.time() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    run = step_fn(model, flags, bs)
    torch.cuda.reset_peak_memory_stats()
    g = torch.Generator(device="cuda").manual_seed(0)
    times, losses, norms = [], [], []
    for step in range(WARMUP + STEPS):
        ids = torch.randint(0, 32000, (bs, SEQ), device="cuda", generator=g)
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = run(ids)
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= WARMUP:
            times.append(time.perf_counter() - t)
        losses.append(round(loss.item(), 4))
        norms.append(round(norm.item(), 4))
    if "prof" in flags:
        from torch.profiler import ProfilerActivity, profile

        ids = torch.randint(0, 32000, (bs, SEQ), device="cuda", generator=g)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(ids)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    med = sorted(times)[len(times) // 2]
    tok_s = bs * SEQ / med
    res = dict(variant=name, seq=SEQ, bs=bs, step_s=round(med, 4), tok_per_s=round(tok_s, 1),
               mfu_vs_790T=round(tok_s * flops_per_token(SEQ) / 790e12, 4),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), load_s=round(load_s, 1),
               losses=losses[-3:], grad_norms=norms[-3:])
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    import torch
    import transformers
    import peft

    print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
          torch.cuda.get_device_name(0), flush=True)
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
        print("varlen_attn", inspect.signature(varlen_attn), flush=True)
    except Exception as exc:
        print("varlen_attn unavailable", exc, flush=True)
    t0 = time.time()
    make_model_dir()
    print(f"model dir ready in {time.time() - t0:.1f}s", flush=True)
    results = []
    for name in VARIANTS:
        t = time.time()
        proc = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if "prof" in name:
            print(proc.stdout[-6000:], flush=True)
        if lines:
            results.append(json.loads(lines[-1][7:]))
            print(lines[-1], f"({time.time() - t:.0f}s)", flush=True)
        else:
            print("FAILED", name, proc.returncode, proc.stderr[-2500:], flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "probe.json"), "w") as fh:
            json.dump(results, fh, indent=1)
    for r in results:
        print(f"{r['variant']:<34} {r['tok_per_s']:>8.0f} tok/s  MFU {100 * r['mfu_vs_790T']:5.1f}%  "
              f"peak {r['peak_gib']:6.2f} GiB  loss {r['losses'][-1]}  gn {r['grad_norms'][-1]}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        run_variant(sys.argv[1])
    else:
        main()
