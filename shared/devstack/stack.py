"""The embedded local stack: a real nats-server with JetStream, a real S3 endpoint (moto's
server), the buckets, and the four services as processes of their own.

Used by `tunebus stack up`, `tunebus demo` and the integration tests. A NATS or S3 already given
in the environment (TUNEBUS_NATS_URL, TUNEBUS_S3__ENDPOINT) is used instead of starting one.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from tunebus.shared.identities import ROLES, Credentials, nats_config, s3_policy
from tunebus.shared.objectstore import ObjectStore
from tunebus.shared.settings import NatsAuth, Settings

SERVICES = ("dataset_validator", "trainer", "evaluator", "adapter_registry")


CREDENTIALS_FILE = "credentials.json"


def role_of(service: str) -> str:
    """The identity a service module runs as (`dataset_validator` -> `dataset-validator`)."""
    return service.replace("_", "-")


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


def start_nats(store_dir: Path, passwords: dict[str, str], port: int | None = None) -> tuple[Process, str]:
    """A nats-server with JetStream and one user per role (`shared/identities.py`): anonymous
    connections are refused. Its configuration (with the passwords) is written beside the store,
    readable by its owner only; permission violations go to nats.log there."""
    port = port or free_port()
    monitor = free_port()
    config = store_dir.parent / f"{store_dir.name}.nats.conf"
    config.touch(mode=0o600)
    config.write_text(nats_config(passwords, listen=f"127.0.0.1:{port}", http=f"127.0.0.1:{monitor}",
                                  store_dir=str(store_dir)))
    log = (store_dir.parent / f"{store_dir.name}.nats.log").open("ab")
    proc = subprocess.Popen([_executable("nats-server"), "-c", str(config)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true"
    _wait_until(lambda: urllib.request.urlopen(url, timeout=1).status == 200, "nats-server", proc=proc)
    return Process("nats-server", proc), f"nats://127.0.0.1:{port}"


def start_nats_cluster(data_dir: Path, passwords: dict[str, str], size: int = 3,
                       ) -> tuple[list[Process], str]:
    """`size` nats-servers routed into one JetStream cluster on loopback, each on its own store;
    the processes and the servers' URLs (comma-separated, as TUNEBUS_NATS_URL takes them)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = [(free_port(), free_port(), free_port()) for _ in range(size)]  # client, route, monitor
    routes = [f"nats-route://127.0.0.1:{route}" for _, route, _ in ports]
    processes = []
    for n, (client, route, monitor) in enumerate(ports):
        store = data_dir / f"node-{n}"
        config = data_dir / f"node-{n}.nats.conf"
        config.touch(mode=0o600)
        config.write_text(nats_config(
            passwords, listen=f"127.0.0.1:{client}", http=f"127.0.0.1:{monitor}",
            store_dir=str(store), server_name=f"node-{n}", cluster_listen=f"127.0.0.1:{route}",
            routes=[r for i, r in enumerate(routes) if i != n]))
        log = (data_dir / f"node-{n}.nats.log").open("ab")
        proc = subprocess.Popen([_executable("nats-server"), "-c", str(config)],
                                stdout=log, stderr=subprocess.STDOUT)
        processes.append(Process(f"nats-server-{n}", proc))
    for process, (_, _, monitor) in zip(processes, ports):
        # Healthy once JetStream has a meta leader: the cluster can create replicated streams.
        url = f"http://127.0.0.1:{monitor}/healthz"
        _wait_until(lambda: urllib.request.urlopen(url, timeout=1).status == 200,
                    process.name, timeout=60, proc=process.proc)
    return processes, ",".join(f"nats://127.0.0.1:{client}" for client, _, _ in ports)


def restart_cluster_node(data_dir: Path, process: Process) -> Process:
    """Start a killed cluster node again on its own store and configuration."""
    n = process.name.rsplit("-", 1)[1]
    log = (data_dir / f"node-{n}.nats.log").open("ab")
    proc = subprocess.Popen([_executable("nats-server"), "-c", str(data_dir / f"node-{n}.nats.conf")],
                            stdout=log, stderr=subprocess.STDOUT)
    return Process(process.name, proc)


def start_s3(port: int | None = None, *, enforce_policies: bool = False) -> tuple[Process, str]:
    """moto's S3 server. With `enforce_policies` it checks every request's signature and the
    IAM policy of its user (moto's IAM emulation; the first requests create the users, see
    `provision_s3_users`). moto cannot check presigned URLs in that mode, so the default stack
    leaves it off and gives each role its own (unchecked) key."""
    port = port or free_port()
    env = {**os.environ}
    if enforce_policies:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(_ADMIN_PROVISIONING_CALLS)
    proc = subprocess.Popen(
        [_executable("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    endpoint = f"http://127.0.0.1:{port}"
    # moto's own API: answers without counting as an S3/IAM action.
    ready = f"{endpoint}/moto-api/data.json"
    _wait_until(lambda: urllib.request.urlopen(ready, timeout=1).status == 200, "moto S3 server", proc=proc)
    return Process("s3", proc), endpoint


# create_user, put_user_policy, create_access_key: the calls moto lets through unauthenticated.
_ADMIN_PROVISIONING_CALLS = 3


def provision_s3_users(endpoint: str, region: str, *, enforced: bool) -> dict[str, tuple[str, str]]:
    """An S3 user per role with its policy from `shared/identities.py`, and an admin that makes
    the buckets: {role: (access key, secret key)}. Without enforcement the keys are names only."""
    if not enforced:
        return {role: (f"tunebus-{role}", secrets.token_urlsafe(24)) for role in ROLES}
    import boto3

    def iam(key: str = "anonymous", secret: str = "anonymous"):
        return boto3.client("iam", endpoint_url=endpoint, region_name=region,
                            aws_access_key_id=key, aws_secret_access_key=secret)

    def user(client, name: str, policy: dict) -> tuple[str, str]:
        client.create_user(UserName=name)
        client.put_user_policy(UserName=name, PolicyName=name, PolicyDocument=json.dumps(policy))
        key = client.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    admin = user(iam(), "tunebus-admin", {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:*", "iam:*"], "Resource": "*"}]})
    as_admin = iam(*admin)
    keys = {role.name: user(as_admin, f"tunebus-{role.name}", s3_policy(role))
            for role in ROLES.values() if role.s3}
    return keys | {"admin": admin}


def service_env(settings: Settings) -> dict[str, str]:
    """The environment that points a tunebus process at this stack."""
    s3 = settings.s3
    auth = settings.nats
    credentials = {
        "TUNEBUS_NATS__USER": auth.user,
        "TUNEBUS_NATS__PASSWORD": auth.password.get_secret_value() if auth.password else None,
    }
    return {k: v for k, v in credentials.items() if v} | {
        "TUNEBUS_NATS_URL": settings.nats_url,
        "TUNEBUS_S3__ENDPOINT": s3.endpoint,
        "TUNEBUS_S3__ACCESS_KEY": s3.access_key.get_secret_value(),
        "TUNEBUS_S3__SECRET_KEY": s3.secret_key.get_secret_value(),
        "TUNEBUS_S3__REGION": s3.region,
        "TUNEBUS_S3__DATASETS_BUCKET": s3.datasets_bucket,
        "TUNEBUS_S3__MODELS_BUCKET": s3.models_bucket,
        "TUNEBUS_S3__ADAPTERS_BUCKET": s3.adapters_bucket,
        "TUNEBUS_WORK_DIR": str(settings.work_dir),
        "TUNEBUS_JETSTREAM__REPLICAS": str(settings.jetstream.replicas),
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


async def _bootstrap(settings: Settings) -> None:
    import nats

    from tunebus.shared.bus import bootstrap, nats_options

    nc = await nats.connect(**nats_options(settings))
    try:
        await bootstrap(nc, settings.jetstream.replicas)
    finally:
        await nc.close()


@dataclass
class Identities:
    """The credentials of every role on one NATS and one S3 endpoint."""

    nats_passwords: dict[str, str]
    s3_keys: dict[str, tuple[str, str]]

    def settings(self, role: str, base: Settings) -> Settings:
        """`base` acting as `role`: its NATS user and its S3 user."""
        if role not in ROLES:
            raise KeyError(f"no role {role!r}; the roles are {', '.join(ROLES)}")
        updates: dict = {}
        if self.nats_passwords:
            updates["nats"] = NatsAuth(user=role, password=self.nats_passwords[role])
        if role in self.s3_keys:
            key, secret = self.s3_keys[role]
            updates["s3"] = base.s3.model_copy(update={"access_key": SecretStr(key),
                                                       "secret_key": SecretStr(secret)})
        return base.model_copy(update=updates)


def start_servers(data_dir: Path, *, base: Settings | None = None, nats: bool = True,
                  s3: bool = True, enforce_s3_policies: bool = False, cluster_size: int = 1,
                  ) -> tuple[list[Process], Settings, Identities]:
    """nats-server (with every role's user) and an S3 endpoint (with every role's user), the
    streams, key-value buckets and S3 buckets declared: the processes, the admin's settings
    and every role's credentials. `nats=False` / `s3=False` use the ones `base` names instead,
    with the credentials it gives (then every role acts with those)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    base = (base or Settings()).model_copy(update={"work_dir": data_dir / "work"})
    processes: list[Process] = []
    passwords: dict[str, str] = {}
    keys: dict[str, tuple[str, str]] = {}
    try:
        if nats:
            passwords = Credentials.generate().passwords
            if cluster_size > 1:
                servers, url = start_nats_cluster(data_dir / "cluster", passwords, cluster_size)
                processes += servers
            else:
                server, url = start_nats(data_dir / "jetstream", passwords)
                processes.append(server)
            base = base.model_copy(update={"nats_url": url})
        if s3:
            s3_server, endpoint = start_s3(enforce_policies=enforce_s3_policies)
            processes.append(s3_server)
            base = base.model_copy(update={"s3": base.s3.model_copy(update={"endpoint": endpoint})})
            keys = provision_s3_users(endpoint, base.s3.region, enforced=enforce_s3_policies)
        identities = Identities(passwords, keys)
        admin = identities.settings("admin", base)
        ObjectStore(admin.s3).ensure_buckets()
        asyncio.run(_bootstrap(admin))
    except BaseException:
        for process in reversed(processes):
            process.stop()
        raise
    return processes, admin, identities


@dataclass
class LocalStack:
    """Everything `tunebus stack up` runs. Use as a context manager; it stops what it started.

    `settings` acts as the stack's admin (it declared the streams and buckets); each service runs
    as its own role, and `as_role` gives the settings of any other (`submitter`, `operator`…)."""

    data_dir: Path
    settings: Settings = field(default_factory=Settings)
    services: tuple[str, ...] = SERVICES
    reuse_external: bool = True
    # moto checks each role's S3 policy (and then cannot serve presigned links): for tests.
    enforce_s3_policies: bool = False
    # nats-servers in one JetStream cluster (streams and buckets get settings.jetstream.replicas).
    cluster_size: int = 1
    processes: list[Process] = field(default_factory=list)
    identities: Identities | None = None

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
        # A NATS or S3 given in the environment is someone else's: used with the credentials
        # the environment gives, by every service alike.
        env_given = os.environ if self.reuse_external else {}
        processes, self.settings, self.identities = start_servers(
            self.data_dir, base=self.settings, nats="TUNEBUS_NATS_URL" not in env_given,
            s3="TUNEBUS_S3__ENDPOINT" not in env_given, enforce_s3_policies=self.enforce_s3_policies,
            cluster_size=self.cluster_size)
        self.processes += processes
        self._write_credentials()
        logs = self.data_dir / "logs"
        logs.mkdir(exist_ok=True)
        for name in self.services:
            self.processes.append(start_service(name, self.as_role(role_of(name)), logs))
        self.wait_until_serving()

    def wait_until_serving(self, timeout: float = 300.0) -> None:
        """Until every service of the stack answers NATS service discovery: each does so only
        after its start-up, warm-up included (shared/service.py), so a job submitted then
        costs what any later one does."""
        asyncio.run(self._wait_until_serving(timeout))

    async def _wait_until_serving(self, timeout: float) -> None:
        import nats

        from tunebus.shared.bus import nats_options

        wanted = {role_of(name) for name in self.services}
        deadline = time.monotonic() + timeout
        nc = await nats.connect(**nats_options(self.settings))
        try:
            while True:
                heard: set[str] = set()

                async def collect(msg, heard=heard) -> None:
                    if msg.data:  # before any service runs, the server's empty no-responders reply
                        heard.add(json.loads(msg.data).get("name", ""))

                inbox = nc.new_inbox()
                sub = await nc.subscribe(inbox, cb=collect)
                await nc.publish("$SRV.PING", b"", reply=inbox)
                await asyncio.sleep(0.25)
                await sub.unsubscribe()
                if wanted <= heard:
                    return
                if dead := self.dead_services():
                    raise RuntimeError(f"services exited while starting: {', '.join(dead)} "
                                       f"(logs: {self.data_dir / 'logs'})")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not serving after {timeout:.0f}s: "
                                       f"{', '.join(sorted(wanted - heard))}")
        finally:
            await nc.close()

    def _write_credentials(self) -> None:
        """Every role's credentials, for other shells and tools on this machine (owner only)."""
        path = self.data_dir / CREDENTIALS_FILE
        path.unlink(missing_ok=True)
        path.touch(mode=0o600)
        path.write_text(json.dumps({"nats_url": self.settings.nats_url, "roles": {
            role: service_env(self.as_role(role)) for role in ROLES}}, indent=1))

    def as_role(self, role: str) -> Settings:
        """This stack's settings with the credentials of `role`."""
        assert self.identities is not None, "the stack is not running"
        return self.identities.settings(role, self.settings)

    def service(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)

    def restart(self, name: str, extra_env: dict[str, str] | None = None) -> Process:
        """Start a fresh process of a service (after it was stopped or killed)."""
        old = self.service(name)
        old.stop()
        new = start_service(name, self.as_role(role_of(name)), self.data_dir / "logs", extra_env)
        self.processes[self.processes.index(old)] = new
        return new

    def stop(self) -> None:
        # Services first (they drain and nak in-flight work), then the servers they talk to.
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def dead_services(self) -> list[str]:
        return [p.name for p in self.processes if p.proc.poll() is not None]
