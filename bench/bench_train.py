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


def make_model_dir() -> None:
    if os.path.exists(os.path.join(MODEL_DIR, "tokenizer.json")):
        return
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    shape = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4) if SMALL else \
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=32768, rms_norm_eps=1e-5, bos_token_id=None,
                      eos_token_id=2, pad_token_id=0, **shape)
    device = "cpu" if SMALL else "cuda"
    torch.set_default_dtype(torch.float32 if SMALL else torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(MODEL_DIR, max_shard_size="20GB")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="<unk>")
    fast.save_pretrained(MODEL_DIR)


def write_text(path: str, lengths: list[int]) -> str:
    """Pretraining text records of exactly these token counts (one word = one token, EOS appended by lowtune)."""
    rng = random.Random(len(lengths))
    with open(path, "w", encoding="utf-8") as out:
        for n in lengths:
            out.write(json.dumps({"text": " ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(n - 1))}) + "\n")
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


def baseline(variant: str, bs: int, gc: bool, cap: float = 0, lengths: str | None = None, seq: int = SEQ,
             row: str | None = None, steps: int = 6, warmup: int = 2) -> dict:
    if SMALL:
        return {"name": f"HF {variant}", "error": "skipped (SMALL=1 checks lowtune's side only)"}
    env = {"MODEL_DIR": MODEL_DIR, "BS": str(bs), "GC": "1" if gc else "0", "SEQ": str(seq), "STEPS": str(steps),
           "WARMUP": str(warmup)}
    if row:
        env["ROW"] = row
    if cap:
        env["CAP_GIB"] = str(cap)
    if lengths:
        env["LENGTHS"] = lengths
    code, text = run([sys.executable, os.path.join(HERE, "hf_baseline.py"), variant], env)
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    name = f"HF {variant} bs{bs}{' ckpt' if gc else ''}{' padded' if lengths else ''}"
    if not lines:
        oom = "OutOfMemoryError" in text or "out of memory" in text
        return {"name": name, "error": "OOM" if oom else text[-1500:]}
    result = json.loads(lines[-1][7:])
    result["name"] = name
    return result


def lowtune(name: str, data: str, overrides: list[str], cap: float = 0, seq: int = SEQ, steps: int = STEPS,
            rows: int = 16, batch: int = 1, env: dict | None = None) -> dict:
    out_dir = os.path.join(WORK, "runs", name)
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = {
        "model": {"path": MODEL_DIR, "template": "default", "quantization": "nf4"},
        "data": {"train": [data], "format": "text", "max_length": seq, "packing": True},
        "lora": {"r": 64, "alpha": 16, "dropout": 0.1, "targets": "all-linear"},
        "train": {"epochs": 1, "max_steps": steps, "batch_size": batch, "grad_accum": rows // batch, "lr": 2e-4,
                  "save_every": 10**6, "save_limit": 1, "log_every": 1},
        "eval": {"prompts": []}, "log": {"to": []}, "output": {"dir": out_dir},
    }
    path = os.path.join(WORK, f"{name}.json")
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    prelude = (f"import sys, torch; torch.cuda.set_per_process_memory_fraction({cap} * 2**30 / "
               "torch.cuda.get_device_properties(0).total_memory); " if cap and not SMALL else "import sys; ")
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
    code, text = run([*spy, sys.executable, "-c", code_text], env, timeout=480)
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
        return lowtune(name, data, [*overrides, "train.compile=false"], cap, seq, steps, rows, batch, env)
    plan = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("device plan:")), "")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    rows_ = [json.loads(ln) for ln in open(metrics_path)] if os.path.exists(metrics_path) else []
    steps_ = [r for r in rows_ if "loss" in r]
    if code != 0 or len(steps_) < 2:
        oom = "OutOfMemoryError" in text or "out of memory" in text
        return {"name": f"lowtune {name}", "error": "OOM" if oom else text[-2500:], "plan": plan}
    timed = steps_[1:]
    tok_s = sum(r["tokens"] for r in timed) / sum(r["step_s"] for r in timed)
    return {"name": f"lowtune {name}", "tok_per_s": round(tok_s, 1), "peak_gib": max(r["peak_mem_gb"] for r in steps_),
            "losses": [r["loss"] for r in steps_], "grad_norms": [r["grad_norm"] for r in steps_], "plan": plan,
            "seq": seq}


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


CASES = {"a": case_a, "b": case_b, "c": case_c, "d": case_d, "e": case_e, "b*": case_b_variants, "g": case_g,
         "p": case_p, "q": case_q, "r": case_r, "m": case_m}


def table(results: list) -> str:
    lines = [f"{'case':<4} {'run':<34} {'tok/s':>8} {'MFU':>6} {'peak GiB':>9}  notes"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['case']:<4} {r['name']:<34} {'-':>8} {'-':>6} {'-':>9}  {r['error'][:60]!r}")
            continue
        mfu = r["tok_per_s"] * flops_per_token(r.get("seq", SEQ)) / 790e12
        notes = f"loss {r['losses'][0]}->{r['losses'][-1]}, grad norm {r['grad_norms'][-1]}"
        lines.append(f"{r['case']:<4} {r['name']:<34} {r['tok_per_s']:>8.0f} {100 * mfu:>5.1f}% "
                     f"{r['peak_gib']:>9.2f}  {notes}")
        if r.get("plan"):
            lines.append(f"{'':<40}{r['plan']}")
    return "\n".join(lines)


def main() -> None:
    os.makedirs(WORK, exist_ok=True)
    import torch
    import transformers
    print(f"{time.strftime('%Y-%m-%d %H:%M')} torch {torch.__version__} transformers {transformers.__version__} "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}", flush=True)
    started = time.time()
    make_model_dir()
    print(f"model ready in {time.time() - started:.0f}s", flush=True)
    results: list = []
    for case in (sys.argv[1] if len(sys.argv) > 1 else "a,b,c,d,e").split(","):
        print(f"case {case}", flush=True)
        CASES[case](results)
        print(table([r for r in results if r["case"] == case]), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"bench_{int(time.time())}.json"), "w") as fh:
            json.dump(results, fh, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
