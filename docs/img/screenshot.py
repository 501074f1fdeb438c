"""Make docs/img/web.png: `lowtune web RUN` in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright, as
tests/test_web.py does), one question asked greedily, the page with its streamed answer captured.

    python docs/img/screenshot.py runs/self "Who are you?|What is the capital of France?" docs/img/web.png
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(run: str, question: str, out: str) -> None:
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "lowtune.cli", "web", run, "--port", str(port)],
                              env=dict(os.environ))
    try:
        for _ in range(1200):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.set_default_timeout(300_000)  # a loaded CPU renders slowly
            page.goto(url)
            box = page.get_by_placeholder("Type a message...")
            box.wait_for(timeout=120_000)
            for label, value in (("Temperature", "0"), ("Max new tokens", "80")):
                field = page.get_by_label(label, exact=False).locator("xpath=..").locator("input[type=number]")
                field.first.fill(value)
                field.first.press("Enter")
            for n, text in enumerate(question.split("|"), 1):  # several questions: "Who are you?|2+2?"
                box.fill(text)
                box.press("Enter")
                page.wait_for_function(f"""() => document.querySelectorAll('#lowtune-chat .message.bot:not(.pending)')
                    .length >= {n} && document.querySelector('button[aria-label="Retry"]:not([disabled])') !== null
                    && document.querySelector('button.stop-button') === null""", timeout=300_000)
            page.screenshot(path=out, full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
