"""`tunebus stack up` keeps its services running: one killed with SIGKILL is started again, with
its restart counted in service discovery, and the others are not touched."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from tunebus.shared.cli.client import discover
from tunebus.shared.settings import NatsAuth, Settings

from tests.helpers.bus import connect
from tests.helpers.faults import wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture
def stack_up(tmp_path):
    """`tunebus stack up` with two light services, as a process of its own; its stack.json."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEBUS_")}
    cli = Path(sys.executable).with_name("tunebus")
    proc = subprocess.Popen(
        [str(cli), "stack", "up", "--data-dir", str(tmp_path / "stack"),
         "--service", "dataset_validator", "--service", "adapter_registry"],
        env=env | {"COLUMNS": "200"}, stdout=(tmp_path / "cli.out").open("wb"),
        stderr=(tmp_path / "cli.err").open("wb"))
    state_file = tmp_path / "stack" / "stack.json"
    try:
        wait_until(lambda: state_file.exists() or proc.poll() is not None, 60, "stack.json")
        assert proc.poll() is None, (tmp_path / "cli.err").read_text()
        yield proc, state_file
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


async def test_a_killed_service_is_restarted_and_the_others_are_untouched(stack_up):
    proc, state_file = stack_up
    state = json.loads(state_file.read_text())
    # As an observer, with the credentials the stack keeps beside its state.
    observer = json.loads((state_file.parent / "credentials.json").read_text())["roles"]["observer"]
    settings = Settings(nats_url=state["nats_url"], nats=NatsAuth(
        user=observer["TUNEBUS_NATS__USER"], password=observer["TUNEBUS_NATS__PASSWORD"]))
    nc = await connect(settings)
    try:
        await wait_for_instances(nc, {"dataset-validator", "adapter-registry"})
        validator, registry = state["processes"]["dataset_validator"], state["processes"]["adapter_registry"]
        os.kill(validator, signal.SIGKILL)

        def restarted():
            now = json.loads(state_file.read_text())
            return now if now["restarts"].get("dataset_validator") == 1 else None

        now = wait_until(restarted, 30, "the validator restarted")
        assert now["processes"]["dataset_validator"] != validator
        assert now["processes"]["adapter_registry"] == registry
        os.kill(registry, 0)  # still the same process, alive
        assert proc.poll() is None
        instances = await wait_for_instances(nc, {"dataset-validator", "adapter-registry"})
        counts = {i["name"]: i["metadata"]["restarts"] for i in instances}
        assert counts == {"dataset-validator": "1", "adapter-registry": "0"}
    finally:
        await nc.close()


def test_the_stack_serves_the_dashboard_at_the_url_it_prints(stack_up, tmp_path):
    out = tmp_path / "cli.out"
    line = wait_until(lambda: next((l for l in out.read_text().splitlines() if "dashboard" in l), None),
                      30, "the dashboard's URL printed")
    url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
    with urllib.request.urlopen(url + "api/whoami", timeout=30) as response:
        assert json.loads(response.read())["operator"] is True


async def wait_for_instances(nc, names: set[str], timeout: float = 60.0) -> list[dict]:
    """The discovery replies once exactly one instance of each of `names` answers."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        instances = await discover(nc, wait=0.5)
        if sorted(i["name"] for i in instances) == sorted(names):
            return instances
        assert asyncio.get_running_loop().time() < deadline, f"instances: {instances}"
