"""The evaluator's inference API: what it hears on `tunebus.v1.inference.*` and says back.

    inference.generate   Generate -> Generation (streamed: GenerationChunk..., Generation)
    inference.adapters   ListLoadedAdapters -> LoadedAdapters
    inference.load       LoadAdapter -> AdapterLoadReply
    inference.unload     UnloadAdapter -> AdapterLoadReply

Every subscriber is in the `evaluator` queue group (one worker answers each request) and takes
at most `evaluator.inference.max_concurrent` requests at a time; the rest wait in NATS.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import structlog
from faststream.nats import NatsMessage, NatsRouter
from pydantic import BaseModel, ValidationError

from tunebus.contracts import (
    AdapterEntry,
    AdapterLoadReply,
    AdapterReply,
    Generate,
    Generation,
    GenerationChunk,
    ListLoadedAdapters,
    LoadAdapter,
    LoadedAdapters,
    ResolveAdapter,
    UnloadAdapter,
    subjects,
)
from tunebus.shared.delivery import field_errors
from tunebus.shared.service import Service

from .inference import Inference, InferenceError

log = structlog.get_logger()
RESOLVE_TIMEOUT_S = 10.0


def inference_router(service: Service, queue: str) -> NatsRouter:
    settings = service.settings
    broker = service.broker
    options = settings.evaluator.inference
    router = NatsRouter()

    async def resolve(ref: str) -> AdapterEntry:
        try:
            reply = await broker.request(ResolveAdapter(ref=ref).model_dump(mode="json"),
                                         subject=subjects.REGISTRY_RESOLVE, timeout=RESOLVE_TIMEOUT_S)
        except TimeoutError:
            raise InferenceError(f"the adapter-registry did not answer {subjects.REGISTRY_RESOLVE} "
                                 f"for {ref!r} within {RESOLVE_TIMEOUT_S:.0f}s", "unavailable") from None
        answer = AdapterReply.model_validate_json(reply.body)
        if answer.error or answer.entry is None:
            raise InferenceError(f"adapter {ref!r}: {answer.error or 'not found'}", "not_found")
        if answer.entry.deleted:
            raise InferenceError(f"adapter {answer.entry.ref} is deleted", "deleted")
        return answer.entry

    inference = Inference(service.store, settings, resolve, f"{socket.gethostname()}:{os.getpid()}")
    concurrency = {"queue": queue, "max_workers": options.max_concurrent}

    if options.preload_base_model:
        @service.app.after_startup
        async def preload() -> None:
            await inference.preload(options.preload_base_model)

    @router.subscriber(subjects.INFERENCE_GENERATE, **concurrency)
    async def generate(body: Any, message: NatsMessage) -> Generation:
        request = _read(Generate, body, subjects.INFERENCE_GENERATE)
        if isinstance(request, str):
            return Generation(error=request, error_kind="invalid", worker=inference.worker)
        send = None
        if request.stream and message.reply_to:
            index = 0

            async def send(text: str) -> None:
                nonlocal index
                await broker.publish(GenerationChunk(index=index, text=text).model_dump(mode="json"),
                                     subject=message.reply_to)
                index += 1
        try:
            return await inference.generate(request, send)
        except Exception as e:  # a backend failure still gets an answer the caller sees
            log.exception("generation failed")
            return Generation(error=f"generation failed: {e!r}", error_kind="failed",
                              worker=inference.worker)

    @router.subscriber(subjects.INFERENCE_ADAPTERS, **concurrency)
    async def adapters(body: Any) -> LoadedAdapters:
        if isinstance(request := _read(ListLoadedAdapters, body, subjects.INFERENCE_ADAPTERS), str):
            return LoadedAdapters(error=request)
        return inference.loaded(request.name)

    @router.subscriber(subjects.INFERENCE_LOAD, **concurrency)
    async def load(body: Any) -> AdapterLoadReply:
        if isinstance(request := _read(LoadAdapter, body, subjects.INFERENCE_LOAD), str):
            return AdapterLoadReply(error=request)
        return await inference.load(request.ref)

    @router.subscriber(subjects.INFERENCE_UNLOAD, **concurrency)
    async def unload(body: Any) -> AdapterLoadReply:
        if isinstance(request := _read(UnloadAdapter, body, subjects.INFERENCE_UNLOAD), str):
            return AdapterLoadReply(error=request)
        return await inference.unload(request.ref)

    router.inference = inference  # for tests and benchmarks in-process
    return router


def _read(model: type[BaseModel], body, subject: str):
    """The request, or the error that names each bad field (FastStream would not answer)."""
    try:
        return model.model_validate(body if isinstance(body, dict) else {})
    except ValidationError as e:
        return f"invalid request on {subject}: {'; '.join(field_errors(e))}"
