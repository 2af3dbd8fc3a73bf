"""S3 least privilege, tested rather than only written: moto's S3 with its IAM emulation on, one
user per role holding the same policy compose gives MinIO (shared/identities.py ->
deploy/minio/), and each role tried at what its policy allows and forbids. Then a whole job runs
with every service on its own S3 user, which shows the policies are also enough.

moto checks signatures and each user's policy (actions, bucket and key patterns) but cannot check
presigned URLs in this mode, so the default stack runs without it."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from minio.error import S3Error

from tests.helpers.events import EventLog
from tests.helpers.bus import connect
from tunebus.contracts import subjects
from tunebus.shared.devstack.stack import LocalStack, start_servers
from tunebus.shared.objectstore import ObjectStore

D, M, A = "s3://tunebus-datasets", "s3://tunebus-models", "s3://tunebus-adapters"

# (role, operation, uri, allowed)
CASES = [
    ("dataset-validator", "get", f"{D}/uploads/x.jsonl", True),
    ("dataset-validator", "put", f"{D}/jobs/j/train.jsonl", True),
    ("dataset-validator", "put", f"{D}/uploads/overwrite.jsonl", False),
    ("dataset-validator", "get", f"{M}/tiny/tokenizer.json", True),
    ("dataset-validator", "get", f"{M}/tiny/model.safetensors", False),
    ("dataset-validator", "put", f"{A}/a/j/adapters.safetensors", False),
    ("trainer", "put", f"{A}/a/j/adapters.safetensors", True),
    ("trainer", "delete", f"{A}/a/j/checkpoints/step-1/state.json", True),
    ("trainer", "delete", f"{A}/a/j/adapters.safetensors", False),
    ("trainer", "put", f"{M}/tiny/model.safetensors", False),
    ("trainer", "put", f"{D}/uploads/x.jsonl", False),
    ("evaluator", "put", f"{A}/a/j/evaluation.json", True),
    ("evaluator", "get", f"{M}/tiny/model.safetensors", True),
    ("evaluator", "put", f"{D}/jobs/j/train.jsonl", False),
    ("adapter-registry", "get", f"{A}/a/j/adapters.safetensors", True),
    ("adapter-registry", "put", f"{A}/a/j/adapters.safetensors", False),
    ("adapter-registry", "get", f"{D}/uploads/x.jsonl", False),
    ("adapter-registry", "put", f"{A}/a/j/gguf/adapter.gguf", True),
    ("adapter-registry", "get", f"{M}/tiny/config.json", True),
    ("adapter-registry", "get", f"{M}/tiny/model.safetensors", False),
    ("submitter", "put", f"{D}/uploads/j/data.jsonl", True),
    ("submitter", "put", f"{D}/jobs/j/train.jsonl", False),
    ("submitter", "get", f"{D}/uploads/x.jsonl", False),
    ("submitter", "put", f"{M}/evil/model.safetensors", False),
    ("submitter", "put", f"{A}/a/j/adapters.safetensors", False),
    ("observer", "get", f"{A}/a/j/adapters.safetensors", True),
    ("observer", "put", f"{D}/uploads/j/data.jsonl", False),
    ("operator", "put", f"{M}/tiny/model.safetensors", True),
    ("operator", "delete", f"{A}/a/j/adapters.safetensors", False),
]


@pytest.fixture(scope="module")
def enforced(tmp_path_factory):
    processes, admin, identities = start_servers(tmp_path_factory.mktemp("iam"), enforce_s3_policies=True)
    store = ObjectStore(admin.s3)
    for uri in {uri for _, _, uri, _ in CASES}:
        store.put_bytes(uri, b"seed")
    yield admin, identities
    for process in reversed(processes):
        process.stop()


def attempt(store: ObjectStore, operation: str, uri: str) -> None:
    if operation == "get":
        store.open(uri).close()
    elif operation == "put":
        store.put_bytes(uri, b"written by a test")
    else:
        store.remove(uri)


@pytest.mark.parametrize("role, operation, uri, allowed", CASES,
                         ids=[f"{r}-{o}-{u.split('//')[1]}" for r, o, u, _ in CASES])
def test_each_s3_user_may_do_what_its_policy_says_and_nothing_else(enforced, role, operation, uri, allowed):
    admin, identities = enforced
    store = ObjectStore(identities.settings(role, admin).s3)
    if allowed:
        attempt(store, operation, uri)
    else:
        with pytest.raises(S3Error) as refused:
            attempt(store, operation, uri)
        assert refused.value.code == "AccessDenied"


def test_an_unknown_key_is_refused(enforced):
    admin, _ = enforced
    stranger = type(admin.s3).model_validate(admin.s3.model_dump() | {"access_key": "AKIASTRANGER", "secret_key": "nope"})
    with pytest.raises(S3Error) as refused:
        ObjectStore(stranger).open(f"{A}/a/j/adapters.safetensors")
    assert refused.value.code in ("InvalidAccessKeyId", "AccessDenied", "SignatureDoesNotMatch")


ROWS = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a + b}"}
        for a in range(6) for b in range(4)]


def test_a_whole_job_runs_with_every_service_on_its_own_s3_user(tmp_path_factory, tiny_model):
    with LocalStack(tmp_path_factory.mktemp("iam-stack"), reuse_external=False,
                    enforce_s3_policies=True) as stack:
        asyncio.run(_run_job(stack, tiny_model))
        logs = {p.name: p.read_text(errors="replace") for p in (stack.data_dir / "logs").glob("*.log")}
    denied = {name for name, text in logs.items() if "AccessDenied" in text}
    assert not denied, f"S3 refused these services something they need: {sorted(denied)}"


async def _run_job(stack, tiny_model) -> None:
    operator, submitter = stack.as_role("operator"), stack.as_role("submitter")
    model_uri = f"{M}/tiny-llama"
    await asyncio.to_thread(ObjectStore(operator.s3).put_dir, model_uri, tiny_model)
    job_id = f"iam-{uuid.uuid4().hex[:8]}"
    data_uri = f"{D}/uploads/{job_id}/rows.jsonl"
    ObjectStore(submitter.s3).put_bytes(data_uri, "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    nc = await connect(submitter)
    events = await EventLog().start(nc)
    try:
        await nc.jetstream().publish(subjects.TRAINING_REQUESTED, json.dumps({
            "specversion": "1.0", "id": str(uuid.uuid4()), "source": "tests/s3-policies",
            "type": "tunebus.training.requested.v1", "subject": job_id,
            "data": {"job_id": job_id, "adapter_name": "least-privilege", "base_model": model_uri,
                     "dataset": {"uri": data_uri},
                     "hyperparameters": {"iters": 6, "batch_size": 4, "max_seq_length": 64,
                                         "checkpoint_every": 3}},
        }).encode())
        await events.wait_for(job_id, ".dataset.validated", timeout=120)
        registered = await events.wait_for(job_id, ".adapter.registered", timeout=300)
        assert registered["data"]["entry"]["verified_at"]
        assert registered["data"]["entry"]["formats"]["gguf"] == "gguf/"  # written on its own user
    finally:
        await nc.close()
