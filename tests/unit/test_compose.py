"""Static checks of the Docker Compose deployment (compose.yaml, deploy/Dockerfile, deploy/minio/).

No Docker needed: the files are parsed with pyyaml/json and checked against each other and against
`tunebus.shared.settings`. One test runs deploy/minio/init.sh with a stub `mc` (needs `sh` only).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import BaseModel

from tunebus.shared.settings import S3Settings, Settings, TrainerSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
MINIO_DIR = ROOT / "deploy" / "minio"
POLICY_DIR = MINIO_DIR / "policies"
INIT_SH = MINIO_DIR / "init.sh"

LOCALHOST = "127.0.0.1"
PUBLISHED_PORTS = {"4222", "8222", "9000", "9001"}

# The buckets, by role, as named by the S3Settings defaults (the policies name them literally).
BUCKETS = {
    role: S3Settings.model_fields[f"{role}_bucket"].default
    for role in ("datasets", "models", "adapters")
}

# The service modules (`python -m tunebus.services.<module>`) and their S3 access; one MinIO user
# and one policy per module. "read" = s3:GetObject on the bucket's objects, "write" = s3:PutObject.
SERVICES = {
    # The validator reads a base model's tokenizer.json by name (to count tokens): no listing.
    "dataset_validator": {"read": {"datasets", "models"}, "write": {"datasets"}, "list": {"datasets"}},
    # The trainer reads its own checkpoints back (resume) and prunes old ones.
    "trainer": {"read": {"models", "datasets", "adapters"}, "write": {"adapters"}},
    "evaluator": {"read": {"models", "datasets", "adapters"}, "write": {"adapters"}},
    # models: only config.json (the GGUF copy names tensors by it); adapters: only gguf/ copies.
    "adapter_registry": {"read": {"adapters", "models"}, "write": {"adapters"}, "list": {"adapters"}},
}

# The compose services that run a module: its image target, the trainer backend, the compose
# profiles that enable it (none: part of a plain `docker compose up`), whether it gets a GPU.
COMPOSE_SERVICES = {
    "dataset-validator": {"module": "dataset_validator", "target": "base"},
    "trainer": {"module": "trainer", "target": "ml", "backend": "mlx"},
    "trainer-cuda": {
        "module": "trainer",
        "target": "cuda",
        "backend": "cuda",
        "profiles": ["cuda"],
        "gpu": True,
    },
    "evaluator": {"module": "evaluator", "target": "ml"},
    "adapter-registry": {"module": "adapter_registry", "target": "base"},
}

# Image target -> the pyproject extras it installs on top of the base dependencies.
TARGET_EXTRAS = {"base": set(), "ml": {"mlx"}, "cuda": {"cuda"}}
WORK_DIR = "/var/lib/tunebus"

BUCKET_ACTIONS = {"s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"}
OBJECT_ACTIONS = {
    "s3:GetObject",
    "s3:DeleteObject",  # the trainer's checkpoint pruning only (see test_policy_grants_exactly_the_services_access)
    "s3:PutObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
}
ARN_RE = re.compile(r"^arn:aws:s3:::(?P<bucket>[a-z0-9][a-z0-9.-]+)(?P<key>/.*)?$")


# ---------------------------------------------------------------------------------------------
# helpers


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


_VAR_RE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)")


def interpolate(value) -> str:
    """Resolve compose `${VAR:-default}` syntax as if no variable were set (the dev defaults)."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        op = m.group("op") or ""
        if op.endswith("-"):
            return m.group("arg")
        return ""

    return _VAR_RE.sub(sub, str(value))


def referenced_vars(value) -> set[str]:
    return {m.group("name") or m.group("bare") for m in _VAR_RE.finditer(str(value))} - {None}


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def service_module(service: dict) -> str | None:
    command = service.get("command") or []
    if isinstance(command, str):
        command = command.split()
    for arg in command:
        m = re.fullmatch(r"tunebus\.services\.(\w+)", arg)
        if m:
            return m.group(1)
    return None


def app_services(services: dict) -> dict[str, dict]:
    """Compose service name -> definition, for the services that run a tunebus module."""
    return {name: svc for name, svc in services.items() if service_module(svc)}


def dockerfile_stages(text: str) -> dict[str, dict]:
    """Stage name -> {"image": FROM image (ARG defaults applied), "parent", "lines"}."""
    lines = re.sub(r"\\\n", " ", text).splitlines()
    args: dict[str, str] = {}
    stages: dict[str, dict] = {}
    current: dict | None = None
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"(?i)^FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?\s*$", line)
        if m:
            image = re.sub(
                r"\$\{?(\w+)\}?", lambda a: args.get(a.group(1), a.group(0)), m.group(1)
            )
            name = m.group(2) or f"#{len(stages)}"
            current = {"image": image, "parent": image if image in stages else None, "lines": []}
            stages[name] = current
            continue
        if current is None:
            a = re.match(r"(?i)^ARG\s+(\w+)=(\S+)", line)
            if a:
                args[a.group(1)] = a.group(2)
            continue
        current["lines"].append(line)
    return stages


def last_user(stages: dict, name: str) -> str | None:
    """The USER a stage runs as, following its FROM chain (None: never set, i.e. root)."""
    while name is not None:
        lines = stages[name]["lines"]
        users = [ln.split(None, 1)[1] for ln in lines if ln.upper().startswith("USER ")]
        if users:
            return users[-1].strip()
        name = stages[name]["parent"]
    return None


def stage_chain(stages: dict, name: str) -> list[str]:
    """A stage's lines, its ancestors' first (the FROM chain within the Dockerfile)."""
    chain: list[list[str]] = []
    while name is not None:
        chain.insert(0, stages[name]["lines"])
        name = stages[name]["parent"]
    return [line for lines in chain for line in lines]


def pip_installs(stages: dict, name: str) -> list[str]:
    return [
        m.group(0)
        for line in stage_chain(stages, name)
        if line.upper().startswith("RUN ")
        for m in re.finditer(r"pip install[^&;|]*", line)
    ]


# `p['dependencies']` or `p['optional-dependencies']['<extra>']`, printed `> /tmp/<file>`.
_REQUIREMENTS_RE = re.compile(
    r"p\['(?:optional-dependencies'\]\['(?P<extra>[\w-]+)|dependencies)'\]"
    r"\)*\"?\s*>\s*(?P<path>\S+)"
)


def installed_requirement_lists(stages: dict, name: str) -> set[str]:
    """The pyproject requirement lists ("dependencies", or an extra's name) that a stage writes out
    of pyproject.toml into a file and then `pip install -r`s, following its FROM chain."""
    written = {
        m.group("path"): m.group("extra") or "dependencies"
        for line in stage_chain(stages, name)
        if line.upper().startswith("RUN ")
        for m in _REQUIREMENTS_RE.finditer(line)
    }
    installed = {
        path for cmd in pip_installs(stages, name) for path in re.findall(r"-r\s+(\S+)", cmd)
    }
    return {lst for path, lst in written.items() if path in installed}


def stage_env(stages: dict, name: str) -> dict[str, str]:
    """The ENV a stage ends with, following its FROM chain (`ENV K=V ...` form)."""
    env: dict[str, str] = {}
    for line in stage_chain(stages, name):
        if line.upper().startswith("ENV "):
            for token in shlex.split(line[4:]):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def settings_path_exists(env_name: str) -> bool:
    """Whether TUNEBUS_A__B names the field a.b of Settings (nested models via `__`)."""
    parts = env_name[len("TUNEBUS_") :].lower().split("__")
    model: type[BaseModel] = Settings
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if i < len(parts) - 1:
            ann = field.annotation
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                return False
            model = ann
    return True


def load_policies() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(POLICY_DIR.glob("*.json"))}


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def grants(policy: dict) -> set[tuple[str, str]]:
    """(action, resource ARN) pairs that the policy allows."""
    return {
        (action, resource)
        for st in policy["Statement"]
        if st.get("Effect") == "Allow"
        for action in as_list(st.get("Action", []))
        for resource in as_list(st.get("Resource", []))
    }


def buckets_with(policy: dict, action: str) -> set[str]:
    roles = {v: k for k, v in BUCKETS.items()}
    out = set()
    for act, resource in grants(policy):
        m = ARN_RE.match(resource)
        if act == action and m and m.group("bucket") in roles:
            out.add(roles[m.group("bucket")])
    return out


def provision_calls(text: str) -> list[tuple[str, str, str, str]]:
    """init.sh's `provision "${ACCESS}" "${SECRET}" POLICY "$POLICY_DIR/<file>.json"` calls."""
    text = re.sub(r"\\\n\s*", " ", text)
    return re.findall(
        r'^provision\s+"\$\{?(\w+)[^"]*"\s+"\$\{?(\w+)[^"]*"\s+(\S+)\s+"[^"]*?([\w.-]+\.json)"',
        text,
        flags=re.M,
    )


# ---------------------------------------------------------------------------------------------
# compose.yaml


def test_compose_parses_and_has_all_services(compose):
    assert isinstance(compose, dict) and isinstance(compose.get("services"), dict)
    for name in ("nats", "minio", "minio-init"):
        assert name in compose["services"], f"compose.yaml has no `{name}` service"
    apps = app_services(compose["services"])
    assert set(apps) == set(COMPOSE_SERVICES), f"services running a tunebus module: {sorted(apps)}"
    wrong = {
        name: service_module(svc)
        for name, svc in apps.items()
        if service_module(svc) != COMPOSE_SERVICES[name]["module"]
    }
    assert not wrong, f"services running the wrong module: {wrong}"
    unknown = {service_module(s) for s in apps.values()} - set(SERVICES)
    assert not unknown, f"no policy model for modules {sorted(unknown)}"


def test_every_service_has_image_or_build_with_existing_target(services):
    problems = []
    for name, svc in services.items():
        if "build" not in svc:
            if not svc.get("image"):
                problems.append(f"{name}: neither image nor build")
            continue
        build = svc["build"]
        build = {"context": build} if isinstance(build, str) else build
        context = ROOT / build.get("context", ".")
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        if not dockerfile.is_file():
            problems.append(f"{name}: no Dockerfile at {dockerfile}")
            continue
        target = build.get("target")
        if target is None:
            problems.append(f"{name}: build has no target")
        elif target not in dockerfile_stages(dockerfile.read_text()):
            problems.append(f"{name}: target {target!r} is no stage of {dockerfile}")
    assert not problems, problems


def test_services_are_built_from_the_right_target(services):
    problems = []
    for name, svc in app_services(services).items():
        module = service_module(svc)
        build = svc.get("build") or {}
        if not isinstance(build, dict) or Path(build.get("dockerfile", "")) != Path(
            "deploy/Dockerfile"
        ):
            problems.append(f"{name}: not built from deploy/Dockerfile")
        elif build.get("target") != COMPOSE_SERVICES[name]["target"]:
            want = COMPOSE_SERVICES[name]["target"]
            problems.append(f"{name} ({module}): target {build.get('target')!r}, want {want!r}")
        if svc.get("restart") != "unless-stopped":
            problems.append(f"{name}: restart is {svc.get('restart')!r}")
    assert not problems, problems


def test_depends_on_names_existing_services(services):
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    problems = []
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, spec in deps.items():
            if dep not in services:
                problems.append(f"{name} depends on unknown service {dep!r}")
                continue
            condition = (spec or {}).get("condition", "service_started")
            if condition not in conditions:
                problems.append(f"{name} -> {dep}: bad condition {condition!r}")
            if condition == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{name} waits for {dep} to be healthy, which has no healthcheck")
    assert not problems, problems


def test_startup_order(services):
    def condition(svc, dep):
        deps = svc.get("depends_on") or {}
        return (deps.get(dep) or {}).get("condition") if isinstance(deps, dict) else None

    assert condition(services["minio-init"], "minio") == "service_healthy"
    assert condition(services["nats-init"], "nats") == "service_healthy"
    for name, svc in app_services(services).items():
        assert condition(svc, "nats") == "service_healthy", name
        assert condition(svc, "nats-init") == "service_completed_successfully", name
        assert condition(svc, "minio-init") == "service_completed_successfully", name


def test_infrastructure_services(services):
    nats, minio, init = services["nats"], services["minio"], services["minio-init"]
    nats_cmd = " ".join(as_list(nats.get("command", [])))
    assert "-js" in nats_cmd.split() and "-sd /data" in nats_cmd, nats_cmd
    assert "-c /etc/nats/nats.conf" in nats_cmd, nats_cmd
    assert mount_targets(nats)["/etc/nats/nats.conf"] == "./deploy/nats/nats.conf"
    assert "8222/healthz" in " ".join(as_list(nats["healthcheck"]["test"]))
    assert "server /data" in " ".join(as_list(minio.get("command", [])))
    assert "--console-address :9001" in " ".join(as_list(minio.get("command", [])))
    assert "healthcheck" in minio
    init_cmd = as_list(init.get("entrypoint", [])) + as_list(init.get("command", []))
    assert any("init.sh" in str(x) for x in init_cmd), init_cmd


def test_nats_fsyncs_every_write_and_the_streams_take_their_replicas_from_settings(services, monkeypatch):
    """Durability is configured, not the server's default (sync every 2 minutes)."""
    conf = (ROOT / "deploy" / "nats" / "nats.conf").read_text()
    assert re.search(r"jetstream\s*\{[^}]*\bsync_interval:\s*always\b", conf), conf
    for key in list(os.environ):
        if key.upper().startswith("TUNEBUS_"):
            monkeypatch.delenv(key)
    for name, svc in app_services(services).items():
        monkeypatch.setenv("TUNEBUS_JETSTREAM__REPLICAS", interpolate(env_of(svc)["TUNEBUS_JETSTREAM__REPLICAS"]))
        assert Settings().jetstream.replicas == 1, name  # one server: one copy


def test_images_are_pinned(services):
    problems = []
    for name, svc in services.items():
        image = svc.get("image")
        if not image or "build" in svc:
            continue
        repo, _, tag = image.rpartition(":")
        if "@sha256:" in image:
            continue
        if not repo or "/" in tag or not tag:
            problems.append(f"{name}: {image} has no tag")
        elif tag == "latest" or tag.endswith("-latest"):
            problems.append(f"{name}: {image} is not pinned")
        elif re.fullmatch(r"\d+", tag):
            problems.append(f"{name}: {image} pins a major version only")
    assert not problems, problems


def test_tunebus_env_vars_are_settings_fields(services):
    names = {k for s in services.values() for k in env_of(s) if k.upper().startswith("TUNEBUS_")}
    names |= set(re.findall(r"\b(TUNEBUS_\w+)=", DOCKERFILE.read_text()))
    assert names, "no TUNEBUS_* variables found"
    unknown = sorted(n for n in names if not settings_path_exists(n))
    assert not unknown, f"not Settings fields: {unknown}"


def test_service_environment_builds_valid_settings(services, monkeypatch):
    for key in list(os.environ):
        if key.upper().startswith("TUNEBUS_"):
            monkeypatch.delenv(key)
    for name, svc in app_services(services).items():
        env = {k: interpolate(v) for k, v in env_of(svc).items() if k.startswith("TUNEBUS_")}
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            settings = Settings()
        assert settings.nats_url == "nats://nats:4222", name
        assert settings.s3.endpoint == "http://minio:9000", name
        assert settings.log_format == "json", name
        assert settings.s3.access_key.get_secret_value(), f"{name}: no S3 access key"
        assert settings.s3.secret_key.get_secret_value(), f"{name}: no S3 secret key"
        for role, bucket in BUCKETS.items():
            # The policies name the default buckets; a renamed bucket would be denied.
            assert getattr(settings.s3, f"{role}_bucket") == bucket, name
        assert str(settings.work_dir) == WORK_DIR, name
        if "backend" in COMPOSE_SERVICES[name]:
            assert settings.trainer.backend == COMPOSE_SERVICES[name]["backend"], name


def test_service_credentials_differ_from_root_and_between_roles(services):
    """One MinIO user per module: the services that run one module (the MLX and the CUDA trainer)
    share its credentials, to the letter; no two modules share any."""
    root_env = env_of(services["minio"])
    root_raw = {root_env["MINIO_ROOT_USER"], root_env["MINIO_ROOT_PASSWORD"]}
    root = {interpolate(v) for v in root_raw}
    root_vars = set().union(*(referenced_vars(v) for v in root_raw))
    assert all(root), "MinIO root credentials resolve to nothing"
    seen: dict[str, tuple[str, str]] = {}  # resolved value -> (service, module)
    role_user: dict[tuple[str, str], tuple[str, str]] = {}  # (module, key) -> (service, raw value)
    problems = []
    for name, svc in app_services(services).items():
        env = env_of(svc)
        module = service_module(svc)
        for key in ("TUNEBUS_S3__ACCESS_KEY", "TUNEBUS_S3__SECRET_KEY"):
            raw = env.get(key)
            if raw is None:
                problems.append(f"{name}: {key} not set")
                continue
            value = interpolate(raw)
            if not value:
                problems.append(f"{name}: {key} has no default")
            if value in root or referenced_vars(raw) & root_vars:
                problems.append(f"{name}: {key} reuses the MinIO root credentials")
            if value in seen and seen[value][1] != module:
                problems.append(f"{name}: {key} shared with {seen[value][0]} ({seen[value][1]})")
            seen.setdefault(value, (name, module))
            first, first_raw = role_user.setdefault((module, key), (name, raw))
            if raw != first_raw:
                problems.append(f"{name}: {key} {raw!r} is not {first}'s {first_raw!r} ({module})")
        if any(k.startswith("MINIO_ROOT") for k in env) or any(
            referenced_vars(v) & root_vars for k, v in env.items() if "S3" not in k
        ):
            problems.append(f"{name}: gets the MinIO root credentials")
    assert not problems, problems


def test_only_minio_and_init_get_root_credentials(services):
    holders = {
        name
        for name, svc in services.items()
        if any("MINIO_ROOT" in k or "MINIO_ROOT" in v for k, v in env_of(svc).items())
    }
    assert holders == {"minio", "minio-init"}


def test_ports_bind_to_localhost(services):
    problems, published = [], set()
    for name, svc in services.items():
        for port in svc.get("ports") or []:
            if isinstance(port, dict):
                host_ip, host_port = port.get("host_ip"), str(port.get("published", ""))
            else:
                parts = str(port).split(":")
                host_ip = parts[0] if len(parts) == 3 else None
                host_port = parts[-2] if len(parts) >= 2 else parts[0]
            if host_ip != LOCALHOST:
                problems.append(f"{name}: {port} is not bound to {LOCALHOST}")
            published.add(host_port)
    assert not problems, problems
    assert PUBLISHED_PORTS <= published, f"missing published ports {PUBLISHED_PORTS - published}"


def test_volumes_exist(compose, services):
    declared = set(compose.get("volumes") or {})
    problems = []
    for name, svc in services.items():
        for vol in svc.get("volumes") or []:
            source = vol.get("source") if isinstance(vol, dict) else str(vol).split(":")[0]
            if source.startswith((".", "/")):
                if not (ROOT / source).exists():
                    problems.append(f"{name}: bind mount {source} does not exist")
            elif source not in declared:
                problems.append(f"{name}: named volume {source} is not declared")
    for name in ("nats", "minio"):
        if not any(
            not str(v).startswith((".", "/")) for v in services[name].get("volumes") or []
        ):
            problems.append(f"{name}: keeps its data in no named volume")
    assert not problems, problems


def mount_targets(svc: dict) -> dict[str, str]:
    """Container path -> volume name or host path, for a service's volumes."""
    out = {}
    for vol in svc.get("volumes") or []:
        if isinstance(vol, dict):
            out[vol.get("target")] = vol.get("source")
        else:
            source, target = str(vol).split(":")[:2]
            out[target] = source
    return out


def test_ml_workers_keep_the_work_dir_in_a_volume_of_their_own(services):
    owners: dict[str, str] = {}
    problems = []
    for name, svc in app_services(services).items():
        if COMPOSE_SERVICES[name]["target"] == "base":
            continue
        source = mount_targets(svc).get(WORK_DIR)
        if source is None or source.startswith((".", "/")):
            problems.append(f"{name}: no named volume at {WORK_DIR}")
        elif source in owners:
            problems.append(f"{name}: shares the work volume {source} with {owners[source]}")
        else:
            owners[source] = name
    assert not problems, problems
    assert len(owners) == sum(spec["target"] != "base" for spec in COMPOSE_SERVICES.values())


# ---------------------------------------------------------------------------------------------
# the trainers: one service per backend, the CUDA one on a GPU and behind the `cuda` profile


def gpu_requests(svc: dict) -> list:
    deploy = svc.get("deploy") or {}
    reservations = (deploy.get("resources") or {}).get("reservations") or {}
    return reservations.get("devices") or []


def test_every_trainer_backend_has_its_own_trainer_service(services):
    backends: dict[str, list[str]] = {}
    for name, svc in app_services(services).items():
        if service_module(svc) == "trainer":
            backend = interpolate(env_of(svc).get("TUNEBUS_TRAINER__BACKEND", "(unset)"))
            backends.setdefault(backend, []).append(name)
    want = {
        spec["backend"]: [name]
        for name, spec in COMPOSE_SERVICES.items()
        if spec["module"] == "trainer"
    }
    assert backends == want
    # Every backend the trainer has (each its own durable consumer) can be run from compose.
    assert set(backends) == set(get_args(TrainerSettings.model_fields["backend"].annotation))


def test_trainer_cuda_is_the_trainer_with_another_backend(services):
    """Same command, credentials, settings, dependencies, restart policy and stop grace period;
    only the image target, the backend, the work volume, the GPU and the profile differ."""
    mlx, cuda = services["trainer"], services["trainer-cuda"]
    differ = {"build", "environment", "volumes", "deploy", "profiles"}
    problems = [
        f"{key}: trainer has {mlx.get(key)!r}, trainer-cuda {cuda.get(key)!r}"
        for key in sorted((set(mlx) | set(cuda)) - differ)
        if mlx.get(key) != cuda.get(key)
    ]
    assert not problems, problems
    assert cuda.get("stop_grace_period"), "trainer-cuda gets no time to checkpoint on stop"

    def without(d: dict, key: str) -> dict:
        return {k: v for k, v in d.items() if k != key}

    assert without(mlx["build"], "target") == without(cuda["build"], "target")
    backend = "TUNEBUS_TRAINER__BACKEND"
    assert without(env_of(mlx), backend) == without(env_of(cuda), backend)
    assert without(mount_targets(mlx), WORK_DIR) == without(mount_targets(cuda), WORK_DIR)


def test_only_trainer_cuda_gets_a_gpu(services):
    with_gpu = {
        name
        for name, svc in services.items()
        if gpu_requests(svc) or svc.get("gpus") or svc.get("runtime") == "nvidia"
    }
    assert with_gpu == {name for name, spec in COMPOSE_SERVICES.items() if spec.get("gpu")}
    problems = []
    for name in sorted(with_gpu):
        requests = gpu_requests(services[name])
        if len(requests) != 1:
            problems.append(f"{name}: {len(requests)} device reservations, want one")
            continue
        (req,) = requests
        if req.get("driver") != "nvidia":
            problems.append(f"{name}: driver {req.get('driver')!r}")
        if "gpu" not in as_list(req.get("capabilities") or []):
            problems.append(f"{name}: capabilities {req.get('capabilities')!r} lack gpu")
        # One process on one device: one GPU, all of them, or the ones named (not both ways).
        if req.get("device_ids") is not None:
            if "count" in req:
                problems.append(f"{name}: both count and device_ids")
        elif req.get("count") not in (1, "all"):
            problems.append(f"{name}: count {req.get('count')!r}")
        if any(k.startswith("NVIDIA_VISIBLE_DEVICES") for k in env_of(services[name])):
            problems.append(f"{name}: NVIDIA_VISIBLE_DEVICES overrides the reservation")
    assert not problems, problems


def test_cuda_profile_keeps_trainer_cuda_out_of_the_default_set(services):
    profiles = {name: as_list(svc.get("profiles") or []) for name, svc in services.items()}
    assert {name: profiles[name] for name in COMPOSE_SERVICES if name in profiles} == {
        name: spec.get("profiles", []) for name, spec in COMPOSE_SERVICES.items()
    }
    # A plain `docker compose up` starts what it always has: the infrastructure and one service
    # per module, with the MLX trainer.
    default = {name for name, p in profiles.items() if not p}
    assert default == {
        "nats", "nats-init", "minio", "minio-init",
        "dataset-validator", "trainer", "evaluator", "adapter-registry",
    }
    # `--profile cuda` adds the CUDA trainer and nothing else.
    assert {name for name, p in profiles.items() if "cuda" in p} == {"trainer-cuda"}
    # A default service that depended on a profiled one would drag it in.
    for name in sorted(default):
        deps = set(services[name].get("depends_on") or {})
        assert deps <= default, f"{name} depends on {sorted(deps - default)}"


# ---------------------------------------------------------------------------------------------
# deploy/Dockerfile


def test_dockerfile_targets_and_base_image():
    stages = dockerfile_stages(DOCKERFILE.read_text())
    assert set(TARGET_EXTRAS) <= set(stages), f"stages: {sorted(stages)}"
    external = {s["image"] for s in stages.values() if s["parent"] is None}
    assert external, "no base image"
    for image in external:
        assert image.startswith("python:3.11-slim"), image


def test_dockerfile_targets_run_as_non_root():
    stages = dockerfile_stages(DOCKERFILE.read_text())
    for target in TARGET_EXTRAS:
        user = last_user(stages, target)
        assert user and user.split(":")[0] not in {"root", "0"}, f"{target} runs as {user!r}"


def test_dockerfile_installs_the_right_extras():
    text = DOCKERFILE.read_text()
    stages = dockerfile_stages(text)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for target, extras in TARGET_EXTRAS.items():
        assert extras <= set(pyproject["optional-dependencies"]), f"{target}: {extras}"
        lists = installed_requirement_lists(stages, target)
        assert lists == {"dependencies"} | extras, f"{target} installs {sorted(lists)}"
        # The tunebus wheel itself, without letting pip pick dependencies of its own.
        own = [
            ln for ln in stages[target]["lines"] if re.search(r"pip install --no-deps \S*\.whl", ln)
        ]
        assert own, f"{target} does not install the tunebus wheel"
    assert not any("mlx" in cmd for cmd in pip_installs(stages, "base")), "base installs mlx"
    assert not any("mlx" in cmd for cmd in pip_installs(stages, "cuda")), "cuda installs mlx"
    # flash-attn (needs a compiler toolchain) and liger-kernel are opt-in (deploy/README.md).
    optional = [c for c in pip_installs(stages, "cuda") if re.search(r"(?i)flash|liger", c)]
    assert not optional, optional
    for path in ("pyproject.toml", "README.md", "contracts/", "shared/", "services/"):
        assert re.search(rf"^COPY\s.*\b{re.escape(path)}", text, flags=re.M), f"{path} not copied"


def test_ml_images_keep_model_caches_in_the_work_dir():
    stages = dockerfile_stages(DOCKERFILE.read_text())
    for target, extras in TARGET_EXTRAS.items():
        env = stage_env(stages, target)
        assert env.get("TUNEBUS_WORK_DIR") == WORK_DIR, f"{target}: {env.get('TUNEBUS_WORK_DIR')}"
        if extras:
            hf_home = env.get("HF_HOME", "")
            assert hf_home.startswith(f"{WORK_DIR}/"), f"{target}: HF_HOME={hf_home!r}"


def test_dockerfile_bakes_in_no_secrets():
    text = DOCKERFILE.read_text()
    declared = re.findall(r"(?im)^\s*(?:ENV|ARG)\s+(.*)$", re.sub(r"\\\n", " ", text))
    names = {tok.split("=")[0] for line in declared for tok in line.split()}
    secretish = sorted(n for n in names if re.search(r"SECRET|PASSWORD|ACCESS_KEY|TOKEN", n, re.I))
    assert not secretish, secretish


# ---------------------------------------------------------------------------------------------
# deploy/minio


def test_policies_are_valid_and_s3_only():
    policies = load_policies()
    assert set(policies) == set(SERVICES), f"policy files: {sorted(policies)}"
    known = set(BUCKETS.values())
    problems = []
    for name, policy in policies.items():
        if policy.get("Version") != "2012-10-17":
            problems.append(f"{name}: Version {policy.get('Version')!r}")
        statements = policy.get("Statement")
        if not isinstance(statements, list) or not statements:
            problems.append(f"{name}: no statements")
            continue
        for st in statements:
            extra = set(st) - {"Sid", "Effect", "Action", "Resource", "Condition"}
            if extra:
                problems.append(f"{name}: unexpected keys {sorted(extra)}")
            if st.get("Effect") not in {"Allow", "Deny"}:
                problems.append(f"{name}: Effect {st.get('Effect')!r}")
            actions, resources = as_list(st.get("Action", [])), as_list(st.get("Resource", []))
            if not actions or not resources:
                problems.append(f"{name}: statement without actions or resources")
            for action in actions:
                if not str(action).startswith("s3:") or "*" in str(action):
                    problems.append(f"{name}: action {action!r}")
            for resource in resources:
                m = ARN_RE.match(str(resource))
                if not m or m.group("bucket") not in known:
                    problems.append(f"{name}: resource {resource!r}")
                    continue
                for action in actions:
                    if action in BUCKET_ACTIONS and m.group("key"):
                        problems.append(f"{name}: {action} needs the bucket ARN, not {resource}")
                    if action in OBJECT_ACTIONS and not m.group("key"):
                        problems.append(f"{name}: {action} needs an object ARN, not {resource}")
                    if action not in BUCKET_ACTIONS | OBJECT_ACTIONS:
                        problems.append(f"{name}: unexpected action {action}")
    assert not problems, problems


@pytest.mark.parametrize("module", sorted(SERVICES))
def test_policy_grants_exactly_the_service_access(module):
    policy = json.loads((POLICY_DIR / f"{module}.json").read_text())
    want = SERVICES[module]
    assert buckets_with(policy, "s3:GetObject") == want["read"]
    assert buckets_with(policy, "s3:PutObject") == want["write"]
    # Listing goes with reading; multipart clean-up goes with writing.
    assert buckets_with(policy, "s3:ListBucket") == want.get("list", want["read"])
    assert buckets_with(policy, "s3:AbortMultipartUpload") == want["write"]
    deletes = {resource for action, resource in grants(policy) if "Delete" in action}
    # Only the trainer deletes, and only checkpoints (never an adapter's files).
    assert deletes == ({f"arn:aws:s3:::{BUCKETS['adapters']}/*/checkpoints/*"} if module == "trainer" else set())


def test_validator_reads_only_tokenizers_from_the_models_bucket():
    policy = json.loads((POLICY_DIR / "dataset_validator.json").read_text())
    models = {r for _, r in grants(policy) if r.startswith(f"arn:aws:s3:::{BUCKETS['models']}")}
    assert models == {f"arn:aws:s3:::{BUCKETS['models']}/*tokenizer.json"}


def test_registry_writes_only_gguf_copies_and_reads_only_model_configs():
    policy = json.loads((POLICY_DIR / "adapter_registry.json").read_text())
    actions = {action for action, _ in grants(policy)}
    assert "s3:DeleteObject" not in actions
    written = {resource for action, resource in grants(policy) if action == "s3:PutObject"}
    assert written == {f"arn:aws:s3:::{BUCKETS['adapters']}/*/gguf/*"}
    models = {r for _, r in grants(policy) if r.startswith(f"arn:aws:s3:::{BUCKETS['models']}")}
    assert models == {f"arn:aws:s3:::{BUCKETS['models']}/*/config.json"}


def test_validator_writes_only_under_jobs():
    policy = json.loads((POLICY_DIR / "dataset_validator.json").read_text())
    writes = {r for a, r in grants(policy) if a == "s3:PutObject"}
    assert writes == {f"arn:aws:s3:::{BUCKETS['datasets']}/jobs/*"}


def test_init_sh_references_every_policy_and_bucket():
    text = INIT_SH.read_text()
    for path in sorted(POLICY_DIR.glob("*.json")):
        assert path.name in text, f"init.sh does not load {path.name}"
    for bucket in BUCKETS.values():
        assert bucket in text, f"init.sh does not create {bucket}"
    # minio-init runs it with /bin/sh: no bashisms behind a bash shebang.
    assert text.startswith("#!/bin/sh\n")


def test_init_sh_users_match_compose_services(services):
    calls = provision_calls(INIT_SH.read_text())
    assert len(calls) == len(SERVICES), f"provision calls: {calls}"
    init_env = env_of(services["minio-init"])
    by_module: dict[str, dict[str, dict]] = {}
    for name, svc in app_services(services).items():
        by_module.setdefault(service_module(svc), {})[name] = svc
    problems = []
    for access_var, secret_var, policy_name, policy_file in calls:
        module = policy_file.removesuffix(".json")
        if module not in by_module:
            problems.append(f"{policy_file}: no compose service runs tunebus.services.{module}")
            continue
        # Every service of the module (both trainers) logs in as the user provisioned for it.
        for name, svc in by_module[module].items():
            svc_env = env_of(svc)
            if init_env.get(access_var) != svc_env.get("TUNEBUS_S3__ACCESS_KEY"):
                problems.append(f"{name}: minio-init {access_var} != the service's access key")
            if init_env.get(secret_var) != svc_env.get("TUNEBUS_S3__SECRET_KEY"):
                problems.append(f"{name}: minio-init {secret_var} != the service's secret key")
        if len(interpolate(init_env.get(secret_var, ""))) < 8:
            problems.append(f"{module}: MinIO secret keys need at least 8 characters")
    assert not problems, problems
    # minio-init must see the policies where init.sh looks for them.
    policy_dir = init_env.get("POLICY_DIR", "/policies")
    mounts = [str(v) for v in services["minio-init"].get("volumes") or []]
    assert any(
        (ROOT / m.split(":")[0]).resolve() == POLICY_DIR.resolve() and m.split(":")[1] == policy_dir
        or (ROOT / m.split(":")[0]).resolve() == MINIO_DIR.resolve()
        and f"{m.split(':')[1]}/policies" == policy_dir
        for m in mounts
    ), f"{POLICY_DIR} is not mounted at {policy_dir}: {mounts}"


STUB_MC = """#!/bin/sh
echo "$*" >> "$MC_LOG"
case "$*" in
  "admin policy attach"*) [ "$MC_ATTACH_FAILS" = 1 ] && exit 1 ;;
  "admin user info"*) [ "$MC_ATTACHED" = 1 ] && echo "PolicyName: $MC_POLICY_SEEN" ;;
esac
exit 0
"""


@pytest.mark.parametrize(
    ("attach_fails", "attached", "ok"),
    [(False, False, True), (True, True, True), (True, False, False)],
    ids=["fresh", "already-attached", "attach-error"],
)
def test_init_sh_runs_against_stub_mc(services, tmp_path, attach_fails, attached, ok):
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh")
    mc = tmp_path / "bin" / "mc"
    mc.parent.mkdir()
    mc.write_text(STUB_MC)
    mc.chmod(mc.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "mc.log"
    env = {k: interpolate(v) for k, v in env_of(services["minio-init"]).items()}
    env.update(
        PATH=f"{mc.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        POLICY_DIR=str(POLICY_DIR),
        MC_LOG=str(log),
        MC_ATTACH_FAILS="1" if attach_fails else "0",
        MC_ATTACHED="1" if attached else "0",
        # The stub's `user info` names every policy (good enough for a containment check).
        MC_POLICY_SEEN=" ".join(p for *_, p, _f in provision_calls(INIT_SH.read_text())),
    )
    result = subprocess.run([sh, str(INIT_SH)], env=env, capture_output=True, text=True, timeout=60)
    if not ok:
        assert result.returncode != 0
        return
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    for bucket in BUCKETS.values():
        assert any(c.startswith("mb ") and c.endswith(f"/{bucket}") for c in calls), bucket
    for name, svc in app_services(services).items():
        svc_env = {k: interpolate(v) for k, v in env_of(svc).items()}
        user, secret = svc_env["TUNEBUS_S3__ACCESS_KEY"], svc_env["TUNEBUS_S3__SECRET_KEY"]
        added = [c for c in calls if c.startswith("admin user add ")]
        assert any(c.endswith(f" {user} {secret}") for c in added), name
        policy_file = str(POLICY_DIR / f"{service_module(svc)}.json")
        created = [
            c for c in calls if c.startswith("admin policy create ") and c.endswith(policy_file)
        ]
        assert len(created) == 1, f"{name}: policy {policy_file} not loaded"
        policy = created[0].split()[-2]
        assert any(
            c.startswith("admin policy attach ") and f" {policy} --user {user}" in c for c in calls
        ), f"{name}: {policy} not attached to {user}"
    assert not any(env["MINIO_ROOT_PASSWORD"] in line for line in result.stdout.splitlines())


# ---------------------------------------------------------------------------------------------
# NATS identities (deploy/nats/nats.conf, generated from shared/identities.py)

NATS_CONF = ROOT / "deploy" / "nats" / "nats.conf"


def test_deploy_files_are_what_identities_says(tmp_path):
    """deploy/nats/nats.conf and every MinIO policy are generated from shared/identities.py:
    `python -m tunebus.shared.identities` rewrites them."""
    from tunebus.shared.identities import write_deploy_files

    for path in write_deploy_files(tmp_path):
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run python -m tunebus.shared.identities"
        assert committed.read_text() == path.read_text(), f"{committed} differs from identities.py"


def test_nats_mounts_the_config_and_gets_every_role_password(services):
    from tunebus.shared.identities import ROLES, password_env

    nats = services["nats"]
    command = as_list(nats["command"])
    assert command[:2] == ["-c", "/etc/nats/nats.conf"], command
    assert any(str(v).startswith("./deploy/nats/nats.conf:/etc/nats/nats.conf") for v in nats["volumes"])
    env = env_of(nats)
    for role in ROLES:
        assert interpolate(env.get(password_env(role), "")), f"nats has no password for {role}"
    assert "$NATS_ADMIN_PASSWORD" in NATS_CONF.read_text()


def test_each_service_logs_in_to_nats_as_its_own_role(services):
    nats_env = env_of(services["nats"])
    for name, svc in app_services(services).items():
        env = env_of(svc)
        role = service_module(svc).replace("_", "-")
        assert env.get("TUNEBUS_NATS__USER") == role, name
        from tunebus.shared.identities import password_env

        assert env.get("TUNEBUS_NATS__PASSWORD") == nats_env[password_env(role)], name
    init = env_of(services["nats-init"])
    assert init["TUNEBUS_NATS__USER"] == "admin"
    assert as_list(services["nats-init"]["command"]) == ["tunebus", "bootstrap"]
