"""lowtune chat: the REPL through a real pseudo-terminal, --prompt, piped input and --compare."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import pexpect
import pytest
from test_engine_fixtures import AGAIN, LOWBOT, identity_run  # noqa: F401

from lowtune.cli import main
from lowtune.infer.chat import make_sampling, run_chat
from lowtune.infer.engine import load_engine

SCAFFOLDING = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "assistant\n")


def spawn_chat(*args: str) -> pexpect.spawn:
    env = dict(os.environ, COLUMNS="120", PYTHONUNBUFFERED="1")
    return pexpect.spawn(sys.executable, ["-m", "lowtune.cli", "chat", *args], env=env, encoding="utf-8",
                         timeout=180, dimensions=(40, 120))


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="120")
    return subprocess.run([sys.executable, "-m", "lowtune.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


def ask(child: pexpect.spawn, text: str, expected: str) -> str:
    child.sendline(text)
    child.expect_exact(expected)
    seen = child.before + expected
    child.expect_exact(">>> ")
    return seen + child.before


def test_repl_multi_turn_clear_and_exit_in_a_terminal(identity_run):
    child = spawn_chat(str(identity_run), "--max-new-tokens", "24")
    child.expect_exact(">>> ")
    assert "/clear" in child.before and "chatml" in child.before  # the banner names template and commands
    transcript = ask(child, "Who are you?", LOWBOT)
    transcript += ask(child, "Who are you?", AGAIN)  # the second answer needs the first turn in the history
    transcript += ask(child, "/clear", "(conversation cleared)")
    transcript += ask(child, "Who are you?", LOWBOT)  # history gone: the first-turn answer again
    transcript += ask(child, "RESET", "(conversation cleared)")  # XTuner's word works too
    transcript += ask(child, "你是谁？", "我是小明，你的助手。")
    assert not any(mark in transcript for mark in SCAFFOLDING)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_d_and_exit_word_leave_cleanly(identity_run):
    child = spawn_chat(str(identity_run), "--max-new-tokens", "8")
    child.expect_exact(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_answers_stream_into_the_terminal_piece_by_piece():
    """An untrained model talks until --max-new-tokens: its text must arrive in many pieces, not at the end."""
    child = spawn_chat("builtin:micro", "--max-new-tokens", "300")
    child.expect_exact(">>> ")
    child.sendline("hello")
    child.expect_exact("hello")  # the echo of our own line
    arrivals: list[tuple[float, str]] = []
    buffer = ""
    while "\n>>> " not in buffer:
        try:
            chunk = child.read_nonblocking(size=64, timeout=60)
        except pexpect.TIMEOUT:
            break
        arrivals.append((time.perf_counter(), chunk))
        buffer += chunk
    child.sendline("EXIT")
    child.expect(pexpect.EOF)
    answer_chunks = [t for t, chunk in arrivals if chunk.strip(" \r\n>")]
    assert len(buffer) > 200 and len(answer_chunks) >= 4
    assert answer_chunks[-1] - answer_chunks[0] > 0.02  # spread over the generation, not one final write
    assert not any(mark in buffer for mark in SCAFFOLDING[:3])


def test_prompt_answers_once_and_prints_only_the_answer(identity_run):
    result = run_cli("chat", str(identity_run), "--prompt", "Who are you?", "--max-new-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert result.stdout == LOWBOT + "\n"


def test_piped_lines_are_answered_one_by_one_and_compare_shows_both(identity_run):
    result = run_cli("chat", str(identity_run), "--compare", "--max-new-tokens", "16",
                     stdin="Who are you?\n\nWho are you?\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("fine-tuned") == 2 and out.count("base") >= 2
    rows = [line.split("│") for line in out.splitlines() if line.count("│") == 3]
    base_text = "".join(row[1] for row in rows)
    tuned_text = " ".join(row[2].strip() for row in rows)
    assert tuned_text.count(LOWBOT) == 2  # lines are independent: no "I told you already"
    assert "Lowbot" not in base_text and base_text.strip()


@pytest.fixture(scope="module")
def engine(identity_run):
    return load_engine(str(identity_run))


def test_piped_input_without_compare_answers_each_line(engine):
    out = io.StringIO()
    assert run_chat(engine, make_sampling(max_new_tokens=24), stdin=io.StringIO("Who are you?\n你是谁？\n"),
                    out=out) == 0
    assert out.getvalue() == f"{LOWBOT}\n我是小明，你的助手。\n"


def test_long_history_drops_the_oldest_turns(engine, monkeypatch):
    from lowtune.infer.chat import ChatSession

    session = ChatSession(engine, make_sampling(max_new_tokens=24), out=io.StringIO())
    for _ in range(3):
        session.tuned.add("Who are you?", LOWBOT)
    one_turn = engine.prompt_length(session.tuned.for_model()[-2:])
    monkeypatch.setattr(type(engine), "max_context", property(lambda self: one_turn + 24 + 30))
    session.ask("Who are you?")
    assert len(session.tuned.messages) <= 4  # older turns were dropped so prompt + answer fit the context


def test_flag_errors_are_one_line(identity_run, capsys):
    assert main(["chat", "builtin:micro", "--compare", "--prompt", "hi"]) == 2
    assert "--compare needs a fine-tuned model" in capsys.readouterr().err
    assert main(["chat", str(identity_run), "--temperature", "-1", "--prompt", "hi"]) == 2
    assert "--temperature" in capsys.readouterr().err


def test_system_command_and_unknown_commands(engine):
    from lowtune.infer.chat import ChatSession

    out = io.StringIO()
    session = ChatSession(engine, make_sampling(max_new_tokens=8), out=out)
    session.tuned.add("Who are you?", LOWBOT)
    assert session.command("/system Be brief.") is False
    assert session.tuned.system == "Be brief." and session.tuned.messages == []
    assert session.tuned.for_model("hi")[0] == {"role": "system", "content": "Be brief."}
    assert session.command("/system") is False and session.tuned.system is None
    assert session.command("/nonsense") is False and "/clear" in out.getvalue()
    assert session.command("/usr/bin is a folder?") is None  # a message, not a command
    assert session.command("EXIT") is True and session.command("/quit") is True
