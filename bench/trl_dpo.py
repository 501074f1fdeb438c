"""TRL's DPOTrainer, as users run it, on the same model, pairs, LoRA and batch as bench_train.py's `dpo` case.

Run by bench/bench_train.py in its own subprocess:

    python bench/trl_dpo.py PAIRS.jsonl
    env: MODEL_DIR, VARIANT (qlora | lora), R (LoRA rank, 16), BS (pairs per micro-batch), ACCUM (8),
         GC (1 = gradient checkpointing), STEPS (timed optimizer steps), WARMUP, CAP_GIB, MAX_LENGTH (per side);
         the model, its LoRA and the shared settings are bench/hf_baseline.py's

Prints `RESULT {json}`: tokens/s over the timed optimizer steps (chosen + rejected tokens of every pair, prompt
counted on both sides as both sides go through the model), the peak allocated GiB and the logged losses.
The reference model is the base with the adapter off (TRL's default for a PEFT model), as in lowtune.
"""

import json
import os
import sys
import time

from hf_baseline import BS, CAP_GIB, GC, MODEL_DIR, STEPS, WARMUP, load

VARIANT = os.environ.get("VARIANT", "qlora")
R = int(os.environ.get("R", 16))
ACCUM = int(os.environ.get("ACCUM", 8))
MAX_LENGTH = int(os.environ.get("MAX_LENGTH", 2048))


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
    model = load(VARIANT, r=R, alpha=2 * R, dropout=0.05)
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
    result = dict(variant=f"TRL DPOTrainer bs{BS}x{ACCUM}{' ckpt' if GC else ''}", model=VARIANT, r=R,
                  cap_gib=CAP_GIB or None, tok_per_s=round(tokens / sum(timed), 1),
                  step_s=round(sorted(timed)[len(timed) // 2], 3),
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                  tokens_per_pair=per_pair[0], losses=losses, grad_norms=grad_norms)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
