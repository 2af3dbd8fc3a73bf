"""Continue training (`init_from`) over the real stack: a request naming a registered version by
alias, or a checkpoint of an earlier job, trains on from it and the registry records the parent;
a parent of another base model, a contradicting adapter shape, an unknown reference, a deleted
version and a checkpoint the trainer cannot read (one outside its job's prefix, a step the job does
not keep, a forged state, files gone) are refused, naming init_from; a resumed child needs neither
the registry nor its parent."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from tests.helpers.bus import connect
from tests.helpers.events import EventLog
from tests.helpers.pipeline import SAMPLE_ROWS, publish_request, training_request, upload_rows
from tests.helpers.registration import random_adapter, register_on

pytestmark = pytest.mark.anyio
# The shape random_adapter gives (alpha = scale x rank), as its request would have said it.
SHAPE = {"type": "lora", "rank": 4, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"]}
OTHER_BASE = "s3://tunebus-models/another-base"


@pytest.fixture(scope="module")
def parent_dir(tiny_model, tiny_model_uri, tmp_path_factory):
    return random_adapter(tiny_model, tmp_path_factory.mktemp("parent") / "a", seed=21,
                          base_model=tiny_model_uri)


async def register_parent(stack, store, parent_dir, base_model: str) -> dict:
    return await register_on(stack, store, f"parent-{uuid.uuid4().hex[:6]}", parent_dir,
                             base_model, SHAPE)


@pytest.fixture(scope="module")
def parents(stack, store, parent_dir, tiny_model_uri) -> dict[str, dict]:
    """Two registered versions of the same weights: one of the tiny model, one of another base."""

    async def run():
        return {base: await register_parent(stack, store, parent_dir, base)
                for base in (tiny_model_uri, OTHER_BASE)}

    return asyncio.run(run())


@pytest.fixture(scope="module")
def continued(stack, store, tiny_model_uri, parents) -> tuple[dict, dict]:
    """A job continued from the tiny model's parent by alias, checkpointing at step 2 of 4:
    its training.completed and its registry entry."""

    async def run():
        parent = parents[tiny_model_uri]
        job_id, events, nc = await submit(stack, store, tiny_model_uri, f"{parent['name']}@latest",
                                          checkpoint_every=2)
        try:
            completed = (await events.wait_for(job_id, ".training.completed", timeout=300))["data"]
            return completed, (await events.wait_for(job_id, ".adapter.registered"))["data"]["entry"]
        finally:
            await nc.close()

    return asyncio.run(run())


async def submit(stack, store, model_uri: str, init_from: str, checkpoint_every: int = 0,
                 **adapter) -> tuple[str, EventLog, object]:
    """A quick request continuing from `init_from`, published as the submitter."""
    job_id = f"continue-{uuid.uuid4().hex[:8]}"
    dataset = upload_rows(store, stack.settings.s3.datasets_bucket, f"uploads/{job_id}/adder.jsonl",
                          SAMPLE_ROWS)
    body = json.loads(training_request(job_id, dataset, model_uri))
    body["data"] |= {"adapter_name": "continued", "init_from": init_from,
                     "evaluation": {"enabled": False}, "adapter": adapter}
    body["data"]["hyperparameters"] |= {"iters": 4, "checkpoint_every": checkpoint_every}
    nc = await connect(stack.as_role("submitter"))
    events = await EventLog().start(nc)
    await publish_request(nc, json.dumps(body).encode())
    return job_id, events, nc


async def failure(stack, store, model_uri: str, init_from: str, **adapter) -> dict:
    job_id, events, nc = await submit(stack, store, model_uri, init_from, **adapter)
    try:
        return (await events.wait_for(job_id, ".training.failed", timeout=120))["data"]
    finally:
        await nc.close()


async def test_a_request_continued_from_an_alias_trains_on_and_the_registry_records_the_parent(
        tiny_model_uri, parents, continued):
    parent, (completed, entry) = parents[tiny_model_uri], continued
    assert completed["parent"] == parent["ref"]  # resolved: name:version, not the alias
    assert completed["resolved_args"]["init_from"] == parent["ref"]
    assert completed["resolved_args"]["lora_parameters"]["rank"] == 4  # the parent's shape
    assert completed["request"]["init_from"] == f"{parent['name']}@latest"
    assert entry["parent"] == parent["ref"]
    assert entry["adapter"]["rank"] == 4 and entry["adapter"]["target_modules"] == ["q_proj", "v_proj"]


async def test_a_request_continued_from_a_checkpoint_of_an_earlier_job_trains_on(
        stack, store, tiny_model_uri, continued):
    checkpoint = f"{continued[0]['adapter_uri']}/checkpoints/step-0000002"
    job_id, events, nc = await submit(stack, store, tiny_model_uri, checkpoint)
    try:
        completed = (await events.wait_for(job_id, ".training.completed", timeout=300))["data"]
        assert completed["parent"] == completed["resolved_args"]["init_from"] == checkpoint
        assert completed["resolved_args"]["lora_parameters"]["rank"] == 4
        assert (await events.wait_for(job_id, ".adapter.registered"))["data"]["entry"]["parent"] == checkpoint
    finally:
        await nc.close()


async def test_a_deleted_version_is_refused_naming_init_from(stack, store, tiny_model_uri, parent_dir):
    parent = await register_parent(stack, store, parent_dir, tiny_model_uri)
    nc = await connect(stack.as_role("operator"))
    try:
        reply = await nc.request("tunebus.v1.registry.delete", json.dumps(
            {"ref": parent["ref"], "reason": "test"}).encode(), timeout=10)
        assert json.loads(reply.data)["entry"]["deleted"]
    finally:
        await nc.close()
    failed = await failure(stack, store, tiny_model_uri, parent["ref"])
    assert failed["error_type"] == "init_from" and f"init_from {parent['ref']!r}" in failed["reason"]


async def test_a_parent_of_another_base_model_is_refused_naming_init_from_and_both_bases(
        stack, store, tiny_model_uri, parents):
    parent = parents[OTHER_BASE]
    failed = await failure(stack, store, tiny_model_uri, parent["ref"])
    assert failed["error_type"] == "init_from"
    assert f"init_from {parent['ref']!r}" in failed["reason"]
    assert OTHER_BASE in failed["reason"] and tiny_model_uri in failed["reason"]


async def test_a_request_contradicting_the_parents_shape_is_refused_naming_the_field(
        stack, store, tiny_model_uri, parents):
    failed = await failure(stack, store, tiny_model_uri, parents[tiny_model_uri]["ref"], rank=16)
    assert "adapter.rank is 16, the parent's 4" in failed["reason"]


async def test_an_unknown_adapter_reference_is_refused_naming_init_from(stack, store, tiny_model_uri):
    failed = await failure(stack, store, tiny_model_uri, "no-such-adapter:3")
    assert failed["error_type"] == "init_from"
    assert failed["reason"].startswith("init_from 'no-such-adapter:3'")


async def test_a_checkpoint_outside_the_adapters_bucket_is_refused(stack, store, tiny_model_uri):
    uri = f"s3://{stack.settings.s3.datasets_bucket}/x/job/checkpoints/step-0000004"
    failed = await failure(stack, store, tiny_model_uri, uri)
    assert f"init_from {uri!r}" in failed["reason"]
    assert f"s3://{stack.settings.s3.adapters_bucket}/<adapter>/<job>/checkpoints/step-N" in failed["reason"]


def test_a_parent_stored_in_the_other_layout_is_converted_and_checked_against_its_sha256(
        stack, store, parent_dir, tiny_model, tmp_path):
    from dataclasses import replace

    import numpy as np
    from safetensors.numpy import load_file
    from tunebus.contracts.training import AdapterSettings
    from tunebus.services.trainer.parents import InitFromRefused, fetch_parent
    from tunebus.services.trainer.plan import Parent

    prefix = f"s3://{stack.settings.s3.adapters_bucket}/fetch/{uuid.uuid4().hex[:8]}"
    stored = {o.uri: o.sha256 for o in store.put_dir(prefix, parent_dir)}
    files = {name: f"{prefix}/{name}" for name in ("adapters.safetensors", "adapter_config.json")}
    parent = Parent(ref="fetch:1", base_model="tiny", base_model_revision=None,
                    adapter=AdapterSettings(**SHAPE), files={"mlx": files},
                    sha256={uri: stored[uri] for uri in files.values()})
    peft = fetch_parent(store, parent, "peft", tmp_path / "peft", base_model="tiny", model_dir=tiny_model)
    got, want = (load_file(str(d / "adapter_model.safetensors")) for d in (peft, parent_dir / "peft"))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)

    forged = replace(parent, sha256={uri: "0" * 64 for uri in files.values()})
    with pytest.raises(InitFromRefused, match="does not match the sha256"):
        fetch_parent(store, forged, "mlx", tmp_path / "forged", base_model="tiny", model_dir=tiny_model)


async def delete_version(stack, ref: str) -> None:
    nc = await connect(stack.as_role("operator"))
    try:
        reply = await nc.request("tunebus.v1.registry.delete", json.dumps(
            {"ref": ref, "reason": "test"}).encode(), timeout=10)
        assert json.loads(reply.data)["entry"]["deleted"]
    finally:
        await nc.close()


async def test_a_resumed_child_needs_neither_the_registry_nor_its_parent_deleted_meanwhile(
        stack, store, tiny_model_uri, parent_dir, tmp_path):
    """A child that checkpointed, its parent version deleted since: when the job comes back (a
    redelivery after its worker died, run here in the test process), it resumes from its
    checkpoint, which holds every weight, without asking the registry (there is no broker to
    ask) and finishes, still naming the parent it started from."""
    from types import SimpleNamespace

    from tunebus.contracts import DatasetValidatedEvent
    from tunebus.services.trainer.runner import TrainingRun

    parent = await register_parent(stack, store, parent_dir, tiny_model_uri)
    job_id, events, nc = await submit(stack, store, tiny_model_uri, parent["ref"], checkpoint_every=2)
    try:
        await events.wait_for(job_id, ".training.completed", timeout=300)
        validated = DatasetValidatedEvent.model_validate(events.of_job(job_id, ".dataset.validated")[0])
    finally:
        await nc.close()
    await delete_version(stack, parent["ref"])

    service = SimpleNamespace(settings=stack.settings.model_copy(update={"work_dir": tmp_path}),
                              store=store, broker=None)

    async def ignore(_):
        pass

    completed = await TrainingRun(service, "mlx", "w", validated, ignore, ignore, lambda: None).run()
    assert completed.metrics.resumed_from_step == 2 and completed.metrics.steps == 4
    assert completed.parent == parent["ref"] and completed.adapter.rank == 4
    assert "parent_download" not in completed.metrics.timings


@pytest.mark.parametrize("path", [
    "continued/../datasets/checkpoints/step-1",  # urllib3 would normalise it into another bucket
    "continued/./checkpoints/step-1",
    "continued//checkpoints/step-1",
    "Continued/job/checkpoints/step-1",  # no adapter name
    "continued/job/checkpoints/step-1/../../../other/job/checkpoints/step-1",
], ids=["dot-dot", "dot", "empty-segment", "bad-adapter-name", "dot-dot-after"])
def test_a_checkpoint_uri_that_leaves_its_job_prefix_is_refused_before_anything_is_read(
        stack, store, path):
    from tunebus.services.trainer.parents import InitFromRefused, checkpoint_parent

    bucket = stack.settings.s3.adapters_bucket
    uri = f"s3://{bucket}/{path}"
    with pytest.raises(InitFromRefused, match=r"^init_from .* is neither") as refused:
        checkpoint_parent(store, uri, bucket)
    assert f"init_from {uri!r}" in str(refused.value)


def test_a_forged_checkpoint_in_another_bucket_is_not_read(stack, store, tiny_model, tmp_path):
    from tunebus.services.trainer.checkpoints import CheckpointStore
    from tunebus.services.trainer.parents import InitFromRefused, checkpoint_parent

    forged = f"s3://{stack.settings.s3.datasets_bucket}/forger/job"  # where submitters upload
    written = CheckpointStore(store, forged).upload(forged_checkpoint(tmp_path), 1)
    with pytest.raises(InitFromRefused, match="is neither"):
        checkpoint_parent(store, written.uri, stack.settings.s3.adapters_bucket)


def test_a_step_the_job_does_not_keep_is_refused_naming_the_kept_ones(stack, store, continued):
    from tunebus.services.trainer.parents import InitFromRefused, checkpoint_parent

    uri = f"{continued[0]['adapter_uri']}/checkpoints/step-0000003"
    with pytest.raises(InitFromRefused, match=r"no such checkpoint of that job \(it keeps: step-0000002"):
        checkpoint_parent(store, uri, stack.settings.s3.adapters_bucket)


def forged_checkpoint(tmp_path: Path, **state) -> Path:
    """A checkpoint directory whose state.json says `state` over a plausible one."""
    directory = tmp_path / "forged"
    directory.mkdir()
    (directory / "state.json").write_text(json.dumps({
        "step": 1, "total_steps": 4, "backend": "mlx", "method": "sft", "seed": 0,
        "fingerprint": "0", "base_model": "tiny",
        "adapter": {"kind": "lora", "rank": 4, "alpha": 16.0, "dropout": 0.0,
                    "target_modules": None, "num_layers": None}} | state))
    (directory / "adapters.safetensors").write_bytes(b"")
    (directory / "adapter_config.json").write_text("{}")
    return directory


def test_a_checkpoint_whose_state_says_no_adapter_kind_is_refused_not_retried(stack, store, tmp_path):
    from tunebus.services.trainer.checkpoints import CheckpointStore
    from tunebus.services.trainer.parents import InitFromRefused, checkpoint_parent

    bucket = stack.settings.s3.adapters_bucket
    prefix = f"s3://{bucket}/kindless/job-{uuid.uuid4().hex[:6]}"
    written = CheckpointStore(store, prefix).upload(
        forged_checkpoint(tmp_path, adapter={"rank": 4}), 1)
    with pytest.raises(InitFromRefused, match=r"does not say a readable adapter \(KeyError"):
        checkpoint_parent(store, written.uri, bucket)


def test_a_parent_file_gone_since_it_was_found_is_refused_not_retried(stack, store, tiny_model, tmp_path):
    from tunebus.contracts.training import AdapterSettings
    from tunebus.services.trainer.parents import InitFromRefused, fetch_parent
    from tunebus.services.trainer.plan import Parent

    prefix = f"s3://{stack.settings.s3.adapters_bucket}/pruned/{uuid.uuid4().hex[:8]}"
    files = {name: f"{prefix}/{name}" for name in ("adapters.safetensors", "adapter_config.json")}
    parent = Parent(ref=f"{prefix}/checkpoints/step-1", base_model="tiny", base_model_revision=None,
                    adapter=AdapterSettings(**SHAPE), files={"mlx": files})
    with pytest.raises(InitFromRefused, match=r"^init_from .*step-1.*does not exist"):
        fetch_parent(store, parent, "mlx", tmp_path / "mlx", base_model="tiny", model_dir=tiny_model)
