"""A full fine-tune (adapter.type full) over the real stack: trained by the worker, evaluated as
a model against its base, registered in the full layout, and downloaded over presigned links and
with `tunebus adapters download` as a model directory that transformers loads (or one GGUF)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.request
import uuid

import pytest
from gguf import GGUFReader
from typer.testing import CliRunner

from tests.helpers.bus import connect
from tests.helpers.events import EventLog
from tests.helpers.pipeline import SAMPLE_ROWS, publish_request, training_request, upload_rows
from tunebus.shared.cli import app
from tunebus.shared.devstack.stack import service_env


def full_request(job_id: str, dataset_uri: str, model_uri: str) -> bytes:
    body = json.loads(training_request(job_id, dataset_uri, model_uri))
    body["data"] |= {"adapter_name": "e2e-full", "adapter": {"type": "full"},
                     "evaluation": {"max_examples": 4, "probes": []}}
    body["data"]["hyperparameters"] |= {"iters": 8, "learning_rate": 0.001}
    return json.dumps(body).encode()


@pytest.fixture(scope="module")
def full_job(stack, store, tiny_model_uri) -> dict:
    """The events of one full fine-tune request, from training.completed to adapter.registered."""
    s3 = stack.settings.s3
    job_id = f"full-{uuid.uuid4().hex[:8]}"
    dataset_uri = upload_rows(store, s3.datasets_bucket, f"uploads/{job_id}/adder.jsonl", SAMPLE_ROWS)

    async def run() -> dict:
        nc = await connect(stack.as_role("submitter"))
        events = await EventLog().start(nc)
        try:
            await publish_request(nc, full_request(job_id, dataset_uri, tiny_model_uri))
            return {
                "completed": (await events.wait_for(job_id, ".training.completed", timeout=300))["data"],
                "evaluation": (await events.wait_for(job_id, ".evaluation.completed", timeout=300))["data"],
                "entry": (await events.wait_for(job_id, ".adapter.registered"))["data"]["entry"],
            }
        finally:
            await nc.close()

    return asyncio.run(run())


def download_urls(stack, ref: str, layout: str | None) -> dict:
    async def run() -> dict:
        nc = await connect(stack.as_role("submitter"))
        try:
            reply = await nc.request("tunebus.v1.registry.download-url",
                                     json.dumps({"ref": ref, "format": layout}).encode(), timeout=10)
            return json.loads(reply.data)
        finally:
            await nc.close()

    return asyncio.run(run())


def cli_download(stack, monkeypatch, ref: str, to, *options: str):
    for key, value in service_env(stack.as_role("submitter")).items():
        monkeypatch.setenv(key, value)
    return CliRunner().invoke(app, ["adapters", "download", ref, "--to", str(to), *options],
                              catch_exceptions=False)


def test_a_full_fine_tune_is_trained_evaluated_and_registered_in_the_full_layout(full_job):
    completed, evaluation, entry = full_job["completed"], full_job["evaluation"], full_job["entry"]
    assert completed["metrics"]["final_loss"] < completed["metrics"]["first_loss"]
    assert completed["layouts"] == {"full": "full/"} and completed["format"] == "full"
    assert completed["resolved_args"]["fine_tune_type"] == "full"
    names = {a["name"] for a in completed["artifacts"]}
    assert {"full/config.json", "training_args.json"} <= names
    assert not names & {"adapters.safetensors", "adapter_config.json"}
    # Measured as a model of its own, against the base.
    assert evaluation["after"]["loss"] < evaluation["before"]["loss"]
    assert entry["format"] == "full" and entry["formats"] == {"full": "full/"}  # no GGUF copy


def test_its_model_downloads_over_presigned_links_and_loads_with_transformers(
        stack, full_job, tmp_path):
    from transformers import AutoModelForCausalLM

    urls = download_urls(stack, full_job["entry"]["ref"], "full")
    assert urls["error"] is None and {"config.json", "training_args.json"} <= set(urls["urls"])
    for name, url in urls["urls"].items():
        body = urllib.request.urlopen(url).read()
        assert hashlib.sha256(body).hexdigest() == urls["sha256"][name]
        (tmp_path / name).write_bytes(body)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)
    assert model.config.num_hidden_layers == 2


def test_the_cli_downloads_it_as_a_model_directory_and_as_one_gguf(
        stack, full_job, tmp_path, monkeypatch):
    ref = full_job["entry"]["ref"]
    target = tmp_path / ref.replace(":", "-v")
    result = cli_download(stack, monkeypatch, ref, tmp_path)
    assert result.exit_code == 0, result.output
    assert "full layout" in result.output
    assert {"config.json", "tokenizer.json"} <= {p.name for p in target.iterdir()}
    assert list(target.glob("model*.safetensors"))

    result = cli_download(stack, monkeypatch, ref, tmp_path / "gguf", "--format", "gguf-merged")
    assert result.exit_code == 0, result.output
    reader = GGUFReader(tmp_path / "gguf" / ref.replace(":", "-v") / "model.gguf")
    assert reader.fields["general.type"].contents() == "model"


def test_an_adapter_layout_of_a_full_fine_tune_is_refused_saying_why(
        stack, full_job, tmp_path, monkeypatch):
    ref = full_job["entry"]["ref"]
    result = cli_download(stack, monkeypatch, ref, tmp_path, "--format", "mlx")
    assert result.exit_code == 1
    assert "is a full fine-tune" in result.output and "--format full" in result.output
    assert download_urls(stack, ref, "peft")["error"] == (
        f"{ref} is not stored in the peft layout; it has: full")
