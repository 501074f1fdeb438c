"""`lowtune upload` with the real `huggingface_hub` and `modelscope` clients against a local fake hub on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml
from fakes.upload_hub import UploadHub
from test_engine_fixtures import copy_run, identity_run  # noqa: F401

from lowtune.cli import main
from lowtune.export.card import MODELSCOPE_CONFIGURATION, read_front_matter
from lowtune.export.upload import human_size

TOKEN = "hf_secret_token_123"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake hub, with both clients pointed at it through their own variables, and no saved login in the way."""
    from huggingface_hub import constants

    with UploadHub(token=TOKEN) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", fake.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("MODELSCOPE_API_TOKEN", raising=False)
        monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms-home"))
        monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-cache"))
        # huggingface_hub reads these two once, at import (conftest set the offline flag for every other test)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the classic LFS protocol, which the fake speaks
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        yield fake


@pytest.fixture
def merged(micro_dir, tmp_path) -> Path:
    folder = tmp_path / "merged"
    shutil.copytree(micro_dir, folder)
    return folder


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


def test_dry_run_lists_every_file_and_touches_nothing(hub, merged, capsys):
    before = local_files(merged)
    assert main(["upload", str(merged), "--to", "hf", "--repo", "me/micro", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would upload model {merged} -> Hugging Face me/micro (public) at {hub.url}" in out
    assert "would write README.md" in out
    for name, data in before.items():  # every file, with its size
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name + " "))
        assert line.rstrip().endswith(human_size(len(data))), line
    assert f"{len(before) + 1} files" in out  # + the card it would write
    assert "dry run: nothing was written or uploaded" in out
    assert local_files(merged) == before and hub.requests == []

    assert main(["upload", str(merged), "--to", "modelscope", "--repo", "me/micro", "--private", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"-> ModelScope me/micro (private) at {hub.url}" in out and "would write configuration.json" in out
    assert local_files(merged) == before and hub.requests == []


def test_hf_upload_of_a_merged_model(hub, merged, capsys):
    assert main(["upload", str(merged), "--to", "hf", "--repo", "me/micro", "--private", "--token", TOKEN]) == 0
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err
    arrived = hub.repos["me/micro"]
    assert arrived == local_files(merged)  # byte for byte, the card it wrote included
    assert hub.private["me/micro"] is True
    assert "me/micro/model.safetensors" in hub.lfs_paths  # weights go through LFS, small text files inline
    assert "me/micro/config.json" not in hub.lfs_paths
    meta = yaml.safe_load(arrived["README.md"].decode().split("---\n")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert all(r.header("Authorization") == f"Bearer {TOKEN}" for r in hub.requests
               if r.path.startswith("/api/repos") or "/commit/" in r.path)
    # again: the repo exists (409 from create is fine), the card is kept
    assert main(["upload", str(merged), "--to", "hf", "--repo", "me/micro", "--token", TOKEN]) == 0
    assert "front matter is complete" in capsys.readouterr().out


def test_hf_token_from_the_environment_or_a_clear_error(hub, merged, monkeypatch, capsys):
    assert main(["upload", str(merged), "--to", "hf", "--repo", "me/a"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert main(["upload", str(merged), "--to", "hf", "--repo", "me/a"]) == 2
    err = capsys.readouterr().err
    assert "refused the token" in err and "hf_wrong" not in err
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["upload", str(merged), "--to", "hf", "--repo", "me/a"]) == 0
    assert "config.json" in hub.repos["me/a"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["upload", str(merged), "--to", "hf", "--repo", "me/a"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_modelscope_upload_of_a_run_writes_configuration_and_fixes_the_card(hub, identity_run, tmp_path, capsys,
                                                                          monkeypatch):
    run = copy_run(identity_run, tmp_path / "identity")
    peft_card = read_front_matter(run / "adapter" / "README.md")
    assert Path(peft_card["base_model"]).is_absolute()  # peft wrote the local path of the base
    assert main(["upload", str(run), "--to", "modelscope", "--repo", "me/lowbot", "--token", TOKEN]) == 0
    out = capsys.readouterr().out
    assert f"uploading adapter {run / 'adapter'} -> ModelScope me/lowbot (public)" in out
    assert "removed base_model" in out
    arrived = hub.repos["me/lowbot"]
    assert {"adapter_config.json", "adapter_model.safetensors", "configuration.json", "README.md",
            "chat_template.jinja"} <= set(arrived)
    assert json.loads(arrived["configuration.json"]) == MODELSCOPE_CONFIGURATION
    assert arrived["adapter_model.safetensors"] == (run / "adapter" / "adapter_model.safetensors").read_bytes()
    meta = yaml.safe_load(arrived["README.md"].decode().split("---\n")[1])
    assert meta["library_name"] == "peft" and "base_model" not in meta and "lowtune" in meta["tags"]
    assert not any(str(t).startswith("base_model:") for t in meta["tags"])
    assert "# Model Card" in arrived["README.md"].decode()  # peft's card body is kept
    assert hub.private["me/lowbot"] is False
    # the token from the client's own variable
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", TOKEN)
    assert main(["upload", str(run), "--to", "modelscope", "--repo", "me/lowbot2"]) == 0
    assert "adapter_model.safetensors" in hub.repos["me/lowbot2"]
    monkeypatch.delenv("MODELSCOPE_API_TOKEN")
    capsys.readouterr()
    # a token the hub refuses: one line that says what to do, and never the token
    assert main(["upload", str(run), "--to", "modelscope", "--repo", "me/other", "--token", "ms-wrong"]) == 2
    err = capsys.readouterr().err
    assert "ModelScope refused the token" in err and "MODELSCOPE_API_TOKEN" in err and "ms-wrong" not in err
    assert any(r.header("Authorization") == f"Bearer {TOKEN}" for r in hub.requests if "/commit/" in r.path)


def test_openxlab_writes_the_metafile_and_prints_the_steps(hub, merged, capsys):
    assert importlib.util.find_spec("openxlab") is None  # its old pins never enter lowtune's environment
    assert main(["upload", str(merged), "--to", "openxlab", "--repo", "me/micro", "--private"]) == 0
    out = capsys.readouterr().out
    assert "openxlab model create --model-repo 'me/micro' -s ./metafile.yml --private True" in out
    assert "pip install -U openxlab" in out and "openxlab login" in out
    meta = yaml.safe_load((merged / "metafile.yml").read_text())
    names = {m["Name"] for m in meta["Models"]}
    assert names == set(local_files(merged)) - {"metafile.yml"}
    assert all(m["Weights"] == m["Name"] and m["Results"][0]["Task"] for m in meta["Models"])
    assert meta["Collections"][0]["Name"] == "micro" and meta["Collections"][0]["Code"]["URL"]
    assert hub.requests == []


def test_an_unreachable_hub_leaves_the_folder_as_it_was(hub, identity_run, tmp_path, capsys, monkeypatch):
    from fakes.loopback import free_port

    run = copy_run(identity_run, tmp_path / "identity")
    before = {p.name: p.read_bytes() for p in (run / "adapter").iterdir() if p.is_file()}
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert main(["upload", str(run), "--to", "modelscope", "--repo", "me/x", "--token", TOKEN]) == 2
    assert "nothing was written or uploaded" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (run / "adapter").iterdir() if p.is_file()} == before


def test_bad_arguments_name_the_fix(hub, merged, tmp_path, capsys):
    assert main(["upload", str(merged), "--to", "hf", "--repo", "no-owner", "--dry-run"]) == 2
    assert "--repo 'no-owner' must look like owner/name" in capsys.readouterr().err
    assert main(["upload", str(tmp_path / "missing"), "--to", "hf", "--repo", "me/x", "--dry-run"]) == 2
    assert "missing: no such folder" in capsys.readouterr().err


def test_cards_are_completed_not_replaced(hub, merged, capsys):
    (merged / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: /home/me/models/base\n---\n\n# Mine\n")
    assert main(["upload", str(merged), "--to", "hf", "--repo", "me/c", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would complete README.md front matter" in out and "removed base_model '/home/me/models/base'" in out
    assert "base_model: /home/me" in (merged / "README.md").read_text()  # dry run: untouched
    assert main(["upload", str(merged), "--to", "hf", "--repo", "me/c", "--token", TOKEN]) == 0
    card = hub.repos["me/c"]["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta == {"license": "apache-2.0", "library_name": "transformers", "pipeline_tag": "text-generation",
                    "tags": ["lowtune"]}
    assert card.endswith("# Mine\n")  # the body is the user's
    (merged / "README.md").write_text("---\nlicense: [unclosed\n---\nbody\n")
    assert main(["upload", str(merged), "--to", "hf", "--repo", "me/c", "--dry-run"]) == 2
    assert "README.md: the front matter between the '---' lines is not valid YAML" in capsys.readouterr().err
