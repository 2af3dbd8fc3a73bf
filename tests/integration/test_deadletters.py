"""`tunebus deadletters list | show | replay` against the running stack: poison in, a dead
letter out, its replay by the identity that may publish its subject (shared/replay.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers.bus import connect
from tests.helpers.deadletters import dead_letter_of, envelope_without_specversion, poison
from tunebus.contracts import ReplayDeadLetter, ReplayReply, subjects
from tunebus.shared.cli import app, client
from tunebus.shared.devstack.stack import service_env


REQUEST_EXAMPLE = (Path(__file__).parents[2] / "contracts" / "examples" / "v1"
                   / "tunebus.training.requested.v1.json")


def as_role(stack, role):
    env = service_env(stack.as_role(role)) | {"COLUMNS": "250"}
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args), env=env)


@pytest.fixture
def poisoned_request(stack):
    """A training request without `specversion`, dead-lettered by the dataset-validator."""
    job_id = f"dlq-{uuid.uuid4().hex[:8]}"
    body = envelope_without_specversion(job_id, "tunebus.training.requested.v1")
    return asyncio.run(poison(stack.as_role("submitter"), subjects.TRAINING_REQUESTED, body, job_id))


def test_list_filters_by_service_reason_and_job_and_show_prints_the_original(stack, poisoned_request):
    observer = as_role(stack, "observer")
    job_id, dead_id = poisoned_request.letter.job_id, poisoned_request.sequence
    listing = observer("deadletters", "list", "--service", "dataset-validator", "--job", job_id)
    assert listing.exit_code == 0, listing.output
    assert str(dead_id) in listing.output and "tunebus.v1.training.requested" in listing.output
    assert "specversion" in observer("deadletters", "list", "--reason", "SPECVERSION", "--job",
                                     job_id, "--json").output
    assert job_id not in observer("deadletters", "list", "--service", "trainer", "--job", job_id).output
    assert job_id not in observer("deadletters", "list", "--reason", "no such reason", "--job", job_id).output

    shown = observer("deadletters", "show", str(dead_id))
    assert shown.exit_code == 0, shown.output
    assert "specversion" in shown.output and "dataset-validator" in shown.output
    assert f'"subject": "{job_id}"' in shown.output  # the original body, as indented JSON
    missing = observer("deadletters", "show", "999999")
    assert missing.exit_code == 1 and "no dead letter with id 999999" in missing.output


def test_an_observer_may_not_replay(stack, poisoned_request):
    result = as_role(stack, "observer")("deadletters", "replay", str(poisoned_request.sequence))
    assert isinstance(result.exception, client.PermissionDenied), result.output
    assert "observer may not publish to tunebus.v1.training.requested" in str(result.exception)
    # and the entry point says so with exit 3, like every refused action
    env = {**os.environ, **service_env(stack.as_role("observer"))}
    done = subprocess.run([sys.executable, "-c", "from tunebus.shared.cli import main; main()",
                           "deadletters", "replay", str(poisoned_request.sequence)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "refused" in done.stdout + done.stderr


def test_the_operator_replays_a_request_once_per_dead_letter(stack, poisoned_request):
    operator = as_role(stack, "operator")
    dead_id, job_id = poisoned_request.sequence, poisoned_request.letter.job_id
    result = operator("deadletters", "replay", str(dead_id), "--reason", "test")
    assert result.exit_code == 0, result.output
    assert f"replayed dead letter {dead_id} to tunebus.v1.training.requested" in result.output
    # Still poison: the validator dead-letters the replayed copy, which names its origin.
    again = asyncio.run(dead_letter_of(stack.as_role("observer"), job_id, replay_of=dead_id))
    assert again.letter.body_base64 == poisoned_request.letter.body_base64
    second = operator("deadletters", "replay", str(dead_id))
    assert second.exit_code == 0 and "already replayed" in second.output


def test_a_service_subject_is_replayed_by_its_publisher_only(stack):
    """A forged dataset.validated (only the admin can publish one) dead-lettered by the trainer:
    the operator may not publish that subject; the validator replays what the dead letter holds."""
    job_id = f"dlq-{uuid.uuid4().hex[:8]}"
    body = envelope_without_specversion(job_id, "tunebus.dataset.validated.v1")
    dead = asyncio.run(poison(stack.settings, subjects.DATASET_VALIDATED, body, job_id))
    assert dead.letter.service == "trainer"

    async def ask_trainer_to_replay() -> ReplayReply:
        nc = await connect(stack.as_role("operator"))
        try:
            return await client.ask(nc, subjects.replay("trainer"),
                                    ReplayDeadLetter(sequence=dead.sequence), ReplayReply)
        finally:
            await nc.drain()

    wrong = asyncio.run(ask_trainer_to_replay())
    assert wrong.error and "trainer does not publish tunebus.v1.dataset.validated" in wrong.error

    result = as_role(stack, "operator")("deadletters", "replay", str(dead.sequence))
    assert result.exit_code == 0, result.output
    assert "to tunebus.v1.dataset.validated" in result.output
    again = asyncio.run(dead_letter_of(stack.as_role("observer"), job_id, replay_of=dead.sequence))
    assert again.letter.service == "trainer"

    refused = as_role(stack, "submitter")("deadletters", "replay", str(dead.sequence))
    assert isinstance(refused.exception, client.PermissionDenied)
    assert "may not publish to tunebus.v1.replay.dataset-validator" in str(refused.exception)


def test_a_dead_letter_keeps_no_credential_and_a_replay_sends_the_original(stack):
    """A request naming an unknown tracker with a key nested in it: the validator's dead letter
    (errors, body) reads <redacted>, and the operator's replay republishes the original bytes
    the events stream holds, never the redacted copy."""
    key = f"SUPERSECRET-{uuid.uuid4().hex}"
    job_id = f"dlq-{uuid.uuid4().hex[:8]}"
    doc = json.loads(REQUEST_EXAMPLE.read_text())
    doc.update(id=str(uuid.uuid4()), subject=job_id)
    doc["data"].update(job_id=job_id, integrations=[
        {"type": "wandbx", "wandb": {"project": "p", "api_key": key}}])
    body = json.dumps(doc).encode()
    dead = asyncio.run(poison(stack.as_role("submitter"), subjects.TRAINING_REQUESTED, body, job_id))
    assert key not in dead.letter.model_dump_json()
    assert any("'api_key': '<redacted>'" in e for e in dead.letter.errors), dead.letter.errors
    assert dead.letter.body_sha256 == hashlib.sha256(body).hexdigest()

    result = as_role(stack, "operator")("deadletters", "replay", str(dead.sequence))
    assert result.exit_code == 0, result.output
    again = asyncio.run(dead_letter_of(stack.as_role("observer"), job_id, replay_of=dead.sequence))
    assert again.letter.body_sha256 == hashlib.sha256(body).hexdigest()  # the original, again
    assert key not in again.letter.model_dump_json()
