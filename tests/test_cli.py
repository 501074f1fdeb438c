import subprocess
import sys

import pytest

from lowtune.cli import main
from lowtune.config import load_config


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lowtune.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys; from lowtune.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'accelerate', 'gradio', 'pydantic') "
            "if m in sys.modules]\nassert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "doctor" in result.stdout


def test_list_shows_recipes_and_filters(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 5 and "tiny-self" in out
    assert main(["list", "medqa"]) == 0
    assert capsys.readouterr().out.strip().startswith("internlm-chat-7b-qlora-medqa")


def test_copy_writes_a_valid_config(tmp_path, capsys):
    dest = tmp_path / "my.yaml"
    assert main(["copy", "internlm-chat-7b-qlora-medqa", str(dest)]) == 0
    assert load_config(str(dest)).model.quantization == "nf4"
    assert main(["copy", "internlm-chat-7b-qlora-medqa", str(dest)]) == 2  # no silent overwrite
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["list", "zzz"], "no recipe matches"),
    (["copy", "medqa-typo"], "no recipe named"),
])
def test_user_errors_exit_2_with_one_line(args, message, tmp_path):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_doctor_prints_its_table_and_exits_0():
    result = run_cli("doctor", "--timeout", "1")
    assert result.returncode == 0, result.stderr
    for word in ("torch", "transformers", "4-bit", "Hugging Face", "ModelScope", "HF_HUB_OFFLINE"):
        assert word in result.stdout


def test_doctor_says_which_fast_path_a_gpu_gets(monkeypatch):
    import torch

    from lowtune.doctor import fast_path_summary

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (8, 6))
    assert fast_path_summary() == "packed rows on varlen FlashAttention; compiled layers"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (6, 1))
    assert fast_path_summary() == ("padded rows (varlen attention needs torch 2.10+ and an Ampere or newer GPU); "
                                   "eager layers (torch.compile needs compute capability 7.0+)")


def test_doctor_says_whether_the_tutorial_run_fits_this_gpu():
    from lowtune.doctor import tutorial_fit

    eight_gib = tutorial_fit("NVIDIA H200", capacity=int(0.8 * 8 * 2**30))  # an 8 GiB card's usable share
    # the fastest plan that fits, not the smallest micro-batch: micro-batch 2 measured 8,146 tok/s at a 6.36 GiB peak
    # under an 8 GiB cap, micro-batch 1 4,673 tok/s (bench/RESULTS.md, issue 18)
    assert eight_gib.startswith("internlm-chat-7b-qlora-medqa fits: micro-batch 2, checkpointing + offload")
    assert "about 7," in eight_gib
    too_small = tutorial_fit("GPU", int(0.8 * 4 * 2**30))
    assert "does not fit (forecast peak 5." in too_small and "of 3.2 GiB usable): try " in too_small
    assert "tokens/s" not in tutorial_fit("Some Unknown GPU", int(0.8 * 8 * 2**30))  # no guess without a rate
