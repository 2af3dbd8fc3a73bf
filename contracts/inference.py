"""Generation with a registered adapter (or the bare base model), over request/reply.

Served by the evaluator, which keeps a base model loaded and swaps adapters in and out of an
LRU cache. Plain JSON bodies, like the registry's API: nothing here is a fact to store.

Streaming (`stream: true`): the answer comes as several messages on the request's reply subject
(the requester's inbox): zero or more `GenerationChunk`s (`done: false`, each a piece of text in
order, `index` counting from 0), then one `Generation` (`done: true`) with the whole text, the
token counts and the timings. A plain `request()` (first reply only) must not ask to stream;
subscribe to an inbox of your own and publish the request with it as the reply subject.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field, model_validator

from .envelope import Model
from .registry import REF_DESCRIPTION

MAX_TOKENS_LIMIT = 4096  # the most new tokens one request may ask for (and chunks it may stream)
MAX_STOP = 4
ErrorKind = Literal["not_found", "deleted", "invalid", "unavailable", "timeout", "failed"]


class ChatMessage(Model):
    role: Literal["system", "user", "assistant"]
    content: str


class Generate(Model):
    """Generate text with the base model of `adapter` and the adapter applied, or, without an
    adapter, with `base_model` alone. Give `messages` (rendered by the model's chat template) or
    a raw `prompt`, not both."""

    prompt: str | None = Field(default=None, description="Raw text, continued as is.")
    messages: list[ChatMessage] | None = Field(
        default=None, min_length=1, description="A chat, answered as the assistant.")
    adapter: str | None = Field(default=None, description=f"The adapter: {REF_DESCRIPTION}. "
                                "None: the base model alone (then base_model is required).")
    base_model: str | None = Field(
        default=None, description="The base model without an adapter (as a training request "
        "names it: s3://..., a hub id). With an adapter, its own base model is used; a different "
        "one here is an error.")
    max_tokens: int = Field(default=256, ge=1, le=MAX_TOKENS_LIMIT)
    stop: list[str] = Field(default=[], max_length=MAX_STOP,
                            description="Generation ends before the first of these strings.")
    temperature: float = Field(default=0.0, ge=0, le=2, description="0: greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, description="0: no top-k cut.")
    seed: int | None = Field(default=None, description="Makes sampling repeatable.")
    stream: bool = Field(default=False, description="Send GenerationChunks before the Generation.")

    @model_validator(mode="after")
    def _one_input(self) -> Generate:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if any(s == "" for s in self.stop):
            raise ValueError("stop: an empty string would stop at once")
        return self


class Usage(Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Timings(Model):
    """Seconds, measured in the worker from the moment it took the request."""

    resolve_s: float = Field(default=0.0, description="Asking the registry what the ref is.")
    load_s: float = Field(default=0.0, description="Loading the base model or the adapter, "
                          "when this request had to (0: both were in memory).")
    first_token_s: float | None = Field(default=None, description="Until the first new token.")
    total_s: float = 0.0
    tokens_per_s: float | None = Field(
        default=None, description="New tokens per second after the first one.")


class GenerationChunk(Model):
    """One piece of a streamed answer."""

    index: int
    text: str
    done: Literal[False] = False


class Generation(Model):
    """The whole answer (also the last message of a stream)."""

    text: str = ""
    finish_reason: Literal["stop", "length"] | None = Field(
        default=None, description="stop: EOS or a stop string; length: max_tokens reached.")
    adapter: str | None = Field(default=None, description="name:version that answered, or None.")
    base_model: str | None = None
    backend: str | None = None
    worker: str | None = Field(default=None, description="The evaluator instance that answered.")
    usage: Usage = Usage()
    timings: Timings = Timings()
    error: str | None = None
    error_kind: ErrorKind | None = Field(
        default=None, description="What kind of error: not_found (no such adapter), deleted, "
        "invalid (the request), unavailable (no registry, model or backend), timeout, failed.")
    done: Literal[True] = True


class ListLoadedAdapters(Model):
    """What the answering worker holds in memory."""

    name: str | None = Field(default=None, description="Only versions of this adapter (None: all).")


class LoadedAdapter(Model):
    ref: str = Field(description="name:version")
    base_model: str
    loaded_at: datetime
    last_used: datetime
    uses: int = 0
    load_s: float = 0.0


class LoadedAdapters(Model):
    worker: str | None = None
    base_model: str | None = Field(default=None, description="The base model in memory.")
    capacity: int = Field(default=0, description="Adapters kept at most (LRU).")
    adapters: list[LoadedAdapter] = Field(default=[], description="Most recently used last.")
    error: str | None = None


class LoadAdapter(Model):
    """Load an adapter (and its base model) now, so the first generation does not wait."""

    ref: str = Field(description=REF_DESCRIPTION)


class UnloadAdapter(Model):
    ref: str = Field(description="name:version or name@alias, as loaded")


class AdapterLoadReply(Model):
    ref: str | None = Field(default=None, description="name:version")
    loaded: bool = Field(default=False, description="In memory after this request.")
    evicted: list[str] = Field(default=[], description="Adapters dropped to make room.")
    seconds: float = 0.0
    worker: str | None = None
    error: str | None = None
