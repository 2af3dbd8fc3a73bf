"""The adapter family: registered versions, and the registry's request/reply API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from .envelope import Envelope, Model, Payload
from .evaluation import EvaluationCompleted
from .training import AdapterSettings, Artifact, Hyperparameters, TrainingMetrics


class AdapterEntry(Model):
    """One immutable version of an adapter, with where it came from."""

    name: str
    version: int
    ref: str = Field(description="name:version")
    job_id: str
    base_model: str
    base_model_revision: str | None = None
    dataset_sha256: str
    dataset_format: str
    method: str
    adapter: AdapterSettings
    hyperparameters: Hyperparameters
    backend: str
    adapter_uri: str
    artifacts: list[Artifact]
    training: TrainingMetrics
    evaluation: EvaluationCompleted | None = None
    metadata: dict[str, Any] = {}
    created_at: datetime
    deleted: bool = False


class AdapterRegistered(Payload):
    entry: AdapterEntry


class AdapterRegisteredEvent(Envelope[AdapterRegistered]):
    type: Literal["tunebus.adapter.registered.v1"] = "tunebus.adapter.registered.v1"


# Request/reply: plain JSON bodies, not CloudEvents (they are not facts, nothing stores them).


class ListAdapters(Model):
    name: str | None = None
    base_model: str | None = None
    include_deleted: bool = False


class AdapterList(Model):
    adapters: list[AdapterEntry] = []


class GetAdapter(Model):
    ref: str = Field(description="name (latest version) or name:version")


class AdapterReply(Model):
    entry: AdapterEntry | None = None
    error: str | None = None


class GetDownloadUrls(Model):
    ref: str = Field(description="name (latest version) or name:version")
    expires_s: int | None = Field(default=None, ge=1, description="Capped by the registry's setting.")


class DownloadUrls(Model):
    ref: str | None = None
    urls: dict[str, str] = Field(default={}, description="File name -> presigned GET URL.")
    sha256: dict[str, str] = {}
    expires_at: datetime | None = None
    error: str | None = None
