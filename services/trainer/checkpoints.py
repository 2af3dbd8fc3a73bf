"""A job's checkpoints in S3, beside where its adapter will go.

    s3://<adapters>/<adapter_name>/<job_id>/checkpoints/step-0000040/state.json, *.safetensors
    s3://<adapters>/<adapter_name>/<job_id>/checkpoints/latest.json

A checkpoint's files are uploaded first, its state.json after them, and `latest.json` last: that
single small write is the commit, so a worker killed mid-upload leaves the previous checkpoint
in force. `latest.json` also lists the kept checkpoints and their files, so older ones are
deleted by name (no bucket listing needed) once a newer one is committed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunebus.shared.objectstore import ObjectNotFound, ObjectStore

from .backend import CHECKPOINT_STATE

LATEST = "latest.json"


@dataclass(frozen=True)
class StoredCheckpoint:
    step: int
    uri: str
    files: list[str]


class CheckpointStore:
    def __init__(self, store: ObjectStore, job_prefix: str, keep: int = 2) -> None:
        self.store = store
        self.prefix = f"{job_prefix.rstrip('/')}/checkpoints"
        self.keep = keep

    def latest(self) -> StoredCheckpoint | None:
        kept = self._kept()
        return kept[-1] if kept else None

    def kept(self) -> list[StoredCheckpoint]:
        """The job's committed checkpoints, oldest first (what latest.json lists)."""
        return self._kept()

    def started_from(self) -> str | None:
        """The parent (init_from, resolved) the latest checkpoint's run started from: a resumed
        job continues from the version it began with, wherever an alias has moved since."""
        latest = self.latest()
        if latest is None:
            return None
        try:
            state = json.loads(self.store.get_bytes(f"{latest.uri}/{CHECKPOINT_STATE}"))
        except (ObjectNotFound, ValueError):
            return None
        return state.get("init_from") if isinstance(state, dict) else None

    def upload(self, directory: Path, step: int) -> StoredCheckpoint:
        uri = f"{self.prefix}/step-{step:07d}"
        files = sorted(p.name for p in directory.iterdir() if p.is_file())
        if CHECKPOINT_STATE not in files:
            raise ValueError(f"{directory} holds no {CHECKPOINT_STATE}: not a checkpoint")
        for name in [*(f for f in files if f != CHECKPOINT_STATE), CHECKPOINT_STATE]:
            self.store.put_file(f"{uri}/{name}", directory / name)
        added = StoredCheckpoint(step, uri, files)
        kept = [c for c in self._kept() if c.step != step] + [added]
        kept, dropped = kept[-self.keep:], kept[:-self.keep]
        self.store.put_bytes(f"{self.prefix}/{LATEST}", json.dumps(
            {"latest": added.__dict__, "kept": [c.__dict__ for c in kept]}, indent=1).encode(),
            "application/json")
        for old in dropped:
            self._delete(old)
        return added

    def download(self, checkpoint: StoredCheckpoint, directory: Path) -> Path:
        for name in checkpoint.files:
            self.store.get_file(f"{checkpoint.uri}/{name}", directory / name)
        return directory

    def _kept(self) -> list[StoredCheckpoint]:
        try:
            record = json.loads(self.store.get_bytes(f"{self.prefix}/{LATEST}"))
        except ObjectNotFound:
            return []
        return [StoredCheckpoint(**c) for c in record["kept"]]

    def _delete(self, checkpoint: StoredCheckpoint) -> None:
        for name in checkpoint.files:
            self.store.remove(f"{checkpoint.uri}/{name}")
