"""Keeps the embedded stack's services running (`tunebus stack up`).

A service process that exits, however it died, is started again after a backoff that doubles
with each restart in a row (1 s, 2 s, 4 s … up to 30 s), and is reset once the process has stayed
up for a minute. The others are not touched: JetStream hands the dead one's unacknowledged work to
its successor. Each restart is logged and counted; the count reaches the new process as
`TUNEBUS_RESTARTS`, which it announces over service discovery (`tunebus health`). The stack's
state (endpoints, process ids, restart counts) is kept in `<data_dir>/stack.json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import structlog

from .stack import LocalStack, Process

log = structlog.get_logger()
STATE_FILE = "stack.json"


@dataclass
class Supervisor:
    stack: LocalStack
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    stable_s: float = 60.0
    restarts: dict[str, int] = field(default_factory=dict)
    _in_a_row: dict[str, int] = field(default_factory=dict)
    _due: dict[str, float] = field(default_factory=dict)

    def check(self) -> list[str]:
        """Restart the services that are dead and due; the names of those restarted."""
        restarted = []
        now = time.monotonic()
        for process in list(self.stack.processes):
            if not _is_service(process):
                continue
            name = process.name
            if process.proc.poll() is None:
                if now - process.started_at > self.stable_s:
                    self._in_a_row.pop(name, None)
                continue
            if name not in self._due:
                delay = min(self.base_delay_s * 2 ** self._in_a_row.get(name, 0), self.max_delay_s)
                self._due[name] = now + delay
                log.warning("service exited; restarting it", service=name,
                            exit_code=process.proc.returncode, delay_s=delay,
                            restart=self.restarts.get(name, 0) + 1)
            if now < self._due[name]:
                continue
            del self._due[name]
            self.restarts[name] = self.restarts.get(name, 0) + 1
            self._in_a_row[name] = self._in_a_row.get(name, 0) + 1
            self.stack.restart(name, extra_env={"TUNEBUS_RESTARTS": str(self.restarts[name])})
            restarted.append(name)
        if restarted:
            self.write_state()
        return restarted

    def dead_servers(self) -> list[str]:
        """nats-server or the S3 endpoint, if one of them exited (those are not restarted)."""
        return [p.name for p in self.stack.processes
                if not _is_service(p) and p.proc.poll() is not None]

    def write_state(self) -> None:
        s = self.stack.settings
        state = {
            "nats_url": s.nats_url, "s3_endpoint": s.s3.endpoint,
            "processes": {p.name: p.proc.pid for p in self.stack.processes},
            "restarts": self.restarts,
        }
        path = self.stack.data_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path)


def _is_service(process: Process) -> bool:
    return process.log_path is not None
