"""Talking to the dashboard over real HTTP, as a browser's page does."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from urllib.parse import urlsplit


def get(base: str, path: str) -> tuple[int, dict | str]:
    return _call(urllib.request.Request(base.rstrip("/") + path))


def post(base: str, path: str, body: dict | None = None) -> tuple[int, dict | str]:
    return _call(urllib.request.Request(base.rstrip("/") + path, data=json.dumps(body or {}).encode(),
                                        headers={"content-type": "application/json"}, method="POST"))


def upload(base: str, path: str, field: str, filename: str, data: bytes) -> tuple[int, dict | str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return _call(urllib.request.Request(base.rstrip("/") + path, data=body, method="POST",
                                        headers={"content-type": f"multipart/form-data; boundary={boundary}"}))


def _call(request) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, _decode(response)
    except urllib.error.HTTPError as e:
        return e.code, _decode(e)


def _decode(response) -> dict | str:
    text = response.read().decode()
    if "json" in (response.headers.get("content-type") or ""):
        return json.loads(text)
    return text


class LiveEvents:
    """The dashboard's server-sent events, collected in a thread while a test runs."""

    def __init__(self, base: str) -> None:
        self.parts = urlsplit(base)
        self.events: list[dict] = []
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> LiveEvents:
        self.thread.start()
        assert self.ready.wait(20), "the live stream did not open"
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.connection.close()

    def _read(self) -> None:
        self.connection = http.client.HTTPConnection(self.parts.hostname, self.parts.port, timeout=120)
        self.connection.request("GET", "/api/live", headers={"accept": "text/event-stream"})
        response = self.connection.getresponse()
        kind = None
        while not self.stop.is_set():
            try:
                line = response.readline().decode().strip()
            except (OSError, ValueError, AttributeError):
                return
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
                if kind == "ready":
                    self.ready.set()
            elif line.startswith("data:") and kind == "bus":
                self.events.append(json.loads(line.split(":", 1)[1]))

    def of_job(self, job_id: str) -> list[dict]:
        return [e for e in self.events if e.get("job_id") == job_id]

    def wait_for(self, job_id: str, event_type: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := [e for e in self.of_job(job_id) if e["type"] == event_type]:
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"no {event_type} of {job_id} on the live stream within {timeout:.0f}s; "
                             f"saw {[e['type'] for e in self.of_job(job_id)]}")
