"""TRL's DPOTrainer, as users run it, on the same model, pairs, LoRA and batch as bench_train.py's `dpo` case.

Run by bench/bench_train.py in its own subprocess:

    python bench/trl_dpo.py PAIRS.jsonl
    env: MODEL_DIR, QUANT (nf4 | none), R (LoRA rank, 16), BS (pairs per micro-batch, 1), ACCUM (8),
         GC (1 = gradient checkpointing), STEPS (timed optimizer steps, 3), WARMUP (1), CAP_GIB, MAX_LENGTH (per side)

Prints `RESULT {json}`: tokens/s over the timed optimizer steps (chosen + rejected tokens of every pair, prompt
counted on both sides as both sides go through the model), the peak allocated GiB and the logged losses.
The reference model is the base with the adapter off (TRL's default for a PEFT model), as in lowtune.
"""

import json
import os
import sys
import time

MODEL_DIR = os.environ["MODEL_DIR"]
QUANT = os.environ.get("QUANT", "nf4")
R = int(os.environ.get("R", 16))
BS = int(os.environ.get("BS", 1))
ACCUM = int(os.environ.get("ACCUM", 8))
GC = os.environ.get("GC", "1") == "1"
STEPS = int(os.environ.get("STEPS", 3))
WARMUP = int(os.environ.get("WARMUP", 1))
CAP_GIB = float(os.environ.get("CAP_GIB", 0))
MAX_LENGTH = int(os.environ.get("MAX_LENGTH", 2048))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_model():
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    kwargs = dict(dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="sdpa")
    if cuda:
        kwargs["device_map"] = {"": 0}
    if QUANT == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, **kwargs)
    if QUANT == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=GC)
    config = LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                        target_modules=TARGETS)
    return get_peft_model(model, config)


def pair_tokens(tokenizer, pairs: list[dict]) -> list[int]:
    """Tokens one pair puts through the model: prompt + chosen + EOS, then prompt + rejected + EOS."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [2 * count(p["prompt"]) + count(p["chosen"]) + count(p["rejected"]) + 2 for p in pairs]


def as_dataset(pairs: list[dict]):
    """A `datasets.Dataset` of the pairs. Some datasets/pyarrow/dill combinations cannot hash a new table for its
    cache fingerprint (PicklingError on pyarrow's MonthDayNano); the bench then gives it a random fingerprint,
    which only turns off datasets' on-disk cache."""
    import pickle
    import uuid

    import datasets.arrow_dataset
    from datasets import Dataset

    try:
        return Dataset.from_list(pairs)
    except pickle.PicklingError as exc:
        print(f"datasets cannot fingerprint the table ({exc}); using a random fingerprint", flush=True)
        datasets.arrow_dataset.generate_fingerprint = lambda dataset: uuid.uuid4().hex
        return Dataset.from_list(pairs)


def main(pairs_path: str) -> None:
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cuda = torch.cuda.is_available()
    if CAP_GIB and cuda:
        torch.cuda.set_per_process_memory_fraction(CAP_GIB * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    pairs = [json.loads(line) for line in open(pairs_path, encoding="utf-8")]
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    per_pair = pair_tokens(tokenizer, pairs)
    model = load_model()
    step_times: list[float] = []
    losses: list[float] = []
    grad_norms: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.started)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(round(float(logs["loss"]), 4))
                grad_norms.append(round(float(logs.get("grad_norm", float("nan"))), 4))

    args = DPOConfig(
        output_dir=os.path.join(os.environ.get("WORK", "/tmp"), "trl_dpo_out"), per_device_train_batch_size=BS,
        gradient_accumulation_steps=ACCUM, max_steps=WARMUP + STEPS, learning_rate=5e-6, beta=0.1,
        lr_scheduler_type="constant", bf16=cuda, use_cpu=not cuda, gradient_checkpointing=GC,
        gradient_checkpointing_kwargs={"use_reentrant": False}, max_length=MAX_LENGTH, logging_steps=1,
        save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=as_dataset(pairs), processing_class=tokenizer,
                         callbacks=[Clock()])
    trainer.train()
    timed = step_times[WARMUP:]
    pairs_per_step = BS * ACCUM
    tokens = sum(per_pair[: pairs_per_step]) * len(timed)  # every pair has the same length in the bench's file
    result = dict(variant=f"TRL DPOTrainer bs{BS}x{ACCUM}{' ckpt' if GC else ''}", quant=QUANT, r=R,
                  cap_gib=CAP_GIB or None, tok_per_s=round(tokens / sum(timed), 1),
                  step_s=round(sorted(timed)[len(timed) // 2], 3),
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                  tokens_per_pair=per_pair[0], losses=losses, grad_norms=grad_norms)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
