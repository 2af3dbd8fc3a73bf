"""What an evaluation backend is asked to do, and which one runs here.

A backend is a module with `NAME` (its name in BACKENDS), `ADAPTER_FORMAT` (the adapter layout it
loads: "mlx" or "peft") and

    measure(model_dir, rows, prompts, *, adapter_dir=None, max_seq_length, batch_size,
            mask_prompt, max_tokens) -> Measurement

which scores `rows` (held-out examples in mlx-lm-lora's SFT shapes) and answers each prompt
(chat messages) greedily with at most `max_tokens` new tokens, `batch_size` examples or
prompts at a time (it bounds the memory of both), and

    measure_base_and_adapter(model_dir, adapter_dir, rows, prompts, **same) -> (before, after)

which measures the base model and then base+adapter from one load of the model (an evaluation
job's pair). `mask_prompt` is as the adapter was trained (TrainingCompleted.mask_prompt), or the
loss measures something else than the training loss did. `mlx_eval` is the MLX one,
`torch_eval` the CUDA one (torch, transformers and PEFT; on a CPU too): the same names as the
trainer's backends, so a setting, an event or a report says "mlx" or "cuda" wherever it is read.

This module imports no ML library, so the service starts without one.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from types import ModuleType

# Preferred first: MLX where it is installed (Apple silicon, or mlx[cpu] on Linux), else CUDA.
# Each backend: the libraries its module imports, all of which must be installed, and the module.
BACKENDS = {
    "mlx": (("mlx_lm", "mlx_lm_lora"), "mlx_eval"),
    "cuda": (("torch", "transformers", "peft"), "torch_eval"),
}


class BackendUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Answer:
    text: str
    seconds: float  # wall time from the prompt to the last token
    tokens: int  # new tokens generated


@dataclass(frozen=True)
class Measurement:
    loss: float  # mean NLL per scored token, in nats
    perplexity: float
    token_accuracy: float  # share of scored tokens that are the model's greedy prediction
    tokens: int
    examples: int
    answers: list[Answer] = field(default_factory=list)


def available() -> list[str]:
    """The backends whose libraries are all installed and whose module exists, in preference
    order."""
    return [name for name in BACKENDS if not missing(name)]


def missing(name: str) -> list[str]:
    """What backend `name` needs and is not installed here: libraries, then its module.
    Found without importing anything (find_spec), so the service starts without them."""
    libraries, module = BACKENDS[name]
    return [m for m in (*libraries, f"{__package__}.{module}") if importlib.util.find_spec(m) is None]


def load_backend(preference: str = "auto") -> ModuleType:
    """The backend module to measure with; BackendUnavailable says why there is none."""
    found = available()
    if preference == "auto":
        if not found:
            lacking = "; ".join(f"{name} lacks {', '.join(missing(name))}" for name in BACKENDS)
            raise BackendUnavailable(
                "no evaluation backend is installed: install the 'mlx' extra (MLX), or torch "
                f"with transformers and peft (the 'cuda' extra) ({lacking})")
        preference = found[0]
    if preference not in found:
        libraries, module = BACKENDS[preference]
        raise BackendUnavailable(
            f"evaluation backend {preference!r} needs the packages {', '.join(libraries)} and the "
            f"{__package__}.{module} module; not installed here: {', '.join(missing(preference))} "
            f"(available here: {', '.join(found) or 'none'})")
    return importlib.import_module(f"{__package__}.{BACKENDS[preference][1]}")
