"""Fetch a request's dataset from S3, validate it, and store its normalised splits next to it."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tunebus.contracts import DatasetRejected, DatasetSummary, DatasetValidated, RowError, TrainingRequested
from tunebus.shared.objectstore import ObjectNotFound, ObjectStore
from tunebus.shared.settings import S3Settings

from .validation import ValidationReport, validate

SUPPORTED_FORMATS = ("auto", "alpaca", "messages")
MAX_ERRORS_IN_EVENT = 20


@dataclass
class Verdict:
    validated: DatasetValidated | None = None
    rejected: DatasetRejected | None = None


def check_dataset(store: ObjectStore, request: TrainingRequested, s3: S3Settings) -> Verdict:
    spec = request.dataset
    if spec.format not in SUPPORTED_FORMATS:
        return _reject(request, f"dataset format {spec.format!r} is not supported yet "
                       f"(supported: {', '.join(SUPPORTED_FORMATS)})")
    prefix = f"s3://{s3.datasets_bucket}/jobs/{request.job_id}"
    with tempfile.TemporaryDirectory(prefix="tunebus-validate-") as tmp:
        train_path, valid_path = Path(tmp, "train.jsonl"), Path(tmp, "valid.jsonl")
        try:
            reports = _validate_into(store, request, train_path, valid_path)
        except ObjectNotFound as e:
            return _reject(request, f"dataset {e.uri} does not exist")
        failed = [r for r in reports if not r.valid]
        if failed:
            return _reject_report(request, failed)

        train = store.put_file(f"{prefix}/train.jsonl", train_path, "application/jsonl")
        valid = store.put_file(f"{prefix}/valid.jsonl", valid_path, "application/jsonl")
        main = reports[0]
        manifest = {
            "job_id": request.job_id,
            "inputs": [r.to_dict() for r in reports],
            "outputs": {
                "train": {"uri": train.uri, "sha256": train.sha256, "rows": _count_lines(train_path)},
                "valid": {"uri": valid.uri, "sha256": valid.sha256, "rows": _count_lines(valid_path)},
            },
            "split_seed": request.hyperparameters.seed,
            "valid_fraction": spec.valid_fraction,
        }
        stored_manifest = store.put_bytes(
            f"{prefix}/manifest.json", json.dumps(manifest, indent=2).encode(), "application/json"
        )
        summary = DatasetSummary(
            format=main.format or "unknown",
            rows=sum(r.rows for r in reports),
            train_rows=manifest["outputs"]["train"]["rows"],
            valid_rows=manifest["outputs"]["valid"]["rows"],
            dropped=sum(r.dropped for r in reports),
            sha256=next(iter(main.sha256.values())),
            train_uri=train.uri,
            train_sha256=train.sha256,
            valid_uri=valid.uri,
            valid_sha256=valid.sha256,
            manifest_uri=stored_manifest.uri,
            warnings=[w for r in reports for w in r.warnings][:20],
        )
    return Verdict(validated=DatasetValidated(job_id=request.job_id, request=request, dataset=summary))


def _validate_into(
    store: ObjectStore, request: TrainingRequested, train_path: Path, valid_path: Path
) -> list[ValidationReport]:
    """Validate the dataset (and the held-out file, if the request names one) into the two
    split files: without a held-out file the split is drawn from the dataset by seed."""
    spec = request.dataset
    seed = request.hyperparameters.seed
    reports = []
    with train_path.open("w") as train, valid_path.open("w") as valid:
        with store.open(spec.uri) as body:
            reports.append(validate(
                [(spec.uri, body)], format=spec.format, train_sink=train,
                valid_sink=train if spec.valid_uri else valid,
                seed=seed, valid_fraction=spec.valid_fraction,
            ))
        if spec.valid_uri:
            with store.open(spec.valid_uri) as body:
                reports.append(validate(
                    [(spec.valid_uri, body)], format=spec.format, train_sink=valid,
                    valid_sink=valid, seed=seed, valid_fraction=spec.valid_fraction,
                ))
    return reports


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _reject(request: TrainingRequested, reason: str) -> Verdict:
    return Verdict(rejected=DatasetRejected(job_id=request.job_id, reason=reason, request=request))


def _reject_report(request: TrainingRequested, reports: list[ValidationReport]) -> Verdict:
    errors = [e for r in reports for e in r.errors]
    count = sum(r.error_count for r in reports)
    first = errors[0] if errors else None
    reason = f"{count} error(s) in the dataset"
    if first is not None:
        reason += f"; first: {first}"
    return Verdict(rejected=DatasetRejected(
        job_id=request.job_id,
        reason=reason,
        errors=[RowError(file=e.file or "", line=e.line, index=e.index, field=e.field, message=e.message)
                for e in errors[:MAX_ERRORS_IN_EVENT]],
        error_count=count,
        request=request,
    ))
