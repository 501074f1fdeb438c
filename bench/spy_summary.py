"""Summarise a py-spy raw profile (`py-spy record --format raw`) of `lowtune train`: where the host spends the
training steps, by function, inclusive and self. Samples count when a stack holds one of the step frames (the
main thread's step, or the autograd thread's backward and recomputation) and none of compilation or loading.

    python bench/spy_summary.py RUN.spy [TOP=40]
"""

import sys
from collections import Counter

STEP_FRAMES = ("train_step", "CompiledFunction.backward", "unpack_hook")
NOT_STEP = ("convert_frame", "importlib", "_bootstrap", "from_pretrained", "compile_fx", "inductor/codecache",
            "async_compile", "triton/compiler", "benchmark", "Autotuner")


def main() -> None:
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    inclusive, leaf, total = Counter(), Counter(), 0
    for line in open(path, encoding="utf-8", errors="replace"):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not any(f in stack for f in STEP_FRAMES) or any(f in stack for f in NOT_STEP):
            continue
        frames = stack.split(";")
        n = int(count)
        total += n
        leaf[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    print(f"{total} samples in training steps")
    print("inclusive:")
    for frame, n in inclusive.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {frame[:150]}")
    print("self:")
    for frame, n in leaf.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {frame[:150]}")


if __name__ == "__main__":
    main()
