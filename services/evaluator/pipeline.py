"""One evaluation, from a finished training to a stored report: fetch, measure twice, compare.

The base model and base+adapter (a full fine-tune: the whole trained model, from `full/`) are
measured by the same backend on the same held-out examples and the same probes; the report (JSON +
HTML) is written next to the adapter, once: a second run for the same job (a redelivery after a
crash) finds it and answers with what it says.

Every call that touches MLX or torch (importing the backend, loading and measuring models,
converting the adapter) runs on the evaluator's backend thread, never on asyncio's executor
(tunebus.shared.threads says why); plain S3 and file I/O runs on asyncio.to_thread.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import structlog
from tunebus.contracts import Artifact, EvaluationCompleted, TrainingCompleted
from tunebus.shared.adapter_layouts import (
    CONFIG,
    FULL,
    MLX,
    WEIGHTS,
    layouts,
    mlx_to_peft,
    peft_to_mlx,
)
from tunebus.shared.models import resolve_model
from tunebus.shared.objectstore import ObjectNotFound, ObjectStore
from tunebus.shared.settings import Settings
from tunebus.shared.threads import backend_thread

from .backend import load_backend
from .compare import compare
from .examples import probe_cases, read_examples
from .report import REPORT_HTML, REPORT_JSON, render_html, report_document, to_json

log = structlog.get_logger()

BACKEND_THREAD = "evaluator-backend"


class CannotEvaluate(Exception):
    """The evaluation can never succeed for this job (reported as EvaluationFailed)."""


async def evaluate(done: TrainingCompleted, store: ObjectStore, settings: Settings,
                   job_dir: Path) -> EvaluationCompleted:
    report_uri = f"{done.adapter_uri}/{REPORT_JSON}"
    if existing := await asyncio.to_thread(_stored_summary, store, report_uri):
        log.info("evaluation report already stored; reusing it", report=report_uri)
        return existing

    started = time.monotonic()
    request, options = done.request, settings.evaluator
    backend = await on_backend_thread(load_backend, options.backend)
    model_dir = await asyncio.to_thread(
        resolve_model, request.base_model, store, settings.work_dir / "models",
        request.base_model_revision, models_root=settings.models_root)
    full_dir = await _fetch_full_model(done, store, job_dir)
    adapter_dir = None if full_dir else await _fetch_adapter(
        done, store, job_dir, backend.ADAPTER_FORMAT, model_dir)

    valid = job_dir / "valid.jsonl"
    await asyncio.to_thread(store.get_file, done.dataset.valid_uri, valid)
    limit = min(options.max_examples, request.evaluation.max_examples or options.max_examples)
    with valid.open() as lines:
        examples = read_examples(lines, done.dataset.valid_uri, limit)
    if not examples:
        raise CannotEvaluate(f"the held-out split {done.dataset.valid_uri} has no examples")
    cases = probe_cases(examples, request.evaluation.probes, options.probe_samples)
    rows, prompts = [e.row for e in examples], [c.prompt for c in cases]

    measure = dict(max_seq_length=request.hyperparameters.max_seq_length, batch_size=options.batch_size,
                   mask_prompt=done.mask_prompt, max_tokens=options.probe_max_tokens)
    if full_dir is not None:  # two models, each loaded as it is
        before = await on_backend_thread(backend.measure, model_dir, rows, prompts, **measure)
        after = await on_backend_thread(backend.measure, full_dir, rows, prompts, **measure)
    else:
        before, after = await on_backend_thread(backend.measure_base_and_adapter, model_dir,
                                                adapter_dir, rows, prompts, **measure)

    result = compare(done.job_id, request.adapter_name, before, after, cases, backend=backend.NAME,
                     max_tokens=options.probe_max_tokens,
                     regression_tolerance=options.regression_tolerance,
                     probe_rouge_tolerance=options.probe_rouge_tolerance)
    html_uri = f"{done.adapter_uri}/{REPORT_HTML}"
    summary = result.summary.model_copy(update={
        "report_uri": report_uri, "report_html_uri": html_uri,
        "seconds": time.monotonic() - started,
    })
    curve = await asyncio.to_thread(_loss_curve, store, done)
    document = report_document(summary, result.probes, done, curve)
    # HTML first: the JSON report is the marker of a finished evaluation.
    page = await asyncio.to_thread(
        store.put_bytes, html_uri, render_html(document).encode(), "text/html; charset=utf-8")
    stored_json = await asyncio.to_thread(store.put_bytes, report_uri, to_json(document), "application/json")
    return _with_artifacts(summary, stored_json, page)


def on_backend_thread(fn, /, *args, **kwargs):
    """`fn(*args, **kwargs)` on the evaluator's backend thread, awaitable."""
    return backend_thread(BACKEND_THREAD).run(fn, *args, **kwargs)


async def _fetch_full_model(done: TrainingCompleted, store: ObjectStore,
                           job_dir: Path) -> Path | None:
    """A full fine-tune's whole model (its `full/` files) on local disk; None for an adapter."""
    present = done.layouts or layouts([a.name for a in done.artifacts])
    if FULL not in present:
        return None
    folder, model_dir = present[FULL], job_dir / "full-model"
    for artifact in done.artifacts:
        if artifact.name.startswith(folder):
            await asyncio.to_thread(store.get_file, artifact.uri,
                                    model_dir / artifact.name.removeprefix(folder))
    return model_dir


async def _fetch_adapter(done: TrainingCompleted, store: ObjectStore, job_dir: Path,
                         wanted_format: str, model_dir: Path) -> Path:
    """The adapter's files in the layout the backend reads: as stored when the trainer wrote that
    layout (it writes both when it can), else converted from the one it has."""
    by_name = {a.name: a for a in done.artifacts}
    present = done.layouts or layouts(list(by_name))  # computed for an event that did not say
    stored_format = wanted_format if wanted_format in present else next(iter(present), None)
    if stored_format is None:
        raise CannotEvaluate(f"no adapter among the files of {done.adapter_uri}")
    adapter_dir = job_dir / f"adapter-{stored_format}"
    folder = present[stored_format]
    for name in (folder + CONFIG, folder + WEIGHTS[stored_format]):
        await asyncio.to_thread(store.get_file, by_name[name].uri, adapter_dir / name.removeprefix(folder))
    if stored_format == wanted_format:
        return adapter_dir
    converted = job_dir / f"adapter-{wanted_format}"
    try:
        if wanted_format == MLX:
            layers = json.loads((model_dir / "config.json").read_text()).get("num_hidden_layers")
            # On the backend thread: a bfloat16 (QLoRA) adapter is read through torch or MLX.
            await on_backend_thread(peft_to_mlx, adapter_dir, converted, num_hidden_layers=layers)
        else:
            await on_backend_thread(mlx_to_peft, adapter_dir, converted,
                                    base_model=done.request.base_model)
    except ImportError as e:
        raise CannotEvaluate(
            f"the adapter is in {stored_format} format and this evaluator reads {wanted_format}; "
            f"converting needs numpy and safetensors, which this build lacks ({e})") from None
    except ValueError as e:  # the converter's AdapterFormatError names the file and the problem
        raise CannotEvaluate(f"the {stored_format} adapter cannot be read as {wanted_format}: {e}") from e
    return converted


def _stored_summary(store: ObjectStore, report_uri: str) -> EvaluationCompleted | None:
    """The summary of a report stored by an earlier run of this job, if there is one."""
    json_artifact = _stored_artifact(store, report_uri)
    if json_artifact is None:
        return None
    document = json.loads(store.get_bytes(report_uri))
    if "summary" not in document:  # not a report this evaluator wrote: evaluate again
        return None
    summary = EvaluationCompleted.model_validate(document["summary"])
    html_artifact = _stored_artifact(store, summary.report_html_uri or f"{report_uri}.missing")
    if html_artifact is None:
        return None
    return summary.model_copy(update={"report_artifacts": [json_artifact, html_artifact]})


def _stored_artifact(store: ObjectStore, uri: str) -> Artifact | None:
    """An object's name, size and recorded sha256 (x-amz-meta-sha256), or None if it is absent."""
    try:
        stat = store.stat(uri)
    except ObjectNotFound:
        return None
    return Artifact(name=uri.rsplit("/", 1)[1], uri=uri, size=stat.size, sha256=stat.sha256 or "")


def _with_artifacts(summary: EvaluationCompleted, *stored) -> EvaluationCompleted:
    artifacts = [
        Artifact(name=o.uri.rsplit("/", 1)[1], uri=o.uri, sha256=o.sha256, size=o.size)
        for o in sorted(stored, key=lambda o: o.uri.endswith(".html"))
    ]
    return summary.model_copy(update={"report_artifacts": artifacts})


def _loss_curve(store: ObjectStore, done: TrainingCompleted) -> list[dict]:
    curve = done.loss_curve_artifact()
    if curve is None:
        return []
    try:
        return json.loads(store.get_bytes(curve.uri))
    except ValueError:
        return []
