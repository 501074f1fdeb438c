"""`lowtune deploy`: the app folder is complete for each platform, and `python app.py` answers over HTTP."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_engine_fixtures import LOWBOT, identity_run  # noqa: F401
from fakes.loopback import free_port, start_process, stop_process, wait_for

from lowtune.cli import main
from lowtune.errors import UserError
from lowtune.export.deploy import deploy

QUESTION = "Who are you?"


def front_matter(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_openxlab_bundle(micro_dir, tmp_path, capsys):
    assert main(["deploy", str(micro_dir), "--target", "openxlab", "-o", str(tmp_path / "app")]) == 0
    app = tmp_path / "app"
    assert sorted(p.name for p in app.iterdir()) == ["README.md", "app.py", "chat_template.jinja", "packages.txt",
                                                    "requirements.txt"]
    assert (app / "packages.txt").read_text().split() == ["git", "git-lfs"]
    requirements = (app / "requirements.txt").read_text().split()
    assert requirements[0].startswith("gradio>=") and "transformers>=4.56" in requirements and "torch" in requirements
    assert not re.search(r"^\s*(import|from)\s+lowtune", (app / "app.py").read_text(), re.M)  # standalone
    meta = front_matter(app / "README.md")
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    source = (app / "app.py").read_text()
    assert f'MODEL_ID = os.environ.get("MODEL_ID", "{micro_dir.resolve()}")' in source
    assert 'PLATFORM = "openxlab"' in source and "code.openxlab.org.cn" in source
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(UserError, match="not empty"):
        deploy(str(micro_dir), "openxlab", app)


def test_hf_space_bundle_points_at_the_repo(identity_run, tmp_path):
    result = deploy(str(identity_run), "hf-space", tmp_path / "space", repo="me/lowbot")
    app = tmp_path / "space"
    assert not (app / "packages.txt").exists()  # a Space needs no system packages
    assert "gradio" not in (app / "requirements.txt").read_text()  # the Space installs its sdk_version
    assert "peft" in (app / "requirements.txt").read_text()  # a run's adapter loads on its base
    source = (app / "app.py").read_text()
    assert 'MODEL_ID = os.environ.get("MODEL_ID", "me/lowbot")' in source
    assert front_matter(app / "README.md")["title"] == "lowbot"
    assert "lowtune upload" in (app / "README.md").read_text()
    # the run's training template and its end-of-turn id are baked in
    assert (app / "chat_template.jinja").read_text() == (identity_run / "chat_template.jinja").read_text()
    from transformers import AutoTokenizer

    im_end = AutoTokenizer.from_pretrained(identity_run / "adapter").convert_tokens_to_ids("<|im_end|>")
    assert im_end in result.stop_ids and f"STOP_IDS = {result.stop_ids}" in source


def test_bad_target_and_folder(micro_dir, tmp_path):
    with pytest.raises(UserError, match="--target"):
        deploy(str(micro_dir), "heroku", tmp_path / "x")
    with pytest.raises(UserError, match="no model"):
        deploy(str(tmp_path), "openxlab", tmp_path / "y")
    with pytest.raises(UserError, match="--repo"):
        deploy(str(micro_dir), "openxlab", tmp_path / "z", repo="not a repo")


def start_app(app: Path, log: Path, env_extra: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", **(env_extra or {})}
    env.pop("MODEL_ID", None)
    return start_process([sys.executable, "app.py"], log, env, cwd=app), f"http://127.0.0.1:{port}/"


def test_apps_start_with_python_app_py_and_answer_over_http(micro_dir, identity_run, tmp_path):
    """builtin:micro's folder and the identity run's adapter, each as an app; both started at once."""
    from gradio_client import Client

    from lowtune.generation import Sampling
    from lowtune.infer.engine import load_engine

    deploy(str(micro_dir), "openxlab", tmp_path / "micro-app")
    deploy(str(identity_run), "hf-space", tmp_path / "run-app")
    assert front_matter(tmp_path / "run-app" / "README.md")["title"] == "identity"  # the run's name
    micro, micro_url = start_app(tmp_path / "micro-app", tmp_path / "micro.log")
    tuned, tuned_url = start_app(tmp_path / "run-app", tmp_path / "run.log")
    try:
        wait_for(micro_url, micro, tmp_path / "micro.log")
        wait_for(tuned_url, tuned, tmp_path / "run.log")
        # message, system prompt, max new tokens, temperature (0 = greedy), top-p
        answer = Client(micro_url, verbose=False).predict(QUESTION, "", 24, 0, 0.8, api_name="/chat")
        expected = load_engine(str(micro_dir)).answer([{"role": "user", "content": QUESTION}],
                                                       Sampling(max_new_tokens=24))
        assert answer.strip() == expected  # same template, same ids, same greedy tokens as lowtune chat
        # the fine-tuned adapter answers as trained and stops at <|im_end|> long before the 64-token limit
        tuned_answer = Client(tuned_url, verbose=False).predict(QUESTION, "", 64, 0, 0.8, api_name="/chat")
        assert tuned_answer.strip() == LOWBOT
    finally:
        stop_process(micro)
        stop_process(tuned)
