"""The adapter family: registered versions, and the registry's request/reply API.

An adapter is referred to as `name` (its latest version), `name:version`, or `name@alias`
with the aliases `latest` (the highest version not deleted) and `production` (moved by the
promotion policy, `promote` and `rollback`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from .envelope import Envelope, Model, Payload
from .evaluation import EvaluationCompleted
from .training import AdapterSettings, Artifact, Hyperparameters, TrainingMetrics

Alias = Literal["latest", "production"]
AdapterLayout = Literal["mlx", "peft", "gguf", "full"]
REF_DESCRIPTION = "name (latest version), name:version, or name@alias (latest, production)"


class Promotion(Model):
    """What the promotion policy decided when the version was registered."""

    promoted: bool
    reason: str
    policy: dict[str, Any] = {}


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
    # Lineage and state added within v1 (optional, so older entries still read).
    format: str = Field(default="mlx", description="The layout it was trained in: mlx (mlx-lm) "
                        "or peft; full: a whole model (adapter.type full).")
    dataset_uri: str | None = Field(default=None, description="The dataset as submitted.")
    dataset_manifest_uri: str | None = Field(
        default=None, description="The validator's manifest: inputs, splits and their sha256.")
    dataset_rows: int | None = None
    tags: list[str] = Field(default=[], description="From the request's metadata.tags.")
    trained_at: datetime | None = Field(default=None, description="When the training completed.")
    verified_at: datetime | None = Field(
        default=None, description="When every artifact's sha256 was checked against S3.")
    promotion: Promotion | None = None
    aliases: list[str] = Field(default=[], description="The aliases pointing here when read.")
    deleted_at: datetime | None = None
    deleted_reason: str | None = None
    formats: dict[str, str] = Field(
        default={}, description="Each adapter layout stored (mlx, peft, gguf) -> its folder inside "
        "adapter_uri ('' the root, 'peft/', 'gguf/'), a directory its library loads as is: mlx-lm's "
        "load(..., adapter_path=), PEFT's PeftModel.from_pretrained, or llama.cpp's --lora "
        "(gguf/adapter.gguf, written by the registry when the base model's config is in the "
        "models bucket); full: 'full/', a whole model (adapter.type full) that transformers' "
        "from_pretrained and mlx_lm.load open.")
    parent: str | None = Field(
        default=None, description="The version (name:version) or checkpoint (s3:// URI) this "
        "one was trained on from (the request's init_from); null: from the base model.")


class AdapterRegistered(Payload):
    entry: AdapterEntry


class AdapterRegisteredEvent(Envelope[AdapterRegistered]):
    type: Literal["tunebus.adapter.registered.v1"] = "tunebus.adapter.registered.v1"


# Request/reply: plain JSON bodies, not CloudEvents (they are not facts, nothing stores them).


class ListAdapters(Model):
    name: str | None = None
    base_model: str | None = None
    include_deleted: bool = False
    tag: str | None = Field(default=None, description="Only versions carrying this tag.")
    # Pages (added within v1): a reply never nears NATS's max payload, whatever the history.
    cursor: str | None = Field(
        default=None, description="The next_cursor of the previous page; None: the first page.")
    limit: int = Field(
        default=100, ge=1, le=1000, description="At most this many versions in the page (the "
        "registry may return fewer, to keep the reply small: follow next_cursor).")


class AdapterList(Model):
    """One page of versions, in (name, version) order."""

    adapters: list[AdapterEntry] = []
    next_cursor: str | None = Field(
        default=None, description="Pass it as `cursor` for the next page; None: this was the last.")
    error: str | None = None


class GetAdapter(Model):
    ref: str = Field(description=REF_DESCRIPTION)


class ResolveAdapter(Model):
    ref: str = Field(description=REF_DESCRIPTION)


class AdapterReply(Model):
    entry: AdapterEntry | None = None
    error: str | None = None


class GetDownloadUrls(Model):
    ref: str = Field(description=REF_DESCRIPTION)
    expires_s: int | None = Field(default=None, ge=1, description="Capped by the registry's setting.")
    format: AdapterLayout | None = Field(
        default=None, description="Only this layout's files, named relative to its folder (one "
        "flat directory that mlx-lm or PEFT loads; gguf: adapter.gguf for llama.cpp and Ollama; "
        "full: the whole model of a full fine-tune), "
        "with the run and evaluation files beside them "
        "and never merged/*; an error when the adapter is not stored in it. None: every file, "
        "named relative to adapter_uri.")


class DownloadUrls(Model):
    ref: str | None = None
    urls: dict[str, str] = Field(default={}, description="File name -> presigned GET URL.")
    sha256: dict[str, str] = {}
    expires_at: datetime | None = None
    error: str | None = None
    uris: dict[str, str] = Field(default={}, description="File name -> s3:// URI (aws s3 cp, mc).")
    sizes: dict[str, int] = {}
    format: str | None = Field(
        default=None, description="The layout asked for, or without one the layout it was trained in.")
    formats: dict[str, str] = Field(
        default={}, description="Every layout the adapter is stored in -> its folder (as on the entry).")


class PromoteAdapter(Model):
    ref: str = Field(description=REF_DESCRIPTION)
    alias: Literal["production"] = "production"
    reason: str = ""


class RollbackAdapter(Model):
    name: str
    alias: Literal["production"] = "production"
    reason: str = ""


class DeleteAdapter(Model):
    ref: str = Field(description="name:version (a version is deleted, never a whole name)")
    reason: str = ""


class AliasReply(Model):
    name: str | None = None
    alias: str | None = None
    version: int | None = Field(default=None, description="Where the alias points now.")
    previous: int | None = Field(default=None, description="Where it pointed before.")
    entry: AdapterEntry | None = None
    error: str | None = None
