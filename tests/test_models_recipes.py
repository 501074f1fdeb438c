"""The family recipes validate and name a chat template lowtune ships (or `auto`)."""

import pytest

from lowtune.config import load_config, recipe_names, recipe_text
from lowtune.templates import shipped_names

FAMILY_RECIPES = ["internlm2-chat-7b-qlora-oasst1", "qwen-7b-chat-qlora-oasst1", "qwen2-7b-instruct-qlora-oasst1",
                  "llama3-8b-instruct-qlora-oasst1", "baichuan2-7b-chat-qlora-oasst1"]


@pytest.mark.parametrize("name", FAMILY_RECIPES)
def test_family_recipe_validates(name):
    assert name in recipe_names()
    first, second = recipe_text(name).splitlines()[:2]
    assert first == f"# lowtune train {name} model.path={load_config(name).model.path}"
    assert second.startswith("# QLoRA ")
    cfg = load_config(name)
    assert cfg.model.quantization == "nf4" and cfg.lora.enabled
    assert cfg.model.template == "auto" or cfg.model.template in shipped_names()
