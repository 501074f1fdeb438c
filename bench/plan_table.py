"""The planner's pick per card size, forecast only (no GPU): 7B/8B QLoRA and bf16 LoRA r64 at 2048, 16 rows per step,
80% of the card as free memory for an uncalibrated forecast, the shipped measured peaks for calibration.

    python bench/plan_table.py        # markdown table; compare with bench_train.py sweep on a GPU
"""

from lowtune.models.calibration import load_calibration
from lowtune.models.memory import GIB, KNOWN_SHAPES, USABLE_SHARE, Shape, matmul_tflops, mode_name, plan_memory

SHAPES = {
    "Llama-2-7B": Shape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
    "Llama-3.1-8B": KNOWN_SHAPES["meta-llama-3-8b-instruct"],
    "InternLM-Chat-7B": KNOWN_SHAPES["internlm-chat-7b"],
}
CARDS = [(8, "H100"), (24, "H100"), (48, "H100"), (80, "H100"), (141, "H200")]


def main() -> None:
    calibration = load_calibration()
    print("| model | weights | card GiB | plan | forecast peak GiB | limit GiB | forecast tok/s | calibration |")
    print("|---|---|---:|---|---:|---:|---:|---|")
    for name, shape in SHAPES.items():
        for quant in ("nf4", "none"):
            for card, gpu in CARDS:
                plan = plan_memory(shape, capacity_bytes=int(USABLE_SHARE * card * GIB), seq_len=2048,
                                   rows_per_step=16, quantization=quant, lora_r=64, calibration=calibration,
                                   tflops=matmul_tflops(gpu) or 750)
                text = f"mb {plan.micro_batch}, {mode_name(plan.checkpointing, plan.offload)}, {plan.optimizer}"
                print(f"| {name} | {quant} | {card} | {text if plan.fits else 'does not fit'} | "
                      f"{plan.peak_bytes / GIB:.1f} | {plan.limit_bytes / GIB:.1f} | {plan.tokens_per_s:,.0f} | "
                      f"{plan.calibration.split(':')[-1].strip() or 'none'} |")


if __name__ == "__main__":
    main()
