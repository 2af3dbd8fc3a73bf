"""What a training backend is asked to do and what it answers, independent of MLX or torch.

Plain dataclasses, no I/O, no ML library: the trainer service builds a `TrainSpec` from a job
message, hands it to a backend and turns what comes back into messages. This module must import
without any ML library installed.

What every backend's `train` (its signature: the `TrainerBackend` Protocol in `backends/`)
promises, tests/unit/test_backend_contract.py checking it for each:

- `data_dir` holds train.jsonl (and valid.jsonl when there is one) in the canonical form of
  `spec.method`: sft {"messages": [...]}; dpo/orpo/cpo {"prompt", "chosen", "rejected"[, "system"]};
  grpo {"prompt", "answer"[, "system"]}.
- `out_dir` receives the adapter: the weights, `adapter_config.json` (written last), and with
  `spec.merge` a merged model under `out_dir / "merged"`. A full fine-tune (`spec.lora.kind ==
  "full"`) leaves no adapter but the whole trained model in the Hugging Face layout under
  `out_dir / "full"` (config.json, model.safetensors, tokenizer files). Loss curve, metrics and
  training arguments are written by the service (`artifacts.py`) from the `TrainResult`.
- `hooks.on_start(resolved_args, resumed_from_step)` is called once, after the model and data are
  loaded and before the first step; `resolved_args` names every effective setting, library
  defaults included.
- `hooks.on_progress(report)` is called every `spec.steps_per_report` steps, and besides whenever
  `spec.report_interval_s` passed since the last report; steps strictly increase.
- `hooks.should_stop()` is asked before every step; a reason (not None) makes the backend write a
  checkpoint of the last finished step (when it has one not yet written) and raise
  `TrainingStopped(reason, step)`. No adapter is left in `out_dir` then.
- Every `spec.checkpoint_every` steps (0: never) the backend writes a complete checkpoint into a
  fresh local directory and calls `hooks.on_checkpoint(directory, step)`; the directory may be
  deleted once the call returns. A checkpoint holds `state.json` (a `CheckpointState`, written
  last) plus the backend's arrays as safetensors: adapter weights, optimizer state, RNG state.
  Never pickle.
- Validation runs every `spec.steps_per_eval` steps; `spec.early_stopping_patience`
  validations in a row without a lower loss end the run after that step (a TrainResult with
  `early_stopped`); with `spec.keep == "best"` the adapter left is the one of the lowest
  validation loss, kept in checkpoints as BEST_WEIGHTS so that a resume keeps it too.
- `init_from` (a keyword argument) is a directory holding an adapter of `spec.lora`'s shape in
  the backend's layout (`Backend.layout`): the adapter starts with its weights instead of fresh
  ones (optimizer and schedule start afresh); a mismatch raises ValueError naming it.
  `spec.init_from` names that parent, so that a checkpoint resumes only a run from the same one.
- `resume_from` is such a directory: the backend restores weights, optimizer, RNG and data
  position, continues at `state.step + 1`, and the run ends as the uninterrupted one would have.
  `checkpoint_problem()` says beforehand whether a checkpoint fits a spec.
- `distributed` (a keyword argument) runs the job over several processes of this machine; a
  backend that cannot raises ValueError saying why. Only rank 0 calls the hooks.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

Method = Literal["sft", "dpo", "orpo", "cpo", "grpo"]
FULL = "full"  # LoraSpec.kind of a full fine-tune: no adapter, every (or the last N blocks') weight
CHECKPOINT_STATE = "state.json"
BEST_WEIGHTS = "best_adapter.safetensors"  # in a checkpoint with keep="best": the best so far

# mlx-lm-lora's GRPODataset system prompt, for rows without one (so both backends ask alike).
GRPO_DEFAULT_SYSTEM = (
    "You are given a problem. Think about the problem and provide your working out. Place it "
    "between <think> and </think>. Then, provide your solution between <answer> </answer>."
)


@dataclass(frozen=True)
class LoraSpec:
    """The adapter to train.

    `alpha` follows the PEFT convention (effective scale = alpha / rank); backends whose libraries
    take a scale directly (mlx-lm) convert. `target_modules` holds module names such as
    "q_proj" or "self_attn.q_proj"; None means the library's default (every linear layer).
    `num_layers` counts transformer blocks from the top; None means all of them.

    `kind == "full"` trains the weights themselves: rank, alpha, dropout and target_modules are
    not read, and `num_layers` None trains every weight (embeddings and LM head included), N
    only the last N blocks (mlx-lm's full fine-tune).
    """

    kind: Literal["lora", "dora", "full"] = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    num_layers: int | None = None


@dataclass(frozen=True)
class PreferenceSpec:
    """DPO and CPO read all three; ORPO reads `beta` only."""

    beta: float = 0.1
    loss_type: Literal["sigmoid", "hinge", "ipo", "dpop"] = "sigmoid"
    delta: float = 50.0


@dataclass(frozen=True)
class GRPOSpec:
    """The GRPO family, every sampling and loss setting spelled out.

    `loss_type` is the family member; backends map it to their library's switches:
    grpo, dr_grpo and bnpo are normalisations of the token loss; gspo takes importance weights at
    the sequence level; dapo normalises over all tokens and clips with `epsilon_high`.
    Reward functions are names from `rewards.REWARDS` (or a backend library's registry).
    """

    loss_type: Literal["grpo", "dr_grpo", "bnpo", "gspo", "dapo"] = "grpo"
    group_size: int = 4
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_completion_length: int = 256
    reward_functions: tuple[str, ...] = ("exact_match",)
    reward_weights: tuple[float, ...] | None = None


@dataclass(frozen=True)
class TrainSpec:
    """One training run; `iters` counts batches (an optimizer update every
    `grad_accumulation_steps` of them)."""

    iters: int
    method: Method = "sft"
    batch_size: int = 4
    learning_rate: float = 1e-4
    max_seq_length: int = 512
    grad_accumulation_steps: int = 1
    optimizer: str = "adamw"  # a key of OPTIMIZERS
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0  # optimizer updates, not batches
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 0
    steps_per_report: int = 10
    steps_per_eval: int = 50
    val_batches: int = 25
    mask_prompt: bool = True
    quantization: Literal["none", "4bit", "8bit"] = "none"
    lora: LoraSpec = field(default_factory=LoraSpec)
    preference: PreferenceSpec = field(default_factory=PreferenceSpec)
    grpo: GRPOSpec = field(default_factory=GRPOSpec)
    merge: bool = False
    keep: Literal["last", "best"] = "last"  # best: the weights of the lowest validation loss
    early_stopping_patience: int = 0  # validations without a new best before stopping; 0: never
    # What is trained on, as the request names it (checkpoints record it; init_from checks it).
    base_model: str | None = None
    base_model_revision: str | None = None
    init_from: str | None = None  # the parent adapter (name:version or checkpoint URI); None: fresh
    # How the run is observed, not what it computes: left out of the fingerprint.
    checkpoint_every: int = 0
    report_interval_s: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainSpec:
        data = json.loads(text)
        grpo = data.pop("grpo")
        for name in ("reward_functions", "reward_weights"):  # JSON has no tuples
            if grpo[name] is not None:
                grpo[name] = tuple(grpo[name])
        lora, preference = LoraSpec(**data.pop("lora")), PreferenceSpec(**data.pop("preference"))
        return cls(**data, lora=lora, preference=preference, grpo=GRPOSpec(**grpo))

    def fingerprint(self) -> str:
        """Identifies what the run computes: a checkpoint resumes only a run with the same one."""
        data = asdict(self)
        # The base model is the job's own (a checkpoint lives in the job's prefix; state.json
        # records it); a run from a fresh adapter keeps the fingerprint it had before init_from.
        for observing in ("checkpoint_every", "report_interval_s", "steps_per_report", "merge",
                          "base_model", "base_model_revision"):
            data.pop(observing)
        if data["init_from"] is None:
            data.pop("init_from")
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# What each optimizer means, on every backend (each maps it onto its library's class).
_ADAM = {"betas": [0.9, 0.999], "eps": 1e-8, "bias_correction": True}
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": _ADAM,
    "adam": _ADAM,  # AdamW without weight decay (the request refuses adam with weight_decay)
    "sgd": {"momentum": 0.0, "dampening": 0.0, "nesterov": False},
    # The Hugging Face Trainer's `adafactor`: the given learning rate, not Adafactor's own.
    "adafactor": {"eps": [1e-30, 1e-3], "clip_threshold": 1.0, "decay_rate": -0.8,
                  "beta_1": None, "relative_step": False, "scale_parameter": False,
                  "warmup_init": False},
    "adamw_8bit": _ADAM,
    "paged_adamw_8bit": _ADAM,
    "paged_adamw_32bit": _ADAM,
}
BITSANDBYTES_OPTIMIZERS = ("adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit")
PORTABLE_OPTIMIZERS = ("adafactor", "adam", "adamw", "sgd")


def optimizer_updates(spec: TrainSpec) -> int:
    """How many times the optimizer steps: once per `grad_accumulation_steps` batches, and
    after the last batch."""
    return math.ceil(spec.iters / spec.grad_accumulation_steps)


def lr_schedule(spec: TrainSpec) -> dict[str, Any]:
    """The learning-rate schedule over optimizer updates u = 0, 1, ... (update u uses the rate
    at u), the same on every backend. With w warmup updates, T updates, r = min_lr_ratio and
    d = max(1, T - w) decay updates:

        warmup, u < w:  lr * (s + (1 - s) * u / w), s = r (0 for constant)
        constant:       lr
        linear:         lr * (r + (1 - r) * (1 - p)),                 p = min(1, (u - w) / d)
        cosine:         lr * (r + (1 - r) * (1 + cos(pi * p)) / 2)

    (the Hugging Face Trainer's constant_with_warmup, and its warmup_stable_decay without a
    stable phase; mlx.optimizers' linear_schedule, cosine_decay and join_schedules)."""
    updates = optimizer_updates(spec)
    constant = spec.lr_scheduler == "constant"
    return {
        "name": spec.lr_scheduler,
        "learning_rate": spec.learning_rate,
        "warmup_steps": spec.warmup_steps,
        "warmup_start": 0.0 if constant else spec.min_lr_ratio,
        "decay_steps": 0 if constant else max(1, updates - spec.warmup_steps),
        "min_lr_ratio": spec.min_lr_ratio,
        "optimizer_updates": updates,
    }


@dataclass(frozen=True)
class ResolvedArgs:
    """Every effective setting of a run, as `training.started.resolved_args` and
    training_args.json say it: one key set for every backend. What a backend alone has goes in
    `backend_args`, what a method alone has in `method_args`. The names of the adapter's shape
    (fine_tune_type, num_layers, lora_parameters) are mlx-lm's: the MLX backend's
    adapter_config.json is this, and mlx-lm's loader reads them from it.

    `from_spec` fills in what the spec decides; the backend gives what only it knows."""

    model: str
    data: str
    adapter_path: str
    train_mode: str
    fine_tune_type: str
    num_layers: int
    lora_parameters: dict[str, Any] | None  # rank, dropout, scale (= alpha / rank), keys; None: full
    lora_alpha: float | None  # full: None
    quantization: str
    base_quantization: dict[str, Any] | None  # how the frozen base was quantized (QLoRA)
    iters: int
    batch_size: int
    world_size: int
    distributed: str  # none, ddp, fsdp
    per_device_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    optimizer: str
    optimizer_config: dict[str, Any]  # OPTIMIZERS[optimizer] and the class that ran it
    lr_schedule: dict[str, Any]  # lr_schedule(spec)
    weight_decay: float
    max_grad_norm: float | None  # None: no clipping
    max_seq_length: int
    mask_prompt: bool  # as applied to this data
    batching: str
    seed: int
    grad_checkpoint: bool
    chat_template_fallback: bool
    steps_per_report: int
    report_interval_s: float | None
    steps_per_eval: int
    val_batches: int
    keep: str
    early_stopping_patience: int | None
    checkpoint_every: int
    merge: bool
    init_from: str | None  # the parent (name:version or a checkpoint's URI); None: a fresh adapter
    device: str
    dtype: str
    mixed_precision: str
    method_args: dict[str, Any]
    backend_args: dict[str, Any]
    library_versions: dict[str, str | None]

    @classmethod
    def from_spec(cls, spec: TrainSpec, *, optimizer_class: str, world_size: int = 1,
                  distributed: str = "none", **backend_knows: Any) -> ResolvedArgs:
        return cls(
            train_mode=spec.method,
            fine_tune_type=spec.lora.kind,
            lora_alpha=None if spec.lora.kind == FULL else spec.lora.alpha,
            quantization=spec.quantization,
            iters=spec.iters,
            batch_size=spec.batch_size,
            world_size=world_size,
            distributed=distributed,
            per_device_batch_size=spec.batch_size // world_size,
            gradient_accumulation_steps=spec.grad_accumulation_steps,
            learning_rate=spec.learning_rate,
            optimizer=spec.optimizer,
            optimizer_config={**OPTIMIZERS[spec.optimizer], "class": optimizer_class},
            lr_schedule=lr_schedule(spec),
            weight_decay=spec.weight_decay,
            max_grad_norm=spec.max_grad_norm or None,
            max_seq_length=spec.max_seq_length,
            seed=spec.seed,
            steps_per_report=spec.steps_per_report,
            report_interval_s=spec.report_interval_s,
            steps_per_eval=spec.steps_per_eval,
            val_batches=spec.val_batches,
            keep=spec.keep,
            early_stopping_patience=spec.early_stopping_patience or None,
            checkpoint_every=spec.checkpoint_every,
            merge=spec.merge,
            init_from=spec.init_from,
            **backend_knows,
        )

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # JSON-ready: no tuples, fresh containers


@dataclass(frozen=True)
class Distributed:
    """How many processes of this machine run one job, and how they share it: `ddp` keeps a
    whole model in every process and averages gradients; `fsdp` shards parameters, gradients
    and optimizer state, for a model that does not fit one device. The global batch is the
    spec's: each process takes batch_size / processes examples per step."""

    processes: int = 1
    strategy: Literal["ddp", "fsdp"] = "ddp"


@dataclass(frozen=True)
class ProgressReport:
    """One report from inside the training loop; a field is None when this report lacks it.

    `train_loss` (and `reward`) average the steps since the last full report window.
    `elapsed_seconds` counts from this process's first step, which was `start_step + 1`.
    """

    step: int
    total_steps: int
    train_loss: float | None
    val_loss: float | None
    learning_rate: float | None
    tokens_per_second: float | None
    trained_tokens: int
    peak_memory_gb: float | None
    reward: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    elapsed_seconds: float = 0.0
    start_step: int = 0
    # Over this process's steps that compiled nothing (see TrainingProgress); None: not known.
    steady_tokens_per_second: float | None = None


@dataclass
class CheckpointState:
    """Everything in a checkpoint that is not an array (state.json); JSON only.

    `curve` is the loss curve so far (one entry per report window and evaluation);
    `window` the partly filled report window; `rng` and `data_position` whatever the backend
    needs beyond its RNG arrays to draw the same next batch as an uninterrupted run.
    """

    step: int
    total_steps: int
    backend: str
    method: str
    seed: int
    fingerprint: str
    trained_tokens: int = 0
    train_seconds: float = 0.0
    curve: list[dict[str, Any]] = field(default_factory=list)
    window: dict[str, float] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    data_position: dict[str, Any] = field(default_factory=dict)
    first_step_at: float | None = None
    processes: int = 1  # the world size that wrote it; a resume needs the same
    best_step: int | None = None  # the validation with the lowest loss so far
    best_val_loss: float | None = None
    evals_since_best: int = 0
    early_stopped: bool = False
    # What the adapter is, so that a later job can continue from this checkpoint (init_from).
    base_model: str | None = None
    base_model_revision: str | None = None
    adapter: dict[str, Any] | None = None  # the LoraSpec
    init_from: str | None = None

    @classmethod
    def start(cls, spec: TrainSpec, backend: str, processes: int = 1) -> CheckpointState:
        """The state before the first step of `spec` on `backend`."""
        return cls(step=0, total_steps=spec.iters, backend=backend, method=spec.method,
                   seed=spec.seed, fingerprint=spec.fingerprint(), processes=processes,
                   base_model=spec.base_model, base_model_revision=spec.base_model_revision,
                   adapter=asdict(spec.lora), init_from=spec.init_from)

    def note_validation(self, step: int, val_loss: float) -> bool:
        """Count a validation loss; True when it is a new best (strictly lower)."""
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_step, self.best_val_loss, self.evals_since_best = step, val_loss, 0
            return True
        self.evals_since_best += 1
        return False

    def patience_spent(self, spec: TrainSpec) -> bool:
        return 0 < spec.early_stopping_patience <= self.evals_since_best

    def write(self, directory: Path) -> None:
        (directory / CHECKPOINT_STATE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, directory: Path) -> CheckpointState:
        return cls(**json.loads((directory / CHECKPOINT_STATE).read_text()))


def checkpoint_problem(directory: Path, spec: TrainSpec, backend: str,
                       processes: int = 1) -> str | None:
    """Why the checkpoint in `directory` cannot resume `spec` on `backend` run by `processes`
    processes, or None if it can."""
    try:
        state = CheckpointState.read(directory)
    except (OSError, ValueError, TypeError) as e:
        return f"unreadable checkpoint state: {e}"
    if state.backend != backend:
        return f"written by the {state.backend} backend, this is {backend}"
    if state.fingerprint != spec.fingerprint():
        return "written for different training settings"
    if state.processes != processes:
        # Each process keeps its own RNG and data shard: another world size resumes inexactly.
        return f"written by {state.processes} processes, this run has {processes}"
    if not 0 < state.step < spec.iters:
        return f"step {state.step} is outside 1..{spec.iters - 1}"
    return None


def layers_to_adapt(lora: LoraSpec, n_blocks: int) -> int:
    """How many of the model's last blocks get adapters (all when the spec does not say)."""
    num_layers = n_blocks if lora.num_layers is None else lora.num_layers
    if not 0 < num_layers <= n_blocks:
        raise ValueError(f"num_layers={num_layers}, but the model has {n_blocks} layers")
    return num_layers


def match_target_modules(linear: list[str], targets: list[str]) -> list[str]:
    """PEFT-style names ("q_proj") to the block-relative paths of a block's linear layers
    ("self_attn.q_proj"), as both backends select them."""
    keys = set()
    for target in targets:
        matches = [n for n in linear if n == target or n.endswith("." + target)]
        if not matches:
            raise ValueError(f"target module {target!r} matches none of {sorted(linear)}")
        keys.update(matches)
    return sorted(keys)


def _ignore(*_: object) -> None:
    return None


@dataclass
class TrainingHooks:
    """How a backend talks to the service while it trains (see the module docstring).
    Called on the training thread: each must return quickly or do its I/O synchronously."""

    on_start: Callable[[dict, int | None], None] = _ignore
    on_progress: Callable[[ProgressReport], None] = _ignore
    on_checkpoint: Callable[[Path, int], None] = _ignore
    should_stop: Callable[[], str | None] = lambda: None


@dataclass(frozen=True)
class TrainResult:
    """A finished run. `resolved_args` spells out every effective hyperparameter (JSON-ready),
    so a result can be reproduced without knowing the library defaults of the day.
    `curve` is the whole run's loss curve, resumed parts included."""

    adapter_dir: Path
    first_loss: float
    final_loss: float
    final_val_loss: float | None
    steps: int
    trained_tokens: int
    seconds: float
    resolved_args: dict
    curve: list[dict[str, Any]] = field(default_factory=list)
    first_reward: float | None = None
    final_reward: float | None = None
    resumed_from_step: int | None = None
    merged_dir: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    best_val_loss: float | None = None
    best_step: int | None = None
    early_stopped: bool = False


class TrainingStopped(Exception):
    """Raised by a backend when `should_stop()` gave a reason; no adapter is left behind.
    `step` is the last finished step."""

    def __init__(self, reason: str, step: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.step = step
