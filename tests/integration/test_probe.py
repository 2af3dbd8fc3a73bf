"""The container health probe (`python -m tunebus.shared.probe`, deploy/k8s/): a service's own
identity asks NATS service discovery whether the instance on its host answers. Real nats-server
with the generated permissions; the instances announce themselves with the services' own code."""

from __future__ import annotations

import socket
import sys
from types import SimpleNamespace

import pytest

from tests.helpers.bus import connect
from tunebus.shared.identities import SERVICE_ROLES
from tunebus.shared.probe import ANSWERED, REFUSED, SILENT, UNREACHABLE, main, probe
from tunebus.shared.service import _announce
from tunebus.shared.settings import NatsAuth

async def announced(settings, name: str):
    """An instance of `name` announcing itself as the services do (shared/service.py), on its own
    NATS user; returns (connection, micro service)."""
    nc = await connect(settings)
    instance = SimpleNamespace(name=name, metadata={}, active_jobs=set(),
                               status=lambda: {"service": name})
    return nc, await _announce(nc, instance)


@pytest.mark.anyio
@pytest.mark.parametrize("service", SERVICE_ROLES)
async def test_each_service_identity_finds_its_own_instance(bare_servers, bare_roles, service):
    settings = bare_roles.settings(service, bare_servers)
    nc, micro = await announced(settings, service)
    try:
        status, detail = await probe(settings, service, socket.gethostname())
    finally:
        await micro.stop()
        await nc.close()
    assert status == ANSWERED, detail


@pytest.mark.anyio
async def test_another_hosts_instance_does_not_count(bare_servers, bare_roles):
    settings = bare_roles.settings("evaluator", bare_servers)
    nc, micro = await announced(settings, "evaluator")
    try:
        status, detail = await probe(settings, "evaluator", "evaluator-7d9f-other-pod", wait=0.5)
    finally:
        await micro.stop()
        await nc.close()
    assert status == SILENT, detail
    assert socket.gethostname() in detail  # it says whom it heard instead


def test_a_silent_instance_fails_readiness_and_liveness(bare_servers, bare_roles, monkeypatch):
    settings = bare_roles.settings("adapter-registry", bare_servers)
    monkeypatch.setattr("tunebus.shared.probe.Settings", lambda: settings)
    assert main(["adapter-registry", "--wait", "0.3"]) == SILENT
    assert main(["adapter-registry", "--wait", "0.3", "--liveness"]) == SILENT


def test_an_unreachable_bus_fails_readiness_but_not_liveness(bare_servers, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = bare_servers.model_copy(update={"nats_url": f"nats://127.0.0.1:{port}"})
    monkeypatch.setattr("tunebus.shared.probe.Settings", lambda: settings)
    assert main(["trainer", "--wait", "0.5"]) == UNREACHABLE
    assert main(["trainer", "--wait", "0.5", "--liveness"]) == ANSWERED


def test_a_refused_identity_fails_liveness_too(bare_servers, monkeypatch):
    settings = bare_servers.model_copy(
        update={"nats": NatsAuth(user="trainer", password="not-the-password")})
    monkeypatch.setattr("tunebus.shared.probe.Settings", lambda: settings)
    assert main(["trainer", "--wait", "0.5", "--liveness"]) == REFUSED


def test_the_probe_imports_no_tooling_and_no_ml_library():
    """It runs every few seconds in every pod: no CLI, no ML library (the bus module's
    FastStream comes with the connection options, one place for credentials)."""
    import subprocess

    code = ("import sys, tunebus.shared.probe; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('typer', 'mlx', 'torch', 'transformers') or m.startswith('tunebus.shared.cli')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
