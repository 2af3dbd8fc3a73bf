"""What registry reads cost as an adapter's history grows (issue 15; a benchmark, not a test).

    .venv/bin/python benchmarks/registry.py [--versions 10 500 5000] [--repeat 20] [--json out.json]

For each size it starts its own nats-server (loopback, file store), registers that many versions
of one adapter through `Registry.register` (the service's own path: counter, version-of, entry,
latest pointer), then times, in-process, the median of `--repeat` calls of:

- `resolve name@latest`, `resolve name:1`, `resolve name@production`, `get name`;
- the first page of `registry.list` for that name, and the size of its reply as the service
  would send it (JSON of AdapterList): the reply must stay far below NATS's 1 MiB max payload;
- every page of `registry.list`, followed to the end (what `tunebus adapters list` does).

It also counts the key-value reads each resolve makes (a thin counter around the bucket's `get`).
Where the registry has no pages yet (before issue 15), "first page" is the whole list.

Measured on the 2-core dev box (median ms; before -> after issue 15):

    versions                    10            500             5000
    resolve @latest         5.3 -> 1.6    263 -> 1.7     5346 -> 1.7   kv reads 11/501/5001 -> 4
    get name                4.5 -> 1.8    239 -> 1.7     4408 -> 1.6
    resolve :1, @production 1.5-3 (plus a key index read) -> 1.7-2.3 (4-5 reads), every size
    list, first page        4.8 -> 4.8    271 -> 34      9522 -> 39
    list, reply size         19 KB        952 -> 190 KB  9533 -> 190 KB (a page of 100)
    list, every page        4.6 -> 3.8    239 -> 130     8988 -> 1986
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers

from tests.helpers.kv import CountingKV  # noqa: E402
from tunebus.contracts import AdapterList, TrainingCompleted  # noqa: E402
from tunebus.services.adapter_registry.refs import parse_ref
from tunebus.services.adapter_registry.registry import Registry
from tunebus.shared.identities import Credentials
from tunebus.shared.devstack.stack import start_nats

EXAMPLE = Path(__file__).parents[1] / "contracts" / "examples" / "v1" / "tunebus.training.completed.v1.json"
NAME = "bench"


def training(job_id: str) -> TrainingCompleted:
    data = json.loads(EXAMPLE.read_text())["data"]
    data["job_id"] = data["request"]["job_id"] = job_id
    data["request"]["adapter_name"] = NAME
    return TrainingCompleted.model_validate(data)


async def timed(call, repeat: int) -> float:
    """Median milliseconds of `repeat` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        await call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


async def first_page(registry: Registry) -> AdapterList:
    if hasattr(registry, "page"):
        entries, cursor = await registry.page(name=NAME)
        return AdapterList(adapters=entries, next_cursor=cursor)
    return AdapterList(adapters=await registry.list(name=NAME))


async def every_page(registry: Registry) -> int:
    if not hasattr(registry, "page"):
        return len(await registry.list(name=NAME))
    count, cursor = 0, None
    while True:
        entries, cursor = await registry.page(name=NAME, after=cursor)
        count += len(entries)
        if cursor is None:
            return count


async def measure(url: str, user: str, password: str, versions: int, repeat: int) -> dict:
    nc = await nats.connect(url, user=user, password=password)
    try:
        registry = await Registry.open(nc.jetstream(), f"registry-bench-{versions}")
        start = time.perf_counter()
        for chunk in range(0, versions, 50):
            jobs = [f"job-{i}" for i in range(chunk, min(chunk + 50, versions))]
            for job in jobs:
                await registry.record_training(training(job))
            await asyncio.gather(*[registry.register(job, None) for job in jobs])
        populate_s = time.perf_counter() - start
        await registry.promote(parse_ref(f"{NAME}:1"))
        registry.bucket.kv = counting = CountingKV(registry.kv)
        result = {"versions": versions, "populate_s": round(populate_s, 1)}
        for label, ref in (("resolve @latest", f"{NAME}@latest"), ("resolve :1", f"{NAME}:1"),
                           ("resolve @production", f"{NAME}@production")):
            counting.gets = 0
            await registry.resolve(parse_ref(ref))
            result[f"{label} kv reads"] = counting.gets
            result[f"{label} ms"] = round(await timed(lambda r=ref: registry.resolve(parse_ref(r)), repeat), 2)
        result["get name ms"] = round(await timed(lambda: registry.get(NAME), repeat), 2)
        page = await first_page(registry)
        result["list first page ms"] = round(await timed(lambda: first_page(registry), max(3, repeat // 4)), 1)
        result["list first page entries"] = len(page.adapters)
        result["list first page reply KB"] = round(len(page.model_dump_json().encode()) / 1024, 1)
        start = time.perf_counter()
        result["list all pages entries"] = await every_page(registry)
        result["list all pages ms"] = round((time.perf_counter() - start) * 1000, 1)
        return result
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", type=int, nargs="+", default=[10, 500, 5000])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    for versions in args.versions:
        with tempfile.TemporaryDirectory() as tmp:
            passwords = Credentials.generate().passwords
            server, url = start_nats(Path(tmp) / "jetstream", passwords)
            try:
                result = asyncio.run(measure(url, "admin", passwords["admin"], versions, args.repeat))
            finally:
                server.stop()
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
