"""Fetch a request's dataset from S3, validate it, and store its canonical splits beside it:

    s3://<datasets bucket>/jobs/<job_id>/train.jsonl, valid.jsonl, [test.jsonl,] manifest.json

A dataset reference is one file, or a prefix (ending in `/`, or any URI that is not an object
but has objects under it) holding train / valid / test files (see layout.py). A given
validation file is kept as it is; without one, the validation split is drawn from the training
data by seed.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from tunebus.contracts import DatasetRejected, DatasetSummary, DatasetValidated, TrainingRequested
from tunebus.contracts.dataset import DatasetReport, ValidateDataset
from tunebus.shared.models import refusal as model_refusal
from tunebus.shared.objectstore import ObjectNotFound, ObjectStore, parse_uri
from tunebus.shared.settings import Settings

from .config import ValidatorSettings
from .layout import DatasetUnavailable, split_files
from .summary import dataset_report, row_errors, unreadable
from .tokens import TokenCounter, load_tokenizer
from .validation import Source, Split, ValidationReport

MAX_ERRORS_IN_EVENT = 20
MAX_WARNINGS_IN_EVENT = 20
log = structlog.get_logger()


@dataclass
class Verdict:
    validated: DatasetValidated | None = None
    rejected: DatasetRejected | None = None


@dataclass(frozen=True)
class Input:
    uri: str
    split: Split


def check_dataset(store: ObjectStore, request: TrainingRequested, settings: Settings,
                  config: ValidatorSettings) -> Verdict:
    """Validate the request's dataset; store the canonical splits and the manifest if it is
    fit to train on. Bad data is a rejection; an unreachable store raises (and is retried)."""
    spec = request.dataset
    if problem := foreign_bucket(settings, spec.uri, spec.valid_uri):
        return _reject(request, problem)
    try:
        inputs = dataset_inputs(store, spec.uri, spec.valid_uri)
    except DatasetUnavailable as e:
        return _reject(request, e.reason)
    tokens = None
    if config.use_tokenizer:
        tokens, about = token_counter(store, request.base_model, request.base_model_revision,
                                      settings.work_dir, settings.models_root)
        log.info(about)
    prefix = f"s3://{settings.s3.datasets_bucket}/jobs/{request.job_id}"
    with tempfile.TemporaryDirectory(prefix="tunebus-validate-") as tmp:
        paths = {split: Path(tmp, f"{split}.jsonl") for split in ("train", "valid", "test")}
        with ExitStack() as files:
            sinks = {split: files.enter_context(path.open("wb")) for split, path in paths.items()}
            try:
                report = config.policy().validate(
                    _sources(store, inputs), format=spec.format, method=request.method,
                    train_sink=sinks["train"], valid_sink=sinks["valid"], test_sink=sinks["test"],
                    seed=request.hyperparameters.seed, valid_fraction=spec.valid_fraction,
                    tokens=tokens, max_seq_length=request.hyperparameters.max_seq_length,
                    on_invalid=spec.on_invalid, progress=_progress_log(spec.uri),
                )
            except ObjectNotFound as e:  # deleted since it was listed
                return _reject(request, f"dataset {e.uri} does not exist")
        if not report.valid:
            return _reject_report(request, report)
        splits = ["train", "valid"] + (["test"] if report.test_rows else [])
        outputs = {split: store.put_file(f"{prefix}/{split}.jsonl", paths[split],
                                         "application/jsonl") for split in splits}
        rows = {"train": report.train_rows, "valid": report.valid_rows, "test": report.test_rows}
        manifest = _manifest(request, inputs, report, outputs, rows, config)
        stored_manifest = store.put_bytes(f"{prefix}/manifest.json",
                                          json.dumps(manifest, indent=2).encode(),
                                          "application/json")
    summary = DatasetSummary(
        format=report.format,
        rows=report.rows,
        train_rows=report.train_rows,
        valid_rows=report.valid_rows,
        dropped=report.dropped,
        dropped_reasons=report.dropped_reasons,
        invalid_rows=report.invalid_rows,
        invalid_reasons=report.invalid_reasons,
        sha256=report.sha256[inputs[0].uri],
        train_uri=outputs["train"].uri,
        train_sha256=outputs["train"].sha256,
        valid_uri=outputs["valid"].uri,
        valid_sha256=outputs["valid"].sha256,
        manifest_uri=stored_manifest.uri,
        warnings=report.warnings[:MAX_WARNINGS_IN_EVENT],
        warning_count=report.warning_count,
        token_stats=report.token_stats,
    )
    return Verdict(validated=DatasetValidated(job_id=request.job_id, request=request,
                                              dataset=summary))


def check_uri(store: ObjectStore, query: ValidateDataset, settings: Settings,
              config: ValidatorSettings) -> DatasetReport:
    """The request/reply check: the same validation as a training request's, writing nothing."""
    if problem := foreign_bucket(settings, query.uri, query.valid_uri):
        return unreadable(problem)
    try:
        inputs = dataset_inputs(store, query.uri, query.valid_uri)
    except DatasetUnavailable as e:
        return unreadable(e.reason)
    tokens = None
    if query.base_model and config.use_tokenizer:
        tokens, about = token_counter(store, query.base_model, None, settings.work_dir,
                                      settings.models_root)
        log.info(about)
    try:
        report = config.policy().validate(
            _sources(store, inputs), format=query.format, method=query.method, tokens=tokens,
            max_seq_length=query.max_seq_length, max_errors=query.max_errors,
            preview_rows=query.preview_rows, on_invalid=query.on_invalid,
            progress=_progress_log(query.uri),
        )
    except ObjectNotFound as e:
        return unreadable(f"dataset {e.uri} does not exist")
    return dataset_report(report, query.max_errors)


# -- what a dataset reference stands for -----------------------------------------------------


def foreign_bucket(settings: Settings, *uris: str | None) -> str | None:
    """Why a dataset URI may not be read: datasets come from the datasets bucket only (or the
    buckets `TUNEBUS_S3__EXTRA_DATASET_BUCKETS` names), never from models or adapters."""
    allowed = [settings.s3.datasets_bucket, *settings.s3.extra_dataset_buckets]
    for uri in filter(None, uris):
        try:
            bucket, _ = parse_uri(uri)
        except ValueError:
            continue  # not an s3:// URI: dataset_inputs says so
        if bucket not in allowed:
            return (f"dataset {uri} is in bucket {bucket}: datasets are read only from "
                    f"{', '.join(f's3://{b}/' for b in allowed)}")
    return None


def dataset_inputs(store: ObjectStore, uri: str, valid_uri: str | None = None) -> list[Input]:
    """The files a dataset reference stands for, each with the split it feeds, train first."""
    if uri.endswith("/"):
        inputs = _prefix_inputs(store, uri)
    elif store.exists(uri):
        inputs = [Input(uri, "auto")]
    else:
        try:
            inputs = _prefix_inputs(store, uri + "/")
        except DatasetUnavailable:
            raise DatasetUnavailable(f"dataset {uri} does not exist") from None
    if valid_uri:  # an explicit validation file wins over one in the prefix
        if not store.exists(valid_uri):
            raise DatasetUnavailable(f"validation dataset {valid_uri} does not exist")
        inputs = [Input(i.uri, "train") if i.split == "auto" else i
                  for i in inputs if i.split != "valid"]
        inputs.append(Input(valid_uri, "valid"))
    order = {"auto": 0, "train": 0, "valid": 1, "test": 2}
    return sorted(inputs, key=lambda i: order[i.split])


def _prefix_inputs(store: ObjectStore, prefix_uri: str) -> list[Input]:
    try:
        names = store.list(prefix_uri, recursive=False)
    except ObjectNotFound:
        names = []
    if not names:
        raise DatasetUnavailable(f"dataset {prefix_uri} does not exist")
    return [Input(f"{prefix_uri}{name}", split) for name, split in split_files(prefix_uri, names)]


def _sources(store: ObjectStore, inputs: list[Input]) -> Iterator[Source]:
    """Each input as a stream, opened only when validation reaches it."""
    for item in inputs:
        with store.open(item.uri) as body:
            yield Source(item.uri, body, item.split)


# -- token lengths ---------------------------------------------------------------------------


def token_counter(store: ObjectStore, base_model: str, revision: str | None,
                  work_dir: Path, models_root: Path | None = None) -> tuple[TokenCounter | None, str]:
    """The base model's tokenizer, fetching only its tokenizer.json, or None (estimate the
    lengths) when there is none or it cannot be had; and a word on which it is."""
    if problem := model_refusal(base_model, store.settings.models_bucket, models_root):
        return None, f"{problem}; token lengths are estimated"
    try:
        directory = _tokenizer_dir(store, base_model, revision, Path(work_dir) / "tokenizers")
    except Exception as e:  # no tokenizer must never fail a validation
        return None, f"no tokenizer for {base_model} ({e}); token lengths are estimated"
    counter = load_tokenizer(directory, base_model) if directory is not None else None
    if counter is None:
        return None, f"no tokenizer.json for {base_model}; token lengths are estimated"
    return counter, f"token lengths counted with the tokenizer of {base_model}"


def _tokenizer_dir(store: ObjectStore, ref: str, revision: str | None, cache: Path) -> Path | None:
    if ref.startswith("s3://"):
        # Fetched every time (it is small): an s3:// prefix may be overwritten in place.
        target = cache / hashlib.sha256(ref.encode()).hexdigest()[:16]
        try:
            store.get_file(ref.rstrip("/") + "/tokenizer.json", target / "tokenizer.json")
        except ObjectNotFound:
            return None
        return target
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:  # a path, not a hub id
        return None
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    return Path(hf_hub_download(ref, "tokenizer.json", revision=revision,
                                cache_dir=cache / "hub")).parent


# -- verdicts --------------------------------------------------------------------------------


def _manifest(request: TrainingRequested, inputs: list[Input], report: ValidationReport,
              outputs: dict, rows: dict[str, int], config: ValidatorSettings) -> dict:
    return {
        "job_id": request.job_id,
        "method": request.method,
        "format": report.format,
        "canonical": report.kind,
        "inputs": [{"uri": i.uri, "split": i.split, "sha256": report.sha256.get(i.uri),
                    "rows": report.rows_by_file.get(i.uri, 0)} for i in inputs],
        "outputs": {split: {"uri": o.uri, "sha256": o.sha256, "bytes": o.size, "rows": rows[split]}
                    for split, o in outputs.items()},
        "rows_in": report.rows,
        "rows_out": report.train_rows + report.valid_rows + report.test_rows,
        "dropped": report.dropped,
        "dropped_reasons": report.dropped_reasons,
        "on_invalid": request.dataset.on_invalid,
        "invalid_rows": report.invalid_rows,
        "invalid_reasons": report.invalid_reasons,
        "warning_count": report.warning_count,
        "warning_counts": report.warning_counts_by_kind,
        "warnings": report.warnings,
        "token_stats": report.token_stats,
        "token_counter": report.token_counter,
        "split_seed": request.hyperparameters.seed,
        "valid_fraction": request.dataset.valid_fraction,
        "valid_from": "file" if any(i.split == "valid" for i in inputs) else "split",
        "refinement": asdict(config.refinement()),
        "limits": asdict(config.limits()),
        "min_rows": config.min_rows,
    }


def _progress_log(uri: str, every_s: float = 10.0) -> Callable[[int, int], None]:
    """Long validations say how far they are, at most every `every_s` seconds."""
    last = time.monotonic()

    def progress(rows: int, nbytes: int) -> None:
        nonlocal last
        if time.monotonic() - last >= every_s:
            last = time.monotonic()
            log.info("validating", dataset=uri, rows=rows, megabytes=nbytes // 1_000_000)

    return progress


def _reject(request: TrainingRequested, reason: str) -> Verdict:
    return Verdict(rejected=DatasetRejected(job_id=request.job_id, reason=reason, request=request))


def _reject_report(request: TrainingRequested, report: ValidationReport) -> Verdict:
    return Verdict(rejected=DatasetRejected(
        job_id=request.job_id,
        reason=report.reason,
        errors=row_errors(report.errors, MAX_ERRORS_IN_EVENT),
        error_count=report.error_count,
        error_counts=report.error_counts_by_kind,
        request=request,
    ))
