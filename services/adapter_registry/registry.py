"""The registry's records in a JetStream key-value bucket: versions, and the jobs behind them.

Keys:
    job.<job_id>                 the TrainingCompleted payload, kept until the job is registered
    version-of.<job_id>          the version number given to that job (one job, one version)
    counter.<name>               the last version number of <name>, bumped by compare-and-set
    adapter.<name>.<version>     the AdapterEntry (immutable but for `deleted`)

Concurrent registrations never lose a version: `counter.<name>` only moves by an update that
names the revision it read, so two registrars racing for the same number cannot both win.
"""

from __future__ import annotations

from datetime import UTC, datetime

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue

from tunebus.contracts import AdapterEntry, EvaluationCompleted, TrainingCompleted

BUCKET = "tunebus-registry"


class NotYetKnown(Exception):
    """An evaluation arrived before the training it belongs to; retry later."""


class Registry:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def record_training(self, done: TrainingCompleted) -> None:
        await self.kv.put(f"job.{done.job_id}", done.model_dump_json().encode())

    async def register(self, job_id: str, evaluation: EvaluationCompleted | None) -> AdapterEntry:
        """The version of `job_id`'s adapter, created on the first call, the same on any later one."""
        try:
            existing = int((await self.kv.get(f"version-of.{job_id}")).value)
        except KeyNotFoundError:
            existing = None
        if existing is not None:
            done = await self._training(job_id, required=False)
            name = done.request.adapter_name if done else None
            if name is not None:
                return await self.get(name, existing)

        done = await self._training(job_id, required=True)
        name = done.request.adapter_name
        version = await self._next_version(name)
        try:
            await self.kv.create(f"version-of.{job_id}", str(version).encode())
        except KeyWrongLastSequenceError:  # a concurrent registrar got this job first
            return await self.get(name, int((await self.kv.get(f"version-of.{job_id}")).value))
        entry = _entry(done, version, evaluation)
        await self.kv.put(f"adapter.{name}.{version}", entry.model_dump_json().encode())
        return entry

    async def get(self, name: str, version: int | None = None) -> AdapterEntry:
        """A version of `name`, or its latest undeleted one; KeyError when there is none."""
        if version is None:
            versions = [e for e in await self.list(name=name) if not e.deleted]
            if not versions:
                raise KeyError(f"no adapter named {name!r}")
            return versions[-1]
        try:
            return AdapterEntry.model_validate_json((await self.kv.get(f"adapter.{name}.{version}")).value)
        except KeyNotFoundError:
            raise KeyError(f"no adapter {name}:{version}") from None

    async def list(self, *, name: str | None = None, base_model: str | None = None,
                   include_deleted: bool = False) -> list[AdapterEntry]:
        # nats-py's keys(filters=…) matches substrings, not subject wildcards: filter here.
        prefix = f"adapter.{name}." if name else "adapter."
        try:
            keys = [k for k in await self.kv.keys() if k.startswith(prefix)]
        except NoKeysError:
            return []
        entries = [AdapterEntry.model_validate_json((await self.kv.get(k)).value) for k in keys]
        entries = [
            e for e in entries
            if (include_deleted or not e.deleted) and (base_model is None or e.base_model == base_model)
        ]
        return sorted(entries, key=lambda e: (e.name, e.version))

    async def _training(self, job_id: str, *, required: bool) -> TrainingCompleted | None:
        try:
            return TrainingCompleted.model_validate_json((await self.kv.get(f"job.{job_id}")).value)
        except KeyNotFoundError:
            if required:
                raise NotYetKnown(f"training of job {job_id} has not been recorded yet") from None
            return None

    async def _next_version(self, name: str) -> int:
        key = f"counter.{name}"
        while True:
            try:
                current = await self.kv.get(key)
            except KeyNotFoundError:
                try:
                    await self.kv.create(key, b"1")
                    return 1
                except KeyWrongLastSequenceError:
                    continue
            version = int(current.value) + 1
            try:
                await self.kv.update(key, str(version).encode(), last=current.revision)
                return version
            except KeyWrongLastSequenceError:
                continue


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`name` or `name:version`."""
    name, _, version = ref.partition(":")
    if version and not version.isdigit():
        raise ValueError(f"bad adapter reference {ref!r}: expected name or name:version")
    return name, int(version) if version else None


def _entry(done: TrainingCompleted, version: int, evaluation: EvaluationCompleted | None) -> AdapterEntry:
    request = done.request
    return AdapterEntry(
        name=request.adapter_name,
        version=version,
        ref=f"{request.adapter_name}:{version}",
        job_id=done.job_id,
        base_model=request.base_model,
        base_model_revision=request.base_model_revision,
        dataset_sha256=done.dataset.sha256,
        dataset_format=done.dataset.format,
        method=request.method,
        adapter=request.adapter,
        hyperparameters=request.hyperparameters,
        backend=done.backend,
        adapter_uri=done.adapter_uri,
        artifacts=done.artifacts,
        training=done.metrics,
        evaluation=evaluation,
        metadata=request.metadata,
        created_at=datetime.now(UTC),
    )


