"""The training family: a request for a fine-tune, and what the trainer says while it runs it."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import Field, StringConstraints, model_validator

from .envelope import Envelope, JobId, Model, Payload

AdapterName = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$"),
    Field(description="Lower-case name under which versions of the adapter are registered."),
]
S3Uri = Annotated[str, StringConstraints(pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,62}/.+$")]
# SFT trains on chat, instruction, completion or text data; the preference methods on
# prompt/chosen/rejected; the GRPO family on prompt/answer.
Method = Literal["sft", "dpo", "orpo", "cpo", "grpo"]
DatasetFormat = Literal[
    "auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference", "grpo"
]
OnInvalid = Literal["reject", "drop"]
# adamw_8bit and the paged ones are bitsandbytes' (CUDA only); the others run on every backend.
Optimizer = Literal["adamw", "adam", "sgd", "adafactor", "adamw_8bit", "paged_adamw_8bit",
                    "paged_adamw_32bit"]
LrScheduler = Literal["constant", "linear", "cosine"]


class DatasetSpec(Model):
    uri: S3Uri = Field(description="s3://bucket/key of a JSONL or JSON file.")
    format: DatasetFormat = "auto"
    valid_uri: S3Uri | None = Field(
        default=None, description="A held-out file; when absent a split is taken from `uri`."
    )
    valid_fraction: float = Field(default=0.1, gt=0, lt=1)
    on_invalid: OnInvalid = Field(
        default="reject",
        description="reject: any bad row rejects the dataset; drop: bad rows are left out and "
                    "counted by reason (the dataset is still rejected when fewer than the "
                    "validator's minimum of rows remain).",
    )


AdapterType = Literal["lora", "dora", "full"]


class AdapterSettings(Model):
    type: AdapterType = Field(
        default="lora",
        description="lora or dora: an adapter on the frozen base model; full: every weight of "
        "the model is trained and the result is a whole model (Hugging Face safetensors layout, "
        "under full/ in the adapter prefix). With full, rank, alpha and dropout are not read, "
        "target_modules must be null and quantization 'none'; num_layers trains only the last "
        "N transformer blocks (embeddings, final norm and LM head then stay frozen).",
    )
    rank: int = Field(default=8, ge=1, le=1024, description="lora/dora only.")
    alpha: float = Field(default=16.0, gt=0, description="lora/dora only (scale = alpha / rank).")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="lora/dora only.")
    target_modules: list[str] | None = Field(
        default=None, description="Module names to adapt; null means the backend's default "
        "(lora/dora only)."
    )
    num_layers: int | None = Field(
        default=None, ge=1, description="Adapt (full: train) only the last N layers; null means "
        "all (full: every weight)."
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        default="none", description="QLoRA: the frozen base in 4 or 8 bits (lora/dora only).")

    @model_validator(mode="after")
    def _full_trains_the_weights_themselves(self) -> Self:
        if self.type != "full":
            return self
        if self.quantization != "none":
            raise ValueError(
                f"adapter.quantization {self.quantization!r} does not apply to adapter.type "
                "'full': a full fine-tune updates the weights themselves, which cannot be "
                "quantized; use quantization 'none', or type 'lora' for QLoRA")
        if self.target_modules is not None:
            raise ValueError(
                "adapter.target_modules does not apply to adapter.type 'full' (it trains every "
                "weight): leave it null, or use num_layers to train only the last blocks")
        return self


class Hyperparameters(Model):
    epochs: int | None = Field(default=None, ge=1, description="Give epochs or iters, not both.")
    iters: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=4, ge=1)
    learning_rate: float = Field(default=1e-4, gt=0)
    max_seq_length: int = Field(default=512, ge=8)
    grad_accumulation_steps: int = Field(default=1, ge=1)
    optimizer: Optimizer = Field(
        default="adamw",
        description="adamw (decoupled weight decay), adam (none), sgd (no momentum), adafactor "
        "(with the given learning rate, no relative step), and on a CUDA worker with "
        "bitsandbytes adamw_8bit, paged_adamw_8bit, paged_adamw_32bit. Adam-style "
        "optimizers use betas (0.9, 0.999), eps 1e-8, bias correction.",
    )
    lr_scheduler: LrScheduler = Field(
        default="cosine",
        description="The learning rate after warmup: constant, linear or cosine decay to "
        "min_lr_ratio x learning_rate at the last optimizer update.",
    )
    warmup_steps: int | None = Field(
        default=None, ge=0,
        description="Optimizer updates of linear warmup (from min_lr_ratio x learning_rate; "
        "from 0 with the constant schedule). Give warmup_steps or warmup_ratio, not both; "
        "neither means no warmup.",
    )
    warmup_ratio: float | None = Field(
        default=None, ge=0, lt=1,
        description="Warmup as a fraction of all optimizer updates (rounded up).",
    )
    min_lr_ratio: float = Field(
        default=0.0, ge=0, le=1,
        description="Where linear and cosine decay end, as a fraction of learning_rate.",
    )
    weight_decay: float = Field(
        default=0.0, ge=0,
        description="adamw and adafactor: decoupled decay; sgd: L2 added to the gradient.",
    )
    max_grad_norm: float = Field(
        default=1.0, ge=0,
        description="Clip the global gradient norm of each update to this; 0 turns clipping off.",
    )
    seed: int = 0
    mask_prompt: bool = Field(
        default=True,
        description="SFT on chat or prompt/completion data: loss on the completions only.",
    )
    checkpoint_every: int | None = Field(
        default=None, ge=0,
        description="Steps between checkpoints in S3 (0: none); null means the worker's setting.",
    )
    eval_every: int | None = Field(
        default=None, ge=1,
        description="Steps between validation losses (also at the first and the last step); "
        "null: twice per run.",
    )
    keep: Literal["last", "best"] = Field(
        default="last",
        description="The adapter stored: the last step's, or the one with the lowest "
        "validation loss.",
    )
    early_stopping_patience: int | None = Field(
        default=None, ge=1,
        description="Stop after this many validations in a row without a lower validation "
        "loss; null: never stop early.",
    )

    @model_validator(mode="after")
    def _epochs_or_iters(self) -> Self:
        if self.epochs is not None and self.iters is not None:
            raise ValueError("give either epochs or iters, not both")
        if self.epochs is None and self.iters is None:
            self.epochs = 1
        return self

    @model_validator(mode="after")
    def _schedule_fits(self) -> Self:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("give either warmup_steps or warmup_ratio, not both")
        if self.lr_scheduler == "constant" and self.min_lr_ratio:
            raise ValueError("min_lr_ratio applies to the linear and cosine schedules, "
                             "not to lr_scheduler 'constant'")
        if self.optimizer == "adam" and self.weight_decay:
            raise ValueError("optimizer 'adam' has no weight decay: use 'adamw' for "
                             "weight_decay > 0")
        return self


class PreferenceSettings(Model):
    """DPO, CPO and ORPO. ORPO reads `beta` only."""

    beta: float = Field(default=0.1, gt=0, description="Strength of the preference term.")
    loss_type: Literal["sigmoid", "hinge", "ipo", "dpop"] = Field(
        default="sigmoid", description="DPO and CPO only."
    )
    delta: float = Field(default=50.0, ge=0, description="The dpop penalty weight.")


GRPOLossType = Literal["grpo", "dr_grpo", "bnpo", "gspo", "dapo"]


class GRPOSettings(Model):
    """The GRPO family. `gspo` weighs importance at the sequence level; `dapo` clips the ratio
    asymmetrically (`epsilon_high`, 0.28 unless given) and normalises over all tokens."""

    loss_type: GRPOLossType = "grpo"
    group_size: int = Field(default=4, ge=2, description="Completions sampled per prompt.")
    beta: float = Field(default=0.04, ge=0, description="KL penalty towards the base model.")
    epsilon: float = Field(default=0.2, gt=0, description="Lower clipping width of the ratio.")
    epsilon_high: float | None = Field(
        default=None, gt=0, description="Upper clipping width; null means epsilon (dapo: 0.28)."
    )
    temperature: float = Field(default=1.0, gt=0)
    max_completion_length: int = Field(default=256, ge=1)
    reward_functions: list[str] = Field(
        default=["exact_match"], min_length=1,
        description="Names from the trainer's reward registry (exact_match, contains, format, "
        "length built in).",
    )
    reward_weights: list[float] | None = Field(
        default=None, description="One weight per reward function; null weighs them equally."
    )

    @model_validator(mode="after")
    def _one_weight_per_function(self) -> Self:
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_functions):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} entries for "
                f"{len(self.reward_functions)} reward functions"
            )
        return self


class Probe(Model):
    prompt: str = Field(min_length=1)
    expected: str | None = None


class EvaluationSettings(Model):
    enabled: bool = True
    max_examples: int | None = Field(default=None, ge=1)
    probes: list[Probe] = []


class TrainingRequested(Payload):
    adapter_name: AdapterName
    base_model: str = Field(
        min_length=1, description="A Hugging Face id, an s3://bucket/prefix, or a local path."
    )
    base_model_revision: str | None = None
    dataset: DatasetSpec
    method: Method = "sft"
    adapter: AdapterSettings = AdapterSettings()
    hyperparameters: Hyperparameters = Hyperparameters()
    backend: Literal["auto", "mlx", "cuda"] = "auto"
    evaluation: EvaluationSettings = EvaluationSettings()
    metadata: dict[str, Any] = {}
    preference: PreferenceSettings = PreferenceSettings()
    grpo: GRPOSettings = GRPOSettings()
    merge: bool = Field(
        default=False,
        description="Also store the base model with the adapter merged in (under merged/); "
        "not with adapter.type 'full', whose result is a whole model already (under full/).",
    )

    @model_validator(mode="after")
    def _merge_needs_an_adapter(self) -> Self:
        if self.merge and self.adapter.type == "full":
            raise ValueError("merge applies to lora/dora adapters: adapter.type 'full' stores "
                             "the whole trained model already (under full/); leave merge false")
        return self


class TrainingRefused(Payload):
    """A training request that runs nothing because its job_id is taken: by the same request
    (`duplicate`: the job's status is the first request's) or by a different one (`conflict`).
    To run a request again, after a failure say, submit it under a new job_id."""

    code: Literal["duplicate", "conflict"]
    reason: str
    event_id: str = Field(description="The id of the refused request event.")
    request_sha256: str = Field(description="Digest of the refused request's canonical JSON.")
    original_event_id: str = Field(description="The request event that holds the job_id.")
    original_request_sha256: str | None = None


class DatasetSummary(Model):
    """What the validator made of the dataset; the trainer reads the splits from here."""

    format: str
    rows: int
    train_rows: int
    valid_rows: int
    dropped: int = 0
    dropped_reasons: dict[str, int] = Field(default={}, description="Dropped rows by reason.")
    invalid_rows: int = Field(default=0, description="Bad rows left out (on_invalid: drop).")
    invalid_reasons: dict[str, int] = Field(
        default={}, description="Bad rows left out, by the kind of their first error.")
    sha256: str = Field(description="sha256 of the dataset file as submitted.")
    train_uri: S3Uri
    train_sha256: str
    valid_uri: S3Uri
    valid_sha256: str
    manifest_uri: S3Uri
    warnings: list[str] = Field(default=[], description="The first warnings; see warning_count.")
    warning_count: int = 0
    token_stats: dict[str, float] | None = Field(
        default=None, description="Row length statistics (min, mean, p50, p95, max) in tokens."
    )


class Artifact(Model):
    name: str = Field(description="File name inside the adapter directory.")
    uri: S3Uri
    sha256: str
    size: int


class TrainingMetrics(Model):
    first_loss: float
    final_loss: float
    final_val_loss: float | None = None
    steps: int
    trained_tokens: int
    seconds: float
    tokens_per_second: float
    first_reward: float | None = Field(default=None, description="GRPO family: mean reward.")
    final_reward: float | None = None
    resumed_from_step: int | None = None
    best_val_loss: float | None = Field(default=None, description="The lowest validation loss.")
    best_step: int | None = Field(default=None, description="The step it was measured at.")
    early_stopped: bool = Field(
        default=False, description="Training ended before its last step (early_stopping_patience).")
    timings: dict[str, float] = Field(
        default={},
        description="Seconds spent per phase (model_resolve, model_load, data_download, "
        "setup, training, upload) and first_step_at (Unix time of the first training step).",
    )


class TrainingStarted(Payload):
    adapter_name: AdapterName
    backend: str
    worker: str
    total_steps: int
    resolved_args: dict[str, Any] = Field(
        description="Every effective training parameter, defaults included."
    )
    resumed_from_step: int | None = Field(
        default=None, description="The checkpoint step this run continues from; null: step 0."
    )
    checkpoint_uri: S3Uri | None = Field(
        default=None, description="The checkpoint this run continues from."
    )


class TrainingProgress(Payload):
    step: int
    total_steps: int
    epoch: float | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    steady_tokens_per_second: float | None = Field(
        default=None,
        description="Tokens/s over this run's steps that compiled nothing (MLX compiles its step "
                    "once per batch shape); tokens_per_second counts every step of the window.",
    )
    trained_tokens: int = 0
    peak_memory_gb: float | None = None
    elapsed_seconds: float = 0.0
    eta_seconds: float | None = None
    reward: float | None = Field(default=None, description="GRPO family: mean reward.")
    metrics: dict[str, float] = Field(
        default={}, description="Method-specific figures, e.g. preference accuracy, KL."
    )


class TrainingCompleted(Payload):
    request: TrainingRequested
    dataset: DatasetSummary
    backend: str
    adapter_uri: S3Uri = Field(description="The prefix holding the adapter's files.")
    artifacts: list[Artifact]
    metrics: TrainingMetrics
    resolved_args: dict[str, Any]
    merged_model_uri: S3Uri | None = Field(
        default=None, description="The merged model's prefix, when the request asked for one."
    )
    layouts: dict[str, str] = Field(
        default={}, description="The adapter layouts stored, each with its folder in the prefix "
        "('' is the root): mlx (mlx-lm), peft (PEFT); full (a whole model, adapter.type full: "
        "'full/').")
    format: str | None = Field(
        default=None, description="The layout it was trained in (the others were converted).")
    mask_prompt: bool = Field(
        default=True, description="Whether the loss was on the completions only, as the "
        "backend applied it to this data (an evaluation scores the same tokens).")
    loss_curve: str | None = Field(
        default=None, description="The name, among `artifacts`, of the loss curve: JSON, a list "
        "of {step, train_loss, val_loss, ...} points.")

    @model_validator(mode="before")
    @classmethod
    def _said_before_typed_fields(cls, data: Any) -> Any:
        """An event written before `mask_prompt` and `loss_curve` were fields said them in
        `resolved_args` and by the file name its trainer used."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "mask_prompt" not in data:
            data["mask_prompt"] = bool((data.get("resolved_args") or {}).get("mask_prompt", True))
        if "loss_curve" not in data:
            names = {a.get("name") if isinstance(a, dict) else getattr(a, "name", None)
                     for a in data.get("artifacts") or []}
            data["loss_curve"] = "loss_curve.json" if "loss_curve.json" in names else None
        return data

    def loss_curve_artifact(self) -> Artifact | None:
        return next((a for a in self.artifacts if a.name == self.loss_curve), None)

    def trained_layout(self) -> str:
        """`format`, or for an event written before it was said, the layout its backend wrote."""
        return self.format or {"cuda": "peft"}.get(self.backend, "mlx")


class TrainingFailed(Payload):
    reason: str
    error_type: str | None = None


class TrainingCancelled(Payload):
    reason: str = ""
    step: int | None = None
    checkpoint_uri: S3Uri | None = Field(
        default=None, description="The last checkpoint, kept: a new job can start from it."
    )
    checkpoint_step: int | None = None


class CancelTraining(Model):
    """Request (tunebus.v1.trainer.cancel): stop a job's training."""

    job_id: JobId
    reason: str = Field(default="cancelled by request", max_length=500)


class CancelReply(Model):
    job_id: JobId
    status: Literal["cancelling", "finished", "unknown"] = Field(
        description="cancelling: the job stops (or never starts) training; finished: its "
        "training already ended; unknown: no such job reached the validator or a trainer."
    )
    message: str


class TrainerCapabilities(Model):
    """What a trainer worker can run; announced in its service-discovery metadata."""

    backend: str
    methods: list[str]
    adapters: list[str]
    quantization: list[str]
    grpo_loss_types: list[str] = []
    reward_functions: list[str] = []
    optimizers: list[str] = []
    merge: bool = False
    memory_bytes: int | None = Field(
        default=None, description="The memory a full fine-tune may fill on this worker (the "
        "device's, or the worker's setting); a request whose estimate exceeds it is refused. "
        "null: not known.")
    full_dtype: str | None = Field(
        default=None, description="The dtype a full fine-tune holds weights and gradients in; "
        "null: the model's own.")
    why_not: dict[str, str] = Field(
        default={}, description="Why an option is not offered on this worker, keyed "
        "'<field>=<value>' (e.g. 'quantization=4bit', 'optimizer=adamw_8bit': this worker has "
        "no CUDA GPU).")


class TrainingRequestedEvent(Envelope[TrainingRequested]):
    type: Literal["tunebus.training.requested.v1"] = "tunebus.training.requested.v1"


class TrainingRefusedEvent(Envelope[TrainingRefused]):
    type: Literal["tunebus.training.refused.v1"] = "tunebus.training.refused.v1"


class TrainingStartedEvent(Envelope[TrainingStarted]):
    type: Literal["tunebus.training.started.v1"] = "tunebus.training.started.v1"


class TrainingProgressEvent(Envelope[TrainingProgress]):
    type: Literal["tunebus.training.progress.v1"] = "tunebus.training.progress.v1"


class TrainingCompletedEvent(Envelope[TrainingCompleted]):
    type: Literal["tunebus.training.completed.v1"] = "tunebus.training.completed.v1"


class TrainingFailedEvent(Envelope[TrainingFailed]):
    type: Literal["tunebus.training.failed.v1"] = "tunebus.training.failed.v1"


class TrainingCancelledEvent(Envelope[TrainingCancelled]):
    type: Literal["tunebus.training.cancelled.v1"] = "tunebus.training.cancelled.v1"
