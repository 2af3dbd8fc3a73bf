"""The registry's records in a JetStream key-value bucket: versions, aliases, and the jobs behind them.

Keys:
    job.<job_id>                 the TrainingCompleted payload, kept until the job is registered
    version-of.<job_id>          the version number given to that job (one job, one version)
    counter.<name>               the last version number of <name>, bumped by compare-and-set
    adapter.<name>.<version>     the AdapterEntry (immutable but for its deletion mark)
    alias.<name>.production      where `production` points, the versions it pointed to before
                                 (what rollback returns to) and a log of every move
    latest.<name>                the highest version not deleted ("0": none), moved by
                                 compare-and-set when a version is registered or deleted

Reads cost a constant number of key-value gets, whatever the history: a version is one get, its
aliases are the `latest.<name>` pointer (checked against the entry it names) and the production
alias. The pointer is raised after the entry is written, on every (re)delivery of the
registration, so a registrar that dies in between leaves it behind only until the registration
is redelivered; a pointer that names a deleted version (a deletion racing a registration) is
walked down and repaired by the first read that meets it. A bucket written before the pointer
existed gets it from one scan of the name's versions, on the first read.

Concurrent registrations never lose a version: `counter.<name>` only moves by an update that
names the revision it read, so two registrars racing for the same number cannot both win. Alias
moves and deletions are compare-and-set updates too.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from tunebus.contracts import AdapterEntry, Artifact, EvaluationCompleted, TrainingCompleted, subjects
from tunebus.shared.adapter_layouts import layout_files, layouts
from tunebus.shared.bus import Bucket
from tunebus.shared.settings import RegistrySettings

from .policy import decide
from .provenance import artifacts_problem, training_problem
from .refs import Ref
from .verify import ArtifactMismatch

BUCKET = subjects.REGISTRY_BUCKET
PRODUCTION = "production"
PAGE_SIZE = 100  # entries per registry.list page, unless the request asks for fewer
PAGE_BYTES = 256 * 1024  # and at most this much JSON: far below NATS's 1 MiB max payload
_LOG_LENGTH = 100
# Reads every artifact back from the object store; ArtifactMismatch when one is not as recorded.
Verify = Callable[[list[Artifact]], Awaitable[None]]
Copies = Callable[[TrainingCompleted], Awaitable[list[Artifact]]]  # files the registry writes itself


class NotYetKnown(Exception):
    """An evaluation arrived before the training it belongs to; retry later."""


class _Unchecked(Exception):
    """The alias moved to versions not read yet (a rollback reads them and tries again)."""


class Refused(Exception):
    """A request the registry will not carry out (the message says why)."""


class Registry:
    """The registry on a JetStream key-value bucket (opened when the service connects). The
    bucket's stream is read directly too (`_keys`); its stream and subjects are named as the
    key-value protocol (NATS ADR-8) names them: stream KV_<bucket>, key subjects $KV.<bucket>.<key>."""

    def __init__(self, bucket: Bucket, policy: RegistrySettings | None = None) -> None:
        self.bucket = bucket
        self.policy = policy or RegistrySettings()

    @classmethod
    async def open(cls, js: JetStreamContext, bucket: str = BUCKET,
                   policy: RegistrySettings | None = None, replicas: int = 1) -> Registry:
        """The registry in `bucket`, created when it does not exist yet."""
        return cls(await Bucket(bucket, replicas).open(js), policy)

    @property
    def kv(self) -> KeyValue:
        return self.bucket.kv

    @property
    def js(self) -> JetStreamContext:
        return self.bucket.js

    # -- registration

    async def accept_training(self, done: TrainingCompleted, *, adapters_bucket: str,
                              trained_at: datetime | None = None) -> None:
        """Remember a finished training until its evaluation arrives. Refused when its files lie
        anywhere but the adapter's own place in `adapters_bucket` (provenance.py says why)."""
        if problem := training_problem(done, adapters_bucket):
            raise Refused(f"not registered: {problem}")
        await self.record_training(done, trained_at=trained_at)

    async def accept_evaluation(self, job_id: str, evaluation: EvaluationCompleted | None, *,
                                verify: Verify, copies: Copies | None = None) -> AdapterEntry:
        """Register the job's adapter once its evaluation is in (None: the evaluation failed, and
        the adapter is registered without metrics, never lost). Before the first registration,
        when the policy asks, `verify` reads every artifact back; Refused when the report lies
        outside the adapter's prefix or a file is not what the job recorded. `copies` writes the
        files the registry adds itself (the GGUF copy), once, before the first registration."""
        training = await self.training(job_id)
        if evaluation is not None and (problem := artifacts_problem(
                evaluation.report_artifacts, training.adapter_uri.rstrip("/"))):
            raise Refused(f"not registered: evaluation report: {problem}")
        verified_at = None
        if self.policy.verify_artifacts and await self.version_of(job_id) is None:
            artifacts = list(training.artifacts)
            artifacts += evaluation.report_artifacts if evaluation is not None else []
            try:
                await verify(artifacts)
            except ArtifactMismatch as e:
                raise Refused(f"not registered: {e}") from e
            verified_at = datetime.now(UTC)
        extra = await copies(training) if copies and await self.version_of(job_id) is None else []
        return await self.register(job_id, evaluation, verified_at=verified_at, extra_artifacts=extra)

    async def record_training(self, done: TrainingCompleted, trained_at: datetime | None = None) -> None:
        record = done.model_dump(mode="json") | {"trained_at": trained_at.isoformat() if trained_at else None}
        await self.kv.put(f"job.{done.job_id}", json.dumps(record).encode())

    async def version_of(self, job_id: str) -> int | None:
        try:
            return int((await self.kv.get(f"version-of.{job_id}")).value)
        except KeyNotFoundError:
            return None

    async def training(self, job_id: str) -> TrainingCompleted:
        return (await self._training(job_id, required=True))[0]

    async def register(self, job_id: str, evaluation: EvaluationCompleted | None, *,
                       verified_at: datetime | None = None,
                       extra_artifacts: list[Artifact] = ()) -> AdapterEntry:
        """The version of `job_id`'s adapter, created on the first call, the same on any later one.

        A new version is promoted to production when the policy allows it (and it is newer than
        what production holds); a repeated call finishes a promotion the first one left undone.
        """
        existing = await self.version_of(job_id)
        if existing is not None:
            found = await self._training(job_id, required=False)
            if found is not None:
                entry, _ = await self._read(found[0].request.adapter_name, existing)
                if not entry.deleted:  # the pointer may not have moved before a crash
                    await self._raise_latest(entry.name, entry.version)
                return await self._apply_policy(entry)

        done, trained_at = await self._training(job_id, required=True)
        name = done.request.adapter_name
        version = await self._next_version(name)
        try:
            await self.kv.create(f"version-of.{job_id}", str(version).encode())
        except KeyWrongLastSequenceError:  # a concurrent registrar got this job first
            return await self.get(name, int((await self.kv.get(f"version-of.{job_id}")).value))
        entry = _entry(done, version, evaluation, trained_at=trained_at, verified_at=verified_at,
                       promotion=decide(evaluation, self.policy).model_dump(),
                       extra_artifacts=list(extra_artifacts))
        await self.kv.put(f"adapter.{name}.{version}", entry.model_dump_json().encode())
        await self._raise_latest(name, version)
        return await self._apply_policy(entry)

    async def _apply_policy(self, entry: AdapterEntry) -> AdapterEntry:
        if not (entry.promotion and entry.promotion.promoted):
            return await self._with_aliases(entry)

        def promote_if_newer(doc: dict) -> dict | None:
            if entry.version in {move["version"] for move in doc["log"]}:
                return None  # promoted before (and maybe rolled back since): leave it
            if doc["version"] is not None and doc["version"] >= entry.version:
                return None  # never move production back to an older version by itself
            return _moved(doc, entry.version, "auto-promote", entry.promotion.reason)

        await self._update_alias(entry.name, promote_if_newer)
        return await self._with_aliases(entry)

    # -- reading

    async def get(self, name: str, version: int | None = None) -> AdapterEntry:
        """A version of `name`, or its latest undeleted one; KeyError when there is none."""
        latest = None
        if version is None:
            latest = await self._latest_version(name)
            if latest is None:
                raise KeyError(f"no adapter named {name!r}")
            version = latest
        entry, _ = await self._read(name, version)
        return await self._with_aliases(entry, latest)

    async def resolve(self, ref: Ref) -> AdapterEntry:
        """The version a reference means; KeyError when there is none."""
        if ref.version is not None:
            return await self.get(ref.name, ref.version)
        if ref.alias == PRODUCTION:
            doc = await self._alias(ref.name)
            if doc["version"] is None:
                raise KeyError(f"{ref.name} has no production version yet")
            return await self.get(ref.name, doc["version"])
        return await self.get(ref.name)

    async def page(self, *, name: str | None = None, base_model: str | None = None,
                   tag: str | None = None, include_deleted: bool = False, after: str | None = None,
                   limit: int = PAGE_SIZE, max_bytes: int = PAGE_BYTES,
                   ) -> tuple[list[AdapterEntry], str | None]:
        """One page of versions in (name, version) order, starting after the cursor `after`;
        returns them and the cursor of the next page (None: this was the last).

        A page holds at most `limit` entries and at most `max_bytes` of their JSON (at least one
        entry), so no reply nears NATS's max payload. It costs the reads of the entries it looks at
        (filtered-out ones included) and, for one name, one read of its counter; across names, one
        read of the bucket's key index.
        """
        start = _cursor(after) if after else None
        if name is not None:  # its version numbers, from its counter: no index to read
            keys = [(name, v) for v in range(1, await self._last_version(name) + 1)]
        else:
            keys = await self._sorted_keys(None)
        keys = [k for k in keys if start is None or k > start]
        entries: list[AdapterEntry] = []
        size, consumed, full = 0, 0, False
        while consumed < len(keys) and not full:
            batch = keys[consumed:consumed + limit - len(entries)]
            read = await asyncio.gather(*[self._read(n, v) for n, v in batch], return_exceptions=True)
            for found in read:
                if isinstance(found, KeyError):  # purged since the index was read
                    consumed += 1
                    continue
                if isinstance(found, BaseException):
                    raise found
                entry = found[0]
                if ((include_deleted or not entry.deleted)
                        and (base_model is None or entry.base_model == base_model)
                        and (tag is None or tag in entry.tags)):
                    body = len(entry.model_dump_json())
                    if entries and size + body > max_bytes:
                        full = True
                        break
                    entries.append(entry)
                    size += body
                consumed += 1
            full = full or len(entries) >= limit
        aliases = {n: await self._aliases(n) for n in {e.name for e in entries}}
        entries = [_marked(e, aliases[e.name]) for e in entries]
        if consumed == len(keys):
            return entries, None
        last_name, last_version = keys[consumed - 1]
        return entries, f"{last_name}:{last_version}"

    async def list(self, *, name: str | None = None, base_model: str | None = None,
                   tag: str | None = None, include_deleted: bool = False) -> list[AdapterEntry]:
        """Every version that matches, page after page (for callers inside the service)."""
        entries: list[AdapterEntry] = []
        cursor = None
        while True:
            found, cursor = await self.page(name=name, base_model=base_model, tag=tag,
                                            include_deleted=include_deleted, after=cursor,
                                            limit=1000, max_bytes=1 << 62)
            entries += found
            if cursor is None:
                return entries

    # -- aliases and deletion

    async def promote(self, ref: Ref, reason: str = "") -> tuple[AdapterEntry, int | None]:
        """Point production at the version `ref` means; returns it and where production was."""
        entry = await self.resolve(ref)
        if entry.deleted:
            raise Refused(f"{entry.ref} is deleted and cannot be promoted")
        previous: list[int | None] = [None]

        def promote(doc: dict) -> dict | None:
            previous[0] = doc["version"]
            if doc["version"] == entry.version:
                return None
            return _moved(doc, entry.version, "promote", reason)

        await self._update_alias(entry.name, promote)
        return await self.get(entry.name, entry.version), previous[0]

    async def rollback(self, name: str, reason: str = "") -> tuple[AdapterEntry, int | None]:
        """Point production back at the version it held before; returns it and the one left.
        Reads the versions production held (at most 100), not the whole history."""
        checked: dict[int, bool] = {}  # version -> deleted
        result: dict[str, int | None] = {}

        def roll_back(doc: dict) -> dict:
            if unchecked := [v for v in doc["history"] if v not in checked]:
                raise _Unchecked(unchecked)  # moved since it was read: check those too
            history = [v for v in doc["history"] if not checked[v]]
            if doc["version"] is None:
                raise Refused(f"{name} has no production version to roll back")
            if not history:
                raise Refused(f"{name}:{doc['version']} is the first production version of {name}: "
                              "there is nothing earlier to roll back to")
            result.update(previous=doc["version"], version=history[-1])
            return {
                "version": history[-1],
                "history": history[:-1],
                "log": _logged(doc, history[-1], "rollback", reason),
            }

        unchecked = (await self._alias(name))["history"]
        while True:
            for version, deleted in zip(unchecked, await asyncio.gather(
                    *[self._is_deleted(name, v) for v in unchecked])):
                checked[version] = deleted
            try:
                await self._update_alias(name, roll_back)
                break
            except _Unchecked as e:
                unchecked = e.args[0]
        return await self.get(name, result["version"]), result["previous"]

    async def delete(self, name: str, version: int, reason: str = "") -> AdapterEntry:
        """Mark a version deleted: it leaves listings and `latest`; its record and files stay."""
        production = (await self._alias(name))["version"]
        if production == version:
            raise Refused(f"{name}:{version} is the production version: promote another version "
                          f"or roll back first")
        while True:
            entry, revision = await self._read(name, version)
            if entry.deleted:  # deleted before (the pointer may not have moved: a crash)
                await self._lower_latest(name, version)
                return await self._with_aliases(entry)
            marked = entry.model_copy(update={
                "deleted": True, "deleted_at": datetime.now(UTC), "deleted_reason": reason or None})
            try:
                await self.kv.update(f"adapter.{name}.{version}", marked.model_dump_json().encode(),
                                     last=revision)
            except KeyWrongLastSequenceError:
                continue
            await self._lower_latest(name, version)
            return await self._with_aliases(marked)

    # -- helpers

    async def _is_deleted(self, name: str, version: int) -> bool:
        try:
            return (await self._read(name, version))[0].deleted
        except KeyError:
            return True  # nothing to return to

    async def _read(self, name: str, version: int) -> tuple[AdapterEntry, int]:
        try:
            stored = await self.kv.get(f"adapter.{name}.{version}")
        except KeyNotFoundError:
            raise KeyError(f"no adapter {name}:{version}") from None
        return _parsed(stored.value), stored.revision

    async def _with_aliases(self, entry: AdapterEntry, latest: int | None = None) -> AdapterEntry:
        return _marked(entry, await self._aliases(entry.name, latest))

    async def _aliases(self, name: str, latest: int | None = None) -> dict[str, int]:
        """Where each alias of `name` points (an alias with nowhere to point is left out);
        `latest`, when given, is its latest version, read already."""
        aliases = {}
        if latest is None:
            latest = await self._latest_version(name)
        if latest is not None:
            aliases["latest"] = latest
        production = (await self._alias(name))["version"]
        if production is not None:
            aliases[PRODUCTION] = production
        return aliases

    async def _latest_version(self, name: str) -> int | None:
        """The highest version of `name` not deleted, from its pointer: two reads (the pointer
        and the entry it names, to check it is not deleted) unless it needs repairing."""
        key = f"latest.{name}"
        try:
            stored = await self.kv.get(key)
        except KeyNotFoundError:  # a bucket from before the pointer: one scan, then the pointer
            found = await self._scan_latest(name)
            if found is not None:
                await self._raise_latest(name, found)
            return found
        pointer = int(stored.value)
        if pointer == 0:
            return None
        try:
            entry, _ = await self._read(name, pointer)
            if not entry.deleted:
                return pointer
        except KeyError:
            pass
        found = await self._undeleted_below(name, pointer)
        try:  # repair, unless someone moved it meanwhile
            await self.kv.update(key, str(found or 0).encode(), last=stored.revision)
        except KeyWrongLastSequenceError:
            pass
        return found

    async def _raise_latest(self, name: str, version: int) -> None:
        """Point `latest.<name>` at `version` unless it points higher already."""
        key = f"latest.{name}"
        while True:
            try:
                stored = await self.kv.get(key)
            except KeyNotFoundError:
                try:
                    await self.kv.create(key, str(version).encode())
                    return
                except KeyWrongLastSequenceError:
                    continue
            if int(stored.value) >= version:
                return
            try:
                await self.kv.update(key, str(version).encode(), last=stored.revision)
                return
            except KeyWrongLastSequenceError:
                continue

    async def _lower_latest(self, name: str, deleted: int) -> None:
        """After `deleted` was deleted: if `latest.<name>` pointed at it, the next one down."""
        key = f"latest.{name}"
        while True:
            try:
                stored = await self.kv.get(key)
            except KeyNotFoundError:
                return  # a bucket from before the pointer: the first read makes it
            if int(stored.value) != deleted:
                return
            found = await self._undeleted_below(name, deleted)
            try:
                await self.kv.update(key, str(found or 0).encode(), last=stored.revision)
                return
            except KeyWrongLastSequenceError:
                continue

    async def _undeleted_below(self, name: str, version: int) -> int | None:
        """The highest version under `version` not deleted (one read per version it skips)."""
        for candidate in range(version - 1, 0, -1):
            try:
                entry, _ = await self._read(name, candidate)
            except KeyError:
                continue  # a number given out and never used (its registrar died)
            if not entry.deleted:
                return candidate
        return None

    async def _scan_latest(self, name: str) -> int | None:
        for _, version in reversed(await self._sorted_keys(name)):
            entry, _ = await self._read(name, version)
            if not entry.deleted:
                return version
        return None

    async def _sorted_keys(self, name: str | None) -> list[tuple[str, int]]:
        """(name, version) of every stored version, of `name` or of all, in order."""
        keys = []
        for key in await self._keys(f"adapter.{name}." if name else "adapter."):
            adapter, _, version = key.removeprefix("adapter.").rpartition(".")
            keys.append((adapter, int(version)))
        return sorted(keys)

    async def _keys(self, prefix: str) -> list[str]:
        """The keys that start with `prefix`, from the bucket stream's subject index, in one request.

        Not `kv.keys()`: nats-py's watcher behind it can signal "no more keys" before the keys it
        was sent have arrived (its first consumer_info races the delivery), and under load it
        returns too few keys. The stream's subject index has no such race.
        """
        subjects = f"$KV.{self.bucket.name}."
        info = await self.js.stream_info(f"KV_{self.bucket.name}", subjects_filter=f"{subjects}{prefix}>")
        return [subject.removeprefix(subjects) for subject in (info.state.subjects or {})]

    async def _alias(self, name: str) -> dict:
        try:
            return json.loads((await self.kv.get(f"alias.{name}.{PRODUCTION}")).value)
        except KeyNotFoundError:
            return _no_alias()

    async def _update_alias(self, name: str, change: Callable[[dict], dict | None]) -> None:
        """Apply `change` to the alias document by compare-and-set; None means leave it be."""
        key = f"alias.{name}.{PRODUCTION}"
        while True:
            try:
                current = await self.kv.get(key)
                doc, revision = json.loads(current.value), current.revision
            except KeyNotFoundError:
                doc, revision = _no_alias(), None
            new = change(doc)
            if new is None:
                return
            body = json.dumps(new).encode()
            try:
                if revision is None:
                    await self.kv.create(key, body)
                else:
                    await self.kv.update(key, body, last=revision)
                return
            except KeyWrongLastSequenceError:
                continue

    async def _training(self, job_id: str, *, required: bool) -> tuple[TrainingCompleted, datetime | None] | None:
        try:
            record = json.loads((await self.kv.get(f"job.{job_id}")).value)
        except KeyNotFoundError:
            if required:
                raise NotYetKnown(f"training of job {job_id} has not been recorded yet") from None
            return None
        trained_at = record.get("trained_at")
        return (TrainingCompleted.model_validate(record),
                datetime.fromisoformat(trained_at) if trained_at else None)

    async def _last_version(self, name: str) -> int:
        """The last version number given out for `name` (0: none)."""
        try:
            return int((await self.kv.get(f"counter.{name}")).value)
        except KeyNotFoundError:
            return max((v for _, v in await self._sorted_keys(name)), default=0)

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


def _cursor(text: str) -> tuple[str, int]:
    """A page cursor (`name:version`, the last key the previous page looked at) as a sort key."""
    name, sep, version = text.rpartition(":")
    if not sep or not version.isdigit():
        raise ValueError(f"bad cursor {text!r}: pass the next_cursor of the previous page")
    return name, int(version)


def _parsed(stored: bytes) -> AdapterEntry:
    """A stored entry; one registered before entries listed their layouts gets them now."""
    entry = AdapterEntry.model_validate_json(stored)
    if not entry.formats:
        entry.formats = layouts([a.name for a in entry.artifacts])
    return entry


def _no_alias() -> dict:
    return {"version": None, "history": [], "log": []}


def _moved(doc: dict, version: int, action: str, reason: str) -> dict:
    history = [*doc["history"], doc["version"]] if doc["version"] is not None else list(doc["history"])
    return {"version": version, "history": history[-_LOG_LENGTH:], "log": _logged(doc, version, action, reason)}


def _logged(doc: dict, version: int, action: str, reason: str) -> list[dict[str, Any]]:
    move = {"version": version, "from": doc["version"], "action": action, "reason": reason,
            "at": datetime.now(UTC).isoformat()}
    return [*doc["log"], move][-_LOG_LENGTH:]


def _marked(entry: AdapterEntry, aliases: dict[str, int]) -> AdapterEntry:
    return entry.model_copy(update={"aliases": sorted(a for a, v in aliases.items() if v == entry.version)})


def download_files(entry: AdapterEntry, layout: str | None) -> dict[str, Artifact]:
    """{name in the download: artifact} of a version: every file, named by its path in the prefix,
    or (given a layout) that layout's files and the run files in one flat directory. Refused for
    a deleted version, or a layout it is not stored in (the message names those it has)."""
    if entry.deleted:
        raise Refused(f"{entry.ref} is deleted")
    stored = {a.name: a for a in entry.artifacts}
    if layout is None:
        return stored
    if layout not in entry.formats:
        raise Refused(f"{entry.ref} is not stored in the {layout} layout; it has: "
                      f"{', '.join(sorted(entry.formats)) or 'none'}")
    return {name: stored[key] for name, key in layout_files(list(stored), entry.formats[layout]).items()}


def _entry(done: TrainingCompleted, version: int, evaluation: EvaluationCompleted | None, *,
           trained_at: datetime | None, verified_at: datetime | None, promotion: dict,
           extra_artifacts: list[Artifact] = ()) -> AdapterEntry:
    """`extra_artifacts`: files the registry wrote itself (the GGUF copy)."""
    request = done.request
    artifacts = [*done.artifacts, *extra_artifacts]
    if evaluation is not None:
        names = {a.name for a in artifacts}
        artifacts += [a for a in evaluation.report_artifacts if a.name not in names]
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
        adapter=done.adapter or request.adapter,
        hyperparameters=request.hyperparameters,
        backend=done.backend,
        adapter_uri=done.adapter_uri,
        artifacts=artifacts,
        training=done.metrics,
        evaluation=evaluation,
        metadata=request.metadata,
        created_at=datetime.now(UTC),
        format=done.trained_layout(),
        formats=layouts([a.name for a in artifacts]),  # what is stored, file by file
        dataset_uri=request.dataset.uri,
        dataset_manifest_uri=done.dataset.manifest_uri,
        dataset_rows=done.dataset.rows,
        tags=_tags(request.metadata),
        trained_at=trained_at,
        verified_at=verified_at,
        promotion=promotion,
        parent=done.parent,
    )


def _tags(metadata: dict[str, Any]) -> list[str]:
    """`metadata.tags` as a list of strings: a list, or one comma-separated string."""
    tags = metadata.get("tags", [])
    if isinstance(tags, str):
        tags = tags.split(",")
    if not isinstance(tags, list):
        return []
    return sorted({str(t).strip() for t in tags if str(t).strip()})
