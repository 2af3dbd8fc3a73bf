"""Every knob of a tunebus process, read from the environment (prefix `TUNEBUS_`).

Nested groups use a double underscore: `TUNEBUS_S3__ENDPOINT=http://localhost:9000`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class S3Settings(BaseModel):
    endpoint: str = "http://127.0.0.1:9000"
    access_key: SecretStr = SecretStr("")
    secret_key: SecretStr = SecretStr("")
    region: str = "us-east-1"
    datasets_bucket: str = "tunebus-datasets"
    models_bucket: str = "tunebus-models"
    adapters_bucket: str = "tunebus-adapters"
    # Presigned download links never outlive this (S3 caps SigV4 links at 7 days).
    presign_expiry: timedelta = Field(default=timedelta(hours=1), le=timedelta(days=7))


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


class TrainerSettings(BaseModel):
    backend: Literal["mlx", "cuda"] = "mlx"
    # Progress events are sent at most this often, and at least every report interval.
    progress_interval_s: float = 2.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TUNEBUS_", env_nested_delimiter="__", extra="ignore"
    )

    nats_url: str = "nats://127.0.0.1:4222"
    s3: S3Settings = S3Settings()
    delivery: DeliverySettings = DeliverySettings()
    trainer: TrainerSettings = TrainerSettings()
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"
    # Per-worker scratch space and model cache.
    work_dir: Path = Path.home() / ".cache" / "tunebus"
