"""Trust on the bus, tried as an attacker on the same network would: with no credentials, with a
submitter's, with a service's used for the wrong thing. Real nats-server with the generated
permissions, real S3 endpoint; every assertion is on what the server or a service answered."""

from __future__ import annotations

import asyncio
import json
import uuid

import nats
import pytest
from typer.testing import CliRunner

from tests.helpers.events import EventLog, wait_until
from tests.helpers.bus import connect
from tunebus.contracts import (
    AdapterList,
    AdapterReply,
    Artifact,
    DatasetSummary,
    TrainingCompleted,
    TrainingCompletedEvent,
    TrainingMetrics,
    ListAdapters,
    TrainingRequested,
    subjects,
)
from tunebus.contracts.registry import AliasReply, GetAdapter, PromoteAdapter
from tunebus.shared.cli import client
from tunebus.shared.cli import app
from tunebus.shared.devstack.stack import service_env
from tunebus.shared.settings import NatsAuth

pytestmark = pytest.mark.anyio


class Connection:
    """A connection as one role that records what the server refused it."""

    def __init__(self, nc: nats.NATS, refusals: list[str]) -> None:
        self.nc, self.refusals = nc, refusals

    @classmethod
    async def open(cls, settings) -> Connection:
        refusals: list[str] = []

        async def on_error(error: Exception) -> None:
            refusals.append(str(error).lower())

        return cls(await connect(settings, error_cb=on_error, max_reconnect_attempts=0), refusals)

    async def refused(self, subject: str, what: str) -> bool:
        """Whether the server said this connection may not `what` (publish/subscription) to subject."""
        await self.nc.flush()
        needle = f'permissions violation for {what} to "{subject.lower()}"'
        for _ in range(20):
            if any(needle in refusal for refusal in self.refusals):
                return True
            await asyncio.sleep(0.05)
        return False


# role: (allowed publish, forbidden publish, allowed subscribe, forbidden subscribe,
#        allowed KV write, forbidden KV write)
KV_JOBS, KV_REGISTRY = f"$KV.{subjects.JOBS_BUCKET}", f"$KV.{subjects.REGISTRY_BUCKET}"
EXPECTED = {
    "dataset-validator": (subjects.DATASET_VALIDATED, subjects.TRAINING_COMPLETED,
                          subjects.VALIDATOR_VALIDATE, subjects.REGISTRY_PROMOTE,
                          f"{KV_JOBS}.validate.security-probe", f"{KV_JOBS}.train.security-probe"),
    "trainer": (subjects.TRAINING_COMPLETED, subjects.ADAPTER_REGISTERED,
                subjects.TRAINER_CANCEL, subjects.REGISTRY_LIST,
                f"{KV_JOBS}.train.security-probe", f"{KV_REGISTRY}.adapter.x.1"),
    "evaluator": (subjects.EVALUATION_COMPLETED, subjects.TRAINING_COMPLETED,
                  subjects.status("evaluator"), subjects.status("trainer"),
                  f"{KV_JOBS}.evaluate.security-probe", f"{KV_JOBS}.validate.security-probe"),
    "adapter-registry": (subjects.ADAPTER_REGISTERED, subjects.EVALUATION_COMPLETED,
                         subjects.REGISTRY_PROMOTE, subjects.TRAINER_CANCEL,
                         f"{KV_REGISTRY}.security-probe", f"{KV_JOBS}.train.security-probe"),
    "observer": (subjects.REGISTRY_GET, subjects.TRAINING_REQUESTED,
                 subjects.ADAPTER_REGISTERED, subjects.REGISTRY_LIST,
                 None, f"{KV_JOBS}.train.security-probe"),
    "submitter": (subjects.TRAINING_REQUESTED, subjects.REGISTRY_PROMOTE,
                  subjects.TRAINING_PROGRESS, "_INBOX.operator.>",
                  None, f"{KV_REGISTRY}.alias.x.production"),
    "operator": (subjects.REGISTRY_DELETE, subjects.TRAINING_COMPLETED,
                 subjects.dead_letter("trainer"), subjects.REGISTRY_DELETE,
                 None, f"{KV_REGISTRY}.alias.x.production"),
}


async def test_an_anonymous_connection_is_refused(stack):
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(stack.settings.nats_url, allow_reconnect=False, connect_timeout=3)


async def test_a_wrong_password_is_refused(stack):
    settings = stack.as_role("submitter")
    wrong = settings.model_copy(update={"nats": NatsAuth(user="submitter", password="guess")})
    with pytest.raises(client.PermissionDenied, match="refused this identity \\(submitter\\)"):
        async with client.connect(wrong):
            pass


@pytest.mark.parametrize("role", sorted(EXPECTED))
async def test_each_role_may_do_exactly_its_list(stack, role):
    pub_ok, pub_no, sub_ok, sub_no, kv_ok, kv_no = EXPECTED[role]
    conn = await Connection.open(stack.as_role(role))
    try:
        # What an allowed publish sends is harmless: a probe body the consumers dead-letter.
        await conn.nc.publish(pub_no, b"{}")
        assert await conn.refused(pub_no, "publish"), f"{role} may publish to {pub_no}"
        await conn.nc.subscribe(sub_no)
        assert await conn.refused(sub_no, "subscription"), f"{role} may subscribe to {sub_no}"
        await conn.nc.publish(kv_no, b"{}")
        assert await conn.refused(kv_no, "publish"), f"{role} may write {kv_no}"

        await conn.nc.subscribe(sub_ok)
        assert not await conn.refused(sub_ok, "subscription"), f"{role} may not subscribe to {sub_ok}"
        # An allowed publish: to a request subject it gets the service's answer (to this junk,
        # an error), never a refusal; to an event subject, the stream's ack.
        if pub_ok.startswith(("tunebus.v1.registry", "tunebus.v1.validator", "tunebus.v1.trainer")):
            reply = await conn.nc.request(pub_ok, b"not json", timeout=10)
            assert b"error" in reply.data
        else:
            ack = await conn.nc.jetstream().publish(pub_ok, b"{\"probe\": true}", timeout=5)
            assert ack.stream == subjects.EVENTS_STREAM
        assert not await conn.refused(pub_ok, "publish"), f"{role} may not publish to {pub_ok}"
        if kv_ok:
            ack = await conn.nc.jetstream().publish(kv_ok, b"{}", timeout=5)
            assert ack.stream.startswith("KV_")
    finally:
        await conn.nc.close()


def forged_completion(job_id: str, adapter_uri: str, artifact_uri: str) -> TrainingCompletedEvent:
    """A TrainingCompleted whose 'adapter' is a file the forger wrote."""
    request = TrainingRequested.model_validate({
        "job_id": job_id, "adapter_name": "victim", "base_model": "s3://tunebus-models/tiny-llama",
        "dataset": {"uri": "s3://tunebus-datasets/uploads/x.jsonl"}})
    dataset = DatasetSummary(format="alpaca", rows=1, train_rows=1, valid_rows=0, sha256="0" * 64,
                             train_uri="s3://tunebus-datasets/jobs/x/train.jsonl", train_sha256="0" * 64,
                             valid_uri="s3://tunebus-datasets/jobs/x/valid.jsonl", valid_sha256="0" * 64,
                             manifest_uri="s3://tunebus-datasets/jobs/x/manifest.json")
    artifact = Artifact(name="adapters.safetensors", uri=artifact_uri, sha256="a" * 64, size=1)
    return TrainingCompletedEvent.wrap(TrainingCompleted(
        job_id=job_id, request=request, dataset=dataset, backend="mlx", adapter_uri=adapter_uri,
        artifacts=[artifact], metrics=TrainingMetrics(first_loss=2.0, final_loss=0.1, steps=1, trained_tokens=1,
                                                          seconds=1.0, tokens_per_second=1.0),
        resolved_args={}), source="tunebus/trainer")


async def registry_has(nc: nats.NATS, job_id: str) -> bool:
    query = ListAdapters(name="victim", include_deleted=True)
    reply = await client.ask(nc, subjects.REGISTRY_LIST, query, AdapterList)
    return any(entry.job_id == job_id for entry in reply.adapters)


async def test_a_submitter_cannot_forge_a_completed_training_into_the_registry(stack, store):
    job_id = f"forged-{uuid.uuid4().hex[:8]}"
    uploaded = f"s3://{stack.settings.s3.datasets_bucket}/uploads/{job_id}/adapters.safetensors"
    store.put_bytes(uploaded, b"attacker's bytes")
    event = forged_completion(job_id, f"s3://{stack.settings.s3.datasets_bucket}/uploads/{job_id}", uploaded)
    conn = await Connection.open(stack.as_role("submitter"))
    try:
        for subject in (subjects.TRAINING_COMPLETED, subjects.EVALUATION_COMPLETED):
            with pytest.raises(nats.errors.TimeoutError):
                await conn.nc.jetstream().publish(subject, event.model_dump_json().encode(), timeout=1)
            assert await conn.refused(subject, "publish")
        assert not await registry_has(conn.nc, job_id)
        # Nothing of the forger's reached the stream.
        assert await client.replay(conn.nc, job_id) == []
    finally:
        await conn.nc.close()


async def test_a_completion_outside_the_adapter_layout_is_dead_lettered_not_registered(stack, store):
    """Even the trainer's own identity cannot register files that lie outside
    s3://<adapters bucket>/<adapter_name>/<job_id>/."""
    job_id = f"misplaced-{uuid.uuid4().hex[:8]}"
    elsewhere = f"s3://{stack.settings.s3.datasets_bucket}/uploads/{job_id}"
    store.put_bytes(f"{elsewhere}/adapters.safetensors", b"not an adapter")
    event = forged_completion(job_id, elsewhere, f"{elsewhere}/adapters.safetensors")
    nc = await connect(stack.as_role("trainer"))
    observer = await connect(stack.as_role("observer"))
    events = await EventLog().start(observer)
    try:
        await nc.jetstream().publish(subjects.TRAINING_COMPLETED, event.model_dump_json().encode(),
                                     headers={"Nats-Msg-Id": event.id})
        letter = await events.wait_for(job_id, ".deadletter.adapter-registry", timeout=30)
        assert "not this adapter's place in the registry" in letter["data"]["reason"]
        assert f"s3://{stack.settings.s3.adapters_bucket}/victim/{job_id}/" in letter["data"]["reason"]
        assert not await registry_has(observer, job_id)
    finally:
        await nc.close()
        await observer.close()


async def test_promote_rollback_and_delete_are_for_operators_only(stack):
    submitter = stack.as_role("submitter")
    async with client.connect(submitter) as nc:
        for subject in (subjects.REGISTRY_PROMOTE, subjects.REGISTRY_ROLLBACK, subjects.REGISTRY_DELETE):
            with pytest.raises(client.PermissionDenied, match=f"submitter may not publish to {subject}"):
                await client.ask(nc, subject, PromoteAdapter(ref="victim:1"), AdapterList, timeout=1)
        # Reads stay open to a submitter.
        reply = await client.ask(nc, subjects.REGISTRY_GET, GetAdapter(ref="victim:99"), AdapterReply)
        assert reply.error
    async with client.connect(stack.as_role("operator")) as nc:
        # The operator reaches the registry, which answers (here: there is no such version).
        reply = await client.ask(nc, subjects.REGISTRY_PROMOTE, PromoteAdapter(ref="victim:99"), AliasReply)
        assert reply.error and "victim" in reply.error


def test_the_cli_says_plainly_what_an_identity_may_not_do(stack, monkeypatch):
    for key, value in service_env(stack.as_role("submitter")).items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["adapters", "promote", "victim:1"])
    assert result.exit_code != 0
    assert isinstance(result.exception, client.PermissionDenied)
    assert "submitter may not publish to tunebus.v1.registry.promote" in str(result.exception)


def test_the_cli_entry_point_prints_the_refusal_without_a_traceback(stack):
    import os
    import subprocess
    import sys

    env = {**os.environ, **service_env(stack.as_role("observer"))}
    done = subprocess.run([sys.executable, "-c", "from tunebus.shared.cli import main; main()",
                           "adapters", "delete", "victim:1"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 3
    assert "observer may not publish to tunebus.v1.registry.delete" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def request_body(job_id: str, dataset_uri: str, model_uri: str) -> bytes:
    return json.dumps({
        "specversion": "1.0", "id": str(uuid.uuid4()), "source": "tests/security",
        "type": "tunebus.training.requested.v1", "subject": job_id,
        "data": {"job_id": job_id, "adapter_name": "outsider", "base_model": model_uri,
                 "dataset": {"uri": dataset_uri}, "hyperparameters": {"iters": 2, "batch_size": 2}},
    }).encode()


ROWS = [{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(12)]


def put_rows(store, uri: str) -> str:
    store.put_bytes(uri, "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    return uri


async def test_a_dataset_in_a_foreign_bucket_is_rejected_naming_the_rule(stack, store, tiny_model_uri):
    job_id = f"foreign-data-{uuid.uuid4().hex[:8]}"
    private = put_rows(store, f"s3://{stack.settings.s3.models_bucket}/private/{job_id}.jsonl")
    nc = await connect(stack.as_role("submitter"))
    events = await EventLog().start(nc)
    try:
        await nc.jetstream().publish(subjects.TRAINING_REQUESTED, request_body(job_id, private, tiny_model_uri))
        rejected = await events.wait_for(job_id, ".dataset.rejected", timeout=60)
        assert "datasets are read only from s3://tunebus-datasets/" in rejected["data"]["reason"]
        # The same rule for the synchronous check, previews included: nothing is read.
        reply = await nc.request(subjects.VALIDATOR_VALIDATE, json.dumps(
            {"uri": private, "method": "sft", "preview_rows": 3}).encode(), timeout=30)
        report = json.loads(reply.data)
        assert not report["valid"] and not report.get("preview")
        assert "datasets are read only from" in json.dumps(report)
    finally:
        await nc.close()
    assert not store.exists(f"s3://{stack.settings.s3.datasets_bucket}/jobs/{job_id}/train.jsonl")


async def test_a_base_model_in_a_foreign_bucket_fails_the_training_naming_the_rule(stack, store, tiny_model_uri):
    job_id = f"foreign-model-{uuid.uuid4().hex[:8]}"
    data = put_rows(store, f"s3://{stack.settings.s3.datasets_bucket}/uploads/{job_id}/rows.jsonl")
    # A copy of the model where models do not belong.
    foreign = f"s3://{stack.settings.s3.datasets_bucket}/uploads/{job_id}/model"
    nc = await connect(stack.as_role("submitter"))
    events = await EventLog().start(nc)
    try:
        await nc.jetstream().publish(subjects.TRAINING_REQUESTED, request_body(job_id, data, foreign))
        failed = await events.wait_for(job_id, ".training.failed", timeout=120)
        assert failed["data"]["error_type"] == "model_refused"
        assert "base models come only from s3://tunebus-models/" in failed["data"]["reason"]
        assert not events.of_job(job_id, ".training.started")
    finally:
        await nc.close()


async def test_a_model_prefix_with_pickles_downloads_only_what_a_model_needs(bare_servers, tiny_model, tmp_path):
    from tunebus.shared.models import resolve_model
    from tunebus.shared.objectstore import ObjectStore

    store = ObjectStore(bare_servers.s3)
    uri = f"s3://{bare_servers.s3.models_bucket}/pickled-{uuid.uuid4().hex[:6]}"
    store.put_dir(uri, tiny_model)
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "extra/model.pkl"):
        store.put_bytes(f"{uri}/{name}", b"\x80\x04 a pickle")
    model_dir = resolve_model(uri, store, tmp_path / "cache")
    fetched = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert fetched == {p.relative_to(tiny_model).as_posix() for p in tiny_model.rglob("*") if p.is_file()}
    assert not {name for name in fetched if name.endswith((".bin", ".pt", ".pkl"))}


@pytest.mark.parametrize("ref, rule", [
    ("s3://tunebus-adapters/someone/else", "is in bucket tunebus-adapters"),
    ("/etc", "is a local path and this worker has no models root"),
    ("../../models/x", "is a local path"),
    ("not a hub id!", "is not a hub id"),
])
def test_base_model_references_outside_the_rules_are_refused(bare_servers, tmp_path, ref, rule):
    from tunebus.shared.models import ModelRefused, resolve_model
    from tunebus.shared.objectstore import ObjectStore

    with pytest.raises(ModelRefused, match=rule):
        resolve_model(ref, ObjectStore(bare_servers.s3), tmp_path)


def test_a_local_base_model_is_accepted_under_the_models_root_only(bare_servers, tiny_model, tmp_path):
    from tunebus.shared.models import ModelRefused, resolve_model
    from tunebus.shared.objectstore import ObjectStore

    store = ObjectStore(bare_servers.s3)
    assert resolve_model(str(tiny_model), store, tmp_path, models_root=tiny_model.parent) == tiny_model
    with pytest.raises(ModelRefused, match="outside the models root"):
        resolve_model(str(tiny_model), store, tmp_path, models_root=tmp_path)


async def test_credentials_never_reach_the_logs(stack):
    """The stack has run jobs by now; no password or secret key is in any log it wrote."""
    secrets = [p for p in stack.identities.nats_passwords.values()]
    secrets += [secret for _, secret in stack.identities.s3_keys.values()]
    logs = {path.name: path.read_text(errors="replace") for path in (stack.data_dir / "logs").glob("*.log")}
    await wait_until(lambda: logs, 1, "logs")
    for name, text in logs.items():
        for secret in secrets:
            assert secret not in text, f"a credential is in {name}"


async def test_a_client_cannot_forge_events_through_a_consumer_that_delivers_onto_them(stack):
    """Clients may create ephemeral consumers, and a push consumer names its own delivery
    subject. JetStream refuses one that delivers the events stream back into itself, and what a
    consumer of another stream delivers onto an event subject is a delivery, never stored as an
    event: no service sees it."""
    from nats.js.api import ConsumerConfig
    from nats.js.errors import BadRequestError

    nc = await connect(stack.as_role("submitter"))
    admin = await connect(stack.settings)
    try:
        js = nc.jetstream()
        before = (await admin.jetstream().stream_info(
            subjects.EVENTS_STREAM, subjects_filter=subjects.TRAINING_COMPLETED)).state.subjects or {}
        with pytest.raises(BadRequestError, match="forms a cycle"):
            await js.add_consumer(subjects.EVENTS_STREAM, ConsumerConfig(
                deliver_subject=subjects.TRAINING_COMPLETED, filter_subject=subjects.TRAINING_REQUESTED))
        await admin.jetstream().publish(subjects.dead_letter("trainer"), b'{"probe": "delivery"}')
        await js.add_consumer(subjects.DEAD_LETTER_STREAM, ConsumerConfig(
            deliver_subject=subjects.TRAINING_COMPLETED, filter_subject=subjects.dead_letter("trainer")))
        await asyncio.sleep(1)
        after = (await admin.jetstream().stream_info(
            subjects.EVENTS_STREAM, subjects_filter=subjects.TRAINING_COMPLETED)).state.subjects or {}
        assert after == before
    finally:
        await nc.close()
        await admin.close()
