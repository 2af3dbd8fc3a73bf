"""The supervisor of `tunebus stack up`: which dead process it restarts, and when."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tunebus.shared.devstack import supervisor as supervision
from tunebus.shared.devstack.stack import Process
from tunebus.shared.settings import Settings


class FakeProc:
    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None

    def poll(self):
        return self.returncode


@dataclass
class FakeStack:
    data_dir: Path
    settings: Settings = field(default_factory=Settings)
    processes: list[Process] = field(default_factory=list)
    started: list[tuple[str, dict]] = field(default_factory=list)

    def restart(self, name: str, extra_env: dict | None = None) -> Process:
        self.started.append((name, extra_env))
        old = next(p for p in self.processes if p.name == name)
        new = Process(name, FakeProc(old.proc.pid + 100), old.log_path, started_at=clock.now)
        self.processes[self.processes.index(old)] = new
        return new


class Clock:
    now = 1000.0


clock = Clock()


@pytest.fixture
def stack(tmp_path, monkeypatch):
    monkeypatch.setattr(supervision.time, "monotonic", lambda: clock.now)
    clock.now = 1000.0
    return FakeStack(tmp_path, processes=[
        Process("nats-server", FakeProc(1), None, started_at=0),
        Process("trainer", FakeProc(2), tmp_path / "trainer.log", started_at=0),
        Process("evaluator", FakeProc(3), tmp_path / "evaluator.log", started_at=0),
    ])


def kill(stack, name):
    next(p for p in stack.processes if p.name == name).proc.returncode = -9


def test_a_dead_service_is_restarted_after_its_delay_and_only_it(stack):
    watch = supervision.Supervisor(stack, base_delay_s=1.0)
    kill(stack, "trainer")
    assert watch.check() == []  # seen dead: due in 1 s
    clock.now += 1.0
    assert watch.check() == ["trainer"]
    assert stack.started == [("trainer", {"TUNEBUS_RESTARTS": "1"})]
    assert [p.proc.pid for p in stack.processes] == [1, 102, 3]


def test_restarts_in_a_row_back_off_and_a_stable_run_resets_the_delay(stack):
    watch = supervision.Supervisor(stack, base_delay_s=1.0, max_delay_s=4.0, stable_s=60.0)
    delays = []
    for _ in range(4):
        kill(stack, "trainer")
        watch.check()
        due = watch._due["trainer"]
        delays.append(due - clock.now)
        clock.now = due
        watch.check()
    assert delays == [1.0, 2.0, 4.0, 4.0]
    clock.now += 61
    watch.check()  # up for more than stable_s: the streak ends
    kill(stack, "trainer")
    watch.check()
    assert watch._due["trainer"] - clock.now == 1.0
    assert watch.restarts == {"trainer": 4}


def test_a_dead_server_is_not_restarted_but_reported(stack):
    watch = supervision.Supervisor(stack)
    kill(stack, "nats-server")
    clock.now += 100
    assert watch.check() == [] and watch.dead_servers() == ["nats-server"]
