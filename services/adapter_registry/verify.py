"""Before a version is registered, every artifact is read back from S3 and checked: its bytes
must hash to the sha256 its producer recorded, and so must the object's x-amz-meta-sha256.

An artifact that is missing is retried (it may be an eventually consistent store); one whose
bytes differ is refused for good: a registry entry promises exactly these bytes."""

from __future__ import annotations

import hashlib

from tunebus.contracts import Artifact
from tunebus.shared.objectstore import ObjectStore

_CHUNK = 1 << 20


class ArtifactMismatch(Exception):
    pass


def verify_artifacts(store: ObjectStore, artifacts: list[Artifact]) -> None:
    for artifact in artifacts:
        verify_artifact(store, artifact)


def verify_artifact(store: ObjectStore, artifact: Artifact) -> None:
    recorded = store.stat(artifact.uri).sha256  # ObjectNotFound when it is not there
    if recorded is not None and recorded != artifact.sha256:
        raise ArtifactMismatch(f"{artifact.uri}: S3 records sha256 {recorded}, the job reported "
                               f"{artifact.sha256}")
    digest, size = hashlib.sha256(), 0
    for chunk in store.stream(artifact.uri, _CHUNK):
        digest.update(chunk)
        size += len(chunk)
    if digest.hexdigest() != artifact.sha256 or size != artifact.size:
        raise ArtifactMismatch(
            f"{artifact.uri}: the stored bytes ({size} bytes, sha256 {digest.hexdigest()}) are not "
            f"the recorded ones ({artifact.size} bytes, sha256 {artifact.sha256})")
