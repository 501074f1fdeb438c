"""Offline (issue 19): with local paths and HF_HUB_OFFLINE=1, convert -> train -> merge -> chat -> export opens no
network connection and resolves no host name. A guard replaces the socket layer's connect and name lookup for the
whole test, records every attempt and refuses it; the test fails on any record."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest
import yaml

from lowtune.cli import main

INET = (socket.AF_INET, socket.AF_INET6)


class NetworkGuard:
    """Every connect/lookup attempt, refused and recorded as 'what (where)'."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.attempts: list[str] = []
        real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

        def refuse(what: str) -> OSError:
            self.attempts.append(what)
            return OSError(f"network call during an offline test: {what}")

        def connect(sock, address):
            if sock.family in INET:
                raise refuse(f"connect {address}")
            return real_connect(sock, address)

        def connect_ex(sock, address):
            if sock.family in INET:
                raise refuse(f"connect_ex {address}")
            return real_connect_ex(sock, address)

        def lookup(host, *args, **kwargs):
            raise refuse(f"getaddrinfo {host}")

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
        monkeypatch.setattr(socket, "getaddrinfo", lookup)
        monkeypatch.setattr(socket, "gethostbyname", lookup)


@pytest.fixture
def guard(monkeypatch) -> NetworkGuard:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return NetworkGuard(monkeypatch)


def test_the_guard_sees_and_refuses_a_connection(guard):
    with pytest.raises(OSError):
        urllib.request.urlopen("http://example.com/", timeout=2)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", 9), timeout=2)
    assert len(guard.attempts) == 2 and "example.com" in guard.attempts[0]


def run(*argv: str) -> None:
    assert main(list(argv)) == 0, argv


@pytest.mark.slow
def test_convert_train_merge_chat_export_make_no_network_call(guard, micro_dir, tmp_path, capsys):
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"instruction": f"Who are you {i}?", "output": "I am Lumi."}) + "\n"
                           for i in range(8)), encoding="utf-8")
    run("data", "convert", str(raw), "-o", str(tmp_path / "train.jsonl"))
    config = {"model": {"path": str(micro_dir), "quantization": "none"},
              "data": {"train": str(tmp_path / "train.jsonl"), "max_length": 64},
              "lora": {"r": 4, "alpha": 8}, "train": {"max_steps": 3, "batch_size": 2, "save_every": 2},
              "eval": {"every": 100, "prompts": []}, "log": {"to": []}, "output": {"dir": str(tmp_path / "run")}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    run("train", str(tmp_path / "cfg.yaml"))
    run("merge", str(tmp_path / "run"), "-o", str(tmp_path / "merged"))
    run("chat", str(tmp_path / "merged"), "--prompt", "Who are you?", "--max-new-tokens", "4")
    run("export", str(tmp_path / "run"), "--format", "gguf", "-o", str(tmp_path / "gguf"))
    assert list((tmp_path / "gguf").glob("*.gguf")) and (tmp_path / "merged" / "config.json").is_file()
    assert guard.attempts == []
    capsys.readouterr()


def test_a_hub_id_offline_is_one_line_and_makes_no_call(guard, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["chat", "someone/not-cached-model", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "HF_HUB_OFFLINE=1" in err[-1], err
    assert guard.attempts == []


def test_the_guard_catches_the_hub_clients_when_online_is_allowed(guard, tmp_path, capsys, monkeypatch):
    """Control: the same command without HF_HUB_OFFLINE reaches for the network, and the guard sees it."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert main(["chat", "someone/not-cached-model", "--prompt", "hi"]) != 0
    capsys.readouterr()
    assert guard.attempts
