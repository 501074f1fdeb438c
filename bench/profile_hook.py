"""Imported before `lowtune train` when bench_train.py runs a case with PROFILE=N: torch.profiler records the
N-th optimizer step (after compilation and warm-up) and prints where the GPU time went, by kernel and by kind."""

import os
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from lowtune.train import loop

PROFILED_STEP = int(os.environ["PROFILE"])
KINDS = [("matmul", ("gemm", "cutlass", "sm90", "sm100", "nvjet", "cublas")), ("4-bit dequantize", ("dequant",)),
         ("attention", ("flash", "fmha", "attention")), ("copies host<->device", ("memcpy",)),
         ("compiled (triton)", ("triton",)), ("liger", ("liger", "_kernel"))]
_plain_step = loop.train_step
_sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
_calls = [0]


def _kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KINDS if any(k in lowered for k in keys)), "other")


def _report(prof: profile, wall: float) -> None:
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in events) / 1e6
    by_kind: dict[str, float] = {}
    for e in events:
        by_kind[_kind(e.key)] = by_kind.get(_kind(e.key), 0.0) + e.self_device_time_total / 1e6
    print(f"PROFILE step wall {wall:.3f}s, GPU kernels {busy:.3f}s ({100 * busy / wall:.0f}% busy)", flush=True)
    for kind, seconds in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"PROFILE   {kind:<24} {seconds:7.3f}s {100 * seconds / wall:5.1f}% of the step", flush=True)
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]:
        print(f"PROFILE     {e.self_device_time_total / 1e3:9.1f} ms {e.count:6d}x  {e.key[:110]}", flush=True)
    cpu = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    for e in cpu:
        print(f"PROFILE cpu {e.self_cpu_time_total / 1e3:9.1f} ms {e.count:6d}x  {e.key[:100]}", flush=True)


def profiled_step(*args, **kwargs):
    _calls[0] += 1
    if _calls[0] != PROFILED_STEP:
        return _plain_step(*args, **kwargs)
    _sync()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out = _plain_step(*args, **kwargs)
        _sync()
    _report(prof, time.perf_counter() - started)
    return out


loop.train_step = profiled_step
