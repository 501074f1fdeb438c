"""`lowtune download` through the real huggingface_hub and modelscope clients against a local fake hub."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from fakes.checkpoints import make_internlm_v1_checkpoint
from fakes.hub import FakeHub

from lowtune.cli import main
from lowtune.models.download import download
from lowtune.models.resolve import resolve_model_dir

REPO = "Shanghai_AI_Laboratory/internlm-chat-7b"
SMALL = {"config.json": b'{"model_type": "llama"}', "README.md": b"# card\n", "sub/weights.bin": os.urandom(300_000)}


def dead_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Network allowed, but only to what a test points the endpoints at; caches inside tmp_path."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MODELSCOPE_DOMAIN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", dead_url())
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", dead_url())
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return monkeypatch


@pytest.fixture(scope="module")
def internlm_repo(tmp_path_factory):
    return make_internlm_v1_checkpoint(tmp_path_factory.mktemp("repo") / "internlm-chat-7b", shards=2)


def same_tree(a, b) -> bool:
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


@pytest.mark.parametrize("hub_name, env", [("hf", "HF_ENDPOINT"), ("modelscope", "MODELSCOPE_ENDPOINT"),
                                           ("modelscope", "MODELSCOPE_DOMAIN")])
def test_fetches_a_fabricated_internlm_repo_and_it_loads_natively(online, tmp_path, internlm_repo, hub_name, env):
    from transformers import AutoModelForCausalLM

    with FakeHub() as hub:
        hub.add_repo(REPO, internlm_repo, revisions=("main", "master", "v1.0.3"))
        if env == "MODELSCOPE_DOMAIN":
            online.delenv("MODELSCOPE_ENDPOINT")
        online.setenv(env, hub.url)
        out = tmp_path / "models" / "internlm-chat-7b"
        assert main(["download", REPO, "--hub", hub_name, "--revision", "v1.0.3", "-o", str(out)]) == 0
        assert same_tree(internlm_repo, out)
        served = [r.path for r in hub.requests]
        assert any("v1.0.3" in p for p in served)
        assert any(("/api/v1/models/" if hub_name == "modelscope" else "/api/models/") in p for p in served)
    native = resolve_model_dir(str(out))  # the hub is gone: a local folder never needs it
    assert type(AutoModelForCausalLM.from_pretrained(native)).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("hub_name", ["hf", "modelscope"])
def test_an_interrupted_transfer_resumes_with_a_range_request(online, tmp_path, hub_name):
    import huggingface_hub.constants

    online.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)  # write to disk as it arrives
    data = os.urandom(2_000_000)
    with FakeHub() as hub:
        hub.add_repo("owner/big", {"config.json": b"{}", "model.bin": data})
        hub.interrupt["model.bin"] = 700_000
        online.setenv("HF_ENDPOINT" if hub_name == "hf" else "MODELSCOPE_ENDPOINT", hub.url)
        folder = download("owner/big", hub=hub_name, out_dir=tmp_path / "big")
        ranges = [r.headers.get("Range") for r in hub.requests if "model.bin" in r.path and r.method == "GET"]
    assert (folder / "model.bin").read_bytes() == data
    assert len(ranges) == 2 and ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"


def test_auto_uses_the_reachable_hub_and_moves_on_when_a_hub_lacks_the_repo(online, tmp_path):
    with FakeHub() as hf, FakeHub() as ms:
        ms.add_repo("owner/only-on-ms", SMALL)
        online.setenv("MODELSCOPE_ENDPOINT", ms.url)
        assert download("owner/only-on-ms", out_dir=tmp_path / "a").joinpath("README.md").is_file()  # hf is dead
        online.setenv("HF_ENDPOINT", hf.url)
        folder = download("owner/only-on-ms", out_dir=tmp_path / "b")  # hf answers 404, then modelscope
        assert (folder / "sub" / "weights.bin").read_bytes() == SMALL["sub/weights.bin"]
        assert any("/api/models/owner/only-on-ms" in r.path for r in hf.requests)


def test_unknown_repo_and_unreachable_hubs_are_one_line_user_errors(online, tmp_path):
    env = {k: v for k, v in os.environ.items()}
    with FakeHub() as hub:
        env.update(HF_ENDPOINT=hub.url, MODELSCOPE_ENDPOINT=hub.url)
        for hub_name in ("hf", "modelscope", "auto"):
            result = subprocess.run([sys.executable, "-m", "lowtune.cli", "download", "owner/missing", "--hub",
                                     hub_name, "-o", str(tmp_path / hub_name)], capture_output=True, text=True,
                                    env=env)
            assert result.returncode == 2, result.stderr
            assert "no repo 'owner/missing'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
        hub.add_repo("owner/tagged", SMALL, revisions=("main", "master"))
        assert main(["download", "owner/tagged", "--hub", "hf", "--revision", "v9", "-o", str(tmp_path / "t")]) == 2
    env.update(HF_ENDPOINT=dead_url(), MODELSCOPE_ENDPOINT=dead_url())
    result = subprocess.run([sys.executable, "-m", "lowtune.cli", "download", "owner/x"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 2 and "no hub reachable" in result.stderr
    for hub_name in ("hf", "modelscope"):  # the hub asked for by name: says it cannot be reached, in one line
        result = subprocess.run([sys.executable, "-m", "lowtune.cli", "download", "owner/x", "--hub", hub_name],
                                capture_output=True, text=True, env=env)
        assert result.returncode == 2 and f"{hub_name}: cannot reach http://127.0.0.1:" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_offline_local_paths_never_touch_the_network(online, tmp_path, internlm_repo):
    with FakeHub() as hub:
        hub.add_repo(REPO, SMALL)
        online.setenv("HF_ENDPOINT", hub.url)
        online.setenv("MODELSCOPE_ENDPOINT", hub.url)
        online.setenv("HF_HUB_OFFLINE", "1")
        native = resolve_model_dir(str(internlm_repo))
        assert (native / "config.json").is_file()
        assert main(["download", REPO, "--hub", "hf", "-o", str(tmp_path / "x")]) == 2  # not cached, offline
        assert main(["download", REPO, "-o", str(tmp_path / "y")]) == 2
        assert hub.requests == []


def test_resolve_model_dir_downloads_hub_ids_into_the_modelscope_cache(online, tmp_path, internlm_repo):
    with FakeHub() as hub:
        hub.add_repo(REPO, internlm_repo)
        online.setenv("MODELSCOPE_ENDPOINT", hub.url)
        native = resolve_model_dir(REPO, hub="modelscope")
    assert (native / "model.safetensors.index.json").is_file()
    online.setenv("HF_HUB_OFFLINE", "1")  # the hub is gone; the cached snapshot is found offline
    assert str(tmp_path / "ms-cache") in str(download(REPO, hub="modelscope"))


def test_a_missing_tutorial_folder_says_how_to_download_it(tmp_path, monkeypatch):
    from lowtune.errors import UserError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as caught:  # never taken for a hub id: "models" owns nothing on either hub
        resolve_model_dir("models/internlm-chat-7b")
    assert "lowtune download Shanghai_AI_Laboratory/internlm-chat-7b --hub modelscope -o models/internlm-chat-7b" \
        in str(caught.value)


def test_a_mistyped_local_path_a_file_or_a_run_folder_is_not_taken_for_a_hub_id(online, tmp_path):
    from lowtune.errors import UserError

    online.chdir(tmp_path)
    (tmp_path / "runs" / "medqa").mkdir(parents=True)
    (tmp_path / "runs" / "medqa" / "config.yaml").write_text("model: {path: models/internlm-chat-7b}\n")
    (tmp_path / "runs" / "medqa" / "adapter").mkdir()
    (tmp_path / "runs" / "medqa" / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "data.jsonl").write_text("{}\n")
    cases = {"runs/medqaa": "model folder not found: runs/medqaa (relative to", "data.jsonl": "data.jsonl is a file",
             "runs/medqa": "runs/medqa is a run folder, not a model: its base is models/internlm-chat-7b",
             "runs/medqa/adapter": "runs/medqa/adapter is a LoRA adapter, not a model"}
    for spec, message in cases.items():
        with pytest.raises(UserError, match="^" + message.replace("(", r"\(")):
            resolve_model_dir(spec)
    with pytest.raises(UserError, match=r"did you mean 'runs/medqa'"):
        resolve_model_dir("runs/medqaa")
    (tmp_path / "internlm").mkdir()  # a cloned repo named like the hub owner: the hub id still goes to the hub
    (tmp_path / "internlm" / "README.md").write_text("# a clone\n")
    fetched = []
    online.setattr("lowtune.models.download.download", lambda spec, **kwargs: fetched.append(spec) or tmp_path)
    with pytest.raises(UserError):
        resolve_model_dir("internlm/internlm-chat-7b")
    assert fetched == ["internlm/internlm-chat-7b"]
