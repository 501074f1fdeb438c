"""`lowtune serve` for real: the CLI starts uvicorn on loopback, the official `openai` client talks to it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from fakes.loopback import concurrent_load, free_port, running

KEY = "sk-lowtune-test"
MODEL = "builtin:micro"
HI = [{"role": "user", "content": "Who are you?"}]
REQUEST_TIMEOUT = 2  # seconds a client has for its request head and body (slowloris bound; default 10)


@pytest.fixture(scope="module")
def server(tmp_path_factory, micro_dir):
    """`lowtune serve builtin:micro --api-key KEY` in a subprocess (default host), for the whole module."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "LOWTUNE_API_KEY": ""}
    env.pop("LOWTUNE_API_KEY")
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "lowtune.cli", "serve", MODEL, "--port", str(port), "--api-key", KEY,
               "--request-timeout", str(REQUEST_TIMEOUT)]
    with running(command, f"{base}/health", log, env) as proc:
        yield {"base": base, "port": port, "log": log, "pid": proc.pid}


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server['base']}/v1", api_key=KEY, max_retries=0, timeout=120)


def listening_addresses(port: int) -> list[str]:
    """Local addresses of LISTEN sockets on `port`, read from /proc/net/tcp and tcp6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, state = fields[1], fields[3]
            host_hex, port_hex = address.split(":")
            if int(port_hex, 16) == port and state == "0A":
                found.append(socket.inet_ntoa(bytes.fromhex(host_hex)[::-1]) if len(host_hex) == 8 else host_hex)
    return found


def test_binds_to_loopback_by_default_and_says_how_to_call_it(server):
    assert listening_addresses(server["port"]) == ["127.0.0.1"]
    out = server["log"].read_text()
    assert f"serving {MODEL} at http://127.0.0.1:{server['port']}/v1" in out
    assert "key: required" in out and KEY not in out  # the key itself is never printed


def test_health_and_models(server, client):
    assert httpx.get(f"{server['base']}/health").json()["status"] == "ok"
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_answer_streamed_and_not_agree_and_count_tokens(client):
    whole = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, temperature=0)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].message.role == "assistant"
    usage = whole.usage
    assert usage.prompt_tokens > 5 and 1 <= usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    stream = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2  # tokens arrive as separate server-sent events
    assert "".join(deltas).strip() == text  # one code path: greedy answers are identical
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.model_dump() == usage.model_dump()


def test_finish_reason_length_and_stop_strings(client):
    short = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    full = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].message.content
    assert text.startswith(cut.choices[0].message.content)


def test_bad_or_missing_key_is_401(server):
    bad = openai.OpenAI(base_url=f"{server['base']}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # no key at all, and the key is checked before the body is even parsed
    response = httpx.post(f"{server['base']}/v1/chat/completions", content=b"{not json")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server['base']}/health").status_code == 200  # health needs no key


@pytest.mark.parametrize("change, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"temperature": 7}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"messages": HI * 300}, "messages"),
])
def test_bad_body_is_400_openai_style(client, change, param):
    body = {"model": MODEL, "messages": HI, "max_tokens": 4, **change}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**body)
    error = err.value.body
    assert err.value.status_code == 400
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_invalid_json_and_unknown_model(server, client):
    response = httpx.post(f"{server['base']}/v1/chat/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and MODEL in err.value.body["message"]


def test_oversized_request_is_413(server, client):
    huge = [{"role": "user", "content": "x" * (2 << 20)}]
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model=MODEL, messages=huge, max_tokens=2)
    assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit is enforced while the body streams in
        yield b'{"model": "builtin:micro", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}]}'

    response = httpx.post(f"{server['base']}/v1/chat/completions", content=chunked(),
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_context_overflow_is_400(client):
    long = [{"role": "user", "content": " ".join(["word"] * 3000)}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=long, max_tokens=16)
    assert err.value.body["code"] == "context_length_exceeded"


def test_64_concurrent_clients_all_answered(server, client):
    """Load test: 64 clients at once, half streaming; the model serialises them, none fails."""

    def one(i: int) -> tuple[float, str]:
        own = openai.OpenAI(base_url=f"{server['base']}/v1", api_key=KEY, max_retries=0, timeout=300)
        started = time.perf_counter()
        messages = [{"role": "user", "content": f"Question number {i}?"}]
        if i % 2:
            parts = [c.choices[0].delta.content or "" for c in own.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=8, temperature=0.7, seed=i, stream=True) if c.choices]
            text = "".join(parts)
        else:
            text = own.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0.7,
                                               seed=i).choices[0].message.content
        return time.perf_counter() - started, text

    results, figures = concurrent_load(one)
    assert len(results) == 64 and all(text for _, text in results)
    print(f"\n64 concurrent clients (8 tokens each): {figures}")
    health = httpx.get(f"{server['base']}/health").json()
    assert health["waiting"] == 0 and health["busy"] is False  # every lock was released
    assert client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices[0].message.content


def test_dropped_stream_frees_the_model(server, client):
    """A client that disconnects mid-stream must not keep the model busy for the next one."""
    with httpx.stream("POST", f"{server['base']}/v1/chat/completions",
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "messages": HI, "max_tokens": 900, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content": "' in line and json.loads(line[6:])["choices"]:
                break
    started = time.perf_counter()
    answer = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, temperature=0)
    assert answer.choices[0].message.content
    assert time.perf_counter() - started < 8  # generating the 900 abandoned tokens would take far longer


def test_busy_port_is_a_user_error_before_loading(capsys):
    from lowtune.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", MODEL, "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
        assert main(["web", MODEL, "--port", str(port)]) == 2
        assert "pass another --port" in capsys.readouterr().err


def test_help_imports_no_server_ui_or_hub_library():
    code = ("import sys; from lowtune.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'gradio', 'fastapi', 'uvicorn', 'huggingface_hub', 'modelscope', "
            "'openai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_api_key_from_flag_or_environment(monkeypatch):
    from lowtune.errors import UserError
    from lowtune.infer.serve import API_KEY_ENV, resolve_api_key

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert resolve_api_key(None) is None
    monkeypatch.setenv(API_KEY_ENV, "sk-env")
    assert resolve_api_key(None) == "sk-env" and resolve_api_key("sk-flag") == "sk-flag"
    monkeypatch.setenv(API_KEY_ENV, "  ")
    with pytest.raises(UserError, match=API_KEY_ENV):
        resolve_api_key(None)


# --- hostile clients (issue 19) -------------------------------------------------------------------------------------

def raw(server, data: bytes, timeout: float = 10) -> bytes:
    """Send `data` on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def post(body: bytes) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json"
            b"\r\nAuthorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


@pytest.mark.parametrize("body", [
    b"[" * 200_000 + b"]" * 200_000,                             # nested past the parser's recursion limit
    b'{"model": "builtin:micro", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b"\xff\xfe{\x00\"\x00",                                       # not UTF-8
    b'{"model": 5, "messages": {"role": "user"}}',                # wrong types
    b'{"model": "builtin:micro", "messages": [{"role": "user", "content": "\\ud800"}]}',  # lone surrogate
    b'{"model": "builtin:micro", "messages": [{"role": "user"}], "max_tokens": 1e400}',
    b"null", b"", b'"just a string"',
])
def test_malformed_bodies_are_4xx_json_and_the_server_goes_on(server, client, body):
    status, _, rest = raw(server, post(body)).partition(b"\r\n")
    code = int(status.split()[1])
    assert 400 <= code < 500, (code, rest[-300:])
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["message"]
    assert client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices[0].message.content


def test_too_many_tokens_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=5000)
    assert err.value.body["param"] == "max_tokens"


def test_slow_clients_are_cut_off_while_others_are_served(server, client):
    """slowloris: 100 connections that trickle a request head, and one that trickles its body."""
    heads = []
    for _ in range(100):
        sock = socket.create_connection(("127.0.0.1", server["port"]), timeout=30)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        heads.append(sock)
    body = socket.create_connection(("127.0.0.1", server["port"]), timeout=30)
    body.sendall(post(b'{"model": "builtin:micro", "messages": []}')[:-20])  # head complete, body not
    started = time.perf_counter()
    answer = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    served_in = time.perf_counter() - started
    assert answer.choices[0].message.content and served_in < 30  # not held up by the 101 slow connections
    for sock in heads[:10]:
        sock.sendall(b"X-Slow: 1\r\n")  # still trickling: the deadline is for the whole head
    closed, deadline = 0, started + REQUEST_TIMEOUT + 3
    for sock in [*heads, body]:
        sock.settimeout(max(deadline - time.perf_counter(), 0.01))
    for sock in heads:
        try:
            closed += sock.recv(1024) == b""
        except (ConnectionResetError, TimeoutError):
            pass
        sock.close()
    try:
        reply = body.recv(65536)
    except TimeoutError:
        reply = b"(no reply)"
    cut_off = time.perf_counter() - started
    body.close()
    assert closed == 100 and b" 408 " in reply.split(b"\r\n")[0], reply[:200]
    assert cut_off < REQUEST_TIMEOUT + 5
    assert client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices[0].message.content


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_disconnects_mid_stream_stop_generation_and_leak_no_thread(server, client):
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)  # thread pools warmed up
    before = threads(server["pid"])
    for _ in range(20):
        with httpx.stream("POST", f"{server['base']}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": MODEL, "messages": HI, "max_tokens": 2000, "stream": True}) as response:
            for line in response.iter_lines():
                if '"content": "' in line:
                    break
    started = time.perf_counter()
    assert client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices[0].message.content
    assert time.perf_counter() - started < 20  # 20 x 2000 abandoned tokens were not generated
    deadline = time.monotonic() + 10
    while threads(server["pid"]) > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert threads(server["pid"]) <= before
    health = httpx.get(f"{server['base']}/health").json()
    assert health["busy"] is False and health["waiting"] == 0
