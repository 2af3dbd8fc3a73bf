"""The registry end to end over the real stack: versions, lineage, the promotion policy, aliases,
downloads with any S3 client (both adapter layouts, each loadable by its own library), soft
delete, and the evaluator's "42 document" report.

Two trainings of one adapter name run once for the module: the first memorises the 42 document
(and is promoted by the default policy), the second barely trains (and is not)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.request
import uuid

import boto3
import nats
import pytest
from typer.testing import CliRunner

from tests.helpers.events import EventLog
from tests.helpers.evaluation import FACTS
from tests.helpers.bus import connect
from tunebus.shared.cli import app
from tunebus.shared.devstack.stack import service_env

NAME = f"memo-{uuid.uuid4().hex[:6]}"
# Every fact is trained on, in every step: one batch holds all six (the validator drops duplicate
# rows, a split taken from the file would hold one out, and the library's batching leaves out
# the rows that do not fill a whole batch). The held-out file asks for the facts in other words.
ROWS = [{"instruction": q, "input": "", "output": a} for q, a, _ in FACTS]
HELD_OUT = [{"instruction": f"Tell me: {q[0].lower()}{q[1:]}", "input": "", "output": a} for q, a, _ in FACTS]
PROBES = [{"prompt": q, "expected": key} for q, _, key in FACTS]


def request(job_id: str, dataset: dict, model_uri: str, *, iters: int, learning_rate: float) -> bytes:
    """A TrainingRequested event for NAME, batches of the whole training set."""
    return json.dumps({
        "specversion": "1.0", "id": str(uuid.uuid4()), "source": "tests/registry-api",
        "type": "tunebus.training.requested.v1", "subject": job_id, "time": "2026-11-21T12:00:00Z",
        "datacontenttype": "application/json",
        "data": {
            "job_id": job_id, "adapter_name": NAME, "base_model": model_uri,
            "dataset": dataset,
            # Adam at a constant rate, unclipped: what these memorisation runs were tuned with.
            "hyperparameters": {"iters": iters, "batch_size": len(ROWS), "learning_rate": learning_rate,
                                "max_seq_length": 128, "optimizer": "adam", "lr_scheduler": "constant",
                                "max_grad_norm": 0},
            "evaluation": {"probes": PROBES},
            "metadata": {"tags": ["memo", "test"], "team": "registry"},
        },
    }).encode()


@pytest.fixture(scope="module")
def registered(stack, store, tiny_model_uri):
    """Train NAME twice; returns the two AdapterRegistered entries and the completed trainings."""
    return asyncio.run(train_twice(stack, store, tiny_model_uri))


async def train_twice(stack, store, tiny_model_uri):
    s3 = stack.settings.s3
    dataset = {}
    for field, rows in (("uri", ROWS), ("valid_uri", HELD_OUT)):
        dataset[field] = f"s3://{s3.datasets_bucket}/uploads/{NAME}/{field}.jsonl"
        store.put_bytes(dataset[field], "".join(json.dumps(r) + "\n" for r in rows).encode())
    nc = await connect(stack.settings)
    events = await EventLog().start(nc)
    try:
        jobs = [f"{NAME}-learns", f"{NAME}-barely"]
        js = nc.jetstream()
        await js.publish("tunebus.v1.training.requested",
                         request(jobs[0], dataset, tiny_model_uri, iters=60, learning_rate=1e-2))
        await js.publish("tunebus.v1.training.requested",
                         request(jobs[1], dataset, tiny_model_uri, iters=1, learning_rate=1e-7))
        entries = [(await events.wait_for(job, ".adapter.registered", timeout=300))["data"]["entry"]
                   for job in jobs]
        trainings = [events.of_job(job, ".training.completed")[0]["data"] for job in jobs]
        return entries, trainings
    finally:
        await nc.close()


def ask(stack, subject: str, body: dict) -> dict:
    """One request/reply round trip, as any NATS client would make it."""
    async def round_trip():
        nc = await connect(stack.settings)
        try:
            return json.loads((await nc.request(subject, json.dumps(body).encode(), timeout=10)).data)
        finally:
            await nc.close()

    return asyncio.run(round_trip())


@pytest.fixture
def cli(stack, monkeypatch):
    for key, value in service_env(stack.settings).items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args), catch_exceptions=False)


def test_two_trainings_of_one_name_are_versions_1_and_2_with_their_lineage(stack, registered):
    (first, second), (trained, _) = registered
    assert (first["ref"], second["ref"]) == (f"{NAME}:1", f"{NAME}:2")
    listed = (ask(stack, "tunebus.v1.registry.list", {"name": NAME}))["adapters"]
    assert [(e["version"], e["job_id"]) for e in listed] == [(1, f"{NAME}-learns"), (2, f"{NAME}-barely")]

    entry = listed[0]
    assert entry["dataset_sha256"] == trained["dataset"]["sha256"]
    assert entry["dataset_manifest_uri"] == trained["dataset"]["manifest_uri"]
    assert entry["base_model"] == trained["request"]["base_model"]
    assert entry["hyperparameters"]["iters"] == 60 and entry["method"] == "sft"
    assert entry["backend"] == trained["backend"] and entry["training"] == trained["metrics"]
    assert entry["tags"] == ["memo", "test"] and entry["metadata"]["team"] == "registry"
    assert entry["trained_at"] and entry["verified_at"] and entry["format"] == "mlx"
    tagged = (ask(stack, "tunebus.v1.registry.list", {"tag": "memo"}))["adapters"]
    assert {e["ref"] for e in tagged} == {f"{NAME}:1", f"{NAME}:2"}


def test_the_evaluation_shows_the_adapter_learned_the_42_document(stack, store, registered):
    (first, second), _ = registered
    evaluation = first["evaluation"]
    contains = next(m for m in evaluation["metrics"] if m["name"] == "probe_contains")
    assert (contains["before"], contains["after"]) == (0.0, 1.0)
    assert evaluation["improved"] and not evaluation["regressed"]
    report = json.loads(store.open(evaluation["report_uri"]).read())
    for probe in (p for p in report["probes"] if p["source"] == "request"):
        assert probe["adapter"]["contains"] == 1.0 and probe["base"]["contains"] == 0.0
    page = store.open(evaluation["report_html_uri"]).read().decode()
    assert "<svg" in page and "Ada Quill" in page
    # The barely trained version learned nothing it can be caught on.
    barely = next(m for m in second["evaluation"]["metrics"] if m["name"] == "probe_contains")
    assert barely["after"] == 0.0


def test_production_moves_only_when_the_policy_allows_or_by_hand(stack, registered, cli):
    (first, second), _ = registered
    assert first["promotion"]["promoted"] and first["aliases"] == ["latest", "production"]
    assert not second["promotion"]["promoted"] and "less than the required" in second["promotion"]["reason"]
    resolve = lambda ref: ask(stack, "tunebus.v1.registry.resolve", {"ref": ref})  # noqa: E731
    assert (resolve(f"{NAME}@production"))["entry"]["version"] == 1
    assert (resolve(f"{NAME}@latest"))["entry"]["version"] == 2

    promoted = cli("adapters", "promote", f"{NAME}:2", "--reason", "looked fine")
    assert promoted.exit_code == 0 and f"from {NAME}:1 to {NAME}:2" in promoted.output
    assert (resolve(f"{NAME}@production"))["entry"]["version"] == 2

    rolled = cli("adapters", "rollback", NAME)
    assert rolled.exit_code == 0 and f"from {NAME}:2 to {NAME}:1" in rolled.output
    assert (resolve(f"{NAME}@production"))["entry"]["aliases"] == ["production"]
    again = cli("adapters", "rollback", NAME)
    assert again.exit_code == 1 and "nothing earlier to roll back to" in again.output


def test_presigned_urls_and_boto3_downloads_match_the_recorded_sha256(stack, registered):
    (first, _), _ = registered
    urls = ask(stack, "tunebus.v1.registry.download-url", {"ref": f"{NAME}@production"})
    assert urls["ref"] == f"{NAME}:1" and urls["format"] == "mlx"
    recorded = {a["name"]: a["sha256"] for a in first["artifacts"]}
    assert {"adapters.safetensors", "adapter_config.json", "evaluation.json", "evaluation.html"} <= set(recorded)
    s3 = stack.settings.s3
    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name=s3.region,
                          aws_access_key_id=s3.access_key.get_secret_value(),
                          aws_secret_access_key=s3.secret_key.get_secret_value())
    for name, sha in recorded.items():
        # A presigned URL is a plain HTTP GET, as curl does it: no credentials, no signing.
        plain = urllib.request.urlopen(urls["urls"][name]).read()
        bucket, key = urls["uris"][name].removeprefix("s3://").split("/", 1)
        with_boto3 = client.get_object(Bucket=bucket, Key=key)
        assert hashlib.sha256(plain).hexdigest() == sha == urls["sha256"][name]
        assert hashlib.sha256(with_boto3["Body"].read()).hexdigest() == sha
        assert with_boto3["Metadata"]["sha256"] == sha  # x-amz-meta-sha256, as documented


def test_the_cli_downloads_an_alias_and_checks_every_sha256(registered, cli, tmp_path):
    (first, _), _ = registered
    result = cli("adapters", "download", f"{NAME}@production", "--all", "--to", str(tmp_path))
    assert result.exit_code == 0, result.output
    target = tmp_path / f"{NAME}-v1"
    for artifact in first["artifacts"]:
        assert hashlib.sha256((target / artifact["name"]).read_bytes()).hexdigest() == artifact["sha256"]
    assert (target / "peft" / "adapter_model.safetensors").is_file()  # the S3 prefix's folders, as stored

    default = cli("adapters", "download", f"{NAME}@production", "--to", str(tmp_path / "trained-as"))
    assert default.exit_code == 0 and "mlx layout" in default.output, default.output
    flat = tmp_path / "trained-as" / f"{NAME}-v1"
    assert sorted(p.name for p in flat.iterdir()) == sorted(
        a["name"] for a in first["artifacts"] if "/" not in a["name"])
    bad = cli("adapters", "download", f"{NAME}:1", "--format", "onnx", "--to", str(tmp_path))
    assert bad.exit_code == 2 and "--format must be mlx, peft, full, gguf or gguf-merged" in bad.output


def test_the_list_comes_in_pages_and_the_cli_follows_them(stack, registered, cli):
    first = ask(stack, "tunebus.v1.registry.list", {"name": NAME, "limit": 1})
    assert [e["version"] for e in first["adapters"]] == [1] and first["next_cursor"] == f"{NAME}:1"
    second = ask(stack, "tunebus.v1.registry.list", {"name": NAME, "limit": 1, "cursor": first["next_cursor"]})
    assert [e["version"] for e in second["adapters"]] == [2] and second["next_cursor"] is None
    bad = ask(stack, "tunebus.v1.registry.list", {"cursor": "nonsense"})
    assert "bad cursor" in bad["error"] and bad["adapters"] == []
    listed = json.loads(cli("adapters", "list", "--name", NAME, "--page-size", "1", "--json").output)
    assert [e["version"] for e in listed["adapters"]] == [1, 2]


def test_soft_delete_hides_a_version_and_keeps_the_others(stack, registered, cli):
    deleted = cli("adapters", "delete", f"{NAME}:2", "--reason", "superseded")
    assert deleted.exit_code == 0 and "deleted" in deleted.output
    listed = (ask(stack, "tunebus.v1.registry.list", {"name": NAME}))["adapters"]
    assert [e["version"] for e in listed] == [1]
    everything = (ask(stack, "tunebus.v1.registry.list", {"name": NAME, "include_deleted": True}))
    assert [(e["version"], e["deleted"]) for e in everything["adapters"]] == [(1, False), (2, True)]
    assert (ask(stack, "tunebus.v1.registry.get", {"ref": f"{NAME}@latest"}))["entry"]["version"] == 1
    gone = ask(stack, "tunebus.v1.registry.download-url", {"ref": f"{NAME}:2"})
    assert gone["error"] == f"{NAME}:2 is deleted"
    refused = cli("adapters", "delete", f"{NAME}:1")
    assert refused.exit_code == 1 and "is the production version" in refused.output
    whole = cli("adapters", "delete", NAME)
    assert whole.exit_code == 1 and "delete needs name:version" in whole.output


# -- both adapter layouts, for anyone with an S3 client

RUN_FILES = {"training_args.json", "metrics.json", "loss_curve.json", "loss_curve.png",
             "evaluation.json", "evaluation.html"}


def s3_client(stack):
    s3 = stack.settings.s3
    return boto3.client("s3", endpoint_url=s3.endpoint, region_name=s3.region,
                        aws_access_key_id=s3.access_key.get_secret_value(),
                        aws_secret_access_key=s3.secret_key.get_secret_value())


def copy_prefix(client, uri: str, directory, *, recursive: bool):
    """What `aws s3 cp [--recursive] s3://bucket/prefix/ directory` does: no tunebus code."""
    bucket, prefix = uri.removeprefix("s3://").rstrip("/").split("/", 1)
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/",
                                     **({} if recursive else {"Delimiter": "/"}))
    for obj in listing["Contents"]:
        path = directory / obj["Key"].removeprefix(prefix + "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, obj["Key"], str(path))
    return directory


@pytest.fixture(scope="module")
def mlx_only(stack, registered):
    """A version stored in the mlx-lm layout only, as one registered before the trainer stored a
    PEFT copy (or one PEFT cannot express): the second training's root files, registered by the
    registry's own code into the bucket the running registry reads."""
    from tunebus.contracts import TrainingCompleted
    from tunebus.services.adapter_registry.registry import BUCKET, Registry

    _, (_, trained) = registered
    done = TrainingCompleted.model_validate(trained)
    done.job_id = done.request.job_id = f"{NAME}-mlx-only"
    done.request.adapter_name = f"{NAME}-old"
    done.artifacts = [a for a in done.artifacts if "/" not in a.name]

    async def register():
        nc = await connect(stack.settings)
        try:
            registry = await Registry.open(nc.jetstream(), BUCKET)
            await registry.record_training(done)
            return (await registry.register(done.job_id, None)).model_dump(mode="json")
        finally:
            await nc.close()

    return asyncio.run(register())


def test_an_mlx_trained_adapter_is_stored_in_both_layouts(stack, registered):
    (first, _), _ = registered
    assert first["backend"] == "mlx" and first["format"] == "mlx"
    # and the registry's GGUF copy (the base model's config is in the models bucket)
    assert first["formats"] == {"mlx": "", "peft": "peft/", "gguf": "gguf/"}
    bucket, prefix = first["adapter_uri"].removeprefix("s3://").split("/", 1)
    keys = {o["Key"].removeprefix(prefix + "/")
            for o in s3_client(stack).list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["Contents"]}
    assert {"adapters.safetensors", "adapter_config.json",
            "peft/adapter_model.safetensors", "peft/adapter_config.json"} <= keys
    assert {"peft/adapter_model.safetensors", "peft/adapter_config.json"} <= {
        a["name"] for a in first["artifacts"]}  # registered, so verified against S3


def test_the_peft_copy_loads_with_plain_peft_and_computes_what_the_mlx_layout_does(
        stack, registered, tiny_model_uri, tmp_path):
    import mlx.core as mx
    import numpy as np
    import torch
    from mlx_lm import load as mlx_load
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (first, _), _ = registered
    client = s3_client(stack)
    base = copy_prefix(client, tiny_model_uri, tmp_path / "base", recursive=True)  # given by hand
    peft_dir = copy_prefix(client, f"{first['adapter_uri']}/peft", tmp_path / "peft", recursive=True)
    mlx_dir = copy_prefix(client, first["adapter_uri"], tmp_path / "mlx", recursive=False)
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_model_uri  # as requested, not a worker's cache

    ids = AutoTokenizer.from_pretrained(base).encode(FACTS[0][0])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
    with torch.no_grad():
        before = model(torch.tensor([ids])).logits.numpy()
        adapted = PeftModel.from_pretrained(model, peft_dir).eval()
        after = adapted(torch.tensor([ids])).logits.numpy()
    mlx_model, _ = mlx_load(str(base), adapter_path=str(mlx_dir))
    mlx_after = np.array(mlx_model(mx.array([ids])).astype(mx.float32))
    assert np.abs(after - before).max() > 1e-2  # the adapter is applied, not silently skipped
    np.testing.assert_allclose(after, mlx_after, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout, weights", [("peft", "adapter_model.safetensors"),
                                             ("mlx", "adapters.safetensors")])
def test_download_urls_for_one_layout_name_its_files_flat(stack, registered, layout, weights):
    (first, _), _ = registered
    urls = ask(stack, "tunebus.v1.registry.download-url", {"ref": f"{NAME}:1", "format": layout})
    assert urls["error"] is None and urls["format"] == layout
    assert urls["formats"] == {"mlx": "", "peft": "peft/", "gguf": "gguf/"}
    assert set(urls["urls"]) == {weights, "adapter_config.json"} | RUN_FILES
    folder = first["formats"][layout]
    recorded = {a["name"]: a for a in first["artifacts"]}
    for name, url in urls["urls"].items():
        stored = recorded[folder + name] if name in ("adapter_config.json", weights) else recorded[name]
        assert urls["uris"][name] == stored["uri"] and urls["sizes"][name] == stored["size"]
        assert hashlib.sha256(urllib.request.urlopen(url).read()).hexdigest() == stored["sha256"]


def test_a_layout_that_is_not_stored_or_not_known_is_a_clear_error(stack, mlx_only):
    missing = ask(stack, "tunebus.v1.registry.download-url", {"ref": mlx_only["ref"], "format": "peft"})
    assert missing["error"] == f"{mlx_only['ref']} is not stored in the peft layout; it has: mlx"
    assert missing["formats"] == {"mlx": ""} and not missing["urls"]
    unknown = ask(stack, "tunebus.v1.registry.download-url", {"ref": f"{NAME}:1", "format": "onnx"})
    assert unknown["error"] == ("invalid request on tunebus.v1.registry.download-url: format: "
                                "Input should be 'mlx', 'peft', 'gguf' or 'full' (got 'onnx')")


def test_an_older_version_without_a_peft_copy_is_converted_by_the_cli(stack, mlx_only, cli, tmp_path):
    result = cli("adapters", "download", mlx_only["ref"], "--format", "peft", "--to", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "converted from mlx to peft" in " ".join(result.output.split())
    target = tmp_path / mlx_only["ref"].replace(":", "-v")
    config = json.loads((target / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == mlx_only["base_model"]
    assert sorted(p.name for p in target.iterdir()) == sorted(
        {"adapter_model.safetensors", "adapter_config.json", "training_args.json", "metrics.json",
         "loss_curve.json", "loss_curve.png"})
