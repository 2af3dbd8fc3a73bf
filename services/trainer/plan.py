"""What the trainer decides before any weights move: can this worker run the job, and how."""

from __future__ import annotations

import math

from tunebus.contracts import DatasetSummary, TrainingProgress, TrainingRequested

from .backend import LoraSpec, ProgressReport, TrainSpec

# What this build of the MLX worker can do; requests for anything else are refused up front.
MLX_CAPABILITIES = {"methods": {"sft"}, "adapters": {"lora", "dora"}, "quantization": {"none"}}


def refusal(request: TrainingRequested, backend: str) -> str | None:
    """Why this worker cannot run the request, or None when it can."""
    if request.backend not in ("auto", backend):
        return f"backend {request.backend!r} was requested; this worker runs {backend!r}"
    caps = MLX_CAPABILITIES
    if request.method not in caps["methods"]:
        return f"method {request.method!r} is not supported by the {backend} worker"
    if request.adapter.type not in caps["adapters"]:
        return f"adapter type {request.adapter.type!r} is not supported by the {backend} worker"
    if request.adapter.quantization not in caps["quantization"]:
        return (f"quantization {request.adapter.quantization!r} is not supported by the "
                f"{backend} worker (supported: {', '.join(sorted(caps['quantization']))})")
    return None


def train_spec(request: TrainingRequested, dataset: DatasetSummary) -> TrainSpec:
    hp = request.hyperparameters
    if hp.iters is not None:
        iters = hp.iters
    else:
        batches_per_epoch = math.ceil(dataset.train_rows / hp.batch_size)
        iters = max(1, hp.epochs * math.ceil(batches_per_epoch / hp.grad_accumulation_steps))
    adapter = request.adapter
    return TrainSpec(
        iters=iters,
        batch_size=min(hp.batch_size, dataset.train_rows),
        learning_rate=hp.learning_rate,
        max_seq_length=hp.max_seq_length,
        grad_accumulation_steps=hp.grad_accumulation_steps,
        warmup_steps=hp.warmup_steps,
        seed=hp.seed,
        steps_per_report=max(1, min(10, iters // 10)),
        steps_per_eval=max(1, iters // 2),
        val_batches=-1,
        lora=LoraSpec(
            kind=adapter.type,
            rank=adapter.rank,
            alpha=adapter.alpha,
            dropout=adapter.dropout,
            target_modules=adapter.target_modules,
            num_layers=adapter.num_layers,
        ),
    )


def progress_payload(job_id: str, report: ProgressReport, elapsed: float, iters_per_epoch: float) -> TrainingProgress:
    eta = elapsed / report.step * (report.total_steps - report.step) if report.step else None
    return TrainingProgress(
        job_id=job_id,
        step=report.step,
        total_steps=report.total_steps,
        epoch=report.step / iters_per_epoch if iters_per_epoch else None,
        train_loss=report.train_loss,
        val_loss=report.val_loss,
        learning_rate=report.learning_rate,
        tokens_per_second=report.tokens_per_second,
        trained_tokens=report.trained_tokens,
        peak_memory_gb=report.peak_memory_gb,
        elapsed_seconds=elapsed,
        eta_seconds=eta,
    )
