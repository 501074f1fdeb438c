"""lowtune vs the plain HF stack on one GPU, same model, data and shapes, each run in its own subprocess.

    python bench/bench_train.py a,c        # cases to run (default: all); table at the end, JSON in $OUT
    env: MODEL_DIR (default /dev/shm/llama2_7b_random), WORK (/dev/shm/lowtune_bench), STEPS (lowtune optimizer
         steps, default 4, the first not timed), SMALL=1 (tiny model on CPU: checks the plumbing, lowtune only)

Cases (Llama-2-7B shape, random weights; LoRA r64 alpha16 dropout 0.1 on all 7 projections; XTuner's config:
batch 1 x accumulation 16 rows of 2048 tokens, packing):
  a  QLoRA, whole GPU      b  QLoRA under an 8 GiB cap      c  bf16 LoRA
  d  guanaco-like length mix (lowtune packs, the baseline pads per batch)
  e  longest sequence 7B QLoRA trains in under an 8 GiB cap
Exploration: b* (compile / micro-batch overrides under the cap), p (a torch.profiler step under the cap, then without
offload and with expandable segments), q (py-spy of the host side under the cap, and the same plan uncapped), r (no
Liger kernels inside compiled layers), g (50-step loss-curve guard against the baseline on learnable data),
m (scaling over NPROC GPUs against one: QLoRA with DDP, bf16 LoRA with FSDP; needs NPROC GPUs).
The baseline runs twice: as users run it (batch 1, checkpointing on) and tuned to the micro-batch and
checkpointing lowtune's device plan picked.

Issue 18 (L8_DIR, default /dev/shm/llama31_8b_random: Llama-3.1-8B shape, 128,256 vocabulary, GQA 8 KV heads):
  l8a  QLoRA r64 at 2048, whole GPU     l8b  the same under an 8 GiB cap (HF also capped and uncapped)
  l8c  bf16 LoRA at 2048, whole GPU     l8d  bf16 LoRA under 8 GiB (records why it cannot fit)
  sweep      default plan vs a micro-batch x checkpointing x offload grid (SWEEP_GRID, SWEEP_MODEL=l8, SWEEP_CAP,
             CARD names the card in the measured-peak records it writes); markdown table
  longest    longest QLoRA r32 batch-1 row under caps of 8/24/80 GiB (LONGEST_CAPS, _LO, _HI, _TRIES, _STEP)
  tilecheck  first-step loss of one long row with and without the tiled MLP (TILE_SEQ)
  table F.json ...  the tables of saved rows (several calls)

Issue 17: dpo  QLoRA DPO r16 at 2048 tokens per side beside TRL's DPOTrainer (bench/trl_dpo.py; needs trl and
datasets), whole GPU, and lowtune under the 8 GiB cap (DPO_PAIRS pairs per optimizer step, default 8)
"""

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SMALL = os.environ.get("SMALL") == "1"
MODEL_DIR = os.environ.get("MODEL_DIR", "/tmp/lowtune_bench_small" if SMALL else "/dev/shm/llama2_7b_random")
WORK = os.environ.get("WORK", "/tmp/lowtune_bench_work" if SMALL else "/dev/shm/lowtune_bench")
STEPS = int(os.environ.get("STEPS", 4))
SEQ = 256 if SMALL else 2048
VOCAB = 512 if SMALL else 32000
N_PARAMS = 6.74e9
CAP = 8.0


def flops_per_token(seq: int) -> float:
    """Same convention as the baseline in the issue: 4N + causal attention (QK^T, PV; forward + input grad)."""
    return 4 * N_PARAMS + 4 * 32 * 4096 * seq / 2 * 2


def model_flops_per_token(model_dir: str, seq: int) -> float:
    """lowtune's own count (models/memory.Shape.flops_per_token: 4N with the head + causal attention) for the model
    in `model_dir`; the Llama-2-7B shape keeps the issue's convention (flops_per_token) so rounds compare."""
    if model_dir == MODEL_DIR:
        return flops_per_token(seq)
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from lowtune.models.memory import Shape

    with open(os.path.join(model_dir, "config.json")) as fh:
        return Shape.from_config(json.load(fh)).flops_per_token(seq)


L8_DIR = os.environ.get("L8_DIR", "/tmp/lowtune_bench_small_l8" if SMALL else "/dev/shm/llama31_8b_random")
L8_VOCAB = 640 if SMALL else 128256
L8_SHAPE = dict(hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2) if SMALL else \
    dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
         num_key_value_heads=8, rope_theta=500000.0)
"""Llama-3.1-8B's published shape: 128,256 vocabulary, GQA with 8 KV heads, untied head (random weights)."""


def make_model_dir(model_dir: str = MODEL_DIR, vocab_size: int = VOCAB, shape: dict | None = None) -> None:
    if os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        return
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    shape = shape or (dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4)
                      if SMALL else dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                         num_attention_heads=32))
    # no pad_token_id: it would zero the embedding row of id 0, which is also <unk>, the id of every template word
    # this tokenizer lacks; a sequence starting with it keeps a zero residual through all layers and its gradient
    # overflows (bench/RESULTS.md, "Preference tuning"). INIT_RANGE: the weights' init std (transformers: 0.02).
    cfg = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=1 << 20, rms_norm_eps=1e-5,
                      initializer_range=float(os.environ.get("INIT_RANGE", 0.02)),
                      bos_token_id=None, eos_token_id=2, **shape)
    device = "cpu" if SMALL else "cuda"
    torch.set_default_dtype(torch.float32 if SMALL else torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(model_dir, max_shard_size="20GB")
    torch.set_default_dtype(torch.float32)
    del model
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="<unk>")
    fast.save_pretrained(model_dir)


def make_l8_dir() -> None:
    make_model_dir(L8_DIR, L8_VOCAB, L8_SHAPE)


def write_text(path: str, lengths: list[int], vocab: int = VOCAB) -> str:
    """Pretraining text records of exactly these token counts (one word = one token, EOS appended by lowtune)."""
    rng = random.Random(len(lengths))
    with open(path, "w", encoding="utf-8") as out:
        for n in lengths:
            out.write(json.dumps({"text": " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(n - 1))}) + "\n")
    return path


def guanaco_lengths(count: int) -> list[int]:
    """Lengths like openassistant-guanaco's: median ~250 tokens, long tail, capped at the row length."""
    rng = random.Random(0)
    return [max(16, min(SEQ, int(rng.lognormvariate(5.5, 0.8)))) for _ in range(count)]


def run(cmd: list[str], env: dict, timeout: int = 420) -> tuple[int, str]:
    started = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=timeout)
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, text = -9, f"timeout after {timeout}s: {exc}"
    print(f"  ({time.time() - started:.0f}s) {' '.join(cmd[-2:])} rc={code}", flush=True)
    return code, text


def result_line(text: str) -> dict | None:
    """The `RESULT {json}` a baseline script prints last, or None when it printed none."""
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else None


def failure(text: str, tail: int) -> str:
    """What a failed run says: OOM, or the end of its output."""
    return "OOM" if "OutOfMemoryError" in text or "out of memory" in text else text[-tail:]


def baseline(variant: str, bs: int, gc: bool, cap: float = 0, lengths: str | None = None, seq: int = SEQ,
             row: str | None = None, steps: int = 6, warmup: int = 2, model_dir: str = MODEL_DIR) -> dict:
    if SMALL:
        return {"name": f"HF {variant}", "error": "skipped (SMALL=1 checks lowtune's side only)"}
    env = {"MODEL_DIR": model_dir, "BS": str(bs), "GC": "1" if gc else "0", "SEQ": str(seq), "STEPS": str(steps),
           "WARMUP": str(warmup)}
    if row:
        env["ROW"] = row
    if cap:
        env["CAP_GIB"] = str(cap)
    if lengths:
        env["LENGTHS"] = lengths
    code, text = run([sys.executable, os.path.join(HERE, "hf_baseline.py"), variant], env)
    name = f"HF {variant} bs{bs}{' ckpt' if gc else ''}{' padded' if lengths else ''}"
    result = result_line(text)
    if result is None:
        return {"name": name, "error": failure(text, 1500)}
    result["name"] = name + (f" cap {cap:g} GiB" if cap else "")
    result.update(seq=seq, flops_tok=model_flops_per_token(model_dir, seq))
    return result


def lowtune(name: str, data: str, overrides: list[str], cap: float = 0, seq: int = SEQ, steps: int = STEPS,
            rows: int = 16, batch: int = 1, env: dict | None = None, model_dir: str = MODEL_DIR, lora_r: int = 64,
            timeout: int = 480) -> dict:
    out_dir = os.path.join(WORK, "runs", name)
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = {
        "model": {"path": model_dir, "template": "default", "quantization": "nf4"},
        "data": {"train": [data], "format": "text", "max_length": seq, "packing": True},
        "lora": {"r": lora_r, "alpha": 16, "dropout": 0.1, "targets": "all-linear"},
        "train": {"epochs": 1, "max_steps": steps, "batch_size": batch, "grad_accum": rows // batch, "lr": 2e-4,
                  "save_every": 10**6, "save_limit": 1, "log_every": 1},
        "eval": {"prompts": []}, "log": {"to": []}, "output": {"dir": out_dir},
    }
    path = os.path.join(WORK, f"{name}.json")
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    prelude = (f"import sys, torch; torch.cuda.set_per_process_memory_fraction(min(1.0, {cap} * 2**30 / "
               "torch.cuda.get_device_properties(0).total_memory)); " if cap and not SMALL else "import sys; ")
    if env and "PRELUDE" in env:
        prelude += env.pop("PRELUDE")
    if env and "PROFILE" in env:
        prelude += "sys.path.insert(0, " + repr(HERE) + "); import profile_hook; "
    code_text = prelude + ("from lowtune.cli import main; "
                           f"sys.exit(main(['train', {path!r}, *{overrides!r}]))")
    env = {**(env or {}), "PYTHONPATH": os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if not SMALL:
        code_text = code_text.replace("from lowtune.cli import main; ", "import atexit; atexit.register(lambda: print("
                                      "'ALLOCATOR', {k: v for k, v in torch.cuda.memory_stats().items() if 'retries' "
                                      "in k or k.startswith('num_')})); from lowtune.cli import main; ")
        code_text = ("import torch; " + code_text) if "import torch" not in code_text else code_text
    spy = [env.pop("SPY"), "record", "--format", "raw", "-r", "50", "-o",
           os.path.join(os.environ.get("OUT", WORK), f"{name}.spy"), "--"] if "SPY" in env else []
    code, text = run([*spy, sys.executable, "-c", code_text], env, timeout=timeout)
    breaks: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith(("PROFILE", "ALLOCATOR")):
            print(line, flush=True)
        if "Graph break" in line or "graph break" in line.lower():
            breaks[line.strip()[:300]] = breaks.get(line.strip()[:300], 0) + 1
    for line, count in list(breaks.items())[:12]:
        print(f"  BREAK {count}x {line}", flush=True)
    if code != 0 and "train.compile=false" not in overrides and "OutOfMemoryError" not in text:
        print(f"  lowtune {name} failed ({text.strip().splitlines()[-1][:200]}); again without torch.compile")
        return lowtune(name, data, [*overrides, "train.compile=false"], cap, seq, steps, rows, batch, env,
                       model_dir, lora_r, timeout)
    lines = text.splitlines()
    at = next((i for i, ln in enumerate(lines) if ln.strip().startswith("device plan:")), None)
    plan = ""
    if at is not None:  # the plan line and its indented continuation lines (forecast peak, tokens/s)
        more = [ln.strip() for ln in lines[at + 1:at + 3] if ln.startswith("      ")]
        plan = " ".join([lines[at].strip(), *more])
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    rows_ = [json.loads(ln) for ln in open(metrics_path)] if os.path.exists(metrics_path) else []
    steps_ = [r for r in rows_ if "loss" in r]
    if code != 0 or len(steps_) < min(2, steps):
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], f"{name}.log"), "w") as fh:
                fh.write(text)
        return {"name": f"lowtune {name}", "error": failure(text, 2500), "plan": plan}
    timed = steps_[1:] or steps_  # one step (long rows): its time includes compiling the layers
    tok_s = sum(r["tokens"] for r in timed) / sum(r["step_s"] for r in timed)
    return {"name": f"lowtune {name}", "tok_per_s": round(tok_s, 1), "peak_gib": max(r["peak_mem_gb"] for r in steps_),
            "losses": [r["loss"] for r in steps_], "grad_norms": [r["grad_norm"] for r in steps_], "plan": plan,
            "seq": seq, "flops_tok": model_flops_per_token(model_dir, seq)}


def plan_numbers(plan: str) -> tuple[int, bool]:
    match = re.search(r"micro-batch (\d+)", plan)
    return (int(match.group(1)) if match else 1), ("no checkpointing" not in plan)


def case_a(results: list) -> None:
    data = write_text(os.path.join(WORK, "rows.jsonl"), [SEQ] * (16 * STEPS))
    results.append(dict(case="a", **baseline("qlora", 1, True)))
    mine = lowtune("a_qlora", data, [])
    results.append(dict(case="a", **mine))
    micro, ckpt = plan_numbers(mine.get("plan", ""))
    results.append(dict(case="a", **baseline("qlora", micro, ckpt)))


def case_b(results: list) -> None:
    data = write_text(os.path.join(WORK, "rows.jsonl"), [SEQ] * (16 * STEPS))
    results.append(dict(case="b", **baseline("qlora", 1, True, cap=CAP)))
    results.append(dict(case="b", **lowtune("b_qlora_8gib", data, [], cap=CAP, steps=3)))


def case_c(results: list) -> None:
    data = write_text(os.path.join(WORK, "rows.jsonl"), [SEQ] * (16 * STEPS))
    results.append(dict(case="c", **baseline("lora", 1, True)))
    mine = lowtune("c_lora_bf16", data, ["model.quantization=none"])
    results.append(dict(case="c", **mine))
    micro, ckpt = plan_numbers(mine.get("plan", ""))
    results.append(dict(case="c", **baseline("lora_liger", micro, ckpt)))


def case_d(results: list) -> None:
    lengths = guanaco_lengths(4000)
    lengths_file = os.path.join(WORK, "lengths.json")
    json.dump(lengths, open(lengths_file, "w"))
    data = write_text(os.path.join(WORK, "mix.jsonl"), lengths)
    results.append(dict(case="d", **baseline("qlora", 1, True, lengths=lengths_file)))
    mine = lowtune("d_qlora_mix", data, [])
    results.append(dict(case="d", **mine))
    micro, ckpt = plan_numbers(mine.get("plan", ""))
    results.append(dict(case="d", **baseline("qlora", micro, ckpt, lengths=lengths_file)))


def case_e(results: list) -> None:
    for seq in ([512, 1024] if SMALL else [8192, 12288, 16384]):
        data = write_text(os.path.join(WORK, f"long{seq}.jsonl"), [seq] * 3)
        mine = lowtune(f"e_qlora_{seq}", data, [], cap=CAP, seq=seq, steps=3, rows=1)
        results.append(dict(case="e", **mine))
        if "error" in mine:
            break


def case_b_variants(results: list) -> None:
    """Exploration under the 8 GiB cap: compiled layers with checkpointing, and two rows per micro-batch."""
    data = write_text(os.path.join(WORK, "rows.jsonl"), [SEQ] * (16 * STEPS))
    for name, overrides in [("b_compiled", ["train.compile=true"]),
                            ("b_compiled_mb2", ["train.compile=true", "train.micro_batch=2"])]:
        results.append(dict(case="b*", **lowtune(name, data, overrides, cap=CAP, steps=3)))


def case_p(results: list) -> None:
    """Where a step under the 8 GiB cap spends its time: a profiled step, then the plan without offloading and
    with the allocator's expandable segments, to price each choice."""
    data = write_text(os.path.join(WORK, "rows.jsonl"), [SEQ] * (16 * STEPS))
    results.append(dict(case="p", **lowtune("p_profile", data, [], cap=CAP, steps=3, env={"PROFILE": "3"})))
    results.append(dict(case="p", **lowtune("p_no_offload", data, ["train.offload_activations=false"], cap=CAP,
                                            steps=3)))
    results.append(dict(case="p", **lowtune("p_expandable", data, [], cap=CAP, steps=3,
                                            env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})))


def case_q(results: list) -> None:
    """The capped plan sampled by py-spy (Python stacks of the host side), and the same plan without the cap."""
    data = write_text(os.path.join(WORK, "rows.jsonl"), [SEQ] * (16 * STEPS))
    spy = os.path.join(ROOT, ".whl", "bin", "py-spy")
    results.append(dict(case="q", **lowtune("q_spy", data, [], cap=CAP, steps=4, env={"SPY": spy})))
    same_plan = ["train.micro_batch=2", "train.gradient_checkpointing=true", "train.offload_activations=true",
                 "train.optimizer=paged_adamw_8bit"]
    results.append(dict(case="q", **lowtune("q_uncapped", data, same_plan, steps=3)))


NO_LIGER = "import lowtune.train.loop as _loop; _loop.enable_fast_path = lambda model: []; "


def case_r(results: list) -> None:
    """Compiled layers without Liger's kernels (Inductor fuses RMSNorm, SwiGLU and RoPE itself): under the cap, with
    dynamo's graph-break log, and on the whole GPU."""
    data = write_text(os.path.join(WORK, "rows.jsonl"), [SEQ] * (16 * STEPS))
    results.append(dict(case="r", **lowtune("r_capped_noliger", data, [], cap=CAP, steps=3,
                                            env={"PRELUDE": NO_LIGER, "TORCH_LOGS": "graph_breaks"})))
    results.append(dict(case="r", **lowtune("r_whole_noliger", data, [], env={"PRELUDE": NO_LIGER})))


def case_m(results: list) -> None:
    """Several GPUs (`lowtune train --nproc N`): QLoRA with DDP and bf16 LoRA with FSDP, each on 1 and on N
    processes, each process taking 16 rows per optimizer step (the global batch grows with N, as in XTuner and HF
    Trainer); scaling = N-process tok/s over 1-process tok/s. N = NPROC (2). M_QUICK=1: only QLoRA on N processes
    (compare with case a's lowtune row)."""
    nproc = os.environ.get("NPROC", "2")
    quick = os.environ.get("M_QUICK") == "1"
    data = write_text(os.path.join(WORK, "rows_many.jsonl"), [SEQ] * (16 * int(nproc) * (STEPS + 1)))
    bf16 = ["model.quantization=none"]
    for label, single, several in [("QLoRA, ddp", [], []),
                                   ("bf16 LoRA, fsdp", bf16, [*bf16, "train.distributed=fsdp"])][:1 if quick else 2]:
        one = {} if quick else lowtune(f"m_1proc_{len(single)}", data, single)
        many = lowtune(f"m_{nproc}proc_{len(several)}", data, [*several, "--nproc", nproc])
        results += [dict(case="m", **run) for run in (one, many) if run]
        if "tok_per_s" in one and "tok_per_s" in many:
            print(f"scaling ({label}): {nproc} processes {many['tok_per_s']:.0f} tok/s vs 1 process "
                  f"{one['tok_per_s']:.0f} tok/s = {many['tok_per_s'] / one['tok_per_s']:.2f}x", flush=True)


def case_g(results: list) -> None:
    """Correctness guard: 50 steps on the same learnable data (one fixed row, 4 per step, so order cannot differ),
    same optimizer, lr, clipping, no warmup; the two loss curves must agree (dropout and LoRA init draw different
    random numbers, so not to the last bit)."""
    rng = random.Random(7)
    ids = [rng.randrange(3, VOCAB) for _ in range(SEQ - 1)]
    data = os.path.join(WORK, "fixed.jsonl")
    with open(data, "w") as out:
        for _ in range(4 * 60):
            out.write(json.dumps({"text": " ".join(f"w{i}" for i in ids)}) + "\n")
    row = os.path.join(WORK, "fixed_row.json")
    json.dump(ids + [2], open(row, "w"))  # the same tokens lowtune trains on: the words, then EOS
    steps = 50
    mine = lowtune("g_guard", data, ["train.scheduler=constant", "train.warmup_ratio=0"], steps=steps, rows=4,
                   batch=4)
    theirs = baseline("qlora", 4, False, row=row, steps=steps - 5, warmup=5)
    results += [dict(case="g", **mine), dict(case="g", **theirs)]
    if "losses" in mine and "losses" in theirs:
        pairs = list(zip(mine["losses"], theirs["losses"]))
        gaps = [abs(a - b) for a, b in pairs]
        worst = max(range(len(gaps)), key=gaps.__getitem__)
        print(f"guard: {len(pairs)} steps, largest gap {gaps[worst]:.3f} nats at step {worst} "
              f"({gaps[worst] / pairs[0][1]:.2%} of the first loss), last {pairs[-1][0]} vs {pairs[-1][1]}; "
              f"lowtune {mine['losses'][::10]} "
              f"HF {theirs['losses'][::10]}; grad norms > 0: {min(mine['grad_norms']) > 0}", flush=True)

# ---- issue 17: DPO beside TRL's DPOTrainer ------------------------------------------------------------------

DPO_PAIRS = int(os.environ.get("DPO_PAIRS", 8))
"""Pairs per optimizer step in the `dpo` case (both sides of each at about SEQ tokens)."""


def write_pairs(path: str, count: int, side: int) -> str:
    """Preference pairs in TRL's standard form (plain strings), each side (prompt + answer + EOS) about `side`
    tokens: a prompt of side / 2 words and two different answers of side / 2 - 16 words (room for the chat
    template lowtune renders around them)."""
    rng = random.Random(count)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(n))

    with open(path, "w", encoding="utf-8") as out:
        for _ in range(count):
            out.write(json.dumps({"prompt": words(side // 2), "chosen": words(side // 2 - 16),
                                  "rejected": words(side // 2 - 16)}) + "\n")
    return path


def trl_dpo(pairs: str, micro: int, ckpt: bool, cap: float = 0) -> dict:
    if SMALL and not os.environ.get("TRL_ON_CPU"):
        return {"name": "TRL DPOTrainer", "error": "skipped (SMALL=1 checks lowtune's side only)"}
    env = {"MODEL_DIR": MODEL_DIR, "BS": str(micro), "ACCUM": str(max(1, DPO_PAIRS // micro)),
           "GC": "1" if ckpt else "0", "MAX_LENGTH": str(SEQ), "WORK": WORK, "VARIANT": "lora" if SMALL else "qlora",
           "STEPS": str(STEPS - 1), "WARMUP": "1"}
    trl_site = os.environ.get("TRL_SITE", os.path.join(ROOT, ".whl", "trlsite"))
    if os.path.isdir(trl_site):  # trl and datasets only for this subprocess: lowtune's runs never see them
        env["PYTHONPATH"] = trl_site + os.pathsep + os.environ.get("PYTHONPATH", "")
    if cap:
        env["CAP_GIB"] = str(cap)
    code, text = run([sys.executable, os.path.join(HERE, "trl_dpo.py"), pairs], env, timeout=540)
    name = f"TRL DPOTrainer bs{micro}{' ckpt' if ckpt else ''}" + (f" cap {cap:g} GiB" if cap else "")
    result = result_line(text)
    if result is None:
        return {"name": name, "error": failure(text, 2500)}
    return {**result, "name": name, "seq": SEQ}


def case_dpo(results: list) -> None:
    """QLoRA DPO (r16, the shipped DPO recipe's LoRA) of the 7B shape at SEQ tokens per side, DPO_PAIRS pairs per
    step: TRL's DPOTrainer as users run it (one pair per micro-batch, checkpointing), lowtune on the whole GPU and
    under the 8 GiB cap, and TRL tuned to lowtune's micro-batch and checkpointing."""
    pairs = write_pairs(os.path.join(WORK, "pairs.jsonl"), DPO_PAIRS * (STEPS + 1), SEQ)
    dpo = ["train.method=dpo", "train.beta=0.1", "data.format=pairs", "train.lr=5e-6", "lora.alpha=32",
           "lora.dropout=0.05"]
    results.append(dict(case="dpo", **trl_dpo(pairs, 1, True)))
    mine = lowtune("dpo_qlora", pairs, dpo, rows=DPO_PAIRS, lora_r=16)
    results.append(dict(case="dpo", **mine))
    results.append(dict(case="dpo", **lowtune("dpo_qlora_8gib", pairs, dpo, cap=CAP, rows=DPO_PAIRS, lora_r=16,
                                              steps=3)))
    if "tok_per_s" in mine:
        micro, ckpt = plan_numbers(mine.get("plan", ""))
        if (micro, ckpt) != (1, True):
            results.append(dict(case="dpo", **trl_dpo(pairs, micro, ckpt)))


# ---- issue 18: Llama-3.1-8B shape, the plan sweep, the longest row --------------------------------------------

L8_ROWS = os.path.join(WORK, "l8_rows.jsonl")


def l8_rows() -> str:
    make_l8_dir()
    return write_text(L8_ROWS, [SEQ] * (16 * STEPS), vocab=L8_VOCAB)


def l8_pair(case: str, results: list, quant: str, cap: float) -> None:
    """One Llama-3.1-8B row set: HF as users run it (batch 1, checkpointing; uncapped, and capped when a cap is
    given), lowtune, and HF tuned to lowtune's micro-batch and checkpointing."""
    data = l8_rows()
    variant, bf16 = ("qlora", []) if quant == "nf4" else ("lora", ["model.quantization=none"])
    results.append(dict(case=case, **baseline(variant, 1, True, model_dir=L8_DIR)))
    if cap:
        results.append(dict(case=case, **baseline(variant, 1, True, cap=cap, model_dir=L8_DIR)))
    mine = lowtune(f"{case}_{variant}", data, bf16, cap=cap, model_dir=L8_DIR, steps=3 if cap else STEPS)
    results.append(dict(case=case, **mine))
    if not cap and "tok_per_s" in mine:
        micro, ckpt = plan_numbers(mine.get("plan", ""))
        tuned = "lora_liger" if quant == "none" else "qlora"
        results.append(dict(case=case, **baseline(tuned, micro, ckpt, model_dir=L8_DIR)))


def case_l8a(results: list) -> None:
    """Llama-3.1-8B shape, QLoRA r64 at 2048, whole GPU."""
    l8_pair("l8a", results, "nf4", 0)


def case_l8b(results: list) -> None:
    """Llama-3.1-8B shape, QLoRA r64 at 2048, under an 8 GiB cap."""
    l8_pair("l8b", results, "nf4", CAP)


def case_l8c(results: list) -> None:
    """Llama-3.1-8B shape, bf16 LoRA r64 at 2048, whole GPU."""
    l8_pair("l8c", results, "none", 0)


def case_l8d(results: list) -> None:
    """bf16 LoRA of the 8B shape under an 8 GiB cap: its bf16 weights alone exceed the cap, so the row records the
    forecast instead of loading 15 GiB to fail."""
    make_l8_dir()
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from lowtune.models.memory import GIB, Shape, weight_bytes

    with open(os.path.join(L8_DIR, "config.json")) as fh:
        weights = weight_bytes(Shape.from_config(json.load(fh)), "none") / GIB
    row = {"name": "lowtune l8d_lora_8gib", "error": f"cannot fit: bf16 weights alone {weights:.1f} GiB > {CAP:g}"}
    results.append(dict(case="l8d", **row))
    print(row["error"], flush=True)


SWEEP_GRID = "2:none,4:none,8:none,4:ckpt,8:ckpt,16:ckpt,8:offload,16:offload"
MODES = {"none": (False, False), "ckpt": (True, False), "offload": (True, True)}


def sweep_overrides(micro: int, mode: str) -> list[str]:
    ckpt, off = MODES[mode]
    return [f"train.micro_batch={micro}", f"train.gradient_checkpointing={str(ckpt).lower()}",
            f"train.offload_activations={str(off).lower()}"]


def case_sweep(results: list) -> None:
    """The default plan against a grid of micro-batch x checkpointing x offload (SWEEP_GRID="micro:mode,...", modes
    none/ckpt/offload; SWEEP_MODEL=l8 for the Llama-3.1-8B shape, SWEEP_CAP=GiB for a cap), 7B QLoRA at 2048, all
    in one call; prints a markdown table and writes the measured peaks as calibration records."""
    l8 = os.environ.get("SWEEP_MODEL") == "l8"
    cap = float(os.environ.get("SWEEP_CAP", 0))
    model_dir = L8_DIR if l8 else MODEL_DIR
    data = l8_rows() if l8 else write_text(os.path.join(WORK, "rows.jsonl"), [SEQ] * (16 * STEPS))
    rows = [dict(case="sweep", grid="default", **lowtune("sweep_default", data, [], cap=cap, model_dir=model_dir))]
    results.append(rows[0])
    for item in os.environ.get("SWEEP_GRID", SWEEP_GRID).split(","):
        micro, mode = item.split(":")
        run_ = lowtune(f"sweep_{micro}_{mode}", data, sweep_overrides(int(micro), mode), cap=cap,
                       model_dir=model_dir, steps=3)
        rows.append(dict(case="sweep", grid=item, **run_))
        results.append(rows[-1])
    print(sweep_table(rows), flush=True)
    write_peaks(rows, model_dir)


def sweep_table(rows: list[dict]) -> str:
    """Markdown: every sweep row, then the default plan's tokens/s as a share of the fastest row's."""
    lines = ["| run | plan | tok/s | peak GiB |", "|---|---|---:|---:|"]
    for r in rows:
        speed = f"{r['tok_per_s']:,.0f}" if "tok_per_s" in r else r.get("error", "")[:40].replace("\n", " ")
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else ""
        lines.append(f"| {r.get('grid', '')} | {r.get('plan', '')[:140]} | {speed} | {peak} |")
    done = [r for r in rows if "tok_per_s" in r]
    default = next((r for r in done if r.get("grid") == "default"), None)
    if done and default:
        best = max(done, key=lambda r: r["tok_per_s"])
        share = default["tok_per_s"] / best["tok_per_s"]
        lines.append(f"\ndefault plan {default['tok_per_s']:,.0f} tok/s = {share:.1%}"
                     f" of the fastest ({best.get('grid')}: {best['tok_per_s']:,.0f} tok/s)")
    return "\n".join(lines)


def write_peaks(rows: list[dict], model_dir: str) -> None:
    """Measured peaks of the sweep in models/measured_peaks.json's format (to review and append there)."""
    out = os.environ.get("OUT", WORK)
    with open(os.path.join(model_dir, "config.json")) as fh:
        config = json.load(fh)
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from dataclasses import asdict

    from lowtune.models.memory import Shape

    card = os.environ.get("CARD", "")
    records = []
    for r in rows:
        match = re.search(r"micro-batch (\d+) x accumulation \d+, ([^,]+), optimizer (\w+)", r.get("plan", ""))
        if "peak_gib" not in r or not match:
            continue
        mode = match.group(2)
        records.append({"shape": asdict(Shape.from_config(config)), "quantization": "nf4", "lora_r": 64,
                        "optimizer": match.group(3), "micro_batch": int(match.group(1)), "seq_len": r["seq"],
                        "checkpointing": mode != "no checkpointing", "offload": "offload" in mode,
                        "peak_gib": r["peak_gib"], "card": card, "source": f"bench_train.py sweep {r.get('grid')}"})
    with open(os.path.join(out, f"measured_peaks_{int(time.time())}.json"), "w") as fh:
        json.dump(records, fh, indent=1)


LONGEST_START = {8.0: 8192, 24.0: 32768, 80.0: 131072}


def trains(seq: int, cap: float) -> dict:
    """One attempt of the longest-row search: QLoRA r32, batch 1, one row of `seq` tokens per step, LONGEST_STEPS
    steps (default 2, the first untimed; 1 for rows whose step takes minutes)."""
    data = write_text(os.path.join(WORK, f"longest_{seq}.jsonl"), [seq] * 2, vocab=L8_VOCAB)
    overrides = os.environ.get("LONGEST_EXTRA", "").split()
    steps = int(os.environ.get("LONGEST_STEPS", 2))
    run_ = lowtune(f"longest_{int(cap)}_{seq}", data, overrides, cap=cap, seq=seq, steps=steps, rows=1,
                   model_dir=L8_DIR, lora_r=32, timeout=int(os.environ.get("LONGEST_TIMEOUT", 540)))
    ok = "tok_per_s" in run_
    print(f"LONGEST cap={cap:g} seq={seq} {'ok' if ok else 'fail'} "
          f"{run_.get('tok_per_s', '')} tok/s peak {run_.get('peak_gib', '')} {run_.get('error', '')[:80]!r}",
          flush=True)
    return run_


def search_longest(cap: float, lo: int, hi: int, tries: int, step: int) -> tuple[int, dict | None]:
    """Doubling from `lo` until a length fails (or `hi`, a known failure, is reached), then bisection to `step`
    tokens; at most `tries` attempts. Returns (longest length that trained, its run)."""
    best, best_run, seq = 0, None, lo
    while tries and (not hi or seq < hi):
        tries -= 1
        run_ = trains(seq, cap)
        if "tok_per_s" not in run_:
            hi = seq
            break
        best, best_run, seq = seq, run_, seq * 2
    lo_ok = best
    while tries and hi and hi - lo_ok > step:
        tries -= 1
        mid = (lo_ok + hi) // 2 // step * step
        if mid <= lo_ok:
            break
        run_ = trains(mid, cap)
        if "tok_per_s" in run_:
            lo_ok, best, best_run = mid, mid, run_
        else:
            hi = mid
    return best, best_run


def case_longest(results: list) -> None:
    """Longest Llama-3.1-8B-shape QLoRA row (batch 1) that trains under each cap of LONGEST_CAPS (default 8,24,80
    GiB); LONGEST_LO / LONGEST_HI ("cap:tokens,...") resume a search from known bounds, LONGEST_TRIES attempts per
    cap (default 6), LONGEST_STEP resolution (default 4096 tokens), LONGEST_STEPS optimizer steps per attempt,
    LONGEST_TIMEOUT seconds per attempt, LONGEST_EXTRA train overrides."""
    make_l8_dir()
    caps = [float(c) for c in os.environ.get("LONGEST_CAPS", "8,24,80").split(",")]
    lows = {float(k): int(v) for k, v in (p.split(":") for p in os.environ.get("LONGEST_LO", "").split(",") if p)}
    highs = {float(k): int(v) for k, v in (p.split(":") for p in os.environ.get("LONGEST_HI", "").split(",") if p)}
    for cap in caps:
        start = lows.get(cap, LONGEST_START.get(cap, 8192) if not SMALL else 256)
        best, run_ = search_longest(cap, start, highs.get(cap, 0), int(os.environ.get("LONGEST_TRIES", 6)),
                                    int(os.environ.get("LONGEST_STEP", 4096)))
        row = dict(case="longest", cap=cap, longest=best, **(run_ or {"name": f"longest {cap:g} GiB",
                                                                         "error": f"nothing from {start} trained"}))
        results.append(row)
        print(f"LONGEST RESULT cap={cap:g} GiB: {best} tokens, {row.get('tok_per_s', '-')} tok/s, "
              f"peak {row.get('peak_gib', '-')} GiB", flush=True)


def case_tilecheck(results: list) -> None:
    """Loss of one long row (TILE_SEQ, default 32768 tokens) with the tiled MLP and without it, LoRA dropout 0 so
    both see the same numbers; first-step losses must agree within 0.2% (bf16 matmuls summed in other orders)."""
    make_l8_dir()
    seq = int(os.environ.get("TILE_SEQ", 1024 if SMALL else 32768))
    data = write_text(os.path.join(WORK, f"tile_{seq}.jsonl"), [seq] * 2, vocab=L8_VOCAB)
    runs = [lowtune(f"tile_{flag}", data, ["lora.dropout=0", f"train.tiled_mlp={flag}"], seq=seq, steps=2, rows=1,
                    model_dir=L8_DIR, lora_r=32) for flag in ("true", "false")]
    results += [dict(case="tilecheck", **r) for r in runs]
    if all("losses" in r for r in runs):
        a, b = runs[0]["losses"][0], runs[1]["losses"][0]
        print(f"TILECHECK seq {seq}: tiled {a} untiled {b} relative gap {abs(a - b) / abs(b):.2e} "
              f"({'within' if abs(a - b) <= 2e-3 * abs(b) else 'OUTSIDE'} 0.2%)", flush=True)


CASES = {"a": case_a, "b": case_b, "c": case_c, "d": case_d, "e": case_e, "b*": case_b_variants, "g": case_g,
         "p": case_p, "q": case_q, "r": case_r, "m": case_m, "l8a": case_l8a, "l8b": case_l8b, "l8c": case_l8c,
         "l8d": case_l8d, "sweep": case_sweep, "longest": case_longest, "tilecheck": case_tilecheck, "dpo": case_dpo}


def table(results: list) -> str:
    lines = [f"{'case':<4} {'run':<34} {'tok/s':>8} {'MFU':>6} {'peak GiB':>9}  notes"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['case']:<4} {r['name']:<34} {'-':>8} {'-':>6} {'-':>9}  {r['error'][:60]!r}")
            continue
        mfu = r["tok_per_s"] * r.get("flops_tok", flops_per_token(r.get("seq", SEQ))) / 790e12
        notes = f"loss {r['losses'][0]}->{r['losses'][-1]}" + (f", grad norm {r['grad_norms'][-1]}"
                                                                if r.get("grad_norms") else "")
        lines.append(f"{r['case']:<4} {r['name']:<34} {r['tok_per_s']:>8.0f} {100 * mfu:>5.1f}% "
                     f"{r['peak_gib'] or 0:>9.2f}  {notes}")
        if r.get("plan"):
            lines.append(f"{'':<40}{r['plan']}")
    return "\n".join(lines)


L8_CASES = {"l8a", "l8b", "l8c", "l8d", "longest", "tilecheck"}


def save(results: list, stamp: int) -> None:
    """All rows so far into $OUT (after every case, so a call cut short keeps what it measured)."""
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"bench_{stamp}.json"), "w") as fh:
            json.dump(results, fh, indent=1)


def show(paths: list[str]) -> None:
    """`bench_train.py table FILE.json ...`: the table (and sweep table) of saved rows, e.g. of two calls."""
    rows = [row for path in paths for row in json.load(open(path))]
    print(table(rows))
    sweep = [r for r in rows if r["case"] == "sweep"]
    if sweep:
        print(sweep_table(sweep))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "table":
        return show(sys.argv[2:])
    os.makedirs(WORK, exist_ok=True)
    import torch
    import transformers
    print(f"{time.strftime('%Y-%m-%d %H:%M')} torch {torch.__version__} transformers {transformers.__version__} "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}", flush=True)
    cases = (sys.argv[1] if len(sys.argv) > 1 else "a,b,c,d,e").split(",")
    started, stamp = time.time(), int(time.time())
    if not set(cases) <= L8_CASES and not (cases == ["sweep"] and os.environ.get("SWEEP_MODEL") == "l8"):
        make_model_dir()
    print(f"model ready in {time.time() - started:.0f}s", flush=True)
    results: list = []
    for case in cases:
        print(f"case {case}", flush=True)
        CASES[case](results)
        save(results, stamp)
        print(table([r for r in results if r["case"] == case]), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
