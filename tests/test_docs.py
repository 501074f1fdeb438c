"""The tutorials run: every command of every ```bash block of docs/tutorial.en.md and docs/tutorial.zh.md, in order, in
one project folder, on a small in-process model, so the docs cannot rot.

How a tutorial command becomes a test command (every rule is in the tables below, with its reason):
- `$LOWTUNE_MODEL` is the one model variable of the tutorials (they set it to `models/internlm-chat-7b`, the folder
  `lowtune download` fills); here it is `builtin:micro`. Hub downloads come from a fake hub on 127.0.0.1 that serves
  builtin:micro's folder under every model id and small sample files under every dataset id, so the folders the
  tutorial names (`models/internlm-chat-7b`, `data/openassistant-guanaco/`) exist afterwards.
- `OVERRIDES` appends settings that make GPU-sized or hours-long commands take seconds (`train.max_steps=2`,
  `--max-new-tokens 8`, ...): the command still runs, with the tutorial's recipe and every flag it shows.
- `SUBSTITUTE` swaps what reaches the internet for a local stand-in (the MedQA workbook from tests/data, the fake
  hub for a mirror URL); `SKIP` lists what is not run at all, each with its reason.
- `lowtune web` / `lowtune serve` start as servers on a free port; the rest of their block (curl) runs against
  them, then they stop. Uploads go to a fake Hugging Face / ModelScope hub, `chat --agent` to a fake Serper.
- A block right after `<!-- docs-test: needs recipe NAME -->` runs only when that shipped recipe exists (preference
  tuning lands in parallel); the skip is printed.
- zh and en show the same commands (checked); each distinct command runs once.

Also checked: both tutorials have every section, in the seed tutorial's order, and every image they reference exists.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from fakes.hub import FakeHub
from fakes.loopback import free_port, serve_in_thread, server_url, start_process, stop_process, stop_server, wait_for
from fakes.upload_hub import UploadHub

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"en": ROOT / "docs" / "tutorial.en.md", "zh": ROOT / "docs" / "tutorial.zh.md"}
MEDQA_XLSX = ROOT / "tests" / "data" / "MedInfo2019-QA-Medications.xlsx"

SECTIONS = ["overview", "install", "quickstart", "medqa", "self", "use", "export", "publish", "agent", "preference",
            "multi-gpu", "troubleshooting"]
"""`<!-- section: NAME -->` markers, in the seed tutorial's chapter order (xtuner-parity.md §1), then ours."""

MODEL = "builtin:micro"
TOKEN = "hf_docs_test_token"
CHAT_INPUT = "Who are you?\n"  # what a REPL command (`lowtune chat RUN`) reads from stdin here

OVERRIDES: dict[str, list[str]] = {
    # 2 optimizer steps of one 256-token row instead of epochs of 16 x 2048; replay off: micro's random weights
    # have nothing to keep (the recipe's replay is exercised on a real model in tests/real)
    "train": ["train.max_steps=2", "train.batch_size=1", "train.grad_accum=1", "data.max_length=256",
              "train.save_every=1", "data.replay=0", "eval.max_new_tokens=8"],
    "chat": ["--max-new-tokens", "8"],
    "eval": ["-n", "2", "--show", "1", "--max-new-tokens", "8"],
    "doctor": ["--timeout", "1"],
}
"""Appended to every `lowtune VERB` of the tutorials (later flags and keys win)."""
RESUME_STEPS = "train.max_steps=3"  # a `--resume` command goes one step further than the run it continues

SKIP: list[tuple[str, str]] = [
    (r"^pip install ", "installs packages: CI installs lowtune[dev] (a superset) before the tests run"),
    (r"^ollama ", "needs the Ollama app; the Modelfile it reads is checked in tests/test_export.py"),
    (r"^ssh ", "a tunnel from the user's laptop to a remote GPU machine"),
    (r"^lowtune download damo/MSAgent-Bench ", ("ModelScope's dataset API is not faked; the test writes MSAgent-Bench "
                                                "rows in its format to data/MSAgent-Bench/train.jsonl instead")),
]
SUBSTITUTE: list[tuple[str, str, str]] = [
    (r"^curl -L -o (\S+\.xlsx) \S+$", f"cp {shlex.quote(str(MEDQA_XLSX))} \\1",
     "the MedQA workbook: the copy in tests/data"),
    (r"https://hf-mirror\.com", "{hf}", "a Hugging Face mirror: the fake hub"),
]
NEEDS_MODULE = {"--quant q4_k_m": "llama_cpp"}  # a command with this text runs only with the optional package
NEEDS_PROGRAM = ["curl"]  # a command starting with one of these runs only where it is installed

GUANACO = [{"text": f"### Human: Question {i}: name a colour.### Assistant: Colour {i} is blue."} for i in range(8)]
MSAGENT = [{"id": i, "conversations": repr([
    {"from": "system", "value": "当前对话可以使用的插件信息如下，请自行判断是否需要调用插件来解决当前用户问题。"},
    {"from": "user", "value": f"你好 {i}"}, {"from": "assistant", "value": f"你好！我是助手 {i}。"}])}
    for i in range(200)]


# --- reading the tutorials ----------------------------------------------------------------------------------------

@dataclass
class Block:
    doc: str
    line: int
    needs_recipe: str | None
    commands: list[str] = field(default_factory=list)


def read_blocks(doc: str) -> list[Block]:
    text = DOCS[doc].read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"(<!-- docs-test: needs recipe (\S+) -->\s*\n)?```bash\n(.*?)\n```", text, re.DOTALL):
        block = Block(doc, text[:match.start(3)].count("\n") + 1, match.group(2))
        block.commands = split_commands(match.group(3))
        blocks.append(block)
    return blocks


def split_commands(body: str) -> list[str]:
    """Lines joined at trailing backslashes; a heredoc stays with its command; comment-only lines dropped."""
    commands, lines = [], body.splitlines()
    while lines:
        line = lines.pop(0)
        while line.rstrip().endswith("\\") and lines:
            line = line.rstrip()[:-1] + " " + lines.pop(0).strip()
        heredoc = re.search(r"<<-?'?(\w+)'?", line)
        if heredoc:
            end = heredoc.group(1)
            while lines:
                nxt = lines.pop(0)
                line += "\n" + nxt
                if nxt.strip() == end:
                    break
        if line.strip() and not line.strip().startswith("#"):
            commands.append(line.strip())
    return commands


def key(command: str) -> str:
    """A command without its comment: how zh and en are matched and deduplicated."""
    if "\n" in command:
        return command
    return shlex.join(shlex.split(command, comments=True))


# --- the checks that need no model --------------------------------------------------------------------------------

@pytest.mark.parametrize("doc", sorted(DOCS))
def test_every_section_in_order(doc):
    found = re.findall(r"<!-- section: ([\w-]+) -->", DOCS[doc].read_text(encoding="utf-8"))
    assert found == SECTIONS


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_every_image_exists(doc):
    text = DOCS[doc].read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text) + re.findall(r'<img [^>]*src="([^"]+)"', text)
    assert images, "the tutorial shows the loss plot and the web page"
    for image in images:
        assert (DOCS[doc].parent / image).is_file(), f"{DOCS[doc].name}: {image} is missing"


def test_zh_and_en_show_the_same_commands():
    en = [key(c) for b in read_blocks("en") for c in b.commands]
    zh = [key(c) for b in read_blocks("zh") for c in b.commands]
    assert en == zh


# --- running them -------------------------------------------------------------------------------------------------

def recipe_exists(name: str) -> bool:
    import lowtune

    return (Path(lowtune.__file__).parent / "recipes" / f"{name}.yaml").is_file()


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), text)


def fake_serper():
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"organic": [{"title": "上海天气", "snippet": "明天晴，25°C",
                                            "link": "https://weather.example/sh"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return serve_in_thread(Handler)


class Runner:
    def __init__(self, work: Path, hub: FakeHub, upload_hub: UploadHub, serper_url: str, monkeypatch) -> None:
        self.work, self.hub, self.upload_hub, self.monkeypatch = work, hub, upload_hub, monkeypatch
        self.env = {**os.environ, "LOWTUNE_MODEL": MODEL, "HF_TOKEN": TOKEN, "MODELSCOPE_API_TOKEN": TOKEN,
                    "SERPER_API_KEY": "docs-test-key", "LOWTUNE_SERPER_URL": serper_url, "COLUMNS": "120",
                    "MODELSCOPE_CACHE": str(work / ".ms-cache"), "MODELSCOPE_HOME": str(work / ".ms-home"),
                    "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_XET": "1"}
        self.test_set = {"LOWTUNE_MODEL", "HF_TOKEN", "MODELSCOPE_API_TOKEN", "SERPER_API_KEY"}
        self.servers: list[subprocess.Popen] = []
        self.ports: dict[str, str] = {}
        self.log: list[str] = []
        self.done: set[str] = set()

    def note(self, line: str) -> None:
        self.log.append(line)
        print(line)

    # one block: its servers live until its last command has run
    def run_block(self, block: Block) -> None:
        if block.needs_recipe and not recipe_exists(block.needs_recipe):
            for command in block.commands:
                if key(command) not in self.done:
                    self.done.add(key(command))
                    self.note(f"SKIP {block.doc}:{block.line} {command!r}: recipe {block.needs_recipe} is not in "
                              "this tree")
            return
        try:
            for command in block.commands:
                self.run(command, block)
        finally:
            for proc in self.servers:
                stop_process(proc)
            self.servers, self.ports = [], {}

    def run(self, command: str, block: Block) -> None:
        where = f"{block.doc}:{block.line}"
        if key(command) in self.done:
            return
        self.done.add(key(command))
        for pattern, reason in SKIP:
            if re.search(pattern, command):
                return self.note(f"SKIP {where} {command!r}: {reason}")
        for text, module in NEEDS_MODULE.items():
            if text in command and not _importable(module):
                return self.note(f"SKIP {where} {command!r}: needs the optional package {module}")
        program = command.split()[0]
        if program in NEEDS_PROGRAM and shutil.which(program) is None:
            return self.note(f"SKIP {where} {command!r}: {program} is not installed")
        export = re.match(r"^export (\w+)=(.*)$", command)
        if export:
            name, value = export.groups()
            if name in self.test_set:
                return self.note(f"SKIP {where} {command!r}: the test sets {name}={self.env[name]}")
            self.env[name] = expand(shlex.split(value, comments=True)[0], self.env)
            return
        original = command
        for pattern, replacement, _reason in SUBSTITUTE:
            command = re.sub(pattern, replacement.replace("{hf}", self.hub.url), command)
        for doc_port, port in self.ports.items():
            command = command.replace(f"127.0.0.1:{doc_port}", f"127.0.0.1:{port}")
        command = expand(command, self.env)
        started = time.monotonic()
        words = shlex.split(command, comments=True) if "\n" not in command else []
        assignments = {}
        while words and re.match(r"^\w+=", words[0]):
            name, value = words.pop(0).split("=", 1)
            assignments[name] = value
        if words[:1] == ["lowtune"]:
            self.lowtune(words[1:], assignments, where, original)
        else:
            result = subprocess.run(["bash", "-c", command], check=False, cwd=self.work, env=self.env,
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f"{where}: {original}\n{result.stdout}\n{result.stderr}"
        self.note(f"ran  {where} {original[:100]!r} in {time.monotonic() - started:.1f}s")

    def lowtune(self, argv: list[str], assignments: dict[str, str], where: str, original: str) -> None:
        verb = argv[0]
        argv = argv + OVERRIDES.get(verb, [])
        if verb == "train" and "--resume" in argv:
            argv.append(RESUME_STEPS)
        env = {**self.env, **assignments}
        if verb in ("download", "upload"):
            env.pop("HF_HUB_OFFLINE", None)
            url = self.upload_hub.url if verb == "upload" else self.hub.url
            if "HF_ENDPOINT" not in assignments:
                env["HF_ENDPOINT"] = url
            env["MODELSCOPE_ENDPOINT"] = url
        if verb in ("web", "serve"):
            return self.start_server(verb, argv, env, where)
        from huggingface_hub import constants

        from lowtune.cli import main

        with self.monkeypatch.context() as mp:
            for name in set(os.environ) - set(env):
                mp.delenv(name)
            for name, value in env.items():
                mp.setenv(name, value)
            if verb == "upload":  # read once at import by huggingface_hub (as in tests/test_upload.py)
                mp.setattr(constants, "HF_HUB_OFFLINE", False)
                mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
                mp.setattr(constants, "HF_TOKEN_PATH", str(self.work / ".no-token"))
            mp.chdir(self.work)
            mp.setattr(sys, "stdin", io.StringIO(CHAT_INPUT))
            try:
                code = main(argv)
            except SystemExit as stop:  # argparse's --help
                code = stop.code or 0
        assert code == 0, f"{where}: {original} exited {code}"

    def start_server(self, verb: str, argv: list[str], env: dict[str, str], where: str) -> None:
        doc_port = argv[argv.index("--port") + 1] if "--port" in argv else ("6006" if verb == "web" else "8000")
        port = str(free_port())
        if "--port" in argv:
            argv[argv.index("--port") + 1] = port
        else:
            argv += ["--port", port]
        self.ports[doc_port] = port
        url = f"http://127.0.0.1:{port}" + ("/health" if verb == "serve" else "")
        log = self.work / f".{verb}-{port}.log"
        proc = start_process([sys.executable, "-m", "lowtune.cli", *argv], log, env, cwd=self.work)
        self.servers.append(proc)
        wait_for(url, proc, log, timeout=300)  # Gradio starts slowly on a loaded machine


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.fixture
def fakes(micro_dir):
    serper = fake_serper()
    try:
        with FakeHub() as hub, UploadHub(token=TOKEN) as upload_hub:
            yield hub, upload_hub, server_url(serper)
    finally:
        stop_server(serper)


def serve_downloads(hub: FakeHub, commands: list[str], micro_dir: Path) -> None:
    """Every `lowtune download ID` of the tutorials finds ID on the fake hub (both hubs, every revision shown)."""
    for command in commands:
        words = shlex.split(command, comments=True) if "\n" not in command else []
        if words[:2] != ["lowtune", "download"]:
            continue
        repo = words[2]
        revisions = ("main", "master", *(words[words.index("--revision") + 1:][:1] if "--revision" in words else ()))
        if "--dataset" in words:
            files = {f"{name}_{split}.jsonl": "\n".join(json.dumps(r) for r in GUANACO).encode()
                     for name in ("openassistant_best_replies",) for split in ("train", "eval")}
        else:
            files = micro_dir
        hub.add_repo(repo, files, revisions=revisions)


def test_every_tutorial_command_runs(tmp_path, fakes, micro_dir, monkeypatch):
    hub, upload_hub, serper_url = fakes
    work = tmp_path / "project"
    work.mkdir()
    # the rows `lowtune download damo/MSAgent-Bench` would bring (see SKIP)
    (work / "data" / "MSAgent-Bench").mkdir(parents=True)
    (work / "data" / "MSAgent-Bench" / "train.jsonl").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in MSAGENT) + "\n", encoding="utf-8")
    blocks = read_blocks("en") + read_blocks("zh")
    serve_downloads(hub, [c for b in blocks for c in b.commands], micro_dir)
    runner = Runner(work, hub, upload_hub, serper_url, monkeypatch)
    started = time.monotonic()
    for block in blocks:
        runner.run_block(block)
    ran = [line for line in runner.log if line.startswith("ran")]
    print(f"\n{len(ran)} commands ran, {len(runner.log) - len(ran)} skipped, in {time.monotonic() - started:.0f}s")
    assert len(ran) >= 40
    # what the tutorial promises to leave behind
    for path in ("runs/medqa/adapter", "runs/medqa/eval.json", "runs/self/adapter", "merged/self/config.json",
                 "runs/oasst1/loss.png", "data/medqa.test.jsonl", "app/app.py"):
        assert (work / path).exists(), path
    assert "me/internlm-chat-7b-self" in upload_hub.repos
    shutil.rmtree(work / ".ms-cache", ignore_errors=True)
