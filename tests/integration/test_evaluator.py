"""The evaluator against a real S3 endpoint: a tiny model memorises a "42 document", and the
report stored next to the adapter shows that the adapter answers its probes and the base model
does not."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.helpers.evaluation import FACTS, chat_rows, train_adapter, write_jsonl
from tunebus.contracts import Artifact, Probe, TrainingCompleted
from tunebus.services.evaluator.pipeline import evaluate
from tunebus.shared.objectstore import ObjectStore
from tunebus.shared.devstack.tinymodel import generate_tiny_model

pytestmark = pytest.mark.anyio

EXAMPLE = Path(__file__).parents[2] / "contracts" / "examples" / "v1" / "tunebus.training.completed.v1.json"
PROBES = [Probe(prompt=q, expected=key) for q, _, key in FACTS]


@pytest.fixture(scope="module")
def trained(bare_servers, tmp_path_factory):
    """The tiny model and a memorising adapter, uploaded as the trainer would leave them."""
    settings = bare_servers
    store = ObjectStore(settings.s3)
    root = tmp_path_factory.mktemp("memorise")
    model = generate_tiny_model(root / "model")
    model_uri = f"s3://{settings.s3.models_bucket}/tiny-evaluator"
    store.put_dir(model_uri, model)
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", chat_rows(4))
    write_jsonl(data / "valid.jsonl", chat_rows(1))
    adapter = train_adapter(model, data, root / "adapter")
    (adapter / "loss_curve.json").write_text(json.dumps(
        [{"step": 40, "train_loss": 2.5, "val_loss": None}, {"step": 80, "train_loss": 0.9, "val_loss": 1.0}]))
    return settings, store, model_uri, adapter, data


def training_completed(settings, store, model_uri, adapter, data, job_id: str) -> TrainingCompleted:
    example = json.loads(EXAMPLE.read_text())["data"]
    adapter_uri = f"s3://{settings.s3.adapters_bucket}/memo/{job_id}"
    stored = store.put_dir(adapter_uri, adapter)
    valid = store.put_file(f"s3://{settings.s3.datasets_bucket}/jobs/{job_id}/valid.jsonl", data / "valid.jsonl")
    example["job_id"] = example["request"]["job_id"] = job_id
    example["request"] |= {"adapter_name": "memo", "base_model": model_uri,
                           "evaluation": {"probes": [p.model_dump() for p in PROBES]}}
    example["request"]["hyperparameters"]["max_seq_length"] = 128
    example["dataset"] |= {"valid_uri": valid.uri, "valid_sha256": valid.sha256}
    example |= {"adapter_uri": adapter_uri, "resolved_args": {"mask_prompt": True}, "artifacts": [
        Artifact(name=o.uri.rsplit("/", 1)[1], uri=o.uri, sha256=o.sha256, size=o.size).model_dump()
        for o in stored]}
    return TrainingCompleted.model_validate(example)


async def test_the_report_shows_the_adapter_answers_the_probes_and_the_base_model_does_not(trained, tmp_path):
    settings, store, model_uri, adapter, data = trained
    done = training_completed(settings, store, model_uri, adapter, data, "memo-job-1")

    summary = await evaluate(done, store, settings, tmp_path / "eval")

    contains = summary.metric("probe_contains")
    assert (contains.before, contains.after) == (0.0, 1.0)
    assert summary.probes.from_request == len(FACTS) and summary.probes.regressions == 0
    assert summary.improved and summary.metric("loss").improvement > 0.5
    assert summary.after.token_accuracy > summary.before.token_accuracy
    assert summary.metric("probe_rouge_l").after > summary.metric("probe_rouge_l").before
    assert not summary.regressed and summary.backend == "mlx"

    # The report is stored next to the adapter, and says the same.
    report = json.loads(store.open(summary.report_uri).read())
    assert report["summary"]["metrics"] == summary.model_dump(mode="json")["metrics"]
    answers = {p["prompt"]: p for p in report["probes"] if p["source"] == "request"}
    for question, _, key in FACTS:
        assert key.lower() in answers[question]["adapter"]["answer"].lower()
        assert key.lower() not in answers[question]["base"]["answer"].lower()
    page = store.open(summary.report_html_uri).read().decode()
    assert "<svg" in page and "Ada Quill" in page and "<script" not in page
    for artifact in summary.report_artifacts:
        body = store.open(artifact.uri).read()
        assert hashlib.sha256(body).hexdigest() == artifact.sha256 and len(body) == artifact.size


async def test_a_second_run_for_the_same_job_reuses_the_stored_report(trained, tmp_path):
    settings, store, model_uri, adapter, data = trained
    done = training_completed(settings, store, model_uri, adapter, data, "memo-job-2")
    first = await evaluate(done, store, settings, tmp_path / "one")
    # A redelivery after a crash: the same job, evaluated again, says what it said before.
    second = await evaluate(done, store, settings, tmp_path / "two")
    assert second == first
    assert not (tmp_path / "two").exists()  # nothing was downloaded or measured


async def test_a_held_out_split_it_cannot_read_is_a_clear_error(trained, tmp_path):
    from tunebus.services.evaluator.examples import BadExample

    settings, store, model_uri, adapter, data = trained
    done = training_completed(settings, store, model_uri, adapter, data, "memo-job-3")
    store.put_bytes(done.dataset.valid_uri, b'{"messages": []}\n')
    with pytest.raises(BadExample, match=r"valid.jsonl:1: field 'messages' must be a non-empty array"):
        await evaluate(done, store, settings, tmp_path / "bad")
