"""Remote-code-only families need an explicit --trust-remote-code on every verb that loads a model."""

from fakes.checkpoints import make_chatglm3_config_only

from lowtune.cli import main


def test_chat_refuses_remote_code_without_the_flag(tmp_path, capsys):
    folder = make_chatglm3_config_only(tmp_path / "chatglm3-6b")
    assert main(["chat", str(folder), "--prompt", "hi"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "trust" in errors[0].lower()
