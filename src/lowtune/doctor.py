"""`lowtune doctor`: what this machine can do, in one table to paste into a bug report.

Top layer (beside cli): reads versions, devices, a 4-bit self-test, hub reachability and offline variables.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata

PACKAGES = [  # (distribution, extra that installs it or "" for core)
    ("torch", ""), ("transformers", ""), ("peft", ""), ("accelerate", ""), ("safetensors", ""),
    ("huggingface_hub", ""), ("tokenizers", ""), ("bitsandbytes", "qlora"), ("liger-kernel", "kernels"),
    ("gradio", "web"), ("fastapi", "serve"), ("uvicorn", "serve"), ("modelscope", "hub"), ("pandas", "xlsx"),
    ("openpyxl", "xlsx"), ("datasets", "datasets"), ("tensorboard", "tensorboard"),
]
TUTORIAL_RECIPE = "internlm-chat-7b-qlora-medqa"
ENV_VARS = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "HF_HOME",
            "MODELSCOPE_CACHE", "MODELSCOPE_DOMAIN", "CUDA_VISIBLE_DEVICES", "LOWTUNE_HOME"]


def package_rows() -> list[tuple[str, str]]:
    rows = []
    for dist, extra in PACKAGES:
        try:
            rows.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            hint = f"not installed (pip install 'lowtune[{extra}]')" if extra else "MISSING (core dependency)"
            rows.append((dist, hint))
    return rows


def device_rows() -> list[tuple[str, str]]:
    import torch

    rows = [("torch build", f"{torch.__version__}, CUDA {torch.version.cuda or 'none'}")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            bf16 = "bf16 yes" if torch.cuda.is_bf16_supported() else "bf16 no (training uses fp16)"
            rows.append((f"cuda:{i}", f"{props.name}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} free), "
                                      f"sm_{props.major}{props.minor}, {bf16}"))
        rows.append(("fast path", fast_path_summary()))
        rows.append(("tutorial run", tutorial_fit(torch.cuda.get_device_name(0))))
    else:
        rows.append(("GPU", f"none: CPU only ({os.cpu_count()} cores); tiny models and the demo run here"))
    return rows


def fast_path_summary() -> str:
    """What `train` will use on this GPU: padding-free packed rows and compiled layers, or why not."""
    from lowtune.kernels.attention import varlen_available
    from lowtune.train.plan import triton_supported

    rows = "packed rows on varlen FlashAttention" if varlen_available() else \
        "padded rows (varlen attention needs torch 2.10+ and an Ampere or newer GPU)"
    layers = "compiled layers" if triton_supported() else "eager layers (torch.compile needs compute capability 7.0+)"
    return f"{rows}; {layers}"


def tutorial_fit(gpu_name: str, capacity: int | None = None) -> str:
    """Whether the tutorial's recipe (QLoRA InternLM-Chat-7B on MedQA, 2048 tokens) trains on this GPU."""
    from lowtune.config import load_config
    from lowtune.models.memory import KNOWN_SHAPES
    from lowtune.train.estimate import fit_summary
    from lowtune.train.plan import gpu_capacity_bytes

    capacity = gpu_capacity_bytes() if capacity is None else capacity
    summary = fit_summary(load_config(TUTORIAL_RECIPE), KNOWN_SHAPES["internlm-chat-7b"], capacity, gpu_name)
    return f"{TUTORIAL_RECIPE} {summary}"


def quant_selftest() -> str:
    """Quantise a random matrix to NF4 and back with bitsandbytes; report the round-trip error."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional-kernel notices are not failures
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return "skipped: bitsandbytes not installed (pip install 'lowtune[qlora]')"
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        weight = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)).to(device, torch.float16)
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
        restored = bnbf.dequantize_4bit(packed, state)
        rel = ((restored.float() - weight.float()).norm() / weight.float().norm()).item()
    except Exception as exc:  # report, never crash the doctor
        return f"FAILED on {device}: {type(exc).__name__}: {exc}"
    verdict = "ok" if rel < 0.15 else "SUSPICIOUS"
    return f"{verdict}: NF4 round trip on {device}, relative error {rel:.3f}"


def _probe(url: str, timeout: float) -> str:
    start = time.perf_counter()
    try:
        request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "lowtune-doctor"})
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # the server answered: reachable
    except Exception as exc:
        reason = getattr(exc, "reason", exc)
        names = {"gaierror": "DNS lookup failed", "timeout": "timed out", "TimeoutError": "timed out",
                 "ConnectionRefusedError": "connection refused", "SSLError": "TLS error"}
        return f"unreachable ({names.get(type(reason).__name__, str(reason))})"
    return f"reachable ({(time.perf_counter() - start) * 1000:.0f} ms)"


def hub_rows(timeout: float) -> list[tuple[str, str]]:
    hubs = {
        "Hugging Face": os.environ.get("HF_ENDPOINT", "https://huggingface.co"),
        "ModelScope": os.environ.get("MODELSCOPE_DOMAIN", "https://www.modelscope.cn"),
    }
    if not hubs["ModelScope"].startswith("http"):
        hubs["ModelScope"] = "https://" + hubs["ModelScope"]
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")
    with ThreadPoolExecutor(len(hubs)) as pool:
        results = {name: pool.submit(_probe, url, timeout) for name, url in hubs.items()
                   if not (offline and name == "Hugging Face")}
    rows = []
    for name, url in hubs.items():
        status = results[name].result() if name in results else "skipped (HF_HUB_OFFLINE is set)"
        rows.append((f"{name}", f"{url}: {status}"))
    return rows


def run_doctor(timeout: float = 3.0) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from lowtune import __version__

    table = Table(title="lowtune doctor", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()

    def section(title: str, rows: list[tuple[str, str]]) -> None:
        table.add_row(f"[cyan]{title}[/cyan]", "")
        for key, value in rows:
            table.add_row(f"  {escape(key)}", escape(value))

    section("system", [("lowtune", __version__), ("python", sys.version.split()[0]),
                       ("platform", platform.platform())])
    section("packages", package_rows())
    section("devices", device_rows())
    section("4-bit self-test", [("bitsandbytes", quant_selftest())])
    section("hubs", hub_rows(timeout))
    section("environment", [(name, os.environ.get(name, "-")) for name in ENV_VARS])
    Console(width=max(100, Console().width)).print(table)
    return 0
