"""`lowtune serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over one chat engine.

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` (a JSON answer, or server-sent events with
`"stream": true`). Answers come from `ChatEngine.stream`, the same code path as `lowtune chat`, so the template and
stop ids are the ones the model folder or run folder names.

The model is not thread-safe: one generation runs at a time (an asyncio lock in front of the engine's own lock);
waiting requests queue without holding a thread, and past `max_waiting` a request is refused with 503 at once.
Requests are validated by pydantic (message count, max_tokens, sampling ranges) and by an ASGI guard on the body
size; every error is an OpenAI-style body `{"error": {"message", "type", "param", "code"}}` so official clients
raise their usual exceptions. An optional bearer key (`--api-key` or `$LOWTUNE_API_KEY`) guards `/v1/*`.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lowtune.errors import UserError, require
from lowtune.generation import Sampling
from lowtune.infer.engine import ChatEngine

API_KEY_ENV = "LOWTUNE_API_KEY"
DONE = object()


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Larger requests get a 4xx answer, never a crash or a stall."""

    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_tokens: int = 4096
    default_max_tokens: int = 512
    max_waiting: int = 512
    """Requests allowed to queue for the model; beyond this the server answers 503 at once."""
    request_seconds: float = 10.0
    """Time a client has to send a request's head, and again its body: a slow client (slowloris) is cut off."""


# --- request and errors -------------------------------------------------------------------------------------------

class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _valid_unicode(cls, content: str | list[TextPart]) -> str | list[TextPart]:
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone \\ud800 escape: valid JSON, but no tokenizer takes it
            raise ValueError("the text holds an unpaired surrogate escape (like \\ud800); send valid Unicode") \
                from None
        return content

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat.completions request that a local model honours; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ApiError(Exception):
    """An error answered as OpenAI does: HTTP status plus {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(errors: list[dict]) -> ApiError:
    """The first pydantic/FastAPI validation error as a 400 naming the offending field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request body"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON ({first.get('msg', 'decode error')})", code="invalid_json")
    param = ".".join(loc) or None
    where = f" ({param})" if param else ""
    code = "invalid_value"
    return ApiError(400, f"{first.get('msg', 'invalid value')}{where}", param=param, code=code)


# --- generation ---------------------------------------------------------------------------------------------------

class MeteredModel:
    """Wraps a transformers/peft model to record how many tokens each `generate` call produced and the last one.

    The streaming path yields text, not ids; usage counts and finish_reason need the ids. Every other attribute is
    the wrapped model's own.
    """

    def __init__(self, model: Any) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "new_tokens", 0)
        object.__setattr__(self, "last_token", None)

    def reset(self) -> None:
        object.__setattr__(self, "new_tokens", 0)
        object.__setattr__(self, "last_token", None)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        prompt_len = kwargs["input_ids"].shape[1]
        out = self._model.generate(*args, **kwargs)
        sequences = out if hasattr(out, "shape") else out.sequences
        new = sequences[0, prompt_len:]
        object.__setattr__(self, "new_tokens", int(new.shape[0]))
        object.__setattr__(self, "last_token", int(new[-1]) if new.shape[0] else None)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._model, name, value)


class StopScanner:
    """Cuts streamed text at the first of the request's stop strings, never emitting part of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if not self.stops:
            return piece
        self.buffer += piece
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.buffer = self.buffer[:min(hits)], ""
            return out
        cut = max(len(self.buffer) - self.hold, 0)
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


@dataclass
class Outcome:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class Job:
    messages: list[dict]
    max_tokens: int | None
    sampling: Sampling
    stops: list[str]
    outcome: Outcome = field(default_factory=Outcome)


class Generator:
    """Runs one generation at a time on the engine and hands its text to asyncio code piece by piece.

    The asyncio lock is taken before a job starts and released by the worker thread when its generation ends, so a
    client that disconnects mid-stream (its coroutine cancelled, its iterator never closed) cannot leave the lock
    held: the worker sees the cancel flag at the next token and lets the next request in.
    """

    def __init__(self, engine: ChatEngine, limits: Limits) -> None:
        if not isinstance(engine.model, MeteredModel):
            engine.model = MeteredModel(engine.model)
        self.engine, self.limits = engine, limits
        self.lock = asyncio.Lock()
        self.waiting = 0

    async def run(self, job: Job) -> AsyncIterator[str]:
        """Yield the answer's text; `job.outcome` is complete once the iterator ends."""
        await self._acquire()
        try:
            await asyncio.to_thread(self._prepare, job)
        except BaseException:
            self.lock.release()
            raise
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        threading.Thread(target=self._produce, args=(job, loop, queue, cancel), daemon=True).start()
        scanner = StopScanner(job.stops)
        try:
            while not scanner.stopped:
                item = await queue.get()
                if item is DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                text = scanner.feed(item)
                if text:
                    yield text
            rest = scanner.flush()
            if rest and not scanner.stopped:
                yield rest
        finally:
            cancel.set()  # no-op when generation ended; otherwise it stops at the next token
        if scanner.stopped:
            job.outcome.finish_reason = "stop"

    async def _acquire(self) -> None:
        if self.waiting >= self.limits.max_waiting:
            raise ApiError(503, f"server busy: {self.waiting} requests are waiting; retry later",
                           type_="server_error", code="server_busy")
        self.waiting += 1
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1

    def _prepare(self, job: Job) -> None:
        """Count the prompt and fix max_new_tokens so prompt + answer fit the model's context."""
        try:
            prompt = self.engine.prompt_length(job.messages)
        except UserError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        room = (self.engine.max_context or 1 << 30) - prompt
        wanted = job.max_tokens or min(self.limits.default_max_tokens, room)
        if wanted > room or room <= 0:
            raise ApiError(400, f"this model's context is {self.engine.max_context} tokens; the messages take "
                                f"{prompt} and max_tokens asks for {wanted}: shorten them or lower max_tokens",
                           param="messages", code="context_length_exceeded")
        job.sampling.max_new_tokens = wanted
        job.outcome.prompt_tokens = prompt

    def _produce(self, job: Job, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue,
                 cancel: threading.Event) -> None:
        """Worker thread: stream the answer into `queue`, record the outcome, then release the lock."""
        self.engine.model.reset()
        pieces = self.engine.stream(job.messages, job.sampling)
        try:
            for piece in pieces:
                loop.call_soon_threadsafe(queue.put_nowait, piece)
                if cancel.is_set():
                    break
        except BaseException as exc:  # handed to the request's coroutine
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            pieces.close()
            self._record(job)
            loop.call_soon_threadsafe(queue.put_nowait, DONE)
            loop.call_soon_threadsafe(self.lock.release)

    def _record(self, job: Job) -> None:
        meter: MeteredModel = self.engine.model
        job.outcome.completion_tokens = meter.new_tokens
        hit_limit = meter.new_tokens >= job.sampling.max_new_tokens
        ended = meter.last_token in self.engine.all_stop_ids()
        job.outcome.finish_reason = "length" if hit_limit and not ended else "stop"


# --- the app ------------------------------------------------------------------------------------------------------

def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class Gate:
    """ASGI guard in front of the app: the bearer key on /v1/* and the body-size limit, before any body is read.

    A wrong key is refused before the body is parsed (as OpenAI does); a body above `limit` bytes gets 413 from its
    Content-Length, or as soon as a chunked body passes the limit.
    """

    def __init__(self, app: Any, limit: int, api_key: str | None, body_seconds: float = 10.0) -> None:
        self.app, self.limit, self.api_key, self.body_seconds = app, limit, api_key, body_seconds

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if scope["path"].startswith("/v1/") and not self._authorised(headers.get(b"authorization", b"")):
            return await self._refuse(send, ApiError(
                401, "invalid or missing API key: send 'Authorization: Bearer <key>' with the key the server was "
                     "started with", code="invalid_api_key"))
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, self._too_large(int(declared)))
        from starlette.exceptions import HTTPException  # what FastAPI lets through from reading a body

        seen, body_done, deadline = 0, False, time.monotonic() + self.body_seconds

        async def counted() -> dict:
            nonlocal seen, body_done
            if body_done:  # later calls wait for a disconnect while the answer streams: no deadline then
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
                raise HTTPException(408, f"the request body did not arrive within {self.body_seconds:g}s") from None
            body_done = not message.get("more_body", False)
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, self._too_large(seen).message)
            return message

        await self.app(scope, counted, send)

    def _authorised(self, header: bytes) -> bool:
        if self.api_key is None:
            return True
        scheme, _, given = header.decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), self.api_key.encode())

    def _too_large(self, size: int) -> ApiError:
        return ApiError(413, f"request body is {size} bytes; this server accepts at most {self.limit}",
                        code="request_too_large")

    @staticmethod
    async def _refuse(send: Callable, error: ApiError) -> None:
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if error.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def create_app(engine: ChatEngine, api_key: str | None = None, limits: Limits | None = None) -> Gate:
    """The ASGI app serving `engine`: the FastAPI routes behind the key/size gate.

    The app then owns the engine: its model gets a token meter (`MeteredModel`).
    """
    fastapi = require("fastapi", "serve", "lowtune serve")
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or Limits()
    app = fastapi.FastAPI(title=f"lowtune · {engine.name}", docs_url=None, redoc_url=None)
    generator = Generator(engine, limits)
    created = int(time.time())

    def error_response(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(ApiError)
    async def on_api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request, exc: RequestValidationError):
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
                413: "request_too_large"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def on_crash(request, exc: Exception):
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.name, "waiting": generator.waiting,
                "busy": generator.lock.locked()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": created,
                                            "owned_by": "lowtune"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest):
        job = make_job(request, engine, limits)
        cid, now = _completion_id(), int(time.time())
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            pieces = generator.run(job)
            first = await _first_piece(pieces)  # errors before the first token still get a proper status
            return StreamingResponse(_stream_events(pieces, first, job, cid, now, engine.name, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text = "".join([piece async for piece in generator.run(job)])
        return {"id": cid, "object": "chat.completion", "created": now, "model": engine.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text.strip()},
                             "logprobs": None, "finish_reason": job.outcome.finish_reason}],
                "usage": job.outcome.usage()}

    return Gate(app, limits.max_body_bytes, api_key, limits.request_seconds)


def make_job(request: ChatRequest, engine: ChatEngine, limits: Limits) -> Job:
    """Check what pydantic cannot (limits set at start-up, the model name) and build the generation job."""
    if request.model not in (engine.name, "", "default"):
        raise ApiError(404, f"model '{request.model}' is not served here; this server serves '{engine.name}' "
                            "(see GET /v1/models)", param="model", code="model_not_found")
    if len(request.messages) > limits.max_messages:
        raise ApiError(400, f"{len(request.messages)} messages; this server accepts at most {limits.max_messages}",
                       param="messages", code="too_many_messages")
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of {limits.max_tokens}",
                       param="max_tokens", code="invalid_value")
    stops = request.stop_strings()
    if len(stops) > 4:
        raise ApiError(400, "at most 4 stop sequences", param="stop", code="invalid_value")
    sampling = Sampling(temperature=request.temperature, top_p=request.top_p, seed=request.seed)
    return Job(messages=[m.as_dict() for m in request.messages], max_tokens=max_tokens, sampling=sampling,
               stops=stops)


async def _first_piece(pieces: AsyncIterator[str]) -> str | None:
    try:
        return await pieces.__anext__()
    except StopAsyncIteration:
        return None


async def _prepend(first: str | None, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    if first is None:
        return
    yield first
    async for piece in rest:
        yield piece


async def _stream_events(pieces: AsyncIterator[str], first: str | None, job: Job, cid: str, created: int,
                         model: str, include_usage: bool) -> AsyncIterator[str]:
    yield _sse(_chunk(cid, created, model, {"role": "assistant", "content": ""}))
    started = False  # leading whitespace is dropped, as from the whole answer when not streaming
    try:
        async for piece in _prepend(first, pieces):
            if not started:
                piece = piece.lstrip()
                started = bool(piece)
            if piece:
                yield _sse(_chunk(cid, created, model, {"content": piece}))
    except ApiError as exc:
        yield _sse(exc.body())
    except Exception as exc:  # the status line is already sent: report it in the stream
        yield _sse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error").body())
    finally:
        await pieces.aclose()
    yield _sse(_chunk(cid, created, model, {}, job.outcome.finish_reason))
    if include_usage:
        yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": job.outcome.usage()})
    yield _sse("[DONE]")


# --- slow clients -------------------------------------------------------------------------------------------------

def deadline_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request head is not complete `seconds` after the
    connection opened or after its previous answer. uvicorn alone waits for a partial head forever (slowloris)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineProtocol(H11Protocol):
        head_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request head arrived
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self.head_deadline = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
                self.head_deadline = None

        def _expire(self) -> None:
            self.head_deadline = None
            if self.cycle is None or self.cycle.response_complete:  # still waiting for a head
                self.transport.close()

    return DeadlineProtocol


# --- the command --------------------------------------------------------------------------------------------------

def check_port(host: str, port: int, flag: str = "--port") -> None:
    """A UserError now, instead of a server that dies after loading the model, when host:port is taken."""
    if not 0 < port < 65536:
        raise UserError(f"{flag} {port} is not a TCP port (1-65535)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another {flag} "
                            "or stop what is using it") from None


def resolve_api_key(flag: str | None) -> str | None:
    key = flag if flag is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise UserError(f"--api-key / ${API_KEY_ENV} is empty; give a non-empty key or leave both unset")
    return key.strip() if key else None


def serve(engine: ChatEngine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: Limits | None = None, log_level: str = "info") -> None:
    """Serve `engine` until Ctrl-C (blocking)."""
    uvicorn = require("uvicorn", "serve", "lowtune serve")
    limits = limits or Limits()
    app = create_app(engine, api_key, limits)
    base = f"http://{host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{port}/v1"
    print(f"serving {engine.name} at {base} (OpenAI-compatible: /v1/chat/completions, /v1/models, /health)")
    print(f"  key: {'required (Authorization: Bearer ...)' if api_key else 'none'} · "
          f"template {engine.template.name} · stop ids {engine.all_stop_ids()}")
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"  warning: listening on {host} without a key; anyone who can reach this port can use the model "
              f"(add --api-key or set ${API_KEY_ENV})")
    print(f"  try: curl {base}/chat/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{engine.name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}]}}'",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                http=deadline_protocol(limits.request_seconds))
