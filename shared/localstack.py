"""The embedded local stack: a real nats-server with JetStream, a real S3 endpoint (moto's
server), the buckets, and the four services as processes of their own.

Used by `tunebus stack up`, `tunebus demo` and the integration tests. A NATS or S3 already given
in the environment (TUNEBUS_NATS_URL, TUNEBUS_S3__ENDPOINT) is used instead of starting one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from .objectstore import ObjectStore
from .settings import S3Settings, Settings

SERVICES = ("dataset_validator", "trainer", "evaluator", "adapter_registry")
# moto accepts any key pair; these exist only inside the embedded stack.
LOCAL_ACCESS_KEY = "tunebus-local"
LOCAL_SECRET_KEY = "tunebus-local-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until(check, what: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not become ready within {timeout:.0f}s")


def _executable(name: str) -> str:
    beside_python = Path(sys.executable).with_name(name)
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: install tunebus with the 'local' extra")
    return found


@dataclass
class Process:
    name: str
    proc: subprocess.Popen
    log_path: Path | None = None
    started_at: float = field(default_factory=time.monotonic)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_nats(store_dir: Path, port: int | None = None) -> tuple[Process, str]:
    port = port or free_port()
    monitor = free_port()
    proc = subprocess.Popen(
        [_executable("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor),
         "-js", "-sd", str(store_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true"
    _wait_until(lambda: urllib.request.urlopen(url, timeout=1).status == 200, "nats-server", proc=proc)
    return Process("nats-server", proc), f"nats://127.0.0.1:{port}"


def start_s3(port: int | None = None) -> tuple[Process, str]:
    port = port or free_port()
    proc = subprocess.Popen(
        [_executable("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    _wait_until(lambda: urllib.request.urlopen(endpoint, timeout=1).status == 200, "moto S3 server", proc=proc)
    return Process("s3", proc), endpoint


def service_env(settings: Settings) -> dict[str, str]:
    """The environment that points a tunebus process at this stack."""
    s3 = settings.s3
    return {
        "TUNEBUS_NATS_URL": settings.nats_url,
        "TUNEBUS_S3__ENDPOINT": s3.endpoint,
        "TUNEBUS_S3__ACCESS_KEY": s3.access_key.get_secret_value(),
        "TUNEBUS_S3__SECRET_KEY": s3.secret_key.get_secret_value(),
        "TUNEBUS_S3__REGION": s3.region,
        "TUNEBUS_S3__DATASETS_BUCKET": s3.datasets_bucket,
        "TUNEBUS_S3__MODELS_BUCKET": s3.models_bucket,
        "TUNEBUS_S3__ADAPTERS_BUCKET": s3.adapters_bucket,
        "TUNEBUS_WORK_DIR": str(settings.work_dir),
        "TUNEBUS_LOG_FORMAT": "json",
    }


def start_service(name: str, settings: Settings, log_dir: Path, extra_env: dict[str, str] | None = None) -> Process:
    log_path = log_dir / f"{name}.log"
    env = {**os.environ, **service_env(settings), **(extra_env or {})}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"tunebus.services.{name}"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    return Process(name, proc, log_path)


async def _declare_streams(nats_url: str, replicas: int = 1) -> None:
    import nats

    from .bus import ensure_streams

    nc = await nats.connect(nats_url)
    try:
        await ensure_streams(nc, replicas)
    finally:
        await nc.close()


@dataclass
class LocalStack:
    """Everything `tunebus stack up` runs. Use as a context manager; it stops what it started."""

    data_dir: Path
    settings: Settings = field(default_factory=Settings)
    services: tuple[str, ...] = SERVICES
    reuse_external: bool = True
    processes: list[Process] = field(default_factory=list)
    _exit: ExitStack = field(default_factory=ExitStack)

    def __enter__(self) -> LocalStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env_given = os.environ if self.reuse_external else {}
        updates: dict = {}
        if "TUNEBUS_NATS_URL" not in env_given:
            nats, url = start_nats(self.data_dir / "jetstream")
            self.processes.append(nats)
            updates["nats_url"] = url
        s3 = self.settings.s3
        if "TUNEBUS_S3__ENDPOINT" not in env_given:
            server, endpoint = start_s3()
            self.processes.append(server)
            s3 = S3Settings.model_validate(s3.model_dump() | {
                "endpoint": endpoint,
                "access_key": LOCAL_ACCESS_KEY,
                "secret_key": LOCAL_SECRET_KEY,
            })
        updates["s3"] = s3
        updates["work_dir"] = self.data_dir / "work"
        self.settings = self.settings.model_copy(update=updates)
        ObjectStore(self.settings.s3).ensure_buckets()
        # Declare the streams now, so that a request published before the services are up is
        # kept (their durable consumers start from the beginning of the stream).
        asyncio.run(_declare_streams(self.settings.nats_url, self.settings.jetstream.replicas))
        logs = self.data_dir / "logs"
        logs.mkdir(exist_ok=True)
        for name in self.services:
            self.processes.append(start_service(name, self.settings, logs))

    def service(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)

    def restart(self, name: str, extra_env: dict[str, str] | None = None) -> Process:
        """Start a fresh process of a service (after it was stopped or killed)."""
        old = self.service(name)
        old.stop()
        new = start_service(name, self.settings, self.data_dir / "logs", extra_env)
        self.processes[self.processes.index(old)] = new
        return new

    def stop(self) -> None:
        # Services first (they drain and nak in-flight work), then the servers they talk to.
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def dead_services(self) -> list[str]:
        return [p.name for p in self.processes if p.proc.poll() is not None]
