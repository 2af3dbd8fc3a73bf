"""The object store (MinIO, or any S3 endpoint) through the `minio` client.

Every upload records the object's sha256 in its metadata (`x-amz-meta-sha256`) and returns it,
so whoever downloads the object can check it. The client is synchronous; async callers run its
methods in a thread (`asyncio.to_thread`).

S3 being unreachable is a transient failure: every call is retried with backoff for
`TUNEBUS_S3__RETRY_FOR_S`, then raises `StoreUnavailable`, which the delivery policy treats as
a retry (the job is handed back, and a training resumes from its last checkpoint). A missing
object, or a refusal (access denied), is not retried.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import urlparse

import certifi
import structlog
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from .settings import S3Settings

T = TypeVar("T")
log = structlog.get_logger()
# S3 error codes that mean "not now" rather than "no".
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                    "RequestTimeTooSkewed", "OperationAborted"}

_S3_URI = re.compile(r"^s3://(?P<bucket>[^/]+)/(?P<key>.*)$")
_CHUNK = 1024 * 1024


class StoreUnavailable(ConnectionError):
    """S3 did not answer within the retry bound: try the work again later."""


class ObjectNotFound(LookupError):
    def __init__(self, uri: str) -> None:
        super().__init__(f"{uri} does not exist")
        self.uri = uri


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    sha256: str | None  # as recorded in x-amz-meta-sha256 when it was written


@dataclass(frozen=True)
class StoredObject:
    uri: str
    sha256: str
    size: int


def parse_uri(uri: str) -> tuple[str, str]:
    match = _S3_URI.match(uri)
    if not match:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return match["bucket"], match["key"]


def is_transient(error: BaseException) -> bool:
    """Whether a failed S3 call may succeed if repeated (the endpoint down, slow, overloaded)."""
    if isinstance(error, S3Error):
        return error.code in _TRANSIENT_CODES
    return isinstance(error, (ServerError, InvalidResponseError, urllib3.exceptions.HTTPError,
                              ConnectionError, TimeoutError))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ObjectStore:
    def __init__(self, settings: S3Settings) -> None:
        endpoint = urlparse(settings.endpoint)
        self.settings = settings
        self.client = Minio(
            endpoint.netloc,
            access_key=settings.access_key.get_secret_value() or None,
            secret_key=settings.secret_key.get_secret_value() or None,
            secure=endpoint.scheme == "https",
            region=settings.region,
            http_client=urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=settings.connect_timeout_s, read=settings.read_timeout_s),
                maxsize=10, cert_reqs="CERT_REQUIRED",
                ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
                # A few quick retries here; the long wait for an endpoint that is down is
                # `retrying`'s, which logs it.
                retries=urllib3.Retry(total=2, backoff_factor=0.2,
                                      status_forcelist=[500, 502, 503, 504]),
            ),
        )

    def retrying(self, what: str, call: Callable[[], T]) -> T:
        """`call()`, repeated with backoff while S3 is unreachable, for at most retry_for_s."""
        s = self.settings
        deadline = time.monotonic() + s.retry_for_s
        delay = s.retry_base_delay_s
        while True:
            try:
                return call()
            except Exception as e:
                if not is_transient(e):
                    raise
                if time.monotonic() + delay > deadline:
                    raise StoreUnavailable(
                        f"S3 at {s.endpoint} unreachable for {s.retry_for_s:.0f}s ({what}): "
                        f"{type(e).__name__}: {e}") from e
                log.warning("S3 unreachable; retrying", what=what, error=f"{type(e).__name__}: {e}"[:300],
                            delay_s=delay)
                time.sleep(delay)
                delay = min(delay * 2, s.retry_max_delay_s)

    def ensure_buckets(self, *buckets: str) -> None:
        for bucket in buckets or self.all_buckets():
            self.retrying(f"bucket {bucket}", lambda bucket=bucket: self._ensure_bucket(bucket))

    def _ensure_bucket(self, bucket: str) -> None:
        if not self.client.bucket_exists(bucket):
            try:
                self.client.make_bucket(bucket)
            except S3Error as e:  # another process made it first
                if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def all_buckets(self) -> tuple[str, ...]:
        s = self.settings
        return (s.datasets_bucket, s.models_bucket, s.adapters_bucket)

    # -- writing

    def put_file(self, uri: str, path: Path, content_type: str = "application/octet-stream") -> StoredObject:
        bucket, key = parse_uri(uri)
        digest = sha256_file(path)
        size = path.stat().st_size
        self.retrying(f"upload of {uri}", lambda: self.client.fput_object(
            bucket, key, str(path), content_type=content_type, metadata={"sha256": digest}))
        return StoredObject(uri, digest, size)

    def put_bytes(self, uri: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        bucket, key = parse_uri(uri)
        digest = hashlib.sha256(data).hexdigest()
        self.retrying(f"upload of {uri}", lambda: self.client.put_object(
            bucket, key, io.BytesIO(data), len(data), content_type=content_type,
            metadata={"sha256": digest}))
        return StoredObject(uri, digest, len(data))

    def put_dir(self, prefix_uri: str, directory: Path) -> list[StoredObject]:
        """Upload every file below `directory` to `prefix_uri/<relative path>`."""
        prefix = prefix_uri.rstrip("/")
        return [
            self.put_file(f"{prefix}/{path.relative_to(directory).as_posix()}", path)
            for path in sorted(directory.rglob("*"))
            if path.is_file()
        ]

    # -- reading

    def open(self, uri: str) -> BinaryIO:
        """A streaming reader of the object; close it when done."""
        return self.retrying(f"download of {uri}", lambda: self._open(uri))

    def _open(self, uri: str) -> BinaryIO:
        bucket, key = parse_uri(uri)
        try:
            return self.client.get_object(bucket, key)
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchBucket"):
                raise ObjectNotFound(uri) from e
            raise

    def get_bytes(self, uri: str) -> bytes:
        """The whole object (a small one: a manifest, a report)."""

        def read() -> bytes:
            response = self._open(uri)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self.retrying(f"download of {uri}", read)

    def get_file(self, uri: str, path: Path) -> str:
        """Download to `path` and return the sha256 of what arrived (again from the start if
        the connection breaks on the way)."""
        return self.retrying(f"download of {uri}", lambda: self._get_file(uri, path))

    def _get_file(self, uri: str, path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        response = self._open(uri)
        try:
            with path.open("wb") as f:
                for chunk in response.stream(_CHUNK):
                    digest.update(chunk)
                    f.write(chunk)
        finally:
            response.close()
            response.release_conn()
        return digest.hexdigest()

    def get_dir(self, prefix_uri: str, directory: Path,
                include: Callable[[str], bool] | None = None) -> list[Path]:
        """Download every object under the prefix (only those whose relative name `include`
        accepts, when given) into `directory`."""
        prefix = prefix_uri.rstrip("/") + "/"
        paths = []
        for relative in self.list(prefix):
            if include is not None and not include(relative):
                continue
            path = directory / relative
            self.get_file(prefix + relative, path)
            paths.append(path)
        if not paths:
            raise ObjectNotFound(prefix_uri)
        return paths

    def exists(self, uri: str) -> bool:
        try:
            self.stat(uri)
        except ObjectNotFound:
            return False
        return True

    def stat(self, uri: str) -> ObjectInfo:
        """The object's size and the sha256 recorded when it was written (None if none was)."""
        bucket, key = parse_uri(uri)

        def stat():
            try:
                return self.client.stat_object(bucket, key)
            except S3Error as e:
                if e.code in ("NoSuchKey", "NoSuchBucket", "NotFound"):
                    raise ObjectNotFound(uri) from e
                raise

        found = self.retrying(f"stat of {uri}", stat)
        return ObjectInfo(uri, found.size, (found.metadata or {}).get("x-amz-meta-sha256"))

    def stream(self, uri: str, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        """The object's bytes in chunks; the connection goes back to the pool at the end."""
        response = self.open(uri)
        try:
            yield from response.stream(chunk_size)
        finally:
            response.close()
            response.release_conn()

    def list(self, prefix_uri: str, *, recursive: bool = True) -> list[str]:
        """The names of the objects under the prefix, relative to it (no folders)."""
        bucket, prefix = parse_uri(prefix_uri)

        def listing() -> list[str]:
            try:
                return [o.object_name[len(prefix):] for o in
                        self.client.list_objects(bucket, prefix=prefix, recursive=recursive)
                        if not o.is_dir]
            except S3Error as e:
                if e.code == "NoSuchBucket":
                    raise ObjectNotFound(prefix_uri) from e
                raise

        return self.retrying(f"listing of {prefix_uri}", listing)

    def remove(self, uri: str) -> None:
        bucket, key = parse_uri(uri)
        self.retrying(f"removal of {uri}", lambda: self.client.remove_object(bucket, key))

    def presigned_get(self, uri: str, expires: timedelta | None = None) -> str:
        bucket, key = parse_uri(uri)
        expires = min(expires or self.settings.presign_expiry, self.settings.presign_expiry)
        return self.client.presigned_get_object(bucket, key, expires=expires)
