"""Before a version is registered, every artifact is read back from S3 and checked: its bytes
must hash to the sha256 its producer recorded, and so must the object's x-amz-meta-sha256.

An artifact that is missing is retried (it may be an eventually consistent store); one whose
bytes differ is refused for good: a registry entry promises exactly these bytes."""

from __future__ import annotations

import hashlib

from tunebus.contracts import Artifact
from tunebus.shared.objectstore import ObjectNotFound, ObjectStore, parse_uri

_CHUNK = 1 << 20


class ArtifactMismatch(Exception):
    pass


def verify_artifacts(store: ObjectStore, artifacts: list[Artifact]) -> None:
    for artifact in artifacts:
        verify_artifact(store, artifact)


def verify_artifact(store: ObjectStore, artifact: Artifact) -> None:
    if not store.exists(artifact.uri):
        raise ObjectNotFound(artifact.uri)
    stat = store.client.stat_object(*parse_uri(artifact.uri))
    recorded = (stat.metadata or {}).get("x-amz-meta-sha256")
    if recorded is not None and recorded != artifact.sha256:
        raise ArtifactMismatch(f"{artifact.uri}: S3 records sha256 {recorded}, the job reported "
                               f"{artifact.sha256}")
    digest, size = hashlib.sha256(), 0
    response = store.open(artifact.uri)
    try:
        for chunk in response.stream(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    finally:
        response.close()
        response.release_conn()
    if digest.hexdigest() != artifact.sha256 or size != artifact.size:
        raise ArtifactMismatch(
            f"{artifact.uri}: the stored bytes ({size} bytes, sha256 {digest.hexdigest()}) are not "
            f"the recorded ones ({artifact.size} bytes, sha256 {artifact.sha256})")
