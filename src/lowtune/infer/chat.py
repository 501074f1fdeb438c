"""`lowtune chat`: the terminal REPL, one-shot `--prompt`, piped input, and `--compare` (base vs fine-tuned).

Answers stream as they are generated. History is a list of messages re-rendered through the chat template each turn
(so the model sees exactly the training format); the oldest turns are dropped when the prompt would not fit the
model's context. Piped input (stdin not a terminal) answers each line on its own, for scripts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from lowtune.errors import UserError
from lowtune.generation import Sampling
from lowtune.infer.engine import ChatEngine

EXIT_WORDS = {"/exit", "/quit", "EXIT", "exit"}  # EXIT and RESET as in XTuner's chat
CLEAR_WORDS = {"/clear", "RESET"}
HELP = ("/clear (or RESET) forgets the conversation · /system TEXT sets the system prompt (/system alone: default) · "
        "/exit (or EXIT, Ctrl-D) quits")


@dataclass
class Conversation:
    """One chat history; `system` is prepended on every turn (the engine's default when None)."""

    system: str | None = None
    messages: list[dict] = field(default_factory=list)

    def for_model(self, user_text: str | None = None) -> list[dict]:
        turns = list(self.messages)
        if user_text is not None:
            turns.append({"role": "user", "content": user_text})
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def add(self, user_text: str, answer: str) -> None:
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]

    def clear(self) -> None:
        self.messages.clear()


def fit_context(engine: ChatEngine, conversation: Conversation, user_text: str, sampling: Sampling) -> bool:
    """Drop the oldest turns until prompt + answer fit the context; False when even the new turn alone does not."""
    limit = engine.max_context
    if not limit:
        return True
    while engine.prompt_length(conversation.for_model(user_text)) + sampling.max_new_tokens > limit:
        if not conversation.messages:
            return False
        del conversation.messages[:2]
    return True


def stream_to(out: TextIO, pieces: Iterable[str]) -> str:
    """Write pieces as they arrive; return the whole answer."""
    text = []
    for piece in pieces:
        if not text:
            piece = piece.lstrip()
        text.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return "".join(text).strip()


# --- compare ------------------------------------------------------------------------------------------------------

def render_compare(out: TextIO, base: str, tuned: str) -> None:
    """Base and fine-tuned answers side by side, each column wrapping its own text."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(expand=True, show_lines=False)
    table.add_column("base", ratio=1, overflow="fold")
    table.add_column("fine-tuned", ratio=1, overflow="fold")
    table.add_row(escape(base), escape(tuned))  # model text is shown as is, never read as markup
    Console(file=out).print(table)


def compare_turn(engine: ChatEngine, base: Conversation, tuned: Conversation, text: str, sampling: Sampling,
                 out: TextIO) -> None:
    base_answer = engine.answer(base.for_model(text), sampling, adapter=False)
    tuned_answer = engine.answer(tuned.for_model(text), sampling, adapter=True)
    render_compare(out, base_answer, tuned_answer)
    base.add(text, base_answer)
    tuned.add(text, tuned_answer)


# --- the session --------------------------------------------------------------------------------------------------

@dataclass
class ChatSession:
    engine: ChatEngine
    sampling: Sampling
    compare: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)

    def __post_init__(self) -> None:
        if self.compare and not self.engine.has_adapter:
            raise UserError("--compare needs a fine-tuned model: give a run folder, an adapter folder or --adapter")
        system = self.engine.default_system
        self.tuned = Conversation(system)
        self.base = Conversation(system)

    def ask(self, text: str) -> None:
        """Answer one user turn (streamed, or side by side when comparing) and remember it."""
        if not fit_context(self.engine, self.tuned, text, self.sampling):
            self.out.write(f"(message too long for the model's {self.engine.max_context}-token context; "
                           "lower --max-new-tokens or shorten it)\n")
            return
        if self.compare:
            fit_context(self.engine, self.base, text, self.sampling)
            try:
                compare_turn(self.engine, self.base, self.tuned, text, self.sampling, self.out)
            except KeyboardInterrupt:  # the answer being generated stops as its stream closes
                self.out.write("\n[interrupted]\n")
            return
        pieces = self.engine.stream(self.tuned.for_model(text), self.sampling)
        try:
            answer = stream_to(self.out, pieces)
        except KeyboardInterrupt:
            pieces.close()  # stops generation at the next token
            self.out.write("\n[interrupted]\n")
            return
        self.tuned.add(text, answer)

    def reset(self) -> None:
        self.tuned.clear()
        self.base.clear()

    def command(self, line: str) -> bool | None:
        """Handle a REPL command: True = quit, False = handled, None = not a command (a message)."""
        text = line.strip()
        if text in EXIT_WORDS:
            return True
        if text in CLEAR_WORDS:
            self.reset()
            self.out.write("(conversation cleared)\n")
            return False
        if text == "/system" or text.startswith("/system "):
            system = text[len("/system"):].strip() or None
            self.tuned, self.base = Conversation(system), Conversation(system)
            self.out.write(f"(system prompt {'set' if system else 'back to the default'}; conversation cleared)\n")
            return False
        if text.startswith("/") and " " not in text:  # /help or an unknown command
            self.out.write(HELP + "\n")
            return False
        return None


def banner(engine: ChatEngine, compare: bool) -> str:
    tuned = f"adapter {engine.adapter_dir}" if engine.has_adapter else "no adapter"
    mode = " · comparing base vs fine-tuned" if compare else ""
    return f"{engine.name} · template {engine.template.name} · {tuned}{mode}\n{HELP}\n"


def repl(session: ChatSession | Any, banner_text: str, read: Callable[[str], str] = input) -> int:
    """The interactive loop: read a line, run a command or answer it, until /exit or Ctrl-D.

    `session` is a ChatSession or anything with the same `out`, `command(line)` and `ask(text)` (the agent's).
    """
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    session.out.write(banner_text)
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            session.out.write("\n")
            return 0
        except KeyboardInterrupt:
            session.out.write("\n")
            continue
        handled = session.command(line)
        if handled is True:
            return 0
        if handled is None and line.strip():
            session.ask(line.strip())


def answer_lines(session: ChatSession | Any, lines: Iterable[str]) -> int:
    """Piped input: every non-empty line is its own question; the answers follow in order."""
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if session.command(text) is True:
            break
        session.reset()
        session.ask(text)
    return 0


def run_chat(engine: ChatEngine, sampling: Sampling, prompt: str | None = None, compare: bool = False,
             stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """`lowtune chat`: --prompt answers once; a terminal gets the REPL; piped stdin answers line by line."""
    stdin = stdin or sys.stdin
    session = ChatSession(engine, sampling, compare, out or sys.stdout)
    if prompt is not None:
        session.ask(prompt)
        return 0
    if stdin.isatty():
        return repl(session, banner(engine, compare))
    return answer_lines(session, stdin)


def make_sampling(max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                  repetition_penalty: float = 1.0, seed: int | None = None) -> Sampling:
    """Sampling settings from the command line, checked (temperature 0 = greedy)."""
    checks = [(max_new_tokens > 0, "--max-new-tokens must be positive"),
              (temperature >= 0, "--temperature must be 0 (greedy) or more"),
              (0 < top_p <= 1, "--top-p must be in (0, 1]"),
              (top_k >= 0, "--top-k must be 0 (off) or more"),
              (repetition_penalty > 0, "--repetition-penalty must be positive (1.0 = off)")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    repetition_penalty=repetition_penalty, seed=seed)
