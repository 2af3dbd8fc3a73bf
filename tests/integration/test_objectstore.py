"""The object store helper against a real S3 HTTP endpoint (moto's server)."""

from __future__ import annotations

import hashlib
import urllib.request
from datetime import timedelta

import pytest

from tunebus.shared.objectstore import ObjectNotFound, ObjectStore


@pytest.fixture
def store(bare_servers) -> ObjectStore:
    return ObjectStore(bare_servers.s3)


def test_upload_records_sha256_and_download_returns_it(store, tmp_path):
    src = tmp_path / "weights.bin"
    src.write_bytes(b"\x00\x01" * 100_000)
    stored = store.put_file("s3://tunebus-adapters/t/weights.bin", src)
    assert stored.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert stored.size == 200_000
    head = store.client.stat_object("tunebus-adapters", "t/weights.bin")
    assert head.metadata["x-amz-meta-sha256"] == stored.sha256
    assert store.get_file(stored.uri, tmp_path / "back.bin") == stored.sha256


def test_presigned_url_downloads_with_plain_http(store):
    stored = store.put_bytes("s3://tunebus-adapters/t/config.json", b'{"rank": 8}')
    url = store.presigned_get(stored.uri, timedelta(minutes=5))
    assert urllib.request.urlopen(url).read() == b'{"rank": 8}'
    assert "X-Amz-Expires=300" in url


def test_presigned_expiry_is_capped_by_settings(store):
    stored = store.put_bytes("s3://tunebus-adapters/t/cap.txt", b"x")
    url = store.presigned_get(stored.uri, timedelta(days=30))
    cap = int(store.settings.presign_expiry.total_seconds())
    assert f"X-Amz-Expires={cap}" in url


def test_missing_object_is_reported_by_uri(store, tmp_path):
    with pytest.raises(ObjectNotFound, match="s3://tunebus-datasets/nope.jsonl does not exist"):
        store.open("s3://tunebus-datasets/nope.jsonl")
    assert not store.exists("s3://tunebus-datasets/nope.jsonl")


def test_directories_round_trip(store, tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "tokenizer.json").write_text("[]")
    store.put_dir("s3://tunebus-models/roundtrip", src)
    got = store.get_dir("s3://tunebus-models/roundtrip", tmp_path / "copy")
    assert sorted(p.relative_to(tmp_path / "copy").as_posix() for p in got) == ["config.json", "sub/tokenizer.json"]
