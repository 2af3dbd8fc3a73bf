"""Every NATS subject and JetStream stream that tunebus uses, in one place.

Subjects carry the contract's major version (`tunebus.v1.…`); a breaking change to a payload
gets a new `v2` subject and a new CloudEvents type, and both versions run side by side.
"""

from __future__ import annotations

PREFIX = "tunebus.v1"

# Events: persisted in the EVENTS stream, consumed by durable consumers.
TRAINING_REQUESTED = f"{PREFIX}.training.requested"
TRAINING_REFUSED = f"{PREFIX}.training.refused"
DATASET_VALIDATED = f"{PREFIX}.dataset.validated"
DATASET_REJECTED = f"{PREFIX}.dataset.rejected"
TRAINING_STARTED = f"{PREFIX}.training.started"
TRAINING_PROGRESS = f"{PREFIX}.training.progress"
TRAINING_COMPLETED = f"{PREFIX}.training.completed"
TRAINING_FAILED = f"{PREFIX}.training.failed"
TRAINING_CANCELLED = f"{PREFIX}.training.cancelled"
EVALUATION_COMPLETED = f"{PREFIX}.evaluation.completed"
EVALUATION_FAILED = f"{PREFIX}.evaluation.failed"
ADAPTER_REGISTERED = f"{PREFIX}.adapter.registered"

# Messages no consumer could accept, with the reason; kept in their own stream.
DEAD_LETTER = f"{PREFIX}.deadletter"  # + ".<service>"


def dead_letter(service: str) -> str:
    return f"{DEAD_LETTER}.{service}"


# Request/reply (core NATS, not persisted: a stream must never capture these subjects,
# or JetStream would answer the request with a publish acknowledgement).
REGISTRY_LIST = f"{PREFIX}.registry.list"
REGISTRY_GET = f"{PREFIX}.registry.get"
REGISTRY_DOWNLOAD_URL = f"{PREFIX}.registry.download-url"
REGISTRY_RESOLVE = f"{PREFIX}.registry.resolve"
REGISTRY_PROMOTE = f"{PREFIX}.registry.promote"
REGISTRY_ROLLBACK = f"{PREFIX}.registry.rollback"
REGISTRY_DELETE = f"{PREFIX}.registry.delete"
VALIDATOR_VALIDATE = f"{PREFIX}.validator.validate"
STATUS = f"{PREFIX}.status"  # + ".<service>": every instance answers with what it is doing


def status(service: str) -> str:
    return f"{STATUS}.{service}"

TRAINER_CANCEL = f"{PREFIX}.trainer.cancel"
# + ".<service>": publish a dead letter's body again on its original subject, answered by the
# service that publishes that subject (operators only; README, Security).
REPLAY = f"{PREFIX}.replay"


def replay(service: str) -> str:
    return f"{REPLAY}.{service}"

# Generation with adapters (the evaluator answers): contracts/inference.py.
INFERENCE_GENERATE = f"{PREFIX}.inference.generate"
INFERENCE_ADAPTERS = f"{PREFIX}.inference.adapters"
INFERENCE_LOAD = f"{PREFIX}.inference.load"
INFERENCE_UNLOAD = f"{PREFIX}.inference.unload"

EVENTS_STREAM = "TUNEBUS_EVENTS"
EVENTS_STREAM_SUBJECTS = [
    f"{PREFIX}.training.>",
    f"{PREFIX}.dataset.>",
    f"{PREFIX}.evaluation.>",
    f"{PREFIX}.adapter.>",
]
DEAD_LETTER_STREAM = "TUNEBUS_DEADLETTER"
DEAD_LETTER_STREAM_SUBJECTS = [f"{DEAD_LETTER}.>"]

# JetStream's own word that it stopped delivering a message of the events stream (max_deliver
# reached unacknowledged), kept so that no such message goes unnoticed while services are down.
MAX_DELIVERIES_ADVISORY = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{EVENTS_STREAM}"  # + ".<consumer>"
ADVISORY_STREAM = "TUNEBUS_ADVISORIES"
ADVISORY_STREAM_SUBJECTS = [f"{MAX_DELIVERIES_ADVISORY}.>"]

# Key-value buckets (JetStream streams KV_<bucket>): job claims and cancellations, the registry.
JOBS_BUCKET = "tunebus-jobs"
REGISTRY_BUCKET = "tunebus-registry"
# The latest event of each kind per job, `<job_id>.<kind>` (tunebus.shared.jobevents): what
# `tunebus status` and `tunebus jobs list` read instead of the whole events stream.
JOB_EVENTS_BUCKET = "tunebus-job-events"
