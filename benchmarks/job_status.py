"""What `tunebus status JOB` and `tunebus jobs list` cost as the events stream grows (issue 15;
a benchmark, not a test).

    .venv/bin/python benchmarks/job_status.py [--events 1000 10000 100000] [--jobs 10] [--json out.json]

For each size it starts its own nats-server (loopback, file store, the streams and buckets the
bootstrap declares), publishes that many events to TUNEBUS_EVENTS spread over `--jobs` jobs (a
request, a validation, a start, progress events, a completion: long trainings report often) and
keeps each in the job-events bucket as the services' recorder does. Then, each in a fresh child
process, it times the status of one job and the list of every job, both ways:

- replay: fold the whole stream (what the CLI did before issue 15, `--replay` now);
- bucket: the latest event of each kind per job (tunebus.shared.jobevents).

It reports the call's milliseconds (measured inside the child, imports excluded, connecting
included; for status, reading and folding the events, without the half second of service
discovery a running job's status adds) and the child's peak resident memory.

Measured on the 2-core dev box (ms, and peak MB; replay -> bucket):

    events, jobs     status JOB                  jobs list
    1k,   10          119 -> 16  (62 -> 61)       106 -> 17   (65 -> 61)
    10k,  10         1382 -> 8   (67 -> 62)      1915 -> 21   (92 -> 62)
    100k, 10         8648 -> 12  (122 -> 75)    11555 -> 17  (363 -> 75)
    10k,  1000       1079 -> 10  (68 -> 61)      2668 -> 2229 (119 -> 108)
    100k, 1000      16262 -> 12  (109 -> 61)    12388 -> 1097 (385 -> 108)

`jobs list` from the bucket grows with the number of jobs (about 1 ms a job), not with the events.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats

from tunebus.contracts import (
    TrainingProgress,
    TrainingProgressEvent,
    subjects,
)
from tunebus.shared.bus import bootstrap
from tunebus.shared.identities import Credentials
from tunebus.shared.jobevents import JobEvents
from tunebus.shared.devstack.stack import start_nats

EXAMPLES = Path(__file__).parents[1] / "contracts" / "examples" / "v1"
CHILD = """
import asyncio, json, resource, sys, time
from tunebus.shared.cli import status
from tunebus.shared.settings import Settings
what, job, replay = sys.argv[1], sys.argv[2], sys.argv[3] == "replay"
settings = Settings()
start = time.perf_counter()
if what == "status":  # the events and their fold (not the 0.5 s discovery of a running job)
    async def job_status():
        async with status.client.connect(settings) as nc:
            return status.fold(job, await status._events_of(nc, job, replay))
    summary = asyncio.run(job_status()).state
else:
    summary = len(asyncio.run(status._all_jobs(settings, replay=replay)))
ms = (time.perf_counter() - start) * 1000
print(json.dumps({"ms": ms, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "result": summary}))
"""


def example(name: str) -> dict:
    return json.loads((EXAMPLES / f"tunebus.{name}.v1.json").read_text())


def job_events(job_id: str, count: int) -> list[tuple[str, bytes]]:
    """`count` events of one job, as (subject, body), in order."""
    out = []
    for name, subject in (("training.requested", subjects.TRAINING_REQUESTED),
                          ("dataset.validated", subjects.DATASET_VALIDATED),
                          ("training.started", subjects.TRAINING_STARTED)):
        doc = example(name)
        doc["subject"] = doc["data"]["job_id"] = job_id
        if "request" in doc["data"]:
            doc["data"]["request"]["job_id"] = job_id
        out.append((subject, json.dumps(doc).encode()))
    steps = max(count - 4, 0)
    for step in range(1, steps + 1):
        event = TrainingProgressEvent.wrap(TrainingProgress(
            job_id=job_id, step=step, total_steps=steps, epoch=step / steps, train_loss=2.0,
            learning_rate=1e-4, tokens_per_second=1000.0), source="tunebus/trainer")
        out.append((subjects.TRAINING_PROGRESS, event.model_dump_json().encode()))
    doc = example("training.completed")
    doc["subject"] = doc["data"]["job_id"] = doc["data"]["request"]["job_id"] = job_id
    out.append((subjects.TRAINING_COMPLETED, json.dumps(doc).encode()))
    return out[:count]


async def populate(url: str, password: str, events: int, jobs: int) -> None:
    nc = await nats.connect(url, user="admin", password=password)
    try:
        await bootstrap(nc)
        js = nc.jetstream()
        index = JobEvents(js, await js.key_value(subjects.JOB_EVENTS_BUCKET))
        per_job = events // jobs
        for j in range(jobs):
            batch = job_events(f"job-{j:05d}", per_job)
            for i in range(0, len(batch), 500):
                chunk = batch[i:i + 500]
                await asyncio.gather(*[js.publish(s, b) for s, b in chunk])
                for _, body in chunk:  # what the services' recorder does after each publish
                    await index.record(body)
    finally:
        await nc.close()


def measure(env: dict, what: str, job: str, how: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, what, job, how], env=env,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    for events in args.events:
        with tempfile.TemporaryDirectory() as tmp:
            passwords = Credentials.generate().passwords
            server, url = start_nats(Path(tmp) / "jetstream", passwords)
            try:
                start = time.perf_counter()
                asyncio.run(populate(url, passwords["admin"], events, args.jobs))
                env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEBUS_")} | {
                    "TUNEBUS_NATS_URL": url, "TUNEBUS_NATS__USER": "admin",
                    "TUNEBUS_NATS__PASSWORD": passwords["admin"], "TUNEBUS_LOG_LEVEL": "WARNING"}
                row = {"events": events, "jobs": args.jobs, "populate_s": round(time.perf_counter() - start, 1)}
                for what in ("status", "list"):
                    for how in ("replay", "bucket"):
                        m = measure(env, what, f"job-{args.jobs - 1:05d}", how)
                        row[f"{what} {how} ms"] = round(m["ms"], 1)
                        row[f"{what} {how} MB"] = round(m["rss_mb"])
                        row[f"{what} {how} result"] = m["result"]
            finally:
                server.stop()
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
