"""What a training backend is asked to do and what it answers, independent of MLX or torch.

Plain dataclasses, no I/O: the trainer service builds a `TrainSpec` from a job message, hands it to
a backend (`mlx_backend.train_lora`, or a CUDA one later) and turns `ProgressReport`s and the
`TrainResult` back into messages. This module must import without any ML library installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class LoraSpec:
    """The adapter to train.

    `alpha` follows the PEFT convention (effective scale = alpha / rank); backends whose libraries
    take a scale directly (mlx-lm) convert. `target_modules` holds module names such as
    "q_proj" or "self_attn.q_proj"; None means the library's default (every linear layer).
    `num_layers` counts transformer blocks from the top; None means all of them.
    """

    kind: Literal["lora", "dora"] = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    num_layers: int | None = None


@dataclass(frozen=True)
class TrainSpec:
    """Supervised fine-tuning on chat data; `iters` counts optimizer-visible batches."""

    iters: int
    batch_size: int = 4
    learning_rate: float = 1e-4
    max_seq_length: int = 512
    grad_accumulation_steps: int = 1
    warmup_steps: int = 0
    seed: int = 0
    steps_per_report: int = 10
    steps_per_eval: int = 50
    val_batches: int = 25
    mask_prompt: bool = True
    lora: LoraSpec = field(default_factory=LoraSpec)


@dataclass(frozen=True)
class ProgressReport:
    """One report from inside the training loop; a field is None when this report lacks it."""

    step: int
    total_steps: int
    train_loss: float | None
    val_loss: float | None
    learning_rate: float | None
    tokens_per_second: float | None
    trained_tokens: int
    peak_memory_gb: float | None


@dataclass(frozen=True)
class TrainResult:
    """A finished run. `resolved_args` spells out every effective hyperparameter (JSON-ready),
    so a result can be reproduced without knowing the library defaults of the day."""

    adapter_dir: Path
    first_loss: float
    final_loss: float
    final_val_loss: float | None
    steps: int
    trained_tokens: int
    seconds: float
    resolved_args: dict


class TrainingStopped(Exception):
    """Raised by a backend when its `should_stop()` said yes; no adapter is left behind."""
