import pytest

from lowtune.config import Config, dump_config, load_config, parse_yaml, recipe_names
from lowtune.errors import UserError

RECIPES = ["internlm-7b-qlora-msagent", "internlm-chat-7b-qlora-medqa", "internlm-chat-7b-qlora-oasst1",
           "internlm-chat-7b-qlora-self", "tiny-self"]


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_every_shipped_recipe_validates_and_starts_with_its_command():
    from lowtune.config import recipe_text

    names = recipe_names()
    assert set(RECIPES) <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.output.dir
        first = recipe_text(name).splitlines()[0]
        assert first.startswith("# lowtune train "), name


def test_xtuner_defaults_in_tutorial_recipes():
    for name in RECIPES[:4]:
        cfg = load_config(name)
        assert (cfg.model.quantization, cfg.model.double_quant) == ("nf4", True)
        assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (64, 16, 0.1, "all-linear")
        assert (cfg.data.max_length, cfg.data.packing) == (2048, True)
        assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.lr) == (1, 16, 2e-4)
        assert (cfg.train.scheduler, cfg.train.warmup_ratio) == ("cosine", 0.03)
        assert cfg.eval.prompts


def test_yaml_exponent_is_a_float(tmp_path):
    assert parse_yaml("lr: 1e-4")["lr"] == 1e-4
    cfg = load_config(write(tmp_path, "train:\n  lr: 1e-4\n"))
    assert cfg.train.lr == pytest.approx(1e-4)


def test_overrides_coerce_types(tmp_path):
    cfg = load_config(write(tmp_path, "model: {path: x}\n"),
                      ["train.lr=3e-5", "train.epochs=2", "data.train=a.jsonl", "eval.prompts=[a, b]",
                       "data.packing=false", "data.eval=0.1"])
    assert cfg.train.lr == pytest.approx(3e-5) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 2 and cfg.data.train == ["a.jsonl"] and cfg.eval.prompts == ["a", "b"]
    assert cfg.data.packing is False and cfg.data.eval == 0.1


@pytest.mark.parametrize("text, expected", [
    ("trian:\n  lr: 1\n", "c.yaml:1: unknown section 'trian' (did you mean 'train'?)"),
    ("model:\n  path: x\n  quantisation: nf4\n", "c.yaml:3: unknown key 'model.quantisation' (did you mean 'model.quantization'?)"),
    ("train:\n  lr: fast\n", "c.yaml:2: train.lr must be a number (got 'fast')"),
])
def test_bad_file_names_key_line_and_fix(tmp_path, text, expected):
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, text))
    assert str(err.value).endswith(expected)


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=1", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    ("trian.lr=1", "unknown section 'trian' (did you mean 'train'?)"),
    ("train.lr=abc", "train.lr must be a number (got 'abc')"),
    ("model.quantization=nf5", "model.quantization must be 'nf4', 'int8' or 'none'"),
    ("train.max_steps=0", "train.max_steps must be greater than 0 (got 0)"),
    ("train.distributed=zero2", "train.distributed=zero2 is not available yet: several GPUs train with ddp"),
    ("train.lr", "must look like section.key=value"),
])
def test_bad_override(tmp_path, override, expected):
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, "model: {path: x}\n"), [override])
    assert expected in str(err.value) and override.split("=")[0] in str(err.value)


def test_impossible_combinations(tmp_path):
    path = write(tmp_path, "model: {path: x}\n")
    with pytest.raises(UserError, match="full fine-tuning"):
        load_config(path, ["lora.enabled=false"])
    with pytest.raises(UserError, match="max_length"):
        load_config(path, ["data.max_length=null"])


def test_resolved_dump_shows_defaults_and_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, "model: {path: x}\n"))
    text = dump_config(cfg)
    for key in ("quantization:", "warmup_ratio:", "max_grad_norm:", "save_limit:", "weight_decay:"):
        assert key in text
    again = load_config(write(tmp_path, text, "again.yaml"))
    assert again == cfg
    assert isinstance(Config.model_validate(parse_yaml(text)), Config)


def test_default_output_dir_follows_config_name(tmp_path):
    assert load_config(write(tmp_path, "model: {path: x}\n", "medqa.yaml")).output.dir == "runs/medqa"


def test_missing_file_and_unknown_recipe():
    with pytest.raises(UserError, match="not found"):
        load_config("nope/missing.yaml")
    with pytest.raises(UserError, match="did you mean 'tiny-self'"):
        load_config("tiny-selff")
