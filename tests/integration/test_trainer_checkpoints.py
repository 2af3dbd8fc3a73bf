"""A job's checkpoints in a real S3 endpoint: committed by latest.json, the newest N kept."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from tunebus.services.trainer.checkpoints import CheckpointStore
from tunebus.shared.objectstore import ObjectStore


@pytest.fixture
def checkpoints(bare_servers) -> CheckpointStore:
    store = ObjectStore(bare_servers.s3)
    return CheckpointStore(store, f"s3://{bare_servers.s3.adapters_bucket}/ckpt/{uuid.uuid4().hex[:8]}", keep=2)


def checkpoint_dir(tmp_path: Path, step: int) -> Path:
    directory = tmp_path / f"local-{step}"
    directory.mkdir()
    (directory / "adapters.safetensors").write_bytes(b"weights %d" % step)
    (directory / "state.json").write_text(json.dumps({"step": step}))
    return directory


def test_nothing_stored_means_no_checkpoint(checkpoints):
    assert checkpoints.latest() is None


def test_the_latest_checkpoint_comes_back_byte_for_byte(checkpoints, tmp_path):
    checkpoints.upload(checkpoint_dir(tmp_path, 20), 20)
    latest = checkpoints.latest()
    assert (latest.step, latest.files) == (20, ["adapters.safetensors", "state.json"])
    assert latest.uri.endswith("/checkpoints/step-0000020")
    restored = checkpoints.download(latest, tmp_path / "restored")
    assert (restored / "adapters.safetensors").read_bytes() == b"weights 20"
    assert json.loads((restored / "state.json").read_text()) == {"step": 20}


def test_only_the_newest_checkpoints_are_kept(checkpoints, tmp_path):
    for step in (10, 20, 30):
        checkpoints.upload(checkpoint_dir(tmp_path, step), step)
    assert checkpoints.latest().step == 30
    store = checkpoints.store
    assert not store.exists(f"{checkpoints.prefix}/step-0000010/state.json")
    assert not store.exists(f"{checkpoints.prefix}/step-0000010/adapters.safetensors")
    assert store.exists(f"{checkpoints.prefix}/step-0000020/state.json")


def test_a_directory_without_state_is_not_a_checkpoint(checkpoints, tmp_path):
    directory = checkpoint_dir(tmp_path, 5)
    (directory / "state.json").unlink()
    with pytest.raises(ValueError, match="holds no state.json"):
        checkpoints.upload(directory, 5)
    assert checkpoints.latest() is None


def test_the_parent_a_run_started_from_is_read_back_from_its_latest_checkpoint(checkpoints, tmp_path):
    assert checkpoints.started_from() is None
    directory = checkpoint_dir(tmp_path, 4)
    checkpoints.upload(directory, 4)
    assert checkpoints.started_from() is None  # a run from the base model
    (directory / "state.json").write_text(json.dumps({"step": 8, "init_from": "tiny:3"}))
    checkpoints.upload(directory, 8)
    assert checkpoints.started_from() == "tiny:3"
