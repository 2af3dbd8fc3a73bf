"""Every knob of a tunebus process, read from the environment (prefix `TUNEBUS_`).

Nested groups use a double underscore: `TUNEBUS_S3__ENDPOINT=http://localhost:9000`.
"""

from __future__ import annotations

import warnings
from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class NatsAuth(BaseModel):
    """Who this process is on the bus. Use one mechanism: user + password, a token, an nkey
    seed file, or a `.creds` file (JWT + seed). The server decides what the identity may do."""

    user: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    nkey_seed_file: Path | None = None
    creds_file: Path | None = None
    # Where replies to this identity arrive (default `_INBOX.<user>`, which its permissions allow).
    inbox_prefix: str | None = None


class S3Settings(BaseModel):
    endpoint: str = "http://127.0.0.1:9000"
    access_key: SecretStr = SecretStr("")
    secret_key: SecretStr = SecretStr("")
    region: str = "us-east-1"
    datasets_bucket: str = "tunebus-datasets"
    models_bucket: str = "tunebus-models"
    adapters_bucket: str = "tunebus-adapters"
    # Datasets are read from the datasets bucket only, or from these buckets too.
    extra_dataset_buckets: list[str] = []
    # Presigned download links never outlive this (S3 caps SigV4 links at 7 days).
    presign_expiry: timedelta = Field(default=timedelta(hours=1), le=timedelta(days=7))
    # An unreachable S3 is retried with backoff (base, doubling up to max) for this long; then
    # the work is handed back to JetStream, to be redelivered later.
    retry_for_s: float = Field(default=60.0, ge=0)
    retry_base_delay_s: float = Field(default=0.25, gt=0)
    retry_max_delay_s: float = Field(default=5.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=120.0, gt=0)


class DeliverySettings(BaseModel):
    """How a consumer treats a message that it could not finish."""

    # JetStream redelivers a message whose ack has not arrived after this long.
    ack_wait_s: float = 60.0
    # Long handlers tell JetStream they are alive this often (well below ack_wait_s).
    heartbeat_s: float = 15.0
    # Transient failures are retried this many times in all, then dead-lettered.
    max_deliveries: int = 5
    retry_base_delay_s: float = 1.0
    retry_max_delay_s: float = 60.0
    # A consumer with a backlog that delivered nothing for this long while its instance was idle
    # is stalled: the instance reports itself unhealthy (`tunebus health`, $SRV.STATS).
    stall_after_s: float = Field(default=120.0, gt=0)


class JetStreamSettings(BaseModel):
    """How the streams and key-value buckets tunebus declares are stored."""

    # Copies of each stream and bucket in a NATS cluster (3 survives the loss of one server);
    # 1 on a single server. Applied when a stream or bucket is created or updated.
    replicas: int = Field(default=1, ge=1, le=5)


class WandbWorkerSettings(BaseModel):
    """How this worker reaches Weights & Biases (a request names only project, run, tags)."""

    # Without a key a worker refuses wandb integrations, unless mode is offline.
    api_key: SecretStr | None = None
    # online: runs go to base_url; offline: they stay under dir, for `wandb sync` to upload.
    mode: Literal["online", "offline"] = "online"
    # A self-hosted W&B server (None: wandb's own default).
    base_url: str | None = None
    # Where run files are written (None: <work_dir>/wandb).
    dir: Path | None = None
    # The entities and projects a request may log to with this worker's key (None: any the key
    # can write; a request's entity null is the key's default entity, always allowed).
    entities: list[str] | None = None
    projects: list[str] | None = None


class MlflowWorkerSettings(BaseModel):
    """How this worker reaches MLflow; credentials, if the server needs them, come from the
    environment as MLflow reads them (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN), or in the
    URI's user:password@ (a secret: never logged nor published)."""

    # Without one a worker refuses mlflow integrations.
    tracking_uri: SecretStr | None = None
    # The experiments a request may log to (None: any).
    experiments: list[str] | None = None
    # Each HTTP call to the server gives up after this long, retried this often (MLflow's own
    # defaults, 120 s and 7 retries with backoff, hold a call for minutes).
    request_timeout_s: int = Field(default=10, ge=1)
    max_retries: int = Field(default=1, ge=0)


class TrackerSettings(BaseModel):
    """The experiment trackers a request's `integrations` may name (TensorBoard needs nothing:
    its event files are stored with the adapter)."""

    wandb: WandbWorkerSettings = WandbWorkerSettings()
    mlflow: MlflowWorkerSettings = MlflowWorkerSettings()
    # How long a job's end waits for its trackers to close their runs (W&B uploading what is
    # left, say); past it the job completes without them.
    finish_timeout_s: float = Field(default=30.0, gt=0)


class TrainerSettings(BaseModel):
    backend: Literal["mlx", "cuda"] = "mlx"
    # Progress events go out every few steps, and at least this often while steps are slow.
    progress_interval_s: float = Field(default=2.0, gt=0)
    # Adapter, optimizer, RNG and data position are written to S3 every this many steps
    # (0: never); a request's hyperparameters.checkpoint_every overrides it.
    checkpoint_every: int = Field(default=50, ge=0)
    # Checkpoints kept per job (older ones are deleted once a newer one is complete).
    keep_checkpoints: int = Field(default=2, ge=1)
    # How long a worker listens for other trainers' answers before deciding that no running
    # worker can serve a request it cannot serve itself.
    discovery_timeout_s: float = Field(default=0.5, gt=0)
    # Processes that run one job together on this machine (the CUDA worker: one per GPU; the
    # batch size is split among them), launched by torch.distributed.run; 1 trains in the worker.
    processes: int = Field(default=1, ge=1)
    # How they share it: ddp (a whole model per process) or fsdp (sharded, for a model that
    # does not fit one GPU).
    distributed: Literal["ddp", "fsdp"] = "ddp"
    trackers: TrackerSettings = TrackerSettings()
    # The memory (GB, 1e9 bytes) a full fine-tune (adapter.type full) may fill; a request whose
    # estimate exceeds it is refused. None: the device's (GPU memory, Apple's recommended
    # working set, or the machine's RAM).
    memory_gb: float | None = Field(default=None, gt=0)


class InferenceSettings(BaseModel):
    """Generation over the bus (`tunebus.v1.inference.*`), served by the evaluator."""

    # Adapters kept in memory beside the base model; the least recently used one goes first.
    adapter_cache: int = Field(default=4, ge=1)
    # Requests this worker takes at once (more wait in NATS for it or another worker); they
    # share the backend thread, one generation at a time, in arrival order.
    max_concurrent: int = Field(default=4, ge=1)
    # Loaded at start-up, so the first request does not wait for it (None: on first use).
    preload_base_model: str | None = None
    # A generation still running after this long is ended with an error (the reply permission
    # the server grants a streaming answer lasts as long: shared/identities.py).
    timeout_s: float = Field(default=300.0, gt=0, le=600)


class EvaluatorSettings(BaseModel):
    """What the evaluator measures; a request's `evaluation` settings narrow it further."""

    # mlx or cuda (torch, transformers, PEFT; on a CPU too), the trainer's names; auto takes MLX
    # when it is installed, else cuda.
    backend: Literal["auto", "mlx", "cuda"] = "auto"
    # Held-out examples scored at most (a request's evaluation.max_examples can lower it).
    max_examples: int = Field(default=500, ge=1)
    batch_size: int = Field(default=4, ge=1)
    # Held-out prompts answered by both models and scored against their reference.
    probe_samples: int = Field(default=8, ge=0)
    # Greedy generation stops after this many new tokens.
    probe_max_tokens: int = Field(default=64, ge=1)
    # A metric counts as regressed when it got worse by more than this (relative).
    regression_tolerance: float = Field(default=0.0, ge=0)
    # A chat probe counts as regressed when its ROUGE-L dropped by more than this.
    probe_rouge_tolerance: float = Field(default=0.1, ge=0, le=1)
    inference: InferenceSettings = InferenceSettings()

    @field_validator("backend", mode="before")
    @classmethod
    def _torch_is_cuda(cls, value: object) -> object:
        """`torch`, this setting's name for cuda until the evaluator used the trainer's names:
        still read, with a warning, so existing configurations keep working."""
        if value == "torch":
            warnings.warn("evaluator.backend 'torch' is deprecated: it is called 'cuda' now",
                          DeprecationWarning, stacklevel=2)
            return "cuda"
        return value


class RegistrySettings(BaseModel):
    """The promotion policy: when a new version becomes `production` by itself."""

    auto_promote: bool = True
    # The metric whose relative improvement over the base model decides (loss: lower is better).
    promote_metric: str = "loss"
    # Promote when promote_metric improved by at least this much (0.05 = 5 % better)...
    promote_min_improvement: float = Field(default=0.05, ge=0)
    # ... and at most this many probes got worse.
    promote_max_probe_regressions: int = Field(default=0, ge=0)
    # Re-read every artifact on registration and compare its sha256 with the recorded one.
    verify_artifacts: bool = True
    # Write a llama.cpp LoRA GGUF copy (gguf/adapter.gguf) of every adapter at registration,
    # when its base model's config.json is in the models bucket.
    gguf: bool = True


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TUNEBUS_", env_nested_delimiter="__", extra="ignore"
    )

    # One server, or several separated by commas (a cluster).
    nats_url: str = "nats://127.0.0.1:4222"
    nats: NatsAuth = NatsAuth()
    s3: S3Settings = S3Settings()
    delivery: DeliverySettings = DeliverySettings()
    jetstream: JetStreamSettings = JetStreamSettings()
    trainer: TrainerSettings = TrainerSettings()
    evaluator: EvaluatorSettings = EvaluatorSettings()
    registry: RegistrySettings = RegistrySettings()
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"
    # Base models given as a local path must lie under this directory (unset: none may).
    models_root: Path | None = None
    # Per-worker scratch space and model cache.
    work_dir: Path = Path.home() / ".cache" / "tunebus"
    # How often a supervisor (`tunebus stack up`) restarted this service before this process;
    # announced over service discovery.
    restarts: int = Field(default=0, ge=0)
