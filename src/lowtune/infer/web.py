"""`lowtune web`: a Gradio chat page over the chat engine, for a browser on this machine or through an SSH tunnel.

The page streams each answer from `ChatEngine.stream` (the same generator as `lowtune chat`), with a system prompt,
temperature / top-p / max-new-tokens controls, and Gradio's chat buttons (clear, retry, undo, stop). It is served
locally only: no share link, no analytics, nothing fetched from the internet (system fonts; Gradio's bundled
front end). Address: `--host/--port`, else `$GRADIO_SERVER_NAME/$GRADIO_SERVER_PORT`, else 127.0.0.1:6006; the
`ssh -L` line that reaches it from a laptop is printed at start.

Gradio's app is mounted on our own uvicorn server with `serve`'s slow-client bounds: a client has
`--request-timeout` seconds for each request head and again for its body, then its connection is closed (408 for a
body), so a few trickling connections cannot hold the page's sockets.
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from lowtune.errors import UserError, require
from lowtune.generation import Sampling
from lowtune.infer.chat import Conversation, fit_context
from lowtune.infer.engine import ChatEngine
from lowtune.infer.serve import Gate, Limits, check_port, deadline_protocol

if TYPE_CHECKING:
    import gradio as gr

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6006
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
MONO_FONTS = ("ui-monospace", "monospace")
WEB_BODY_BYTES = 16 << 20
"""Each queue request carries the whole chat history (3 bytes a character of CJK text in JSON)."""


def resolve_address(host: str | None, port: int | None) -> tuple[str, int]:
    """Flags win, then Gradio's own variables, then 127.0.0.1:6006 (this machine only)."""
    host = host or os.environ.get("GRADIO_SERVER_NAME") or DEFAULT_HOST
    if port is None:
        raw = os.environ.get("GRADIO_SERVER_PORT")
        try:
            port = int(raw) if raw else DEFAULT_PORT
        except ValueError:
            raise UserError(f"$GRADIO_SERVER_PORT={raw!r} is not a port number; unset it or pass --port") from None
    return host, port


def tunnel_command(port: int) -> str:
    """The laptop-side command that forwards localhost:PORT here, filled in from $SSH_CONNECTION when known."""
    server, ssh_port = "<host>", "<ssh-port>"
    parts = os.environ.get("SSH_CONNECTION", "").split()
    if len(parts) == 4:
        server, ssh_port = parts[2], parts[3]
    return f"ssh -CNg -L {port}:127.0.0.1:{port} {getpass.getuser()}@{server} -p {ssh_port}"


def message_text(content: Any) -> str:
    """The text of a Gradio chat message, whatever shape this Gradio version gives it."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


def to_conversation(history: list, system: str | None) -> Conversation:
    conversation = Conversation(system=(system or "").strip() or None)
    for message in history:
        role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
        content = message.get("content") if isinstance(message, dict) else getattr(message, "content", "")
        if role in ("user", "assistant"):
            conversation.messages.append({"role": role, "content": message_text(content)})
    return conversation


def reply_stream(engine: ChatEngine, message: str, history: list, system: str, temperature: float, top_p: float,
                 max_new_tokens: float) -> Iterator[str]:
    """The growing answer to `message`, for Gradio to render as it streams.

    When the client hangs up, Gradio closes this generator at its next chunk, which stops `engine.stream`.
    """
    sampling = Sampling(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p))
    conversation = to_conversation(history, system)
    if not fit_context(engine, conversation, message, sampling):
        yield (f"(This message is too long for the model's {engine.max_context}-token context; "
               "shorten it or lower Max new tokens.)")
        return
    answer = ""
    for piece in engine.stream(conversation.for_model(message), sampling):
        answer += piece
        yield answer.lstrip()
    if not answer.strip():
        yield "(empty answer)"


def build_page(engine: ChatEngine) -> gr.Blocks:
    """The chat page: controls on the left, the streaming chat on the right."""
    gr = require("gradio", "web", "lowtune web")

    def respond(message: str, history: list, system: str, temperature: float, top_p: float,
                max_new_tokens: float) -> Iterator[str]:
        yield from reply_stream(engine, message, history, system, temperature, top_p, max_new_tokens)

    adapter = f" + adapter `{engine.adapter_dir}`" if engine.has_adapter else ""
    with gr.Blocks(title=f"lowtune · {engine.name}", analytics_enabled=False) as page:
        gr.Markdown(f"### {engine.name}{adapter}  \ntemplate `{engine.template.name}` · stop ids "
                    f"{engine.all_stop_ids()}")
        with gr.Row():
            with gr.Column(scale=1, min_width=240):
                system = gr.Textbox(value=engine.default_system or "", label="System prompt", lines=4)
                temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="Top-p")
                max_new = gr.Slider(8, _max_new_limit(engine), value=min(512, _max_new_limit(engine)), step=8,
                                    label="Max new tokens")
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(label=engine.name, height=480, elem_id="lowtune-chat",
                                     placeholder="Ask something. The trash button (top right) clears the chat.")
                gr.ChatInterface(respond, chatbot=chatbot, additional_inputs=[system, temperature, top_p, max_new],
                                 fill_height=False, api_name="chat")
    return page


def _max_new_limit(engine: ChatEngine) -> int:
    context = engine.max_context or 4096
    return max(16, min(4096, context // 2 // 16 * 16))


def create_app(engine: ChatEngine, host: str, port: int, limits: Limits) -> Gate:
    """The page as an ASGI app: Gradio's app mounted on FastAPI, behind `serve`'s gate (body size, body deadline).

    No share link, no analytics, no SSR, no MCP server, no monitoring endpoint.
    """
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    gr = require("gradio", "web", "lowtune web")
    fastapi = require("fastapi", "web", "lowtune web")
    page = build_page(engine)
    page.queue(default_concurrency_limit=1)
    theme = gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(MONO_FONTS))
    app = fastapi.FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app = gr.mount_gradio_app(app, page, path="/", server_name=host, server_port=port, show_error=True,
                              ssr_mode=False, theme=theme, mcp_server=False, pwa=False, enable_monitoring=False)
    return Gate(app, limits.max_body_bytes, None, limits.request_seconds)


def web_limits(request_seconds: float) -> Limits:
    """`serve`'s limits, with room for a queue request that carries a long chat history."""
    return Limits(max_body_bytes=WEB_BODY_BYTES, request_seconds=request_seconds)


def launch(engine: ChatEngine, host: str, port: int, limits: Limits) -> None:
    """Serve the page on host:port until Ctrl-C.

    Gradio's own `launch()` builds a uvicorn server that waits forever for a partial request head; this one runs
    `serve`'s uvicorn protocol, which closes a connection whose head is not in after `limits.request_seconds`.
    """
    uvicorn = require("uvicorn", "web", "lowtune web")
    app = create_app(engine, host, port, limits)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                http=deadline_protocol(limits.request_seconds))


def run_web(engine: ChatEngine, host: str, port: int, request_seconds: float) -> None:
    """`lowtune web`: check the port, say where to look (and how to tunnel), then serve until Ctrl-C."""
    check_port(host, port)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(f"chat page for {engine.name}: http://{shown}:{port}  (Ctrl-C stops it)")
    if host in ("127.0.0.1", "localhost", "::1"):
        print(f"on a remote GPU box? on your laptop run:  {tunnel_command(port)}\n"
              f"then open http://127.0.0.1:{port}", flush=True)
    else:
        print(f"listening on {host} ({socket.gethostname()}): anyone who can reach port {port} can use it",
              flush=True)
    launch(engine, host, port, web_limits(request_seconds))
