"""The training family: a request for a fine-tune, and what the trainer says while it runs it."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Self

from pydantic import ConfigDict, Field, StringConstraints, model_validator

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
    format: DatasetFormat = Field(
        default="auto",
        description="How rows are read: auto (detected from the first rows), alpaca, sharegpt, "
        "messages (OpenAI chat), prompt_completion, text, preference (prompt/chosen/rejected), "
        "grpo (prompt/answer).",
    )
    valid_uri: S3Uri | None = Field(
        default=None, description="A held-out file; when absent a split is taken from `uri`."
    )
    valid_fraction: float = Field(
        default=0.1, gt=0, lt=1,
        description="Without valid_uri: the share of rows held out for validation.")
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
        description="lora, dora (weight-decomposed LoRA: a magnitude vector per adapted layer "
        "besides the low-rank factors): an adapter on the frozen base model; full: every weight of "
        "the model is trained and the result is a whole model (Hugging Face safetensors layout, "
        "under full/ in the adapter prefix). With full, rank, alpha and dropout are not read, "
        "target_modules must be null and quantization 'none'; num_layers trains only the last "
        "N transformer blocks (embeddings, final norm and LM head then stay frozen).",
    )
    rank: int = Field(default=8, ge=1, le=1024,
                      description="The rank r of the low-rank factors (lora/dora only).")
    alpha: float = Field(
        default=16.0, gt=0,
        description="The PEFT convention: the update is scaled by alpha / rank (16 / 8 = 2; "
        "lora/dora only).")
    dropout: float = Field(
        default=0.0, ge=0, lt=1,
        description="Dropout on the adapter's input during training (lora/dora only).")
    target_modules: list[str] | None = Field(
        default=None, description="Module names to adapt (q_proj or self_attn.q_proj, ...); "
        "null: every linear layer of the adapted blocks (lora/dora only)."
    )
    num_layers: int | None = Field(
        default=None, ge=1, description="Adapt (full: train) only the last N layers; null means "
        "all (full: every weight)."
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        default="none",
        description="QLoRA: the frozen base model quantized to 4 or 8 bits while the adapter "
        "trains (the MLX worker, or a CUDA GPU with bitsandbytes; lora/dora only).")

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
    epochs: int | None = Field(
        default=None, ge=1,
        description="Passes over the train split. Give epochs or iters, not both; neither means "
        "1 epoch.")
    iters: int | None = Field(
        default=None, ge=1, description="Batches to train on (instead of epochs).")
    batch_size: int = Field(
        default=4, ge=1, description="Examples per batch (at most the train split's rows).")
    learning_rate: float = Field(default=1e-4, gt=0, description="The peak learning rate.")
    max_seq_length: int = Field(
        default=2048, ge=8,
        description="Tokens per example at most; longer examples are cut at the end (the "
        "validator warns about them). Memory follows a batch's longest example, not this.")
    grad_accumulation_steps: int = Field(
        default=1, ge=1, description="Batches per optimizer update.")
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
    seed: int = Field(
        default=0, ge=0, le=2**32 - 1,
        description="Seeds the adapter's initialisation, dropout and the order of batches.")
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
        description="Steps between validation losses on the held-out split (progress events' "
        "val_loss); also at the last step, and on the MLX worker at step 1 before any update "
        "(it validates before a step's update, the CUDA worker after it). null: twice per run.",
    )
    keep: Literal["last", "best"] = Field(
        default="last",
        description="The adapter stored: the last step's, or the one with the lowest "
        "validation loss (metrics.best_step, best_val_loss; checkpoints carry it, so a resumed "
        "run keeps the same one).",
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

    loss_type: GRPOLossType = Field(
        default="grpo", description="The family member: grpo, dr_grpo, bnpo, gspo or dapo.")
    group_size: int = Field(default=4, ge=2, description="Completions sampled per prompt.")
    beta: float = Field(default=0.04, ge=0, description="KL penalty towards the base model.")
    epsilon: float = Field(default=0.2, gt=0, description="Lower clipping width of the ratio.")
    epsilon_high: float | None = Field(
        default=None, gt=0, description="Upper clipping width; null means epsilon (dapo: 0.28)."
    )
    temperature: float = Field(
        default=1.0, gt=0, description="Sampling temperature of the completions.")
    max_completion_length: int = Field(
        default=256, ge=1, description="New tokens per sampled completion at most.")
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


# Probes are generated batch_size at a time by the evaluator (on a GPU, in its memory): a
# request's are bounded, so one request cannot hold the evaluator for hours.
MAX_PROBES = 64
MAX_PROBE_PROMPT = 8000


class Probe(Model):
    prompt: str = Field(min_length=1, max_length=MAX_PROBE_PROMPT,
                        description="A user message both models answer.")
    expected: str | None = Field(
        default=None, description="The reference answer (scored by ROUGE-L); null: shown only.")


class EvaluationSettings(Model):
    enabled: bool = Field(
        default=True, description="Evaluate the adapter against its base model after training.")
    max_examples: int | None = Field(
        default=None, ge=1,
        description="Held-out examples scored at most; null: the evaluator's setting.")
    probes: list[Probe] = Field(
        default=[], max_length=MAX_PROBES,
        description="Prompts answered by both models, besides held-out ones.")


# A request names where metrics go, never the credentials to send them with: those are the
# worker's settings. A field whose name looks like one is refused (and never echoed back).
SECRET_FIELD = re.compile(r"key|token|secret|password|credential", re.IGNORECASE)
TrackerName = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class _TrackerSettings(Model):
    """Settings of one experiment tracker: unknown fields are errors here (a misspelt `project`
    would otherwise log to another place than asked), and so are credentials."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        if isinstance(data, dict):
            secret = sorted(k for k in data if isinstance(k, str) and SECRET_FIELD.search(k))
            if secret:
                raise ValueError(
                    f"{', '.join(secret)}: a request carries no credentials; the trainer "
                    "worker's settings hold them (TUNEBUS_TRAINER__TRACKERS__*)")
        return data


class WandbSettings(_TrackerSettings):
    """Weights & Biases, as OpenAI's fine-tuning `integrations` name it. The API key (or offline
    mode) is the worker's setting."""

    project: TrackerName = Field(description="The W&B project the run is created in.")
    name: TrackerName | None = Field(
        default=None, description="The run's display name; null: the job id.")
    entity: TrackerName | None = Field(
        default=None, description="The team or user of the run; null: the key's default entity.")
    tags: list[TrackerName] = Field(
        default=[], max_length=64,
        description="Tags on the run, besides tunebus's own (tunebus, the adapter name, the "
        "method).")


class MlflowSettings(_TrackerSettings):
    """MLflow; the tracking URI is the worker's setting."""

    experiment: TrackerName = Field(
        description="The experiment the run is logged in (created when it does not exist).")
    run_name: TrackerName | None = Field(
        default=None, description="The run's name; null: the job id.")
    tags: dict[TrackerName, Annotated[str, StringConstraints(max_length=5000)]] = Field(
        default={}, max_length=64, description="Tags on the run, besides tunebus's own.")


class TensorBoardSettings(_TrackerSettings):
    """TensorBoard event files, stored with the adapter (under `tensorboard/` in its prefix)."""


class WandbIntegration(Model):
    type: Literal["wandb"] = Field(description="Weights & Biases.")
    wandb: WandbSettings = Field(description="Where the run goes.")


class MlflowIntegration(Model):
    type: Literal["mlflow"] = Field(description="MLflow.")
    mlflow: MlflowSettings = Field(description="Where the run goes.")


class TensorBoardIntegration(Model):
    type: Literal["tensorboard"] = Field(description="TensorBoard event files.")
    tensorboard: TensorBoardSettings = Field(
        default=TensorBoardSettings(), description="Nothing to set (yet).")


Integration = Annotated[
    WandbIntegration | MlflowIntegration | TensorBoardIntegration, Field(discriminator="type")]
IntegrationType = Literal["wandb", "mlflow", "tensorboard"]


class TrainingRequested(Payload):
    adapter_name: AdapterName
    base_model: str = Field(
        min_length=1, description="A Hugging Face id, an s3://bucket/prefix, or a local path."
    )
    base_model_revision: str | None = Field(
        default=None,
        description="A Hugging Face id's branch, tag or commit; null: its default branch.")
    dataset: DatasetSpec = Field(description="The data to train on, checked by the validator.")
    method: Method = Field(
        default="sft",
        description="sft (chat, instruction, completion or text data), dpo, orpo, cpo "
        "(prompt/chosen/rejected), grpo (prompt/answer, with reward functions).")
    adapter: AdapterSettings = Field(
        default=AdapterSettings(), description="The adapter's kind and shape.")
    hyperparameters: Hyperparameters = Field(
        default=Hyperparameters(), description="How it trains.")
    backend: Literal["auto", "mlx", "cuda"] = Field(
        default="auto", description="The trainer worker that may take it; auto: any that can.")
    evaluation: EvaluationSettings = Field(
        default=EvaluationSettings(), description="The evaluation after training.")
    metadata: dict[str, Any] = Field(
        default={}, description="Yours, kept with the adapter (`tags`: a list the registry "
        "filters by).")
    preference: PreferenceSettings = Field(
        default=PreferenceSettings(), description="dpo, orpo and cpo only.")
    grpo: GRPOSettings = Field(default=GRPOSettings(), description="grpo only.")
    merge: bool = Field(
        default=False,
        description="Also store the base model with the adapter merged in (under merged/); "
        "not with adapter.type 'full', whose result is a whole model already (under full/).",
    )
    init_from: str | None = Field(
        default=None, min_length=1, max_length=1100,
        description="Continue training from an earlier adapter instead of a fresh one: a "
        "registered version (name, name:version or name@alias, resolved with the registry when "
        "the training starts; a deleted version is refused), or the s3:// URI of a checkpoint an "
        "earlier job left in the adapters bucket (a TrainingCancelled's checkpoint_uri, "
        "<adapter>/<job>/checkpoints/step-N). The weights start as the parent's, the optimizer "
        "and schedule afresh. The parent's base_model (and revision, where either says one) must "
        "be this request's. The adapter's shape (adapter.type, rank, alpha, target_modules, "
        "num_layers) is the parent's: leave those at their defaults or give the parent's values; "
        "others are refused, naming each field. dropout and quantization are this request's. "
        "Only LoRA and DoRA parents continue (a full-model version has no adapter to start "
        "from: use it as base_model). Lineage: the new version's `parent` in the registry.",
    )
    integrations: list[Integration] = Field(
        default=[], max_length=3,
        description="Experiment trackers that receive the progress events' metrics, as "
        "OpenAI's fine-tuning API names them: wandb, mlflow, tensorboard (one of each at most).",
    )

    @model_validator(mode="after")
    def _one_integration_per_tracker(self) -> Self:
        types = [i.type for i in self.integrations]
        if len(types) != len(set(types)):
            raise ValueError(f"integrations: each tracker at most once (got {', '.join(types)})")
        return self

    @model_validator(mode="after")
    def _init_from_continues_an_adapter(self) -> Self:
        if self.init_from is not None and self.adapter.type == "full":
            raise ValueError("init_from continues a LoRA or DoRA adapter, and adapter.type "
                             "'full' trains the whole model: to fully fine-tune a trained "
                             "model, name it as base_model; else leave adapter.type out")
        return self

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
        "parent_download (init_from), "
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
    parent: str | None = Field(
        default=None, description="What the request's init_from resolved to: the parent "
        "version's name:version (never an alias), or the checkpoint's s3:// URI; null: trained "
        "from the base model.")
    adapter: AdapterSettings | None = Field(
        default=None, description="The adapter's settings as trained, where they are not the "
        "request's: with init_from, the shape is the parent's.")

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
    integrations: list[str] = Field(
        default=[], description="The experiment trackers this worker can log to.")
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
        "no CUDA GPU; 'integration=wandb': it has no W&B key).")


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
