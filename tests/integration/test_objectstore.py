"""The object store helper against a real S3 HTTP endpoint (moto's server)."""

from __future__ import annotations

import hashlib
import time
import urllib.parse
import urllib.request
from datetime import timedelta

import pytest

from tunebus.shared.objectstore import ObjectNotFound, ObjectStore, StoreUnavailable


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


@pytest.fixture
def proxied(bare_servers):
    """The object store reached through a proxy that a test can cut."""
    from tests.helpers.faults import TcpProxy

    endpoint = urllib.parse.urlsplit(bare_servers.s3.endpoint)
    with TcpProxy(endpoint.hostname, endpoint.port) as proxy:
        settings = bare_servers.s3.model_copy(update={"endpoint": proxy.url, "retry_for_s": 8.0})
        yield proxy, ObjectStore(settings)


def test_an_outage_shorter_than_the_retry_bound_is_waited_out(proxied, tmp_path):
    from tests.helpers.faults import cut_for

    proxy, store = proxied
    stored = store.put_bytes("s3://tunebus-adapters/t/outage.bin", b"before")
    cut_for(proxy, 2.0)
    tic = time.monotonic()
    assert store.put_bytes("s3://tunebus-adapters/t/outage.bin", b"during").sha256 != stored.sha256
    assert time.monotonic() - tic >= 1.5  # it waited for S3 to return
    assert store.get_bytes("s3://tunebus-adapters/t/outage.bin") == b"during"


def test_an_outage_past_the_retry_bound_raises_store_unavailable(proxied):
    proxy, store = proxied
    proxy.cut()
    tic = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"unreachable for 8s \(download of s3://tunebus-adapters/t/x\)"):
        store.get_bytes("s3://tunebus-adapters/t/x")
    assert 4 < time.monotonic() - tic < 15


def test_a_missing_object_is_not_retried(proxied):
    _, store = proxied
    tic = time.monotonic()
    with pytest.raises(ObjectNotFound):
        store.get_bytes("s3://tunebus-adapters/t/never-written")
    assert time.monotonic() - tic < 2
