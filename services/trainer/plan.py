"""What the trainer decides before any weights move: which worker can run a job, and how."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tunebus.contracts import DatasetSummary, TrainingProgress, TrainingRequested
from tunebus.contracts.training import AdapterSettings, TrainerCapabilities

from .backend import GRPOSpec, LoraSpec, PreferenceSpec, ProgressReport, TrainSpec
from .rewards import REWARDS

ALL_METHODS = ["cpo", "dpo", "grpo", "orpo", "sft"]
ALL_GRPO_LOSSES = ["bnpo", "dapo", "dr_grpo", "grpo", "gspo"]
DAPO_EPSILON_HIGH = 0.28  # the DAPO paper's clip-higher value


def refusal(request: TrainingRequested, caps: TrainerCapabilities) -> str | None:
    """Why a worker with `caps` cannot run the request, or None when it can."""
    who = f"the {caps.backend} worker"
    if request.backend not in ("auto", caps.backend):
        return f"backend {request.backend!r} was requested; {who} runs {caps.backend!r}"
    if request.method not in caps.methods:
        return f"method {request.method!r} is not supported by {who}"
    if request.adapter.type not in caps.adapters:
        return f"adapter type {request.adapter.type!r} is not supported by {who}"
    if request.adapter.quantization not in caps.quantization:
        why = caps.why_not.get(f"quantization={request.adapter.quantization}")
        return (f"quantization {request.adapter.quantization!r} is not supported by {who} "
                f"(supported: {', '.join(caps.quantization)})" + (f": {why}" if why else ""))
    optimizer = request.hyperparameters.optimizer
    if optimizer not in caps.optimizers:
        why = caps.why_not.get(f"optimizer={optimizer}")
        return (f"optimizer {optimizer!r} is not supported by {who} "
                f"(supported: {', '.join(caps.optimizers)})" + (f": {why}" if why else ""))
    if request.merge and not caps.merge:
        return f"a merged model is not supported by {who}"
    for integration in request.integrations:
        if integration.type not in caps.integrations:
            why = caps.why_not.get(f"integration={integration.type}")
            return (f"integration {integration.type!r} is not offered by {who}"
                    + (f": {why}" if why else ""))
    if request.method == "grpo":
        grpo = request.grpo
        if grpo.loss_type not in caps.grpo_loss_types:
            return f"GRPO loss type {grpo.loss_type!r} is not supported by {who}"
        unknown = [name for name in grpo.reward_functions if name not in caps.reward_functions]
        if unknown:
            return (f"reward function(s) {', '.join(map(repr, unknown))} unknown to {who} "
                    f"(known: {', '.join(caps.reward_functions)})")
    return None


# With init_from these are the parent's: the weights that continue have this shape.
ADAPTER_SHAPE = ("type", "rank", "alpha", "target_modules", "num_layers")
ADAPTER_TYPES = ("lora", "dora")  # what a parent can be: an adapter, not a whole model


@dataclass(frozen=True)
class Parent:
    """What a request's init_from names, found: a registered version or a checkpoint."""

    ref: str  # name:version (never an alias), or the checkpoint's s3:// URI
    base_model: str
    base_model_revision: str | None
    adapter: AdapterSettings  # its shape
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # layout -> {file: s3 URI}
    sha256: dict[str, str] = field(default_factory=dict)  # s3 URI -> sha256, where recorded


def init_from_refusal(request: TrainingRequested, parent: Parent) -> str | None:
    """Why the request cannot continue from `parent`, naming init_from, or None when it can."""
    where = f"init_from {request.init_from!r} ({parent.ref})"
    if parent.adapter.type not in ADAPTER_TYPES:
        return (f"{where} is a {parent.adapter.type!r} fine-tune, not a LoRA or DoRA adapter: "
                "there is no adapter to continue; name it as base_model instead")
    if parent.base_model != request.base_model or (
            (parent.base_model_revision or request.base_model_revision)
            and parent.base_model_revision != request.base_model_revision):
        return (f"{where} was trained on base model {_base(parent.base_model, parent.base_model_revision)}, "
                f"this request names {_base(request.base_model, request.base_model_revision)}: "
                "the base model must match")
    defaults = AdapterSettings()
    contradicting = [
        f"adapter.{name} is {getattr(request.adapter, name)!r}, the parent's "
        f"{getattr(parent.adapter, name)!r}"
        for name in ADAPTER_SHAPE
        if getattr(request.adapter, name) not in (getattr(defaults, name),
                                                  getattr(parent.adapter, name))]
    if contradicting:
        return (f"{where}: the adapter's shape is the parent's; {'; '.join(contradicting)} "
                "(leave them out, or give the parent's)")
    if not parent.files:
        return f"{where} is stored in no adapter layout a trainer reads (mlx, peft)"
    return None


def continued_adapter(request: TrainingRequested, parent: Parent) -> AdapterSettings:
    """The adapter settings of a run continued from `parent`: its shape, the request's rest."""
    return request.adapter.model_copy(
        update={name: getattr(parent.adapter, name) for name in ADAPTER_SHAPE})


def _base(model: str, revision: str | None) -> str:
    return repr(model) + (f" at revision {revision!r}" if revision else "")


def unserved_reason(request: TrainingRequested, running: list[TrainerCapabilities]) -> str | None:
    """None when one of the running workers can take the request; else why none can."""
    reasons = []
    for caps in running:
        reason = refusal(request, caps)
        if reason is None:
            return None
        reasons.append(reason)
    if request.backend != "auto" and request.backend not in {c.backend for c in running}:
        reasons.insert(0, f"no {request.backend} worker is running")
    return "no running trainer can serve this request: " + "; ".join(dict.fromkeys(reasons))


def train_spec(
    request: TrainingRequested,
    dataset: DatasetSummary,
    *,
    checkpoint_every: int = 0,
    report_interval_s: float | None = None,
    parent: Parent | None = None,
) -> TrainSpec:
    """The run the request asks for; continued from `parent` (init_from), with its shape."""
    hp = request.hyperparameters
    if hp.iters is not None:
        iters = hp.iters
    else:
        batches_per_epoch = math.ceil(dataset.train_rows / hp.batch_size)
        iters = max(1, hp.epochs * math.ceil(batches_per_epoch / hp.grad_accumulation_steps))
    if hp.checkpoint_every is not None:
        checkpoint_every = hp.checkpoint_every
    if checkpoint_every:
        # Only between optimizer updates: a checkpoint never holds half-accumulated gradients.
        accumulation = hp.grad_accumulation_steps
        checkpoint_every = math.ceil(checkpoint_every / accumulation) * accumulation
    adapter = request.adapter if parent is None else continued_adapter(request, parent)
    updates = math.ceil(iters / hp.grad_accumulation_steps)
    if hp.warmup_ratio is not None:
        warmup_steps = math.ceil(hp.warmup_ratio * updates)  # rounded up, as the HF Trainer does
    else:
        warmup_steps = hp.warmup_steps or 0
    return TrainSpec(
        iters=iters,
        method=request.method,
        batch_size=min(hp.batch_size, dataset.train_rows),
        learning_rate=hp.learning_rate,
        max_seq_length=hp.max_seq_length,
        grad_accumulation_steps=hp.grad_accumulation_steps,
        optimizer=hp.optimizer,
        lr_scheduler=hp.lr_scheduler,
        warmup_steps=warmup_steps,
        min_lr_ratio=hp.min_lr_ratio,
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        seed=hp.seed,
        steps_per_report=max(1, min(10, iters // 10)),
        steps_per_eval=hp.eval_every or max(1, iters // 2),
        # GRPO evaluates by sampling completions: a few batches, not the whole split.
        val_batches=4 if request.method == "grpo" else -1,
        mask_prompt=hp.mask_prompt,
        quantization=adapter.quantization,
        lora=LoraSpec(
            kind=adapter.type,
            rank=adapter.rank,
            alpha=adapter.alpha,
            dropout=adapter.dropout,
            target_modules=adapter.target_modules,
            num_layers=adapter.num_layers,
        ),
        preference=PreferenceSpec(**request.preference.model_dump()),
        grpo=grpo_spec(request),
        merge=request.merge,
        keep=hp.keep,
        early_stopping_patience=hp.early_stopping_patience or 0,
        checkpoint_every=checkpoint_every,
        report_interval_s=report_interval_s,
        base_model=request.base_model,
        base_model_revision=request.base_model_revision,
        init_from=parent.ref if parent is not None else None,
    )


def grpo_spec(request: TrainingRequested) -> GRPOSpec:
    g = request.grpo
    epsilon_high = g.epsilon_high
    if epsilon_high is None:
        epsilon_high = DAPO_EPSILON_HIGH if g.loss_type == "dapo" else g.epsilon
    return GRPOSpec(
        loss_type=g.loss_type,
        group_size=g.group_size,
        beta=g.beta,
        epsilon=g.epsilon,
        epsilon_high=epsilon_high,
        temperature=g.temperature,
        max_completion_length=g.max_completion_length,
        reward_functions=tuple(g.reward_functions),
        reward_weights=tuple(g.reward_weights) if g.reward_weights is not None else None,
    )


def progress_payload(job_id: str, report: ProgressReport, iters_per_epoch: float) -> TrainingProgress:
    steps_done = report.step - report.start_step
    eta = (report.elapsed_seconds / steps_done * (report.total_steps - report.step)
           if steps_done > 0 else None)
    return TrainingProgress(
        job_id=job_id,
        step=report.step,
        total_steps=report.total_steps,
        epoch=report.step / iters_per_epoch if iters_per_epoch else None,
        train_loss=report.train_loss,
        val_loss=report.val_loss,
        learning_rate=report.learning_rate,
        tokens_per_second=report.tokens_per_second,
        steady_tokens_per_second=report.steady_tokens_per_second,
        trained_tokens=report.trained_tokens,
        peak_memory_gb=report.peak_memory_gb,
        elapsed_seconds=report.elapsed_seconds,
        eta_seconds=eta,
        reward=report.reward,
        metrics=report.metrics,
    )
