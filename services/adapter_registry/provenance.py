"""Where a registered adapter may come from: only its own place in the adapters bucket.

The server's permissions already let only the trainer publish `training.completed` and only the
evaluator `evaluation.completed`. The registry checks the paths as well, so that not even a
trainer identity (or a bug in one) can register files that lie elsewhere: a dataset upload, a
model, another job's adapter. Plain functions, no I/O.
"""

from __future__ import annotations

from tunebus.contracts import Artifact, TrainingCompleted
from tunebus.shared.adapter_layouts import adapter_prefix


def training_problem(completed: TrainingCompleted, adapters_bucket: str) -> str | None:
    """Why this training may not become a registered adapter, or None when it may."""
    request = completed.request
    if request.job_id != completed.job_id:
        return f"the event is about job {completed.job_id} but its request is job {request.job_id}"
    prefix = adapter_prefix(adapters_bucket, request.adapter_name, completed.job_id)
    if completed.adapter_uri.rstrip("/") != prefix:
        return (f"adapter_uri {completed.adapter_uri} is not this adapter's place in the registry "
                f"({prefix}/: s3://<adapters bucket>/<adapter_name>/<job_id>/)")
    if completed.merged_model_uri not in (None, f"{prefix}/merged"):
        return f"merged_model_uri {completed.merged_model_uri} is not {prefix}/merged"
    return artifacts_problem(completed.artifacts, prefix)


def artifacts_problem(artifacts: list[Artifact], prefix: str) -> str | None:
    for artifact in artifacts:
        relative = artifact.uri.removeprefix(prefix + "/")
        if (relative == artifact.uri or relative != artifact.name
                or any(part in ("", ".", "..") for part in relative.split("/"))):
            return (f"artifact {artifact.name!r} at {artifact.uri} is not a file under the "
                    f"adapter's prefix {prefix}/")
    return None
