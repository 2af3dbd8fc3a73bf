"""An OpenAI-compatible HTTP facade over the bus: `tunebus serve --openai`.

    GET  /v1/models              every registered version (name:version), its aliases
                                 (name@latest, name@production) and their base models
    POST /v1/chat/completions    tunebus.v1.inference.generate; `stream: true` as server-sent
                                 events (chat.completion.chunk ..., then [DONE])

The caller's API key is its tunebus identity, `<nats user>:<password>`: each request goes to the
bus on a connection as that user, so the NATS server's permissions decide (an observer may list
models but not generate: 403). A model id with a "/" (s3://..., a hub id) is a base model alone;
anything else is an adapter ref.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator

import nats
from pydantic import SecretStr, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from tunebus.contracts import ChatMessage, Generate, Generation, ListAdapters, subjects
from tunebus.contracts.registry import AdapterList
from tunebus.shared.cli import client
from tunebus.shared.settings import NatsAuth, Settings

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": None,
                                       "code": self.code}}, status_code=self.status)


def create_app(settings: Settings) -> Starlette:
    connections: dict[tuple[str, str], nats.NATS] = {}

    async def bus(request: Request) -> nats.NATS:
        """The connection of the caller's identity (opened on its first request)."""
        key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        user, sep, password = key.partition(":")
        if not sep or not user:
            raise ApiError(401, "the API key is your tunebus identity, <user>:<password>",
                           "authentication_error", "invalid_api_key")
        if (user, password) not in connections:
            caller = settings.model_copy(update={"nats": NatsAuth(user=user, password=SecretStr(password))})
            try:
                connections[(user, password)] = await client.open_connection(caller)
            except client.PermissionDenied:
                raise ApiError(401, f"the NATS server refused the identity {user!r}",
                               "authentication_error", "invalid_api_key") from None
        return connections[(user, password)]

    async def models(request: Request) -> JSONResponse:
        nc = await bus(request)
        entries, cursor = [], None
        while True:
            page = await _ask(nc, subjects.REGISTRY_LIST, ListAdapters(cursor=cursor, limit=1000), AdapterList)
            if page.error:
                raise ApiError(502, page.error, "api_error")
            entries += page.adapters
            if not (cursor := page.next_cursor):
                break
        data: dict[str, int] = {}
        for entry in entries:
            created = int(entry.created_at.timestamp())
            data.setdefault(entry.base_model, created)
            data[entry.ref] = created
            for alias in entry.aliases:
                data[f"{entry.name}@{alias}"] = created
        return JSONResponse({"object": "list", "data": [
            {"id": model, "object": "model", "created": created, "owned_by": "tunebus"}
            for model, created in sorted(data.items())]})

    async def chat_completions(request: Request):
        nc = await bus(request)
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the body is not JSON") from None
        generate = _generate_request(body)
        model = body["model"]
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not generate.stream:
            reply = await _generate(nc, generate)
            return JSONResponse({
                "id": completion_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": reply.finish_reason, "logprobs": None}],
                "usage": reply.usage.model_dump(), "system_fingerprint": reply.adapter or model})
        return StreamingResponse(_events(nc, generate, completion_id, created, model),
                                 media_type="text/event-stream")

    def errors(handler):
        async def wrapped(request: Request):
            try:
                return await handler(request)
            except ApiError as e:
                return e.response()
        return wrapped

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for nc in connections.values():
            await nc.close()

    return Starlette(routes=[Route("/v1/models", errors(models), methods=["GET"]),
                             Route("/v1/chat/completions", errors(chat_completions), methods=["POST"])],
                     lifespan=lifespan)


def _generate_request(body: dict) -> Generate:
    """The bus request for an OpenAI chat completion body; ApiError 400 naming what is wrong."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise ApiError(400, "model: required, a string")
    messages = []
    for i, message in enumerate(body.get("messages") or []):
        role = ROLES.get(message.get("role"))
        if role is None:
            raise ApiError(400, f"messages[{i}].role: {message.get('role')!r} is not supported "
                           f"(one of {', '.join(ROLES)})")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if any(part.get("type") != "text" for part in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported")
            content = "".join(part.get("text", "") for part in content)
        messages.append(ChatMessage(role=role, content=content or ""))
    if body.get("n", 1) != 1:
        raise ApiError(400, "n: only 1 is supported")
    stop = body.get("stop") or []
    model = body["model"]
    fields = {"messages": messages or None, "stream": bool(body.get("stream")),
              "stop": [stop] if isinstance(stop, str) else stop,
              **({"base_model": model} if "/" in model else {"adapter": model})}
    for theirs, ours in (("max_completion_tokens", "max_tokens"), ("max_tokens", "max_tokens"),
                         ("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed")):
        if body.get(theirs) is not None:
            fields.setdefault(ours, body[theirs])
    try:
        return Generate(**fields)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, p['loc'])) or 'messages'}: {p['msg']}" for p in e.errors())
        raise ApiError(400, problems) from None


async def _generate(nc, request: Generate, on_text=None) -> Generation:
    try:
        reply = await client.generate(nc, request, on_text)
    except client.PermissionDenied as e:
        raise ApiError(403, str(e), "permission_error") from None
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        raise ApiError(503, "no evaluator answered tunebus.v1.inference.generate", "api_error") from None
    if reply.error:
        status = {"not_found": 404, "deleted": 404, "unavailable": 503, "timeout": 504,
                  "failed": 500}.get(reply.error_kind, 400)
        raise ApiError(status, reply.error, code="model_not_found" if status == 404 else None)
    return reply


async def _events(nc, request: Generate, completion_id: str, created: int, model: str) -> AsyncIterator[str]:
    """A streamed chat completion as OpenAI's server-sent events."""
    import asyncio

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        return "data: " + json.dumps({
            "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            **extra}) + "\n\n"

    pieces: asyncio.Queue = asyncio.Queue()

    async def on_text(text: str) -> None:
        await pieces.put(text)

    task = asyncio.ensure_future(_generate(nc, request, on_text))
    task.add_done_callback(lambda _: pieces.put_nowait(None))
    yield chunk({"role": "assistant", "content": ""})
    while (piece := await pieces.get()) is not None:
        yield chunk({"content": piece})
    try:
        reply = await task
    except ApiError as e:  # the status line is sent already: the error goes in the stream
        yield "data: " + json.dumps({"error": {"message": e.message, "type": e.kind, "code": e.code}}) + "\n\n"
        return
    yield chunk({}, reply.finish_reason, usage=reply.usage.model_dump())
    yield "data: [DONE]\n\n"


async def _ask(nc, subject, query, reply):
    try:
        return await client.ask(nc, subject, query, reply)
    except client.PermissionDenied as e:
        raise ApiError(403, str(e), "permission_error") from None
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        raise ApiError(503, f"no service answered {subject}", "api_error") from None

