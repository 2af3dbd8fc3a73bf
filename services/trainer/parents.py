"""What a request's `init_from` names, found and fetched: a registered version, resolved with
the adapter-registry over NATS, or a checkpoint an earlier job left in the adapters bucket; its
adapter downloaded in the layout this worker trains in (converted when only the other is there).

    registered   name, name:version, name@alias -> registry.resolve -> the entry's layouts
    checkpoint   s3://<adapters>/<adapter>/<job>/checkpoints/step-N -> state.json (base model,
                 adapter shape) and the adapter files of the backend that wrote it; only a
                 step that job's latest.json keeps, each segment as the contracts allow it
    resumed      the job's own latest checkpoint's state.json: ref and shape, nothing fetched

What the trainer decides about a parent (same base, the parent's shape) is `plan`'s.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nats.errors import NoRespondersError
from pydantic import TypeAdapter, ValidationError
from tunebus.contracts import AdapterEntry, AdapterReply, ResolveAdapter, subjects
from tunebus.contracts.envelope import JobId
from tunebus.contracts.training import AdapterName, AdapterSettings
from tunebus.shared.adapter_layouts import CONFIG, MLX, PEFT, WEIGHTS, mlx_to_peft, peft_to_mlx
from tunebus.shared.objectstore import ObjectNotFound, ObjectStore, StoreUnavailable, is_transient

from . import backends
from .backend import CHECKPOINT_STATE, CheckpointState
from .checkpoints import CheckpointStore
from .plan import Parent

RESOLVE_TIMEOUT_S = 10.0
# s3://<bucket>/<adapter>/<job>/checkpoints/step-N; each segment is then held to the contracts'
# patterns, so that no "." or ".." (which S3 clients normalise away) reaches another prefix.
CHECKPOINT_URI = re.compile(
    r"^s3://(?P<bucket>[^/]+)/(?P<adapter>[^/]+)/(?P<job>[^/]+)/checkpoints/step-\d+$")
_ADAPTER_NAME, _JOB_ID = TypeAdapter(AdapterName), TypeAdapter(JobId)


class InitFromRefused(Exception):
    """init_from names nothing this job can start from; the message says why, naming it."""


class RegistryUnavailable(ConnectionError):
    """The registry did not answer: a retry may find it up."""


async def find_parent(ref: str, broker, store: ObjectStore, adapters_bucket: str) -> Parent:
    """The parent `ref` (a request's init_from) names; InitFromRefused saying why none."""
    if ref.startswith("s3://"):
        return await asyncio.to_thread(checkpoint_parent, store, ref, adapters_bucket)
    return registered_parent(await _resolve(broker, ref), ref)


async def _resolve(broker, ref: str) -> AdapterEntry:
    try:
        reply = await broker.request(ResolveAdapter(ref=ref).model_dump(mode="json"),
                                     subject=subjects.REGISTRY_RESOLVE, timeout=RESOLVE_TIMEOUT_S)
    except (TimeoutError, NoRespondersError):
        raise RegistryUnavailable(f"the adapter-registry did not answer {subjects.REGISTRY_RESOLVE} "
                                  f"for init_from {ref!r} within {RESOLVE_TIMEOUT_S:.0f}s") from None
    answer = AdapterReply.model_validate_json(reply.body)
    if answer.error or answer.entry is None:
        raise InitFromRefused(f"init_from {ref!r}: {answer.error or 'no such adapter'}")
    if answer.entry.deleted:
        raise InitFromRefused(f"init_from {ref!r}: {answer.entry.ref} is deleted")
    return answer.entry


def registered_parent(entry: AdapterEntry, ref: str) -> Parent:
    """The parent a registry entry describes, with the adapter files of each layout stored."""
    by_name = {a.name: a for a in entry.artifacts}
    files, sha256 = {}, {}
    for layout in (MLX, PEFT):
        if layout not in entry.formats:
            continue
        folder = entry.formats[layout]
        found = {name: by_name.get(folder + name) for name in (WEIGHTS[layout], CONFIG)}
        if all(found.values()):
            files[layout] = {name: a.uri for name, a in found.items()}
            sha256 |= {a.uri: a.sha256 for a in found.values()}
    return Parent(ref=entry.ref, base_model=entry.base_model,
                  base_model_revision=entry.base_model_revision, adapter=entry.adapter,
                  files=files, sha256=sha256)


def checkpoint_parent(store: ObjectStore, uri: str, adapters_bucket: str) -> Parent:
    """The parent a checkpoint URI names: a tunebus checkpoint in the adapters bucket (the
    only one of the trainer's buckets that holds checkpoints) that says its base model."""
    uri = uri.rstrip("/")
    job_prefix = _checkpoint_job(uri, adapters_bucket)
    with _reading(uri):
        kept = {c.uri: c for c in CheckpointStore(store, job_prefix).kept()}
        if uri not in kept:
            steps = ", ".join(u.rsplit("/", 1)[1] for u in kept) or "none"
            raise InitFromRefused(f"init_from {uri!r}: no such checkpoint of that job (it keeps: "
                                  f"{steps})")
        try:
            state = CheckpointState(**json.loads(store.get_bytes(f"{uri}/{CHECKPOINT_STATE}")))
        except ObjectNotFound:
            raise InitFromRefused(f"init_from {uri!r}: no checkpoint there (no {CHECKPOINT_STATE})") from None
        except (ValueError, TypeError) as e:
            raise InitFromRefused(f"init_from {uri!r}: not a tunebus checkpoint ({e})") from None
        if state.base_model is None or state.adapter is None or state.backend not in backends.BACKENDS:
            raise InitFromRefused(
                f"init_from {uri!r}: the checkpoint does not say its base model and adapter (written "
                "by an older trainer); continue from a registered version instead")
        layout = backends.BACKENDS[state.backend].layout
        files = {name: f"{uri}/{name}" for name in (WEIGHTS[layout], CONFIG)}
        if missing := [name for name, file in files.items() if not store.exists(file)]:
            raise InitFromRefused(f"init_from {uri!r}: the checkpoint lacks {', '.join(missing)}")
    return Parent(ref=uri, base_model=state.base_model,
                  base_model_revision=state.base_model_revision,
                  adapter=checkpoint_adapter(state, uri), files={layout: files})


def started_parent(checkpoints: CheckpointStore) -> Parent | None:
    """The parent the job's latest checkpoint says its run started from (its ref, base model and
    adapter shape, in its state.json), or None when it has none that says so. A resumed job
    needs nothing else of its parent: the checkpoint holds every weight, so the registry is
    not asked again and a parent deleted meanwhile does not stop it. No files: nothing to fetch."""
    latest = checkpoints.latest()
    if latest is None:
        return None
    try:
        state = CheckpointState(**json.loads(
            checkpoints.store.get_bytes(f"{latest.uri}/{CHECKPOINT_STATE}")))
        if state.init_from is None or state.base_model is None or state.adapter is None:
            return None
        adapter = checkpoint_adapter(state, state.init_from)
    except (ObjectNotFound, ValueError, TypeError, InitFromRefused):
        return None  # not resumable either: the job starts over, from its parent
    return Parent(ref=state.init_from, base_model=state.base_model,
                  base_model_revision=state.base_model_revision, adapter=adapter)


def checkpoint_adapter(state: CheckpointState, ref: str) -> AdapterSettings:
    """The adapter shape a checkpoint's state.json records (its LoraSpec)."""
    lora = state.adapter or {}
    try:
        return AdapterSettings(type=lora["kind"], rank=lora["rank"], alpha=lora["alpha"],
                               dropout=lora["dropout"], target_modules=lora["target_modules"],
                               num_layers=lora["num_layers"])
    except (KeyError, TypeError, ValidationError) as e:
        raise InitFromRefused(f"init_from {ref!r}: the checkpoint's {CHECKPOINT_STATE} does not "
                              f"say a readable adapter ({type(e).__name__}: {e})") from None


def _checkpoint_job(uri: str, adapters_bucket: str) -> str:
    """The job prefix of a checkpoint URI, if it names one in the adapters bucket whose adapter
    and job segments are what the contracts allow; InitFromRefused otherwise."""
    match = CHECKPOINT_URI.match(uri)
    valid = match is not None and match["bucket"] == adapters_bucket
    if valid:
        try:
            _ADAPTER_NAME.validate_python(match["adapter"])
            _JOB_ID.validate_python(match["job"])
        except ValidationError:
            valid = False
    if not valid:
        raise InitFromRefused(
            f"init_from {uri!r} is neither an adapter reference (name, name:version, name@alias) "
            f"nor a checkpoint the trainer can read: s3://{adapters_bucket}/<adapter>/<job>/"
            "checkpoints/step-N")
    return f"s3://{adapters_bucket}/{match['adapter']}/{match['job']}"


@contextmanager
def _reading(ref: str) -> Iterator[None]:
    """Store errors while reading a parent: a missing object or one S3 refuses (denied, say)
    repeats on every retry, so it refuses the parent; S3 being down is for a retry."""
    try:
        yield
    except (StoreUnavailable, InitFromRefused):
        raise
    except ObjectNotFound as e:
        raise InitFromRefused(f"init_from {ref!r}: {e}") from None
    except Exception as e:
        if is_transient(e):
            raise
        raise InitFromRefused(f"init_from {ref!r}: the object store refused to read it "
                              f"({type(e).__name__}: {e})") from None


def fetch_parent(store: ObjectStore, parent: Parent, layout: str, directory: Path, *,
                 base_model: str, model_dir: Path) -> Path:
    """The parent's adapter in `layout` in `directory`: downloaded (safetensors and its JSON
    config only, each checked against its recorded sha256), converted from the other layout
    when it is not stored in this one."""
    if layout in parent.files:
        _download(store, parent, layout, directory)
        return directory
    stored = next(iter(parent.files))
    source = directory.with_name(f"{directory.name}-{stored}")
    _download(store, parent, stored, source)
    try:
        if layout == PEFT:
            return mlx_to_peft(source, directory, base_model=base_model)
        return peft_to_mlx(source, directory, num_hidden_layers=_blocks(model_dir))
    except ValueError as e:  # AdapterFormatError: a layout the other cannot express
        raise InitFromRefused(f"init_from {parent.ref!r}: its {stored} adapter does not convert "
                              f"to {layout}: {e}") from None


def _download(store: ObjectStore, parent: Parent, layout: str, directory: Path) -> None:
    for name, uri in parent.files[layout].items():
        with _reading(parent.ref):  # gone since it was found (pruned, deleted)
            digest = store.get_file(uri, directory / name)
        if (expected := parent.sha256.get(uri)) and digest != expected:
            raise InitFromRefused(f"init_from {parent.ref!r}: {uri} does not match the sha256 "
                                  "the registry recorded")


def _blocks(model_dir: Path) -> int | None:
    config = json.loads((model_dir / "config.json").read_text())
    return config.get("num_hidden_layers") or (config.get("text_config") or {}).get(
        "num_hidden_layers")
