"""Pytest fixtures over the fakes. Import the ones you need into a test module:

    from fakes.fixtures import fake_hub, internlm_v1_dir  # noqa: F401

`internlm_v1_dir` is the original-layout InternLM-Chat-7B-style folder (session scope, built once);
`internlm_v1_native` is lowtune's converted native folder for it; `fake_hub` is a started FakeHub.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .checkpoints import make_internlm_v1_checkpoint
from .hub import FakeHub


@pytest.fixture(scope="session")
def internlm_v1_dir(tmp_path_factory) -> Path:
    return make_internlm_v1_checkpoint(tmp_path_factory.mktemp("ckpt") / "internlm-chat-7b", bias=True)


@pytest.fixture(scope="session")
def internlm_v1_native(internlm_v1_dir) -> Path:
    from lowtune.models.resolve import resolve_model_dir

    return resolve_model_dir(str(internlm_v1_dir))


@pytest.fixture
def fake_hub():
    with FakeHub() as hub:
        yield hub
