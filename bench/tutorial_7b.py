"""The tutorial's own run at full size: InternLM-Chat-7B (v1, the release's on-disk layout: fp16 .bin shards,
remote-code config, 103168-piece sentencepiece tokenizer; random weights) QLoRA-trained on MedQA by the shipped
recipe, under an 8 GiB memory cap, exactly as a user types it:

    lowtune copy internlm-chat-7b-qlora-medqa medqa.yaml
    lowtune estimate medqa.yaml model.path=models/internlm-chat-7b --gpu-memory 8
    lowtune train medqa.yaml model.path=models/internlm-chat-7b train.max_steps=STEPS

    python bench/tutorial_7b.py DATA_DIR     # DATA_DIR holds medqa.train.jsonl and medqa.test.jsonl
                                             # (lowtune data convert + data split of the tutorial's workbook)
env: WORK (default /dev/shm/lowtune_tutorial), STEPS (default 4), CAP_GIB (default 8), SMALL=1 (a 2-layer model of
the same layout on CPU, no cap: checks the plumbing), EXTRA (more train overrides, space-separated).
Prints the forecast, the device plan, the conversion time, tokens/s per step and the measured peak beside the
plan's forecast peak (JSON, last line).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = Path(os.environ.get("WORK", "/dev/shm/lowtune_tutorial"))
STEPS = int(os.environ.get("STEPS", 4))
SMALL = os.environ.get("SMALL") == "1"
CAP = 0 if SMALL else float(os.environ.get("CAP_GIB", 8))
SHAPE = dict(hidden=64, layers=2, heads=4, intermediate=128, shards=2) if SMALL else \
    dict(hidden=4096, layers=32, heads=32, intermediate=11008, shards=8)


def fabricate(model_dir: Path) -> None:
    if (model_dir / "config.json").is_file():
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from fakes.checkpoints import make_internlm_v1_checkpoint

    started = time.time()
    make_internlm_v1_checkpoint(model_dir, bias=True, max_positions=2048, dtype="float16", **SHAPE)
    print(f"fabricated {model_dir} in {time.time() - started:.0f}s", flush=True)


def lowtune(args: list[str], cap: float = 0) -> tuple[int, str]:
    prelude = (f"import torch; torch.cuda.set_per_process_memory_fraction({cap} * 2**30 / "
               "torch.cuda.get_device_properties(0).total_memory); " if cap else "")
    code = prelude + f"import sys; from lowtune.cli import main; sys.exit(main({args!r}))"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=WORK, env=env)
    print(f"$ lowtune {' '.join(args)}  (rc {proc.returncode}, {time.time() - started:.0f}s)", flush=True)
    return proc.returncode, proc.stdout + proc.stderr


def main() -> None:
    data_dir = Path(sys.argv[1]).resolve()
    WORK.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LOWTUNE_HOME", str(WORK / "home"))
    (WORK / "data").mkdir(exist_ok=True)
    for name in ("medqa.train.jsonl", "medqa.test.jsonl"):
        shutil.copy(data_dir / name, WORK / "data" / name)
    fabricate(WORK / "models" / "internlm-chat-7b")
    shutil.rmtree(WORK / "runs", ignore_errors=True)
    model = "model.path=models/internlm-chat-7b"
    for args, cap in [(["copy", "internlm-chat-7b-qlora-medqa", "medqa.yaml", "--force"], 0),
                      (["estimate", "medqa.yaml", model, "--gpu-memory", str(CAP or 8)], 0),
                      (["train", "medqa.yaml", model, f"train.max_steps={STEPS}", "eval.max_new_tokens=24",
                        *os.environ.get("EXTRA", "").split()], CAP)]:
        code, text = lowtune(args, cap)
        print(text[-6000:] if code or args[0] != "copy" else "", flush=True)
        if code:
            sys.exit(code)
    forecast = re.search(r"forecast peak ([\d.]+) GiB", text)  # the train run's plan line
    metrics = [json.loads(line) for line in open(WORK / "runs" / "medqa" / "metrics.jsonl")]
    steps = [row for row in metrics if "loss" in row]
    timed = steps[1:]
    print(json.dumps({"tok_per_s": sum(r["tokens"] for r in timed) / sum(r["step_s"] for r in timed),
                      "peak_gib": max(r["peak_mem_gb"] for r in steps),
                      "forecast_gib": float(forecast.group(1)) if forecast else None, "losses": [r["loss"] for r in steps],
                      "grad_norms": [r["grad_norm"] for r in steps]}), flush=True)


if __name__ == "__main__":
    main()
