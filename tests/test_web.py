"""`lowtune web` in a real browser: headless Chromium (Debian's package) driven by Playwright opens the page,
sends a message and watches the answer stream in; a screenshot is kept in tests/artifacts/."""

from __future__ import annotations

import getpass
import os
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fakes.loopback import free_port, running

from lowtune.errors import UserError
from lowtune.infer.web import resolve_address, to_conversation, tunnel_command

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUESTION = "Who are you?"
MAX_NEW = 96


def test_address_flags_then_gradio_variables_then_loopback(monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    assert resolve_address(None, None) == ("127.0.0.1", 6006)
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
    assert resolve_address(None, None) == ("0.0.0.0", 7861)
    assert resolve_address("127.0.0.1", 9000) == ("127.0.0.1", 9000)
    monkeypatch.setenv("GRADIO_SERVER_PORT", "seven")
    with pytest.raises(UserError, match="GRADIO_SERVER_PORT"):
        resolve_address(None, None)


def test_tunnel_command_uses_the_ssh_connection(monkeypatch):
    monkeypatch.setenv("SSH_CONNECTION", "10.0.0.9 51234 203.0.113.7 2222")
    user = getpass.getuser()
    assert tunnel_command(6006) == f"ssh -CNg -L 6006:127.0.0.1:6006 {user}@203.0.113.7 -p 2222"
    monkeypatch.delenv("SSH_CONNECTION")
    assert tunnel_command(6006).startswith("ssh -CNg -L 6006:127.0.0.1:6006 ")
    assert tunnel_command(6006).endswith("@<host> -p <ssh-port>")


def test_gradio_history_becomes_the_conversation():
    history = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},  # Gradio 6 normalised shape
               {"role": "assistant", "content": "Hello."},
               {"role": "user", "content": "Again?"}, {"role": "assistant", "content": [{"text": "Yes."}]}]
    conversation = to_conversation(history, "  Be brief. ")
    assert conversation.for_model("Bye") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Bye"}]
    assert to_conversation([], "   ").system is None


@pytest.fixture(scope="module")
def web_page(tmp_path_factory, micro_dir):
    """`lowtune web builtin:micro` with its port from $GRADIO_SERVER_PORT (no --port flag)."""
    port = free_port()
    log = tmp_path_factory.mktemp("web") / "web.log"
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port)}
    env.pop("GRADIO_SERVER_NAME", None)
    url = f"http://127.0.0.1:{port}"
    with running([sys.executable, "-m", "lowtune.cli", "web", "builtin:micro"], url, log, env):
        yield {"url": url, "port": port, "log": log}


def test_start_message_gives_the_address_and_tunnel(web_page):
    out = web_page["log"].read_text()
    port = web_page["port"]
    assert f"http://127.0.0.1:{port}" in out
    assert f"ssh -CNg -L {port}:127.0.0.1:{port} " in out


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                   "(apt-get install -y chromium; .ci/run installs it)")
def test_browser_sees_a_streamed_answer(web_page, artifacts, micro_dir):
    from playwright.sync_api import sync_playwright

    from lowtune.generation import Sampling
    from lowtune.infer.engine import load_engine

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            outside: list[str] = []
            page.on("request", lambda r: urlsplit(r.url).hostname not in ("127.0.0.1", None)
                    and r.url.startswith("http") and outside.append(r.url))
            page.goto(web_page["url"])
            box = page.get_by_placeholder("Type a message...")
            box.wait_for(timeout=60_000)
            set_number(page, "Temperature", "0")  # greedy: the answer can be checked against the engine
            set_number(page, "Max new tokens", str(MAX_NEW))
            page.evaluate(RECORD_JS)
            box.fill(QUESTION)
            box.press("Enter")
            states = watch_answer(page)
            page.screenshot(path=str(artifacts / "web_chat.png"), full_page=True)
            assert not outside, f"the page fetched from the internet: {outside}"

            # streamed: several growing states, each extending the one before, ending in the whole answer
            print(f"\nthe answer grew through {len(states)} rendered states")
            assert len(states) >= 3, states
            assert all(later.startswith(earlier) for earlier, later in zip(states, states[1:])), states
            engine = load_engine(str(micro_dir))
            expected = engine.answer([{"role": "user", "content": QUESTION}], Sampling(max_new_tokens=MAX_NEW))
            assert letters(states[-1]) == letters(expected)  # the page renders markdown: compare the words

            page.get_by_role("button", name="Clear").click()
            page.wait_for_function("document.querySelectorAll('#lowtune-chat .message.bot').length === 0",
                                   timeout=10_000)
        finally:
            browser.close()


def set_number(page, label: str, value: str) -> None:
    """Type into the number box of the slider whose label starts with `label`."""
    field = page.get_by_label(label, exact=False).locator("xpath=..").locator("input[type=number]")
    if field.count() != 1:
        field = page.get_by_role("spinbutton", name=label)
    field.first.fill(value)
    field.first.press("Enter")


RECORD_JS = """() => {
    window.__answers = [];
    const chat = document.querySelector('#lowtune-chat');
    const record = () => {
        const bots = chat.querySelectorAll('.message.bot:not(.pending)');
        const text = bots.length ? bots[bots.length - 1].innerText : '';
        const seen = window.__answers;
        if (text && text !== seen[seen.length - 1]) seen.push(text);
    };
    new MutationObserver(record).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def watch_answer(page, timeout: float = 60) -> list[str]:
    """Every text the bot's message showed while it streamed (recorded in the page on each DOM change).

    While Gradio answers, the stop button replaces the send button and Retry is disabled; both flip back at the end.
    """
    page.wait_for_function("""() => window.__answers.length > 0
        && document.querySelector('button[aria-label="Retry"]:not([disabled])') !== null
        && document.querySelector('button.stop-button') === null""", timeout=timeout * 1000)
    page.wait_for_timeout(300)
    return page.evaluate("() => window.__answers")


def letters(text: str) -> str:
    return re.sub(r"[\W_]+", "", text)


# --- hostile requests (issue 19) ------------------------------------------------------------------------------------

def listening_on(port: int) -> list[str]:
    """Addresses with a LISTEN socket on `port` (/proc/net/tcp and tcp6; IPv6 as hex)."""
    import socket

    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:] if Path(table).exists() else []:
            host_hex, port_hex = line.split()[1].split(":")
            if int(port_hex, 16) == port and line.split()[3] == "0A":
                found.append(socket.inet_ntoa(bytes.fromhex(host_hex)[::-1]) if len(host_hex) == 8 else host_hex)
    return found


def test_web_listens_on_loopback_only(web_page):
    assert listening_on(web_page["port"]) == ["127.0.0.1"]


@pytest.mark.parametrize("body", [b"{not json", b"[" * 100_000, b"\xff\xfe", b'{"data": 5, "fn_index": "x"}', b""])
def test_malformed_requests_are_refused_and_the_page_keeps_serving(web_page, body):
    import httpx

    response = httpx.post(f"{web_page['url']}/gradio_api/queue/join", content=body,
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert httpx.get(web_page["url"], timeout=30).status_code == 200
