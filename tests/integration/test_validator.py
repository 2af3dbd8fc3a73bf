"""The dataset-validator against a real S3 endpoint (and, for its subjects, the running stack):
prefixes of split files, the canonical outputs and manifest, request/reply checks, and
rejections a person can act on."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import uuid

import nats
import pytest
from nats.errors import NoRespondersError
from typer.testing import CliRunner

from tests.helpers.events import EventLog
from tests.helpers.bus import connect
from tunebus.contracts import TrainingRequested
from tunebus.services.dataset_validator.config import ValidatorSettings
from tunebus.services.dataset_validator.pipeline import check_dataset
from tunebus.shared.cli import app
from tunebus.shared.devstack.stack import service_env
from tunebus.shared.objectstore import ObjectStore

ROWS = [{"instruction": f"What is {a} times {b}?", "output": f"{a * b}"}
        for a in range(1, 7) for b in range(1, 7)]
PREFERENCES = [{"prompt": f"Greet person {i}.", "chosen": f"Hello, person {i}!",
                "rejected": "Go away."} for i in range(12)]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def read_jsonl(store: ObjectStore, uri: str) -> list[dict]:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    return [json.loads(line) for line in store.client.get_object(bucket, key).read().splitlines()]


def request(job_id: str, uri: str, **fields) -> TrainingRequested:
    return TrainingRequested.model_validate({
        "job_id": job_id, "adapter_name": "checked", "base_model": "s3://tunebus-models/none",
        "dataset": {"uri": uri}, **fields,
    })


# -- in process, against a real S3 endpoint --------------------------------------------------


@pytest.fixture(scope="module")
def s3(bare_servers):
    return bare_servers, ObjectStore(bare_servers.s3)


def test_a_prefix_of_split_files_becomes_canonical_splits_and_a_manifest(s3):
    settings, store = s3
    bucket = settings.s3.datasets_bucket
    job_id = f"prefix-{uuid.uuid4().hex[:8]}"
    prefix = f"s3://{bucket}/uploads/{job_id}"
    train = gzip.compress(jsonl(ROWS[:30] + ROWS[:2]))  # two duplicates to drop
    store.put_bytes(f"{prefix}/train.jsonl.gz", train)
    store.put_bytes(f"{prefix}/validation.json", json.dumps(ROWS[30:]).encode())
    store.put_bytes(f"{prefix}/test.jsonl", jsonl(ROWS[:3]))
    store.put_bytes(f"{prefix}/README.md", b"not data")

    verdict = check_dataset(store, request(job_id, f"{prefix}/"), settings, ValidatorSettings())

    assert verdict.rejected is None, verdict.rejected
    summary = verdict.validated.dataset
    assert (summary.format, summary.rows, summary.train_rows, summary.valid_rows) == ("alpaca", 41, 30, 6)
    assert summary.dropped == 2 and summary.dropped_reasons == {"duplicate": 2}
    assert summary.sha256 == hashlib.sha256(train).hexdigest()
    assert summary.train_uri == f"s3://{bucket}/jobs/{job_id}/train.jsonl"
    assert read_jsonl(store, summary.valid_uri)[0] == {"messages": [
        {"role": "user", "content": "What is 6 times 1?"}, {"role": "assistant", "content": "6"}]}
    manifest = json.loads(store.client.get_object(bucket, f"jobs/{job_id}/manifest.json").read())
    assert manifest["canonical"] == "messages" and manifest["valid_from"] == "file"
    assert [(i["split"], i["rows"]) for i in manifest["inputs"]] == [("train", 32), ("valid", 6), ("test", 3)]
    for split, output in manifest["outputs"].items():
        bucket_, key = output["uri"].removeprefix("s3://").split("/", 1)
        body = store.client.get_object(bucket_, key).read()
        assert hashlib.sha256(body).hexdigest() == output["sha256"]
        assert len(body.splitlines()) == output["rows"]
    assert manifest["outputs"]["test"]["rows"] == 3
    assert summary.train_sha256 == manifest["outputs"]["train"]["sha256"]


def test_on_invalid_drop_counts_the_rows_left_out_in_the_event_and_the_manifest(s3):
    settings, store = s3
    job_id = f"drop-{uuid.uuid4().hex[:8]}"
    uri = f"s3://{settings.s3.datasets_bucket}/uploads/{job_id}/d.jsonl"
    store.put_bytes(uri, jsonl(ROWS[:20]) + b"{oops\n" + jsonl([{"instruction": "q"}]))

    rejected = check_dataset(store, request(job_id, uri), settings, ValidatorSettings())
    assert rejected.rejected.error_count == 2
    drop = request(job_id, uri, dataset={"uri": uri, "on_invalid": "drop"})
    verdict = check_dataset(store, drop, settings, ValidatorSettings())

    summary = verdict.validated.dataset
    assert summary.train_rows + summary.valid_rows == 20
    assert (summary.invalid_rows, summary.invalid_reasons) == (
        2, {"invalid_json": 1, "missing_field": 1})
    bucket = settings.s3.datasets_bucket
    manifest = json.loads(store.client.get_object(bucket, f"jobs/{job_id}/manifest.json").read())
    assert (manifest["on_invalid"], manifest["invalid_rows"], manifest["min_rows"]) == ("drop", 2, 1)
    too_few = check_dataset(store, drop, settings, ValidatorSettings(min_rows=21))
    assert too_few.rejected.errors[0].kind == "too_few_rows"


def test_token_lengths_use_the_base_models_tokenizer(s3):
    from tokenizers import Tokenizer, models, pre_tokenizers

    settings, store = s3
    words = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model_uri = f"s3://{settings.s3.models_bucket}/words-{uuid.uuid4().hex[:6]}"
    store.put_bytes(f"{model_uri}/tokenizer.json", words.to_str().encode())
    job_id = f"tokens-{uuid.uuid4().hex[:8]}"
    uri = f"s3://{settings.s3.datasets_bucket}/uploads/{job_id}/d.jsonl"
    store.put_bytes(uri, jsonl(ROWS))

    verdict = check_dataset(store, request(job_id, uri, base_model=model_uri,
                                           hyperparameters={"max_seq_length": 8}),
                            settings, ValidatorSettings())

    summary = verdict.validated.dataset
    # "What is 2 times 3?" and "6": six words, counted by the word-level tokenizer in S3
    assert summary.token_stats == {"min": 6.0, "mean": 6.0, "p50": 6.0, "p95": 6.0, "max": 6.0}
    manifest = json.loads(store.client.get_object(
        settings.s3.datasets_bucket, f"jobs/{job_id}/manifest.json").read())
    assert manifest["token_counter"] == model_uri


def test_a_preference_dataset_for_dpo_is_written_as_prompt_chosen_rejected(s3):
    settings, store = s3
    job_id = f"dpo-{uuid.uuid4().hex[:8]}"
    uri = f"s3://{settings.s3.datasets_bucket}/uploads/{job_id}/prefs.jsonl"
    store.put_bytes(uri, jsonl(PREFERENCES))

    verdict = check_dataset(store, request(job_id, uri, method="dpo"), settings, ValidatorSettings())

    summary = verdict.validated.dataset
    rows = read_jsonl(store, summary.train_uri) + read_jsonl(store, summary.valid_uri)
    assert sorted(rows, key=lambda r: r["prompt"]) == sorted(PREFERENCES, key=lambda r: r["prompt"])


def test_a_prefix_without_a_train_file_is_rejected_saying_what_it_holds(s3):
    settings, store = s3
    job_id = f"notrain-{uuid.uuid4().hex[:8]}"
    prefix = f"s3://{settings.s3.datasets_bucket}/uploads/{job_id}/"
    store.put_bytes(f"{prefix}data.csv", b"a,b\n")

    verdict = check_dataset(store, request(job_id, prefix), settings, ValidatorSettings())

    # (Parquet files and shards named since issue 12.)
    assert verdict.rejected.reason == (f"{prefix} holds no train file (train.jsonl, train.json, "
                                       "train.jsonl.gz, train.json.gz, train.parquet or "
                                       "train-*-of-*.parquet shards); it holds: data.csv")


def test_limits_from_the_settings_reject_a_dataset_too_large(s3):
    settings, store = s3
    job_id = f"limits-{uuid.uuid4().hex[:8]}"
    uri = f"s3://{settings.s3.datasets_bucket}/uploads/{job_id}/d.jsonl"
    store.put_bytes(uri, jsonl(ROWS))

    verdict = check_dataset(store, request(job_id, uri), settings, ValidatorSettings(max_rows=10))

    assert verdict.rejected.error_count == 1
    assert verdict.rejected.errors[0].kind == "too_many_rows"
    assert verdict.rejected.errors[0].line == 11


# -- the running service ---------------------------------------------------------------------


async def ask(stack, body: dict) -> dict:
    """One request/reply round trip; while the service is still starting there is no responder
    yet, so that is retried (bounded)."""
    nc = await connect(stack.settings)
    try:
        replies = []

        async def answered() -> bool:
            try:
                replies.append(await nc.request("tunebus.v1.validator.validate",
                                                json.dumps(body).encode(), timeout=60))
            except NoRespondersError:
                return False
            return True

        await wait_until_async(answered, 60, "the dataset-validator never answered")
        return json.loads(replies[0].data)
    finally:
        await nc.close()


async def wait_until_async(check, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s: {what}")
        await asyncio.sleep(0.2)


@pytest.mark.anyio
async def test_request_reply_checks_a_dataset_in_s3(stack, store):
    bucket = stack.settings.s3.datasets_bucket
    good = f"s3://{bucket}/checks/{uuid.uuid4().hex[:8]}/good.jsonl"
    bad = f"s3://{bucket}/checks/{uuid.uuid4().hex[:8]}/bad.jsonl"
    store.put_bytes(good, jsonl(ROWS))
    store.put_bytes(bad, jsonl(ROWS[:3]) + b'{"instruction": "x", "output": 5}\n{"nope\n')

    report = await ask(stack, {"uri": good, "method": "sft", "preview_rows": 2})
    assert report["valid"] is True and report["format"] == "alpaca" and report["rows"] == 36
    assert len(report["preview"]) == 2 and report["preview"][0]["messages"][1]["role"] == "assistant"

    report = await ask(stack, {"uri": bad})
    assert report["valid"] is False and report["error_count"] == 2
    assert [(e["line"], e["field"], e["kind"]) for e in report["errors"]] == [
        (4, "output", "wrong_type"), (5, None, "invalid_json")]

    report = await ask(stack, {"uri": good, "method": "grpo"})
    assert report["valid"] is False and "which method 'grpo' cannot train on" in report["reason"]

    missing = f"s3://{bucket}/checks/none/nothing.jsonl"
    report = await ask(stack, {"uri": missing})
    assert report["valid"] is False and report["reason"] == f"dataset {missing} does not exist"


@pytest.mark.anyio
async def test_a_dpo_request_with_instruction_data_is_rejected_with_the_reason(stack, store):
    job_id = f"wrongmethod-{uuid.uuid4().hex[:8]}"
    uri = f"s3://{stack.settings.s3.datasets_bucket}/uploads/{job_id}/d.jsonl"
    store.put_bytes(uri, jsonl(ROWS))
    event = {
        "specversion": "1.0", "id": str(uuid.uuid4()), "source": "tests", "subject": job_id,
        "type": "tunebus.training.requested.v1", "time": "2026-11-21T12:00:00Z",
        "data": {"job_id": job_id, "adapter_name": "wrong", "base_model": "s3://x/y",
                 "method": "dpo", "dataset": {"uri": uri}},
    }
    nc = await connect(stack.settings)
    events = await EventLog().start(nc)
    try:
        await nc.jetstream().publish("tunebus.v1.training.requested", json.dumps(event).encode())
        rejected = (await events.wait_for(job_id, ".dataset.rejected"))["data"]
        assert rejected["reason"] == (
            "dataset is in alpaca format, which method 'dpo' cannot train on "
            "(dpo takes preference; alpaca suits sft)")
        assert rejected["error_count"] == len(ROWS) and rejected["errors"][0]["line"] == 1
    finally:
        await nc.close()


def test_the_cli_asks_the_running_validator_about_an_s3_uri(stack, store, monkeypatch):
    for key, value in service_env(stack.settings).items():
        monkeypatch.setenv(key, value)
    uri = f"s3://{stack.settings.s3.datasets_bucket}/checks/{uuid.uuid4().hex[:8]}/mixed.jsonl"
    store.put_bytes(uri, jsonl(ROWS[:2]) + jsonl(PREFERENCES[:1]))
    asyncio.run(ask(stack, {"uri": uri}))  # the service is up (it answers)
    result = CliRunner().invoke(app, ["validate", uri, "--json"], catch_exceptions=False)
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["error_counts"] == {"mixed_format": 2}
    assert "preference on 1 row (first at " + uri + " line 3)" in report["errors"][0]["message"]
