"""Who may do what on the bus and in the store: one identity per service and per client role.

Each role is a NATS user with publish/subscribe allow-lists (the server enforces them: an
anonymous connection is refused, a forbidden publish or subscribe gets a permissions error) and
an S3 user with a least-privilege policy. This module is the one place that names them; the
embedded stack renders its nats-server configuration from it, and `python -m
tunebus.shared.identities` writes the files compose and Kubernetes mount (`deploy/nats/nats.conf`,
`deploy/minio/policies/*.json`, their copies under `deploy/k8s/`), which a test keeps equal to
what this module says.

Why plain users with permissions, not accounts/nkeys/JWT: all of tunebus lives in one account
(its streams and KV buckets are shared by every role), so accounts would add imports and exports
without separating anything; users with passwords are what nats-py, FastStream, `nats` CLI and
every other client take without extra tooling, and a rotation is a config reload. A deployment
that already runs an operator/JWT setup can give each role a `.creds` file instead
(`TUNEBUS_NATS__CREDS_FILE`) with the same permissions.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import yaml

from tunebus.contracts import TrainingRequested
from tunebus.contracts.inference import MAX_TOKENS_LIMIT
from tunebus.contracts import subjects as s

from .jobs import CANCEL, Stage
from .replay import is_event_subject

EVENTS = s.EVENTS_STREAM
DEAD = s.DEAD_LETTER_STREAM
ADVISORIES = s.ADVISORY_STREAM
JOBS_KV = f"KV_{s.JOBS_BUCKET}"
REGISTRY_KV = f"KV_{s.REGISTRY_BUCKET}"
JOB_EVENTS_KV = f"KV_{s.JOB_EVENTS_BUCKET}"
# The trainer's durable consumers, one per backend a request may name (services/trainer/app.py).
TRAINER_BACKENDS = tuple(b for b in get_args(TrainingRequested.model_fields["backend"].annotation)
                         if b != "auto")


# How long a streaming service may keep answering one request (the evaluator's
# inference.timeout_s is at most as long).
REPLY_WINDOW = "10m"


@dataclass(frozen=True)
class Role:
    name: str
    summary: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    # May answer requests it received (request/reply services, $SRV discovery, KV watchers).
    responds: bool = False
    # The S3 policy statements of the role's S3 user: (sid, actions, resources).
    s3: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = ()
    service: bool = False
    # A role that streams answers sends several messages to one reply subject: at most this
    # many per request, within REPLY_WINDOW (0: one reply per request).
    replies_per_request: int = 0

    @property
    def allow_responses(self) -> bool | dict:
        """nats-server's `allow_responses` for the role: replies only to whoever asked."""
        if not self.responds:
            return False
        if self.replies_per_request:
            return {"max": self.replies_per_request, "expires": REPLY_WINDOW}
        return True

    @property
    def inbox_prefix(self) -> str:
        """Replies to this identity arrive under its own inbox prefix, which no other role may
        subscribe to: a presigned link in a registry reply is readable by its requester only."""
        return f"_INBOX.{self.name}"


def _bucket(name: str) -> str:
    return f"arn:aws:s3:::{name}"


def _objects(name: str, pattern: str = "*") -> str:
    return f"arn:aws:s3:::{name}/{pattern}"


DATASETS, MODELS, ADAPTERS = "tunebus-datasets", "tunebus-models", "tunebus-adapters"
_WRITE = ("s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts")
_LIST = ("s3:GetBucketLocation", "s3:ListBucket")


def _durable(stream: str, durable: str) -> tuple[str, ...]:
    """What a worker needs to run one durable pull consumer and acknowledge its messages."""
    return (
        f"$JS.API.CONSUMER.CREATE.{stream}.{durable}",
        f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
        f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
    )


def _kv_read(stream: str) -> tuple[str, ...]:
    return (f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>", f"$JS.API.STREAM.MSG.GET.{stream}")


def _kv_watch(stream: str) -> tuple[str, ...]:
    """An ephemeral ordered consumer on a bucket's stream (a KV watch), and its cleanup."""
    return (f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.API.CONSUMER.CREATE.{stream}.>",
            f"$JS.API.CONSUMER.INFO.{stream}.>", f"$JS.API.CONSUMER.DELETE.{stream}.>", "$JS.FC.>")


def _job_event(subject: str) -> str:
    """The job-events bucket's keys for one kind of event, of any job (`<job_id>.<kind>`)."""
    return f"$KV.{s.JOB_EVENTS_BUCKET}.*.{subject.removeprefix(s.PREFIX + '.')}"


def _service(name: str, *, events: tuple[str, ...], durables: tuple[str, ...],
             job_keys: tuple[str, ...], requests: tuple[str, ...] = (),
             extra_publish: tuple[str, ...] = (), records: tuple[str, ...] = (), s3=(),
             replies_per_request: int = 0) -> Role:
    """A tunebus service: it consumes its durables, publishes its own events and dead letters,
    claims its stages in the jobs bucket, keeps the latest of its events per job in the
    job-events bucket (and of `records`, events it consumes first), and answers discovery and
    status requests."""
    publish = (
        "$JS.API.INFO",
        f"$JS.API.STREAM.INFO.{EVENTS}", f"$JS.API.STREAM.INFO.{DEAD}",
        f"$JS.API.STREAM.INFO.{ADVISORIES}",
        *(d for durable in durables for d in _durable(EVENTS, durable)),
        # JetStream's MAX_DELIVERIES advisories, kept in a stream: one durable per service.
        *_durable(ADVISORIES, f"{name}-advisories"),
        *events,
        s.dead_letter(name),
        *_kv_read(JOBS_KV),
        *(f"$KV.{s.JOBS_BUCKET}.{key}.>" for key in job_keys),
        f"$JS.API.STREAM.INFO.{JOB_EVENTS_KV}",
        *(_job_event(subject) for subject in (*records, *events, s.dead_letter(name))),
        # A message JetStream gave up delivering is read back by sequence, to dead-letter it.
        f"$JS.API.STREAM.MSG.GET.{EVENTS}", f"$JS.API.DIRECT.GET.{EVENTS}",
        f"$JS.API.DIRECT.GET.{EVENTS}.>",
        # A replay request names a dead letter; the service reads it itself (shared/replay.py).
        f"$JS.API.STREAM.MSG.GET.{DEAD}",
        # Asks its own instances who is up (a container's health probe, shared/probe.py; the
        # trainer's routing asks the same).
        f"$SRV.INFO.{name}",
        *extra_publish,
    )
    subscribe = (
        f"_INBOX.{name}.>",
        # NATS service discovery ($SRV.PING, $SRV.INFO.<name>, $SRV.STATS.<name>.<id>, …)
        "$SRV.PING", "$SRV.INFO", "$SRV.STATS",
        f"$SRV.*.{name}", f"$SRV.*.{name}.>",
        s.status(name),
        s.replay(name),
        *requests,
    )
    return Role(name, f"the {name} service", publish, subscribe, responds=True, s3=s3, service=True,
                replies_per_request=replies_per_request)


_EVENT_SUBJECTS = tuple(s.EVENTS_STREAM_SUBJECTS) + tuple(s.DEAD_LETTER_STREAM_SUBJECTS)
_READ_EVENTS = (
    # A job's latest events at a glance (tunebus status, jobs list): the job-events bucket.
    *_kv_read(JOB_EVENTS_KV), f"$JS.API.CONSUMER.CREATE.{JOB_EVENTS_KV}",
    # Following jobs through JetStream: ephemeral ordered consumers only (no durable of its own,
    # no name: it can neither take over nor delete a service's consumer).
    "$JS.API.INFO",
    f"$JS.API.STREAM.INFO.{EVENTS}", f"$JS.API.STREAM.INFO.{DEAD}",
    f"$JS.API.CONSUMER.CREATE.{EVENTS}", f"$JS.API.CONSUMER.CREATE.{DEAD}",
    "$JS.FC.>",
    # How far each service's consumer is (read only).
    f"$JS.API.CONSUMER.INFO.{EVENTS}.*",
)
_DISCOVERY = ("$SRV.PING", "$SRV.PING.>", "$SRV.INFO", "$SRV.INFO.>", "$SRV.STATS", "$SRV.STATS.>",
              f"{s.STATUS}.*")
_REGISTRY_READ = (s.REGISTRY_LIST, s.REGISTRY_GET, s.REGISTRY_RESOLVE, s.REGISTRY_DOWNLOAD_URL)
_REGISTRY_ADMIN = (s.REGISTRY_PROMOTE, s.REGISTRY_ROLLBACK, s.REGISTRY_DELETE)
_SUBMIT = (s.TRAINING_REQUESTED, s.VALIDATOR_VALIDATE, s.TRAINER_CANCEL)
# Generation spends the evaluator's GPU (and can crowd out evaluations), so it is a submitter's
# right, not an observer's; what is loaded is only read, and observers may read it.
_INFERENCE_READ = (s.INFERENCE_ADAPTERS,)
_INFERENCE = (s.INFERENCE_GENERATE, s.INFERENCE_ADAPTERS, s.INFERENCE_LOAD, s.INFERENCE_UNLOAD)


def _client(name: str, summary: str, publish: tuple[str, ...], s3=()) -> Role:
    return Role(name, summary, (*_READ_EVENTS, *_DISCOVERY, *publish),
                (f"_INBOX.{name}.>", *_EVENT_SUBJECTS), s3=s3)


ROLES: dict[str, Role] = {role.name: role for role in (
    _service(
        "dataset-validator",
        events=(s.DATASET_VALIDATED, s.DATASET_REJECTED, s.TRAINING_REFUSED),
        records=(s.TRAINING_REQUESTED,),
        durables=("dataset-validator",),
        job_keys=(Stage.VALIDATE,),
        requests=(s.VALIDATOR_VALIDATE,),
        s3=(("ListDatasetsBucket", _LIST, (_bucket(DATASETS),)),
            ("ReadDatasets", ("s3:GetObject",), (_objects(DATASETS),)),
            ("WriteNormalisedDatasets", _WRITE, (_objects(DATASETS, "jobs/*"),)),
            # The base model's tokenizer.json, to count tokens (nothing else is read there).
            ("ReadModelTokenizers", ("s3:GetObject",), (_objects(MODELS, "*tokenizer.json"),))),
    ),
    _service(
        "trainer",
        events=(s.TRAINING_STARTED, s.TRAINING_PROGRESS, s.TRAINING_COMPLETED,
                s.TRAINING_FAILED, s.TRAINING_CANCELLED),
        durables=tuple(f"trainer-{backend}" for backend in TRAINER_BACKENDS),
        job_keys=(Stage.TRAIN, CANCEL),
        requests=(s.TRAINER_CANCEL,),
        # Cancel watches its job's key; init_from resolves an adapter ref with the registry.
        extra_publish=(*_kv_watch(JOBS_KV), s.REGISTRY_RESOLVE),
        s3=(("ListBuckets", _LIST, (_bucket(MODELS), _bucket(DATASETS), _bucket(ADAPTERS))),
            ("ReadModelsDatasetsAndOwnCheckpoints", ("s3:GetObject",),
             (_objects(MODELS), _objects(DATASETS), _objects(ADAPTERS))),
            ("WriteAdapters", _WRITE, (_objects(ADAPTERS),)),
            ("PruneOldCheckpoints", ("s3:DeleteObject",), (_objects(ADAPTERS, "*/checkpoints/*"),))),
    ),
    _service(
        "evaluator",
        events=(s.EVALUATION_COMPLETED, s.EVALUATION_FAILED),
        durables=("evaluator",),
        job_keys=(Stage.EVALUATE,),
        # It serves generation too: resolves adapter refs with the registry, and streams each
        # answer as up to MAX_TOKENS_LIMIT chunks and the final reply.
        requests=_INFERENCE,
        extra_publish=(s.REGISTRY_RESOLVE,),
        replies_per_request=MAX_TOKENS_LIMIT + 1,
        s3=(("ListBuckets", _LIST, (_bucket(MODELS), _bucket(DATASETS), _bucket(ADAPTERS))),
            ("ReadModelsDatasetsAdapters", ("s3:GetObject",),
             (_objects(MODELS), _objects(DATASETS), _objects(ADAPTERS))),
            ("WriteEvaluationReports", _WRITE, (_objects(ADAPTERS),))),
    ),
    _service(
        "adapter-registry",
        events=(s.ADAPTER_REGISTERED,),
        durables=("adapter-registry-training", "adapter-registry-evaluation",
                  "adapter-registry-evaluation-failed"),
        job_keys=(),
        requests=tuple(f"{subject}" for subject in (*_REGISTRY_READ, *_REGISTRY_ADMIN)),
        extra_publish=(*_kv_read(REGISTRY_KV), f"$KV.{s.REGISTRY_BUCKET}.>"),
        s3=(("ListAdaptersBucket", _LIST, (_bucket(ADAPTERS),)),
            ("ReadAdapters", ("s3:GetObject",), (_objects(ADAPTERS),)),
            # The GGUF copy of each adapter it registers, named by the base model's config.
            ("WriteGgufCopies", _WRITE, (_objects(ADAPTERS, "*/gguf/*"),)),
            ("ReadModelConfigs", ("s3:GetObject",), (_objects(MODELS, "*/config.json"),))),
    ),
    _client("observer", "reads events, dead letters, service status and the registry",
            (*_REGISTRY_READ, *_INFERENCE_READ),
            s3=(("ReadAdapters", ("s3:GetObject",), (_objects(ADAPTERS),)),
                ("ListAdaptersBucket", _LIST, (_bucket(ADAPTERS),)))),
    _client("submitter", "an observer that also submits, validates and cancels jobs",
            (*_REGISTRY_READ, *_SUBMIT, *_INFERENCE),
            s3=(("UploadDatasets", _WRITE, (_objects(DATASETS, "uploads/*"),)),
                ("ReadAdapters", ("s3:GetObject",), (_objects(ADAPTERS),)),
                ("ListAdaptersBucket", _LIST, (_bucket(ADAPTERS),)))),
    _client("operator", "a submitter that also promotes, rolls back and deletes versions and "
            "replays dead letters", (*_REGISTRY_READ, *_SUBMIT, *_REGISTRY_ADMIN, *_INFERENCE,
                                     f"{s.REPLAY}.*"),
            s3=(("UploadDatasets", _WRITE, (_objects(DATASETS, "uploads/*"),)),
                ("UploadModels", _WRITE, (_objects(MODELS),)),
                ("ReadAdapters", ("s3:GetObject",), (_objects(ADAPTERS),)),
                ("ListBuckets", _LIST, (_bucket(ADAPTERS), _bucket(MODELS))))),
    # Declares the streams and buckets (the bootstrap) and nothing else uses it.
    Role("admin", "declares streams and key-value buckets; maintenance only", (">",), (">",),
         responds=True),
)}
SERVICE_ROLES = tuple(name for name, role in ROLES.items() if role.service)
CLIENT_ROLES = ("observer", "submitter", "operator")


def publisher_of(subject: str) -> str | None:
    """The service whose identity publishes `subject`, the one that replays its dead letters
    (shared/replay.py); None for a subject only clients publish (`training.requested`)."""
    return next((name for name in SERVICE_ROLES if subject in ROLES[name].publish), None)


def published_events(service: str) -> frozenset[str]:
    """The events-stream subjects `service` publishes: those it may replay (none for a service
    with no role here, such as one a test or an extension runs)."""
    role = ROLES.get(service)
    return frozenset(p for p in role.publish if is_event_subject(p)) if role else frozenset()


def s3_policy(role: Role) -> dict:
    """The role's S3 policy document (MinIO and AWS IAM read the same JSON)."""
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": sid, "Effect": "Allow", "Action": list(actions), "Resource": list(resources)}
        for sid, actions, resources in role.s3
    ]}


@dataclass
class Credentials:
    """A role's password per user, generated for the embedded stack."""

    passwords: dict[str, str] = field(default_factory=dict)

    @classmethod
    def generate(cls) -> Credentials:
        return cls({name: secrets.token_urlsafe(24) for name in ROLES})


def nats_config(passwords: dict[str, str] | None, *, listen: str = "0.0.0.0:4222",
                http: str | None = "0.0.0.0:8222", store_dir: str = "/data",
                sync_interval: str | None = None, server_name: str | None = None,
                cluster_listen: str | None = None, routes: list[str] = ()) -> str:
    """A nats-server configuration with JetStream and one user per role.

    `passwords` None writes environment references instead (`$NATS_TRAINER_PASSWORD`),
    which nats-server resolves when it starts: what compose mounts."""
    lines = [
        "# Generated by `python -m tunebus.shared.identities` from shared/identities.py: edit that.",
        f"listen: {json.dumps(listen)}",
    ]
    if http:
        lines.append(f"http: {json.dumps(http)}")
    if server_name:
        lines.append(f"server_name: {json.dumps(server_name)}")
    if cluster_listen:
        # A JetStream cluster: streams and buckets replicated over its routes (Raft).
        lines += ["cluster {", '  name: "tunebus"', f"  listen: {json.dumps(cluster_listen)}",
                  f"  routes: {_list(tuple(routes))}", "}"]
    jetstream = [f"store_dir: {json.dumps(store_dir)}"]
    if sync_interval:
        lines += [
            "",
            "# Durability: with `sync_interval: always` JetStream fsyncs every write before it",
            "# acknowledges it. The server's default (sync every 2 minutes) can lose acknowledged",
            "# publishes on power loss or a kernel crash (the Jepsen analysis of NATS 2.12.1); a",
            "# process crash alone loses nothing either way. benchmarks/durability.py measures the",
            "# cost; tunebus publishes a few events per job per second and pays it gladly.",
        ]
        jetstream.append(f"sync_interval: {sync_interval}")
    lines += ["jetstream {", *(f"  {line}" for line in jetstream), "}", "",
              "# No anonymous connections: every client is one of these users.",
              "authorization {", "  users = ["]
    for role in ROLES.values():
        password = json.dumps(passwords[role.name]) if passwords else f"${password_env(role.name)}"
        lines += [
            f"    # {role.name}: {role.summary}",
            "    {",
            f"      user: {json.dumps(role.name)}",
            f"      password: {password}",
            "      permissions: {",
            f"        publish: {{ allow: {_list(role.publish)} }}",
            f"        subscribe: {{ allow: {_list(role.subscribe)} }}",
        ]
        if allow := role.allow_responses:
            lines.append(f"        allow_responses: {_responses(allow)}")
        lines += ["      }", "    }"]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


# The NATS cluster of the Kubernetes deployment (deploy/k8s/nats.yaml): a StatefulSet `nats` of
# this many servers; three keep a JetStream quorum through the loss of one.
CLUSTER_SIZE = 3
ROUTE_PASSWORD_ENV = "NATS_ROUTE_PASSWORD"


def cluster_nats_config(size: int = CLUSTER_SIZE) -> str:
    """The configuration of one server of a `size`-server JetStream cluster (deploy/k8s/): the
    users and permissions of `nats_config`, plus a name per server (its pod's), routes to every
    server, authenticated with a route password (anything else that dials 6222 is refused), and
    lame-duck mode so a stopping server hands its clients over before it goes.

    nats-server substitutes only whole values, so each route URL, with the route password in it,
    is one variable (`NATS_ROUTE_0`...), which the StatefulSet builds from the pods' DNS names."""
    routes = ", ".join(f"${route_env(i)}" for i in range(size))
    return nats_config(None, sync_interval="always") + "\n".join([
        "",
        "# One server of the StatefulSet `nats` (deploy/k8s/nats.yaml).",
        "server_name: $POD_NAME",
        'pid_file: "/var/run/nats/nats.pid"',
        # Below the pod's terminationGracePeriodSeconds (60 s in deploy/k8s/nats.yaml).
        'lame_duck_duration: "30s"',
        'lame_duck_grace_period: "10s"',
        "cluster {",
        '  name: "tunebus"',
        '  listen: "0.0.0.0:6222"',
        "  authorization {",
        '    user: "route"',
        f"    password: ${ROUTE_PASSWORD_ENV}",
        "  }",
        f"  routes = [{routes}]",
        "}",
        "",
    ])


def helm_nats_values(size: int = CLUSTER_SIZE) -> dict:
    """Values for the official NATS Helm chart (nats-io/k8s, chart 1.x) that make the cluster of
    deploy/k8s/nats.yaml: the same users and permissions (passwords from the same Secrets, as the
    chart's `<< $VAR >>` variables), JetStream on a volume per server, authenticated routes built
    from the route password the way the chart's maintainers suggest (nats-io/k8s discussion 833)."""
    def user(role: Role) -> dict:
        permissions: dict = {"publish": {"allow": list(role.publish)},
                             "subscribe": {"allow": list(role.subscribe)}}
        if allow := role.allow_responses:
            permissions["allow_responses"] = allow
        return {"user": role.name, "password": f"<< ${password_env(role.name)} >>",
                "permissions": permissions}

    def secret(name: str, key: str) -> dict:
        return {"valueFrom": {"secretKeyRef": {"name": name, "key": key}}}

    env = {password_env(name): secret(f"tunebus-{name}", "nats-password") for name in ROLES}
    env[ROUTE_PASSWORD_ENV] = secret("tunebus-nats-route", "password")
    return {
        "config": {
            "cluster": {
                "enabled": True,
                "replicas": size,
                "routeURLs": {"user": "route", "password": f"<< ${ROUTE_PASSWORD_ENV} >>"},
                "merge": {"routes": {"$tplYaml": (
                    "{{- range $i, $_ := until (int $.Values.config.cluster.replicas) }}\n"
                    "- << $ROUTE_URL_{{ $i }} >>\n{{- end }}\n")}},
            },
            "jetstream": {"enabled": True, "fileStore": {"pvc": {"size": "10Gi"}}},
            "merge": {"authorization": {"users": [user(role) for role in ROLES.values()]}},
        },
        # Kubernetes expands $(NATS_ROUTE_PASSWORD) only in variables listed after it, and the
        # chart lists them by name: ROUTE_URL_<i> sorts after NATS_*.
        "container": {"env": {
            **env,
            "ROUTES": {"$tplYamlSpread": (
                "{{- range $i, $_ := until (int $.Values.config.cluster.replicas) }}\n"
                "ROUTE_URL_{{ $i }}: {{ printf \"nats://route:$(NATS_ROUTE_PASSWORD)@%s-%d.%s:6222\" "
                "$.Values.statefulSet.name $i $.Values.headlessService.name }}\n{{- end }}\n")},
        }},
        "podDisruptionBudget": {"enabled": True},
        # tunebus's own init Job and clients take the place of nats-box.
        "natsBox": {"enabled": False},
    }


def route_env(index: int) -> str:
    """The variable holding the route URL of server `index` (nats-<index>)."""
    return f"NATS_ROUTE_{index}"


def password_env(role: str) -> str:
    """The variable nats-server reads a role's password from (compose sets it)."""
    return f"NATS_{role.upper().replace('-', '_')}_PASSWORD"


def _yaml(data: dict) -> str:
    """YAML with multi-line strings (the chart's templates) as literal blocks."""
    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value: str):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, width=200)


def _responses(allow: bool | dict) -> str:
    if allow is True:
        return "true"
    return "{ " + ", ".join(f"{key}: {json.dumps(value)}" for key, value in allow.items()) + " }"


def _list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(json.dumps(item) for item in items) + "]"


def write_deploy_files(root: Path) -> list[Path]:
    """What compose and Kubernetes mount: the NATS configuration (one server; a cluster in
    deploy/k8s/) and the MinIO policies of every role (the services' also in deploy/k8s/minio/,
    since kustomize reads no file outside its directory)."""
    written = []
    helm = ("# Generated by `python -m tunebus.shared.identities` from shared/identities.py: edit that.\n"
            "# Values for the official NATS Helm chart instead of deploy/k8s/nats.yaml (README.md there);\n"
            "# not rendered in CI (no helm binary).\n" + _yaml(helm_nats_values()))
    for path, text in ((root / "deploy" / "nats" / "nats.conf", nats_config(None, sync_interval="always")),
                       (root / "deploy" / "k8s" / "nats" / "nats.conf", cluster_nats_config()),
                       (root / "deploy" / "k8s" / "helm" / "nats-values.yaml", helm)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    for name, role in ROLES.items():
        if not role.s3:
            continue
        folder = "policies" if role.service else "client-policies"
        path = root / "deploy" / "minio" / folder / f"{name.replace('-', '_')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(s3_policy(role), indent=2) + "\n")
        written.append(path)
        if role.service:
            k8s = root / "deploy" / "k8s" / "minio" / path.name
            k8s.parent.mkdir(parents=True, exist_ok=True)
            k8s.write_text(path.read_text())
            written.append(k8s)
    return written


if __name__ == "__main__":
    for path in write_deploy_files(Path.cwd()):
        print(path)
