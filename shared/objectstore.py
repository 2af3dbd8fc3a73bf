"""The object store (MinIO, or any S3 endpoint) through the `minio` client.

Every upload records the object's sha256 in its metadata (`x-amz-meta-sha256`) and returns it,
so whoever downloads the object can check it. The client is synchronous; async callers run its
methods in a thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from minio import Minio
from minio.error import S3Error

from .settings import S3Settings

_S3_URI = re.compile(r"^s3://(?P<bucket>[^/]+)/(?P<key>.*)$")
_CHUNK = 1024 * 1024


class ObjectNotFound(LookupError):
    def __init__(self, uri: str) -> None:
        super().__init__(f"{uri} does not exist")
        self.uri = uri


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
        )

    def ensure_buckets(self, *buckets: str) -> None:
        for bucket in buckets or self.all_buckets():
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
        self.client.fput_object(
            bucket, key, str(path), content_type=content_type, metadata={"sha256": digest}
        )
        return StoredObject(uri, digest, size)

    def put_bytes(self, uri: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        bucket, key = parse_uri(uri)
        digest = hashlib.sha256(data).hexdigest()
        self.client.put_object(
            bucket, key, io.BytesIO(data), len(data), content_type=content_type, metadata={"sha256": digest}
        )
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
        bucket, key = parse_uri(uri)
        try:
            return self.client.get_object(bucket, key)
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchBucket"):
                raise ObjectNotFound(uri) from e
            raise

    def get_file(self, uri: str, path: Path) -> str:
        """Download to `path` and return the sha256 of what arrived."""
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        response = self.open(uri)
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
        bucket, prefix = parse_uri(prefix_uri.rstrip("/") + "/")
        paths = []
        for obj in self.client.list_objects(bucket, prefix=prefix, recursive=True):
            relative = obj.object_name[len(prefix):]
            if include is not None and not include(relative):
                continue
            path = directory / relative
            self.get_file(f"s3://{bucket}/{obj.object_name}", path)
            paths.append(path)
        if not paths:
            raise ObjectNotFound(prefix_uri)
        return paths

    def exists(self, uri: str) -> bool:
        bucket, key = parse_uri(uri)
        try:
            self.client.stat_object(bucket, key)
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchBucket", "NotFound"):
                return False
            raise
        return True

    def delete(self, uri: str) -> None:
        bucket, key = parse_uri(uri)
        self.client.remove_object(bucket, key)

    def presigned_get(self, uri: str, expires: timedelta | None = None) -> str:
        bucket, key = parse_uri(uri)
        expires = min(expires or self.settings.presign_expiry, self.settings.presign_expiry)
        return self.client.presigned_get_object(bucket, key, expires=expires)
