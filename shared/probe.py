"""`python -m tunebus.shared.probe SERVICE`: is the service instance on this host answering?

A container health check (Kubernetes exec probes, deploy/k8s/). It runs inside the service's
container with the service's own environment, so it connects to NATS as the service's own
identity, asks `$SRV.INFO.<service>` (NATS service discovery; every instance answers, each
announcing its host in its metadata) and looks for the answer of the instance on this host: with
several replicas, any other instance's answer proves nothing about this one.

Exit status:
  0  this host's instance answered
  1  NATS answered, this host's instance did not (its connection or its event loop is stuck)
  2  NATS could not be reached
  3  NATS refused this identity (or one of the probe's subjects)

`--liveness` turns "NATS could not be reached" into 0: restarting a worker does not bring the bus
back, and a bus outage should not restart every worker (readiness still fails). A refused identity
stays a failure: that is this container's configuration.

A probe runs every few seconds in every pod: no CLI and no ML library is imported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys

import nats
from nats.errors import NoServersError

from .bus import nats_options
from .settings import Settings

ANSWERED, SILENT, UNREACHABLE, REFUSED = 0, 1, 2, 3
# The metadata key under which every instance announces where it runs (shared/service.py).
HOST_KEY = "host"


async def probe(settings: Settings, service: str, host: str, wait: float = 3.0) -> tuple[int, str]:
    """(exit status, what happened) for the instance of `service` on `host`."""
    refused: list[str] = []

    async def on_error(error: Exception) -> None:
        if "violation" in str(error).lower():
            refused.append(str(error))

    try:
        # nats-py keeps retrying a first connection that fails: bound it.
        nc = await asyncio.wait_for(nats.connect(
            **nats_options(settings), name=f"tunebus-probe-{service}",
            connect_timeout=min(wait, 2.0), allow_reconnect=False, max_reconnect_attempts=0,
            error_cb=on_error), wait)
    except (NoServersError, OSError, asyncio.TimeoutError, nats.errors.Error) as e:
        if refused or "authorization violation" in str(e).lower():
            return REFUSED, f"NATS refused {settings.nats.user or 'anonymous'}: {e}"
        why = f"no server answered within {wait:g}s" if isinstance(e, asyncio.TimeoutError) else e
        return UNREACHABLE, f"NATS is unreachable: {why}"
    answered = asyncio.Event()
    others: list[str] = []

    async def collect(msg) -> None:
        try:
            info = json.loads(msg.data)
        except ValueError:
            return
        if (info.get("metadata") or {}).get(HOST_KEY) == host:
            answered.set()
        else:
            others.append((info.get("metadata") or {}).get(HOST_KEY, "?"))

    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=collect)
        await nc.publish(f"$SRV.INFO.{service}", b"", reply=inbox)
        await nc.flush()
        try:
            await asyncio.wait_for(answered.wait(), wait)
        except asyncio.TimeoutError:
            pass
        await sub.unsubscribe()
    finally:
        await nc.close()
    if refused:
        return REFUSED, f"NATS refused {settings.nats.user}: {refused[0]}"
    if answered.is_set():
        return ANSWERED, f"{service} on {host} answered"
    heard = f" (heard from {', '.join(sorted(others))})" if others else ""
    return SILENT, f"{service} on {host} did not answer within {wait:g}s{heard}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunebus.shared.probe", description=__doc__.split("\n")[0])
    parser.add_argument("service", help="the service name, e.g. trainer")
    parser.add_argument("--liveness", action="store_true",
                        help="pass when NATS is unreachable (only a silent instance fails)")
    parser.add_argument("--host", default=socket.gethostname(),
                        help="the instance's host (default: this one; in Kubernetes the pod name)")
    parser.add_argument("--wait", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    status, detail = asyncio.run(probe(Settings(), args.service, args.host, args.wait))
    if status == UNREACHABLE and args.liveness:
        print(f"{detail}; alive as far as this probe can tell")
        return ANSWERED
    print(detail, file=sys.stderr if status else sys.stdout)
    return status


if __name__ == "__main__":
    sys.exit(main())
