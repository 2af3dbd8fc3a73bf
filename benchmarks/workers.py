"""Many workers per service: N tiny jobs queued at once, drained by 1, 2 and 3 trainer workers.

    .venv/bin/python benchmarks/workers.py [--jobs 6] [--iters 30] [--workers 1 2 3] [--json out.json]

One embedded stack (nats-server, S3, validator, evaluator, registry; evaluation off), then for each worker
count: that many trainer processes (each warmed up by one job first, so imports and the model
cache are paid before the clock starts), N jobs published at once, and the time until the last
`adapter.registered`. Reported per worker count: jobs/minute, the ratio to one worker, CPU
utilisation of the machine during the run (os.getloadavg / nproc and /proc/stat busy share), and
what a job costs outside the trainer: request → registered wall time minus the time it waited
for a free worker and minus the trainer's own phases (model resolve/load, data download, setup,
training, upload: `timings` in TrainingCompleted.metrics). That rest is the validator's and the
registry's work (S3 reads and writes, sha256 checks) plus every bus hop: an upper bound on the
bus's overhead per job. Durable consumers hand each job to one
free worker; the KV claims keep a redelivered job from being trained twice.

On a 2-core machine two workers already saturate the CPU: the ratio shows where that happens;
the point is that the bus is not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers

from tests.helpers.bus import connect  # noqa: E402
from tests.helpers.events import StoredEvents, publish_raw  # noqa: E402
from tunebus.contracts import subjects  # noqa: E402
from tunebus.shared.devstack.stack import LocalStack, start_service  # noqa: E402
from tunebus.shared.objectstore import ObjectStore  # noqa: E402
from tunebus.shared.devstack.tinymodel import generate_tiny_model  # noqa: E402

ROWS = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
        for a in range(1, 9) for b in range(1, 5)]


def cpu_busy() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def request(job_id: str, model_uri: str, dataset_uri: str, iters: int) -> bytes:
    return json.dumps({
        "specversion": "1.0", "id": str(uuid.uuid4()), "source": "benchmarks/workers",
        "type": "tunebus.training.requested.v1", "subject": job_id,
        "time": datetime.now(UTC).isoformat(),
        "data": {"job_id": job_id, "adapter_name": "workers", "base_model": model_uri,
                 "dataset": {"uri": dataset_uri}, "evaluation": {"enabled": False},
                 "hyperparameters": {"iters": iters, "batch_size": 4, "max_seq_length": 64,
                                     "checkpoint_every": 0}},
    }).encode()


async def run_jobs(stack, events: StoredEvents, model_uri: str, dataset_uri: str, n: int,
                   iters: int) -> tuple[float, list[dict]]:
    nc = await connect(stack.as_role("submitter"))
    jobs = [f"w-{uuid.uuid4().hex[:8]}" for _ in range(n)]
    published = {}
    started = time.monotonic()
    for job_id in jobs:
        published[job_id] = time.time()
        body = request(job_id, model_uri, dataset_uri, iters)
        await publish_raw(nc, subjects.TRAINING_REQUESTED, body, json.loads(body)["id"])
    for job_id in jobs:
        await events.wait_for(job_id, ".adapter.registered", timeout=1800)
    wall = time.monotonic() - started
    per_job = []
    for job_id in jobs:
        completed = events.of(job_id, ".training.completed")[0]
        registered = events.of(job_id, ".adapter.registered")[0]
        validated = events.of(job_id, ".dataset.validated")[0]
        requested = events.of(job_id, ".training.requested")[0]
        timings = completed["data"]["metrics"]["timings"]
        trainer_work = sum(v for k, v in timings.items() if k != "first_step_at")
        t = {name: _time(e) for name, e in (("requested", requested), ("validated", validated),
                                            ("completed", completed), ("registered", registered))}
        before_start = sum(timings.get(k, 0) for k in ("model_resolve", "data_download", "model_load", "setup"))
        started_at = _time(events.of(job_id, ".training.started")[0])
        per_job.append({"job_id": job_id, "trainer_work_s": trainer_work,
                        # waiting for a free worker
                        "queued_s": max(started_at - t["validated"] - before_start, 0.0),
                        "validate_s": t["validated"] - t["requested"],
                        "register_s": t["registered"] - t["completed"],
                        "end_to_end_s": t["registered"] - t["requested"]})
    await nc.close()
    return wall, per_job


def _time(event: dict) -> float:
    return datetime.fromisoformat(event["time"]).timestamp()


async def main_async(args, stack: LocalStack, root: Path) -> dict:
    results = {"jobs": args.jobs, "iters": args.iters, "cores": os.cpu_count(), "runs": []}
    operator = stack.as_role("operator")
    model_uri = "s3://tunebus-models/tiny-llama"
    ObjectStore(operator.s3).put_dir(model_uri, generate_tiny_model(root / "tiny"))
    dataset_uri = "s3://tunebus-datasets/uploads/workers/rows.jsonl"
    ObjectStore(stack.as_role("submitter").s3).put_bytes(
        dataset_uri, "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    events = await StoredEvents().start(stack.settings)
    for count in args.workers:
        workers = [start_service("trainer", stack.as_role("trainer"), root / "stack" / "logs",
                                 {"TUNEBUS_TRAINER__PROGRESS_INTERVAL_S": "5"})
                   for _ in range(count)]
        try:
            # Warm every worker: `count` short jobs at once (each worker takes one).
            await run_jobs(stack, events, model_uri, dataset_uri, count, 2)
            busy0, total0 = cpu_busy()
            wall, per_job = await run_jobs(stack, events, model_uri, dataset_uri, args.jobs,
                                           args.iters)
            busy1, total1 = cpu_busy()
        finally:
            for worker in workers:
                worker.stop()
        overhead = [j["end_to_end_s"] - j["trainer_work_s"] - j["queued_s"] for j in per_job]
        run = {"workers": count, "wall_s": wall, "jobs_per_minute": 60 * args.jobs / wall,
               "cpu_busy": (busy1 - busy0) / max(total1 - total0, 1),
               "outside_trainer_ms_median": 1000 * statistics.median(overhead),
               "validate_ms_median": 1000 * statistics.median(j["validate_s"] for j in per_job),
               "register_ms_median": 1000 * statistics.median(j["register_s"] for j in per_job)}
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    await events.close()
    base = results["runs"][0]["jobs_per_minute"]
    for run in results["runs"]:
        run["ratio_to_first"] = run["jobs_per_minute"] / base
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tunebus-workers-") as tmp:
        root = Path(tmp)
        with LocalStack(root / "stack", services=("dataset_validator", "evaluator", "adapter_registry"),
                        reuse_external=False) as stack:
            results = asyncio.run(main_async(args, stack, root))
    print(f"\n{'workers':>8} {'jobs/min':>9} {'ratio':>6} {'cpu busy':>9} {'outside trainer ms/job':>23}")
    for run in results["runs"]:
        print(f"{run['workers']:>8} {run['jobs_per_minute']:>9.2f} {run['ratio_to_first']:>6.2f} "
              f"{run['cpu_busy']:>9.0%} {run['outside_trainer_ms_median']:>23.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
