"""The registry's key-value records on a real JetStream: versions are never lost or doubled."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import nats
import pytest

from tests.helpers.bus import connect
from tests.helpers.kv import CountingKV
from tunebus.contracts import TrainingCompleted
from tunebus.services.adapter_registry.registry import NotYetKnown, Registry

pytestmark = pytest.mark.anyio
EXAMPLE = Path(__file__).parents[2] / "contracts" / "examples" / "v1" / "tunebus.training.completed.v1.json"


def training(job_id: str, name: str) -> TrainingCompleted:
    data = json.loads(EXAMPLE.read_text())["data"]
    data["job_id"] = data["request"]["job_id"] = job_id
    data["request"]["adapter_name"] = name
    return TrainingCompleted.model_validate(data)


async def open_registry(settings, bucket: str) -> tuple[nats.NATS, Registry]:
    nc = await connect(settings)
    return nc, await Registry.open(nc.jetstream(), bucket)


async def test_concurrent_registrations_keep_every_version(bare_servers):
    bucket = f"registry-{uuid.uuid4().hex[:8]}"
    name = "racer"
    # Two registrars on two connections, as two registry replicas would be.
    (nc1, one), (nc2, two) = [await open_registry(bare_servers, bucket) for _ in range(2)]
    try:
        jobs = [f"job-{i}" for i in range(12)]
        for job in jobs:
            await one.record_training(training(job, name))
        entries = await asyncio.gather(*[
            (one if i % 2 else two).register(job, None) for i, job in enumerate(jobs)
        ])
        assert sorted(e.version for e in entries) == list(range(1, 13))
        assert {e.job_id: e.version for e in entries} == {
            e.job_id: e.version for e in await one.list(name=name)}
    finally:
        await nc1.close()
        await nc2.close()


async def test_registering_the_same_job_twice_gives_the_same_version(bare_servers):
    nc, registry = await open_registry(bare_servers, f"registry-{uuid.uuid4().hex[:8]}")
    try:
        await registry.record_training(training("job-a", "twice"))
        first = await registry.register("job-a", None)
        again = await registry.register("job-a", None)
        assert (first.version, again.version) == (1, 1)
        await registry.record_training(training("job-b", "twice"))
        assert (await registry.register("job-b", None)).version == 2
        assert (await registry.get("twice")).version == 2
    finally:
        await nc.close()


async def test_an_evaluation_before_its_training_is_retried_later(bare_servers):
    nc, registry = await open_registry(bare_servers, f"registry-{uuid.uuid4().hex[:8]}")
    try:
        with pytest.raises(NotYetKnown):
            await registry.register("job-early", None)
        with pytest.raises(KeyError):
            await registry.get("nothing-here")
    finally:
        await nc.close()


def evaluated(job_id: str, improvement: float, probe_regressions: int = 0):
    """An evaluation whose loss improved by `improvement` (0.5 = halved)."""
    from tunebus.contracts import EvaluationCompleted, LossMetrics
    from tunebus.contracts.evaluation import ProbeSummary
    from tunebus.services.evaluator.compare import metric_change

    before, after = 2.0, 2.0 * (1 - improvement)
    return EvaluationCompleted(
        job_id=job_id, adapter_name="x",
        before=LossMetrics(loss=before, perplexity=1.0), after=LossMetrics(loss=after, perplexity=1.0),
        metrics=[metric_change("loss", before, after, higher_is_better=False)],
        probes=ProbeSummary(count=1, with_reference=1, max_tokens=8, regressions=probe_regressions),
    )


async def registry_with(bare_servers, name: str, improvements: list[float | None], **policy):
    """A fresh registry holding one version of `name` per improvement (None: no evaluation)."""
    from tunebus.shared.settings import RegistrySettings

    nc, registry = await open_registry(bare_servers, f"registry-{uuid.uuid4().hex[:8]}")
    registry.policy = RegistrySettings(promote_min_improvement=0.1, **policy)
    for i, improvement in enumerate(improvements, start=1):
        job = f"{name}-job-{i}"
        await registry.record_training(training(job, name))
        await registry.register(job, evaluated(job, improvement) if improvement is not None else None)
    return nc, registry


async def test_production_moves_only_when_the_policy_allows(bare_servers):
    from tunebus.services.adapter_registry.refs import parse_ref

    nc, registry = await registry_with(bare_servers, "policy", [0.5, 0.01, None, 0.3])
    try:
        entries = await registry.list(name="policy")
        assert [e.promotion.promoted for e in entries] == [True, False, False, True]
        assert (await registry.resolve(parse_ref("policy@production"))).version == 4
        assert (await registry.resolve(parse_ref("policy@latest"))).version == 4
        assert [e.aliases for e in entries] == [[], [], [], ["latest", "production"]]

        await registry.record_training(training("policy-regressing", "policy"))
        fifth = await registry.register("policy-regressing", evaluated("policy-regressing", 0.6, 1))
        assert not fifth.promotion.promoted and "probe" in fifth.promotion.reason
        assert fifth.aliases == ["latest"]
        assert (await registry.resolve(parse_ref("policy@production"))).version == 4
    finally:
        await nc.close()


async def test_a_repeated_registration_never_moves_production_backwards(bare_servers):
    nc, registry = await registry_with(bare_servers, "order", [])
    try:
        for job in ("order-a", "order-b"):
            await registry.record_training(training(job, "order"))
        first = await registry.register("order-a", evaluated("order-a", 0.5))
        second = await registry.register("order-b", evaluated("order-b", 0.5))
        assert (first.version, second.version) == (1, 2)
        assert "production" in (await registry.get("order", 2)).aliases
        # A redelivered registration of version 1 does not put it back in production.
        again = await registry.register("order-a", evaluated("order-a", 0.5))
        assert again.version == 1 and again.aliases == []
    finally:
        await nc.close()


def parse(text: str):
    from tunebus.services.adapter_registry.refs import parse_ref

    return parse_ref(text)


async def test_manual_promotion_and_rollback_walk_production_back(bare_servers):
    from tunebus.services.adapter_registry.registry import Refused

    nc, registry = await registry_with(bare_servers, "manual", [0.5, 0.0, 0.0])
    try:
        entry, previous = await registry.promote(parse("manual:2"), "hand-checked")
        assert (entry.version, previous) == (2, 1) and "production" in entry.aliases
        entry, previous = await registry.promote(parse("manual@latest"))
        assert (entry.version, previous) == (3, 2)

        entry, previous = await registry.rollback("manual")
        assert (entry.version, previous) == (2, 3)
        entry, previous = await registry.rollback("manual")
        assert (entry.version, previous) == (1, 2)
        with pytest.raises(Refused, match="nothing earlier to roll back to"):
            await registry.rollback("manual")
        with pytest.raises(KeyError, match="no adapter manual:9"):
            await registry.promote(parse("manual:9"))
    finally:
        await nc.close()


async def test_soft_delete_hides_a_version_and_keeps_the_others(bare_servers):
    from tunebus.services.adapter_registry.registry import Refused

    nc, registry = await registry_with(bare_servers, "tidy", [0.5, 0.0, 0.0])
    try:
        deleted = await registry.delete("tidy", 3, "bad data")
        assert deleted.deleted and deleted.deleted_reason == "bad data" and deleted.deleted_at
        assert [e.version for e in await registry.list(name="tidy")] == [1, 2]
        assert [e.version for e in await registry.list(name="tidy", include_deleted=True)] == [1, 2, 3]
        assert (await registry.resolve(parse("tidy@latest"))).version == 2
        assert (await registry.get("tidy", 3)).deleted  # still readable by its exact version
        with pytest.raises(Refused, match="tidy:1 is the production version"):
            await registry.delete("tidy", 1)
        with pytest.raises(Refused, match="deleted and cannot be promoted"):
            await registry.promote(parse("tidy:3"))
        # A rollback skips deleted versions.
        await registry.promote(parse("tidy:2"))
        await registry.delete("tidy", 1)
        with pytest.raises(Refused, match="nothing earlier"):
            await registry.rollback("tidy")
    finally:
        await nc.close()


async def test_listing_filters_by_base_model_and_tag(bare_servers):
    nc, registry = await open_registry(bare_servers, f"registry-{uuid.uuid4().hex[:8]}")
    try:
        for job, base, tags in (("t-1", "s3://m/a", ["support", "eu"]), ("t-2", "s3://m/b", "support"),
                                ("t-3", "s3://m/a", [])):
            done = training(job, "tagged")
            done.request.base_model = base
            done.request.metadata = {"tags": tags}
            await registry.record_training(done)
            await registry.register(job, None)
        assert [e.job_id for e in await registry.list(tag="support")] == ["t-1", "t-2"]
        assert [e.job_id for e in await registry.list(base_model="s3://m/a")] == ["t-1", "t-3"]
        assert [e.job_id for e in await registry.list(base_model="s3://m/a", tag="eu")] == ["t-1"]
        entry = await registry.get("tagged", 1)
        assert entry.tags == ["eu", "support"] and entry.dataset_manifest_uri and entry.dataset_uri
    finally:
        await nc.close()


async def test_concurrent_promotions_and_registrations_leave_a_consistent_alias(bare_servers):
    nc, registry = await registry_with(bare_servers, "busy", [0.0] * 6)
    try:
        results = await asyncio.gather(*[registry.promote(parse(f"busy:{v}")) for v in range(1, 7)])
        production = (await registry.resolve(parse("busy@production"))).version
        # Every promotion was applied in some order: the history holds the other five.
        assert {entry.version for entry, _ in results} == set(range(1, 7))
        rolled = []
        for _ in range(5):
            entry, _ = await registry.rollback("busy")
            rolled.append(entry.version)
        assert sorted([production, *rolled]) == list(range(1, 7))
    finally:
        await nc.close()


async def test_an_entry_lists_the_layouts_its_files_hold(bare_servers):
    from tunebus.contracts import Artifact

    nc, registry = await open_registry(bare_servers, f"registry-{uuid.uuid4().hex[:8]}")
    try:
        both = training("job-both", "layouts")
        extra = ["peft/adapter_model.safetensors", "peft/adapter_config.json",
                 "merged/model.safetensors", "merged/config.json"]
        both.artifacts += [Artifact(name=n, uri=f"{both.adapter_uri}/{n}", sha256="0" * 64, size=1)
                           for n in extra]
        mlx_only = training("job-mlx-only", "layouts")  # the example: the mlx-lm layout only
        for done in (both, mlx_only):
            await registry.record_training(done)
            await registry.register(done.job_id, None)
        assert (await registry.get("layouts", 1)).formats == {"mlx": "", "peft": "peft/"}
        assert (await registry.get("layouts", 2)).formats == {"mlx": ""}
    finally:
        await nc.close()


async def test_an_entry_stored_before_entries_listed_layouts_gets_them_when_read(bare_servers):
    nc, registry = await open_registry(bare_servers, f"registry-{uuid.uuid4().hex[:8]}")
    try:
        # The golden v1 example: an entry as the registry stored it before `formats` existed.
        example = Path(__file__).parents[2] / "contracts" / "examples" / "v1" / "tunebus.adapter.registered.v1.json"
        old = json.loads(example.read_text())["data"]["entry"]
        assert "formats" not in old
        await registry.kv.put(f"adapter.{old['name']}.{old['version']}", json.dumps(old).encode())
        assert (await registry.get(old["name"], old["version"])).formats == {"mlx": ""}
        assert [e.formats for e in await registry.list(name=old["name"])] == [{"mlx": ""}]
    finally:
        await nc.close()


async def test_resolving_costs_the_same_reads_whatever_the_history(bare_servers):
    from tunebus.services.adapter_registry.refs import parse_ref as parse

    reads = {}
    for count in (2, 30):
        nc, registry = await registry_with(bare_servers, "steady", [0.0] * count)
        try:
            await registry.promote(parse("steady:1"))
            registry.bucket.kv = counting = CountingKV(registry.kv)
            for ref in ("steady", "steady@latest", "steady@production", "steady:1"):
                counting.gets = 0
                await registry.resolve(parse(ref))
                reads[count, ref] = counting.gets
        finally:
            await nc.close()
    assert {ref: n for (count, ref), n in reads.items() if count == 2} == {
        ref: n for (count, ref), n in reads.items() if count == 30}
    assert max(reads.values()) <= 5  # pointer, entries, production alias: never one per version


async def test_latest_follows_registrations_and_deletions(bare_servers):
    from tunebus.services.adapter_registry.refs import parse_ref as parse

    nc, registry = await registry_with(bare_servers, "pointer", [0.5, 0.0, 0.0, 0.0])
    try:
        assert (await registry.resolve(parse("pointer"))).version == 4
        await registry.delete("pointer", 4)
        await registry.delete("pointer", 3)
        assert (await registry.resolve(parse("pointer@latest"))).version == 2
        assert (await registry.get("pointer", 2)).aliases == ["latest"]
        await registry.delete("pointer", 2)
        assert (await registry.resolve(parse("pointer@latest"))).aliases == ["latest", "production"]
        # A pointer left on a deleted version (a deletion racing a registration) is walked down.
        await registry.kv.put("latest.pointer", b"4")
        assert (await registry.resolve(parse("pointer"))).version == 1
        assert (await registry.kv.get("latest.pointer")).value == b"1"
        # A bucket from before the pointer gets it on the first read.
        await registry.kv.delete("latest.pointer")
        assert (await registry.get("pointer")).version == 1
    finally:
        await nc.close()


async def test_listing_comes_in_pages_that_follow_each_other(bare_servers):
    nc, registry = await registry_with(bare_servers, "paged", [0.0] * 7)
    try:
        await registry.delete("paged", 3)
        seen, cursor, pages = [], None, 0
        while True:
            entries, cursor = await registry.page(name="paged", after=cursor, limit=2)
            assert len(entries) <= 2
            seen += [e.version for e in entries]
            pages += 1
            if cursor is None:
                break
        assert seen == [1, 2, 4, 5, 6, 7] and pages == 3
        # A byte budget ends a page early (never with nothing in it).
        entries, cursor = await registry.page(name="paged", limit=100, max_bytes=1)
        assert [e.version for e in entries] == [1] and cursor == "paged:1"
        with pytest.raises(ValueError, match="bad cursor"):
            await registry.page(after="nonsense")
    finally:
        await nc.close()
