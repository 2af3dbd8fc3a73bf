"""Static checks of the Docker Compose deployment (compose.yaml, deploy/Dockerfile, deploy/minio/).

No Docker needed: the files are parsed with pyyaml/json and checked against each other and against
`tunebus.shared.settings`. One test runs deploy/minio/init.sh with a stub `mc` (needs `sh` only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from tunebus.shared.settings import S3Settings, Settings

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

# The service modules (`python -m tunebus.services.<module>`), their image target and S3 access.
# "read" = s3:GetObject on the bucket's objects, "write" = s3:PutObject.
SERVICES = {
    "dataset_validator": {"target": "base", "read": {"datasets"}, "write": {"datasets"}},
    # The trainer reads its own checkpoints back (resume) and prunes old ones.
    "trainer": {"target": "ml", "read": {"models", "datasets", "adapters"}, "write": {"adapters"}},
    "evaluator": {
        "target": "ml",
        "read": {"models", "datasets", "adapters"},
        "write": {"adapters"},
    },
    "adapter_registry": {"target": "base", "read": {"adapters"}, "write": set()},
}

BUCKET_ACTIONS = {"s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"}
OBJECT_ACTIONS = {
    "s3:GetObject",
    "s3:DeleteObject",  # the trainer's checkpoint pruning only (see test_policy_grants_exactly_the_services_access)
    "s3:PutObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
}
REGISTRY_ACTIONS = {"s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"}
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
    modules = sorted(service_module(s) for s in app_services(compose["services"]).values())
    assert modules == sorted(SERVICES), f"one compose service per tunebus module, got {modules}"


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
        elif build.get("target") != SERVICES[module]["target"]:
            want = SERVICES[module]["target"]
            problems.append(f"{name}: target {build.get('target')!r}, want {want!r}")
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
    for name, svc in app_services(services).items():
        assert condition(svc, "nats") == "service_healthy", name
        assert condition(svc, "minio-init") == "service_completed_successfully", name


def test_infrastructure_services(services):
    nats, minio, init = services["nats"], services["minio"], services["minio-init"]
    nats_cmd = " ".join(as_list(nats.get("command", [])))
    assert "-js" in nats_cmd.split() and "-sd /data" in nats_cmd, nats_cmd
    assert "8222/healthz" in " ".join(as_list(nats["healthcheck"]["test"]))
    assert "server /data" in " ".join(as_list(minio.get("command", [])))
    assert "--console-address :9001" in " ".join(as_list(minio.get("command", [])))
    assert "healthcheck" in minio
    init_cmd = as_list(init.get("entrypoint", [])) + as_list(init.get("command", []))
    assert any("init.sh" in str(x) for x in init_cmd), init_cmd


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


def test_service_credentials_differ_from_root_and_each_other(services):
    root_env = env_of(services["minio"])
    root_raw = {root_env["MINIO_ROOT_USER"], root_env["MINIO_ROOT_PASSWORD"]}
    root = {interpolate(v) for v in root_raw}
    root_vars = set().union(*(referenced_vars(v) for v in root_raw))
    assert all(root), "MinIO root credentials resolve to nothing"
    seen: dict[str, str] = {}
    problems = []
    for name, svc in app_services(services).items():
        env = env_of(svc)
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
            if value in seen:
                problems.append(f"{name}: {key} shared with {seen[value]}")
            seen[value] = name
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


# ---------------------------------------------------------------------------------------------
# deploy/Dockerfile


def test_dockerfile_targets_and_base_image():
    stages = dockerfile_stages(DOCKERFILE.read_text())
    assert {"base", "ml"} <= set(stages), f"stages: {sorted(stages)}"
    external = {s["image"] for s in stages.values() if s["parent"] is None}
    assert external, "no base image"
    for image in external:
        assert image.startswith("python:3.11-slim"), image


def test_dockerfile_targets_run_as_non_root():
    stages = dockerfile_stages(DOCKERFILE.read_text())
    for target in ("base", "ml"):
        user = last_user(stages, target)
        assert user and user.split(":")[0] not in {"root", "0"}, f"{target} runs as {user!r}"


def test_dockerfile_installs_the_right_extras():
    text = DOCKERFILE.read_text()
    stages = dockerfile_stages(text)

    def chain(name):
        while name is not None:
            yield from stages[name]["lines"]
            name = stages[name]["parent"]

    def pip_installs(name):
        return [
            m.group(0)
            for line in chain(name)
            if line.upper().startswith("RUN ")
            for m in re.finditer(r"pip install[^&;|]*", line)
        ]

    assert any("mlx" in cmd for cmd in pip_installs("ml")), "ml does not install the mlx extra"
    assert not any("mlx" in cmd for cmd in pip_installs("base")), "base installs mlx"
    assert pip_installs("base"), "base installs nothing"
    for path in ("pyproject.toml", "README.md", "contracts/", "shared/", "services/"):
        assert re.search(rf"^COPY\s.*\b{re.escape(path)}", text, flags=re.M), f"{path} not copied"


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
    assert buckets_with(policy, "s3:ListBucket") == want["read"]
    assert buckets_with(policy, "s3:AbortMultipartUpload") == want["write"]
    deletes = {resource for action, resource in grants(policy) if "Delete" in action}
    # Only the trainer deletes, and only checkpoints (never an adapter's files).
    assert deletes == ({f"arn:aws:s3:::{BUCKETS['adapters']}/*/checkpoints/*"} if module == "trainer" else set())


def test_registry_policy_is_read_only():
    policy = json.loads((POLICY_DIR / "adapter_registry.json").read_text())
    actions = {action for action, _ in grants(policy)}
    assert actions <= REGISTRY_ACTIONS, sorted(actions - REGISTRY_ACTIONS)
    assert "s3:PutObject" not in actions and "s3:DeleteObject" not in actions
    resources = {resource for _, resource in grants(policy)}
    assert all(ARN_RE.match(r).group("bucket") == BUCKETS["adapters"] for r in resources)


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
    by_module = {service_module(s): s for s in app_services(services).values()}
    problems = []
    for access_var, secret_var, policy_name, policy_file in calls:
        module = policy_file.removesuffix(".json")
        if module not in by_module:
            problems.append(f"{policy_file}: no compose service runs tunebus.services.{module}")
            continue
        svc_env = env_of(by_module[module])
        if init_env.get(access_var) != svc_env.get("TUNEBUS_S3__ACCESS_KEY"):
            problems.append(f"{module}: minio-init {access_var} != the service's access key")
        if init_env.get(secret_var) != svc_env.get("TUNEBUS_S3__SECRET_KEY"):
            problems.append(f"{module}: minio-init {secret_var} != the service's secret key")
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
